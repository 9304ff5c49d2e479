//! Write-ahead log: segment files of CRC-protected, hash-chained frames.
//!
//! `format` is the byte layout, `writer` appends with group commit, `reader` scans
//! and classifies damage, `recovery` decides what strict and permissive modes keep.

pub(crate) mod format;
pub(crate) mod keys;
pub(crate) mod reader;
pub(crate) mod recovery;
pub(crate) mod writer;

pub use recovery::{ChainHead, DroppedTail, RecoveryReport, TornTail};
