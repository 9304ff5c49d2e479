//! The typed views the key ring answers with: what the encryption endpoints
//! and the CLI render, and what the OpenAPI document describes. Plain data,
//! no behaviour, so handlers and the CLI depend on these and not on the ring.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::record::KeyStatus;

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
    /// `healthy`; `critical` when no key can decrypt; `sealed` when the
    /// master key is missing or does not open the key ring.
    pub status: String,
    /// The master key is set and opens the key ring.
    pub master_key_loaded: bool,
    /// The primary data key (`null` while sealed).
    pub active_key_id: Option<String>,
    /// Usable active data keys (0 while sealed).
    pub active_keys: usize,
    /// No data key is usable until the master key is set (restart with it,
    /// or `aragora unseal`).
    pub sealed: bool,
    /// While sealed: `missing_key` or `wrong_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_reason: Option<String>,
    /// While sealed: what is wrong and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Why the key ring is sealed (nothing secret).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SealedView {
    /// `missing_key` or `wrong_key`.
    pub reason: String,
    /// What is wrong and what to do (names ARAGORA_ENCRYPTION_KEY).
    pub message: String,
}

/// `aragora unseal`: the key ring opened under the key given.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct UnsealOutcome {
    /// `false` when it was already unsealed with this key.
    pub unsealed: bool,
    pub primary_key_id: String,
    pub active_keys: usize,
    pub message: String,
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
    /// `null` while the key ring is sealed.
    pub primary_key_id: Option<String>,
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
    /// p95 of the PBKDF2 derivations timed over the last hour (one every
    /// 30 s while the server runs): high means CPU contention now.
    pub derivation_latency_p95: f64,
    pub derivation_iterations: u32,
    /// Derivations behind `derivation_latency_p95` (1 just after boot).
    pub derivation_samples: usize,
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

/// An expired key `cleanup_expired` will destroy on a run after its grace.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct WaitingKey {
    pub key_id: String,
    pub destroy_after: String,
}

/// What `key-rotation --cleanup-expired` did.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CleanupOutcome {
    pub retired: Vec<RetiredKey>,
    pub kept_in_use: Vec<KeptKey>,
    /// Expired keys within ARAGORA_KEY_DESTROY_GRACE: not destroyed yet.
    #[serde(default)]
    pub waiting_to_be_destroyed: Vec<WaitingKey>,
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

/// `aragora master-key rotate`: what was (or, with `--dry-run`, would be)
/// rewrapped under the current master key.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MasterRotationOutcome {
    pub dry_run: bool,
    /// Fingerprint of ARAGORA_ENCRYPTION_KEY (public; not the key).
    pub master_fingerprint: String,
    /// Fingerprint of ARAGORA_ENCRYPTION_KEY_PREVIOUS, when set.
    pub previous_fingerprint: Option<String>,
    /// Key records holding key material.
    pub total: usize,
    /// Rewrapped now (or, in a dry run, would be).
    pub rewrapped: usize,
    /// Already under the current master key: skipped (a rerun skips what an
    /// interrupted run finished).
    pub already_current: usize,
    /// Destroyed keys: nothing to rewrap.
    pub without_material: usize,
    /// The store writes the rewrap took (compare-and-set per record).
    pub batches: usize,
    /// The key-ring backup written before the first change.
    pub backup: Option<String>,
    /// The approval request this run executed, if one was given.
    pub approval_id: Option<String>,
    pub message: String,
}
