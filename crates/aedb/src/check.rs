//! Invariant and parity checks, shared by tests, the `aedb` CLI and restore drills.
//!
//! `inspect` opens a data directory without changing a byte of it: it takes the
//! directory lock without rewriting it, verifies the manifest signature, reads and
//! authenticates the checkpoint, replays the WAL in strict mode (reporting, not
//! repairing, a torn tail), compares the segments with the manifest, and then checks
//! the state itself: table and keyspace counts, primary keys and schemas, and the
//! hash chains of the audit tables.

use std::ops::Bound;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::audit::{ASSERTION_AUDIT, AUDIT_SCOPE, AUTHZ_AUDIT, SYSTEM_PROJECT, verify_rows};
use crate::config::{AedbConfig, RecoveryMode};
use crate::error::{AedbError, NotFoundKind};
use crate::lock::DirLock;
use crate::model::state::DbState;
use crate::model::value::Value;
use crate::open::{check_segments_against_manifest, load_manifest_and_checkpoint, replay_start};
use crate::record::WalRecord;
use crate::tableset::{kv_space, row_space};
use crate::wal::keys::WalKeys;
use crate::wal::recovery::recover;

/// Count and content digest of one KV keyspace or table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KeyspaceDigest {
    pub project: String,
    pub scope: String,
    /// None for the scope's KV keyspace.
    pub table: Option<String>,
    pub count: u64,
    /// SHA-256 over (key, version, value) of every live entry in key order (hex).
    pub digest: String,
}

/// One named check and its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What `inspect` found.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub data_dir: PathBuf,
    pub last_lsn: u64,
    pub chain_head: String,
    pub checkpoint_lsn: Option<u64>,
    pub segments: usize,
    pub frames_replayed: u64,
    pub torn_tail: Option<String>,
    pub checks: Vec<CheckResult>,
    pub keyspaces: Vec<KeyspaceDigest>,
}

impl InspectReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// Per-keyspace and per-table digests of a state, in name order (reads the
/// tables beneath the memtable: may fail).
pub(crate) fn state_digests(state: &DbState) -> Result<Vec<KeyspaceDigest>, AedbError> {
    let mut out = Vec::new();
    for (pname, p) in &state.projects {
        for (sname, s) in &p.scopes {
            let mut h = Sha256::new();
            let mut n = 0u64;
            for r in kv_space(state, pname, sname)?.scan(Bound::Unbounded, Bound::Unbounded, false)
            {
                let (k, e) = r?;
                if let Some(v) = &e.value {
                    h.update((k.len() as u32).to_le_bytes());
                    h.update(k.as_slice());
                    h.update(e.version.to_le_bytes());
                    h.update((v.len() as u32).to_le_bytes());
                    h.update(v.as_slice());
                    n += 1;
                }
            }
            out.push(KeyspaceDigest {
                project: pname.clone(),
                scope: sname.clone(),
                table: None,
                count: n,
                digest: hex::encode(h.finalize()),
            });
            for tname in s.tables.keys() {
                let mut h = Sha256::new();
                let mut n = 0u64;
                let rows = row_space(state, pname, sname, tname)?;
                for r in rows.scan(Bound::Unbounded, Bound::Unbounded, false) {
                    let (k, e) = r?;
                    if let Some(r) = &e.value {
                        h.update((k.len() as u32).to_le_bytes());
                        h.update(k.as_slice());
                        h.update(e.version.to_le_bytes());
                        let enc = postcard::to_stdvec(&**r).unwrap_or_default();
                        h.update((enc.len() as u32).to_le_bytes());
                        h.update(&enc);
                        n += 1;
                    }
                }
                out.push(KeyspaceDigest {
                    project: pname.clone(),
                    scope: sname.clone(),
                    table: Some(tname.clone()),
                    count: n,
                    digest: hex::encode(h.finalize()),
                });
            }
        }
    }
    Ok(out)
}

/// Structural checks of a loaded state: counts, keys, schemas, audit chains.
pub(crate) fn state_checks(state: &DbState) -> Vec<CheckResult> {
    let mut problems = Vec::new();
    for (pname, p) in &state.projects {
        for (sname, s) in &p.scopes {
            let live = match kv_space(state, pname, sname).and_then(|k| {
                k.scan(Bound::Unbounded, Bound::Unbounded, false)
                    .try_fold(0usize, |n, r| r.map(|_| n + 1))
            }) {
                Ok(n) => n,
                Err(e) => {
                    problems.push(format!("{pname}/{sname}: unreadable: {e}"));
                    continue;
                }
            };
            if live != s.live_keys {
                problems.push(format!(
                    "{pname}/{sname}: keyspace count says {}, found {live}",
                    s.live_keys
                ));
            }
            for (tname, t) in &s.tables {
                let mut live = 0;
                let rows = match row_space(state, pname, sname, tname).and_then(|r| {
                    r.scan(Bound::Unbounded, Bound::Unbounded, false)
                        .collect::<Result<Vec<_>, _>>()
                }) {
                    Ok(rows) => rows,
                    Err(e) => {
                        problems.push(format!("{pname}/{sname}/{tname}: unreadable: {e}"));
                        continue;
                    }
                };
                for (k, e) in &rows {
                    let Some(row) = &e.value else { continue };
                    live += 1;
                    if t.schema.check_row(tname, row).is_err() {
                        problems.push(format!(
                            "{pname}/{sname}/{tname}: a row violates the schema"
                        ));
                    } else if t.schema.row_key(row).as_slice() != k.as_slice() {
                        problems.push(format!(
                            "{pname}/{sname}/{tname}: a row is stored under a key that is not its primary key"
                        ));
                    }
                }
                if live != t.live_rows {
                    problems.push(format!(
                        "{pname}/{sname}/{tname}: row count says {}, found {live}",
                        t.live_rows
                    ));
                }
            }
        }
    }
    let mut checks = vec![CheckResult {
        name: "table and keyspace consistency".into(),
        ok: problems.is_empty(),
        detail: if problems.is_empty() {
            "counts, primary keys and schemas agree".into()
        } else {
            problems.join("; ")
        },
    }];
    for table in [AUTHZ_AUDIT, ASSERTION_AUDIT] {
        let r = audit_rows(state, table)
            .and_then(|rows| verify_rows(table, &rows, None).map(|()| rows.len()));
        checks.push(CheckResult {
            name: format!("audit chain {table}"),
            ok: r.is_ok(),
            detail: match r {
                Ok(n) => format!("{n} rows, chain intact"),
                Err(e) => e.to_string(),
            },
        });
    }
    checks
}

/// The check that compares the log with `AedbConfig::expected_head`.
const EXPECTED_HEAD_CHECK: &str = "expected chain head";

/// Read-only verification of a data directory (see the module docs). Errors are
/// for "could not run" (lock held, missing keys, unreadable directory); damage is
/// reported as failed checks.
pub fn inspect(dir: &Path, config: &AedbConfig) -> Result<InspectReport, AedbError> {
    if !dir.is_dir() {
        return Err(AedbError::NotFound {
            kind: NotFoundKind::DataDirectory,
            name: dir.display().to_string(),
        });
    }
    let _lock = DirLock::acquire(&*config.storage, dir, false)?;
    let (state, report) = load_read_only(dir, config)?;
    let _ = state;
    Ok(report)
}

/// Loads a directory without modifying it; also returns the state for parity.
pub(crate) fn load_read_only(
    dir: &Path,
    config: &AedbConfig,
) -> Result<(Option<DbState>, InspectReport), AedbError> {
    let mut report = InspectReport {
        data_dir: dir.to_path_buf(),
        last_lsn: 0,
        chain_head: String::new(),
        checkpoint_lsn: None,
        segments: 0,
        frames_replayed: 0,
        torn_tail: None,
        checks: Vec::new(),
        keyspaces: Vec::new(),
    };
    let fail = |report: &mut InspectReport, name: &str, e: AedbError| -> Result<(), AedbError> {
        match e {
            AedbError::Corruption { .. }
            | AedbError::NotFound { .. }
            | AedbError::RolledBack { .. } => {
                report.checks.push(CheckResult {
                    name: name.into(),
                    ok: false,
                    detail: e.to_string(),
                });
                Ok(())
            }
            other => Err(other),
        }
    };
    let mut strict = config.clone();
    strict.recovery = RecoveryMode::Strict;
    let loaded = match load_manifest_and_checkpoint(dir, &strict, true) {
        Ok(l) => l,
        Err(e) => {
            fail(&mut report, "manifest and checkpoint", e)?;
            return Ok((None, report));
        }
    };
    report.checks.push(CheckResult {
        name: "manifest signature".into(),
        ok: loaded.manifest.is_some(),
        detail: match (&loaded.manifest, config.has_manifest_key()) {
            (Some(m), true) if loaded.manifest_under_previous_key => format!(
                "HMAC-SHA256 verified under the previous manifest key (generation {}; the next open re-signs it)",
                m.generation
            ),
            (Some(m), true) => format!("HMAC-SHA256 verified (generation {})", m.generation),
            (Some(m), false) => format!(
                "unsigned manifest, no key configured (generation {})",
                m.generation
            ),
            (None, _) => "no manifest (an empty or never-opened directory)".into(),
        },
    });
    if !loaded.tables.is_empty() {
        let entries: u64 = loaded.tables.iter().map(|t| t.entries).sum();
        report.checks.push(CheckResult {
            name: "table files".into(),
            ok: true,
            detail: format!(
                "{} listed tables ({entries} entries): SHA-256 as the manifest records, every block authenticated and in order",
                loaded.tables.len()
            ),
        });
    }
    let mut state = DbState::initial();
    let mut ckpt = None;
    if let Some((l, meta)) = loaded.checkpoint {
        report.checks.push(CheckResult {
            name: "checkpoint readable".into(),
            ok: true,
            detail: format!(
                "{} at LSN {} authenticated and decoded",
                meta.file, meta.lsn
            ),
        });
        report.checkpoint_lsn = Some(meta.lsn);
        state = l.state;
        ckpt = Some(meta);
    }
    let keys = WalKeys::new(
        config.manifest_key.as_ref(),
        config.checkpoint_key.as_ref(),
        config.previous_checkpoint_key.as_ref(),
    )
    .with_previous_chain(config.previous_manifest_key.as_ref());
    let start = match replay_start(dir, config, loaded.manifest.as_ref(), ckpt.as_ref(), true) {
        Ok(s) => s,
        Err(e) => {
            fail(&mut report, "manifest and checkpoint", e)?;
            return Ok((None, report));
        }
    };
    let recovered = recover(
        &*config.storage,
        dir,
        RecoveryMode::Strict,
        &keys,
        start,
        |lsn, payload| {
            let record = WalRecord::decode(payload).map_err(|e| e.to_string())?;
            state
                .apply(&record, lsn)
                .map_err(|e| format!("frame at LSN {lsn} does not apply: {e}"))
        },
    );
    let recovered = match recovered {
        Ok(r) => r,
        Err(e) => {
            let name = match e {
                AedbError::RolledBack { .. } => EXPECTED_HEAD_CHECK,
                _ => "WAL hash chain and checksums",
            };
            fail(&mut report, name, e)?;
            return Ok((None, report));
        }
    };
    report.segments = recovered.report.segments;
    report.frames_replayed = recovered.report.frames_replayed;
    report.last_lsn = recovered.report.last_lsn;
    report.chain_head = hex::encode(recovered.head.hash);
    if let Some(e) = config.expected_head {
        report.checks.push(CheckResult {
            name: EXPECTED_HEAD_CHECK.into(),
            ok: true,
            detail: format!("the log reaches {e} (head {})", recovered.head),
        });
    }
    report.torn_tail = recovered
        .report
        .torn_tail
        .as_ref()
        .map(|t| format!("{} at byte {}: {}", t.file.display(), t.offset, t.reason));
    report.checks.push(CheckResult {
        name: "WAL hash chain and checksums".into(),
        ok: true,
        detail: format!(
            "{} segments, {} frames replayed, head LSN {}{}",
            report.segments,
            report.frames_replayed,
            report.last_lsn,
            if report.torn_tail.is_some() {
                " (an unacknowledged torn final frame would be cut off at open)"
            } else {
                ""
            }
        ),
    });
    if let Some(m) = &loaded.manifest {
        let r = check_segments_against_manifest(dir, m, &recovered.segments);
        report.checks.push(CheckResult {
            name: "segments match the manifest".into(),
            ok: r.is_ok(),
            detail: match r {
                Ok(()) => format!("{} listed segments present and intact", m.segments.len()),
                Err(e) => e.to_string(),
            },
        });
    }
    report.checks.extend(state_checks(&state));
    report.keyspaces = state_digests(&state)?;
    Ok((Some(state), report))
}

/// Exports the audit tables of a data directory without opening it for writing.
pub fn export_audit_from_dir(
    dir: &Path,
    config: &AedbConfig,
    since_id: i64,
) -> Result<Vec<crate::audit::AuditExport>, AedbError> {
    let _lock = DirLock::acquire(&*config.storage, dir, false)?;
    let (state, report) = load_read_only(dir, config)?;
    let state = state.ok_or_else(|| {
        let failed: Vec<String> = report
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.detail.clone())
            .collect();
        AedbError::corruption(
            dir,
            0,
            format!("cannot load the database: {}", failed.join("; ")),
        )
    })?;
    crate::audit::export_tables(&state, since_id)
}

/// Operational figures readable from a data directory while nothing runs on it.
#[derive(Clone, Debug, Serialize)]
pub struct OfflineMetrics {
    pub data_dir: PathBuf,
    pub head_lsn: u64,
    pub wal_segments: usize,
    pub wal_bytes_on_disk: u64,
    pub checkpoint_lsn: Option<u64>,
    pub checkpoint_age_secs: Option<u64>,
    pub wal_frames_after_checkpoint: u64,
    pub projects: usize,
    pub keys: u64,
    pub rows: u64,
    /// authz_audit rows by action (grant, revoke, global_admin_use, ...).
    pub authz_events: std::collections::BTreeMap<String, u64>,
    /// assertion_audit rows by kind (assertion_failed, permission_denied).
    pub assertion_events: std::collections::BTreeMap<String, u64>,
}

pub fn offline_metrics(
    dir: &Path,
    config: &AedbConfig,
) -> Result<(OfflineMetrics, InspectReport), AedbError> {
    let _lock = DirLock::acquire(&*config.storage, dir, false)?;
    let (state, report) = load_read_only(dir, config)?;
    let mut wal_bytes = 0;
    let mut ckpt_age = None;
    for e in std::fs::read_dir(dir).map_err(|e| AedbError::io(dir, e))? {
        let e = e.map_err(|e| AedbError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let meta = e.metadata().map_err(|err| AedbError::io(e.path(), err))?;
        if name.ends_with(".seg") {
            wal_bytes += meta.len();
        } else if name.ends_with(".ckpt") {
            ckpt_age = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .map(|d| d.as_secs());
        }
    }
    let mut m = OfflineMetrics {
        data_dir: dir.to_path_buf(),
        head_lsn: report.last_lsn,
        wal_segments: report.segments,
        wal_bytes_on_disk: wal_bytes,
        checkpoint_lsn: report.checkpoint_lsn,
        checkpoint_age_secs: ckpt_age,
        wal_frames_after_checkpoint: report.frames_replayed,
        projects: 0,
        keys: 0,
        rows: 0,
        authz_events: Default::default(),
        assertion_events: Default::default(),
    };
    if let Some(state) = &state {
        m.projects = state.projects.len();
        for k in &report.keyspaces {
            if k.table.is_some() {
                m.rows += k.count;
            } else {
                m.keys += k.count;
            }
        }
        for (table, col, into) in [
            (AUTHZ_AUDIT, 4usize, &mut m.authz_events),
            (ASSERTION_AUDIT, 5, &mut m.assertion_events),
        ] {
            if let Ok(t) = row_space(state, SYSTEM_PROJECT, AUDIT_SCOPE, table) {
                for r in t.scan(Bound::Unbounded, Bound::Unbounded, false) {
                    let (_, e) = r?;
                    if let Some(Value::Text(kind)) = e.value.as_ref().and_then(|r| r.get(col)) {
                        *into.entry(kind.clone()).or_default() += 1;
                    }
                }
            }
        }
    }
    Ok((m, report))
}

/// The live rows of an audit table (none when the table is missing).
fn audit_rows(
    state: &DbState,
    table: &str,
) -> Result<Vec<Vec<Value>>, crate::audit::AuditVerifyError> {
    let Ok(rows) = row_space(state, SYSTEM_PROJECT, AUDIT_SCOPE, table) else {
        return Ok(Vec::new());
    };
    rows.scan(Bound::Unbounded, Bound::Unbounded, false)
        .filter_map(|r| r.map(|(_, e)| e.value.map(|r| r.to_vec())).transpose())
        .collect::<Result<_, _>>()
        .map_err(|e| crate::audit::AuditVerifyError::Unreadable {
            table: table.to_string(),
            reason: e.to_string(),
        })
}
