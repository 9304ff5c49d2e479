//! Reading one table file. `open` reads and authenticates the footer, the index and
//! the bloom filter only; data blocks are read when a lookup or scan needs them,
//! authenticated every time they come from the file, and kept decrypted in the
//! shared block cache.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::SecretKey;
use crate::crypto;
use crate::storage::{OpenMode, Storage, StorageFile};

use super::block::{DataBlock, IndexEntry, decode_index};
use super::bloom::BloomFilter;
use super::cache::BlockCache;
use super::error::{BlockId, TableError, TableName};
use super::format::{
    Entry, EntryKind, FOOTER_LEN, Footer, MAX_DATA_BLOCK_BYTES, Sealer, block_aad, check_key,
    cmp_internal,
};

/// The newest version of a key at a snapshot, as one table knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Value {
        seq: u64,
        value: Vec<u8>,
    },
    /// A tombstone: older tables must not be consulted.
    Deleted {
        seq: u64,
    },
    /// This table has no version of the key at or before the snapshot.
    Absent,
}

/// What `verify_full` checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VerifyReport {
    pub data_blocks: u64,
    pub entries: u64,
}

pub(crate) struct TableReader {
    name: TableName,
    file: Box<dyn StorageFile>,
    file_len: u64,
    footer: Footer,
    sealer: Sealer,
    index: Vec<IndexEntry>,
    bloom: BloomFilter,
    cache: Arc<BlockCache>,
}

impl std::fmt::Debug for TableReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableReader")
            .field("table", &self.name.id)
            .field("path", &self.name.path)
            .field("entries", &self.footer.entries)
            .field("data_blocks", &self.footer.data_blocks)
            .finish_non_exhaustive()
    }
}

impl TableReader {
    /// Opens table `id` at `path` (the manifest's id: a file renamed from another
    /// table is refused). `key` is the data key it must be sealed under (`None`: a
    /// plaintext table; either way a mismatch is `KeyMismatch`).
    pub(crate) fn open(
        fs: &dyn Storage,
        path: &Path,
        id: u64,
        key: Option<&SecretKey>,
        cache: Arc<BlockCache>,
    ) -> Result<Self, TableError> {
        let name = TableName {
            id,
            path: path.to_path_buf(),
        };
        let file = fs.open(path, OpenMode::Read).map_err(|e| name.io(e))?;
        let file_len = file.len().map_err(|e| name.io(e))?;
        if file_len < FOOTER_LEN as u64 {
            return Err(name.corrupt(
                BlockId::Footer,
                format!("the file is {file_len} bytes, shorter than a footer (truncated)"),
            ));
        }
        let mut encoded = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut encoded, file_len - FOOTER_LEN as u64)
            .map_err(|e| name.read_error(BlockId::Footer, e))?;
        let footer =
            Footer::decode(&encoded, file_len).map_err(|r| name.corrupt(BlockId::Footer, r))?;
        if footer.table_id != id {
            return Err(name.corrupt(
                BlockId::Footer,
                format!("the footer names table {}", footer.table_id),
            ));
        }
        check_key(&name, &footer, key)?;
        let sealer = Sealer::new(key, &footer.salt);
        let body = Footer::body(&encoded);
        let read_meta = |block: BlockId, number: u64, offset: u64, len: u64| {
            let mut stored = vec![0u8; len as usize];
            file.read_exact_at(&mut stored, offset)
                .map_err(|e| name.read_error(block, e))?;
            let aad = block_aad(id, block, number, offset, Some(body));
            sealer
                .open(number, &aad, &stored)
                .ok_or_else(|| name.corrupt(block, "fails authentication"))
        };
        let index_plain = read_meta(
            BlockId::Index,
            footer.index_block_number(),
            footer.index_offset,
            footer.index_len,
        )?;
        let index = decode_index(&index_plain).map_err(|r| name.corrupt(BlockId::Index, r))?;
        check_index(&name, &footer, &index)?;
        let bloom_plain = read_meta(
            BlockId::Bloom,
            footer.bloom_block_number(),
            footer.bloom_offset,
            footer.bloom_len,
        )?;
        let bloom =
            BloomFilter::decode(bloom_plain).map_err(|r| name.corrupt(BlockId::Bloom, r))?;
        Ok(Self {
            name,
            file,
            file_len,
            footer,
            sealer,
            index,
            bloom,
            cache,
        })
    }

    pub(crate) fn id(&self) -> u64 {
        self.name.id
    }

    pub(crate) fn entries(&self) -> u64 {
        self.footer.entries
    }

    pub(crate) fn data_blocks(&self) -> u64 {
        self.footer.data_blocks
    }

    pub(crate) fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The largest user key in the table (the index's last entry; empty for a
    /// table without blocks, which the writer never produces).
    pub(crate) fn last_key(&self) -> &[u8] {
        self.index.last().map_or(&[], |e| e.last_key.as_slice())
    }

    pub(crate) fn seq_range(&self) -> (u64, u64) {
        (self.footer.min_seq, self.footer.max_seq)
    }

    /// Byte range of data block `n` in the file (tests damage blocks by it).
    #[cfg(test)]
    pub(crate) fn block_span(&self, n: u64) -> (usize, usize) {
        let e = &self.index[n as usize];
        (e.offset as usize, (e.offset + e.stored_len) as usize)
    }

    /// Memory the open table holds besides cached blocks (index and bloom filter).
    pub(crate) fn resident_bytes(&self) -> usize {
        self.bloom.memory_bytes()
            + self
                .index
                .iter()
                .map(|e| e.last_key.capacity() + std::mem::size_of::<IndexEntry>())
                .sum::<usize>()
    }

    /// Data block `number` from the file, authenticated and decoded (not cached).
    fn load_block(&self, number: u64) -> Result<DataBlock, TableError> {
        let block = BlockId::Data(number);
        let Some(at) = usize::try_from(number).ok().and_then(|n| self.index.get(n)) else {
            return Err(self.name.corrupt(block, "no such block"));
        };
        let mut stored = vec![0u8; at.stored_len as usize];
        self.file
            .read_exact_at(&mut stored, at.offset)
            .map_err(|e| self.name.read_error(block, e))?;
        let aad = block_aad(self.name.id, block, number, at.offset, None);
        let plain = self.sealer.open(number, &aad, &stored).ok_or_else(|| {
            self.name
                .corrupt(block, "fails authentication (damaged, moved or swapped)")
        })?;
        let decoded = DataBlock::decode(plain).map_err(|r| self.name.corrupt(block, r))?;
        let last = decoded.entry(decoded.len() - 1);
        if last.key != at.last_key.as_slice() || last.seq != at.last_seq {
            return Err(self
                .name
                .corrupt(block, "its last entry differs from the index's"));
        }
        Ok(decoded)
    }

    /// Data block `number` through the cache.
    fn block(&self, number: u64) -> Result<Arc<DataBlock>, TableError> {
        let key = (self.name.id, number);
        if let Some(b) = self.cache.get(key) {
            return Ok(b);
        }
        let b = Arc::new(self.load_block(number)?);
        self.cache.insert(key, Arc::clone(&b));
        Ok(b)
    }

    /// Number of the first data block whose last internal key is at or after
    /// `(key, seq)`: the only block that can hold the first entry there.
    fn block_for(&self, key: &[u8], seq: u64) -> usize {
        self.index.partition_point(|e| {
            cmp_internal(&e.last_key, e.last_seq, key, seq) == std::cmp::Ordering::Less
        })
    }

    /// The newest version of `key` with seq <= `snapshot`. The bloom filter answers
    /// first; at most one data block is read.
    pub(crate) fn get(&self, key: &[u8], snapshot: u64) -> Result<Lookup, TableError> {
        if !self.bloom.may_contain(key) {
            return Ok(Lookup::Absent);
        }
        let number = self.block_for(key, snapshot);
        if number == self.index.len() {
            return Ok(Lookup::Absent);
        }
        let block = self.block(number as u64)?;
        let at = block.seek(key, snapshot);
        if at == block.len() {
            return Ok(Lookup::Absent);
        }
        let e = block.entry(at);
        if e.key != key {
            return Ok(Lookup::Absent);
        }
        debug_assert!(e.seq <= snapshot);
        Ok(match e.kind {
            EntryKind::Put => Lookup::Value {
                seq: e.seq,
                value: e.value.to_vec(),
            },
            EntryKind::Delete => Lookup::Deleted { seq: e.seq },
        })
    }

    /// Every version with seq <= `snapshot` of the user keys in `start..end` (`end`
    /// exclusive, `None` = to the end), in internal-key order (key ascending, newest
    /// first), tombstones included: the input of a merge, which picks the newest
    /// per key across tables (`merge::MergeIter`).
    pub(crate) fn iter_range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        snapshot: u64,
    ) -> TableIter<'_> {
        TableIter {
            reader: self,
            block_number: self.block_for(start, u64::MAX),
            block: None,
            position: 0,
            seek: Some(start.to_vec()),
            end: end.map(<[u8]>::to_vec),
            snapshot,
            done: false,
        }
    }

    /// Every entry of the table, in order.
    pub(crate) fn iter_all(&self) -> TableIter<'_> {
        self.iter_range(&[], None, u64::MAX)
    }

    /// The strict check (`aedb check invariants`): the file's SHA-256 equals the one
    /// the manifest records, and `verify_blocks` holds.
    pub(crate) fn verify_full(
        &self,
        expected_digest: &[u8; 32],
    ) -> Result<VerifyReport, TableError> {
        let actual = self.file_digest()?;
        if !crypto::ct_eq(&actual, expected_digest) {
            return Err(TableError::DigestMismatch {
                table: self.name.id,
                path: self.name.path.clone(),
                expected: hex::encode(expected_digest),
                actual: hex::encode(actual),
            });
        }
        self.verify_blocks()
    }

    /// SHA-256 of the whole file, read in bounded chunks.
    pub(crate) fn file_digest(&self) -> Result<[u8; 32], TableError> {
        const CHUNK: u64 = 1 << 20;
        let mut sha = Sha256::new();
        let mut buf = vec![0u8; CHUNK as usize];
        let mut at = 0u64;
        while at < self.file_len {
            let n = CHUNK.min(self.file_len - at) as usize;
            self.file
                .read_exact_at(&mut buf[..n], at)
                .map_err(|e| self.name.read_error(BlockId::File, e))?;
            sha.update(&buf[..n]);
            at += n as u64;
        }
        Ok(sha.finalize().into())
    }

    /// Every data block read from the file (never from the cache, whose copy could
    /// hide later damage) and authenticated; entries strictly increasing within and
    /// across blocks; each block's last entry the index's; the entry count and the
    /// sequence range the footer's; every key in the bloom filter.
    pub(crate) fn verify_blocks(&self) -> Result<VerifyReport, TableError> {
        let mut entries = 0u64;
        let (mut min_seq, mut max_seq) = (u64::MAX, 0u64);
        let mut prev: Option<(Vec<u8>, u64)> = None;
        for number in 0..self.footer.data_blocks {
            let block_id = BlockId::Data(number);
            let block = self.load_block(number)?;
            for i in 0..block.len() {
                let e = block.entry(i);
                if let Some((pk, ps)) = &prev
                    && cmp_internal(pk, *ps, e.key, e.seq) != std::cmp::Ordering::Less
                {
                    return Err(self
                        .name
                        .corrupt(block_id, format!("entry {i} is out of order")));
                }
                let new_key = prev.as_ref().is_none_or(|(pk, _)| pk.as_slice() != e.key);
                if new_key && !self.bloom.may_contain(e.key) {
                    return Err(self.name.corrupt(
                        BlockId::Bloom,
                        format!("misses a key of data block {number}"),
                    ));
                }
                if e.kind == EntryKind::Delete && !e.value.is_empty() {
                    return Err(self
                        .name
                        .corrupt(block_id, format!("entry {i} is a delete with a value")));
                }
                min_seq = min_seq.min(e.seq);
                max_seq = max_seq.max(e.seq);
                entries += 1;
                match &mut prev {
                    Some((pk, ps)) => {
                        pk.clear();
                        pk.extend_from_slice(e.key);
                        *ps = e.seq;
                    }
                    None => prev = Some((e.key.to_vec(), e.seq)),
                }
            }
        }
        if entries != self.footer.entries
            || min_seq != self.footer.min_seq
            || max_seq != self.footer.max_seq
        {
            return Err(self.name.corrupt(
                BlockId::Footer,
                format!(
                    "the blocks hold {entries} entries, seq {min_seq}..={max_seq}; the footer says {}, {}..={}",
                    self.footer.entries, self.footer.min_seq, self.footer.max_seq
                ),
            ));
        }
        Ok(VerifyReport {
            data_blocks: self.footer.data_blocks,
            entries,
        })
    }
}

/// Checks the index against the footer before any data block is read: one entry
/// per data block, blocks back to back from offset 0 up to the index, each of a
/// length the format allows, last keys strictly increasing.
fn check_index(name: &TableName, footer: &Footer, index: &[IndexEntry]) -> Result<(), TableError> {
    if index.len() as u64 != footer.data_blocks {
        return Err(name.corrupt(
            BlockId::Index,
            format!(
                "{} entries for {} data blocks",
                index.len(),
                footer.data_blocks
            ),
        ));
    }
    let mut expected_offset = 0u64;
    for (n, e) in index.iter().enumerate() {
        if e.offset != expected_offset || e.stored_len == 0 || e.stored_len > MAX_DATA_BLOCK_BYTES {
            return Err(name.corrupt(
                BlockId::Index,
                format!(
                    "data block {n} at {}+{}, expected to start at {expected_offset}",
                    e.offset, e.stored_len
                ),
            ));
        }
        if n > 0 {
            let p = &index[n - 1];
            if cmp_internal(&p.last_key, p.last_seq, &e.last_key, e.last_seq)
                != std::cmp::Ordering::Less
            {
                return Err(name.corrupt(
                    BlockId::Index,
                    format!("data block {n}'s last key is not after block {}'s", n - 1),
                ));
            }
        }
        expected_offset += e.stored_len;
    }
    if expected_offset != footer.index_offset {
        return Err(name.corrupt(
            BlockId::Index,
            format!(
                "data blocks end at {expected_offset}, the index starts at {}",
                footer.index_offset
            ),
        ));
    }
    Ok(())
}

/// A forward scan over one table (see `TableReader::iter_range`). After an error it
/// yields nothing more.
#[derive(Debug)]
pub(crate) struct TableIter<'a> {
    reader: &'a TableReader,
    block_number: usize,
    block: Option<Arc<DataBlock>>,
    position: usize,
    /// Where to start within the first block loaded.
    seek: Option<Vec<u8>>,
    end: Option<Vec<u8>>,
    snapshot: u64,
    done: bool,
}

impl Iterator for TableIter<'_> {
    type Item = Result<Entry, TableError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            let block = match &self.block {
                Some(b) => Arc::clone(b),
                None => {
                    if self.block_number >= self.reader.index.len() {
                        self.done = true;
                        return None;
                    }
                    match self.reader.block(self.block_number as u64) {
                        Ok(b) => {
                            self.position = match self.seek.take() {
                                Some(start) => b.seek(&start, u64::MAX),
                                None => 0,
                            };
                            self.block = Some(Arc::clone(&b));
                            b
                        }
                        Err(e) => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
            };
            if self.position >= block.len() {
                self.block = None;
                self.block_number += 1;
                continue;
            }
            let e = block.entry(self.position);
            self.position += 1;
            if self.end.as_deref().is_some_and(|end| e.key >= end) {
                self.done = true;
                return None;
            }
            if e.seq > self.snapshot {
                continue;
            }
            return Some(Ok(e.to_entry()));
        }
    }
}

impl TableReader {
    /// The newest version with seq <= `snapshot` of each user key in `start..end`
    /// (`end` exclusive, `None` = to the end), tombstones included, in descending
    /// key order: one table's input of a reverse scan (a table holds each key's
    /// versions next to each other, so picking the newest needs no merge).
    pub(crate) fn iter_range_rev(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        snapshot: u64,
    ) -> TableRevIter<'_> {
        // The first block that can hold a key at or after `end`: the part of it
        // before `end`, and every block before it, is in range.
        let first = end
            .map(|end| self.block_for(end, u64::MAX))
            .filter(|&b| b < self.index.len());
        TableRevIter {
            reader: self,
            first,
            remaining: first.unwrap_or(self.index.len()),
            block: None,
            position: 0,
            end: end.map(<[u8]>::to_vec),
            start: start.to_vec(),
            snapshot,
            pending: None,
            done: false,
        }
    }
}

/// A reverse scan over one table (see `TableReader::iter_range_rev`). After an
/// error it yields nothing more.
#[derive(Debug)]
pub(crate) struct TableRevIter<'a> {
    reader: &'a TableReader,
    /// The block holding `end`, read from `end` backwards.
    first: Option<usize>,
    /// Blocks `0..remaining` are still to be read, whole.
    remaining: usize,
    block: Option<Arc<DataBlock>>,
    /// Entries of `block` before this one are still to be read.
    position: usize,
    end: Option<Vec<u8>>,
    start: Vec<u8>,
    snapshot: u64,
    /// The newest visible version seen so far of the key being read (versions
    /// come oldest first going backwards).
    pending: Option<Entry>,
    done: bool,
}

impl TableRevIter<'_> {
    /// The previous visible entry in internal-key order, or None at `start`.
    fn prev_entry(&mut self) -> Result<Option<Entry>, TableError> {
        loop {
            let block = match &self.block {
                Some(b) => Arc::clone(b),
                None => {
                    let (number, from_end) = match self.first.take() {
                        Some(first) => (first, true),
                        None if self.remaining == 0 => return Ok(None),
                        None => {
                            self.remaining -= 1;
                            (self.remaining, false)
                        }
                    };
                    let b = self.reader.block(number as u64)?;
                    self.position = match (&self.end, from_end) {
                        (Some(end), true) => b.seek(end, u64::MAX),
                        _ => b.len(),
                    };
                    self.block = Some(Arc::clone(&b));
                    b
                }
            };
            if self.position == 0 {
                self.block = None;
                continue;
            }
            self.position -= 1;
            let e = block.entry(self.position);
            if e.key < self.start.as_slice() {
                self.remaining = 0;
                self.block = None;
                return Ok(None);
            }
            if e.seq > self.snapshot {
                continue;
            }
            return Ok(Some(e.to_entry()));
        }
    }

    fn step(&mut self) -> Result<Option<Entry>, TableError> {
        loop {
            let prev = self.prev_entry()?;
            match (prev, self.pending.take()) {
                (None, pending) => return Ok(pending),
                (Some(e), None) => self.pending = Some(e),
                // Same key: `e` is newer (seq descends forwards).
                (Some(e), Some(p)) if e.key == p.key => self.pending = Some(e),
                (Some(e), Some(p)) => {
                    self.pending = Some(e);
                    return Ok(Some(p));
                }
            }
        }
    }
}

impl Iterator for TableRevIter<'_> {
    type Item = Result<Entry, TableError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
