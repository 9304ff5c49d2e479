//! Master key, data keys, and the record envelope (issue #8).
//!
//! Three layers, each with one job:
//!
//! - [`MasterKey`] (from `ARAGORA_ENCRYPTION_KEY`) only wraps and unwraps
//!   data keys, so rotating a data key never needs the operator's secret and a
//!   leaked data key exposes only the records under it.
//! - [`DataKey`] encrypts records into a self-describing envelope
//!   ([`encrypt`], [`decrypt`]). The envelope header names the key, so the
//!   reader looks up exactly that key ([`parse_header`], [`decrypt_with`]) and
//!   never falls back to "the current key": upstream's fallback turns a missing
//!   key into a confusing failure far from its cause, or worse, a silent one.
//! - [`kdf`] derives keys from passwords (PBKDF2) and sub-keys from keys (HKDF).
//!
//! # Hot path
//!
//! Each [`DataKey`] builds its `ring::aead::LessSafeKey` (the expanded AES key
//! schedule) once, at construction, and keeps it. Per record, [`encrypt`] costs
//! one 12-byte nonce from the OS, one output allocation and one seal;
//! [`decrypt`] costs one output allocation and one open. The AAD (header +
//! record id) is assembled on the stack unless the record id is unusually
//! long. Keep data keys alive (e.g. in the key ring behind an `Arc`) instead of
//! rebuilding them per record, which would redo the key expansion each time.
//!
//! ring does not zeroize its expanded key schedule on drop; the raw key bytes
//! we hold are zeroized. The master key therefore keeps no expanded schedule
//! at all: wrapping is rare, so it expands the key per call and drops it at
//! once.

mod envelope;
mod error;
pub mod kdf;
mod master;

pub use envelope::{
    DataKey, EnvelopeHeader, KEY_LEN, MAGIC, MAX_KEY_ID_LEN, NONCE_LEN, TAG_LEN, decrypt,
    decrypt_with, encrypt, envelope_len, parse_header,
};
pub use error::CryptoError;
pub use master::{MasterKey, WRAP_ALG, WrappedKey};
