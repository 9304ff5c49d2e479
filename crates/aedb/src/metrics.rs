//! Counters behind `operational_metrics()`: relaxed atomics, two small histograms
//! and bounded per-caller alert windows; cheap enough to read every second.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::config::CommitFinality;

/// Window for the per-caller alert rates.
pub const ALERT_WINDOW: Duration = Duration::from_secs(300);
/// Events kept per caller for the window (older ones only count in the totals).
const EVENTS_PER_CALLER: usize = 4096;
/// Callers tracked individually; beyond that, events count under `_other`.
const MAX_CALLERS: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum AlertKind {
    AssertionFailure,
    PermissionDenial,
    GlobalAdminUse,
    PermissionChange,
}

#[derive(Default)]
struct CallerWindow {
    totals: [u64; 4],
    recent: VecDeque<(Instant, AlertKind)>,
}

fn slot(k: AlertKind) -> usize {
    match k {
        AlertKind::AssertionFailure => 0,
        AlertKind::PermissionDenial => 1,
        AlertKind::GlobalAdminUse => 2,
        AlertKind::PermissionChange => 3,
    }
}

pub(crate) struct Counters {
    pub commits: AtomicU64,
    pub aborts_conflict: AtomicU64,
    pub aborts_assertion: AtomicU64,
    pub aborts_timeout: AtomicU64,
    pub aborts_admission: AtomicU64,
    pub aborts_permission: AtomicU64,
    pub aborts_other: AtomicU64,
    pub idempotent_replays: AtomicU64,
    latency_visible: Mutex<Histogram<u64>>,
    latency_durable: Mutex<Histogram<u64>>,
    callers: Mutex<HashMap<String, CallerWindow>>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h with 2 significant digits; the bounds are constants, so this
    // cannot fail, but a fallback keeps construction infallible.
    Histogram::new_with_bounds(1, 3_600_000_000, 2)
        .or_else(|_| Histogram::new(2))
        .unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            commits: AtomicU64::new(0),
            aborts_conflict: AtomicU64::new(0),
            aborts_assertion: AtomicU64::new(0),
            aborts_timeout: AtomicU64::new(0),
            aborts_admission: AtomicU64::new(0),
            aborts_permission: AtomicU64::new(0),
            aborts_other: AtomicU64::new(0),
            idempotent_replays: AtomicU64::new(0),
            latency_visible: Mutex::new(histogram()),
            latency_durable: Mutex::new(histogram()),
            callers: Mutex::new(HashMap::new()),
        }
    }
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_latency(&self, finality: CommitFinality, d: Duration) {
        let us = (d.as_micros() as u64).max(1);
        let h = match finality {
            CommitFinality::Visible => &self.latency_visible,
            CommitFinality::Durable => &self.latency_durable,
        };
        h.lock().saturating_record(us);
    }

    pub fn alert(&self, caller: &str, kind: AlertKind) {
        let mut callers = self.callers.lock();
        let key = if callers.contains_key(caller) || callers.len() < MAX_CALLERS {
            caller
        } else {
            "_other"
        };
        let w = callers.entry(key.to_string()).or_default();
        w.totals[slot(kind)] += 1;
        w.recent.push_back((Instant::now(), kind));
        if w.recent.len() > EVENTS_PER_CALLER {
            w.recent.pop_front();
        }
    }

    fn summary(h: &Mutex<Histogram<u64>>) -> LatencySummary {
        let h = h.lock();
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p95_us: h.value_at_quantile(0.95),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }

    pub fn fill(&self, m: &mut OperationalMetrics) {
        m.commits = load(&self.commits);
        m.aborts_conflict = load(&self.aborts_conflict);
        m.aborts_assertion = load(&self.aborts_assertion);
        m.aborts_timeout = load(&self.aborts_timeout);
        m.aborts_admission = load(&self.aborts_admission);
        m.aborts_permission = load(&self.aborts_permission);
        m.aborts_other = load(&self.aborts_other);
        m.idempotent_replays = load(&self.idempotent_replays);
        m.admission_rejections = m.aborts_admission;
        m.commit_latency_visible = Self::summary(&self.latency_visible);
        m.commit_latency_durable = Self::summary(&self.latency_durable);
        let now = Instant::now();
        let mut callers = self.callers.lock();
        let mut per_caller = Vec::with_capacity(callers.len());
        for (caller, w) in callers.iter_mut() {
            while w
                .recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > ALERT_WINDOW)
            {
                w.recent.pop_front();
            }
            let mut window = [0u64; 4];
            for (_, k) in &w.recent {
                window[slot(*k)] += 1;
            }
            per_caller.push(CallerAlertCounters {
                caller: caller.clone(),
                assertion_failures: w.totals[0],
                permission_denials: w.totals[1],
                global_admin_uses: w.totals[2],
                permission_changes: w.totals[3],
                assertion_failures_5m: window[0],
                permission_denials_5m: window[1],
                global_admin_uses_5m: window[2],
                permission_changes_5m: window[3],
            });
        }
        per_caller.sort_by(|a, b| a.caller.cmp(&b.caller));
        m.assertion_failures = per_caller.iter().map(|c| c.assertion_failures).sum();
        m.permission_denials = per_caller.iter().map(|c| c.permission_denials).sum();
        m.global_admin_uses = per_caller.iter().map(|c| c.global_admin_uses).sum();
        m.permission_changes = per_caller.iter().map(|c| c.permission_changes).sum();
        m.per_caller = per_caller;
    }
}

/// Commit latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Alert signals for one caller: totals since open and counts in the last
/// [`ALERT_WINDOW`] (5 minutes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallerAlertCounters {
    pub caller: String,
    pub assertion_failures: u64,
    pub permission_denials: u64,
    pub global_admin_uses: u64,
    pub permission_changes: u64,
    pub assertion_failures_5m: u64,
    pub permission_denials_5m: u64,
    pub global_admin_uses_5m: u64,
    pub permission_changes_5m: u64,
}

/// A point-in-time view of the engine's health counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OperationalMetrics {
    pub commits: u64,
    pub aborts_conflict: u64,
    pub aborts_assertion: u64,
    pub aborts_timeout: u64,
    pub aborts_admission: u64,
    pub aborts_permission: u64,
    pub aborts_other: u64,
    pub idempotent_replays: u64,
    pub admission_rejections: u64,
    pub commit_latency_visible: LatencySummary,
    pub commit_latency_durable: LatencySummary,
    pub fsyncs: u64,
    pub head_seq: u64,
    pub durable_seq: u64,
    pub queued_commits: u64,
    pub wal_pending_bytes: u64,
    /// Bytes appended to the WAL since this instance opened.
    pub wal_bytes_written: u64,
    /// Live WAL segment files.
    pub wal_segments: u64,
    /// Table files holding the user data (as the manifest lists them).
    pub table_files: u64,
    /// Their total size in bytes.
    pub table_bytes: u64,
    pub checkpoint_lsn: Option<u64>,
    /// Seconds since the live checkpoint was written (None: the database has none).
    pub checkpoint_age_secs: Option<f64>,
    /// Duration of the last checkpoint written by this instance.
    pub checkpoint_duration_secs: Option<f64>,
    /// A WAL write, fsync or manifest update failed: the instance refuses commits
    /// and reads until it is reopened (alert on it).
    pub poisoned: bool,
    /// Deleted keys and rows still held in memory as tombstones (conflict
    /// detection for transactions open before the delete); purged as the oldest
    /// open write transaction moves past them.
    pub tombstones: u64,
    pub assertion_failures: u64,
    pub permission_denials: u64,
    pub global_admin_uses: u64,
    pub permission_changes: u64,
    pub per_caller: Vec<CallerAlertCounters>,
    /// The commit admission rate in force (None: unlimited), as set at open
    /// (`Limits::max_commits_per_sec`) or since by `set_max_commits_per_sec_as`.
    pub max_commits_per_sec: Option<u32>,
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
