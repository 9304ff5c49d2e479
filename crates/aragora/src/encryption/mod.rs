//! The key ring: data keys persisted in the store (wrapped by the master key),
//! unwrapped once at boot into memory for the hot path, rotated crash-safely.
//!
//! # Where things are
//!
//! - `record.rs`: the stored key records and their status lifecycle.
//! - `keyring.rs`: [`KeyRing`] in memory, boot, the hot-path encrypt/decrypt
//!   and the rotation gate.
//! - `lifecycle.rs`: rotate, cleanup of unused keys, restore from a backup.
//! - `master_rotation.rs`: rewrap the ring under a new master key
//!   (`aragora master-key rotate`), the previous one opening what is not
//!   rewrapped yet.
//! - `backup_files.rs`: the key-ring backup files.
//! - `stats.rs`: latency percentiles and per-actor decrypt windows.
//! - `views.rs`: the typed answers the endpoints and the CLI render.
//! - `collection.rs`: what encryption knows of a collection it encrypts.
//! - `migration/`: rewrapping every stored record under the primary.
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

mod backup_files;
pub mod collection;
mod error;
mod keyring;
mod lifecycle;
mod master_rotation;
pub mod migration;
mod record;
mod stats;
mod views;

pub use backup_files::{BACKUP_DIR, Backup};
pub use collection::{EncryptedCollection, Enveloped, JsonEnveloped};
pub use error::KeyRingError;
pub use keyring::KeyRing;
pub use master_rotation::{DEFAULT_REWRAP_BATCH, MasterRotation};
pub use record::{KEY_ROTATION_PERIOD_US, KeyRecord, KeyStatus};
pub use stats::DERIVATION_PROBE_INTERVAL;
pub use views::{
    ActorDecrypts, CleanupOutcome, EncryptionHealth, EncryptionStats, KeptKey, KeyCacheView,
    KeyView, KeysView, MasterRotationOutcome, RestoreOutcome, RestoredKey, RetiredKey,
    RotationOutcome, SealedView, UnsealOutcome, WaitingKey,
};

#[cfg(test)]
mod tests;
