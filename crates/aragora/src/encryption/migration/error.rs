//! What a migration can fail with, and how that maps onto the API's errors.

use crate::audit::RecordError;
use crate::crypto::CryptoError;
use crate::error::ServiceError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration: {0}")]
    Store(#[from] StoreError),
    #[error("migration: {0}")]
    Crypto(#[from] CryptoError),
    #[error("migration: audit log: {0}")]
    Audit(String),
    #[error(
        "a migration is already running in this server; see GET /api/security/migration/status"
    )]
    Busy,
    #[error("migration stopped after {0} batches (test stop); rerun to resume")]
    Stopped(u64),
    #[error("{0}")]
    Invalid(String),
}

impl From<RecordError> for MigrationError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Ops(s) => MigrationError::Store(s),
            RecordError::Audit(a) => MigrationError::Audit(a.to_string()),
        }
    }
}

impl From<MigrationError> for ServiceError {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::Store(s) => s.into(),
            MigrationError::Audit(a) => ServiceError::Unavailable(a),
            MigrationError::Busy => ServiceError::Conflict(e.to_string()),
            MigrationError::Invalid(m) => ServiceError::BadRequest(m),
            MigrationError::Crypto(c @ CryptoError::Sealed { .. }) => c.into(),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}
