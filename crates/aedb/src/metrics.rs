//! Counters behind `operational_metrics()`: relaxed atomics, cheap to read every second.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub commits: AtomicU64,
    pub aborts_conflict: AtomicU64,
    pub aborts_assertion: AtomicU64,
    pub aborts_admission: AtomicU64,
    pub aborts_other: AtomicU64,
    pub idempotent_replays: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A point-in-time view of the engine's health counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperationalMetrics {
    pub commits: u64,
    pub aborts_conflict: u64,
    pub aborts_assertion: u64,
    pub aborts_admission: u64,
    pub aborts_other: u64,
    pub idempotent_replays: u64,
    pub fsyncs: u64,
    pub head_seq: u64,
    pub durable_seq: u64,
    pub queued_commits: u64,
    pub wal_pending_bytes: u64,
}

impl OperationalMetrics {
    /// Commits covered by one fsync on average (group-commit efficiency).
    pub fn commits_per_fsync(&self) -> f64 {
        if self.fsyncs == 0 {
            0.0
        } else {
            self.commits as f64 / self.fsyncs as f64
        }
    }
}

pub(crate) fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}
