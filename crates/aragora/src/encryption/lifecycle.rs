//! The key lifecycle: rotate (a new primary, the old one decrypt-only),
//! cleanup (retire keys no stored record uses: decrypt-only -> expired ->
//! destroyed) and restore (bring lost keys back from a backup file). Each is
//! one audited atomic store write followed by a reload of the in-memory ring,
//! serialized in this process by the ring's admin lock. The hot path lives in
//! `keyring.rs` and never changes the stored ring.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::backup_files;
use super::collection::for_each_stored;
use super::error::KeyRingError;
use super::keyring::KeyRing;
use super::record::{KEY_ROTATION_PERIOD_US, KeyStatus, load_records, new_primary};
use super::views::{
    CleanupOutcome, KeptKey, RestoreOutcome, RestoredKey, RetiredKey, RotationOutcome, WaitingKey,
};
use crate::audit::{AuditEvent, Outcome};
use crate::clock::{format_us, now_us};
use crate::crypto::{CryptoError, MasterKey};
use crate::store::{Collection, Expect, WriteOp};

impl KeyRing {
    /// How many stored records each key id encrypts (read from the envelopes'
    /// headers, not from metadata), over every encrypted collection.
    pub fn key_usage(&self) -> Result<BTreeMap<String, u64>, KeyRingError> {
        let mut usage = BTreeMap::new();
        let mut bad = None;
        for c in &self.encrypted {
            for_each_stored(self.store.as_ref(), c.collection(), 1000, |id, rec| match c
                .header(&rec.value)
            {
                Ok(h) => *usage.entry(h.key_id).or_insert(0) += 1,
                Err(e) => bad = Some(format!("{} {id}: {e}", c.name())),
            })?;
        }
        if let Some(b) = bad {
            // An unreadable header could name any key: retire nothing.
            return Err(KeyRingError::Invalid(format!(
                "cannot tell which key a stored record uses ({b}); no key retired"
            )));
        }
        Ok(usage)
    }

    /// Rotates: a new primary, the old one kept for decryption, in one atomic
    /// write with its audit entry. Without `force`, only when the primary is
    /// older than the rotation period.
    ///
    /// Every failure past the reason check (the key-ring backup, the new key,
    /// the commit, the reload after it) is counted as
    /// `aragora_security_encryption_errors_total{reason="rotation_failed"}`
    /// and audited as `key_rotation_failed`, here and only here: a failure
    /// path that returned early used to page nobody.
    pub fn rotate(
        &self,
        actor: &str,
        ip: Option<String>,
        reason: &str,
        force: bool,
    ) -> Result<RotationOutcome, KeyRingError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > 500 {
            return Err(KeyRingError::Invalid(
                "a reason (1 to 500 characters) is required for a key rotation".into(),
            ));
        }
        let r = self.rotate_inner(actor, ip.clone(), reason, force);
        // A sealed ring refuses before anything is tried: NoActiveEncryptionKeys
        // already pages for that, so it is not a failed rotation.
        let sealed = matches!(
            &r,
            Err(KeyRingError::Sealed(_) | KeyRingError::Crypto(CryptoError::Sealed { .. }))
        );
        if let Err(e) = &r
            && !sealed
        {
            self.metrics
                .encryption_errors
                .with_label_values(&["rotation_failed"])
                .inc();
            tracing::error!(
                error = %e,
                ip = %ip.as_deref().unwrap_or("-"),
                actor = %actor,
                "key rotation failed; the previous primary stays active"
            );
            let failed = AuditEvent::new("key_rotation_failed", actor, Outcome::Failure)
                .ip(ip)
                .details(RotationFailed {
                    reason,
                    error: e.to_string(),
                });
            if let Err(a) = self.audit.record(failed) {
                tracing::error!(error = %a, "key_rotation_failed could not be audited");
            }
        }
        r
    }

    fn rotate_inner(
        &self,
        actor: &str,
        ip: Option<String>,
        reason: &str,
        force: bool,
    ) -> Result<RotationOutcome, KeyRingError> {
        let _admin = self.admin.lock();
        let ring = self.current()?;
        let master = self.master()?;
        let records = load_records(self.store.as_ref())?;
        let Some((cur_version, cur)) = records
            .iter()
            .find(|(_, r)| r.key_id == ring.primary.key_id())
            .cloned()
        else {
            return Err(KeyRingError::Invalid(
                "the primary key is not in the store; restart the server".into(),
            ));
        };
        let now = now_us();
        if !force && now < cur.created_at_us + KEY_ROTATION_PERIOD_US {
            return Ok(RotationOutcome {
                rotated: false,
                message: format!(
                    "rotation not due: primary key {} was created {} and rotates after 90 days \
                     (--force rotates now)",
                    cur.key_id, cur.created_at
                ),
                primary_key_id: cur.key_id,
                previous_key_id: None,
                backup: None,
                active_count: ring.active_count(),
            });
        }
        let backup = backup_files::write(&self.backup_dir, &master.fingerprint, &records)?;
        let version = records.iter().map(|(_, r)| r.version).max().unwrap_or(0) + 1;
        let (_, new) = new_primary(&master.key, &master.fingerprint, version)?;
        let mut old = cur.clone();
        old.status = KeyStatus::DecryptOnly;
        old.primary = false;
        old.retired_at = Some(format_us(now));
        old.retired_at_us = Some(now);
        let ops = vec![
            WriteOp::put_json(Collection::KeyRing, &new.key_id, &new, Expect::Absent)?,
            WriteOp::put_json(
                Collection::KeyRing,
                &old.key_id,
                &old,
                Expect::Version(cur_version),
            )?,
        ];
        let event = AuditEvent::new("key_rotated", actor, Outcome::Success)
            .ip(ip.clone())
            .details(KeyRotated {
                reason,
                force,
                new_key_id: &new.key_id,
                previous_key_id: &old.key_id,
                backup: backup.display().to_string(),
            });
        let committed = {
            let _gate = self.gate.write();
            let r = self.audit.record_with(event, ops);
            if r.is_ok() {
                self.reload()?;
            }
            r
        };
        if let Err(e) = committed {
            tracing::error!(error = %e, "key rotation not committed; the previous primary stays active");
            let _ = self.reload();
            return Err(e.into());
        }
        tracing::info!(
            new = %new.key_id,
            previous = %old.key_id,
            reason = ?reason,
            ip = %ip.as_deref().unwrap_or("-"),
            actor = %actor,
            "key rotation: rotated"
        );
        Ok(RotationOutcome {
            rotated: true,
            message: format!(
                "rotated: new primary {}; {} is decrypt-only until no record uses it",
                new.key_id, old.key_id
            ),
            primary_key_id: new.key_id,
            previous_key_id: Some(old.key_id),
            backup: Some(backup.display().to_string()),
            active_count: self.current()?.active_count(),
        })
    }

    /// Retires keys no stored secret uses: decrypt_only -> expired, and
    /// expired -> destroyed once it has been expired for `destroy_grace` (until
    /// then the key is still in the store and a mistaken cleanup costs
    /// nothing). The primary is never retired.
    pub fn cleanup_expired(
        &self,
        actor: &str,
        ip: Option<String>,
        destroy_grace: std::time::Duration,
    ) -> Result<CleanupOutcome, KeyRingError> {
        let grace_us = i64::try_from(destroy_grace.as_micros()).unwrap_or(i64::MAX);
        let _admin = self.admin.lock();
        // Retiring is judged against the open ring (and reloads it).
        self.ensure_unsealed()?;
        let usage = self.key_usage()?;
        let records = load_records(self.store.as_ref())?;
        let now = now_us();
        let mut ops = Vec::new();
        let mut retired = Vec::new();
        let mut kept = Vec::new();
        let mut waiting = Vec::new();
        for (version, r) in &records {
            if r.primary || matches!(r.status, KeyStatus::Active | KeyStatus::Destroyed) {
                continue;
            }
            let used = usage.get(&r.key_id).copied().unwrap_or(0);
            if used > 0 {
                kept.push(KeptKey {
                    key_id: r.key_id.clone(),
                    status: r.status,
                    records: used,
                });
                continue;
            }
            let mut next = r.clone();
            if r.status == KeyStatus::Expired && grace_us > 0 {
                let Some(expired_at) = r.retired_at_us else {
                    // Expired before the grace period existed: it starts now.
                    next.retired_at_us = Some(now);
                    waiting.push(WaitingKey {
                        key_id: r.key_id.clone(),
                        destroy_after: format_us(now.saturating_add(grace_us)),
                    });
                    ops.push(WriteOp::put_json(
                        Collection::KeyRing,
                        &r.key_id,
                        &next,
                        Expect::Version(*version),
                    )?);
                    continue;
                };
                let destroy_after = expired_at.saturating_add(grace_us);
                if now < destroy_after {
                    waiting.push(WaitingKey {
                        key_id: r.key_id.clone(),
                        destroy_after: format_us(destroy_after),
                    });
                    continue;
                }
            }
            next.status = if r.status == KeyStatus::DecryptOnly {
                KeyStatus::Expired
            } else {
                next.wrapped = None;
                KeyStatus::Destroyed
            };
            next.retired_at = Some(format_us(now));
            next.retired_at_us = Some(now);
            retired.push(RetiredKey {
                key_id: r.key_id.clone(),
                from: r.status,
                to: next.status,
            });
            ops.push(WriteOp::put_json(
                Collection::KeyRing,
                &r.key_id,
                &next,
                Expect::Version(*version),
            )?);
        }
        if !ops.is_empty() {
            let event = AuditEvent::new("keys_retired", actor, Outcome::Success)
                .ip(ip)
                .details(KeysRetired {
                    retired: &retired,
                    kept_in_use: &kept,
                    waiting_to_be_destroyed: &waiting,
                });
            self.audit.record_with(event, ops)?;
            self.reload()?;
        }
        Ok(CleanupOutcome {
            retired,
            kept_in_use: kept,
            waiting_to_be_destroyed: waiting,
            usage,
            active_count: self.current()?.active_count(),
        })
    }

    /// Brings back keys missing from the store, or destroyed in it, from a
    /// backup file. Each must unwrap under the current master key, or the
    /// previous one when its record names it (a backup from before a
    /// master-key rotation); restored keys are decrypt-only (the current
    /// primary stays primary).
    pub fn restore(
        &self,
        file: &Path,
        actor: &str,
        ip: Option<String>,
    ) -> Result<RestoreOutcome, KeyRingError> {
        let bad = |reason: String| backup_files::invalid(file, reason);
        let backup = backup_files::read(file)?;
        let _admin = self.admin.lock();
        let master = self.master()?;
        let records = load_records(self.store.as_ref())?;
        let mut ops = Vec::new();
        let mut restored = Vec::new();
        let mut present = Vec::new();
        for mut r in backup.keys {
            // A destroyed key's record stays (without its material) so the id is
            // never reused; the backup brings the material back.
            let expect = match records.iter().find(|(_, s)| s.key_id == r.key_id) {
                Some((version, s)) if s.status == KeyStatus::Destroyed && r.wrapped.is_some() => {
                    r.status = KeyStatus::DecryptOnly;
                    r.primary = false;
                    r.retired_at = None;
                    r.retired_at_us = None;
                    Expect::Version(*version)
                }
                Some(_) => {
                    present.push(r.key_id);
                    continue;
                }
                None => Expect::Absent,
            };
            let Some(w) = &r.wrapped else {
                continue;
            };
            if w.key_id != r.key_id || w.version != r.version {
                return Err(bad(format!("key {} is relabelled", r.key_id)));
            }
            // A backup from before a master-key rotation opens under the
            // previous key; boot picks it by the record's fingerprint, and the
            // next `master-key rotate` rewraps it.
            let opens = |m: &MasterKey| m.unwrap(w).is_ok();
            let by_previous = self.previous.as_ref().is_some_and(|p| {
                r.master_fingerprint.as_deref() == Some(p.fingerprint.as_str()) && opens(&p.key)
            });
            if !by_previous && !opens(&master.key) {
                return Err(bad(format!(
                    "key {} opens under neither ARAGORA_ENCRYPTION_KEY nor \
                     ARAGORA_ENCRYPTION_KEY_PREVIOUS (another master key)",
                    r.key_id
                )));
            }
            if r.primary || r.status == KeyStatus::Active {
                r.primary = false;
                r.status = KeyStatus::DecryptOnly;
            }
            restored.push(RestoredKey {
                key_id: r.key_id.clone(),
                status: r.status,
            });
            ops.push(WriteOp::put_json(
                Collection::KeyRing,
                &r.key_id,
                &r,
                expect,
            )?);
        }
        if !ops.is_empty() {
            let event = AuditEvent::new("key_ring_restored", actor, Outcome::Success)
                .ip(ip)
                .details(RingRestored {
                    file: file.display().to_string(),
                    restored: &restored,
                });
            self.audit.record_with(event, ops)?;
            self.reload()?;
        }
        Ok(RestoreOutcome {
            restored,
            already_present: present,
            active_count: self.current()?.active_count(),
        })
    }
}

/// `key_rotated`.
#[derive(Serialize)]
struct KeyRotated<'a> {
    reason: &'a str,
    force: bool,
    new_key_id: &'a str,
    previous_key_id: &'a str,
    backup: String,
}

/// `key_rotation_failed`.
#[derive(Serialize)]
struct RotationFailed<'a> {
    reason: &'a str,
    error: String,
}

/// `keys_retired`.
#[derive(Serialize)]
struct KeysRetired<'a> {
    retired: &'a [RetiredKey],
    kept_in_use: &'a [KeptKey],
    waiting_to_be_destroyed: &'a [WaitingKey],
}

/// `key_ring_restored`.
#[derive(Serialize)]
struct RingRestored<'a> {
    file: String,
    restored: &'a [RestoredKey],
}
