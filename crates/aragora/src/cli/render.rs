//! Text for each [`ControlResponse`]. Pure functions of typed views: a renamed
//! field is a compile error here, never a silent `null` on the terminal.

use std::fmt::Write as _;

use serde::Serialize;

use crate::audit::VerifyReport;
use crate::audit::export::{ExportReport, ExportVerifyReport};
use crate::auth::recovery::{RecoveredAdmin, RecoveryOutcome};
use crate::control::{BootstrapView, ControlResponse, MigrationOutcome, MigrationResult};
use crate::encryption::migration::{DryRunView, MigrationView, RunState};
use crate::encryption::{CleanupOutcome, MasterRotationOutcome, RestoreOutcome, RotationOutcome};
use crate::secrets::RotationMarks;

/// What the CLI prints and how it exits.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    pub stdout: String,
    pub stderr: String,
    /// 0 success, 1 refused or broken (a recovery refused, an audit chain broken).
    pub code: u8,
}

impl Rendered {
    fn out(stdout: String) -> Self {
        Rendered {
            stdout,
            ..Rendered::default()
        }
    }
}

/// Context the answer itself does not carry.
#[derive(Debug, Default, Clone, Copy)]
pub struct Context<'a> {
    /// `key-ring restore`: the backup file read.
    pub file: Option<&'a str>,
}

/// Renders `resp`: its JSON view with `json`, text otherwise.
pub fn render(resp: &ControlResponse, json: bool, ctx: Context<'_>) -> Rendered {
    if json {
        let mut r = Rendered::out(format!("{}\n", json_of(resp)));
        if let ControlResponse::AdminRecover(RecoveryOutcome::Refused(refusal)) = resp {
            r.stderr = format!("aragora: {}\n", refusal.message);
            r.code = 1;
        }
        if let ControlResponse::AuditVerify(v) = resp
            && !v.ok
        {
            r.code = 1;
        }
        if let ControlResponse::AuditVerifyExport(v) = resp
            && !v.ok
        {
            r.code = 1;
        }
        return r;
    }
    match resp {
        ControlResponse::Bootstrap(v) => Rendered::out(bootstrap(v)),
        ControlResponse::AdminRecover(RecoveryOutcome::Recovered(r)) => Rendered::out(recovered(r)),
        ControlResponse::AdminRecover(RecoveryOutcome::Refused(refusal)) => Rendered {
            stdout: String::new(),
            stderr: format!("aragora: {}\n", refusal.message),
            code: 1,
        },
        ControlResponse::AuditVerify(v) => Rendered {
            stdout: audit_verify(v),
            stderr: String::new(),
            code: u8::from(!v.ok),
        },
        ControlResponse::AuditExport(v) => Rendered::out(audit_export(v)),
        ControlResponse::AuditVerifyExport(v) => Rendered {
            stdout: audit_verify_export(v),
            stderr: String::new(),
            code: u8::from(!v.ok),
        },
        ControlResponse::KeyRotation(v) => Rendered::out(rotation(v)),
        ControlResponse::KeyCleanup(v) => Rendered::out(cleanup(v)),
        ControlResponse::KeyRingRestore(v) => Rendered::out(restore(v, ctx.file.unwrap_or("-"))),
        ControlResponse::Migration(v) => Rendered::out(migration(v)),
        ControlResponse::MigrationStatus(v) => Rendered::out(migration_run(v)),
        ControlResponse::SecretRotation(v) => Rendered::out(secret_rotation(v)),
        ControlResponse::Unseal(v) => Rendered::out(format!("{}\n", v.message)),
        ControlResponse::MasterKeyRotate(v) => Rendered::out(master_rotation(v)),
        ControlResponse::Backup(v) => Rendered::out(backup(v)),
        ControlResponse::Maintenance(v) => Rendered::out(format!(
            "maintenance mode: {} (was {})\n",
            v.mode.name(),
            v.previous.name()
        )),
        ControlResponse::Admission(v) => Rendered::out(admission(v)),
    }
}

/// The JSON the command prints with `--json`: the view itself, without the
/// socket's envelope.
pub fn json_of(resp: &ControlResponse) -> String {
    fn j<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
    match resp {
        ControlResponse::Bootstrap(v) => j(v),
        ControlResponse::AdminRecover(v) => j(v),
        ControlResponse::AuditVerify(v) => j(v),
        ControlResponse::AuditExport(v) => j(v),
        ControlResponse::AuditVerifyExport(v) => j(v),
        ControlResponse::KeyRotation(v) => j(v),
        ControlResponse::KeyCleanup(v) => j(v),
        ControlResponse::KeyRingRestore(v) => j(v),
        ControlResponse::Migration(v) => j(v),
        ControlResponse::MigrationStatus(v) => j(v),
        ControlResponse::SecretRotation(v) => j(v),
        ControlResponse::Unseal(v) => j(v),
        ControlResponse::MasterKeyRotate(v) => j(v),
        ControlResponse::Backup(v) => j(v),
        ControlResponse::Maintenance(v) => j(v),
        ControlResponse::Admission(v) => j(v),
    }
}

fn rate_name(per_sec: u32) -> String {
    if per_sec == 0 {
        "unlimited".into()
    } else {
        format!("{per_sec} commits/s")
    }
}

/// `aragora admission`: the rate in force, and what it replaced.
fn admission(v: &crate::admission::AdmissionView) -> String {
    match v.previous_max_commits_per_sec {
        Some(p) => format!(
            "admission rate: {} (was {})\n",
            rate_name(v.max_commits_per_sec),
            rate_name(p)
        ),
        None => format!("admission rate: {}\n", rate_name(v.max_commits_per_sec)),
    }
}

fn master_rotation(v: &MasterRotationOutcome) -> String {
    let mut out = format!("{}\n", v.message);
    let _ = writeln!(
        out,
        "key records: {} with key material; {} {}, {} already under the current master key, \
         {} destroyed",
        v.total,
        v.rewrapped,
        if v.dry_run { "to rewrap" } else { "rewrapped" },
        v.already_current,
        v.without_material
    );
    let _ = writeln!(out, "master key fingerprint: {}", v.master_fingerprint);
    if let Some(p) = &v.previous_fingerprint {
        let _ = writeln!(out, "previous master key fingerprint: {p}");
    }
    if let Some(b) = &v.backup {
        let _ = writeln!(out, "key-ring backup: {b}");
    }
    if let Some(a) = &v.approval_id {
        let _ = writeln!(out, "approval request executed: {a}");
    }
    out
}

fn bootstrap(v: &BootstrapView) -> String {
    format!(
        "admin created: {} ({})\nAPI key (shown once, store it now):\n{}\n\n\
         export ADMIN_TOKEN=<the key above>   # then: curl -H \"Authorization: Bearer $ADMIN_TOKEN\" ...\n",
        v.email, v.user_id, v.token
    )
}

fn recovered(r: &RecoveredAdmin) -> String {
    let mut s = format!(
        "admin {}: {} ({})\n",
        if r.created { "created" } else { "recovered" },
        r.email,
        r.user_id
    );
    let _ = writeln!(
        s,
        "revoked {} session(s) and {} API key(s); audited as admin_recovered ({})",
        r.revoked_session_ids.len(),
        r.revoked_key_ids.len(),
        r.audit_entry_id
    );
    if r.password_cleared {
        let _ = writeln!(
            s,
            "password cleared: set a new one with POST /api/admin/users/{}/password",
            r.user_id
        );
    }
    let _ = write!(s, "API key (shown once, store it now):\n{}\n", r.token);
    s
}

fn audit_export(v: &ExportReport) -> String {
    let mut s = if v.written.is_empty() {
        format!("{}: up to date, nothing new to export\n", v.dir)
    } else {
        format!("wrote {} segment(s) to {}\n", v.written.len(), v.dir)
    };
    for w in &v.written {
        let _ = writeln!(
            s,
            "  {} ({} {}..{}, {} entries)",
            w.file, w.source, w.first, w.last, w.entries
        );
    }
    for h in &v.heads {
        let _ = writeln!(s, "{} ends at {} (hash {})", h.source, h.last, h.end_hash);
    }
    let _ = writeln!(s, "signed with public key {}", v.public_key);
    s
}

fn audit_verify_export(v: &ExportVerifyReport) -> String {
    let mut s = format!(
        "{}: {} segment(s), {} entries: {}\n",
        v.dir,
        v.segments,
        v.entries,
        if v.ok { "OK" } else { "FAILED" }
    );
    for c in &v.chains {
        let live = match c.matches_live {
            Some(true) => "matches the live chain",
            Some(false) => "NOT in the live chain",
            None => "live chain not checked",
        };
        let _ = writeln!(
            s,
            "  {} ends at {} (hash {}): {live}",
            c.source, c.last, c.end_hash
        );
    }
    if let Some(a) = &v.anchor_in_export {
        let held = match a.matches_export {
            Some(true) => "held by this export",
            Some(false) => "NOT the entry this export holds",
            None => "not in this export",
        };
        let _ = writeln!(
            s,
            "  live chain starts after the retention anchor seq {} (hash {}): {held}",
            a.seq, a.hash
        );
    }
    for p in &v.problems {
        let _ = writeln!(s, "  problem: {p}");
    }
    s
}

fn audit_verify(v: &VerifyReport) -> String {
    // Said whichever the outcome: what was checked starts at the anchor.
    let from = v.anchor.as_ref().map_or(String::new(), |a| {
        format!(
            "checked from the retention anchor: seq {} (hash {}); the {} entries before it \
             were removed after export to {} (`aragora audit verify --export {}` checks the anchor)\n",
            a.seq, a.hash, a.removed, a.export_dir, a.export_dir
        )
    });
    if v.ok {
        return format!(
            "audit chain ok: {} entries, head seq {}\n{from}",
            v.entries_checked, v.head_seq
        );
    }
    let mut s = format!("audit chain BROKEN:\n{from}");
    for p in &v.problems {
        let _ = writeln!(s, "  - {p}");
    }
    s
}

fn rotation(v: &RotationOutcome) -> String {
    let mut s = format!("{}\n", v.message);
    if let Some(b) = &v.backup {
        let _ = writeln!(s, "key-ring backup: {b}");
    }
    let _ = writeln!(
        s,
        "primary key: {}; active keys: {}",
        v.primary_key_id, v.active_count
    );
    s
}

fn cleanup(v: &CleanupOutcome) -> String {
    let mut s = format!("retired {} key(s)\n", v.retired.len());
    for r in &v.retired {
        let _ = writeln!(s, "  {} {} -> {}", r.key_id, r.from.name(), r.to.name());
    }
    for k in &v.kept_in_use {
        let _ = writeln!(s, "  kept {} ({} record(s) use it)", k.key_id, k.records);
    }
    for k in &v.waiting_to_be_destroyed {
        let _ = writeln!(
            s,
            "  kept {} (expired; destroyed by a cleanup after {}, ARAGORA_KEY_DESTROY_GRACE)",
            k.key_id, k.destroy_after
        );
    }
    let _ = writeln!(s, "active keys: {}", v.active_count);
    s
}

fn restore(v: &RestoreOutcome, file: &str) -> String {
    let mut s = format!("restored {} key(s) from {file}\n", v.restored.len());
    for r in &v.restored {
        let _ = writeln!(s, "  {} ({})", r.key_id, r.status.name());
    }
    let _ = writeln!(
        s,
        "{} key(s) already present; active keys: {}",
        v.already_present.len(),
        v.active_count
    );
    s
}

fn migration(v: &MigrationOutcome) -> String {
    v.results()
        .into_iter()
        .map(|r| match r {
            MigrationResult::NothingToRetry(n) => {
                format!("{}: no failed records to retry; nothing ran\n", n.store)
            }
            MigrationResult::DryRun(d) => dry_run(d),
            MigrationResult::Run(m) => migration_run(m),
        })
        .collect()
}

fn dry_run(r: &DryRunView) -> String {
    let mut s = format!(
        "{} (dry run): {} record(s); {} would be rewrapped under {}, {} already current, \
         {} unreadable, {} skipped\n",
        r.store,
        r.total,
        r.would_change,
        r.primary_key_id,
        r.already_current,
        r.unreadable,
        r.skipped
    );
    for k in &r.by_key {
        let _ = writeln!(
            s,
            "  {} v{}: {} record(s){}",
            k.key_id,
            k.version,
            k.records,
            if k.primary { " (primary)" } else { "" }
        );
    }
    s
}

fn state_name(s: RunState) -> &'static str {
    match s {
        RunState::Idle => "idle",
        RunState::Running => "running",
        RunState::Interrupted => "interrupted",
        RunState::Completed => "completed",
        RunState::CompletedWithErrors => "completed_with_errors",
    }
}

fn migration_run(r: &MigrationView) -> String {
    let mut s = format!(
        "{}: {}; {} of {} rewrapped, {} already current, {} failed, {} skipped\n",
        r.store,
        state_name(r.state),
        r.migrated,
        r.total,
        r.already_current,
        r.failed,
        r.skipped
    );
    for f in r.failed_records.iter().take(20) {
        let _ = writeln!(s, "  failed {}: {}", f.record_id, f.error);
    }
    for id in r.skipped_records.iter().take(20) {
        let _ = writeln!(s, "  skipped {id}");
    }
    s
}

/// The progress line printed on a terminal while a migration runs (`None`
/// when no run is active).
pub fn progress_line(v: &MigrationView, elapsed_secs: f64) -> Option<String> {
    if v.state != RunState::Running {
        return None;
    }
    let total = v.total.max(1);
    let done = v.processed();
    let secs = elapsed_secs.max(0.001);
    Some(format!(
        "\r{}: {done}/{total} ({:.0}%) {:.0} records/s, {} failed   ",
        v.store,
        100.0 * done as f64 / total as f64,
        done as f64 / secs,
        v.failed
    ))
}

fn secret_rotation(v: &RotationMarks) -> String {
    let mut s = format!(
        "{} secret(s) read by {}{}\n",
        v.secrets.len(),
        v.user_id,
        if v.dry_run {
            " (dry run: nothing marked)"
        } else {
            ""
        }
    );
    for m in &v.secrets {
        let _ = writeln!(
            s,
            "  {} ({}): {}",
            m.id,
            m.secret_type.as_deref().unwrap_or("-"),
            m.action
        );
    }
    s
}

/// `aragora backup`: what was written, and how to restore it.
fn backup(v: &crate::backup::BackupOutcome) -> String {
    let mut out = format!(
        "{} backup written: {}\n  files: {}, bytes: {}, LSN {}..{}, {} ms\n  chain head: {}\n  chain: {}\n",
        v.kind.name(),
        v.dir,
        v.files,
        v.bytes,
        v.start_lsn,
        v.end_lsn,
        v.duration_ms,
        v.chain_head,
        v.chain.join(" -> "),
    );
    out.push_str(&format!(
        "  key-ring backups: {} in {}/keyring-backups ({} copied now)\n",
        v.keyring_files,
        v.root,
        v.keyring_files_copied.len()
    ));
    out.push_str(&format!(
        "  restore: aedb restore --from {} --to NEW_DATA_DIR/aedb (with AEDB_MANIFEST_KEY and AEDB_CHECKPOINT_KEY set)\n",
        v.root
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption::migration::{FailedRecord, KeyRecords};
    use crate::encryption::{KeptKey, KeyStatus, RetiredKey};

    fn run_view() -> MigrationView {
        MigrationView {
            state: RunState::CompletedWithErrors,
            store: "secrets".into(),
            target_key_id: Some("dk-v2-aa".into()),
            cursor: None,
            total: 5,
            migrated: 3,
            already_current: 1,
            failed: 1,
            skipped: 0,
            failed_records: vec![FailedRecord {
                record_id: "team/x".into(),
                store: "secrets".into(),
                error: "AAD mismatch".into(),
            }],
            skipped_records: vec![],
            started_at: None,
            finished_at: None,
            updated_at: None,
            resumed: 0,
        }
    }

    #[test]
    fn a_migration_run_names_every_count_and_each_failure() {
        let r = render(
            &ControlResponse::Migration(MigrationOutcome::One(MigrationResult::Run(run_view()))),
            false,
            Context::default(),
        );
        assert_eq!(
            r.stdout,
            "secrets: completed_with_errors; 3 of 5 rewrapped, 1 already current, 1 failed, 0 skipped\n  failed team/x: AAD mismatch\n"
        );
        assert_eq!(r.code, 0);
    }

    #[test]
    fn json_is_the_view_without_the_socket_envelope() {
        let all = ControlResponse::Migration(MigrationOutcome::All {
            store: "all".into(),
            results: vec![MigrationResult::DryRun(DryRunView {
                dry_run: true,
                store: "secrets".into(),
                primary_key_id: "dk-v2-aa".into(),
                total: 2,
                would_change: 1,
                already_current: 1,
                unreadable: 0,
                unreadable_records: vec![],
                skipped: 0,
                by_key: vec![KeyRecords {
                    key_id: "dk-v1-bb".into(),
                    version: 1,
                    records: 1,
                    primary: false,
                }],
            })],
        });
        let v: serde_json::Value =
            serde_json::from_str(&render(&all, true, Context::default()).stdout).expect("json");
        assert_eq!(v["store"], "all");
        assert_eq!(v["results"][0]["would_change"], 1);
        assert_eq!(v["results"][0]["by_key"][0]["key_id"], "dk-v1-bb");
        let text = render(&all, false, Context::default()).stdout;
        assert!(
            text.starts_with("secrets (dry run): 2 record(s); 1 would be rewrapped under dk-v2-aa"),
            "{text}"
        );
        assert!(text.contains("  dk-v1-bb v1: 1 record(s)\n"), "{text}");
    }

    #[test]
    fn cleanup_names_keys_and_statuses_plainly() {
        let v = CleanupOutcome {
            retired: vec![RetiredKey {
                key_id: "dk-v1-aa".into(),
                from: KeyStatus::DecryptOnly,
                to: KeyStatus::Expired,
            }],
            kept_in_use: vec![KeptKey {
                key_id: "dk-v2-bb".into(),
                status: KeyStatus::DecryptOnly,
                records: 4,
            }],
            waiting_to_be_destroyed: vec![crate::encryption::WaitingKey {
                key_id: "dk-v0-cc".into(),
                destroy_after: "2026-12-08T00:00:00.000000Z".into(),
            }],
            usage: Default::default(),
            active_count: 2,
        };
        assert_eq!(
            render(&ControlResponse::KeyCleanup(v), false, Context::default()).stdout,
            "retired 1 key(s)\n  dk-v1-aa decrypt_only -> expired\n  kept dk-v2-bb (4 record(s) use it)\n  kept dk-v0-cc (expired; destroyed by a cleanup after 2026-12-08T00:00:00.000000Z, ARAGORA_KEY_DESTROY_GRACE)\nactive keys: 2\n"
        );
    }

    #[test]
    fn a_broken_chain_exits_1_and_lists_problems() {
        let v = VerifyReport {
            ok: false,
            entries_checked: 3,
            head_seq: 3,
            head_hash: "00".into(),
            problems: vec!["entry 2: hash mismatch".into()],
            anchor: None,
        };
        let r = render(&ControlResponse::AuditVerify(v), false, Context::default());
        assert_eq!(r.code, 1);
        assert_eq!(
            r.stdout,
            "audit chain BROKEN:\n  - entry 2: hash mismatch\n"
        );
    }

    #[test]
    fn a_chain_checked_from_a_retention_anchor_says_so() {
        let v = VerifyReport {
            ok: true,
            entries_checked: 2,
            head_seq: 7,
            head_hash: "77".into(),
            problems: Vec::new(),
            anchor: Some(crate::audit::ChainAnchor {
                seq: 5,
                hash: "55".into(),
                id: "e5".into(),
                timestamp_us: 0,
                export_dir: "/exports".into(),
                removed: 5,
                updated_at: "2026-12-01T00:00:00Z".into(),
            }),
        };
        let r = render(&ControlResponse::AuditVerify(v), false, Context::default());
        assert_eq!(r.code, 0);
        assert!(
            r.stdout.starts_with("audit chain ok: 2 entries, head seq 7\nchecked from the retention anchor: seq 5 (hash 55)"),
            "{}",
            r.stdout
        );
    }

    #[test]
    fn the_progress_line_counts_every_processed_record() {
        let mut v = run_view();
        v.state = RunState::Running;
        let line = progress_line(&v, 1.0).expect("running");
        assert!(line.contains("secrets: 5/5 (100%)"), "{line}");
        v.state = RunState::Completed;
        assert_eq!(progress_line(&v, 1.0), None);
    }
}
