//! `aragora`: the security control plane (`serve`) and its operator commands.

mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow};
use aragora::cli::render::{self, Rendered, render};
use aragora::control::{self, ControlRequest, ControlResponse, Via};
use aragora::encryption::migration::MigrationView;
use aragora::operator::Operator;
use clap::{Parser, Subcommand};
use serve::{close, load_config, open_state};

#[derive(Parser)]
#[command(name = "aragora", version, about = "Aragora security control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (ARAGORA_BIND, default 127.0.0.1:8080) on the embedded store
    /// in ARAGORA_DATA_DIR (default ./data), or with DATABASE_URL on PostgreSQL (the
    /// operator commands then open it too when no server answers on the data dir).
    Serve,
    /// Validate ARAGORA_ENCRYPTION_KEY without starting the server (never prints it).
    CheckKey,
    /// Account administration.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// The security audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Rotate the primary data key (a key-ring backup is written to
    /// data/keyring-backups/ first), or with --cleanup-expired retire keys no
    /// stored record uses. Through the owner-only socket when the server runs.
    KeyRotation {
        /// Rotate even if the primary key is not due (90 days).
        #[arg(long)]
        force: bool,
        /// Why (recorded in the audit log); required to rotate.
        #[arg(long)]
        reason: Option<String>,
        /// Retire unused keys instead: decrypt-only -> expired -> destroyed.
        #[arg(long, conflicts_with_all = ["force", "reason"])]
        cleanup_expired: bool,
        #[arg(long)]
        json: bool,
    },
    /// The encryption key ring.
    KeyRing {
        #[command(subcommand)]
        command: KeyRingCommand,
    },
    /// Rewrap every record of an encrypted store under the primary key (run it
    /// after a key rotation; then `key-rotation --cleanup-expired` retires the
    /// old key). Online and resumable: a stopped run continues where it
    /// stopped. Through the owner-only socket when the server runs.
    Migration {
        /// The store: secrets, or all.
        #[arg(long)]
        store: Option<String>,
        /// Count records by key and what a run would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Retry only the records the last run could not rewrap.
        #[arg(long, conflicts_with = "dry_run")]
        retry_failed: bool,
        /// Mark a record skipped (listed in the status and audited; runs leave
        /// it alone). The store defaults to secrets.
        #[arg(long, conflicts_with_all = ["dry_run", "retry_failed"])]
        skip_record: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Open the key ring of a running server that started sealed (without an
    /// ARAGORA_ENCRYPTION_KEY that opens it): reads the master key (64 hex
    /// characters) from stdin, never from arguments, and sends it over the
    /// owner-only control socket. A wrong key is refused (exit 1) and the
    /// server stays sealed; both are audited.
    Unseal {
        #[arg(long)]
        json: bool,
    },
    /// The master key (ARAGORA_ENCRYPTION_KEY) that wraps the key ring.
    MasterKey {
        #[command(subcommand)]
        command: MasterKeyCommand,
    },
    /// Online backups of the store while the server runs (writers keep
    /// going), through the owner-only socket; with the server stopped the
    /// command opens the store itself. DIR gets the aedb backup chain and a
    /// copy of the key-ring backup files: restore it with `aedb restore
    /// --from DIR --to NEW_DATA_DIR/aedb`.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Switch the runtime maintenance mode of the running server: off,
    /// read-only (writes refused with 503, except /api/admin/* incident
    /// actions) or on (only health, metrics and /api/admin/* are served).
    /// MAINTENANCE_MODE sets the mode a server starts in.
    Maintenance {
        #[arg(value_parser = ["off", "read-only", "on"])]
        mode: String,
        #[arg(long)]
        json: bool,
    },
    /// Mark for rotation every secret a user read (from the audit log's
    /// secret_access entries, all time): `rotation_required` in its metadata.
    Rotation {
        /// The user whose reads expose the secrets: an email or a user id (an id
        /// the audit log knows is accepted for a deleted account; anything else
        /// is refused).
        #[arg(long)]
        secrets_accessed_by: String,
        /// Only report what would be marked.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// The embedded store's commit admission rate on the running server (the
    /// aedb runbook's "reduce the admission rate"): without options, show it.
    /// Commits beyond it are refused at once (503, counted in
    /// aedb_admission_rejections_total). Audited as admission_changed; runtime
    /// only (a restart starts unlimited).
    Admission {
        /// Admit at most N commits per second (N >= 1).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "unlimited")]
        max_commits_per_sec: Option<u32>,
        /// Remove the limit.
        #[arg(long)]
        unlimited: bool,
        #[arg(long)]
        json: bool,
    },
    /// The restore drill, offline (reads only the backup files; the server
    /// may run or not): restores the newest chain under DIR into a temporary
    /// dir, verifies it (aedb verify, check invariants, parity), opens its key
    /// ring with ARAGORA_ENCRYPTION_KEY (and _PREVIOUS) and the key-ring
    /// backups paired with it, and decrypts a random sample of secrets plus
    /// the newest. Exit 0 only when all of it passes; 1 naming what failed
    /// (the temporary dir is then kept).
    Drill {
        /// The backups (a `backup --out` DIR, or the schedule's directory of
        /// chain-NNNN); default ARAGORA_BACKUP_DIR.
        #[arg(long, value_name = "DIR")]
        backup_dir: Option<std::path::PathBuf>,
        /// Secrets to decrypt at random (the newest one is always added).
        #[arg(long, value_name = "N", default_value_t = aragora::drill::DEFAULT_SAMPLE)]
        sample: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MasterKeyCommand {
    /// Rewrap every key-ring record under ARAGORA_ENCRYPTION_KEY (the new
    /// master key); ARAGORA_ENCRYPTION_KEY_PREVIOUS opens the records still
    /// under the old one. A key-ring backup is written first; records are
    /// rewritten compare-and-set in batches, so an interrupted run leaves each
    /// under one of the two keys and a rerun finishes it. Refused (nothing
    /// changed) when a record opens under neither key. Through the owner-only
    /// socket when the server runs (its keys), else on the store directly.
    Rotate {
        /// Report what would be rewrapped; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The approved master_key_rotation request this run executes (it is
        /// marked executed). Without it the run is the owner's path, audited
        /// as approval_gate_skipped at critical severity.
        #[arg(long, value_name = "ID", conflicts_with = "dry_run")]
        approval: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BackupCommand {
    /// A full backup: starts a chain in DIR (created if absent).
    Full {
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The log since DIR's newest backup (run `backup full --out DIR` first).
    Incremental {
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeyRingCommand {
    /// Restore keys missing from the store from a backup file written before a
    /// rotation (data/keyring-backups/keyring-*.json). Keys must open under the
    /// current ARAGORA_ENCRYPTION_KEY (or ARAGORA_ENCRYPTION_KEY_PREVIOUS, for a
    /// backup from before a master-key rotation).
    Restore {
        #[arg(long)]
        file: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create the first admin and print its API key once. Refused when an admin
    /// exists. Works with the server stopped or running (through the owner-only
    /// socket in the data dir).
    Bootstrap {
        #[arg(long)]
        email: String,
        /// Print {"user_id", "email", "token"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Break-glass, when no admin can act: enable, unlock and make admin the
    /// account with this email (or create it), revoke its sessions and API keys,
    /// clear its password, and print a new API key once. Refused (exit 1) while
    /// an admin can act, unless --force. Run by the data dir's owner, with the
    /// server stopped or running (through the owner-only socket).
    Recover {
        #[arg(long)]
        email: String,
        /// Why (recorded in the audit log); required with --force.
        #[arg(long)]
        reason: Option<String>,
        /// Recover although an admin can act (their credentials are lost).
        #[arg(long, requires = "reason")]
        force: bool,
        /// Print {"status", "user_id", "email", "token", ...} as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the audit hash chain (exit 1 when it is broken); with --export,
    /// verify a directory of exported segments against each other and the
    /// live chains instead.
    Verify {
        /// A directory written by `aragora audit export`.
        #[arg(long, value_name = "DIR")]
        export: Option<std::path::PathBuf>,
        /// Also trust segments signed with this public key (hex; printed by
        /// every export), e.g. one from before a master-key rotation.
        #[arg(long = "public-key", value_name = "HEX", requires = "export")]
        public_keys: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Export what is new in the audit chains (aragora's log, aedb's
    /// authz_audit and assertion_audit) to DIR as signed, chain-linked
    /// segment files, written once; rerun to continue where DIR ends.
    Export {
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// For a chain DIR does not hold yet: start at this time (RFC 3339,
        /// e.g. 2026-12-01T00:00:00Z) or this long ago (e.g. 24h).
        #[arg(long, value_name = "T")]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckKey => check_key(),
        Command::Serve => serve::run(),
        Command::Admin {
            command: AdminCommand::Bootstrap { email, json },
        } => command(ControlRequest::Bootstrap { email }, json),
        Command::Admin {
            command:
                AdminCommand::Recover {
                    email,
                    reason,
                    force,
                    json,
                },
        } => command(
            ControlRequest::AdminRecover {
                email,
                reason,
                force,
            },
            json,
        ),
        Command::Audit {
            command: AuditCommand::Verify {
                export: None, json, ..
            },
        } => command(ControlRequest::AuditVerify, json),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    export: Some(dir),
                    public_keys,
                    json,
                },
        } => absolute(&dir)
            .and_then(|dir| command(ControlRequest::AuditVerifyExport { dir, public_keys }, json)),
        Command::Audit {
            command: AuditCommand::Export { out, since, json },
        } => absolute(&out).and_then(|out| {
            let since_us = since.as_deref().map(parse_since).transpose()?;
            command(ControlRequest::AuditExport { out, since_us }, json)
        }),
        Command::KeyRotation {
            force,
            reason,
            cleanup_expired,
            json,
        } => key_rotation(force, reason, cleanup_expired, json),
        Command::KeyRing {
            command: KeyRingCommand::Restore { file, json },
        } => key_ring_restore(&file, json),
        Command::Migration {
            store,
            dry_run,
            retry_failed,
            skip_record,
            json,
        } => migration(store, dry_run, retry_failed, skip_record, json),
        Command::Unseal { json } => unseal(json),
        Command::MasterKey {
            command:
                MasterKeyCommand::Rotate {
                    dry_run,
                    approval,
                    json,
                },
        } => command(ControlRequest::MasterKeyRotate { dry_run, approval }, json),
        Command::Backup {
            command: BackupCommand::Full { out, json },
        } => absolute(&out).and_then(|out| {
            command(
                ControlRequest::Backup {
                    kind: aragora::backup::BackupKind::Full,
                    out,
                },
                json,
            )
        }),
        Command::Backup {
            command: BackupCommand::Incremental { out, json },
        } => absolute(&out).and_then(|out| {
            command(
                ControlRequest::Backup {
                    kind: aragora::backup::BackupKind::Incremental,
                    out,
                },
                json,
            )
        }),
        Command::Maintenance { mode, json } => aragora::maintenance::MaintenanceMode::parse(&mode)
            .map_err(|e| anyhow!(e.to_string()))
            .and_then(|mode| command(ControlRequest::Maintenance { mode }, json)),
        Command::Rotation {
            secrets_accessed_by,
            dry_run,
            json,
        } => command(
            ControlRequest::SecretRotation {
                user_id: secrets_accessed_by,
                dry_run,
            },
            json,
        ),
        Command::Admission {
            max_commits_per_sec,
            unlimited,
            json,
        } => {
            let set = match (
                max_commits_per_sec.and_then(std::num::NonZeroU32::new),
                unlimited,
            ) {
                (Some(n), _) => Some(aragora::admission::Limit::PerSec(n)),
                (None, true) => Some(aragora::admission::Limit::Unlimited),
                (None, false) => None,
            };
            command(ControlRequest::Admission { set }, json)
        }
        Command::Drill {
            backup_dir,
            sample,
            json,
        } => drill(backup_dir, sample, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aragora: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn check_key() -> Result<ExitCode> {
    match aragora::config::check_encryption_key() {
        Ok(()) => {
            println!("ARAGORA_ENCRYPTION_KEY: ok (64 hex characters, 32 bytes)");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("aragora: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// Sends `req` to the running server, or runs it on the store directly.
fn run_control(req: ControlRequest) -> Result<ControlResponse> {
    let config = load_config()?;
    let socket = control::socket_path(&config.data_dir);
    tracing::debug!(socket = %socket.display(), request = ?req, "trying the running server's control socket");
    match control::call(&config.data_dir, &req).map_err(|e| anyhow!(e))? {
        Some(Ok(v)) => {
            tracing::debug!("the server ran the command");
            Ok(v)
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "the server refused the command");
            Err(anyhow!(e))
        }
        None => {
            tracing::debug!(
                data_dir = %config.data_dir.display(),
                "no server answers: running the command on the store directly"
            );
            let (store, state) = open_state(config)?;
            let r = control::execute(&state, req, Via::Direct, &Operator::of_this_process())
                .map_err(|e| anyhow!(e.to_string()));
            close(store, state)?;
            r
        }
    }
}

/// Prints a rendered answer and turns its code into the exit code.
fn emit(r: Rendered) -> ExitCode {
    print!("{}", r.stdout);
    eprint!("{}", r.stderr);
    ExitCode::from(r.code)
}

fn command(req: ControlRequest, json: bool) -> Result<ExitCode> {
    let v = run_control(req)?;
    Ok(emit(render(&v, json, render::Context::default())))
}

/// The longest line `unseal` reads from stdin (a key is 64 characters).
const MAX_UNSEAL_INPUT: u64 = 4096;

fn unseal(json: bool) -> Result<ExitCode> {
    use std::io::{BufRead, Read};
    let config = load_config()?;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!(
            "ARAGORA_ENCRYPTION_KEY (64 hex characters, shown as typed; pipe it in to avoid that): "
        );
    }
    let mut input = zeroize::Zeroizing::new(String::with_capacity(MAX_UNSEAL_INPUT as usize));
    stdin
        .lock()
        .take(MAX_UNSEAL_INPUT)
        .read_line(&mut input)
        .context("reading the key from stdin")?;
    let key = zeroize::Zeroizing::new(input.trim().to_string());
    if key.is_empty() {
        anyhow::bail!(
            "no key on stdin: pipe the master key in (e.g. `aragora unseal < /path/to/key`); \
             it is never taken from arguments"
        );
    }
    let req = ControlRequest::Unseal {
        key: control::KeyHex::new(key),
    };
    match control::call(&config.data_dir, &req).map_err(|e| anyhow!(e))? {
        Some(Ok(v)) => Ok(emit(render(&v, json, render::Context::default()))),
        // Refused (a wrong or malformed key): the server stays sealed.
        Some(Err(e)) => {
            eprintln!("aragora: {e}");
            Ok(ExitCode::from(1))
        }
        None => anyhow::bail!(
            "no server answers on {}: unseal opens a running server's key ring (start it; \
             without a usable ARAGORA_ENCRYPTION_KEY it starts sealed)",
            control::socket_path(&config.data_dir).display()
        ),
    }
}

fn key_rotation(
    force: bool,
    reason: Option<String>,
    cleanup_expired: bool,
    json: bool,
) -> Result<ExitCode> {
    if !cleanup_expired && reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        anyhow::bail!("--reason=TEXT is required to rotate (or use --cleanup-expired)");
    }
    command(
        ControlRequest::KeyRotation {
            reason,
            force,
            cleanup_expired,
        },
        json,
    )
}

/// A path the server can use: the socket's server has its own working
/// directory.
fn absolute(path: &std::path::Path) -> Result<String> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .context("the current directory")?
            .join(path)
    };
    Ok(abs.display().to_string())
}

/// `--since`: an RFC 3339 time, or a duration ago.
fn parse_since(value: &str) -> Result<i64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(value.trim()) {
        let us = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| anyhow!("--since: {value:?} is before 1970"))?
            .as_micros();
        return Ok(i64::try_from(us).unwrap_or(i64::MAX));
    }
    let ago = aragora::clock::parse_duration("--since", value)
        .map_err(|e| anyhow!("{e}; or give a time such as 2026-12-01T00:00:00Z"))?;
    let ago_us = i64::try_from(ago.as_micros()).unwrap_or(i64::MAX);
    Ok(aragora::clock::now_us().saturating_sub(ago_us))
}

fn key_ring_restore(file: &std::path::Path, json: bool) -> Result<ExitCode> {
    let file =
        std::fs::canonicalize(file).with_context(|| format!("backup file {}", file.display()))?;
    let shown = file.display().to_string();
    let v = run_control(ControlRequest::KeyRingRestore {
        file: shown.clone(),
    })?;
    Ok(emit(render(
        &v,
        json,
        render::Context { file: Some(&shown) },
    )))
}

fn migration(
    store: Option<String>,
    dry_run: bool,
    retry_failed: bool,
    skip_record: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let store = match (store, &skip_record) {
        (Some(s), _) => s,
        (None, Some(_)) => "secrets".to_string(),
        (None, None) => anyhow::bail!("--store=NAME|all is required (stores: secrets)"),
    };
    let req = ControlRequest::Migration {
        store,
        dry_run,
        retry_failed,
        skip_record: skip_record.clone(),
    };
    let show_progress =
        !json && !dry_run && skip_record.is_none() && std::io::stderr().is_terminal();
    let config = load_config()?;
    let status_req = ControlRequest::MigrationStatus { store: None };
    let server_runs = matches!(control::call(&config.data_dir, &status_req), Ok(Some(_)));
    let v = if server_runs {
        let dir = config.data_dir.clone();
        with_progress(
            show_progress,
            || match control::call(&dir, &status_req) {
                Ok(Some(Ok(ControlResponse::MigrationStatus(v)))) => Some(v),
                _ => None,
            },
            || match control::call(&config.data_dir, &req) {
                Ok(Some(Ok(v))) => Ok(v),
                Ok(Some(Err(e))) => Err(anyhow!(e)),
                Ok(None) => Err(anyhow!(
                    "the server stopped answering on its control socket"
                )),
                Err(e) => Err(anyhow!(e)),
            },
        )?
    } else {
        let (store, state) = open_state(config)?;
        let r = with_progress(
            show_progress,
            || state.migration.live().map(|s| s.view()),
            || {
                control::execute(&state, req, Via::Direct, &Operator::of_this_process())
                    .map_err(|e| anyhow!(e.to_string()))
            },
        );
        close(store, state)?;
        r?
    };
    Ok(emit(render(&v, json, render::Context::default())))
}

/// Runs `work`, printing a progress line on stderr (a terminal) from
/// `status` meanwhile.
fn with_progress<T>(
    enabled: bool,
    status: impl Fn() -> Option<MigrationView> + Sync,
    work: impl FnOnce() -> T,
) -> T {
    if !enabled {
        return work();
    }
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let started = std::time::Instant::now();
            let mut printed = false;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(250));
                let Some(v) = status() else { continue };
                if let Some(line) = render::progress_line(&v, started.elapsed().as_secs_f64()) {
                    eprint!("{line}");
                    printed = true;
                }
            }
            if printed {
                eprintln!();
            }
        });
        let r = work();
        done.store(true, Ordering::Relaxed);
        r
    })
}

/// `aragora drill`: offline, from the configuration's keys and backup dir.
fn drill(backup_dir: Option<std::path::PathBuf>, sample: usize, json: bool) -> Result<ExitCode> {
    let config = load_config()?;
    let backup_dir = backup_dir
        .or_else(|| config.backup.as_ref().map(|b| b.dir.clone()))
        .ok_or_else(|| {
            anyhow!("--backup-dir DIR is required when ARAGORA_BACKUP_DIR is not set")
        })?;
    let (Some(mk), Some(ck)) = (&config.aedb_manifest_key, &config.aedb_checkpoint_key) else {
        anyhow::bail!(
            "AEDB_MANIFEST_KEY and AEDB_CHECKPOINT_KEY are required (they open the backups)"
        );
    };
    let master = config.encryption_key.as_ref().ok_or_else(|| {
        anyhow!(
            "ARAGORA_ENCRYPTION_KEY is required (the master key that unwraps the backup's key ring)"
        )
    })?;
    let opts = aragora::drill::DrillOptions {
        backup_dir,
        sample,
        manifest_key: mk.bytes(),
        checkpoint_key: ck.bytes(),
        master: zeroize::Zeroizing::new(master.bytes()),
        previous: config
            .encryption_key_previous
            .as_ref()
            .map(|k| zeroize::Zeroizing::new(k.bytes())),
        environment: config.environment,
        temp_parent: std::env::temp_dir(),
    };
    let report = aragora::drill::run(&opts, &mut |line| eprintln!("drill: {line}"))
        .context("creating the drill's temporary directory")?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", aragora::drill::render_text(&report));
    }
    if !report.ok {
        eprintln!(
            "aragora: drill failed: {}",
            report
                .failures
                .first()
                .map_or("see the report", String::as_str)
        );
    }
    Ok(ExitCode::from(u8::from(!report.ok)))
}
