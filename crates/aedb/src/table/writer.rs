//! Writing one table file: sorted entries in, a complete, fsynced file under its final
//! name out (temp file, fsync, rename, directory fsync, as checkpoints are written), so
//! after a crash the final name holds a whole table or nothing.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::SecretKey;
use crate::crypto::{self, KEY_ID_LEN};
use crate::storage::{OpenMode, Storage, StorageFile};

use super::block::{DataBlockBuilder, IndexEntry, encode_index};
use super::bloom::{BloomBuilder, DEFAULT_BITS_PER_KEY};
use super::error::{BlockId, TableError, TableName};
use super::format::{
    DEFAULT_BLOCK_BYTES, ENTRY_HEADER_LEN, EntryKind, FLAG_ENCRYPTED, Footer, MAX_KEY_BYTES,
    MAX_SEQ, MAX_VALUE_BYTES, SALT_LEN, Sealer, block_aad, cmp_internal, file_name, key_id_of,
    tmp_path,
};

/// Sealed bytes are written out once this many have accumulated: the writer's only
/// buffer besides the block being filled.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableWriterOptions {
    /// Target plaintext size of a data block; a block holds at least one entry, so an
    /// entry larger than this makes a larger block.
    pub block_bytes: usize,
    pub bloom_bits_per_key: u32,
    /// Entries one table may hold (bounds the bloom builder's memory: 8 bytes per
    /// distinct key, and the index's).
    pub max_entries: u64,
}

impl Default for TableWriterOptions {
    fn default() -> Self {
        Self {
            block_bytes: DEFAULT_BLOCK_BYTES,
            bloom_bits_per_key: DEFAULT_BITS_PER_KEY,
            max_entries: 4 << 20,
        }
    }
}

/// What the manifest will record about a finished table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableMeta {
    pub id: u64,
    pub path: PathBuf,
    pub size: u64,
    /// SHA-256 of the whole file.
    pub digest: [u8; 32],
    pub entries: u64,
    pub data_blocks: u64,
    pub first_key: Vec<u8>,
    pub first_seq: u64,
    pub last_key: Vec<u8>,
    pub last_seq: u64,
    pub min_seq: u64,
    pub max_seq: u64,
    /// Id of the data key the blocks are sealed under (zero when not encrypted).
    pub key_id: [u8; KEY_ID_LEN],
}

pub(crate) struct TableWriter<'a> {
    fs: &'a dyn Storage,
    dir: PathBuf,
    name: TableName,
    tmp: PathBuf,
    file: Option<Box<dyn StorageFile>>,
    sealer: Sealer,
    key_id: [u8; KEY_ID_LEN],
    salt: [u8; SALT_LEN],
    options: TableWriterOptions,
    block: DataBlockBuilder,
    plain: Vec<u8>,
    /// Sealed bytes not yet written; they start at file offset `written`.
    out: Vec<u8>,
    written: u64,
    sha: Sha256,
    index: Vec<IndexEntry>,
    bloom: BloomBuilder,
    first: Option<(Vec<u8>, u64)>,
    last_key: Vec<u8>,
    last_seq: u64,
    entries: u64,
    min_seq: u64,
    max_seq: u64,
    /// An I/O or sealing error happened: the file is incomplete, nothing more may be
    /// added.
    failed: bool,
}

impl std::fmt::Debug for TableWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableWriter")
            .field("table", &self.name.id)
            .field("tmp", &self.tmp)
            .field("entries", &self.entries)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<'a> TableWriter<'a> {
    /// Starts `dir/table-{id}.tbl` (as `<name>.tmp`), sealed under `key` (the
    /// checkpoint key; `None` writes CRC-checked plaintext blocks).
    pub(crate) fn create(
        fs: &'a dyn Storage,
        dir: &Path,
        id: u64,
        key: Option<&SecretKey>,
        options: TableWriterOptions,
    ) -> Result<Self, TableError> {
        let name = TableName {
            id,
            path: dir.join(file_name(id)),
        };
        if !(256..=64 << 20).contains(&options.block_bytes)
            || !(1..=64).contains(&options.bloom_bits_per_key)
            || options.max_entries == 0
        {
            return Err(name.invalid(format!("invalid writer options {options:?}")));
        }
        let salt = crypto::random_bytes::<SALT_LEN>()
            .map_err(|_| name.invalid("the system random source failed"))?;
        let tmp = tmp_path(dir, id);
        let file = fs.open(&tmp, OpenMode::Create).map_err(|e| name.io(e))?;
        Ok(Self {
            fs,
            dir: dir.to_path_buf(),
            tmp,
            file: Some(file),
            sealer: Sealer::new(key, &salt),
            key_id: key_id_of(key),
            salt,
            options,
            block: DataBlockBuilder::default(),
            plain: Vec::new(),
            out: Vec::with_capacity(WRITE_BUFFER_BYTES + options.block_bytes),
            written: 0,
            sha: Sha256::new(),
            index: Vec::new(),
            bloom: BloomBuilder::new(options.bloom_bits_per_key),
            first: None,
            last_key: Vec::new(),
            last_seq: 0,
            entries: 0,
            min_seq: u64::MAX,
            max_seq: 0,
            failed: false,
            name,
        })
    }

    /// Adds one version. Input must strictly increase in internal-key order (user
    /// key ascending, then seq descending); anything else is refused and leaves the
    /// writer as it was.
    pub(crate) fn add(
        &mut self,
        key: &[u8],
        seq: u64,
        kind: EntryKind,
        value: &[u8],
    ) -> Result<(), TableError> {
        if self.failed {
            return Err(self.name.invalid("an earlier write of this table failed"));
        }
        if key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            return Err(self.name.invalid(format!(
                "entry {}: key of {} bytes or value of {} bytes over the format's limits",
                self.entries,
                key.len(),
                value.len()
            )));
        }
        if kind == EntryKind::Delete && !value.is_empty() {
            return Err(self
                .name
                .invalid(format!("entry {}: a delete carries no value", self.entries)));
        }
        if seq > MAX_SEQ {
            return Err(self.name.invalid(format!(
                "entry {}: sequence number past the largest LSN",
                self.entries
            )));
        }
        if self.entries >= self.options.max_entries {
            return Err(self.name.invalid(format!(
                "the table already holds its {} entries",
                self.options.max_entries
            )));
        }
        let new_user_key = self.first.is_none() || key != self.last_key.as_slice();
        if self.first.is_some()
            && cmp_internal(&self.last_key, self.last_seq, key, seq) != std::cmp::Ordering::Less
        {
            return Err(TableError::OutOfOrder {
                table: self.name.id,
                path: self.name.path.clone(),
                entry: self.entries,
            });
        }
        let entry_bytes = ENTRY_HEADER_LEN + key.len() + value.len();
        if !self.block.is_empty() && self.block.size() + entry_bytes > self.options.block_bytes {
            self.flush_block()?;
        }
        self.block.add(key, seq, kind, value);
        if new_user_key {
            self.bloom.add(key);
        }
        if self.first.is_none() {
            self.first = Some((key.to_vec(), seq));
        }
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.last_seq = seq;
        self.entries += 1;
        self.min_seq = self.min_seq.min(seq);
        self.max_seq = self.max_seq.max(seq);
        Ok(())
    }

    /// File offset of the next block.
    fn offset(&self) -> u64 {
        self.written + self.out.len() as u64
    }

    fn flush_block(&mut self) -> Result<(), TableError> {
        debug_assert!(!self.block.is_empty());
        let number = self.index.len() as u64;
        let offset = self.offset();
        self.block.finish_into(&mut self.plain);
        let aad = block_aad(self.name.id, BlockId::Data(number), number, offset, None);
        let before = self.out.len();
        if let Err(reason) = self.sealer.seal(number, &aad, &self.plain, &mut self.out) {
            self.failed = true;
            return Err(self.name.invalid(reason));
        }
        let stored_len = (self.out.len() - before) as u64;
        assert_eq!(
            stored_len as usize,
            self.sealer.stored_len(self.plain.len())
        );
        self.index.push(IndexEntry {
            last_key: self.last_key.clone(),
            last_seq: self.last_seq,
            offset,
            stored_len,
        });
        if self.out.len() >= WRITE_BUFFER_BYTES {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), TableError> {
        let Some(file) = &self.file else {
            return Err(self.name.invalid("the table file is closed"));
        };
        self.sha.update(&self.out);
        if let Err(e) = file.write_all_at(&self.out, self.written) {
            self.failed = true;
            return Err(self.name.io(e));
        }
        self.written += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    /// Seals the last data block, the index, the bloom filter and the footer,
    /// fsyncs, renames into place and fsyncs the directory. An empty table is
    /// refused (nothing is left behind).
    pub(crate) fn finish(mut self) -> Result<TableMeta, TableError> {
        let result = self.finish_inner();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn finish_inner(&mut self) -> Result<TableMeta, TableError> {
        if self.failed {
            return Err(self.name.invalid("an earlier write of this table failed"));
        }
        let Some((first_key, first_seq)) = self.first.clone() else {
            return Err(self.name.invalid("a table holds at least one entry"));
        };
        if !self.block.is_empty() {
            self.flush_block()?;
        }
        let data_blocks = self.index.len() as u64;
        let index_plain = encode_index(&self.index);
        let bloom_plain = self.bloom.finish();
        let index_offset = self.offset();
        let index_len = self.sealer.stored_len(index_plain.len()) as u64;
        let bloom_len = self.sealer.stored_len(bloom_plain.len()) as u64;
        let footer = Footer {
            flags: if matches!(self.sealer, Sealer::Encrypted(_)) {
                FLAG_ENCRYPTED
            } else {
                0
            },
            table_id: self.name.id,
            key_id: self.key_id,
            salt: self.salt,
            index_offset,
            index_len,
            bloom_offset: index_offset + index_len,
            bloom_len,
            entries: self.entries,
            min_seq: self.min_seq,
            max_seq: self.max_seq,
            data_blocks,
        };
        let encoded = footer.encode();
        let body = Footer::body(&encoded);
        for (block, number, offset, plain) in [
            (
                BlockId::Index,
                footer.index_block_number(),
                index_offset,
                &index_plain,
            ),
            (
                BlockId::Bloom,
                footer.bloom_block_number(),
                footer.bloom_offset,
                &bloom_plain,
            ),
        ] {
            assert_eq!(
                offset,
                self.offset(),
                "{block} starts where the footer says"
            );
            let aad = block_aad(self.name.id, block, number, offset, Some(body));
            self.sealer
                .seal(number, &aad, plain, &mut self.out)
                .map_err(|reason| self.name.invalid(reason))?;
        }
        self.out.extend_from_slice(&encoded);
        self.write_out()?;
        let size = self.written;
        let Some(file) = self.file.take() else {
            return Err(self.name.invalid("the table file is closed"));
        };
        file.sync_all().map_err(|e| self.name.io(e))?;
        drop(file);
        self.fs
            .rename(&self.tmp, &self.name.path)
            .map_err(|e| self.name.io(e))?;
        self.fs.sync_dir(&self.dir).map_err(|e| self.name.io(e))?;
        let digest: [u8; 32] = std::mem::take(&mut self.sha).finalize().into();
        tracing::debug!(
            table = self.name.id,
            bytes = size,
            entries = self.entries,
            data_blocks,
            "table file written"
        );
        // The temp name is gone: nothing for drop to clean up.
        self.tmp = PathBuf::new();
        Ok(TableMeta {
            id: self.name.id,
            path: self.name.path.clone(),
            size,
            digest,
            entries: self.entries,
            data_blocks,
            first_key,
            first_seq,
            last_key: self.last_key.clone(),
            last_seq: self.last_seq,
            min_seq: self.min_seq,
            max_seq: self.max_seq,
            key_id: self.key_id,
        })
    }
}

impl Drop for TableWriter<'_> {
    /// An unfinished (or failed) table's temp file is removed, best effort: if that
    /// fails too, open removes every `*.tmp`.
    fn drop(&mut self) {
        if self.tmp.as_os_str().is_empty() {
            return;
        }
        self.file = None;
        let _ = self.fs.remove_file(&self.tmp);
    }
}
