//! Checkpoint files: the full state at one LSN, zstd-compressed, then (with a
//! checkpoint key) AES-256-GCM encrypted in 1 MiB chunks.
//!
//! Header (256 bytes): 0..8 magic "AEDBCKP\0" | 8..12 version | 12..16 flags (bit 0:
//! encrypted) | 16..24 LSN | 24..56 chain head at LSN | 56..64 key id | 64..96 salt |
//! 96..104 body length | 104..136 SHA-256 of the body | 136..252 reserved |
//! 252..256 CRC32C of bytes 0..252.
//! Body: chunks, each `u32 length || bytes`; encrypted chunks are ciphertext || tag
//! under HKDF(key, salt, "aedb checkpoint v1") with nonce = chunk index and AAD =
//! header bytes 0..96 || chunk index || last-chunk flag, so chunks cannot be
//! reordered, dropped or moved to another file.

mod items;

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::SecretKey;
use crate::crypto::{self, Aead, LABEL_CHECKPOINT, counter_nonce};
use crate::error::AedbError;
use crate::model::state::DbState;
use crate::storage::{OpenMode, SeqFile, Storage};
use crate::wal::format::ChainHash;
use crate::wal::writer::sync_dir;

pub(crate) use items::{IdempotencyEntry, LoadedState};

const MAGIC: &[u8; 8] = b"AEDBCKP\0";
/// 2: idempotency records carry the writes digest. Version 1 files still read.
const VERSION: u32 = 2;
const FLAG_ENCRYPTED: u32 = 1;
pub(crate) const HEADER_LEN: usize = 256;
const AAD_HEADER_LEN: usize = 96;
const CHUNK: usize = 1 << 20;
/// Upper bound on one stored chunk: a corrupt length must not make us allocate.
const MAX_STORED_CHUNK: usize = CHUNK + 64;

/// What the manifest records about a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CheckpointMeta {
    pub file: String,
    pub lsn: u64,
    pub chain_head: ChainHash,
    /// SHA-256(header || SHA-256(body)): identifies the exact file.
    pub digest: [u8; 32],
    pub bytes: u64,
    /// Id of the checkpoint key it is encrypted with (zero when not encrypted).
    pub key_id: [u8; 8],
}

/// `checkpoint-{lsn:020}.ckpt`, or `checkpoint-{lsn:020}-{unique}.ckpt` when that is
/// the name of the live checkpoint `live`: a checkpoint is written next to the live
/// one, never over it, because the manifest keeps naming the live file (with its
/// digest) until it is rewritten. Replacing it first would leave, after a crash in
/// between, a manifest whose checkpoint no longer matches and an older WAL already
/// removed. `unique` must differ from the suffix of `live` (the next manifest
/// generation does).
pub(crate) fn file_name(lsn: u64, live: Option<&str>, unique: u64) -> String {
    let plain = format!("checkpoint-{lsn:020}.ckpt");
    if live == Some(plain.as_str()) {
        format!("checkpoint-{lsn:020}-{unique}.ckpt")
    } else {
        plain
    }
}

/// The LSN in a checkpoint file name (either form of `file_name`).
pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let d = name.strip_prefix("checkpoint-")?.strip_suffix(".ckpt")?;
    let (lsn, unique) = match d.split_once('-') {
        Some((lsn, unique)) => (lsn, Some(unique)),
        None => (d, None),
    };
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    if lsn.len() != 20 || !digits(lsn, 20) || unique.is_some_and(|u| !digits(u, 20)) {
        return None;
    }
    lsn.parse().ok()
}

struct Header {
    flags: u32,
    lsn: u64,
    chain_head: ChainHash,
    key_id: [u8; 8],
    salt: [u8; 32],
    body_len: u64,
    body_sha: [u8; 32],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.lsn.to_le_bytes());
        b[24..56].copy_from_slice(&self.chain_head);
        b[56..64].copy_from_slice(&self.key_id);
        b[64..96].copy_from_slice(&self.salt);
        b[96..104].copy_from_slice(&self.body_len.to_le_bytes());
        b[104..136].copy_from_slice(&self.body_sha);
        let crc = crc32c::crc32c(&b[0..252]);
        b[252..256].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER_LEN {
            return Err(format!("file shorter than its {HEADER_LEN}-byte header"));
        }
        if &b[0..8] != MAGIC {
            return Err("bad magic (not an aedb checkpoint)".into());
        }
        let crc = u32::from_le_bytes([b[252], b[253], b[254], b[255]]);
        if crc32c::crc32c(&b[0..252]) != crc {
            return Err("header checksum mismatch".into());
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if !(1..=VERSION).contains(&version) {
            return Err(format!("unsupported checkpoint version {version}"));
        }
        let arr32 = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 32];
            a.copy_from_slice(&b[r]);
            a
        };
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&b[56..64]);
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        Ok(Self {
            flags: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            lsn: u64_at(16),
            chain_head: arr32(24..56),
            key_id,
            salt: arr32(64..96),
            body_len: u64_at(96),
            body_sha: arr32(104..136),
        })
    }
}

fn chunk_aad(header_prefix: &[u8], index: u64, last: bool) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_HEADER_LEN + 9);
    aad.extend_from_slice(header_prefix);
    aad.extend_from_slice(&index.to_le_bytes());
    aad.push(u8::from(last));
    aad
}

/// Splits the compressed stream into chunks, encrypting each when a key is set.
struct ChunkSink<'a> {
    /// Told the body bytes written so far, after each chunk.
    progress: &'a mut dyn FnMut(u64),
    out: BufWriter<SeqFile>,
    path: PathBuf,
    aead: Option<Aead>,
    aad_prefix: Vec<u8>,
    buf: Vec<u8>,
    index: u64,
    body_len: u64,
    body_sha: Sha256,
    scratch: Vec<u8>,
}

impl ChunkSink<'_> {
    fn emit(&mut self, last: bool) -> std::io::Result<()> {
        self.scratch.clear();
        let take = self.buf.len().min(CHUNK);
        match &self.aead {
            Some(a) => a
                .seal_with(
                    counter_nonce(self.index),
                    &chunk_aad(&self.aad_prefix, self.index, last),
                    &self.buf[..take],
                    &mut self.scratch,
                )
                .map_err(std::io::Error::other)?,
            None => self.scratch.extend_from_slice(&self.buf[..take]),
        }
        let len = (self.scratch.len() as u32).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&self.scratch)?;
        self.body_sha.update(len);
        self.body_sha.update(&self.scratch);
        self.body_len += 4 + self.scratch.len() as u64;
        self.buf.drain(..take);
        self.index += 1;
        (self.progress)(self.body_len);
        Ok(())
    }
}

impl Write for ChunkSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        // Emit only when more data than a chunk is buffered: the final chunk must
        // be emitted by `finish` with its last flag.
        while self.buf.len() > CHUNK {
            self.emit(false)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes a checkpoint of `state` (chain head `chain_head` at `state.seq`) into
/// `dir/name` crash-safely: temp file, fsync, rename, fsync directory. `name` comes
/// from `file_name` and is never the live checkpoint's.
// The storage joined the existing seven; grouping them would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write(
    fs: &dyn Storage,
    dir: &Path,
    name: &str,
    state: &DbState,
    idempotency: &[IdempotencyEntry],
    chain_head: ChainHash,
    key: Option<&SecretKey>,
    progress: &mut dyn FnMut(u64),
) -> Result<CheckpointMeta, AedbError> {
    let name = name.to_string();
    let path = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    let io = |e: std::io::Error| AedbError::io(&tmp, e);
    let salt = crypto::random_bytes::<32>()?;
    let mut header = Header {
        flags: if key.is_some() { FLAG_ENCRYPTED } else { 0 },
        lsn: state.seq,
        chain_head,
        key_id: key.map(crypto::key_id).unwrap_or_default(),
        salt,
        body_len: 0,
        body_sha: [0; 32],
    };
    let aad_prefix = header.encode()[..AAD_HEADER_LEN].to_vec();
    let file = SeqFile::new(fs.open(&tmp, OpenMode::Create).map_err(io)?);
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&[0u8; HEADER_LEN]).map_err(io)?;
    let sink = ChunkSink {
        progress,
        out,
        path: tmp.clone(),
        aead: key.map(|k| Aead::new(k, &salt, LABEL_CHECKPOINT)),
        aad_prefix,
        buf: Vec::with_capacity(CHUNK + 64 * 1024),
        index: 0,
        body_len: 0,
        body_sha: Sha256::new(),
        scratch: Vec::with_capacity(CHUNK + 64),
    };
    let mut z = zstd::Encoder::new(sink, 1).map_err(io)?;
    items::write_items(&mut z, state, idempotency).map_err(io)?;
    let mut sink = z.finish().map_err(io)?;
    sink.emit(true).map_err(io)?;
    while !sink.buf.is_empty() {
        sink.emit(true).map_err(io)?;
    }
    let file = sink
        .out
        .into_inner()
        .map_err(|e| AedbError::io(&sink.path, e.into_error()))?;
    header.body_len = sink.body_len;
    header.body_sha = sink.body_sha.finalize().into();
    let encoded = header.encode();
    file.file.write_all_at(&encoded, 0).map_err(io)?;
    file.file.sync_all().map_err(io)?;
    drop(file);
    fs.rename(&tmp, &path)
        .map_err(|e| AedbError::io(&path, e))?;
    sync_dir(fs, dir)?;
    Ok(CheckpointMeta {
        file: name,
        lsn: state.seq,
        chain_head,
        digest: file_digest(&encoded, &header.body_sha),
        bytes: HEADER_LEN as u64 + header.body_len,
        key_id: header.key_id,
    })
}

fn file_digest(header: &[u8], body_sha: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(header);
    h.update(body_sha);
    h.finalize().into()
}

/// Reads and fully verifies the checkpoint at `path`, trying `keys` (current key
/// first) by key id. Every failure names the file.
pub(crate) fn read(
    fs: &dyn Storage,
    path: &Path,
    keys: &[&SecretKey],
) -> Result<(LoadedState, CheckpointMeta), AedbError> {
    let corrupt = |offset: u64, reason: String| AedbError::corruption(path, offset, reason);
    let file = fs
        .open(path, OpenMode::Read)
        .map_err(|e| AedbError::io(path, e))?;
    let len = file.len().map_err(|e| AedbError::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 20, SeqFile::new(file));
    let mut hb = [0u8; HEADER_LEN];
    r.read_exact(&mut hb)
        .map_err(|_| corrupt(0, format!("file shorter than its {HEADER_LEN}-byte header")))?;
    let header = Header::decode(&hb).map_err(|e| corrupt(0, e))?;
    if HEADER_LEN as u64 + header.body_len != len {
        return Err(corrupt(
            len,
            format!(
                "file is {len} bytes, header says {} (truncated or extended)",
                HEADER_LEN as u64 + header.body_len
            ),
        ));
    }
    let aead = if header.flags & FLAG_ENCRYPTED != 0 {
        let key = keys
            .iter()
            .find(|k| crypto::key_id(k) == header.key_id)
            .ok_or_else(|| AedbError::KeyMismatch {
                file: path.to_path_buf(),
                reason: format!(
                    "checkpoint is encrypted with key id {}, configured key ids are [{}]",
                    hex::encode(header.key_id),
                    keys.iter()
                        .map(|k| hex::encode(crypto::key_id(k)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        Some(Aead::new(key, &header.salt, LABEL_CHECKPOINT))
    } else {
        None
    };
    let source = ChunkSource {
        r,
        aead,
        aad_prefix: hb[..AAD_HEADER_LEN].to_vec(),
        index: 0,
        offset: HEADER_LEN as u64,
        end: len,
        plain: Vec::new(),
        pos: 0,
        done: false,
        sha: Sha256::new(),
        error: None,
    };
    let mut z = zstd::Decoder::new(source).map_err(|e| AedbError::io(path, e))?;
    let mut loaded = items::read_items(&mut z, header.lsn);
    // Drain the compressed frame to its end (epilogue and checksum): nothing may
    // follow the End item.
    let mut after_end = Vec::new();
    if loaded.is_ok() {
        match z.read_to_end(&mut after_end) {
            Ok(_) if after_end.is_empty() => {}
            Ok(_) => loaded = Err("data after the End item".to_string()),
            Err(e) => loaded = Err(format!("compressed stream: {e}")),
        }
    }
    let buffered = z.finish();
    let trailing_buffered = buffered.buffer().len();
    let mut source = buffered.into_inner();
    if let Some((offset, reason)) = source.error.take() {
        return Err(corrupt(offset, reason));
    }
    let loaded =
        loaded.map_err(|e| corrupt(HEADER_LEN as u64, format!("undecodable contents: {e}")))?;
    // The whole body must have been consumed and authenticated, including the
    // final chunk; trailing data or a missing last chunk is tampering.
    let mut rest = Vec::new();
    let _ = source.read_to_end(&mut rest);
    if let Some((offset, reason)) = source.error.take() {
        return Err(corrupt(offset, reason));
    }
    if !source.done || !rest.is_empty() || trailing_buffered > 0 {
        return Err(corrupt(
            source.offset,
            format!(
                "data after the end of the checkpoint contents (final chunk read: {}, {} bytes left)",
                source.done,
                rest.len() + trailing_buffered
            ),
        ));
    }
    let body_sha: [u8; 32] = source.sha.finalize().into();
    if header.flags & FLAG_ENCRYPTED == 0 && body_sha != header.body_sha {
        return Err(corrupt(HEADER_LEN as u64, "body checksum mismatch".into()));
    }
    let meta = CheckpointMeta {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        lsn: header.lsn,
        chain_head: header.chain_head,
        digest: file_digest(&hb, &body_sha),
        bytes: len,
        key_id: header.key_id,
    };
    Ok((loaded, meta))
}

/// Reads chunks back, authenticating each, and records the first problem.
struct ChunkSource {
    r: BufReader<SeqFile>,
    aead: Option<Aead>,
    aad_prefix: Vec<u8>,
    index: u64,
    offset: u64,
    end: u64,
    plain: Vec<u8>,
    pos: usize,
    done: bool,
    sha: Sha256,
    error: Option<(u64, String)>,
}

impl ChunkSource {
    fn next_chunk(&mut self) -> Result<(), (u64, String)> {
        let at = self.offset;
        if at + 4 > self.end {
            return Err((
                at,
                "checkpoint ends without its final chunk (truncated)".into(),
            ));
        }
        let mut lb = [0u8; 4];
        self.r
            .read_exact(&mut lb)
            .map_err(|e| (at, format!("read failed: {e}")))?;
        let n = u32::from_le_bytes(lb) as usize;
        if n > MAX_STORED_CHUNK || at + 4 + n as u64 > self.end {
            return Err((
                at,
                format!("chunk length {n} is impossible here (truncated or corrupt)"),
            ));
        }
        let mut stored = vec![0u8; n];
        self.r
            .read_exact(&mut stored)
            .map_err(|e| (at, format!("read failed: {e}")))?;
        self.sha.update(lb);
        self.sha.update(&stored);
        self.offset += 4 + n as u64;
        let last = self.offset == self.end;
        self.plain = match &self.aead {
            Some(a) => {
                if stored.len() < crypto::TAG_LEN {
                    return Err((at, "chunk shorter than its authentication tag".into()));
                }
                let (ct, tag) = stored.split_at(stored.len() - crypto::TAG_LEN);
                let mut sealed = ct.to_vec();
                sealed.extend_from_slice(tag);
                a.open_with(
                    counter_nonce(self.index),
                    &chunk_aad(&self.aad_prefix, self.index, last),
                    &sealed,
                )
                .ok_or_else(|| {
                    (
                        at,
                        format!(
                            "chunk {} fails authentication (wrong key, or the file was modified)",
                            self.index
                        ),
                    )
                })?
            }
            None => stored,
        };
        self.pos = 0;
        self.index += 1;
        self.done = last;
        Ok(())
    }
}

impl Read for ChunkSource {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done || self.error.is_some() {
                return Ok(0);
            }
            if let Err(e) = self.next_chunk() {
                self.error = Some(e.clone());
                return Err(std::io::Error::other(e.1));
            }
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Checkpoint files in `dir` by LSN.
pub(crate) fn list(fs: &dyn Storage, dir: &Path) -> Result<Vec<(u64, PathBuf)>, AedbError> {
    let mut out = Vec::new();
    for entry in fs.list_dir(dir).map_err(|e| AedbError::io(dir, e))? {
        if let Some(lsn) = parse_file_name(&entry.name) {
            out.push((lsn, dir.join(&entry.name)));
        }
    }
    out.sort();
    Ok(out)
}
