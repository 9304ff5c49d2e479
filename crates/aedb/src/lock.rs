//! One process per data directory: an exclusive `flock` on `LOCK`, holding our pid
//! so the error for a second opener can say who has it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::AedbError;

pub(crate) const LOCK_FILE: &str = "LOCK";

#[derive(Debug)]
pub(crate) struct DirLock {
    // Dropping the file releases the lock. None: an inspection of a directory that
    // has no LOCK file (nothing can hold it, and inspection creates no file).
    _file: Option<File>,
}

impl DirLock {
    /// Takes the lock, writing our pid into it when `record_pid` (the engine); the
    /// CLI's read-only inspections take it without rewriting the file.
    pub fn acquire(dir: &Path, record_pid: bool) -> Result<Self, AedbError> {
        let path = dir.join(LOCK_FILE);
        if !record_pid && !path.exists() {
            return Ok(Self { _file: None });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(record_pid)
            .create(record_pid)
            .truncate(false)
            .open(&path)
            .map_err(|e| AedbError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(AedbError::Locked {
                    dir: dir.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".to_string()
                    } else {
                        pid.to_string()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(AedbError::io(&path, e)),
        }
        if record_pid {
            let pid = std::process::id().to_string();
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
                .and_then(|()| file.write_all(pid.as_bytes()))
                .map_err(|e| AedbError::io(&path, e))?;
        }
        Ok(Self { _file: Some(file) })
    }
}
