//! The key ring in memory and the hot path: boot (load, unwrap, create the
//! first primary), encrypt under the primary, decrypt with exactly the key an
//! envelope names, and the rotation gate writers hold while they store.
//! Rotation, cleanup and restore (`lifecycle.rs`) change the stored ring and
//! call [`KeyRing::reload`]; the hot path only ever reads an immutable
//! snapshot, so it never waits on them except at a rotation's commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use super::backup_files::BACKUP_DIR;
use super::collection::EncryptedCollection;
use super::error::KeyRingError;
use super::record::{KeyRecord, KeyStatus, load_records, new_primary};
use super::stats::Stats;
use super::views::{EncryptionHealth, EncryptionStats, KeyCacheView, KeysView};
use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::config::Environment;
use crate::crypto::{self, CryptoError, DataKey, MasterKey};
use crate::metrics::Metrics;
use crate::store::{Collection, Expect, Store, WriteOp};

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

#[derive(Debug)]
pub struct KeyRing {
    pub(super) store: Arc<dyn Store>,
    pub(super) audit: Arc<AuditLog>,
    pub(super) metrics: Metrics,
    pub(super) master: MasterKey,
    pub(super) fingerprint: String,
    pub(super) backup_dir: PathBuf,
    ring: RwLock<Arc<Ring>>,
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
    /// A key that does not unwrap stops boot, naming the key.
    pub fn open(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        metrics: Metrics,
        master: MasterKey,
        data_dir: &Path,
        environment: Environment,
        encrypted: Vec<Arc<dyn EncryptedCollection>>,
    ) -> Result<Self, KeyRingError> {
        let fingerprint = master.fingerprint();
        let stats = Stats::measure(environment);
        let records = load_records(store.as_ref())?;
        let ring = match build_ring(&master, &fingerprint, &records)? {
            Some(r) => r,
            None => {
                // First start, or (after damage) no primary: add one.
                let reason = if records.is_empty() {
                    "first start"
                } else {
                    "no primary key in the ring"
                };
                let version = records.iter().map(|(_, r)| r.version).max().unwrap_or(0) + 1;
                let (_, rec) = new_primary(&master, &fingerprint, version)?;
                let op = WriteOp::put_json(Collection::KeyRing, &rec.key_id, &rec, Expect::Absent)?;
                audit.record_with(
                    AuditEvent::new("key_created", "system", Outcome::Success).details(
                        KeyCreated {
                            key_id: &rec.key_id,
                            version: rec.version,
                            reason,
                        },
                    ),
                    vec![op],
                )?;
                tracing::info!(key_id = %rec.key_id, reason, "created the primary data key");
                let records = load_records(store.as_ref())?;
                build_ring(&master, &fingerprint, &records)?.ok_or_else(|| {
                    KeyRingError::Invalid("the new primary key is not in the ring".into())
                })?
            }
        };
        metrics.active_keys.set(ring.active_count() as i64);
        Ok(Self {
            store,
            audit,
            metrics,
            master,
            fingerprint,
            backup_dir: data_dir.join(BACKUP_DIR),
            ring: RwLock::new(Arc::new(ring)),
            gate: RwLock::new(()),
            admin: Mutex::new(()),
            stats,
            encrypted,
        })
    }

    pub(super) fn current(&self) -> Arc<Ring> {
        self.ring.read().clone()
    }

    /// Rebuilds the in-memory ring from the store (after a lifecycle change).
    pub(super) fn reload(&self) -> Result<(), KeyRingError> {
        let records = load_records(self.store.as_ref())?;
        let ring = build_ring(&self.master, &self.fingerprint, &records)?
            .ok_or_else(|| KeyRingError::Invalid("the key ring has no primary key".into()))?;
        self.metrics.active_keys.set(ring.active_count() as i64);
        *self.ring.write() = Arc::new(ring);
        Ok(())
    }

    pub fn primary_key_id(&self) -> String {
        self.current().primary.key_id().to_string()
    }

    /// When the primary key was created (µs since the epoch): its age is
    /// what `aragora_security_primary_key_created_timestamp_seconds` shows.
    pub fn primary_created_at_us(&self) -> Option<i64> {
        let ring = self.current();
        let id = ring.primary.key_id();
        ring.records
            .iter()
            .find(|r| r.key_id == id)
            .map(|r| r.created_at_us)
    }

    /// Encrypts under the primary key (record id = AAD).
    pub fn encrypt(&self, record_id: &str, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let primary = self.current().primary.clone();
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
        self.observe("encrypt", secs, r.as_ref().err());
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
        let primary = self.current().primary.clone();
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
        let primary = self.current().primary.clone();
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
        let ring = self.current();
        let t = Instant::now();
        let r = crypto::decrypt_with(record_id, envelope, |id, version| {
            ring.keys
                .get(id)
                .filter(|k| k.version() == version)
                .cloned()
        });
        let secs = t.elapsed().as_secs_f64();
        self.observe("decrypt", secs, r.as_ref().err());
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

    fn observe(&self, op: &str, secs: f64, err: Option<&CryptoError>) {
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
            tracing::warn!(operation = op, error = %e, "encryption error");
        }
    }

    /// `GET /api/security/encryption/health` (nothing secret).
    pub fn health(&self) -> EncryptionHealth {
        let ring = self.current();
        let active = ring.active_count();
        EncryptionHealth {
            status: if active > 0 { "healthy" } else { "critical" }.to_string(),
            master_key_loaded: true,
            active_key_id: ring.primary.key_id().to_string(),
            active_keys: active,
        }
    }

    /// `GET /api/security/encryption/keys` (metadata only).
    pub fn keys(&self) -> KeysView {
        let ring = self.current();
        KeysView {
            active_count: ring.active_count(),
            primary_key_id: ring.primary.key_id().to_string(),
            keys: ring.records.iter().map(KeyRecord::view).collect(),
        }
    }

    /// `GET /api/security/encryption/stats`.
    pub fn stats(&self) -> EncryptionStats {
        let ring = self.current();
        self.stats.view(KeyCacheView {
            unwrapped_keys: ring.keys.len(),
            primary_key_id: ring.primary.key_id().to_string(),
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

/// Unwraps every non-destroyed key. `None` when no primary exists.
fn build_ring(
    master: &MasterKey,
    fingerprint: &str,
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
        let dek = match master.unwrap(w) {
            Ok(k) if k.key_id() == r.key_id && k.version() == r.version => Arc::new(k),
            Ok(_) => {
                return Err(KeyRingError::Unwrap {
                    key_id: r.key_id.clone(),
                    why: "the stored record names another key than its wrapped key",
                });
            }
            Err(_) => {
                let why = match &r.master_fingerprint {
                    Some(f) if f != fingerprint => {
                        "it was wrapped by a different master key (fingerprint mismatch): \
                         ARAGORA_ENCRYPTION_KEY is wrong"
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
