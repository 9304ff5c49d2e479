//! `aragora drill`: the weekly restore drill of the runbook, offline. It
//! reads only the backup files (a running server is not touched, and none is
//! needed):
//!
//! 1. finds the newest chain under the backup directory (`crate::backup`'s
//!    layout: a root, or the schedule's `chain-NNNN/` roots) and the key-ring
//!    backup files the chain's newest backup was paired with;
//! 2. verifies the chain and restores it into a fresh owner-only temporary
//!    data dir with aedb's library (what `aedb verify` / `aedb restore` run),
//!    then aedb's strict offline checks (`aedb check invariants`) and the
//!    parity of every keyspace with the digests the backup recorded;
//! 3. opens the restored store, its key ring under the master key from the
//!    environment (the previous one too, as a server would), brings back from
//!    the paired key-ring backups any data key missing from it (what
//!    `aragora key-ring restore` does after a real restore);
//! 4. decrypts a random sample of the secrets, and always the newest one.
//!
//! The temporary directory is removed when the drill passes and kept (its
//! path printed) when it fails, for the investigation.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::audit::AuditLog;
use crate::backup::{self, PairedFile};
use crate::clock::{format_us, now_us};
use crate::config::Environment;
use crate::crypto::MasterKey;
use crate::encryption::{KeyRecord, KeyRing, KeyRingError};
use crate::metrics::Metrics;
use crate::secrets::SecretRecord;
use crate::store::{Collection, EmbeddedStore, Store, StoreError, for_each_json};

/// The actor of what the drill writes into its own restored copy (the
/// restored key ring's `key_ring_restored` entries); never the live store.
pub const DRILL_ACTOR: &str = "system:backup-drill";
/// Secrets decrypted when `--sample` is not given.
pub const DEFAULT_SAMPLE: usize = 20;

/// What the drill needs: where the backups are and the keys that open them.
pub struct DrillOptions {
    pub backup_dir: PathBuf,
    /// Secrets to decrypt at random (the newest one is always added).
    pub sample: usize,
    pub manifest_key: [u8; 32],
    pub checkpoint_key: [u8; 32],
    /// ARAGORA_ENCRYPTION_KEY and ARAGORA_ENCRYPTION_KEY_PREVIOUS.
    pub master: zeroize::Zeroizing<[u8; 32]>,
    pub previous: Option<zeroize::Zeroizing<[u8; 32]>>,
    pub environment: Environment,
    /// Where the temporary data dir is created.
    pub temp_parent: PathBuf,
}

// Keys: Debug never shows them.
impl std::fmt::Debug for DrillOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrillOptions")
            .field("backup_dir", &self.backup_dir)
            .field("sample", &self.sample)
            .field("temp_parent", &self.temp_parent)
            .finish_non_exhaustive()
    }
}

/// One check of the drill.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The chain the drill restored.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DrillChain {
    /// The backup root (what `aedb restore --from` takes).
    pub root: String,
    /// Its backups, full first (directory names in the root).
    pub backups: Vec<String>,
    /// Files (members) and bytes of the whole chain.
    pub files: usize,
    pub bytes: u64,
    pub end_lsn: u64,
    /// `LSN:HASH` the chain ends at.
    pub chain_head: String,
    /// When its newest backup was taken, and how long ago (seconds).
    pub created_at: String,
    pub age_secs: i64,
}

/// The key ring the drill opened.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DrillKeyRing {
    /// True when the newest backup recorded its key-ring backup files
    /// (`NNNN-kind.keyring.json`); else every file in `keyring-backups/` is used.
    pub pairing_recorded: bool,
    pub keyring_files: Vec<String>,
    /// Data keys in the restored store, and those brought back from the
    /// key-ring backup files.
    pub keys_in_store: usize,
    pub keys_restored_from_files: usize,
    /// Fingerprint of ARAGORA_ENCRYPTION_KEY (public).
    pub master_fingerprint: String,
}

/// A sampled secret that did not decrypt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretFailure {
    pub id: String,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DrillSecrets {
    /// False when an earlier step failed and no secret was read.
    pub checked: bool,
    /// Secrets in the restored store.
    pub total: usize,
    pub sampled: usize,
    pub decrypted: usize,
    pub failed: usize,
    /// The most recently written secret (always sampled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest: Option<String>,
    pub failures: Vec<SecretFailure>,
}

/// What `aragora drill` prints (text, or this as JSON with `--json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DrillReport {
    /// True only when every check passed and every sampled secret decrypted.
    pub ok: bool,
    pub backup_dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<DrillChain>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<DrillKeyRing>,
    pub checks: Vec<DrillCheck>,
    pub secrets: DrillSecrets,
    /// The temporary data dir the chain was restored into; kept (for the
    /// investigation) when the drill failed.
    pub temp_dir: String,
    pub temp_dir_kept: bool,
    pub elapsed_ms: u64,
    /// What failed, one line each (empty when `ok`).
    pub failures: Vec<String>,
}

impl DrillReport {
    fn check(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        let (name, detail) = (name.into(), detail.into());
        if !ok {
            self.failures.push(format!("{name}: {detail}"));
        }
        self.checks.push(DrillCheck { name, ok, detail });
    }

    fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }
}

/// Runs the drill; `progress` gets a line before each long step. Only a
/// temporary directory that cannot be created is an `Err`: everything about
/// the backups is in the report.
pub fn run(opts: &DrillOptions, progress: &mut dyn FnMut(&str)) -> std::io::Result<DrillReport> {
    let started = Instant::now();
    let tmp = opts
        .temp_parent
        .join(format!("aragora-drill-{}-{}", std::process::id(), now_us()));
    // Owner-only: the restored store is still encrypted, but its key ring and
    // audit log are nobody else's business.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&tmp)?;
    let mut report = DrillReport {
        backup_dir: opts.backup_dir.display().to_string(),
        temp_dir: tmp.display().to_string(),
        ..DrillReport::default()
    };
    drill(opts, &tmp, &mut report, progress);
    report.ok = report.failures.is_empty();
    if report.ok {
        if let Err(e) = std::fs::remove_dir_all(&tmp) {
            report.temp_dir_kept = true;
            tracing::warn!(dir = %tmp.display(), error = %e, "removing the drill's temporary dir failed");
        }
    } else {
        report.temp_dir_kept = true;
    }
    report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

fn drill(
    opts: &DrillOptions,
    tmp: &Path,
    report: &mut DrillReport,
    progress: &mut dyn FnMut(&str),
) {
    let cfg =
        aedb::AedbConfig::production(opts.manifest_key).with_checkpoint_key(opts.checkpoint_key);
    progress(&format!(
        "finding the newest backup chain in {}",
        opts.backup_dir.display()
    ));
    let found = match backup::newest_chain(&opts.backup_dir) {
        Ok(Some(f)) => f,
        Ok(None) => {
            return report.fail(format!(
                "no backup chain in {}: take one with `aragora backup full --out DIR` or set \
                 ARAGORA_BACKUP_DIR",
                opts.backup_dir.display()
            ));
        }
        Err(e) => return report.fail(format!("finding the newest chain: {e}")),
    };
    let dirs: Vec<PathBuf> = found.chain.iter().map(|n| found.root.join(n)).collect();
    let Some(newest) = found.chain.last().cloned() else {
        return report.fail("the newest chain is empty");
    };
    let paired = paired_keyring_files(&found.root, &newest, report);

    progress(&format!(
        "verifying {} backup(s) of {}: signatures, member hashes, links, WAL chain",
        dirs.len(),
        found.root.display()
    ));
    let verified = match aedb::verify_backup_chain(&cfg, &dirs) {
        Ok(v) => v,
        Err(e) => {
            report.chain = Some(DrillChain {
                root: found.root.display().to_string(),
                backups: found.chain.clone(),
                ..DrillChain::default()
            });
            return report.check("verify", false, e.to_string());
        }
    };
    let last = verified.backups.last().map(|b| b.descriptor.clone());
    let created_at = last.as_ref().map_or(0, |d| d.created_at);
    report.chain = Some(DrillChain {
        root: found.root.display().to_string(),
        backups: found.chain.clone(),
        files: verified
            .backups
            .iter()
            .map(|b| b.descriptor.members.len())
            .sum(),
        bytes: verified
            .backups
            .iter()
            .flat_map(|b| b.descriptor.members.iter().map(|m| m.bytes))
            .sum(),
        end_lsn: verified.end_lsn,
        chain_head: format!("{}:{}", verified.end_lsn, verified.end_chain_head),
        created_at: format_us(created_at.saturating_mul(1_000_000)),
        age_secs: now_us() / 1_000_000 - created_at,
    });
    report.check(
        "verify",
        true,
        format!(
            "{} backup(s), {} WAL frames, end LSN {}",
            verified.backups.len(),
            verified.frames_verified,
            verified.end_lsn
        ),
    );

    let store_dir = tmp.join("aedb");
    progress(&format!("restoring into {}", store_dir.display()));
    match aedb::restore_from_backup_chain(&cfg, &dirs, &store_dir) {
        Ok(r) => report.check(
            "restore",
            true,
            format!("strict, end LSN {}, {} keyspace(s)", r.end_lsn, r.keyspaces),
        ),
        Err(e) => return report.check("restore", false, e.to_string()),
    }

    progress("checking the restored store (aedb check invariants, parity)");
    match aedb::inspect(&store_dir, &cfg) {
        Ok(inv) => {
            for c in &inv.checks {
                report.check(format!("invariants/{}", c.name), c.ok, c.detail.clone());
            }
            if let Some(d) = &last {
                let diffs = parity(&d.keyspaces, &inv.keyspaces);
                let detail = if diffs.is_empty() {
                    format!(
                        "{} keyspace(s) match the backup's digests",
                        d.keyspaces.len()
                    )
                } else {
                    diffs.join("; ")
                };
                report.check("parity", diffs.is_empty(), detail);
            }
        }
        Err(e) => return report.check("invariants", false, e.to_string()),
    }

    // Laid out like the runbook's restore: DATA/aedb and DATA/keyring-backups.
    let keyring_copy = tmp.join(crate::encryption::BACKUP_DIR);
    let files = match copy_paired(&found.root, &paired, &keyring_copy) {
        Ok(f) => f,
        Err(e) => return report.fail(e),
    };
    progress("opening the restored store and its key ring");
    let store = match EmbeddedStore::open(&store_dir, opts.manifest_key, opts.checkpoint_key) {
        Ok(s) => Arc::new(s),
        Err(e) => return report.fail(format!("opening the restored store: {e}")),
    };
    keys_and_secrets(opts, tmp, store.clone(), &files, report, progress);
    match Arc::try_unwrap(store) {
        Ok(s) => {
            if let Err(e) = s.close() {
                report.fail(format!("closing the restored store: {e}"));
            }
        }
        Err(_) => tracing::warn!("the restored store is still referenced; dropped unclosed"),
    }
}

/// The key-ring backup files paired with backup `newest` (or, for a backup
/// from before pairings were recorded, every file the root holds). A paired
/// file missing or altered fails the drill.
fn paired_keyring_files(root: &Path, newest: &str, report: &mut DrillReport) -> Vec<PairedFile> {
    let (recorded, files) = match backup::read_pairing(root, newest) {
        Ok(Some(p)) => (true, p.keyring_files),
        Ok(None) => match backup::unpaired_keyring_files(root) {
            Ok(f) => (false, f),
            Err(e) => {
                report.fail(format!("listing the key-ring backups: {e}"));
                (false, Vec::new())
            }
        },
        Err(e) => {
            report.fail(format!("the key-ring pairing of {newest}: {e}"));
            (true, Vec::new())
        }
    };
    let dir = backup::keyring_dir(root);
    let mut usable = Vec::new();
    for f in files {
        let path = dir.join(&f.file);
        match std::fs::read(&path) {
            Ok(bytes) if backup::sha256_hex(&bytes) == f.sha256 => usable.push(f),
            Ok(_) => report.fail(format!(
                "key-ring backup {} does not match the SHA-256 recorded when {newest} was taken \
                 (altered or replaced)",
                path.display()
            )),
            Err(e) => report.fail(format!(
                "key-ring backup {} paired with {newest}: {e}",
                path.display()
            )),
        }
    }
    report.keyring = Some(DrillKeyRing {
        pairing_recorded: recorded,
        keyring_files: usable.iter().map(|f| f.file.clone()).collect(),
        ..DrillKeyRing::default()
    });
    usable
}

/// Copies the paired files into the restored data dir's `keyring-backups/`.
fn copy_paired(root: &Path, files: &[PairedFile], to: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(to)
        .map_err(|e| format!("{}: {e}", to.display()))?;
    let from = backup::keyring_dir(root);
    let mut out = Vec::new();
    for f in files {
        let dst = to.join(&f.file);
        std::fs::copy(from.join(&f.file), &dst)
            .map_err(|e| format!("copying key-ring backup {}: {e}", f.file))?;
        out.push(dst);
    }
    Ok(out)
}

/// Keyspaces whose count or digest differs from what the backup recorded.
fn parity(recorded: &[aedb::KeyspaceDigest], restored: &[aedb::KeyspaceDigest]) -> Vec<String> {
    let name = |k: &aedb::KeyspaceDigest| {
        format!(
            "{}/{}/{}",
            k.project,
            k.scope,
            k.table.as_deref().unwrap_or("(kv)")
        )
    };
    let mut diffs = Vec::new();
    for k in recorded {
        match restored
            .iter()
            .find(|x| x.project == k.project && x.scope == k.scope && x.table == k.table)
        {
            None => diffs.push(format!("{}: missing", name(k))),
            Some(x) if x.count != k.count || x.digest != k.digest => diffs.push(format!(
                "{}: {} entries restored, {} backed up (digest differs)",
                name(k),
                x.count,
                k.count
            )),
            Some(_) => {}
        }
    }
    diffs
}

/// Opens the key ring of the restored store, brings back keys from the
/// paired files, and decrypts the sample.
fn keys_and_secrets(
    opts: &DrillOptions,
    tmp: &Path,
    store: Arc<EmbeddedStore>,
    files: &[PathBuf],
    report: &mut DrillReport,
    progress: &mut dyn FnMut(&str),
) {
    let store: Arc<dyn Store> = store;
    let fingerprint = MasterKey::from_bytes(opts.master.clone()).fingerprint();
    let keys_in_store = match count(store.as_ref(), Collection::KeyRing) {
        Ok(n) => n,
        Err(e) => return report.fail(format!("reading the restored key ring: {e}")),
    };
    if let Some(k) = report.keyring.as_mut() {
        k.keys_in_store = keys_in_store;
        k.master_fingerprint = fingerprint.clone();
    }
    if keys_in_store == 0 {
        // Opening would create a primary: nothing of the backup's to check.
        return report.fail(
            "the backup holds no key ring (no data key in the restored store): it was taken \
             before the server first started, or from another store",
        );
    }
    let metrics = match Metrics::new() {
        Ok(m) => m,
        Err(e) => return report.fail(format!("metrics registry: {e}")),
    };
    let audit = Arc::new(AuditLog::new(store.clone()));
    let ring = match KeyRing::open(
        store.clone(),
        audit,
        metrics,
        Some(MasterKey::from_bytes(opts.master.clone())),
        opts.previous.clone().map(MasterKey::from_bytes),
        tmp,
        opts.environment,
        false,
        vec![crate::secrets::encrypted_collection()],
    ) {
        Ok(r) => r,
        Err(KeyRingError::Unwrap { key_id, why }) => {
            let previous = if opts.previous.is_some() {
                " (nor under ARAGORA_ENCRYPTION_KEY_PREVIOUS)"
            } else {
                ""
            };
            let wrapped_by = wrapping_fingerprints(store.as_ref());
            return report.check(
                "key ring",
                false,
                format!(
                    "the backup's key ring does not unwrap under ARAGORA_ENCRYPTION_KEY \
                     (fingerprint {fingerprint}){previous}: data key {key_id}: {why}; its keys \
                     were wrapped by the master key(s) with fingerprint {wrapped_by}"
                ),
            );
        }
        Err(e) => return report.check("key ring", false, e.to_string()),
    };
    let mut restored = 0;
    for f in files {
        match ring.restore(f, DRILL_ACTOR, None) {
            Ok(r) => restored += r.restored.len(),
            Err(e) => report.check("key-ring backup", false, format!("{}: {e}", f.display())),
        }
    }
    if let Some(k) = report.keyring.as_mut() {
        k.keys_restored_from_files = restored;
    }
    report.check(
        "key ring",
        true,
        format!(
            "{keys_in_store} data key(s) open under ARAGORA_ENCRYPTION_KEY (fingerprint \
             {fingerprint}); {restored} brought back from {} key-ring backup file(s)",
            files.len()
        ),
    );

    progress("sampling and decrypting secrets");
    let picked = match sample(store.as_ref(), opts.sample) {
        Ok(p) => p,
        Err(e) => return report.fail(format!("reading the restored secrets: {e}")),
    };
    report.secrets.checked = true;
    report.secrets.total = picked.total;
    report.secrets.newest = picked.newest.clone();
    for (id, rec) in &picked.records {
        report.secrets.sampled += 1;
        let opened = hex::decode(&rec.envelope)
            .map_err(|_| "the stored envelope is not hex".to_string())
            .and_then(|env| ring.decrypt(id, &env, None).map_err(|e| e.to_string()));
        match opened {
            Ok(_) => report.secrets.decrypted += 1,
            Err(error) => {
                report.secrets.failed += 1;
                report.fail(format!("secret {id} (key {}): {error}", rec.key_id));
                report.secrets.failures.push(SecretFailure {
                    id: id.clone(),
                    error,
                });
            }
        }
    }
}

/// The distinct master-key fingerprints the stored key records name.
fn wrapping_fingerprints(store: &dyn Store) -> String {
    let mut seen = std::collections::BTreeSet::new();
    let _ = for_each_json::<KeyRecord>(store, Collection::KeyRing, |_, _, r| {
        seen.insert(
            r.master_fingerprint
                .unwrap_or_else(|| "(unrecorded)".into()),
        );
        Ok(())
    });
    if seen.is_empty() {
        "(none)".into()
    } else {
        seen.into_iter().collect::<Vec<_>>().join(", ")
    }
}

fn count(store: &dyn Store, c: Collection) -> Result<usize, StoreError> {
    let mut n = 0;
    for_each_json::<serde_json::Value>(store, c, |_, _, _| {
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

struct Picked {
    total: usize,
    newest: Option<String>,
    /// By id: the random sample and the newest.
    records: BTreeMap<String, SecretRecord>,
}

/// A uniform sample of `n` secrets (reservoir sampling, one pass) plus the
/// most recently written one.
fn sample(store: &dyn Store, n: usize) -> Result<Picked, StoreError> {
    let mut rng = rand::rng();
    let mut reservoir: Vec<(String, SecretRecord)> = Vec::with_capacity(n);
    let mut newest: Option<(i64, String, SecretRecord)> = None;
    let mut total = 0usize;
    for_each_json::<SecretRecord>(store, Collection::Secrets, |id, _, rec| {
        total += 1;
        if newest
            .as_ref()
            .is_none_or(|(at, _, _)| rec.updated_at_us >= *at)
        {
            newest = Some((rec.updated_at_us, id.clone(), rec.clone()));
        }
        if reservoir.len() < n {
            reservoir.push((id, rec));
        } else {
            let j = rng.random_range(0..total);
            if let Some(slot) = reservoir.get_mut(j) {
                *slot = (id, rec);
            }
        }
        Ok(())
    })?;
    let mut records: BTreeMap<String, SecretRecord> = reservoir.into_iter().collect();
    let newest_id = newest.map(|(_, id, rec)| {
        records.insert(id.clone(), rec);
        id
    });
    Ok(Picked {
        total,
        newest: newest_id,
        records,
    })
}

/// The report as an operator reads it.
pub fn render_text(r: &DrillReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if let Some(c) = &r.chain {
        let _ = writeln!(s, "chain: {} in {}", c.backups.join(" -> "), c.root);
        if !c.chain_head.is_empty() {
            let _ = writeln!(
                s,
                "  {} files, {} bytes, end LSN {}, head {}, taken {} ({} s ago)",
                c.files, c.bytes, c.end_lsn, c.chain_head, c.created_at, c.age_secs
            );
        }
    }
    if let Some(k) = &r.keyring {
        let _ = write!(
            s,
            "key ring: {} key-ring backup file(s) {}",
            k.keyring_files.len(),
            if k.pairing_recorded {
                "paired with the newest backup"
            } else {
                "(no pairing recorded: every file in keyring-backups/)"
            },
        );
        // Counted only once the restored store was opened.
        if k.master_fingerprint.is_empty() {
            s.push('\n');
        } else {
            let _ = writeln!(
                s,
                "; {} data key(s) in the store, {} brought back from the files",
                k.keys_in_store, k.keys_restored_from_files
            );
        }
    }
    for c in &r.checks {
        let _ = writeln!(
            s,
            "{}  {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    let x = &r.secrets;
    if !x.checked {
        s.push_str("secrets: not read (an earlier step failed)\n");
    } else {
        let _ = writeln!(
            s,
            "secrets: {} in the backup; {} sampled{}, {} decrypted, {} failed",
            x.total,
            x.sampled,
            x.newest
                .as_deref()
                .map(|n| format!(" (newest: {n})"))
                .unwrap_or_default(),
            x.decrypted,
            x.failed
        );
    }
    let _ = writeln!(
        s,
        "temp dir {}: {}",
        r.temp_dir,
        if r.temp_dir_kept { "kept" } else { "removed" }
    );
    let _ = writeln!(s, "elapsed: {} ms", r.elapsed_ms);
    if r.ok {
        s.push_str("result: drill passed\n");
    } else {
        s.push_str("result: DRILL FAILED\n");
        for f in &r.failures {
            let _ = writeln!(s, "  - {f}");
        }
    }
    s
}
