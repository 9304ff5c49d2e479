//! The byte layout of a table file (see FORMAT.md, "Table files").
//!
//! ```text
//! data block 0 | data block 1 | ... | data block n-1 | index block | bloom block | footer (160)
//! ```
//!
//! Every block is sealed: AES-256-GCM (`ciphertext || tag`) under the table's own key,
//! HKDF(data key, footer salt, "aedb table v1"), with nonce = block number (data blocks
//! 0..n, the index block n, the bloom block n+1), so no (key, nonce) pair repeats: the
//! salt is fresh per file and each number is used once in it. Without a data key a
//! block is `plaintext || CRC32C(aad || plaintext)`. The associated data binds the
//! table id, block kind, number and offset, so a block moved, swapped or copied from
//! another table fails; the index and bloom blocks also bind the footer (bytes
//! 0..156), which authenticates it under the key.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use crate::config::SecretKey;
use crate::crypto::{self, Aead, KEY_ID_LEN, TAG_LEN, counter_nonce};

use super::error::{BlockId, TableName};

pub(crate) const MAGIC: &[u8; 8] = b"AEDBTBL\0";
pub(crate) const VERSION: u32 = 1;
pub(crate) const FLAG_ENCRYPTED: u32 = 1;
pub(crate) const FOOTER_LEN: usize = 160;
/// The footer bytes the CRC (and the index and bloom blocks' AAD) cover.
const FOOTER_BODY_LEN: usize = FOOTER_LEN - 4;
pub(crate) const SALT_LEN: usize = 32;
/// HKDF label of the per-table key (checkpoint key, table salt).
pub(crate) const LABEL_TABLE: &[u8] = b"aedb table v1";

pub(crate) const DEFAULT_BLOCK_BYTES: usize = 16 * 1024;
/// Limits the engine's own (`Limits::max_key_bytes` <= 64 KiB, values below 2 GiB).
pub(crate) const MAX_KEY_BYTES: usize = 64 * 1024;
pub(crate) const MAX_VALUE_BYTES: usize = (u32::MAX / 2) as usize;
/// Sequence numbers are LSNs, at most i64::MAX (FORMAT.md, "past the largest LSN").
pub(crate) const MAX_SEQ: u64 = i64::MAX as u64;
/// Upper bounds a reader checks before allocating for the index and bloom blocks (a
/// damaged footer must not make it allocate gigabytes).
pub(crate) const MAX_META_BLOCK_BYTES: u64 = 256 << 20;
/// The largest stored data block: one entry of the largest key and value plus the
/// block's framing and seal.
pub(crate) const MAX_DATA_BLOCK_BYTES: u64 =
    (MAX_KEY_BYTES + MAX_VALUE_BYTES + ENTRY_HEADER_LEN + 64) as u64;
/// Per entry in a data block: key length (4), seq (8), kind (1), value length (4).
pub(crate) const ENTRY_HEADER_LEN: usize = 17;

/// `table-{id:016}.tbl`; written as `<name>.tmp` first (deleted at open, like every
/// `*.tmp`).
pub(crate) fn file_name(id: u64) -> String {
    format!("table-{id:016}.tbl")
}

pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("table-")?.strip_suffix(".tbl")?;
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn tmp_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{}.tmp", file_name(id)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum EntryKind {
    Put,
    Delete,
}

impl EntryKind {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Self::Put => 1,
            Self::Delete => 2,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Put),
            2 => Some(Self::Delete),
            _ => None,
        }
    }
}

/// One version of one user key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub key: Vec<u8>,
    pub seq: u64,
    pub kind: EntryKind,
    /// Empty for a `Delete`.
    pub value: Vec<u8>,
}

impl Entry {
    pub(crate) fn cmp_internal(&self, other: &Entry) -> Ordering {
        cmp_internal(&self.key, self.seq, &other.key, other.seq)
    }
}

/// Internal-key order: user key ascending, then sequence number descending, so the
/// newest version of a key comes first and "the newest at or before snapshot S" is
/// the first entry at or after `(key, S)`.
pub(crate) fn cmp_internal(a_key: &[u8], a_seq: u64, b_key: &[u8], b_seq: u64) -> Ordering {
    a_key.cmp(b_key).then(b_seq.cmp(&a_seq))
}

/// The plain footer. Its CRC detects damage; the index and bloom blocks' AAD bind
/// its bytes, so an edit that fixes up the CRC still fails authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Footer {
    pub flags: u32,
    pub table_id: u64,
    pub key_id: [u8; KEY_ID_LEN],
    pub salt: [u8; SALT_LEN],
    pub index_offset: u64,
    pub index_len: u64,
    pub bloom_offset: u64,
    pub bloom_len: u64,
    pub entries: u64,
    pub min_seq: u64,
    pub max_seq: u64,
    pub data_blocks: u64,
}

impl Footer {
    pub(crate) fn encrypted(&self) -> bool {
        self.flags & FLAG_ENCRYPTED != 0
    }

    /// 0..8 magic | 8..12 version | 12..16 flags | 16..24 table id | 24..32 key id |
    /// 32..64 salt | 64..72 index offset | 72..80 index length | 80..88 bloom offset |
    /// 88..96 bloom length | 96..104 entries | 104..112 min seq | 112..120 max seq |
    /// 120..128 data blocks | 128..156 reserved (zero) | 156..160 CRC32C of 0..156.
    pub(crate) fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.table_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.key_id);
        b[32..64].copy_from_slice(&self.salt);
        for (at, v) in [
            (64, self.index_offset),
            (72, self.index_len),
            (80, self.bloom_offset),
            (88, self.bloom_len),
            (96, self.entries),
            (104, self.min_seq),
            (112, self.max_seq),
            (120, self.data_blocks),
        ] {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..FOOTER_BODY_LEN]);
        b[FOOTER_BODY_LEN..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks the footer of a file `file_len` bytes long: magic, CRC,
    /// version, flags, reserved bytes, and a layout that adds up exactly (data
    /// blocks, then index, then bloom, then the footer at the end).
    pub(crate) fn decode(b: &[u8], file_len: u64) -> Result<Self, String> {
        if b.len() != FOOTER_LEN {
            return Err(format!("{} bytes, expected {FOOTER_LEN}", b.len()));
        }
        if &b[0..8] != MAGIC {
            return Err("bad magic (not a table file, or truncated)".into());
        }
        let crc = u32::from_le_bytes(le4(&b[FOOTER_BODY_LEN..]));
        if crc != crc32c::crc32c(&b[..FOOTER_BODY_LEN]) {
            return Err("CRC32C mismatch".into());
        }
        let version = u32::from_le_bytes(le4(&b[8..12]));
        if version != VERSION {
            return Err(format!("unknown format version {version}"));
        }
        let flags = u32::from_le_bytes(le4(&b[12..16]));
        if flags & !FLAG_ENCRYPTED != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        if b[128..FOOTER_BODY_LEN].iter().any(|&x| x != 0) {
            return Err("reserved bytes are not zero".into());
        }
        let u = |at: usize| u64::from_le_bytes(le8(&b[at..at + 8]));
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&b[24..32]);
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&b[32..64]);
        let f = Footer {
            flags,
            table_id: u(16),
            key_id,
            salt,
            index_offset: u(64),
            index_len: u(72),
            bloom_offset: u(80),
            bloom_len: u(88),
            entries: u(96),
            min_seq: u(104),
            max_seq: u(112),
            data_blocks: u(120),
        };
        f.check_layout(file_len)?;
        Ok(f)
    }

    fn check_layout(&self, file_len: u64) -> Result<(), String> {
        let end_of_bloom = self
            .bloom_offset
            .checked_add(self.bloom_len)
            .ok_or("bloom block runs past 2^64")?;
        let end_of_index = self
            .index_offset
            .checked_add(self.index_len)
            .ok_or("index block runs past 2^64")?;
        if end_of_index != self.bloom_offset
            || end_of_bloom.checked_add(FOOTER_LEN as u64) != Some(file_len)
        {
            return Err(format!(
                "layout does not add up: index {}+{}, bloom {}+{}, footer at {}, file {file_len} bytes (truncated or extended?)",
                self.index_offset,
                self.index_len,
                self.bloom_offset,
                self.bloom_len,
                file_len.saturating_sub(FOOTER_LEN as u64)
            ));
        }
        if self.index_len > MAX_META_BLOCK_BYTES || self.bloom_len > MAX_META_BLOCK_BYTES {
            return Err("index or bloom block larger than the format allows".into());
        }
        if self.entries == 0 || self.data_blocks == 0 || self.data_blocks > self.entries {
            return Err(format!(
                "{} entries in {} data blocks",
                self.entries, self.data_blocks
            ));
        }
        if self.min_seq > self.max_seq || self.max_seq > MAX_SEQ {
            return Err(format!(
                "sequence range {}..={} is invalid",
                self.min_seq, self.max_seq
            ));
        }
        if self.data_blocks >= u64::MAX - 2 {
            return Err("too many data blocks".into());
        }
        Ok(())
    }

    pub(crate) fn body(encoded: &[u8; FOOTER_LEN]) -> &[u8] {
        &encoded[..FOOTER_BODY_LEN]
    }

    /// Nonce numbers of the index and bloom blocks: right after the data blocks'.
    pub(crate) fn index_block_number(&self) -> u64 {
        self.data_blocks
    }

    pub(crate) fn bloom_block_number(&self) -> u64 {
        self.data_blocks + 1
    }
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

const KIND_DATA: u8 = 1;
const KIND_INDEX: u8 = 2;
const KIND_BLOOM: u8 = 3;

/// Associated data of one block: table id (8) || kind (1) || block number (8) ||
/// offset (8), and for the index and bloom blocks the footer's bytes 0..156.
pub(crate) fn block_aad(
    table_id: u64,
    block: BlockId,
    number: u64,
    offset: u64,
    footer_body: Option<&[u8]>,
) -> Vec<u8> {
    let kind = match block {
        BlockId::Data(_) => KIND_DATA,
        BlockId::Index => KIND_INDEX,
        BlockId::Bloom => KIND_BLOOM,
        // Only the three kinds of block are sealed.
        BlockId::Footer | BlockId::File => 0,
    };
    let mut aad = Vec::with_capacity(25 + footer_body.map_or(0, <[u8]>::len));
    aad.extend_from_slice(&table_id.to_le_bytes());
    aad.push(kind);
    aad.extend_from_slice(&number.to_le_bytes());
    aad.extend_from_slice(&offset.to_le_bytes());
    if let Some(f) = footer_body {
        aad.extend_from_slice(f);
    }
    aad
}

/// How blocks are sealed: AES-256-GCM under the table's key, or (no data key
/// configured) a CRC32C over the AAD and the plaintext.
#[derive(Debug)]
pub(crate) enum Sealer {
    // Boxed: the key schedule is large, and readers hold one sealer each.
    Encrypted(Box<Aead>),
    Plain,
}

const CRC_LEN: usize = 4;

impl Sealer {
    pub(crate) fn new(key: Option<&SecretKey>, salt: &[u8; SALT_LEN]) -> Self {
        match key {
            Some(k) => Self::Encrypted(Box::new(Aead::new(k, salt, LABEL_TABLE))),
            None => Self::Plain,
        }
    }

    /// Bytes a block of `plain_len` plaintext bytes takes on disk.
    pub(crate) fn stored_len(&self, plain_len: usize) -> usize {
        plain_len
            + match self {
                Self::Encrypted(_) => TAG_LEN,
                Self::Plain => CRC_LEN,
            }
    }

    /// Appends the stored form of `plain` to `out`. `number` must be used once per
    /// table (it is the nonce).
    pub(crate) fn seal(
        &self,
        number: u64,
        aad: &[u8],
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        match self {
            Self::Encrypted(aead) => aead
                .seal_with(counter_nonce(number), aad, plain, out)
                .map_err(|e| e.to_string()),
            Self::Plain => {
                out.extend_from_slice(plain);
                let crc = crc32c::crc32c_append(crc32c::crc32c(aad), plain);
                out.extend_from_slice(&crc.to_le_bytes());
                Ok(())
            }
        }
    }

    /// The plaintext of a stored block, or `None` when it fails authentication (or
    /// its checksum).
    pub(crate) fn open(&self, number: u64, aad: &[u8], stored: &[u8]) -> Option<Vec<u8>> {
        match self {
            Self::Encrypted(aead) => aead.open_with(counter_nonce(number), aad, stored),
            Self::Plain => {
                let split = stored.len().checked_sub(CRC_LEN)?;
                let (plain, crc) = stored.split_at(split);
                let want = crc32c::crc32c_append(crc32c::crc32c(aad), plain);
                (crc == want.to_le_bytes()).then(|| plain.to_vec())
            }
        }
    }
}

/// The key id a table written under `key` records (zero without one).
pub(crate) fn key_id_of(key: Option<&SecretKey>) -> [u8; KEY_ID_LEN] {
    key.map(crypto::key_id).unwrap_or_default()
}

/// Checks the configured key against a footer's, before any block is opened.
pub(crate) fn check_key(
    name: &TableName,
    footer: &Footer,
    key: Option<&SecretKey>,
) -> Result<(), super::error::TableError> {
    let configured = key_id_of(key);
    let matches = footer.encrypted() == key.is_some() && crypto::ct_eq(&footer.key_id, &configured);
    if matches {
        return Ok(());
    }
    let show = |encrypted: bool, id: &[u8]| {
        if encrypted {
            hex::encode(id)
        } else {
            "none (not encrypted)".to_string()
        }
    };
    Err(super::error::TableError::KeyMismatch {
        table: name.id,
        path: name.path.clone(),
        file_key_id: show(footer.encrypted(), &footer.key_id),
        configured_key_id: show(key.is_some(), &configured),
    })
}
