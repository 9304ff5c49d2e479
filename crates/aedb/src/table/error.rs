//! The one error type of table files. Every variant names the table (id and path)
//! and, where one is involved, the block, so an operator can find the damage; none
//! carries key material or user data (keys and values stay out of messages).

use std::fmt;
use std::path::PathBuf;

/// Which part of a table file an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockId {
    /// Data block `n` (numbered from 0 in file order).
    Data(u64),
    Index,
    Bloom,
    Footer,
    /// The file as a whole (its length, its digest).
    File,
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Data(n) => write!(f, "data block {n}"),
            Self::Index => f.write_str("index block"),
            Self::Bloom => f.write_str("bloom block"),
            Self::Footer => f.write_str("footer"),
            Self::File => f.write_str("whole file"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TableError {
    #[error("table {table} ({}): I/O error: {source}", path.display())]
    Io {
        table: u64,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Damage: a block that fails authentication or its checksum, a footer that
    /// does not parse, a layout that does not add up, out-of-order entries found
    /// by a full check.
    #[error("table {table} ({}): corrupt {block}: {reason}", path.display())]
    Corrupt {
        table: u64,
        path: PathBuf,
        block: BlockId,
        reason: String,
    },

    /// The file was written under another key than the one configured (or
    /// encrypted with none configured, or plain with one configured). Key ids are
    /// public fingerprints.
    #[error(
        "table {table} ({}): written under key id {file_key_id}, configured key id {configured_key_id}",
        path.display()
    )]
    KeyMismatch {
        table: u64,
        path: PathBuf,
        file_key_id: String,
        configured_key_id: String,
    },

    #[error(
        "table {table} ({}): SHA-256 of the file is {actual}, the manifest records {expected}",
        path.display()
    )]
    DigestMismatch {
        table: u64,
        path: PathBuf,
        expected: String,
        actual: String,
    },

    /// Writer input that is not strictly increasing in internal-key order (user key
    /// ascending, then sequence number descending). `entry` counts from 0.
    #[error(
        "table {table} ({}): entry {entry} is not after the previous one (internal keys must strictly increase)",
        path.display()
    )]
    OutOfOrder {
        table: u64,
        path: PathBuf,
        entry: u64,
    },

    /// A merge source yielded an entry that does not follow its previous one (a
    /// memtable or table scan out of order). `source` is its index, newest first.
    #[error("merge source {source_index} is not in internal-key order")]
    MergeOrder { source_index: usize },

    /// Writer input or options outside the table format's limits.
    #[error("table {table} ({}): {reason}", path.display())]
    Invalid {
        table: u64,
        path: PathBuf,
        reason: String,
    },
}

impl TableError {
    /// The block an error is about, for tests and for the future `check invariants`
    /// report.
    pub(crate) fn block(&self) -> Option<BlockId> {
        match self {
            Self::Corrupt { block, .. } => Some(*block),
            _ => None,
        }
    }
}

/// What every error constructor of one table needs: its id and path.
#[derive(Clone, Debug)]
pub(crate) struct TableName {
    pub id: u64,
    pub path: PathBuf,
}

impl TableName {
    pub(crate) fn io(&self, source: std::io::Error) -> TableError {
        TableError::Io {
            table: self.id,
            path: self.path.clone(),
            source,
        }
    }

    pub(crate) fn corrupt(&self, block: BlockId, reason: impl Into<String>) -> TableError {
        TableError::Corrupt {
            table: self.id,
            path: self.path.clone(),
            block,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(&self, reason: impl Into<String>) -> TableError {
        TableError::Invalid {
            table: self.id,
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// A read that ends before the bytes the index or footer promise: the file was
    /// truncated (an EOF is damage, not an I/O failure).
    pub(crate) fn read_error(&self, block: BlockId, source: std::io::Error) -> TableError {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            self.corrupt(block, "the file ends inside it (truncated)")
        } else {
            self.io(source)
        }
    }
}
