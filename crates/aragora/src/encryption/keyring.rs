//! The key ring in memory and the hot path: boot (load, unwrap, create the
//! first primary), encrypt under the primary, decrypt with exactly the key an
//! envelope names, and the rotation gate writers hold while they store.
//! Rotation, cleanup and restore (`lifecycle.rs`) change the stored ring and
//! call [`KeyRing::reload`]; the hot path only ever reads an immutable
//! snapshot, so it never waits on them except at a rotation's commit.
//!
//! # Sealed
//!
//! In production a missing master key, or one that does not open the stored
//! ring, does not stop boot (Vault's model): the ring starts sealed. Every
//! operation that needs a data key fails with [`CryptoError::Sealed`] /
//! [`KeyRingError::Sealed`] (503 naming ARAGORA_ENCRYPTION_KEY), the
//! `aragora_security_active_keys{type="master"}` gauge is 0, and the rest of
//! the server (login, RBAC, audit, health, metrics) keeps serving.
//! [`KeyRing::unseal`] with the right key (`aragora unseal`) opens it once;
//! a sealed ring never comes back after that.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use super::backup_files::BACKUP_DIR;
use super::collection::EncryptedCollection;
use super::error::KeyRingError;
use super::record::{KeyRecord, KeyStatus, load_records, new_primary};
use super::stats::Stats;
use super::views::{
    EncryptionHealth, EncryptionStats, KeyCacheView, KeysView, SealedView, UnsealOutcome,
};
use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::config::Environment;
use crate::crypto::{self, CryptoError, DataKey, MasterKey};
use crate::metrics::Metrics;
use crate::store::{Collection, Expect, Store, WriteOp};

/// The key an envelope names, when the ring has exactly it.
fn key_for(ring: &Ring, id: &str, version: u32) -> Option<Arc<DataKey>> {
    ring.keys
        .get(id)
        .filter(|k| k.version() == version)
        .cloned()
}

/// The unwrapped ring as the hot path sees it.
#[derive(Debug)]
pub(super) struct Ring {
    /// Every key that can decrypt (not destroyed), by key id.
    pub(super) keys: HashMap<String, Arc<DataKey>>,
    pub(super) primary: Arc<DataKey>,
    /// Every record, by version.
    pub(super) records: Vec<KeyRecord>,
}

impl Ring {
    pub(super) fn active_count(&self) -> usize {
        self.records.iter().filter(|r| r.status.is_active()).count()
    }
}

/// The master key the ring is open under, with its fingerprint (recorded in
/// key records and backups; not secret).
#[derive(Debug)]
pub(super) struct Master {
    pub(super) key: MasterKey,
    pub(super) fingerprint: String,
}

/// The ring as the hot path finds it.
#[derive(Debug)]
enum RingState {
    Sealed(SealedView),
    Open(Arc<Ring>),
}

#[derive(Debug)]
pub struct KeyRing {
    pub(super) store: Arc<dyn Store>,
    pub(super) audit: Arc<AuditLog>,
    pub(super) metrics: Metrics,
    /// Set once: at boot, or by the unseal that opened the ring.
    master: OnceLock<Master>,
    /// ARAGORA_ENCRYPTION_KEY_PREVIOUS: opens records a master-key rotation
    /// has not rewrapped yet (their `master_fingerprint` names it). Never
    /// wraps anything.
    pub(super) previous: Option<Master>,
    pub(super) backup_dir: PathBuf,
    ring: RwLock<RingState>,
    /// Shared by writers around encrypt + store; exclusive around a rotation's
    /// commit (see the module docs).
    pub(super) gate: RwLock<()>,
    /// Serializes rotation, cleanup and restore in this process.
    pub(super) admin: Mutex<()>,
    stats: Stats,
    /// The collections whose records the keys encrypt (registered by their
    /// owners): what `cleanup_expired` counts and the migration rewraps.
    pub(super) encrypted: Vec<Arc<dyn EncryptedCollection>>,
}

impl KeyRing {
    /// Loads (or, on first start, creates) the ring and unwraps every key.
    /// A key that does not unwrap stops boot, naming the key, unless
    /// `sealed_start` (production): then, as with no master key at all, the
    /// ring starts sealed (see the module docs). Other failures (the store,
    /// a key without material) stop boot either way.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        metrics: Metrics,
        master: Option<MasterKey>,
        previous: Option<MasterKey>,
        data_dir: &Path,
        environment: Environment,
        sealed_start: bool,
        encrypted: Vec<Arc<dyn EncryptedCollection>>,
    ) -> Result<Self, KeyRingError> {
        let ring = Self {
            store,
            audit,
            metrics,
            master: OnceLock::new(),
            previous: previous.map(|key| Master {
                fingerprint: key.fingerprint(),
                key,
            }),
            backup_dir: data_dir.join(BACKUP_DIR),
            ring: RwLock::new(RingState::Sealed(sealed_missing())),
            gate: RwLock::new(()),
            admin: Mutex::new(()),
            stats: Stats::measure(environment),
            encrypted,
        };
        let Some(master) = master else {
            if !sealed_start {
                return Err(KeyRingError::Invalid(
                    "ARAGORA_ENCRYPTION_KEY is not set".into(),
                ));
            }
            let sealed = sealed_missing();
            tracing::error!(reason = %sealed.reason, "key ring sealed: {}", sealed.message);
            ring.seal(sealed);
            return Ok(ring);
        };
        let fingerprint = master.fingerprint();
        match load_ring(
            ring.store.as_ref(),
            &ring.audit,
            &master,
            &fingerprint,
            ring.previous.as_ref(),
        ) {
            Ok(r) => ring.install(
                Master {
                    key: master,
                    fingerprint,
                },
                r,
            ),
            Err(KeyRingError::Unwrap { key_id, why }) if sealed_start => {
                let sealed = sealed_wrong(&key_id, why);
                tracing::error!(reason = %sealed.reason, key_id = %key_id, "key ring sealed: {}", sealed.message);
                ring.seal(sealed);
            }
            Err(e) => return Err(e),
        }
        Ok(ring)
    }

    fn seal(&self, sealed: SealedView) {
        *self.ring.write() = RingState::Sealed(sealed);
        self.set_gauges(None);
    }

    fn install(&self, master: Master, ring: Ring) {
        // Set once: boot, or the first unseal (serialized by `admin`).
        let _ = self.master.set(master);
        self.set_gauges(Some(&ring));
        *self.ring.write() = RingState::Open(Arc::new(ring));
    }

    fn set_gauges(&self, ring: Option<&Ring>) {
        let g = &self.metrics.active_keys;
        g.with_label_values(&["master"])
            .set(i64::from(ring.is_some()));
        g.with_label_values(&["data"])
            .set(ring.map_or(0, |r| r.active_count() as i64));
    }

    /// Why the ring is sealed, or `None` when it is open.
    pub fn sealed(&self) -> Option<SealedView> {
        match &*self.ring.read() {
            RingState::Sealed(s) => Some(s.clone()),
            RingState::Open(_) => None,
        }
    }

    /// `Err(Sealed)` while sealed: for operations that will need a data key,
    /// checked before they start (or ask for an approval).
    pub fn ensure_unsealed(&self) -> Result<(), KeyRingError> {
        self.current().map(|_| ())
    }

    pub(super) fn master(&self) -> Result<&Master, KeyRingError> {
        match self.master.get() {
            Some(m) => Ok(m),
            None => Err(self
                .current()
                .err()
                .unwrap_or_else(|| KeyRingError::Sealed(sealed_missing().message))),
        }
    }

    /// A key derived from the master key the ring is open with (HKDF, `info`
    /// names the purpose: the audit export's signing key). Sealed: none.
    pub fn derive_from_master(
        &self,
        info: &[u8],
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, KeyRingError> {
        Ok(self.master()?.key.derive_subkey(info)?)
    }

    /// Opens a sealed ring with `key` (`aragora unseal`): every stored key
    /// must unwrap under it, exactly as at boot. A key that does not open the
    /// ring is refused and the ring stays sealed. Both outcomes are audited
    /// (`key_ring_unsealed`, `key_ring_unseal_failed`); the success entry is
    /// written before the ring opens, so an unseal whose audit fails does not
    /// happen.
    pub fn unseal(&self, key: MasterKey, actor: &str) -> Result<UnsealOutcome, KeyRingError> {
        let _admin = self.admin.lock();
        let fingerprint = key.fingerprint();
        if let Some(m) = self.master.get() {
            if m.fingerprint != fingerprint {
                return Err(KeyRingError::UnsealRefused(
                    "the key ring is already unsealed under another master key; nothing changed"
                        .into(),
                ));
            }
            let ring = self.current()?;
            return Ok(UnsealOutcome {
                unsealed: false,
                primary_key_id: ring.primary.key_id().to_string(),
                active_keys: ring.active_count(),
                message: "the key ring is already unsealed under this key".into(),
            });
        }
        let was = self.sealed().map(|s| s.reason).unwrap_or_default();
        match load_ring(
            self.store.as_ref(),
            &self.audit,
            &key,
            &fingerprint,
            self.previous.as_ref(),
        ) {
            Ok(ring) => {
                let event = AuditEvent::new("key_ring_unsealed", actor, Outcome::Success).details(
                    Unsealed {
                        was_sealed: &was,
                        primary_key_id: ring.primary.key_id(),
                        active_keys: ring.active_count(),
                    },
                );
                self.audit
                    .record(event)
                    .map_err(|e| KeyRingError::Audit(e.to_string()))?;
                let outcome = UnsealOutcome {
                    unsealed: true,
                    primary_key_id: ring.primary.key_id().to_string(),
                    active_keys: ring.active_count(),
                    message: format!(
                        "unsealed: {} data key(s) open, primary {}",
                        ring.active_count(),
                        ring.primary.key_id()
                    ),
                };
                self.install(Master { key, fingerprint }, ring);
                tracing::warn!(primary = %outcome.primary_key_id, actor = %actor, "key ring unsealed");
                Ok(outcome)
            }
            Err(KeyRingError::Unwrap { key_id, why }) => {
                let message = format!(
                    "unseal refused: the key given does not open data key {key_id} ({why}); \
                     the key ring stays sealed"
                );
                let event = AuditEvent::new("key_ring_unseal_failed", actor, Outcome::Failure)
                    .details(UnsealFailed {
                        key_id: &key_id,
                        error: &message,
                    });
                if let Err(e) = self.audit.record(event) {
                    tracing::error!(error = %e, "key_ring_unseal_failed could not be audited");
                }
                tracing::warn!(key_id = %key_id, actor = %actor, "key ring unseal failed: wrong key");
                Err(KeyRingError::UnsealRefused(message))
            }
            Err(e) => Err(e),
        }
    }

    /// The open ring, or `Sealed` naming the problem.
    pub(super) fn current(&self) -> Result<Arc<Ring>, KeyRingError> {
        match &*self.ring.read() {
            RingState::Open(r) => Ok(r.clone()),
            RingState::Sealed(s) => Err(KeyRingError::Sealed(s.message.clone())),
        }
    }

    /// [`Self::current`] for the hot path's error type.
    fn open_ring(&self) -> Result<Arc<Ring>, CryptoError> {
        match &*self.ring.read() {
            RingState::Open(r) => Ok(r.clone()),
            RingState::Sealed(s) => Err(CryptoError::Sealed {
                why: s.message.clone(),
            }),
        }
    }

    /// Rebuilds the in-memory ring from the store (after a lifecycle change).
    pub(super) fn reload(&self) -> Result<(), KeyRingError> {
        let master = self.master()?;
        let records = load_records(self.store.as_ref())?;
        let ring = build_ring(
            &master.key,
            &master.fingerprint,
            self.previous.as_ref(),
            &records,
        )?
        .ok_or_else(|| KeyRingError::Invalid("the key ring has no primary key".into()))?;
        self.set_gauges(Some(&ring));
        *self.ring.write() = RingState::Open(Arc::new(ring));
        Ok(())
    }

    /// Re-reads the ring from the store, for a store other processes write
    /// (replicas and offline commands on DATABASE_URL). Skipped while sealed,
    /// and while a lifecycle operation of this process runs (it reloads when
    /// it commits).
    pub fn refresh(&self) -> Result<(), KeyRingError> {
        if self.sealed().is_some() {
            return Ok(());
        }
        let Some(_admin) = self.admin.try_lock() else {
            return Ok(());
        };
        self.reload()
    }

    pub fn primary_key_id(&self) -> Result<String, CryptoError> {
        Ok(self.open_ring()?.primary.key_id().to_string())
    }

    /// When the primary key was created (µs since the epoch): its age is
    /// what `aragora_security_primary_key_created_timestamp_seconds` shows.
    pub fn primary_created_at_us(&self) -> Option<i64> {
        // Sealed: no primary to age.
        let ring = self.current().ok()?;
        let id = ring.primary.key_id();
        ring.records
            .iter()
            .find(|r| r.key_id == id)
            .map(|r| r.created_at_us)
    }

    /// Encrypts under the primary key (record id = AAD).
    pub fn encrypt(&self, record_id: &str, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let primary = self.open_ring()?.primary.clone();
        self.encrypt_with(&primary, record_id, plaintext)
    }

    fn encrypt_with(
        &self,
        key: &DataKey,
        record_id: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let t = Instant::now();
        let r = crypto::encrypt(key, record_id, plaintext);
        let secs = t.elapsed().as_secs_f64();
        self.observe("encrypt", secs, r.as_ref().err(), record_id, None);
        if r.is_ok() {
            self.stats.encrypted(secs);
        }
        r
    }

    /// Encrypts under the primary and runs `write(envelope, key_id)` (the
    /// store write) while holding the rotation gate shared.
    pub fn seal_and_write<T, E: From<CryptoError>>(
        &self,
        record_id: &str,
        plaintext: &[u8],
        write: impl FnOnce(Vec<u8>, &str, u32) -> Result<T, E>,
    ) -> Result<T, E> {
        let _gate = self.gate.read();
        let primary = self.open_ring()?.primary.clone();
        let envelope = self.encrypt_with(&primary, record_id, plaintext)?;
        write(envelope, primary.key_id(), primary.version())
    }

    /// [`Self::seal_and_write`] for many records at once (the migration's
    /// batches): each `(record_id, plaintext)` is encrypted under the primary
    /// and `write(envelopes, key_id, version)` runs, all under the rotation
    /// gate held shared.
    pub fn seal_many_and_write<T, E: From<CryptoError>>(
        &self,
        items: &[(&str, &[u8])],
        write: impl FnOnce(Vec<Vec<u8>>, &str, u32) -> Result<T, E>,
    ) -> Result<T, E> {
        let _gate = self.gate.read();
        let primary = self.open_ring()?.primary.clone();
        let mut envelopes = Vec::with_capacity(items.len());
        for (record_id, plaintext) in items {
            envelopes.push(self.encrypt_with(&primary, record_id, plaintext)?);
        }
        write(envelopes, primary.key_id(), primary.version())
    }

    /// Decrypts with exactly the key the envelope's header names; `actor`
    /// (when given) is counted for the per-actor decrypt rate.
    pub fn decrypt(
        &self,
        record_id: &str,
        envelope: &[u8],
        actor: Option<&str>,
    ) -> Result<Vec<u8>, CryptoError> {
        // Sealed is not an encryption error (no metric, no log line per
        // request): the master gauge and health already say so.
        let ring = self.open_ring()?;
        let t = Instant::now();
        let mut r = crypto::decrypt_with(record_id, envelope, |id, v| key_for(&ring, id, v));
        // On a shared store another process may have added the key since this
        // ring was read (a rotation on another replica or by an offline
        // command): read the ring again once before calling the key unknown.
        if matches!(r, Err(CryptoError::UnknownKey { .. })) && self.refresh().is_ok() {
            let ring = self.open_ring()?;
            r = crypto::decrypt_with(record_id, envelope, |id, v| key_for(&ring, id, v));
        }
        let secs = t.elapsed().as_secs_f64();
        self.observe("decrypt", secs, r.as_ref().err(), record_id, actor);
        if r.is_ok() {
            self.stats.decrypted(secs, actor);
        }
        // A decrypt on behalf of an actor is a secret read through the API;
        // the migration's decrypts (no actor) are not reads.
        if actor.is_some() {
            self.metrics
                .secret_reads
                .with_label_values(&[if r.is_ok() { "success" } else { "failure" }])
                .inc();
        }
        r
    }

    fn observe(
        &self,
        op: &str,
        secs: f64,
        err: Option<&CryptoError>,
        record_id: &str,
        actor: Option<&str>,
    ) {
        self.metrics
            .encryption_operations
            .with_label_values(&[op])
            .inc();
        self.metrics
            .encryption_latency
            .with_label_values(&[op])
            .observe(secs);
        if let Some(e) = err {
            self.stats.failed();
            self.metrics
                .encryption_errors
                .with_label_values(&[e.reason()])
                .inc();
            // What the runbook's `grep -i "encrypt\|decrypt" | grep -i
            // "error\|fail"` finds: the record and who asked, actor last.
            tracing::warn!(
                operation = %op,
                reason = %e.reason(),
                error = ?e.to_string(),
                record_id = %record_id,
                actor = %actor.unwrap_or("-"),
                "encryption error"
            );
        }
    }

    /// `GET /api/security/encryption/health` (nothing secret).
    pub fn health(&self) -> EncryptionHealth {
        let ring = match self.current() {
            Ok(r) => r,
            Err(_) => {
                let sealed = self.sealed().unwrap_or_else(sealed_missing);
                return EncryptionHealth {
                    status: "sealed".to_string(),
                    master_key_loaded: false,
                    active_key_id: None,
                    active_keys: 0,
                    sealed: true,
                    sealed_reason: Some(sealed.reason),
                    message: Some(sealed.message),
                };
            }
        };
        let active = ring.active_count();
        EncryptionHealth {
            status: if active > 0 { "healthy" } else { "critical" }.to_string(),
            master_key_loaded: true,
            active_key_id: Some(ring.primary.key_id().to_string()),
            active_keys: active,
            sealed: false,
            sealed_reason: None,
            message: None,
        }
    }

    /// `GET /api/security/encryption/keys` (metadata only). Sealed: no key
    /// is known to open, so none is listed as active.
    pub fn keys(&self) -> Result<KeysView, KeyRingError> {
        let ring = self.current()?;
        Ok(KeysView {
            active_count: ring.active_count(),
            primary_key_id: ring.primary.key_id().to_string(),
            keys: ring.records.iter().map(KeyRecord::view).collect(),
        })
    }

    /// Times one key derivation for `derivation_latency_p95` (the server
    /// calls it every `DERIVATION_PROBE_INTERVAL`). Blocking.
    pub fn sample_derivation_cost(&self) {
        self.stats.sample_derivation();
    }

    /// `GET /api/security/encryption/stats` (also while sealed: nothing
    /// unwrapped, no primary).
    pub fn stats(&self) -> EncryptionStats {
        let ring = self.current().ok();
        self.stats.view(KeyCacheView {
            unwrapped_keys: ring.as_ref().map_or(0, |r| r.keys.len()),
            primary_key_id: ring.map(|r| r.primary.key_id().to_string()),
        })
    }

    /// The encrypted collections registered at boot.
    pub fn encrypted_collections(&self) -> &[Arc<dyn EncryptedCollection>] {
        &self.encrypted
    }
}

/// `key_created`.
#[derive(Serialize)]
struct KeyCreated<'a> {
    key_id: &'a str,
    version: u32,
    reason: &'a str,
}

/// `key_ring_unsealed`.
#[derive(Serialize)]
struct Unsealed<'a> {
    was_sealed: &'a str,
    primary_key_id: &'a str,
    active_keys: usize,
}

/// `key_ring_unseal_failed`.
#[derive(Serialize)]
struct UnsealFailed<'a> {
    key_id: &'a str,
    error: &'a str,
}

/// What to do when no master key was given (nothing secret).
fn sealed_missing() -> SealedView {
    SealedView {
        reason: "missing_key".into(),
        message: "the key ring is sealed: ARAGORA_ENCRYPTION_KEY is not set, so no data key \
                  can be used; set it (64 hex characters, the master key this data dir was \
                  created with) and restart, or run `aragora unseal` on the server's host with \
                  the key on stdin"
            .into(),
    }
}

/// What to do when the master key does not open data key `key_id`.
fn sealed_wrong(key_id: &str, why: &str) -> SealedView {
    SealedView {
        reason: "wrong_key".into(),
        message: format!(
            "the key ring is sealed: ARAGORA_ENCRYPTION_KEY does not open data key {key_id} \
             ({why}); set the master key this data dir was created with and restart, or run \
             `aragora unseal` on the server's host with it on stdin"
        ),
    }
}

/// Loads the stored ring and unwraps every key under `master`; on a first
/// start (or a ring without a primary) creates the primary, audited.
fn load_ring(
    store: &dyn Store,
    audit: &AuditLog,
    master: &MasterKey,
    fingerprint: &str,
    previous: Option<&Master>,
) -> Result<Ring, KeyRingError> {
    let records = load_records(store)?;
    if let Some(r) = build_ring(master, fingerprint, previous, &records)? {
        return Ok(r);
    }
    // First start, or (after damage) no primary: add one.
    let reason = if records.is_empty() {
        "first start"
    } else {
        "no primary key in the ring"
    };
    let version = records.iter().map(|(_, r)| r.version).max().unwrap_or(0) + 1;
    let (_, rec) = new_primary(master, fingerprint, version)?;
    let op = WriteOp::put_json(Collection::KeyRing, &rec.key_id, &rec, Expect::Absent)?;
    audit.record_with(
        AuditEvent::new("key_created", "system", Outcome::Success).details(KeyCreated {
            key_id: &rec.key_id,
            version: rec.version,
            reason,
        }),
        vec![op],
    )?;
    tracing::info!(key_id = %rec.key_id, reason, "created the primary data key");
    let records = load_records(store)?;
    build_ring(master, fingerprint, previous, &records)?
        .ok_or_else(|| KeyRingError::Invalid("the new primary key is not in the ring".into()))
}

/// Unwraps every non-destroyed key, each under the master key that wrapped
/// it: the previous one when its recorded fingerprint names it (a master-key
/// rotation not finished yet), else the current one. `None` when no primary
/// exists.
fn build_ring(
    master: &MasterKey,
    fingerprint: &str,
    previous: Option<&Master>,
    records: &[(u64, KeyRecord)],
) -> Result<Option<Ring>, KeyRingError> {
    let mut keys = HashMap::new();
    let mut primary: Option<(u32, Arc<DataKey>)> = None;
    for (_, r) in records {
        if r.status == KeyStatus::Destroyed {
            continue;
        }
        let Some(w) = &r.wrapped else {
            return Err(KeyRingError::NoMaterial {
                key_id: r.key_id.clone(),
                status: r.status.name(),
            });
        };
        let by_previous = previous.filter(|p| {
            r.master_fingerprint.as_deref() == Some(p.fingerprint.as_str())
                && p.fingerprint != fingerprint
        });
        let unwrapped = match (by_previous, previous) {
            (Some(p), _) => p.key.unwrap(w),
            // A record from before fingerprints were kept names no key: the
            // previous one may open it too.
            (None, Some(p)) if r.master_fingerprint.is_none() => {
                master.unwrap(w).or_else(|_| p.key.unwrap(w))
            }
            (None, _) => master.unwrap(w),
        };
        let dek = match unwrapped {
            Ok(k) if k.key_id() == r.key_id && k.version() == r.version => Arc::new(k),
            Ok(_) => {
                return Err(KeyRingError::Unwrap {
                    key_id: r.key_id.clone(),
                    why: "the stored record names another key than its wrapped key",
                });
            }
            Err(_) => {
                let why = match (&r.master_fingerprint, by_previous) {
                    (_, Some(_)) => {
                        "its record names ARAGORA_ENCRYPTION_KEY_PREVIOUS as the master key \
                         that wrapped it, but that key does not open it (a wrong previous key, \
                         or the stored wrapped key was altered)"
                    }
                    (Some(f), None) if f != fingerprint => {
                        "it was wrapped by a different master key (fingerprint mismatch): \
                         ARAGORA_ENCRYPTION_KEY is wrong, or the key it was wrapped by must be \
                         given as ARAGORA_ENCRYPTION_KEY_PREVIOUS until `aragora master-key \
                         rotate` has rewrapped it"
                    }
                    _ => "a wrong ARAGORA_ENCRYPTION_KEY, or the stored wrapped key was altered",
                };
                return Err(KeyRingError::Unwrap {
                    key_id: r.key_id.clone(),
                    why,
                });
            }
        };
        if r.primary
            && r.status == KeyStatus::Active
            && primary.as_ref().is_none_or(|(v, _)| *v < r.version)
        {
            primary = Some((r.version, dek.clone()));
        }
        keys.insert(r.key_id.clone(), dek);
    }
    Ok(primary.map(|(_, primary)| Ring {
        keys,
        primary,
        records: records.iter().map(|(_, r)| r.clone()).collect(),
    }))
}
