//! One process per data directory: an exclusive `flock` on `LOCK`, holding our pid
//! so the error for a second opener can say who has it.

use std::path::Path;

use crate::error::AedbError;
use crate::storage::{LockAttempt, Storage};

pub(crate) const LOCK_FILE: &str = "LOCK";

pub(crate) struct DirLock {
    // Dropping the guard releases the lock. None: an inspection of a directory that
    // has no LOCK file (nothing can hold it, and inspection creates no file).
    _guard: Option<Box<dyn Send + Sync + std::panic::RefUnwindSafe + std::panic::UnwindSafe>>,
}

impl std::fmt::Debug for DirLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirLock")
            .field("held", &self._guard.is_some())
            .finish()
    }
}

impl DirLock {
    /// Takes the lock, writing our pid into it when `record_pid` (the engine); the
    /// CLI's read-only inspections take it without rewriting the file.
    pub fn acquire(fs: &dyn Storage, dir: &Path, record_pid: bool) -> Result<Self, AedbError> {
        let path = dir.join(LOCK_FILE);
        if !record_pid && !fs.exists(&path) {
            return Ok(Self { _guard: None });
        }
        match fs
            .try_lock(&path, record_pid)
            .map_err(|e| AedbError::io(&path, e))?
        {
            LockAttempt::Held(guard) => Ok(Self {
                _guard: Some(guard),
            }),
            LockAttempt::Busy { holder } => {
                let pid = holder.trim();
                Err(AedbError::Locked {
                    dir: dir.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".to_string()
                    } else {
                        pid.to_string()
                    },
                })
            }
        }
    }
}
