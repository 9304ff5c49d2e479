//! The embedded store's `operational_metrics()` as `aedb_*` families, read at
//! scrape time: a Prometheus collector, so every scrape sees the engine's own
//! counters (since the instance opened, which is when this process started)
//! rather than a copy that could drift. A store without an engine (PostgreSQL)
//! exports none of them.
//!
//! The per-caller alert counters carry a `caller` label. aedb keeps up to
//! 10,000 callers, far more than a label should have, so the first
//! [`MAX_CALLER_LABELS`] callers seen keep their name for the life of the
//! process and every later one is summed into `caller="_other"`: the set of
//! series stays bounded and each stays monotonic.

use std::collections::BTreeSet;
use std::sync::Arc;

use aedb::{LatencySummary, OperationalMetrics};
use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

/// Callers exported under their own name; the rest are `_other`.
pub const MAX_CALLER_LABELS: usize = 32;
/// The label of the callers beyond [`MAX_CALLER_LABELS`].
pub const OTHER_CALLER: &str = "_other";
/// Abort causes, as `aedb_aborts_total{cause}`.
pub const ABORT_CAUSES: &[&str] = &[
    "conflict",
    "assertion",
    "timeout",
    "admission",
    "permission",
    "other",
];

/// Reads the engine's metrics; `None` when the store has no engine.
pub type Source = Arc<dyn Fn() -> Option<OperationalMetrics> + Send + Sync>;

struct Families {
    commits: IntCounter,
    aborts: IntCounterVec,
    idempotent_replays: IntCounter,
    admission_rejections: IntCounter,
    commit_latency: GaugeVec,
    commits_by_finality: IntCounterVec,
    fsyncs: IntCounter,
    commits_per_fsync: Gauge,
    head_seq: IntGauge,
    durable_seq: IntGauge,
    queued_commits: IntGauge,
    wal_pending_bytes: IntGauge,
    wal_bytes_written: IntCounter,
    wal_segments: IntGauge,
    checkpoint_age: Gauge,
    checkpoint_duration: Gauge,
    poisoned: IntGauge,
    tombstones: IntGauge,
    assertion_failures: IntCounterVec,
    permission_denials: IntCounterVec,
    global_admin_uses: IntCounterVec,
    permission_changes: IntCounterVec,
    assertion_failures_5m: IntGaugeVec,
    permission_denials_5m: IntGaugeVec,
    global_admin_uses_5m: IntGaugeVec,
    permission_changes_5m: IntGaugeVec,
    admission_max_commits_per_sec: IntGauge,
}

/// The `aedb_*` collector; register it once (`Metrics::register_aedb`).
pub struct AedbCollector {
    source: Source,
    families: Mutex<Families>,
    descs: Vec<Desc>,
    /// Callers exported under their own name (sticky, at most
    /// [`MAX_CALLER_LABELS`]).
    named: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for AedbCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AedbCollector")
    }
}

fn counter(name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    IntCounter::new(name, help)
}

fn counter_vec(
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gauge(name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    IntGauge::new(name, help)
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

impl Families {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            commits: counter("aedb_commits_total", "Transactions committed")?,
            aborts: counter_vec(
                "aedb_aborts_total",
                "Transactions aborted, by cause (conflict, assertion, timeout, admission, permission, other)",
                &["cause"],
            )?,
            idempotent_replays: counter(
                "aedb_idempotent_replays_total",
                "Commits answered from an idempotency key without applying again",
            )?,
            admission_rejections: counter(
                "aedb_admission_rejections_total",
                "Commits refused by admission control (queue full or rate limit)",
            )?,
            commit_latency: GaugeVec::new(
                Opts::new(
                    "aedb_commit_latency_seconds",
                    "Commit latency percentiles since the store opened, by finality (quantile 1 is the maximum)",
                ),
                &["finality", "quantile"],
            )?,
            commits_by_finality: counter_vec(
                "aedb_commits_by_finality_total",
                "Commits whose latency was recorded, by finality (visible, durable)",
                &["finality"],
            )?,
            fsyncs: counter("aedb_fsyncs_total", "WAL fsyncs")?,
            commits_per_fsync: Gauge::new(
                "aedb_commits_per_fsync",
                "Commits covered by one fsync on average (group-commit efficiency)",
            )?,
            head_seq: gauge(
                "aedb_head_seq",
                "Sequence number of the last applied commit",
            )?,
            durable_seq: gauge(
                "aedb_durable_seq",
                "Sequence number of the last fsynced commit",
            )?,
            queued_commits: gauge("aedb_queued_commits", "Commits waiting in the queue")?,
            wal_pending_bytes: gauge(
                "aedb_wal_pending_bytes",
                "WAL bytes written but not yet fsynced",
            )?,
            wal_bytes_written: counter(
                "aedb_wal_bytes_written_total",
                "Bytes appended to the WAL",
            )?,
            wal_segments: gauge("aedb_wal_segments", "Live WAL segment files")?,
            checkpoint_age: Gauge::new(
                "aedb_checkpoint_age_seconds",
                "Seconds since the live checkpoint was written (absent: the database has none yet)",
            )?,
            checkpoint_duration: Gauge::new(
                "aedb_checkpoint_duration_seconds",
                "Duration of the last checkpoint this process wrote (absent: none yet)",
            )?,
            poisoned: gauge(
                "aedb_poisoned",
                "1 when a WAL write, fsync or manifest update failed: the store refuses commits and reads until reopened",
            )?,
            tombstones: gauge(
                "aedb_tombstones",
                "Deleted keys and rows still held in memory for conflict detection",
            )?,
            assertion_failures: counter_vec(
                "aedb_assertion_failures_total",
                "Commits refused because an assertion did not hold, by caller",
                &["caller"],
            )?,
            permission_denials: counter_vec(
                "aedb_permission_denials_total",
                "Operations denied by aedb's authorization, by caller",
                &["caller"],
            )?,
            global_admin_uses: counter_vec(
                "aedb_global_admin_uses_total",
                "Operations allowed only by GlobalAdmin, by caller",
                &["caller"],
            )?,
            permission_changes: counter_vec(
                "aedb_permission_changes_total",
                "Grants, revokes and ownership transfers, by caller",
                &["caller"],
            )?,
            assertion_failures_5m: gauge_vec(
                "aedb_assertion_failures_5m",
                "Failed assertions in the last 5 minutes, by caller",
                &["caller"],
            )?,
            permission_denials_5m: gauge_vec(
                "aedb_permission_denials_5m",
                "Permission denials in the last 5 minutes, by caller",
                &["caller"],
            )?,
            global_admin_uses_5m: gauge_vec(
                "aedb_global_admin_uses_5m",
                "GlobalAdmin uses in the last 5 minutes, by caller",
                &["caller"],
            )?,
            permission_changes_5m: gauge_vec(
                "aedb_permission_changes_5m",
                "Permission changes in the last 5 minutes, by caller",
                &["caller"],
            )?,
            admission_max_commits_per_sec: gauge(
                "aedb_admission_max_commits_per_sec",
                "Commits admitted per second (0: unlimited); set at runtime by `aragora admission`",
            )?,
        })
    }

    /// Every family but the two checkpoint gauges (see `gather`).
    fn collectors(&self) -> Vec<&dyn Collector> {
        vec![
            &self.commits,
            &self.aborts,
            &self.idempotent_replays,
            &self.admission_rejections,
            &self.commit_latency,
            &self.commits_by_finality,
            &self.fsyncs,
            &self.commits_per_fsync,
            &self.head_seq,
            &self.durable_seq,
            &self.queued_commits,
            &self.wal_pending_bytes,
            &self.wal_bytes_written,
            &self.wal_segments,
            &self.poisoned,
            &self.tombstones,
            &self.assertion_failures,
            &self.permission_denials,
            &self.global_admin_uses,
            &self.permission_changes,
            &self.assertion_failures_5m,
            &self.permission_denials_5m,
            &self.global_admin_uses_5m,
            &self.permission_changes_5m,
            &self.admission_max_commits_per_sec,
        ]
    }

    /// Sets every family from one snapshot. Counters are rebuilt from zero
    /// (`reset` + `inc_by`): the snapshot holds totals, not increments.
    fn load(&self, m: &OperationalMetrics, named: &mut BTreeSet<String>) {
        set_counter(&self.commits, m.commits);
        self.aborts.reset();
        for (cause, v) in ABORT_CAUSES.iter().zip([
            m.aborts_conflict,
            m.aborts_assertion,
            m.aborts_timeout,
            m.aborts_admission,
            m.aborts_permission,
            m.aborts_other,
        ]) {
            self.aborts.with_label_values(&[cause]).inc_by(v);
        }
        set_counter(&self.idempotent_replays, m.idempotent_replays);
        set_counter(&self.admission_rejections, m.admission_rejections);
        self.commit_latency.reset();
        self.commits_by_finality.reset();
        for (finality, s) in [
            ("visible", &m.commit_latency_visible),
            ("durable", &m.commit_latency_durable),
        ] {
            self.commits_by_finality
                .with_label_values(&[finality])
                .inc_by(s.count);
            for (q, us) in quantiles(s) {
                self.commit_latency
                    .with_label_values(&[finality, q])
                    .set(us as f64 / 1e6);
            }
        }
        set_counter(&self.fsyncs, m.fsyncs);
        self.commits_per_fsync.set(m.commits_per_fsync());
        self.head_seq.set(clamp(m.head_seq));
        self.durable_seq.set(clamp(m.durable_seq));
        self.queued_commits.set(clamp(m.queued_commits));
        self.wal_pending_bytes.set(clamp(m.wal_pending_bytes));
        set_counter(&self.wal_bytes_written, m.wal_bytes_written);
        self.wal_segments.set(clamp(m.wal_segments));
        self.checkpoint_age
            .set(m.checkpoint_age_secs.unwrap_or(0.0));
        self.checkpoint_duration
            .set(m.checkpoint_duration_secs.unwrap_or(0.0));
        self.poisoned.set(i64::from(m.poisoned));
        self.tombstones.set(clamp(m.tombstones));
        self.admission_max_commits_per_sec
            .set(i64::from(m.max_commits_per_sec.unwrap_or(0)));

        for c in &m.per_caller {
            if named.len() < MAX_CALLER_LABELS && c.caller != OTHER_CALLER {
                named.insert(c.caller.clone());
            }
        }
        let per_caller = [
            (&self.assertion_failures, &self.assertion_failures_5m),
            (&self.permission_denials, &self.permission_denials_5m),
            (&self.global_admin_uses, &self.global_admin_uses_5m),
            (&self.permission_changes, &self.permission_changes_5m),
        ];
        for (total, window) in per_caller {
            total.reset();
            window.reset();
        }
        for c in &m.per_caller {
            let label = if named.contains(&c.caller) {
                c.caller.as_str()
            } else {
                OTHER_CALLER
            };
            for ((total, window), (t, w)) in per_caller.iter().zip([
                (c.assertion_failures, c.assertion_failures_5m),
                (c.permission_denials, c.permission_denials_5m),
                (c.global_admin_uses, c.global_admin_uses_5m),
                (c.permission_changes, c.permission_changes_5m),
            ]) {
                total.with_label_values(&[label]).inc_by(t);
                window.with_label_values(&[label]).add(clamp(w));
            }
        }
    }

    /// The families to expose: the two checkpoint gauges only once there is
    /// a value (0 would read as "just written").
    fn gather(&self, m: &OperationalMetrics) -> Vec<MetricFamily> {
        let mut out: Vec<MetricFamily> =
            self.collectors().iter().flat_map(|c| c.collect()).collect();
        if m.checkpoint_age_secs.is_some() {
            out.extend(self.checkpoint_age.collect());
        }
        if m.checkpoint_duration_secs.is_some() {
            out.extend(self.checkpoint_duration.collect());
        }
        out
    }
}

fn set_counter(c: &IntCounter, v: u64) {
    c.reset();
    c.inc_by(v);
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn quantiles(s: &LatencySummary) -> [(&'static str, u64); 4] {
    [
        ("0.5", s.p50_us),
        ("0.95", s.p95_us),
        ("0.99", s.p99_us),
        ("1", s.max_us),
    ]
}

impl AedbCollector {
    pub fn new(source: Source) -> Result<Self, prometheus::Error> {
        let families = Families::new()?;
        let mut all = families.collectors();
        all.push(&families.checkpoint_age);
        all.push(&families.checkpoint_duration);
        let descs = all
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Ok(Self {
            source,
            families: Mutex::new(families),
            descs,
            named: Mutex::new(BTreeSet::new()),
        })
    }
}

impl Collector for AedbCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(m) = (self.source)() else {
            return Vec::new();
        };
        // One scrape at a time: `load` resets and refills the families.
        let families = self.families.lock();
        families.load(&m, &mut self.named.lock());
        families.gather(&m)
    }
}

#[cfg(test)]
mod tests {
    use aedb::CallerAlertCounters;

    use super::*;

    fn caller(name: &str, global_admin_uses: u64) -> CallerAlertCounters {
        CallerAlertCounters {
            caller: name.into(),
            global_admin_uses,
            global_admin_uses_5m: global_admin_uses,
            ..Default::default()
        }
    }

    fn render(c: AedbCollector) -> String {
        let r = prometheus::Registry::new();
        r.register(Box::new(c)).expect("register");
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut buf)
            .expect("encode");
        String::from_utf8(buf).expect("utf-8")
    }

    /// Thousands of distinct callers must not become thousands of series.
    #[test]
    fn caller_labels_are_capped_and_the_rest_summed_into_other() {
        let m = OperationalMetrics {
            per_caller: (0..100).map(|i| caller(&format!("c{i:03}"), 1)).collect(),
            ..Default::default()
        };
        let text =
            render(AedbCollector::new(Arc::new(move || Some(m.clone()))).expect("collector"));
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("aedb_global_admin_uses_total{"))
            .collect();
        assert_eq!(series.len(), MAX_CALLER_LABELS + 1, "{series:?}");
        let other = format!("aedb_global_admin_uses_total{{caller=\"{OTHER_CALLER}\"}} 68");
        assert!(text.contains(&other), "{text}");
    }

    #[test]
    fn a_store_without_an_engine_exports_nothing() {
        let text = render(AedbCollector::new(Arc::new(|| None)).expect("collector"));
        assert!(!text.contains("aedb_"), "{text}");
    }

    #[test]
    fn checkpoint_age_is_absent_until_there_is_a_checkpoint() {
        let none = render(
            AedbCollector::new(Arc::new(|| Some(OperationalMetrics::default())))
                .expect("collector"),
        );
        assert!(!none.contains("aedb_checkpoint_age_seconds"), "{none}");
        assert!(
            none.contains("aedb_aborts_total{cause=\"timeout\"} 0"),
            "{none}"
        );
        let some = render(
            AedbCollector::new(Arc::new(|| {
                Some(OperationalMetrics {
                    checkpoint_age_secs: Some(12.5),
                    poisoned: true,
                    ..Default::default()
                })
            }))
            .expect("collector"),
        );
        assert!(some.contains("aedb_checkpoint_age_seconds 12.5"), "{some}");
        assert!(some.contains("aedb_poisoned 1"), "{some}");
    }

    #[test]
    fn the_admission_rate_gauge_is_zero_when_unlimited() {
        let unlimited = render(
            AedbCollector::new(Arc::new(|| Some(OperationalMetrics::default())))
                .expect("collector"),
        );
        assert!(
            unlimited.contains("aedb_admission_max_commits_per_sec 0"),
            "{unlimited}"
        );
        let limited = render(
            AedbCollector::new(Arc::new(|| {
                Some(OperationalMetrics {
                    max_commits_per_sec: Some(7),
                    ..Default::default()
                })
            }))
            .expect("collector"),
        );
        assert!(
            limited.contains("aedb_admission_max_commits_per_sec 7"),
            "{limited}"
        );
    }
}
