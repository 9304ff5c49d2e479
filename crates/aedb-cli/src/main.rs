//! `aedb`: the operator CLI. Inspection commands take the directory lock without
//! writing to the directory, read encrypted data with keys from the environment
//! (`AEDB_MANIFEST_KEY`, `AEDB_CHECKPOINT_KEY`, optional
//! `AEDB_PREVIOUS_MANIFEST_KEY` and `AEDB_PREVIOUS_CHECKPOINT_KEY` during a key
//! rotation; 64 hex characters) or `--key-file`, never argv.
//!
//! Exit codes: 0 everything checked holds; 1 a check failed; 2 could not run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aedb::{AedbConfig, AedbError, AedbInstance, InspectReport, RestoreError};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "aedb",
    version,
    about = "aedb operator CLI: checks, backups, restores, drills, audit export, incident capture"
)]
struct Cli {
    /// Print one JSON object instead of the human report.
    #[arg(long, global = true)]
    json: bool,
    /// File with `AEDB_MANIFEST_KEY=<hex>` / `AEDB_CHECKPOINT_KEY=<hex>` lines, and
    /// `AEDB_PREVIOUS_MANIFEST_KEY` / `AEDB_PREVIOUS_CHECKPOINT_KEY` for data or
    /// backups from before a key rotation (instead of the environment). Keys are
    /// never accepted on the command line.
    #[arg(long, global = true, value_name = "FILE")]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Structural checks.
    Check {
        #[command(subcommand)]
        what: CheckCmd,
    },
    /// Take a backup of a database that no other process has open.
    Backup {
        #[command(subcommand)]
        kind: BackupCmd,
    },
    /// Restore a backup chain into a new (absent or empty) directory, strictly.
    Restore {
        /// A backup, a directory of backups (the newest chain is used), or repeat
        /// the flag to give an explicit chain, full backup first.
        #[arg(long = "from", required = true, value_name = "CHAIN")]
        from: Vec<PathBuf>,
        #[arg(long = "to", value_name = "DIR")]
        to: PathBuf,
    },
    /// Verify a backup chain offline (signatures, hashes, links, LSNs, WAL chain).
    Verify {
        #[arg(long = "backup", required = true, value_name = "CHAIN")]
        backup: Vec<PathBuf>,
    },
    /// The weekly drill: restore into a temp dir, verify, invariants, parity, report.
    Drill {
        #[arg(long = "backup", required = true, value_name = "CHAIN")]
        backup: Vec<PathBuf>,
    },
    /// Audit table export and verification.
    Audit {
        #[command(subcommand)]
        what: AuditCmd,
    },
    /// Incident capture: copy WAL segments, manifest, checkpoint and table files with SHA-256 sums.
    Capture {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Copy even while another process holds the directory (the copy of the
        /// active segment may then end mid-write).
        #[arg(long)]
        live: bool,
    },
    /// Operational figures of a database that no other process has open.
    Metrics {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CheckCmd {
    /// Chain continuity, manifest signature, checkpoint, table/keyspace consistency, audit chains.
    Invariants {
        #[arg(long)]
        data_dir: PathBuf,
        /// A chain head recorded earlier off the machine (`LSN:HASH`, printed by this
        /// command and by `AedbInstance::chain_head`): fail (exit 1) if the directory's
        /// log does not reach it, e.g. a stale but validly signed copy.
        #[arg(long, value_name = "LSN:HASH")]
        expect_head: Option<String>,
    },
    /// The directory's state equals what a backup recorded (counts and digests).
    Parity {
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup (or chain root) to compare with; its last backup is used.
        #[arg(long, alias = "against", value_name = "BACKUP")]
        backup: PathBuf,
    },
}

#[derive(Subcommand)]
enum BackupCmd {
    Full {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    Incremental {
        #[arg(long)]
        data_dir: PathBuf,
        /// The latest backup of the chain.
        #[arg(long)]
        parent: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Export both audit tables with their chain heads to FILE (JSON).
    Export {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// First row id to export.
        #[arg(long, default_value_t = 1)]
        since: i64,
    },
    /// Verify an export: row links, row hashes and chain heads.
    Verify { file: PathBuf },
}

/// Outcome of a command: passed checks, or failed ones (exit 1).
struct Outcome {
    ok: bool,
    human: String,
    json: serde_json::Value,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AEDB_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let json = cli.json;
    match run(cli) {
        Ok(o) => {
            if json {
                println!("{}", o.json);
            } else {
                print!("{}", o.human);
            }
            if o.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            if json {
                println!("{}", json!({"ok": false, "error": format!("{e:#}")}));
            }
            eprintln!("aedb: could not run: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn parse_key(name: &str, hex_value: &str) -> Result<[u8; 32]> {
    let v = hex_value.trim();
    if v.len() != 64 {
        bail!(
            "{name} must be 64 hex characters (32 bytes), got {} characters",
            v.len()
        );
    }
    // Key material is wiped from every intermediate buffer when dropped.
    let bytes = Zeroizing::new(hex::decode(v).map_err(|_| anyhow!("{name} is not valid hex"))?);
    let mut k = [0u8; 32];
    k.copy_from_slice(&bytes);
    Ok(k)
}

/// Keys from `--key-file` or the environment; the config mirrors what the
/// database was created with (strict recovery always).
fn config(cli_key_file: Option<&Path>) -> Result<AedbConfig> {
    let mut vars: std::collections::HashMap<String, Zeroizing<String>> =
        std::collections::HashMap::new();
    if let Some(f) = cli_key_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading key file {}", f.display()))?,
        );
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| anyhow!("{} line {}: expected NAME=hex", f.display(), n + 1))?;
            vars.insert(k.trim().to_string(), Zeroizing::new(v.trim().to_string()));
        }
    } else {
        for name in [
            "AEDB_MANIFEST_KEY",
            "AEDB_CHECKPOINT_KEY",
            "AEDB_PREVIOUS_CHECKPOINT_KEY",
            "AEDB_PREVIOUS_MANIFEST_KEY",
        ] {
            if let Ok(v) = std::env::var(name) {
                vars.insert(name.to_string(), Zeroizing::new(v));
            }
        }
    }
    let mut cfg = AedbConfig::development();
    if let Some(v) = vars.get("AEDB_MANIFEST_KEY") {
        cfg = cfg.with_hmac_key(parse_key("AEDB_MANIFEST_KEY", v)?);
    }
    if let Some(v) = vars.get("AEDB_CHECKPOINT_KEY") {
        cfg = cfg.with_checkpoint_key(parse_key("AEDB_CHECKPOINT_KEY", v)?);
    }
    if let Some(v) = vars.get("AEDB_PREVIOUS_CHECKPOINT_KEY") {
        cfg = cfg.with_previous_checkpoint_key(parse_key("AEDB_PREVIOUS_CHECKPOINT_KEY", v)?);
    }
    if let Some(v) = vars.get("AEDB_PREVIOUS_MANIFEST_KEY") {
        if !vars.contains_key("AEDB_MANIFEST_KEY") {
            bail!("AEDB_PREVIOUS_MANIFEST_KEY is set but AEDB_MANIFEST_KEY is not");
        }
        cfg = cfg.with_previous_manifest_key(parse_key("AEDB_PREVIOUS_MANIFEST_KEY", v)?);
    }
    // The CLI never writes automatic checkpoints into a directory it opened.
    Ok(cfg.with_checkpoint_policy(None, None))
}

/// Errors that mean "the data is bad" become failed checks; the rest could not run.
fn is_check_failure(e: &RestoreError) -> bool {
    matches!(
        e,
        RestoreError::Corruption { .. } | RestoreError::RolledBack { .. }
    )
}

fn fail(name: &str, e: &RestoreError) -> Outcome {
    Outcome {
        ok: false,
        human: format!("FAIL  {name}: {e}\n"),
        json: json!({"ok": false, "check": name, "error": e.to_string()}),
    }
}

fn report_human(title: &str, r: &InspectReport) -> String {
    let mut s = format!("{title} {}\n", r.data_dir.display());
    for c in &r.checks {
        s += &format!(
            "{}  {}: {}\n",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    s += &format!(
        "head LSN {}, checkpoint LSN {}, {} keyspaces/tables\n",
        r.last_lsn,
        r.checkpoint_lsn.map_or("none".into(), |l| l.to_string()),
        r.keyspaces.len()
    );
    if !r.chain_head.is_empty() {
        s += &format!(
            "chain head {}:{} (keep it off the machine; later: --expect-head)\n",
            r.last_lsn, r.chain_head
        );
    }
    s += if r.ok() {
        "result: all invariants hold\n"
    } else {
        "result: CHECK FAILED\n"
    };
    s
}

fn chain_from(paths: &[PathBuf], cfg: &AedbConfig) -> Result<Vec<PathBuf>> {
    if paths.len() == 1 {
        Ok(aedb::discover_chain(&paths[0], cfg)?)
    } else {
        Ok(paths.to_vec())
    }
}

fn parity(data_dir: &Path, backup: &Path, cfg: &AedbConfig) -> Result<Outcome> {
    let report = aedb::inspect(data_dir, cfg)?;
    let chain = aedb::discover_chain(backup, cfg)?;
    let last = chain
        .last()
        .ok_or_else(|| anyhow!("no backup found in {}", backup.display()))?;
    let verified = match aedb::backup::verify_backup_dir(cfg, last) {
        Ok(v) => v,
        Err(e) if is_check_failure(&e) => return Ok(fail("backup descriptor", &e)),
        Err(e) => return Err(e.into()),
    };
    let recorded = &verified.descriptor.keyspaces;
    let mut diffs = Vec::new();
    for k in recorded {
        match report
            .keyspaces
            .iter()
            .find(|x| x.project == k.project && x.scope == k.scope && x.table == k.table)
        {
            None => diffs.push(format!(
                "{}/{}/{}: missing",
                k.project,
                k.scope,
                k.table.as_deref().unwrap_or("(kv)")
            )),
            Some(x) if x.count != k.count || x.digest != k.digest => diffs.push(format!(
                "{}/{}/{}: {} entries (backup {}), digest {}",
                k.project,
                k.scope,
                k.table.as_deref().unwrap_or("(kv)"),
                x.count,
                k.count,
                if x.digest == k.digest {
                    "equal"
                } else {
                    "differs"
                }
            )),
            Some(_) => {}
        }
    }
    for x in &report.keyspaces {
        if !recorded
            .iter()
            .any(|k| k.project == x.project && k.scope == x.scope && k.table == x.table)
        {
            diffs.push(format!(
                "{}/{}/{}: not in the backup",
                x.project,
                x.scope,
                x.table.as_deref().unwrap_or("(kv)")
            ));
        }
    }
    let ok = report.ok() && diffs.is_empty() && report.last_lsn == verified.descriptor.end_lsn;
    let mut human = format!(
        "parity {} against {} (end LSN {})\n",
        data_dir.display(),
        last.display(),
        verified.descriptor.end_lsn
    );
    human += &format!(
        "{} keyspaces/tables compared, {} differences\n",
        recorded.len(),
        diffs.len()
    );
    for d in &diffs {
        human += &format!("FAIL  {d}\n");
    }
    if report.last_lsn != verified.descriptor.end_lsn {
        human += &format!(
            "FAIL  head LSN {} != backup end LSN {}\n",
            report.last_lsn, verified.descriptor.end_lsn
        );
    }
    human += if ok {
        "result: parity holds\n"
    } else {
        "result: CHECK FAILED\n"
    };
    Ok(Outcome {
        ok,
        human,
        json: json!({"ok": ok, "data_dir": data_dir, "backup": last, "end_lsn": verified.descriptor.end_lsn,
                     "head_lsn": report.last_lsn, "differences": diffs, "compared": recorded.len()}),
    })
}

fn run(cli: Cli) -> Result<Outcome> {
    let cfg = config(cli.key_file.as_deref())?;
    match cli.command {
        Command::Check {
            what:
                CheckCmd::Invariants {
                    data_dir,
                    expect_head,
                },
        } => {
            let cfg = match expect_head {
                Some(h) => cfg.with_expected_head(h.parse::<aedb::ChainHead>()?),
                None => cfg,
            };
            let r = aedb::inspect(&data_dir, &cfg)?;
            Ok(Outcome {
                ok: r.ok(),
                human: report_human("invariants", &r),
                json: json!({"ok": r.ok(), "report": r}),
            })
        }
        Command::Check {
            what: CheckCmd::Parity { data_dir, backup },
        } => parity(&data_dir, &backup, &cfg),
        Command::Backup { kind } => {
            let (data_dir, out, parent) = match &kind {
                BackupCmd::Full { data_dir, out } => (data_dir, out, None),
                BackupCmd::Incremental {
                    data_dir,
                    parent,
                    out,
                } => (data_dir, out, Some(parent)),
            };
            if !data_dir.join("MANIFEST").exists() {
                bail!(
                    "{} is not an aedb data directory (no MANIFEST)",
                    data_dir.display()
                );
            }
            let db = AedbInstance::open(cfg, data_dir)?;
            let mut last_pct = 0;
            let mut progress = |p: aedb::BackupProgress| {
                let mb = p.bytes_done >> 20;
                if mb >= last_pct + 64 {
                    last_pct = mb;
                    eprintln!("aedb: backup {}: {mb} MiB written", p.phase);
                }
            };
            let r = match parent {
                None => db.backup_full_with_progress(out, &mut progress)?,
                Some(p) => db.backup_incremental_with_progress(out, p, &mut progress)?,
            };
            db.close()?;
            Ok(Outcome {
                ok: true,
                human: format!(
                    "{} backup {} written to {}: LSN {}..={}, {} members, {} bytes, {} ms\n",
                    r.kind,
                    r.backup_id,
                    r.dir.display(),
                    r.start_lsn,
                    r.end_lsn,
                    r.members,
                    r.bytes,
                    r.duration_ms
                ),
                json: json!({"ok": true, "backup": r}),
            })
        }
        Command::Restore { from, to } => {
            let chain = chain_from(&from, &cfg)?;
            match aedb::restore_from_backup_chain(&cfg, &chain, &to) {
                Ok(r) => Ok(Outcome {
                    ok: true,
                    human: format!(
                        "restored {} backups into {} (end LSN {}), verified strictly, {} ms\n",
                        r.backups,
                        r.target.display(),
                        r.end_lsn,
                        r.duration_ms
                    ),
                    json: json!({"ok": true, "restore": r, "chain": chain}),
                }),
                Err(e) if is_check_failure(&e) => Ok(fail("restore", &e)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Verify { backup } => {
            let chain = chain_from(&backup, &cfg)?;
            match aedb::verify_backup_chain(&cfg, &chain) {
                Ok(r) => Ok(Outcome {
                    ok: true,
                    human: format!(
                        "chain of {} backups verified: end LSN {}, {} WAL frames checked, head {}\n",
                        r.backups.len(),
                        r.end_lsn,
                        r.frames_verified,
                        r.end_chain_head
                    ),
                    json: json!({"ok": true, "chain": chain, "end_lsn": r.end_lsn, "frames_verified": r.frames_verified}),
                }),
                Err(e) if is_check_failure(&e) => Ok(fail("verify", &e)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Drill { backup } => drill(&backup, &cfg),
        Command::Audit {
            what:
                AuditCmd::Export {
                    data_dir,
                    out,
                    since,
                },
        } => {
            let exports = match aedb::check::export_audit_from_dir(&data_dir, &cfg, since) {
                Err(AedbError::Locked { dir, pid }) => {
                    return Err(anyhow::anyhow!(
                        "{} is open in process {pid}, which owns its audit tables while it runs: \
                         export through that process instead (for aragora: `aragora audit export \
                         --out DIR`, signed and chain-linked), or stop it and rerun this command",
                        dir.display()
                    ));
                }
                other => other?,
            };
            let doc = json!({"exports": exports});
            std::fs::write(&out, serde_json::to_vec_pretty(&doc)?)
                .with_context(|| format!("writing {}", out.display()))?;
            let rows: usize = exports.iter().map(|e| e.rows.len()).sum();
            Ok(Outcome {
                ok: true,
                human: format!(
                    "exported {rows} audit rows to {} ({})\n",
                    out.display(),
                    exports
                        .iter()
                        .map(|e| format!(
                            "{}: {} rows, head {}",
                            e.table,
                            e.rows.len(),
                            e.chain_head
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                json: json!({"ok": true, "file": out, "rows": rows}),
            })
        }
        Command::Audit {
            what: AuditCmd::Verify { file },
        } => {
            #[derive(serde::Deserialize)]
            struct Doc {
                exports: Vec<aedb::AuditExport>,
            }
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let doc: Doc = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not an audit export", file.display()))?;
            let mut human = String::new();
            let mut ok = true;
            let mut results = Vec::new();
            for e in &doc.exports {
                let r = aedb::verify_audit_export(e);
                ok &= r.is_ok();
                human += &match &r {
                    Ok(()) => format!(
                        "ok    {}: {} rows, chain intact to head {}\n",
                        e.table,
                        e.rows.len(),
                        e.chain_head
                    ),
                    Err(err) => format!("FAIL  {}: {err}\n", e.table),
                };
                results.push(json!({"table": e.table, "ok": r.is_ok(), "error": r.err().map(|x| x.to_string())}));
            }
            Ok(Outcome {
                ok,
                human,
                json: json!({"ok": ok, "tables": results}),
            })
        }
        Command::Capture {
            data_dir,
            out,
            live,
        } => capture(&data_dir, &out, live),
        Command::Metrics { data_dir } => {
            let (m, report) = aedb::check::offline_metrics(&data_dir, &cfg)?;
            let human = format!(
                "metrics {}\nhead LSN {}\nWAL: {} segments, {} bytes on disk, {} frames after the checkpoint\ncheckpoint: LSN {}, age {}\ndata: {} projects, {} keys, {} rows\nauthz_audit: {:?}\nassertion_audit: {:?}\nchecks: {}\n",
                m.data_dir.display(),
                m.head_lsn,
                m.wal_segments,
                m.wal_bytes_on_disk,
                m.wal_frames_after_checkpoint,
                m.checkpoint_lsn.map_or("none".into(), |l| l.to_string()),
                m.checkpoint_age_secs
                    .map_or("n/a".into(), |a| format!("{a} s")),
                m.projects,
                m.keys,
                m.rows,
                m.authz_events,
                m.assertion_events,
                if report.ok() {
                    "all hold"
                } else {
                    "FAILED (run check invariants)"
                }
            );
            Ok(Outcome {
                ok: report.ok(),
                human,
                json: json!({"ok": report.ok(), "metrics": m}),
            })
        }
    }
}

fn drill(backup: &[PathBuf], cfg: &AedbConfig) -> Result<Outcome> {
    let chain = chain_from(backup, cfg)?;
    let tmp = std::env::temp_dir().join(format!(
        "aedb-drill-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let mut steps = Vec::new();
    let mut human = format!(
        "drill: chain of {} backups, restoring into {}\n",
        chain.len(),
        tmp.display()
    );
    let result = (|| -> Result<bool> {
        let v = match aedb::verify_backup_chain(cfg, &chain) {
            Ok(v) => v,
            Err(e) if is_check_failure(&e) => {
                steps.push(json!({"step": "verify", "ok": false, "error": e.to_string()}));
                human += &format!("FAIL  verify: {e}\n");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        steps.push(json!({"step": "verify", "ok": true, "end_lsn": v.end_lsn}));
        human += &format!(
            "ok    verify: signatures, member hashes, links, LSN continuity, {} WAL frames\n",
            v.frames_verified
        );
        match aedb::restore_from_backup_chain(cfg, &chain, &tmp) {
            Ok(r) => {
                steps.push(json!({"step": "restore", "ok": true, "end_lsn": r.end_lsn, "ms": r.duration_ms}));
                human += &format!(
                    "ok    restore: strict, end LSN {} in {} ms\n",
                    r.end_lsn, r.duration_ms
                );
            }
            Err(e) if is_check_failure(&e) => {
                steps.push(json!({"step": "restore", "ok": false, "error": e.to_string()}));
                human += &format!("FAIL  restore: {e}\n");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        let inv = aedb::inspect(&tmp, cfg)?;
        steps.push(json!({"step": "invariants", "ok": inv.ok(), "checks": inv.checks}));
        for c in &inv.checks {
            human += &format!(
                "{}  invariants/{}: {}\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        let last = chain.last().ok_or_else(|| anyhow!("empty chain"))?;
        let par = parity(&tmp, last, cfg)?;
        steps.push(json!({"step": "parity", "ok": par.ok, "detail": par.json}));
        human += &format!(
            "{}  parity with {}\n",
            if par.ok { "ok  " } else { "FAIL" },
            last.display()
        );
        Ok(inv.ok() && par.ok)
    })();
    let removed = std::fs::remove_dir_all(&tmp).is_ok() || !tmp.exists();
    let ok = result?;
    human += &format!(
        "temp dir {}\nresult: {}\n",
        if removed { "removed" } else { "NOT removed" },
        if ok { "drill passed" } else { "DRILL FAILED" }
    );
    Ok(Outcome {
        ok,
        human,
        json: json!({"ok": ok, "chain": chain, "steps": steps}),
    })
}

fn capture(data_dir: &Path, out: &Path, live: bool) -> Result<Outcome> {
    use sha2::{Digest, Sha256};
    // Take the lock (without writing) unless --live: a quiet directory copies consistently.
    let lock_note = match std::fs::OpenOptions::new()
        .read(true)
        .open(data_dir.join("LOCK"))
    {
        Ok(f) => match f.try_lock_shared() {
            Ok(()) => "directory lock taken (no writer running)".to_string(),
            Err(_) if live => {
                "directory is open by another process; copied live (--live)".to_string()
            }
            Err(_) => {
                let pid = std::fs::read_to_string(data_dir.join("LOCK")).unwrap_or_default();
                bail!(
                    "{} is locked by pid {} (freeze writes or stop it first, or pass --live)",
                    data_dir.display(),
                    pid.trim()
                );
            }
        },
        Err(_) => "no LOCK file".to_string(),
    };
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} exists and is not empty", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut sums = String::new();
    let mut files = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .with_context(|| format!("reading {}", data_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            p.is_file()
                && (n.ends_with(".seg")
                    || n.ends_with(".ckpt")
                    || n.ends_with(".tbl")
                    || n == "MANIFEST"
                    || n == "LOCK")
        })
        .collect();
    names.sort();
    for p in names {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let sha = hex::encode(Sha256::digest(&bytes));
        std::fs::write(out.join(&name), &bytes)
            .with_context(|| format!("writing {}", out.join(&name).display()))?;
        sums += &format!("{sha}  {name}\n");
        files.push(json!({"file": name, "sha256": sha, "bytes": bytes.len()}));
    }
    std::fs::write(out.join("SHA256SUMS"), &sums)?;
    let meta = json!({"source": data_dir, "captured_at": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0), "lock": lock_note, "files": files});
    std::fs::write(out.join("capture.json"), serde_json::to_vec_pretty(&meta)?)?;
    Ok(Outcome {
        ok: true,
        human: format!(
            "captured {} files from {} into {} ({lock_note}); hashes in SHA256SUMS (sha256sum -c compatible)\n",
            files.len(),
            data_dir.display(),
            out.display()
        ),
        json: json!({"ok": true, "capture": meta}),
    })
}
