//! The manifest names the live checkpoint and WAL segments (with their digests and
//! chain heads) and is HMAC-SHA256 signed with a key derived from the manifest key.
//!
//! File `MANIFEST`: one line of JSON (the body), then one line `hmac-sha256:<hex>`
//! (or `unsigned` without a manifest key). The MAC covers the body bytes exactly as
//! stored. Replaced atomically: `MANIFEST.tmp`, fsync, rename, fsync directory.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::SecretKey;
use crate::crypto::{self, LABEL_MANIFEST};
use crate::error::AedbError;
use crate::storage::{OpenMode, Storage};
use crate::wal::writer::sync_dir;

pub(crate) const MANIFEST_FILE: &str = "MANIFEST";
pub(crate) const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CheckpointRef {
    pub file: String,
    pub lsn: u64,
    pub chain_head: String,
    pub digest: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SealedRef {
    pub last_lsn: u64,
    /// Chain hash of the segment's last frame: it commits to every frame in it.
    pub end_hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SegmentRef {
    pub file: String,
    pub index: u64,
    pub first_lsn: u64,
    /// None for the active segment (the last one).
    pub sealed: Option<SealedRef>,
}

/// The durable end of the log when the manifest was written: every frame up to
/// `lsn` had been fsynced (and possibly acknowledged), so recovery must find the log
/// reaching it with this chain hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DurableHeadRef {
    pub lsn: u64,
    pub chain_hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ManifestBody {
    pub format_version: u32,
    /// Increases with every rewrite.
    pub generation: u64,
    pub checkpoint: Option<CheckpointRef>,
    pub segments: Vec<SegmentRef>,
    pub keyed_chain: bool,
    pub checkpoint_key_id: Option<String>,
    /// End LSN of the last backup: WAL after it is kept for the next incremental.
    #[serde(default)]
    pub backup_floor_lsn: Option<u64>,
    /// Absent in manifests written before it existed, and in a restore's first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable_head: Option<DurableHeadRef>,
}

fn signer(key: &SecretKey, label: &[u8]) -> ring::hmac::Key {
    crypto::hmac_key(key, label)
}

/// Reads a signed two-line file (JSON body, then `hmac-sha256:<hex>` or `unsigned`)
/// and returns the verified body; `Ok(None)` when the file does not exist.
pub(crate) fn read_signed(
    fs: &dyn Storage,
    path: &Path,
    key: Option<&SecretKey>,
    label: &[u8],
) -> Result<Option<String>, AedbError> {
    let bad = |reason: &str| AedbError::corruption(path, 0, reason);
    let text = match fs.read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AedbError::io(path, e)),
    };
    let text = String::from_utf8(text).map_err(|_| bad("not UTF-8"))?;
    let mut lines = text.split('\n');
    let body = lines.next().unwrap_or_default().to_string();
    let sig = lines.next().unwrap_or_default();
    if lines.any(|l| !l.is_empty()) {
        return Err(bad("unexpected content after the signature line"));
    }
    match (key, sig.strip_prefix("hmac-sha256:")) {
        (Some(k), Some(hex_mac)) => {
            let mac = hex::decode(hex_mac).map_err(|_| bad("signature is not hex"))?;
            ring::hmac::verify(&signer(k, label), body.as_bytes(), &mac).map_err(|_| {
                bad("signature does not verify: wrong manifest key, or the file was edited")
            })?;
        }
        (Some(_), None) => return Err(bad("file is unsigned but a manifest key is configured")),
        (None, Some(_)) => return Err(bad("file is signed but no manifest key is configured")),
        (None, None) if sig == "unsigned" => {}
        (None, None) => return Err(bad("missing signature line")),
    }
    Ok(Some(body))
}

/// Signs `json` and replaces `path` atomically (temp file, fsync, rename, fsync dir).
pub(crate) fn write_signed(
    fs: &dyn Storage,
    path: &Path,
    json: &str,
    key: Option<&SecretKey>,
    label: &[u8],
) -> Result<(), AedbError> {
    let sig = match key {
        Some(k) => format!(
            "hmac-sha256:{}",
            hex::encode(ring::hmac::sign(&signer(k, label), json.as_bytes()).as_ref())
        ),
        None => "unsigned".to_string(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    fs.open(&tmp, OpenMode::Create)
        .and_then(|f| {
            f.write_all_at(format!("{json}\n{sig}\n").as_bytes(), 0)?;
            f.sync_all()
        })
        .map_err(|e| AedbError::io(&tmp, e))?;
    fs.rename(&tmp, path).map_err(|e| AedbError::io(path, e))?;
    sync_dir(fs, dir)
}

/// Reads and verifies the manifest; `Ok(None)` when there is none.
pub(crate) fn read(
    fs: &dyn Storage,
    dir: &Path,
    key: Option<&SecretKey>,
) -> Result<Option<ManifestBody>, AedbError> {
    let path = dir.join(MANIFEST_FILE);
    let Some(body) = read_signed(fs, &path, key, LABEL_MANIFEST)? else {
        return Ok(None);
    };
    let parsed: ManifestBody = serde_json::from_str(&body)
        .map_err(|e| AedbError::corruption(&path, 0, format!("unreadable body: {e}")))?;
    if parsed.format_version != FORMAT_VERSION {
        return Err(AedbError::corruption(
            &path,
            0,
            format!(
                "unsupported manifest format version {}",
                parsed.format_version
            ),
        ));
    }
    Ok(Some(parsed))
}

/// Signs and atomically replaces the manifest.
pub(crate) fn write(
    fs: &dyn Storage,
    dir: &Path,
    body: &ManifestBody,
    key: Option<&SecretKey>,
) -> Result<(), AedbError> {
    let json = serde_json::to_string(body)
        .map_err(|e| AedbError::InvalidArgument(format!("manifest encoding: {e}")))?;
    write_signed(fs, &dir.join(MANIFEST_FILE), &json, key, LABEL_MANIFEST)
}
