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
/// 2: user data lives in table files the manifest lists (`tables`); the
/// checkpoint holds only the catalog. A version 1 manifest (no tables, the whole
/// state in its checkpoint) still opens; the first checkpoint after it writes
/// every entry into tables and a version 2 manifest.
pub(crate) const FORMAT_VERSION: u32 = 2;
const OLDEST_FORMAT_VERSION: u32 = 1;

/// A table file holding user data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TableRef {
    pub id: u64,
    pub file: String,
    /// 0: a flush's changes; 1: a full rewrite (the bottom: no tombstones).
    pub level: u8,
    pub bytes: u64,
    /// SHA-256 of the whole file.
    pub sha256: String,
    pub entries: u64,
    /// Smallest and largest internal key (hex).
    pub first_key: String,
    pub last_key: String,
    pub min_seq: u64,
    pub max_seq: u64,
    /// Id of the checkpoint key the blocks are sealed under (absent: plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

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
    /// For a segment chained under another manifest key than the one signing
    /// this manifest (kept across a key rotation): that key's id...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_key_id: Option<String>,
    /// ...and the SHA-256 of the segment's bytes from its start to the end of its
    /// last frame, so the segment verifies without that key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
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
    /// Id of the manifest key that signs this manifest (absent when unsigned, and
    /// in manifests written before it existed): names the key in a mismatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_key_id: Option<String>,
    /// Version 2: the live table files, oldest first.
    #[serde(default)]
    pub tables: Vec<TableRef>,
    /// Version 2: ids below this one may have been used (never reused).
    #[serde(default)]
    pub next_table_id: u64,
}

fn signer(key: &SecretKey, label: &[u8]) -> ring::hmac::Key {
    crypto::hmac_key(key, label)
}

/// Which configured key verified a signed file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SignedBy {
    /// The file is `unsigned` (no manifest key configured).
    Unsigned,
    /// The current manifest key.
    Current,
    /// The manifest key being rotated away from.
    Previous,
}

/// Reads a signed two-line file (JSON body, then `hmac-sha256:<hex>` or `unsigned`)
/// and returns the verified body, accepting the current key or, during a manifest
/// key rotation, the previous one, and says which one verified; `Ok(None)` when the
/// file does not exist. A failure names the key id the file
/// records (when it records one) next to the configured ones, never a key.
pub(crate) fn read_signed_any(
    fs: &dyn Storage,
    path: &Path,
    key: Option<&SecretKey>,
    previous: Option<&SecretKey>,
    label: &[u8],
) -> Result<Option<(String, SignedBy)>, AedbError> {
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
    let by = match (key, sig.strip_prefix("hmac-sha256:")) {
        (Some(k), Some(hex_mac)) => {
            let mac = hex::decode(hex_mac).map_err(|_| bad("signature is not hex"))?;
            let verifies = |k: &SecretKey| {
                ring::hmac::verify(&signer(k, label), body.as_bytes(), &mac).is_ok()
            };
            if verifies(k) {
                SignedBy::Current
            } else if previous.is_some_and(verifies) {
                SignedBy::Previous
            } else {
                return Err(bad(&wrong_key_reason(&body, k, previous)));
            }
        }
        (Some(_), None) => return Err(bad("file is unsigned but a manifest key is configured")),
        (None, Some(_)) => return Err(bad("file is signed but no manifest key is configured")),
        (None, None) if sig == "unsigned" => SignedBy::Unsigned,
        (None, None) => return Err(bad("missing signature line")),
    };
    Ok(Some((body, by)))
}

/// Why a signature failed: the key id the (unverified) body records, when it
/// records one that no configured key has, or else the generic reason. Key ids
/// are public fingerprints (FORMAT.md, "Keys and derivation").
fn wrong_key_reason(body: &str, key: &SecretKey, previous: Option<&SecretKey>) -> String {
    let id = |k: &SecretKey| hex::encode(crypto::key_id(k));
    let recorded = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("manifest_key_id")?.as_str().map(str::to_string));
    match recorded {
        Some(r) if r != id(key) && previous.is_none_or(|p| r != id(p)) => format!(
            "signature does not verify: wrong manifest key (the file was signed under the manifest key with id {r}; the configured manifest key has id {}, the previous manifest key {})",
            id(key),
            previous.map_or_else(|| "is not set".to_string(), |p| format!("has id {}", id(p)))
        ),
        _ => "signature does not verify: wrong manifest key, or the file was edited".to_string(),
    }
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
    Ok(read_any(fs, dir, key, None)?.map(|(body, _)| body))
}

/// Reads and verifies the manifest under the current manifest key or, during a
/// rotation, the previous one (and says which); `Ok(None)` when there is none.
pub(crate) fn read_any(
    fs: &dyn Storage,
    dir: &Path,
    key: Option<&SecretKey>,
    previous: Option<&SecretKey>,
) -> Result<Option<(ManifestBody, SignedBy)>, AedbError> {
    let path = dir.join(MANIFEST_FILE);
    let Some((body, by)) = read_signed_any(fs, &path, key, previous, LABEL_MANIFEST)? else {
        return Ok(None);
    };
    let parsed: ManifestBody = serde_json::from_str(&body)
        .map_err(|e| AedbError::corruption(&path, 0, format!("unreadable body: {e}")))?;
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&parsed.format_version) {
        return Err(AedbError::corruption(
            &path,
            0,
            format!(
                "unsupported manifest format version {}",
                parsed.format_version
            ),
        ));
    }
    Ok(Some((parsed, by)))
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
