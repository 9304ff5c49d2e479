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
    /// The key ring is sealed: the operation needs a data key and none is
    /// usable until the master key is set (503 naming the variable and the
    /// way out; it does not pass by retrying).
    #[error("{0}")]
    Sealed(String),
    /// The store or the audit log failed in a way that may pass: 503, with
    /// the detail only in the log (it names store internals).
    #[error("{0}")]
    Backend(String),
    #[error("{0}")]
    Internal(String),
}

impl From<crate::crypto::CryptoError> for ServiceError {
    /// A crypto failure the caller did not handle itself: sealed is 503, the
    /// rest are the server's problem.
    fn from(e: crate::crypto::CryptoError) -> Self {
        match e {
            crate::crypto::CryptoError::Sealed { why } => ServiceError::Sealed(why),
            other => ServiceError::Internal(format!("encryption failed: {other}")),
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => ServiceError::Conflict(e.to_string()),
            // Admission control, a commit timeout, contention: nothing internal,
            // and what the client must know to back off (503, Retry-After).
            StoreError::Unavailable(reason) => {
                ServiceError::Unavailable(format!("the store is overloaded, retry later: {reason}"))
            }
            other => ServiceError::Internal(other.to_string()),
        }
    }
}
