//! A k-way merge of sorted sources (the memtable and tables, newest first) into the
//! view at one snapshot: for each user key, its newest version with seq <= snapshot.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::error::TableError;
use super::format::{Entry, EntryKind};

/// One sorted input: entries in internal-key order (key ascending, seq descending).
/// `Send`, so a compaction can run on a background thread.
pub(crate) type Source<'a> = Box<dyn Iterator<Item = Result<Entry, TableError>> + Send + 'a>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tombstones {
    /// Reads: a deleted key is absent.
    Hide,
    /// Compaction into a level that is not the bottom one: the tombstone must still
    /// hide older versions in the levels below.
    Keep,
}

/// The heap's item: the next entry of one source. Ordered so the max-heap pops the
/// smallest internal key first, and on an equal (key, seq) the newer source (lower
/// index) first.
#[derive(Debug)]
struct Head {
    entry: Entry,
    source: usize,
}

impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        self.entry
            .cmp_internal(&other.entry)
            .then(self.source.cmp(&other.source))
            .reverse()
    }
}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Head {}

pub(crate) struct MergeIter<'a> {
    sources: Vec<Source<'a>>,
    heap: BinaryHeap<Head>,
    snapshot: u64,
    tombstones: Tombstones,
    started: bool,
    /// A source failed (or was out of order): the merge yields nothing more.
    failed: bool,
}

impl std::fmt::Debug for MergeIter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeIter")
            .field("sources", &self.sources.len())
            .field("snapshot", &self.snapshot)
            .field("tombstones", &self.tombstones)
            .finish_non_exhaustive()
    }
}

impl<'a> MergeIter<'a> {
    /// `sources` newest first. Memory: one entry per source.
    pub(crate) fn new(sources: Vec<Source<'a>>, snapshot: u64, tombstones: Tombstones) -> Self {
        let n = sources.len();
        Self {
            sources,
            heap: BinaryHeap::with_capacity(n),
            snapshot,
            tombstones,
            started: false,
            failed: false,
        }
    }

    /// Pulls the next entry of `source` into the heap; `after` is the entry it
    /// yielded before, which the new one must follow.
    fn refill(&mut self, source: usize, after: Option<&Entry>) -> Result<(), TableError> {
        match self.sources[source].next() {
            None => Ok(()),
            Some(Err(e)) => Err(e),
            Some(Ok(entry)) => {
                if after.is_some_and(|prev| prev.cmp_internal(&entry) != Ordering::Less) {
                    return Err(TableError::MergeOrder {
                        source_index: source,
                    });
                }
                self.heap.push(Head { entry, source });
                Ok(())
            }
        }
    }

    /// Pops the smallest head and refills its source.
    fn pop(&mut self) -> Result<Option<Entry>, TableError> {
        let Some(head) = self.heap.pop() else {
            return Ok(None);
        };
        self.refill(head.source, Some(&head.entry))?;
        Ok(Some(head.entry))
    }

    fn step(&mut self) -> Result<Option<Entry>, TableError> {
        if !self.started {
            self.started = true;
            for s in 0..self.sources.len() {
                self.refill(s, None)?;
            }
        }
        loop {
            let Some(entry) = self.pop()? else {
                return Ok(None);
            };
            if entry.seq > self.snapshot {
                continue;
            }
            // The heap yields a key's versions newest first, so this is the newest
            // visible one; the older ones are shadowed.
            while self.heap.peek().is_some_and(|h| h.entry.key == entry.key) {
                self.pop()?;
            }
            if entry.kind == EntryKind::Delete && self.tombstones == Tombstones::Hide {
                continue;
            }
            return Ok(Some(entry));
        }
    }
}

impl Iterator for MergeIter<'_> {
    type Item = Result<Entry, TableError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(e) => e.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
