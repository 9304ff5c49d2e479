//! Master-key rotation (`aragora master-key rotate`): rewraps every key-ring
//! record under the current ARAGORA_ENCRYPTION_KEY, the data keys themselves
//! unchanged (so no record of any encrypted collection is touched).
//!
//! # Crash safety
//!
//! Each record is rewritten compare-and-set (`Expect::Version`), in batches;
//! a record is wrapped by the previous master key or the current one at every
//! instant, and boot opens either (the previous key from
//! ARAGORA_ENCRYPTION_KEY_PREVIOUS, chosen by the record's
//! `master_fingerprint`). A rerun skips what is already under the current
//! key. Which key wraps a record is decided by unwrapping it, never by its
//! recorded fingerprint alone: a record neither key opens refuses the whole
//! run before anything is written.
//!
//! The last batch is written with the `master_key_rotated` audit entry (the
//! counts), earlier ones each with a `master_key_rewrap_batch` entry, so no
//! rewrap is ever stored without its audit entry.

use serde::Serialize;

use super::backup_files;
use super::error::KeyRingError;
use super::keyring::{KeyRing, Master};
use super::record::{KeyRecord, KeyStatus, load_records};
use super::views::MasterRotationOutcome;
use crate::audit::{AuditEvent, Outcome};
use crate::crypto::{CryptoError, DataKey, MasterKey};
use crate::store::{Collection, Expect, WriteOp};

/// Records per store write (each compare-and-set).
pub const DEFAULT_REWRAP_BATCH: usize = 50;

/// How a master-key rotation runs.
#[derive(Clone, Debug)]
pub struct MasterRotation {
    /// Report what would change; write nothing.
    pub dry_run: bool,
    /// Records per store write (at least 1).
    pub batch_size: usize,
    /// The approved request this run executes (recorded in the audit entry);
    /// `None`: the owner path, audited at critical severity.
    pub approval_id: Option<String>,
}

impl Default for MasterRotation {
    fn default() -> Self {
        Self {
            dry_run: false,
            batch_size: DEFAULT_REWRAP_BATCH,
            approval_id: None,
        }
    }
}

/// Which master key opens a stored record.
enum WrappedBy {
    Current,
    /// The previous key; the data key, to wrap again.
    Previous(Box<DataKey>),
    Neither,
    /// Destroyed: no material.
    Nothing,
}

fn opens(master: &MasterKey, r: &KeyRecord) -> Option<DataKey> {
    let w = r.wrapped.as_ref()?;
    master
        .unwrap(w)
        .ok()
        .filter(|k| k.key_id() == r.key_id && k.version() == r.version)
}

fn wrapped_by(current: &Master, previous: Option<&Master>, r: &KeyRecord) -> WrappedBy {
    if r.status == KeyStatus::Destroyed || r.wrapped.is_none() {
        return WrappedBy::Nothing;
    }
    if opens(&current.key, r).is_some() {
        return WrappedBy::Current;
    }
    match previous.and_then(|p| opens(&p.key, r)) {
        Some(dek) => WrappedBy::Previous(Box::new(dek)),
        None => WrappedBy::Neither,
    }
}

/// `r` wrapped again under `current`.
pub(super) fn rewrapped(
    current: &Master,
    r: &KeyRecord,
    dek: &DataKey,
) -> Result<KeyRecord, CryptoError> {
    let mut next = r.clone();
    next.wrapped = Some(current.key.wrap(dek)?);
    next.master_fingerprint = Some(current.fingerprint.clone());
    Ok(next)
}

impl KeyRing {
    /// Rewraps every key-ring record under the current master key (see the
    /// module docs). `progress(done, total)` is called after each batch.
    /// Every failure of a real run (not a dry run, not a sealed ring) is
    /// audited as `master_key_rotation_failed` and logged.
    pub fn rotate_master(
        &self,
        actor: &str,
        opts: &MasterRotation,
        progress: &dyn Fn(usize, usize),
    ) -> Result<MasterRotationOutcome, KeyRingError> {
        let r = self.rotate_master_inner(actor, opts, progress);
        let sealed = matches!(
            &r,
            Err(KeyRingError::Sealed(_) | KeyRingError::Crypto(CryptoError::Sealed { .. }))
        );
        if let Err(e) = &r
            && !opts.dry_run
            && !sealed
        {
            tracing::error!(error = %e, actor = %actor, "master-key rotation failed; every key-ring record is still wrapped by one of the two master keys");
            let failed = AuditEvent::new("master_key_rotation_failed", actor, Outcome::Failure)
                .details(RotationFailed {
                    error: e.to_string(),
                    approval_id: opts.approval_id.as_deref(),
                    severity: "critical",
                });
            if let Err(a) = self.audit.record(failed) {
                tracing::error!(error = %a, "master_key_rotation_failed could not be audited");
            }
        }
        r
    }

    fn rotate_master_inner(
        &self,
        actor: &str,
        opts: &MasterRotation,
        progress: &dyn Fn(usize, usize),
    ) -> Result<MasterRotationOutcome, KeyRingError> {
        let _admin = self.admin.lock();
        self.ensure_unsealed()?;
        let current = self.master()?;
        let previous = self.previous.as_ref();
        let records = load_records(self.store.as_ref())?;
        let mut todo = Vec::new();
        let mut already = 0;
        let mut without = 0;
        let mut neither = Vec::new();
        for (version, r) in &records {
            match wrapped_by(current, previous, r) {
                WrappedBy::Current => already += 1,
                WrappedBy::Nothing => without += 1,
                WrappedBy::Neither => neither.push(r.key_id.clone()),
                WrappedBy::Previous(dek) => todo.push((*version, r, dek)),
            }
        }
        if !neither.is_empty() {
            let previous_note = if previous.is_some() {
                "nor ARAGORA_ENCRYPTION_KEY_PREVIOUS"
            } else {
                "and ARAGORA_ENCRYPTION_KEY_PREVIOUS is not set"
            };
            return Err(KeyRingError::Invalid(format!(
                "master-key rotation refused: data key(s) {} open under neither \
                 ARAGORA_ENCRYPTION_KEY {previous_note}; nothing was changed (set the master key \
                 that wrapped them as ARAGORA_ENCRYPTION_KEY_PREVIOUS, or restore the key ring \
                 from a backup)",
                neither.join(", ")
            )));
        }
        let total = records.len() - without;
        let batch_size = opts.batch_size.max(1);
        let batches = todo.len().div_ceil(batch_size);
        let mut outcome = MasterRotationOutcome {
            dry_run: opts.dry_run,
            master_fingerprint: current.fingerprint.clone(),
            previous_fingerprint: previous.map(|p| p.fingerprint.clone()),
            total,
            rewrapped: todo.len(),
            already_current: already,
            without_material: without,
            batches,
            backup: None,
            approval_id: opts.approval_id.clone(),
            message: String::new(),
        };
        if opts.dry_run {
            outcome.message = format!(
                "dry run: {} of {total} key record(s) would be rewrapped under the current \
                 master key, {already} already are; nothing written",
                todo.len()
            );
            return Ok(outcome);
        }
        let severity = if opts.approval_id.is_some() {
            "high"
        } else {
            "critical"
        };
        if todo.is_empty() {
            let event =
                AuditEvent::new("master_key_rotated", actor, Outcome::Success).details(Rotated {
                    rewrapped: 0,
                    already_current: already,
                    without_material: without,
                    total,
                    batches: 0,
                    backup: None,
                    master_fingerprint: &current.fingerprint,
                    previous_fingerprint: previous.map(|p| p.fingerprint.as_str()),
                    approval_id: opts.approval_id.as_deref(),
                    severity,
                });
            self.audit
                .record(event)
                .map_err(|e| KeyRingError::Audit(e.to_string()))?;
            outcome.message = format!(
                "nothing to rewrap: all {total} key record(s) are already under the current \
                 master key"
            );
            return Ok(outcome);
        }
        // The ring as it was, named by the key most of it was wrapped by
        // (each record keeps its own fingerprint).
        let backup_fingerprint = previous.map_or(&current.fingerprint, |p| &p.fingerprint);
        let backup = backup_files::write(&self.backup_dir, backup_fingerprint, &records)?;
        let backup_shown = backup.display().to_string();
        let mut done = 0;
        for (i, chunk) in todo.chunks(batch_size).enumerate() {
            let mut ops = Vec::with_capacity(chunk.len());
            for (version, r, dek) in chunk {
                let next = rewrapped(current, r, dek)?;
                ops.push(WriteOp::put_json(
                    Collection::KeyRing,
                    &r.key_id,
                    &next,
                    Expect::Version(*version),
                )?);
            }
            let last = i + 1 == batches;
            let event = if last {
                AuditEvent::new("master_key_rotated", actor, Outcome::Success).details(Rotated {
                    rewrapped: todo.len(),
                    already_current: already,
                    without_material: without,
                    total,
                    batches,
                    backup: Some(&backup_shown),
                    master_fingerprint: &current.fingerprint,
                    previous_fingerprint: previous.map(|p| p.fingerprint.as_str()),
                    approval_id: opts.approval_id.as_deref(),
                    severity,
                })
            } else {
                AuditEvent::new("master_key_rewrap_batch", actor, Outcome::Success).details(Batch {
                    batch: i + 1,
                    batches,
                    key_ids: chunk.iter().map(|(_, r, _)| r.key_id.as_str()).collect(),
                })
            };
            self.audit.record_with(event, ops)?;
            done += chunk.len();
            tracing::info!(
                done,
                total = todo.len(),
                batch = i + 1,
                batches,
                "master-key rotation: rewrapped key records"
            );
            progress(done, todo.len());
        }
        self.reload()?;
        tracing::warn!(
            rewrapped = todo.len(),
            already_current = already,
            backup = %backup_shown,
            actor = %actor,
            "master-key rotation: every key record is under the current master key"
        );
        outcome.backup = Some(backup_shown);
        outcome.message = format!(
            "rotated: {} key record(s) rewrapped under the current master key, {already} already \
             were; ARAGORA_ENCRYPTION_KEY_PREVIOUS is no longer needed",
            todo.len()
        );
        Ok(outcome)
    }
}

/// `master_key_rotated`.
#[derive(Serialize)]
struct Rotated<'a> {
    rewrapped: usize,
    already_current: usize,
    without_material: usize,
    total: usize,
    batches: usize,
    backup: Option<&'a str>,
    master_fingerprint: &'a str,
    previous_fingerprint: Option<&'a str>,
    approval_id: Option<&'a str>,
    severity: &'a str,
}

/// `master_key_rewrap_batch`: a batch before the last.
#[derive(Serialize)]
struct Batch<'a> {
    batch: usize,
    batches: usize,
    key_ids: Vec<&'a str>,
}

/// `master_key_rotation_failed`.
#[derive(Serialize)]
struct RotationFailed<'a> {
    error: String,
    approval_id: Option<&'a str>,
    severity: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::SearchFilter;
    use crate::auth::RequestMeta;
    use crate::encryption::tests::{Fixture, open, open_full, principal};

    const A: [u8; 32] = [0xa1; 32];
    const B: [u8; 32] = [0xb2; 32];
    const C: [u8; 32] = [0xc3; 32];

    fn rotate_new(f: &Fixture, batch_size: usize) -> MasterRotationOutcome {
        let opts = MasterRotation {
            batch_size,
            ..MasterRotation::default()
        };
        f.ring
            .rotate_master("t", &opts, &|_, _| {})
            .expect("master-key rotation")
    }

    fn dry_run(f: &Fixture) -> MasterRotationOutcome {
        let opts = MasterRotation {
            dry_run: true,
            ..MasterRotation::default()
        };
        f.ring
            .rotate_master("t", &opts, &|_, _| {})
            .expect("dry run")
    }

    fn audited(f: &Fixture, action: &str) -> Vec<serde_json::Value> {
        f.audit
            .search(&SearchFilter {
                action: Some(action.into()),
                limit: 100,
                ..SearchFilter::default()
            })
            .expect("audit search")
            .entries
            .into_iter()
            .map(|e| e.details)
            .collect()
    }

    /// Writes secrets under A across two data keys; returns their values.
    fn seed(dir: &std::path::Path) -> Vec<(String, String)> {
        let f = open(dir, A).expect("open under A");
        let p = principal();
        let meta = RequestMeta::default();
        let mut written = Vec::new();
        for i in 0..3 {
            if i == 2 {
                f.ring.rotate("t", None, "two keys", true).expect("rotate");
            }
            let (id, value) = (format!("db/s{i}"), format!("value-{i}"));
            f.secrets
                .put(&p, &id, &value, "password", None, &meta)
                .expect("put");
            written.push((id, value));
        }
        written
    }

    fn read_back(f: &Fixture, written: &[(String, String)]) {
        let p = principal();
        let meta = RequestMeta::default();
        for (id, value) in written {
            assert_eq!(&f.secrets.get(&p, id, &meta).expect("read").1, value);
        }
    }

    #[test]
    fn the_previous_key_opens_the_ring_and_a_rotation_rewraps_it_for_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = seed(dir.path());

        {
            let f = open_full(dir.path(), Some(B), Some(A), false).expect("B with A previous");
            read_back(&f, &written);
            let d = dry_run(&f);
            assert_eq!(
                (d.total, d.rewrapped, d.already_current),
                (2, 2, 0),
                "{d:?}"
            );
            assert!(d.backup.is_none() && audited(&f, "master_key_rotated").is_empty());

            let out = rotate_new(&f, DEFAULT_REWRAP_BATCH);
            assert_eq!((out.rewrapped, out.already_current, out.batches), (2, 0, 1));
            let backup = out.backup.expect("a key-ring backup first");
            let kept = backup_files::read(std::path::Path::new(&backup)).expect("backup");
            assert_eq!(kept.keys.len(), 2);
            let entries = audited(&f, "master_key_rotated");
            assert_eq!(entries.len(), 1, "{entries:?}");
            assert_eq!(entries[0]["rewrapped"], 2);
            assert_eq!(entries[0]["severity"], "critical");
            read_back(&f, &written);

            // A rerun has nothing left to do.
            let again = rotate_new(&f, DEFAULT_REWRAP_BATCH);
            assert_eq!((again.rewrapped, again.already_current), (0, 2));
            assert!(again.backup.is_none());
        }
        // Only B from now on.
        let f = open(dir.path(), B).expect("B alone after the rotation");
        read_back(&f, &written);
        drop(f);
        assert!(open(dir.path(), A).is_err(), "A no longer opens the ring");
    }

    #[test]
    fn the_new_key_alone_does_not_open_an_unrotated_ring_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        seed(dir.path());
        let e = open(dir.path(), B).expect_err("B alone");
        assert!(
            e.to_string().contains("ARAGORA_ENCRYPTION_KEY_PREVIOUS"),
            "says how to go on: {e}"
        );
    }

    #[test]
    fn a_rerun_after_an_interrupted_rotation_finishes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = seed(dir.path());
        {
            // What a run stopped after its first batch leaves: one record
            // under B, the other still under A.
            let f = open_full(dir.path(), Some(B), Some(A), false).expect("open");
            let current = Master {
                fingerprint: MasterKey::from_bytes(zeroize::Zeroizing::new(B)).fingerprint(),
                key: MasterKey::from_bytes(zeroize::Zeroizing::new(B)),
            };
            let a = MasterKey::from_bytes(zeroize::Zeroizing::new(A));
            let records = load_records(f.store.as_ref()).expect("records");
            let (version, first) = &records[0];
            let dek = opens(&a, first).expect("A opens it");
            let next = rewrapped(&current, first, &dek).expect("rewrap");
            let op = WriteOp::put_json(
                Collection::KeyRing,
                &first.key_id,
                &next,
                Expect::Version(*version),
            )
            .expect("op");
            f.store
                .write(vec![op], crate::store::Durability::Durable)
                .expect("write");
        }
        // Boot opens the mixed ring (each record by its own master key).
        let f = open_full(dir.path(), Some(B), Some(A), false).expect("mixed ring");
        read_back(&f, &written);
        let d = dry_run(&f);
        assert_eq!((d.rewrapped, d.already_current), (1, 1), "{d:?}");
        let out = rotate_new(&f, 1);
        assert_eq!((out.rewrapped, out.already_current, out.batches), (1, 1, 1));
        drop(f);
        let f = open(dir.path(), B).expect("B alone");
        read_back(&f, &written);
    }

    #[test]
    fn batches_are_each_audited_and_the_last_carries_the_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = seed(dir.path());
        let f = open_full(dir.path(), Some(B), Some(A), false).expect("open");
        let out = rotate_new(&f, 1);
        assert_eq!((out.rewrapped, out.batches), (2, 2));
        assert_eq!(audited(&f, "master_key_rewrap_batch").len(), 1);
        let done = audited(&f, "master_key_rotated");
        assert_eq!(
            (done[0]["rewrapped"].as_u64(), done[0]["batches"].as_u64()),
            (Some(2), Some(2))
        );
        read_back(&f, &written);
    }

    #[test]
    fn a_record_under_neither_key_refuses_the_rotation_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = seed(dir.path());
        let f = open_full(dir.path(), Some(B), Some(A), false).expect("open");
        // A key record wrapped by a third master key (altered, or from
        // another deployment) arrives after boot.
        let third = MasterKey::from_bytes(zeroize::Zeroizing::new(C));
        let fp = third.fingerprint();
        let (_, stray) =
            super::super::record::new_primary(&third, &fp, 99).expect("a stray key record");
        let mut stray = stray;
        stray.primary = false;
        stray.status = KeyStatus::DecryptOnly;
        let op = WriteOp::put_json(Collection::KeyRing, &stray.key_id, &stray, Expect::Absent)
            .expect("op");
        f.store
            .write(vec![op], crate::store::Durability::Durable)
            .expect("write");
        let before = load_records(f.store.as_ref()).expect("records");

        let e = f
            .ring
            .rotate_master("t", &MasterRotation::default(), &|_, _| {})
            .expect_err("refused");
        let msg = e.to_string();
        assert!(
            msg.contains(&stray.key_id)
                && msg.contains("neither")
                && msg.contains("nothing was changed"),
            "{msg}"
        );
        assert!(!msg.contains(&hex::encode(C)), "{msg}");
        assert_eq!(load_records(f.store.as_ref()).expect("records"), before);
        assert!(
            !dir.path().join(super::super::BACKUP_DIR).exists()
                || std::fs::read_dir(dir.path().join(super::super::BACKUP_DIR))
                    .expect("dir")
                    .count()
                    == 1,
            "no backup beyond the data-key rotation's"
        );
        let failed = audited(&f, "master_key_rotation_failed");
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(audited(&f, "master_key_rotated").is_empty());
        read_back(&f, &written);
    }

    #[test]
    fn a_key_ring_backup_from_before_the_rotation_restores_under_the_previous_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = seed(dir.path());
        let backups = dir.path().join(super::super::BACKUP_DIR);
        let backup = std::fs::read_dir(&backups)
            .expect("the data-key rotation's backup")
            .next()
            .expect("one file")
            .expect("entry")
            .path();
        let f = open_full(dir.path(), Some(B), Some(A), false).expect("open");
        rotate_new(&f, DEFAULT_REWRAP_BATCH);
        // The older data key's record is lost after the rotation.
        let records = load_records(f.store.as_ref()).expect("records");
        let (version, lost) = &records[0];
        f.store
            .write(
                vec![WriteOp::delete(
                    Collection::KeyRing,
                    lost.key_id.clone(),
                    Expect::Version(*version),
                )],
                crate::store::Durability::Durable,
            )
            .expect("delete");
        let restored = f.ring.restore(&backup, "t", None).expect("restore");
        assert_eq!(restored.restored.len(), 1, "{restored:?}");
        read_back(&f, &written);
        // Still under A: the next rotation rewraps it.
        let d = dry_run(&f);
        assert_eq!((d.rewrapped, d.already_current), (1, 1), "{d:?}");
    }

    #[test]
    fn a_wrong_previous_key_does_not_open_the_ring() {
        let dir = tempfile::tempdir().expect("tempdir");
        seed(dir.path());
        let e = open_full(dir.path(), Some(B), Some(C), false).expect_err("C is not A");
        assert!(e.to_string().contains("ARAGORA_ENCRYPTION_KEY"), "{e}");
        assert!(!e.to_string().contains(&hex::encode(C)));
    }
}
