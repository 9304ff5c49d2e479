//! What a key-ring operation can fail with, and how those failures map onto
//! the service errors the API reports.

use crate::audit::RecordError;
use crate::crypto::CryptoError;
use crate::error::ServiceError;
use crate::store::StoreError;

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
    /// The ring is sealed: the message names ARAGORA_ENCRYPTION_KEY and how
    /// to unseal.
    #[error("{0}")]
    Sealed(String),
    /// `aragora unseal` with a key that does not open the ring: refused, the
    /// ring stays sealed.
    #[error("{0}")]
    UnsealRefused(String),
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
            KeyRingError::Sealed(m) => ServiceError::Sealed(m),
            KeyRingError::Crypto(c @ CryptoError::Sealed { .. }) => c.into(),
            KeyRingError::UnsealRefused(m) => ServiceError::BadRequest(m),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}
