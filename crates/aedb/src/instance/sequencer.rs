//! The sequencer: the commit lock, sequence numbers, idempotency keys, and
//! ordered publication of states to readers.
//!
//! A commit takes its sequence number with its WAL append under the commit lock,
//! applies outside it, and publishes in sequence order: a state is published only
//! after every lower number has been, so readers never see a gap.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::checkpoint::IdempotencyEntry;
use crate::error::AedbError;
use crate::model::state::DbState;
use crate::record::IdempotencyTag;
use crate::txn::write::WritesDigest;

/// Writer-side state, guarded by the commit lock.
pub(super) struct CommitState {
    /// The published state (what readers see).
    state: DbState,
    /// Next sequence number to hand out. Above `state.seq + 1` while commits that
    /// already have their WAL frame are still applying; they publish in order.
    next_seq: u64,
    idempotency: HashMap<IdempotencyTag, u64>,
    /// What the commit under each key wrote (`writes_digest`), so a key reused for
    /// other writes is refused; checkpoints keep it. Absent only for keys loaded
    /// from a version 1 checkpoint: those replay without the comparison.
    idempotency_digest: HashMap<IdempotencyTag, WritesDigest>,
    idempotency_order: VecDeque<IdempotencyTag>,
    max_idempotency: usize,
    history: VecDeque<Arc<DbState>>,
}

impl CommitState {
    /// An empty database, to be filled by recovery (checkpoint, then WAL replay).
    pub(super) fn recovering(max_idempotency: usize) -> Self {
        Self {
            state: DbState::initial(),
            next_seq: 0,
            idempotency: HashMap::new(),
            idempotency_digest: HashMap::new(),
            idempotency_order: VecDeque::new(),
            max_idempotency,
            history: VecDeque::new(),
        }
    }

    pub(super) fn state(&self) -> &DbState {
        &self.state
    }

    /// Recovery only: the sequencer publishes every later change.
    pub(super) fn state_mut(&mut self) -> &mut DbState {
        &mut self.state
    }

    /// Records that the commit under `tag` got `seq` (keeping the newest
    /// `max_idempotency` keys).
    pub(super) fn remember(&mut self, tag: IdempotencyTag, seq: u64, digest: Option<WritesDigest>) {
        match digest {
            Some(d) => self.idempotency_digest.insert(tag.clone(), d),
            None => self.idempotency_digest.remove(&tag),
        };
        if self.idempotency.insert(tag.clone(), seq).is_none() {
            self.idempotency_order.push_back(tag);
        }
        while self.idempotency_order.len() > self.max_idempotency {
            if let Some(old) = self.idempotency_order.pop_front() {
                self.idempotency.remove(&old);
                self.idempotency_digest.remove(&old);
            }
        }
    }
}

pub(super) struct Sequencer {
    commit: Mutex<CommitState>,
    /// Signalled (with the commit lock) whenever a sequence number is published.
    published: Condvar,
    current: ArcSwap<DbState>,
    history_limit: usize,
    lock_timeout: Duration,
}

/// The commit lock, held.
pub(super) struct CommitGuard<'a> {
    cs: MutexGuard<'a, CommitState>,
    seq: &'a Sequencer,
}

impl Sequencer {
    /// Starts after recovery: the recovered state is published and the next
    /// sequence number follows it.
    pub(super) fn new(mut cs: CommitState, history_limit: usize, lock_timeout: Duration) -> Self {
        cs.next_seq = cs.state.seq + 1;
        let published = Arc::new(cs.state.clone());
        cs.history.push_back(published.clone());
        Self {
            commit: Mutex::new(cs),
            published: Condvar::new(),
            current: ArcSwap::new(published),
            history_limit,
            lock_timeout,
        }
    }

    /// The published state.
    pub(super) fn load(&self) -> Guard<Arc<DbState>> {
        self.current.load()
    }

    pub(super) fn load_full(&self) -> Arc<DbState> {
        self.current.load_full()
    }

    /// Takes the commit lock within the commit timeout. A timeout here guarantees
    /// the commit was not applied and never will be.
    pub(super) fn lock(&self) -> Result<CommitGuard<'_>, AedbError> {
        let cs = self
            .commit
            .try_lock_for(self.lock_timeout)
            .ok_or(AedbError::Timeout {
                waited_ms: self.lock_timeout.as_millis() as u64,
            })?;
        Ok(CommitGuard { cs, seq: self })
    }

    /// Takes the commit lock without a timeout: for work that must not give up
    /// (publishing a number already in the log) or never waits long (checkpoints,
    /// snapshot lookups).
    pub(super) fn lock_blocking(&self) -> CommitGuard<'_> {
        CommitGuard {
            cs: self.commit.lock(),
            seq: self,
        }
    }

    /// The kept state after commit `n`: the newest with seq <= n.
    pub(super) fn state_at(&self, n: u64) -> Result<Arc<DbState>, AedbError> {
        let g = self.lock_blocking();
        let head = g.cs.state.seq;
        let oldest = g.cs.history.front().map_or(head, |s| s.seq);
        let unavailable = AedbError::SnapshotUnavailable {
            requested: n,
            oldest,
            head,
        };
        if n > head || n < oldest {
            return Err(unavailable);
        }
        g.cs.history
            .iter()
            .rev()
            .find(|s| s.seq <= n)
            .cloned()
            .ok_or(unavailable)
    }
}

impl CommitGuard<'_> {
    /// The published state as the commit lock holder sees it.
    pub(super) fn state(&self) -> &DbState {
        &self.cs.state
    }

    /// The number the next WAL append gets.
    pub(super) fn next_seq(&self) -> u64 {
        self.cs.next_seq
    }

    /// `seq` (`next_seq`) now belongs to a frame in the log: it must be published
    /// (`publish_in_order`) whatever happens to its commit.
    pub(super) fn reserve(&mut self, seq: u64) {
        debug_assert_eq!(seq, self.cs.next_seq, "reserved out of order");
        self.cs.next_seq += 1;
    }

    pub(super) fn remember(&mut self, tag: IdempotencyTag, seq: u64, digest: Option<WritesDigest>) {
        self.cs.remember(tag, seq, digest);
    }

    /// Waits until every reserved sequence number has been published, so the
    /// commit state is exactly the log's state (serial operations need that).
    pub(super) fn drain(&mut self) {
        while self.cs.state.seq + 1 < self.cs.next_seq {
            self.seq.published.wait(&mut self.cs);
        }
    }

    /// The commit an idempotency key already names, once it is published; `None`
    /// if the key is new. Refused when that commit wrote something else: answering
    /// with another transaction's result would hide a caller bug.
    pub(super) fn replayed(
        &mut self,
        tag: &IdempotencyTag,
        digest: Option<&WritesDigest>,
    ) -> Option<Result<u64, AedbError>> {
        let seq = *self.cs.idempotency.get(tag)?;
        if let (Some(first), Some(this)) = (self.cs.idempotency_digest.get(tag), digest)
            && first != this
        {
            return Some(Err(AedbError::IdempotencyKeyReused {
                key: tag.key.clone(),
                first_seq: seq,
            }));
        }
        // The first attempt may still be between its WAL append and its
        // publication (it runs under another project's lock): a replay returns
        // only once that commit is visible, as the first would have.
        while self.cs.state.seq < seq {
            self.seq.published.wait(&mut self.cs);
        }
        Some(Ok(seq))
    }

    /// Waits until `seq` is the next number to publish.
    pub(super) fn wait_turn(&mut self, seq: u64) {
        while self.cs.state.seq + 1 < seq {
            self.seq.published.wait(&mut self.cs);
        }
    }

    /// Publishes `seq` (its turn: `wait_turn`) with `next` as the new state, or,
    /// when its commit failed to apply (`None`), the number alone: later commits
    /// wait for it.
    pub(super) fn publish_in_order(&mut self, seq: u64, next: Option<DbState>) {
        if let Some(next) = next {
            self.cs.state = next;
        }
        self.cs.state.seq = seq;
        self.publish();
    }

    /// Publishes `next` in place of the current state at the same seq: the same
    /// data over other tables (a flush's eviction).
    pub(super) fn replace_published(&mut self, next: DbState) {
        assert_eq!(
            next.seq, self.cs.state.seq,
            "a replaced state keeps its seq"
        );
        self.cs.state = next;
        self.publish();
    }

    /// Publishes the state of a serial commit (drained, appended as
    /// `state().seq + 1`).
    pub(super) fn publish_serial(&mut self, next: DbState) {
        self.cs.state = next;
        self.publish();
    }

    fn publish(&mut self) {
        let cs = &mut *self.cs;
        cs.next_seq = cs.next_seq.max(cs.state.seq + 1);
        self.seq.published.notify_all();
        let published = Arc::new(cs.state.clone());
        self.seq.current.store(published.clone());
        cs.history.push_back(published);
        while cs.history.len() > self.seq.history_limit.max(1) {
            cs.history.pop_front();
        }
    }

    /// The newest published state (for a checkpoint or backup, after `drain`).
    pub(super) fn latest(&self) -> Arc<DbState> {
        self.cs
            .history
            .back()
            .cloned()
            .unwrap_or_else(|| Arc::new(self.cs.state.clone()))
    }

    /// The idempotency keys a checkpoint keeps, oldest first.
    pub(super) fn idempotency_entries(&self) -> Vec<IdempotencyEntry> {
        let cs = &*self.cs;
        cs.idempotency_order
            .iter()
            .filter_map(|t| {
                cs.idempotency.get(t).map(|&seq| IdempotencyEntry {
                    tag: t.clone(),
                    seq,
                    digest: cs.idempotency_digest.get(t).copied(),
                })
            })
            .collect()
    }
}
