//! Key-ring backup files under `data/keyring-backups/`: written before every
//! rotation, read back by `key-ring restore`. They hold the wrapped keys (the
//! master key already protects them), so a lost key-ring record can be
//! brought back without the key material ever being in the clear on disk.
//! Owner-only directory and files; a file is never overwritten.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::KeyRingError;
use super::record::KeyRecord;
use crate::clock::{format_us, now_us};

/// Where key-ring backups go, under the data dir.
pub const BACKUP_DIR: &str = "keyring-backups";

/// The backup file: the stored records, wrapped keys included.
#[derive(Debug, Serialize, Deserialize)]
pub struct Backup {
    pub created_at: String,
    pub master_fingerprint: String,
    pub keys: Vec<KeyRecord>,
}

/// Writes the stored records (wrapped keys included: the master key protects
/// them) to a new owner-only file in `dir`; returns its path.
pub(super) fn write(
    dir: &Path,
    master_fingerprint: &str,
    records: &[(u64, KeyRecord)],
) -> Result<PathBuf, KeyRingError> {
    let err = |path: &Path, e: std::io::Error| KeyRingError::Backup {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| err(dir, e))?;
    let now = now_us();
    let backup = Backup {
        created_at: format_us(now),
        master_fingerprint: master_fingerprint.to_string(),
        keys: records.iter().map(|(_, r)| r.clone()).collect(),
    };
    let body = serde_json::to_vec_pretty(&backup).map_err(|e| KeyRingError::Backup {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let path = dir.join(format!("keyring-{now:016}.json"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| err(&path, e))?;
    f.write_all(&body).map_err(|e| err(&path, e))?;
    f.sync_all().map_err(|e| err(&path, e))?;
    Ok(path)
}

/// Reads a backup file; an error names the file.
pub(super) fn read(file: &Path) -> Result<Backup, KeyRingError> {
    let text = fs::read(file).map_err(|e| invalid(file, e.to_string()))?;
    serde_json::from_slice(&text).map_err(|e| invalid(file, format!("not a key-ring backup: {e}")))
}

/// A backup file that cannot be used, and why.
pub(super) fn invalid(file: &Path, reason: String) -> KeyRingError {
    KeyRingError::Backup {
        path: file.display().to_string(),
        reason,
    }
}
