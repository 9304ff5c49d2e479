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
    Previous(DataKey),
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
        Some(dek) => WrappedBy::Previous(dek),
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
