//! The error every domain service returns; `api` maps it to a status and a JSON
//! body naming what is wrong.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A job of its kind (or another) holds the slot: 409 naming it.
    #[error("{message}")]
    JobRunning {
        message: String,
        job_id: String,
        kind: &'static str,
    },
    /// Authentication failed; `reason` is the metric label.
    #[error("{message}")]
    Unauthorized {
        reason: &'static str,
        message: String,
    },
    #[error("permission denied: {permission} is required")]
    Forbidden { permission: String },
    #[error("{message}")]
    Blocked { message: String },
    #[error("{message}")]
    Locked {
        message: String,
        retry_after_secs: u64,
    },
    #[error("too many attempts from this address; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("{0}")]
    Unavailable(String),
    /// The store or the audit log failed in a way that may pass: 503, with
    /// the detail only in the log (it names store internals).
    #[error("{0}")]
    Backend(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => ServiceError::Conflict(e.to_string()),
            StoreError::Unavailable(_) => ServiceError::Backend(e.to_string()),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}
