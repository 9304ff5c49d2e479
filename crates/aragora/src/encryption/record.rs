//! The stored key records (`Collection::KeyRing`): their format, the status
//! lifecycle a key moves through, and creating a new primary. Kept apart from
//! the in-memory ring so boot, rotation and restore share one definition of
//! what is persisted.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::KeyRingError;
use super::views::KeyView;
use crate::clock::{format_us, now_us};
use crate::crypto::{CryptoError, DataKey, MasterKey, WrappedKey};
use crate::store::{Collection, Store, StoreError, for_each_json};

/// A primary key is due for rotation after this long (`--force` rotates
/// earlier).
pub const KEY_ROTATION_PERIOD_US: i64 = 90 * 86_400 * 1_000_000;

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
    /// `retired_at` as microseconds: when the key last changed status on its
    /// way out (the destroy grace counts from its move to `expired`). Absent
    /// in records written before the grace period existed.
    #[serde(default)]
    pub retired_at_us: Option<i64>,
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

fn new_key_id(version: u32) -> Result<String, KeyRingError> {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| CryptoError::Rng)?;
    Ok(format!("dk-v{version}-{}", hex::encode(b)))
}

/// Every stored key record with its store version, oldest key first.
pub(super) fn load_records(store: &dyn Store) -> Result<Vec<(u64, KeyRecord)>, StoreError> {
    let mut out = Vec::new();
    for_each_json::<KeyRecord>(store, Collection::KeyRing, |_, v, r| {
        out.push((v, r));
        Ok(())
    })?;
    out.sort_by_key(|(_, r)| r.version);
    Ok(out)
}

/// A fresh data key and its record as the new primary, wrapped under `master`.
pub(super) fn new_primary(
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
        retired_at_us: None,
        master_fingerprint: Some(fingerprint.to_string()),
        wrapped: Some(wrapped),
    };
    Ok((dek, rec))
}
