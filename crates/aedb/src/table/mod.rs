//! Immutable, sorted, block-based table files: the building block of the LSM design
//! of issue #18 (a memtable flushed to tables, compaction, a bounded block cache).
//! Layout in `format.rs` and FORMAT.md ("Table files").
//!
//! One concern per file: `format` (footer, names, sealing), `block` (data and index
//! block contents), `bloom`, `writer`, `reader`, `cache`, `merge`, `error`.

// Checkpoints write tables and open merges them (`lsm.rs`); point lookups, range
// scans and the shared block cache wait for reads to go through the tables
// (issue #18's next step), so parts are still used by the tests only.
#![allow(dead_code, unused_imports)]

mod block;
mod bloom;
mod cache;
mod error;
mod format;
mod merge;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

pub(crate) use cache::BlockCache;
pub(crate) use error::{BlockId, TableError};
pub(crate) use format::{Entry, EntryKind, file_name, parse_file_name};
pub(crate) use merge::{MergeIter, Source, Tombstones};
pub(crate) use reader::{Lookup, TableIter, TableReader, TableRevIter, VerifyReport};
pub(crate) use writer::{TableMeta, TableWriter, TableWriterOptions};
