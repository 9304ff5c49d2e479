//! The plaintext of data and index blocks.
//!
//! Data block: entries back to back, then the entry count (u32). An entry is
//! key length (u32) | seq (u64) | kind (u8: 1 put, 2 delete) | value length (u32) |
//! key | value. Entries are in internal-key order within and across blocks.
//!
//! Index block: the data block count (u64), then per data block: length of its last
//! key (u32) | last key | last seq (u64) | offset (u64) | stored length (u64).

use std::cmp::Ordering;

use super::format::{ENTRY_HEADER_LEN, Entry, EntryKind, MAX_KEY_BYTES, cmp_internal};

/// A borrowed view of one entry of a decoded block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryRef<'a> {
    pub key: &'a [u8],
    pub seq: u64,
    pub kind: EntryKind,
    pub value: &'a [u8],
}

impl EntryRef<'_> {
    pub(crate) fn to_entry(self) -> Entry {
        Entry {
            key: self.key.to_vec(),
            seq: self.seq,
            kind: self.kind,
            value: self.value.to_vec(),
        }
    }
}

/// Accumulates the entries of one data block.
#[derive(Debug, Default)]
pub(crate) struct DataBlockBuilder {
    buf: Vec<u8>,
    count: u32,
}

impl DataBlockBuilder {
    pub(crate) fn add(&mut self, key: &[u8], seq: u64, kind: EntryKind, value: &[u8]) {
        // The writer checks the format's limits first; these hold by construction.
        assert!(key.len() <= MAX_KEY_BYTES, "key over the format limit");
        assert!(u32::try_from(value.len()).is_ok(), "value over u32");
        assert!(self.count < u32::MAX, "block entry count over u32");
        self.buf
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.push(kind.to_byte());
        self.buf
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(value);
        self.count += 1;
    }

    /// Plaintext bytes the block would have if finished now.
    pub(crate) fn size(&self) -> usize {
        self.buf.len() + 4
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The block's plaintext; the builder is empty afterwards (its buffer reused).
    pub(crate) fn finish_into(&mut self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.buf);
        out.extend_from_slice(&self.count.to_le_bytes());
        self.buf.clear();
        self.count = 0;
    }
}

/// A decoded, authenticated data block: its plaintext and where each entry starts.
#[derive(Debug)]
pub(crate) struct DataBlock {
    plain: Vec<u8>,
    starts: Vec<u32>,
}

impl DataBlock {
    /// Checks the framing of every entry (lengths inside the block, known kinds, the
    /// count matching), not their order (that is `verify_full`'s job).
    pub(crate) fn decode(plain: Vec<u8>) -> Result<Self, String> {
        let body_len = plain
            .len()
            .checked_sub(4)
            .ok_or("shorter than its entry count")?;
        let count = u32::from_le_bytes(arr4(&plain[body_len..]));
        if count == 0 {
            return Err("holds no entry".into());
        }
        let mut starts = Vec::with_capacity((count as usize).min(body_len / ENTRY_HEADER_LEN));
        let mut at = 0usize;
        while at < body_len {
            let start = u32::try_from(at).map_err(|_| "block larger than 4 GiB")?;
            let header = plain
                .get(at..at + ENTRY_HEADER_LEN)
                .filter(|_| at + ENTRY_HEADER_LEN <= body_len)
                .ok_or_else(|| format!("entry {} header runs past the block", starts.len()))?;
            let key_len = u32::from_le_bytes(arr4(&header[0..4])) as usize;
            if EntryKind::from_byte(header[12]).is_none() {
                return Err(format!(
                    "entry {} has unknown kind {}",
                    starts.len(),
                    header[12]
                ));
            }
            let value_len = u32::from_le_bytes(arr4(&header[13..17])) as usize;
            let end = (at + ENTRY_HEADER_LEN)
                .checked_add(key_len)
                .and_then(|e| e.checked_add(value_len))
                .filter(|&e| e <= body_len)
                .ok_or_else(|| format!("entry {} runs past the block", starts.len()))?;
            if key_len > MAX_KEY_BYTES {
                return Err(format!(
                    "entry {} key longer than the format allows",
                    starts.len()
                ));
            }
            starts.push(start);
            at = end;
        }
        if starts.len() != count as usize {
            return Err(format!(
                "{} entries found, the block says {count}",
                starts.len()
            ));
        }
        Ok(Self { plain, starts })
    }

    pub(crate) fn len(&self) -> usize {
        self.starts.len()
    }

    /// Bytes this block holds in memory (what the cache counts).
    pub(crate) fn weight(&self) -> u64 {
        (self.plain.capacity() + self.starts.capacity() * 4 + std::mem::size_of::<Self>()) as u64
    }

    pub(crate) fn entry(&self, i: usize) -> EntryRef<'_> {
        // `decode` checked every entry's framing, so these slices are in bounds.
        let at = self.starts[i] as usize;
        let h = &self.plain[at..at + ENTRY_HEADER_LEN];
        let key_len = u32::from_le_bytes(arr4(&h[0..4])) as usize;
        let seq = u64::from_le_bytes(arr8(&h[4..12]));
        let kind = EntryKind::from_byte(h[12]).unwrap_or(EntryKind::Delete);
        let value_len = u32::from_le_bytes(arr4(&h[13..17])) as usize;
        let key_at = at + ENTRY_HEADER_LEN;
        EntryRef {
            key: &self.plain[key_at..key_at + key_len],
            seq,
            kind,
            value: &self.plain[key_at + key_len..key_at + key_len + value_len],
        }
    }

    /// Index of the first entry at or after `(key, seq)` in internal-key order
    /// (`len()` when there is none).
    pub(crate) fn seek(&self, key: &[u8], seq: u64) -> usize {
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.entry(mid);
            if cmp_internal(e.key, e.seq, key, seq) == Ordering::Less {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// What the index records for one data block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub last_key: Vec<u8>,
    pub last_seq: u64,
    pub offset: u64,
    pub stored_len: u64,
}

pub(crate) fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let size: usize = entries.iter().map(|e| 28 + e.last_key.len()).sum();
    let mut out = Vec::with_capacity(8 + size);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&(e.last_key.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.last_key);
        out.extend_from_slice(&e.last_seq.to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
    }
    out
}

pub(crate) fn decode_index(b: &[u8]) -> Result<Vec<IndexEntry>, String> {
    let count = u64::from_le_bytes(arr8(b.get(..8).ok_or("shorter than its count")?));
    // Each entry takes at least 28 bytes: bound the allocation by the block's size.
    if count > (b.len() as u64) / 28 {
        return Err(format!("count {count} does not fit in {} bytes", b.len()));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut at = 8usize;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let s = b
            .get(*at..at.saturating_add(n))
            .ok_or_else(|| format!("entry runs past the block at byte {at}"))?;
        *at += n;
        Ok(s)
    };
    for _ in 0..count {
        let key_len = u32::from_le_bytes(arr4(take(&mut at, 4)?)) as usize;
        if key_len > MAX_KEY_BYTES {
            return Err("key longer than the format allows".into());
        }
        let last_key = take(&mut at, key_len)?.to_vec();
        let last_seq = u64::from_le_bytes(arr8(take(&mut at, 8)?));
        let offset = u64::from_le_bytes(arr8(take(&mut at, 8)?));
        let stored_len = u64::from_le_bytes(arr8(take(&mut at, 8)?));
        out.push(IndexEntry {
            last_key,
            last_seq,
            offset,
            stored_len,
        });
    }
    if at != b.len() {
        return Err(format!("{} bytes after the last entry", b.len() - at));
    }
    Ok(out)
}

fn arr4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn arr8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}
