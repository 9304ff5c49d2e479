//! `aragora`: the security control plane (`serve`) and its operator commands.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow};
use aragora::app::{AppState, router};
use aragora::config::{Config, Environment, parse_key};
use aragora::control::{self, ControlRequest, Via};
use aragora::keys::load_or_generate_dev_keys;
use aragora::store::EmbeddedStore;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "aragora", version, about = "Aragora security control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (ARAGORA_BIND, default 127.0.0.1:8080) on the embedded store
    /// in ARAGORA_DATA_DIR (default ./data).
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
    /// Mark for rotation every secret a user read (from the audit log's
    /// secret_access entries, all time): `rotation_required` in its metadata.
    Rotation {
        /// The user id whose reads expose the secrets.
        #[arg(long)]
        secrets_accessed_by: String,
        /// Only report what would be marked.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeyRingCommand {
    /// Restore keys missing from the store from a backup file written before a
    /// rotation (data/keyring-backups/keyring-*.json). Keys must open under the
    /// current ARAGORA_ENCRYPTION_KEY.
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
    /// Verify the audit hash chain (exit 1 when it is broken).
    Verify {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckKey => check_key(),
        Command::Serve => serve(),
        Command::Admin {
            command: AdminCommand::Bootstrap { email, json },
        } => bootstrap(&email, json),
        Command::Admin {
            command:
                AdminCommand::Recover {
                    email,
                    reason,
                    force,
                    json,
                },
        } => recover(email, reason, force, json),
        Command::Audit {
            command: AuditCommand::Verify { json },
        } => audit_verify(json),
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
        Command::Rotation {
            secrets_accessed_by,
            dry_run,
            json,
        } => rotation(&secrets_accessed_by, dry_run, json),
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
    match parse_key(
        "ARAGORA_ENCRYPTION_KEY",
        std::env::var("ARAGORA_ENCRYPTION_KEY").ok().as_deref(),
    ) {
        Ok(_) => {
            println!("ARAGORA_ENCRYPTION_KEY: ok (64 hex characters, 32 bytes)");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("aragora: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// The validated configuration; in development, missing keys come from (or
/// are generated into) the owner-only key file in the data dir.
fn load_config() -> Result<Config> {
    let mut vars: BTreeMap<String, String> = std::env::vars().collect();
    let first = Config::from_vars(&vars);
    if let Ok(c) = &first
        && c.environment == Environment::Development
    {
        init_logging(&c.log_level, c.log_json);
        load_or_generate_dev_keys(&c.data_dir, &mut vars)?;
    }
    let config = Config::from_vars(&vars)?;
    if first.is_err() || config.environment == Environment::Production {
        init_logging(&config.log_level, config.log_json);
    }
    Ok(config)
}

fn open_state(config: Config) -> Result<(Arc<EmbeddedStore>, Arc<AppState>)> {
    let (Some(mk), Some(ck)) = (&config.aedb_manifest_key, &config.aedb_checkpoint_key) else {
        anyhow::bail!("AEDB_MANIFEST_KEY and AEDB_CHECKPOINT_KEY are required");
    };
    let jwt = config
        .jwt_secret
        .clone()
        .ok_or_else(|| anyhow!("JWT_SECRET is not set"))?;
    let store_dir = config.data_dir.join("aedb");
    let store = Arc::new(
        EmbeddedStore::open(&store_dir, mk.bytes(), ck.bytes())
            .with_context(|| format!("opening the store in {}", store_dir.display()))?,
    );
    let state = Arc::new(AppState::new(config, store.clone(), jwt.expose())?);
    Ok((store, state))
}

/// Flushes and closes the store once every other holder is gone.
/// How often the store's chain head is logged while serving.
const CHAIN_HEAD_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

/// Logs the store's chain head (LSN:hash) every `CHAIN_HEAD_LOG_INTERVAL`:
/// shipped off the machine with the logs, it is the anchor
/// `aedb check invariants --expect-head` compares a directory with, so a
/// stale but validly signed copy (a rollback) is caught.
async fn log_chain_head_periodically(store: Arc<EmbeddedStore>) {
    let mut every = tokio::time::interval(CHAIN_HEAD_LOG_INTERVAL);
    loop {
        every.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.engine().chain_head()).await {
            Ok(Ok(head)) => tracing::info!(chain_head = %head, "aedb chain head (anchor)"),
            Ok(Err(e)) => tracing::error!(error = %e, "aedb chain head could not be read"),
            Err(e) => tracing::error!(error = %e, "aedb chain head task failed"),
        }
    }
}

fn close(store: Arc<EmbeddedStore>, state: Arc<AppState>) -> Result<()> {
    // Counted refusals whose window has not closed yet.
    state.auth.flush_failure_audit();
    drop(state);
    match store.engine().chain_head() {
        Ok(head) => tracing::info!(chain_head = %head, "aedb chain head at shutdown (anchor)"),
        Err(e) => tracing::error!(error = %e, "aedb chain head at shutdown could not be read"),
    }
    match Arc::try_unwrap(store) {
        Ok(s) => s.close().context("closing the store"),
        Err(_) => {
            tracing::warn!("store still referenced at shutdown; relying on drop to flush");
            Ok(())
        }
    }
}

fn serve() -> Result<ExitCode> {
    let config = load_config()?;
    let bind = config.bind;
    let socket = control::socket_path(&config.data_dir);
    if config.maintenance_mode {
        tracing::warn!("MAINTENANCE_MODE=true: only health, metrics and /api/admin/* are served");
    }
    // A bad certificate stops boot before the store is touched.
    let tls = match &config.tls {
        Some(files) => Some((aragora::tls::server_config(files)?, files.clone())),
        None => None,
    };
    let (store, state) = open_state(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let app_state = state.clone();
    let anchor_store = store.clone();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding {bind} (ARAGORA_BIND)"))?;
        control::serve(app_state.clone(), socket.clone())
            .await
            .with_context(|| format!("binding the control socket {}", socket.display()))?;
        let addr = listener.local_addr()?;
        // The one line serve writes to stdout: the bound address, so whoever
        // asked for port 0 (the test kit, a supervisor) learns the real one.
        println!("aragora listening on {addr}");
        tokio::spawn(log_chain_head_periodically(anchor_store));
        let approvals_state = app_state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(aragora::approvals::service::EXPIRY_INTERVAL);
            loop {
                every.tick().await;
                let s = approvals_state.clone();
                let _ = tokio::task::spawn_blocking(move || s.approvals.tick()).await;
            }
        });
        let app = router(app_state.clone()).into_make_service_with_connect_info::<SocketAddr>();
        match tls {
            None => {
                tokio::spawn(async {
                    // Without it SIGHUP (sent to reload certificates) would
                    // terminate the process.
                    let Ok(mut hup) =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                    else {
                        return;
                    };
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: no TLS certificate to reload (plain HTTP)");
                    }
                });
                tracing::info!(%addr, control = %socket.display(), "aragora listening (http)");
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown_signal())
                    .await?;
            }
            Some((tls_config, files)) => {
                let live = axum_server::tls_rustls::RustlsConfig::from_config(tls_config);
                tokio::spawn(aragora::tls::reload_on_sighup(
                    live.clone(),
                    files,
                    app_state.metrics.clone(),
                ));
                let handle = axum_server::Handle::new();
                let stopping = handle.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    stopping.graceful_shutdown(Some(std::time::Duration::from_secs(20)));
                });
                tracing::info!(%addr, control = %socket.display(), "aragora listening (https)");
                axum_server::from_tcp_rustls(listener.into_std()?, live)?
                    .handle(handle)
                    .serve(app)
                    .await?;
            }
        }
        let _ = std::fs::remove_file(&socket);
        tracing::info!("shutting down: flushing the store");
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    close(store, state)?;
    Ok(ExitCode::SUCCESS)
}

/// Sends `req` to the running server, or runs it on the store directly.
fn run_control(req: ControlRequest) -> Result<serde_json::Value> {
    let config = load_config()?;
    match control::call(&config.data_dir, &req).map_err(|e| anyhow!(e))? {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(anyhow!(e)),
        None => {
            let (store, state) = open_state(config)?;
            let r = control::execute(&state, req, Via::Direct).map_err(|e| anyhow!(e.to_string()));
            close(store, state)?;
            r
        }
    }
}

fn bootstrap(email: &str, json: bool) -> Result<ExitCode> {
    let v = run_control(ControlRequest::Bootstrap {
        email: email.to_string(),
    })?;
    if json {
        println!("{v}");
    } else {
        println!(
            "admin created: {} ({})",
            v["email"].as_str().unwrap_or_default(),
            v["user_id"].as_str().unwrap_or_default()
        );
        println!("API key (shown once, store it now):");
        println!("{}", v["token"].as_str().unwrap_or_default());
        println!();
        println!(
            "export ADMIN_TOKEN=<the key above>   # then: curl -H \"Authorization: Bearer $ADMIN_TOKEN\" ..."
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn recover(email: String, reason: Option<String>, force: bool, json: bool) -> Result<ExitCode> {
    let v = run_control(ControlRequest::AdminRecover {
        email,
        reason,
        force,
    })?;
    if v["status"] == "refused" {
        if json {
            println!("{v}");
        }
        eprintln!("aragora: {}", v["message"].as_str().unwrap_or("refused"));
        return Ok(ExitCode::from(1));
    }
    if json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let user_id = v["user_id"].as_str().unwrap_or_default();
    println!(
        "admin {}: {} ({user_id})",
        if v["created"] == true {
            "created"
        } else {
            "recovered"
        },
        v["email"].as_str().unwrap_or_default(),
    );
    let count = |k: &str| v[k].as_array().map_or(0, Vec::len);
    println!(
        "revoked {} session(s) and {} API key(s); audited as admin_recovered ({})",
        count("revoked_session_ids"),
        count("revoked_key_ids"),
        v["audit_entry_id"].as_str().unwrap_or_default()
    );
    if v["password_cleared"] == true {
        println!("password cleared: set a new one with POST /api/admin/users/{user_id}/password");
    }
    println!("API key (shown once, store it now):");
    println!("{}", v["token"].as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

fn audit_verify(json: bool) -> Result<ExitCode> {
    let v = run_control(ControlRequest::AuditVerify)?;
    let ok = v["ok"] == true;
    if json {
        println!("{v}");
    } else if ok {
        println!(
            "audit chain ok: {} entries, head seq {}",
            v["entries_checked"], v["head_seq"]
        );
    } else {
        println!("audit chain BROKEN:");
        for p in v["problems"].as_array().into_iter().flatten() {
            println!("  - {}", p.as_str().unwrap_or_default());
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
    let v = run_control(ControlRequest::KeyRotation {
        reason,
        force,
        cleanup_expired,
    })?;
    if json {
        println!("{v}");
    } else if cleanup_expired {
        let retired = v["retired"].as_array().cloned().unwrap_or_default();
        println!("retired {} key(s)", retired.len());
        for r in &retired {
            println!("  {} {} -> {}", r["key_id"], r["from"], r["to"]);
        }
        for k in v["kept_in_use"].as_array().into_iter().flatten() {
            println!("  kept {} ({} record(s) use it)", k["key_id"], k["records"]);
        }
        println!("active keys: {}", v["active_count"]);
    } else {
        println!("{}", v["message"].as_str().unwrap_or_default());
        if let Some(b) = v["backup"].as_str() {
            println!("key-ring backup: {b}");
        }
        println!(
            "primary key: {}; active keys: {}",
            v["primary_key_id"].as_str().unwrap_or_default(),
            v["active_count"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn key_ring_restore(file: &std::path::Path, json: bool) -> Result<ExitCode> {
    let file =
        std::fs::canonicalize(file).with_context(|| format!("backup file {}", file.display()))?;
    let v = run_control(ControlRequest::KeyRingRestore {
        file: file.display().to_string(),
    })?;
    if json {
        println!("{v}");
    } else {
        let restored = v["restored"].as_array().cloned().unwrap_or_default();
        println!("restored {} key(s) from {}", restored.len(), file.display());
        for r in &restored {
            println!("  {} ({})", r["key_id"], r["status"]);
        }
        let present = v["already_present"].as_array().map_or(0, Vec::len);
        println!(
            "{present} key(s) already present; active keys: {}",
            v["active_count"]
        );
    }
    Ok(ExitCode::SUCCESS)
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
            || {
                control::call(&dir, &status_req)
                    .ok()
                    .flatten()
                    .and_then(|r| r.ok())
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
            || control::execute(&state, req, Via::Direct).map_err(|e| anyhow!(e.to_string())),
        );
        close(store, state)?;
        r?
    };
    if json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let results = match v["results"].as_array() {
        Some(r) => r.clone(),
        None => vec![v],
    };
    for r in &results {
        if r["dry_run"] == true {
            println!(
                "{} (dry run): {} record(s); {} would be rewrapped under {}, {} already current, \
                 {} unreadable, {} skipped",
                r["store"].as_str().unwrap_or_default(),
                r["total"],
                r["would_change"],
                r["primary_key_id"].as_str().unwrap_or_default(),
                r["already_current"],
                r["unreadable"],
                r["skipped"]
            );
            for k in r["by_key"].as_array().into_iter().flatten() {
                println!(
                    "  {} v{}: {} record(s){}",
                    k["key_id"].as_str().unwrap_or_default(),
                    k["version"],
                    k["records"],
                    if k["primary"] == true {
                        " (primary)"
                    } else {
                        ""
                    }
                );
            }
            continue;
        }
        println!(
            "{}: {}; {} of {} rewrapped, {} already current, {} failed, {} skipped",
            r["store"].as_str().unwrap_or_default(),
            r["state"].as_str().unwrap_or_default(),
            r["migrated"],
            r["total"],
            r["already_current"],
            r["failed"],
            r["skipped"]
        );
        for f in r["failed_records"]
            .as_array()
            .into_iter()
            .flatten()
            .take(20)
        {
            println!(
                "  failed {}: {}",
                f["record_id"].as_str().unwrap_or_default(),
                f["error"].as_str().unwrap_or_default()
            );
        }
        for id in r["skipped_records"]
            .as_array()
            .into_iter()
            .flatten()
            .take(20)
        {
            println!("  skipped {}", id.as_str().unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `work`, printing a progress line on stderr (a terminal) from
/// `status` meanwhile.
fn with_progress<T>(
    enabled: bool,
    status: impl Fn() -> Option<serde_json::Value> + Sync,
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
                if v["state"] != "running" {
                    continue;
                }
                let total = v["total"].as_u64().unwrap_or(0).max(1);
                let done_n = ["migrated", "already_current", "failed", "skipped"]
                    .iter()
                    .map(|k| v[*k].as_u64().unwrap_or(0))
                    .sum::<u64>();
                let secs = started.elapsed().as_secs_f64().max(0.001);
                eprint!(
                    "\r{}: {done_n}/{total} ({:.0}%) {:.0} records/s, {} failed   ",
                    v["store"].as_str().unwrap_or_default(),
                    100.0 * done_n as f64 / total as f64,
                    done_n as f64 / secs,
                    v["failed"]
                );
                printed = true;
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

fn rotation(user_id: &str, dry_run: bool, json: bool) -> Result<ExitCode> {
    let v = run_control(ControlRequest::SecretRotation {
        user_id: user_id.to_string(),
        dry_run,
    })?;
    if json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let secrets = v["secrets"].as_array().cloned().unwrap_or_default();
    println!(
        "{} secret(s) read by {user_id}{}",
        secrets.len(),
        if dry_run {
            " (dry run: nothing marked)"
        } else {
            ""
        }
    );
    for s in &secrets {
        println!(
            "  {} ({}): {}",
            s["id"].as_str().unwrap_or_default(),
            s["secret_type"].as_str().unwrap_or("-"),
            s["action"].as_str().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::new(level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
