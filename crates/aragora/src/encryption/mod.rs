//! The key ring: data keys persisted in the store (wrapped by the master key),
//! unwrapped once at boot into memory for the hot path, rotated crash-safely.
//!
//! # Records
//!
//! `Collection::KeyRing` holds one [`KeyRecord`] per data key, keyed by key id.
//! Exactly one key is the primary (status `active`): new records are encrypted
//! under it. Older keys are `decrypt_only` until no record uses them, then
//! `expired`, then `destroyed` (the wrapped key material is dropped).
//!
//! # Crash safety
//!
//! A rotation is one atomic store write: the new primary (`Expect::Absent`),
//! the old primary demoted to `decrypt_only` (`Expect::Version`) and the
//! `key_rotated` audit entry. A crash leaves the old ring or the new one, never
//! zero active keys, and a rerun simply rotates again. A key-ring backup (the
//! wrapped keys, which the master key already protects) is written to
//! `data/keyring-backups/` before each rotation.
//!
//! # Writes versus rotation
//!
//! Writers encrypt and store under a shared gate ([`KeyRing::seal_and_write`]);
//! a rotation takes the gate exclusively around its commit. So once a rotation
//! returns, no record encrypted under the old primary is still in flight, and
//! `cleanup_expired`'s usage scan sees every record that uses it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit::{AuditEvent, AuditLog, Outcome, RecordError};
use crate::clock::{format_us, now_us};
use crate::config::Environment;
use crate::crypto::{self, CryptoError, DataKey, MasterKey, WrappedKey, kdf};
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::store::{Collection, Expect, ListQuery, Store, StoreError, WriteOp, for_each_json};

pub mod collection;
pub mod migration;

pub use collection::{EncryptedCollection, Enveloped, JsonEnveloped};

/// A primary key is due for rotation after this long (`--force` rotates
/// earlier).
pub const KEY_ROTATION_PERIOD_US: i64 = 90 * 86_400 * 1_000_000;
/// Where key-ring backups go, under the data dir.
pub const BACKUP_DIR: &str = "keyring-backups";
/// Latency samples kept per operation for the percentiles of `stats`.
const SAMPLES: usize = 4096;
/// Actors tracked for the decrypt rate before idle ones are dropped.
const MAX_TRACKED_ACTORS: usize = 10_000;
/// Derivations measured at boot for `derivation_latency_p95`.
const DERIVATION_SAMPLES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// The primary: encrypts and decrypts.
    Active,
    /// Decrypts records written before a rotation.
    DecryptOnly,
    /// Retired (no record used it); still loaded, destroyed by the next cleanup.
    Expired,
    /// Key material dropped.
    Destroyed,
}

impl KeyStatus {
    /// Counted in `active_keys`: usable for decryption by design.
    pub fn is_active(self) -> bool {
        matches!(self, KeyStatus::Active | KeyStatus::DecryptOnly)
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::DecryptOnly => "decrypt_only",
            KeyStatus::Expired => "expired",
            KeyStatus::Destroyed => "destroyed",
        }
    }
}

/// One data key as stored. `wrapped` is the key encrypted under the master key
/// (absent once destroyed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub version: u32,
    pub status: KeyStatus,
    pub primary: bool,
    pub created_at: String,
    pub created_at_us: i64,
    pub expires_at: String,
    pub expires_at_us: i64,
    #[serde(default)]
    pub retired_at: Option<String>,
    /// Public fingerprint of the master key that wrapped it: tells "another
    /// master key" apart from corruption at boot.
    #[serde(default)]
    pub master_fingerprint: Option<String>,
    pub wrapped: Option<WrappedKey>,
}

impl KeyRecord {
    /// Metadata only (no wrapped key).
    pub fn view(&self) -> KeyView {
        KeyView {
            key_id: self.key_id.clone(),
            version: self.version,
            status: self.status,
            primary: self.primary,
            created_at: self.created_at.clone(),
            expires_at: self.expires_at.clone(),
            retired_at: self.retired_at.clone(),
        }
    }
}

/// A data key's metadata (never its material).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    pub key_id: String,
    pub version: u32,
    pub status: KeyStatus,
    pub primary: bool,
    pub created_at: String,
    pub expires_at: String,
    pub retired_at: Option<String>,
}

/// `GET /api/security/encryption/health` (nothing secret).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct EncryptionHealth {
    /// `healthy`, or `critical` when no key can decrypt.
    pub status: String,
    pub master_key_loaded: bool,
    pub active_key_id: String,
    pub active_keys: usize,
}

/// `GET /api/security/encryption/keys`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct KeysView {
    pub active_count: usize,
    pub primary_key_id: String,
    pub keys: Vec<KeyView>,
}

/// One actor's decrypts in the last minute.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ActorDecrypts {
    pub actor: String,
    pub last_minute: u64,
    pub per_second: f64,
}

/// The unwrapped keys held in memory.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyCacheView {
    pub unwrapped_keys: usize,
    pub primary_key_id: String,
}

/// `GET /api/security/encryption/stats` (latencies in seconds).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct EncryptionStats {
    pub encrypt_ops: u64,
    pub decrypt_ops: u64,
    pub errors: u64,
    pub encryption_latency_p50: f64,
    pub encryption_latency_p95: f64,
    pub decryption_latency_p50: f64,
    pub decryption_latency_p95: f64,
    pub derivation_latency_p95: f64,
    pub derivation_iterations: u32,
    pub decrypts_last_minute: u64,
    pub decrypts_per_actor: Vec<ActorDecrypts>,
    pub cache: KeyCacheView,
}

/// A key `cleanup_expired` moved on.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RetiredKey {
    pub key_id: String,
    pub from: KeyStatus,
    pub to: KeyStatus,
}

/// A key `cleanup_expired` kept because records use it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct KeptKey {
    pub key_id: String,
    pub status: KeyStatus,
    pub records: u64,
}

/// What `key-rotation --cleanup-expired` did.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CleanupOutcome {
    pub retired: Vec<RetiredKey>,
    pub kept_in_use: Vec<KeptKey>,
    /// Stored records per key id.
    pub usage: BTreeMap<String, u64>,
    pub active_count: usize,
}

/// A key brought back from a backup file.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RestoredKey {
    pub key_id: String,
    pub status: KeyStatus,
}

/// What `key-ring restore` did.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RestoreOutcome {
    pub restored: Vec<RestoredKey>,
    pub already_present: Vec<String>,
    pub active_count: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error(
        "encryption key ring: data key {key_id} does not open under ARAGORA_ENCRYPTION_KEY: \
         {why}; refusing to start (set the master key this data dir was created with)"
    )]
    Unwrap { key_id: String, why: &'static str },
    #[error("encryption key ring: key {key_id} is {status} but has no key material")]
    NoMaterial {
        key_id: String,
        status: &'static str,
    },
    #[error("encryption: {0}")]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encryption: {0}")]
    Audit(String),
    #[error("key-ring backup {path}: {reason}")]
    Backup { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl From<RecordError> for KeyRingError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Ops(s) => KeyRingError::Store(s),
            RecordError::Audit(a) => KeyRingError::Audit(a.to_string()),
        }
    }
}

impl From<KeyRingError> for ServiceError {
    fn from(e: KeyRingError) -> Self {
        match e {
            KeyRingError::Store(s) => s.into(),
            KeyRingError::Audit(a) => ServiceError::Unavailable(a),
            KeyRingError::Invalid(m) => ServiceError::BadRequest(m),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

/// The unwrapped ring as the hot path sees it.
#[derive(Debug)]
struct Ring {
    /// Every key that can decrypt (not destroyed), by key id.
    keys: HashMap<String, Arc<DataKey>>,
    primary: Arc<DataKey>,
    /// Every record, by version.
    records: Vec<KeyRecord>,
}

impl Ring {
    fn active_count(&self) -> usize {
        self.records.iter().filter(|r| r.status.is_active()).count()
    }
}

/// A bounded window of recent latencies (seconds).
#[derive(Debug, Default)]
struct Samples {
    buf: Vec<f64>,
    next: usize,
}

impl Samples {
    fn push(&mut self, v: f64) {
        if self.buf.len() < SAMPLES {
            self.buf.push(v);
        } else {
            self.buf[self.next] = v;
        }
        self.next = (self.next + 1) % SAMPLES;
    }

    fn percentile(&self, p: f64) -> f64 {
        percentile(&self.buf, p)
    }
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Decrypts per actor in the last 60 one-second buckets.
#[derive(Debug)]
struct Window {
    buckets: [(i64, u64); 60],
}

impl Default for Window {
    fn default() -> Self {
        Self {
            buckets: [(i64::MIN, 0); 60],
        }
    }
}

impl Window {
    fn add(&mut self, sec: i64) {
        let slot = &mut self.buckets[sec.rem_euclid(60) as usize];
        if slot.0 == sec {
            slot.1 += 1;
        } else {
            *slot = (sec, 1);
        }
    }

    fn last_minute(&self, now_sec: i64) -> u64 {
        self.buckets
            .iter()
            .filter(|(s, _)| *s > now_sec - 60 && *s <= now_sec)
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Debug, Default)]
struct Stats {
    encrypt_ops: AtomicU64,
    decrypt_ops: AtomicU64,
    errors: AtomicU64,
    encrypt_latency: Mutex<Samples>,
    decrypt_latency: Mutex<Samples>,
    derivation: Vec<f64>,
    derivation_iterations: u32,
    per_actor: Mutex<HashMap<String, Window>>,
}

/// What a rotation did.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RotationOutcome {
    pub rotated: bool,
    pub message: String,
    pub primary_key_id: String,
    pub previous_key_id: Option<String>,
    pub backup: Option<String>,
    pub active_count: usize,
}

/// The backup file: the stored records, wrapped keys included.
#[derive(Debug, Serialize, Deserialize)]
pub struct Backup {
    pub created_at: String,
    pub master_fingerprint: String,
    pub keys: Vec<KeyRecord>,
}

#[derive(Debug)]
pub struct KeyRing {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    metrics: Metrics,
    master: MasterKey,
    fingerprint: String,
    backup_dir: PathBuf,
    ring: RwLock<Arc<Ring>>,
    /// Shared by writers around encrypt + store; exclusive around a rotation's
    /// commit (see the module docs).
    gate: RwLock<()>,
    /// Serializes rotation, cleanup and restore in this process.
    admin: Mutex<()>,
    stats: Stats,
    /// The collections whose records the keys encrypt (registered by their
    /// owners): what `cleanup_expired` counts and the migration rewraps.
    encrypted: Vec<Arc<dyn EncryptedCollection>>,
}

fn new_key_id(version: u32) -> Result<String, KeyRingError> {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| CryptoError::Rng)?;
    Ok(format!("dk-v{version}-{}", hex::encode(b)))
}

/// Times PBKDF2 at the configured cost (what a password-derived key costs on
/// this machine right now) and one HKDF.
fn measure_derivation(environment: Environment) -> (Vec<f64>, u32) {
    let iterations = kdf::pbkdf2_iterations(environment);
    let samples = if environment == Environment::Production {
        1
    } else {
        DERIVATION_SAMPLES
    };
    let mut out = Vec::with_capacity(samples + 1);
    for _ in 0..samples {
        let t = Instant::now();
        let _ = kdf::derive_key(b"aragora derivation probe", b"probe-salt-16byt", iterations);
        out.push(t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    if kdf::derive_subkey(b"aragora derivation probe", b"salt", b"probe").is_ok() {
        out.push(t.elapsed().as_secs_f64());
    }
    (out, iterations.get())
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
        let (derivation, derivation_iterations) = measure_derivation(environment);
        let stats = Stats {
            derivation,
            derivation_iterations,
            ..Stats::default()
        };
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

    fn current(&self) -> Arc<Ring> {
        self.ring.read().clone()
    }

    fn reload(&self) -> Result<(), KeyRingError> {
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
            self.stats.encrypt_ops.fetch_add(1, Ordering::Relaxed);
            self.stats.encrypt_latency.lock().push(secs);
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
            self.stats.decrypt_ops.fetch_add(1, Ordering::Relaxed);
            self.stats.decrypt_latency.lock().push(secs);
            if let Some(actor) = actor {
                let sec = now_us().div_euclid(1_000_000);
                let mut per_actor = self.stats.per_actor.lock();
                if per_actor.len() >= MAX_TRACKED_ACTORS && !per_actor.contains_key(actor) {
                    per_actor.retain(|_, w| w.last_minute(sec) > 0);
                }
                per_actor.entry(actor.to_string()).or_default().add(sec);
            }
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
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
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
        let now_sec = now_us().div_euclid(1_000_000);
        let mut per_actor: Vec<(String, u64)> = {
            let mut map = self.stats.per_actor.lock();
            map.retain(|_, w| w.last_minute(now_sec) > 0);
            map.iter()
                .map(|(a, w)| (a.clone(), w.last_minute(now_sec)))
                .collect()
        };
        per_actor.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let total: u64 = per_actor.iter().map(|(_, n)| n).sum();
        let (e50, e95) = {
            let s = self.stats.encrypt_latency.lock();
            (s.percentile(0.5), s.percentile(0.95))
        };
        let (d50, d95) = {
            let s = self.stats.decrypt_latency.lock();
            (s.percentile(0.5), s.percentile(0.95))
        };
        let ring = self.current();
        EncryptionStats {
            encrypt_ops: self.stats.encrypt_ops.load(Ordering::Relaxed),
            decrypt_ops: self.stats.decrypt_ops.load(Ordering::Relaxed),
            errors: self.stats.errors.load(Ordering::Relaxed),
            encryption_latency_p50: e50,
            encryption_latency_p95: e95,
            decryption_latency_p50: d50,
            decryption_latency_p95: d95,
            derivation_latency_p95: percentile(&self.stats.derivation, 0.95),
            derivation_iterations: self.stats.derivation_iterations,
            decrypts_last_minute: total,
            decrypts_per_actor: per_actor
                .into_iter()
                .map(|(actor, n)| ActorDecrypts {
                    actor,
                    last_minute: n,
                    per_second: n as f64 / 60.0,
                })
                .collect(),
            cache: KeyCacheView {
                unwrapped_keys: ring.keys.len(),
                primary_key_id: ring.primary.key_id().to_string(),
            },
        }
    }

    /// The encrypted collections registered at boot.
    pub fn encrypted_collections(&self) -> &[Arc<dyn EncryptedCollection>] {
        &self.encrypted
    }

    /// How many stored records each key id encrypts (read from the envelopes'
    /// headers, not from metadata), over every encrypted collection.
    pub fn key_usage(&self) -> Result<BTreeMap<String, u64>, KeyRingError> {
        let mut usage = BTreeMap::new();
        let mut bad = None;
        for c in &self.encrypted {
            let mut after: Option<String> = None;
            loop {
                let page = self
                    .store
                    .list(c.collection(), &ListQuery::after(after.as_deref(), 1000))?;
                let n = page.len();
                for (id, rec) in page {
                    match c
                        .envelope(&rec.value)
                        .and_then(|b| crypto::parse_header(&b).map_err(|e| e.to_string()))
                    {
                        Ok(h) => *usage.entry(h.key_id).or_insert(0) += 1,
                        Err(e) => bad = Some(format!("{} {id}: {e}", c.name())),
                    }
                    after = Some(id);
                }
                if n < 1000 {
                    break;
                }
            }
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
        let _admin = self.admin.lock();
        let records = load_records(self.store.as_ref())?;
        let ring = self.current();
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
        let backup = self.write_backup(&records)?;
        let version = records.iter().map(|(_, r)| r.version).max().unwrap_or(0) + 1;
        let (_, new) = new_primary(&self.master, &self.fingerprint, version)?;
        let mut old = cur.clone();
        old.status = KeyStatus::DecryptOnly;
        old.primary = false;
        old.retired_at = Some(format_us(now));
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
            self.metrics
                .encryption_errors
                .with_label_values(&["rotation_failed"])
                .inc();
            tracing::error!(error = %e, "key rotation failed; the previous primary stays active");
            let failed = AuditEvent::new("key_rotation_failed", actor, Outcome::Failure)
                .ip(ip)
                .details(RotationFailed {
                    reason,
                    error: e.to_string(),
                });
            let _ = self.audit.record(failed);
            let _ = self.reload();
            return Err(e.into());
        }
        tracing::info!(new = %new.key_id, previous = %old.key_id, reason, "key rotated");
        Ok(RotationOutcome {
            rotated: true,
            message: format!(
                "rotated: new primary {}; {} is decrypt-only until no record uses it",
                new.key_id, old.key_id
            ),
            primary_key_id: new.key_id,
            previous_key_id: Some(old.key_id),
            backup: Some(backup.display().to_string()),
            active_count: self.current().active_count(),
        })
    }

    /// Retires keys no stored secret uses: decrypt_only -> expired, expired ->
    /// destroyed. The primary is never retired.
    pub fn cleanup_expired(
        &self,
        actor: &str,
        ip: Option<String>,
    ) -> Result<CleanupOutcome, KeyRingError> {
        let _admin = self.admin.lock();
        let usage = self.key_usage()?;
        let records = load_records(self.store.as_ref())?;
        let now = now_us();
        let mut ops = Vec::new();
        let mut retired = Vec::new();
        let mut kept = Vec::new();
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
            next.status = if r.status == KeyStatus::DecryptOnly {
                KeyStatus::Expired
            } else {
                next.wrapped = None;
                KeyStatus::Destroyed
            };
            next.retired_at = Some(format_us(now));
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
                });
            self.audit.record_with(event, ops)?;
            self.reload()?;
        }
        Ok(CleanupOutcome {
            retired,
            kept_in_use: kept,
            usage,
            active_count: self.current().active_count(),
        })
    }

    /// Writes the stored records (wrapped keys included: the master key
    /// protects them) to a new owner-only file in the backup dir.
    fn write_backup(&self, records: &[(u64, KeyRecord)]) -> Result<PathBuf, KeyRingError> {
        let err = |path: &Path, e: std::io::Error| KeyRingError::Backup {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.backup_dir)
            .map_err(|e| err(&self.backup_dir, e))?;
        let now = now_us();
        let backup = Backup {
            created_at: format_us(now),
            master_fingerprint: self.fingerprint.clone(),
            keys: records.iter().map(|(_, r)| r.clone()).collect(),
        };
        let body = serde_json::to_vec_pretty(&backup).map_err(|e| KeyRingError::Backup {
            path: self.backup_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let path = self.backup_dir.join(format!("keyring-{now:016}.json"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| err(&path, e))?;
        f.write_all(&body).map_err(|e| err(&path, e))?;
        f.sync_all().map_err(|e| err(&path, e))?;
        Ok(path)
    }

    /// Brings back keys missing from the store from a backup file. Each must
    /// unwrap under the current master key; restored keys are decrypt-only
    /// (the current primary stays primary).
    pub fn restore(
        &self,
        file: &Path,
        actor: &str,
        ip: Option<String>,
    ) -> Result<RestoreOutcome, KeyRingError> {
        let bad = |reason: String| KeyRingError::Backup {
            path: file.display().to_string(),
            reason,
        };
        let text = fs::read(file).map_err(|e| bad(e.to_string()))?;
        let backup: Backup = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("not a key-ring backup: {e}")))?;
        let _admin = self.admin.lock();
        let records = load_records(self.store.as_ref())?;
        let mut ops = Vec::new();
        let mut restored = Vec::new();
        let mut present = Vec::new();
        for mut r in backup.keys {
            if records.iter().any(|(_, s)| s.key_id == r.key_id) {
                present.push(r.key_id);
                continue;
            }
            let Some(w) = &r.wrapped else {
                continue;
            };
            if w.key_id != r.key_id || w.version != r.version {
                return Err(bad(format!("key {} is relabelled", r.key_id)));
            }
            self.master.unwrap(w).map_err(|_| {
                bad(format!(
                    "key {} does not open under ARAGORA_ENCRYPTION_KEY (another master key)",
                    r.key_id
                ))
            })?;
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
                Expect::Absent,
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
            active_count: self.current().active_count(),
        })
    }
}

/// `key_created`.
#[derive(Serialize)]
struct KeyCreated<'a> {
    key_id: &'a str,
    version: u32,
    reason: &'a str,
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
}

/// `key_ring_restored`.
#[derive(Serialize)]
struct RingRestored<'a> {
    file: String,
    restored: &'a [RestoredKey],
}

fn load_records(store: &dyn Store) -> Result<Vec<(u64, KeyRecord)>, StoreError> {
    let mut out = Vec::new();
    for_each_json::<KeyRecord>(store, Collection::KeyRing, |_, v, r| {
        out.push((v, r));
        Ok(())
    })?;
    out.sort_by_key(|(_, r)| r.version);
    Ok(out)
}

fn new_primary(
    master: &MasterKey,
    fingerprint: &str,
    version: u32,
) -> Result<(DataKey, KeyRecord), KeyRingError> {
    let key_id = new_key_id(version)?;
    let dek = DataKey::generate(key_id.clone(), version)?;
    let wrapped = master.wrap(&dek)?;
    let now = now_us();
    let expires = now + KEY_ROTATION_PERIOD_US;
    let rec = KeyRecord {
        key_id,
        version,
        status: KeyStatus::Active,
        primary: true,
        created_at: format_us(now),
        created_at_us: now,
        expires_at: format_us(expires),
        expires_at_us: expires,
        retired_at: None,
        master_fingerprint: Some(fingerprint.to_string()),
        wrapped: Some(wrapped),
    };
    Ok((dek, rec))
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

#[cfg(test)]
mod tests;
