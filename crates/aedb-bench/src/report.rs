//! Figures, their JSON lines, and the comparison table with targets.

use std::fmt::Write as _;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub workload: &'static str,
    pub engine: &'static str,
    pub metric: &'static str,
    pub value: f64,
}

/// Table rows, in reading order.
const ROWS: [(&str, &str); 23] = [
    ("W1", "commits_per_s"),
    ("W2", "commits_per_s"),
    ("W3", "commits_per_s"),
    ("W4", "load_s"),
    ("W4", "gets_per_s"),
    ("W4", "scan_keys_per_s"),
    ("W4", "peak_rss_bytes"),
    ("W4", "checkpoint_s"),
    ("W4", "checkpoint_max_commit_stall_s"),
    ("W5", "reopen_s"),
    ("W5", "backup_full_s"),
    ("W5", "backup_incremental_s"),
    ("W5", "restore_verify_s"),
    ("W6", "load_s"),
    ("W6", "load_keys_per_s"),
    ("W6", "load_mib_per_s"),
    ("W6", "gets_per_s"),
    ("W6", "scan_keys_per_s"),
    ("W6", "peak_rss_bytes"),
    ("W6", "reopen_s"),
    ("W6", "max_commit_stall_s"),
    ("W6", "p99_commit_s"),
    ("W6", "data_dir_bytes"),
];

const ENGINE_COLUMNS: [&str; 5] = ["aedb", "aedb_enc", "redb", "sqlite", "fsync_floor"];
const RATIO_PEERS: [&str; 3] = ["redb", "sqlite", "fsync_floor"];
/// The encrypted variant, compared with plain aedb in its own ratio column.
const ENC: &str = "aedb_enc";

/// A goal for one of aedb's figures.
struct Target {
    workload: &'static str,
    metric: &'static str,
    goal: Goal,
    label: &'static str,
}

enum Goal {
    /// aedb's advantage ratio (see `advantage`) over `peer` is at least `min`.
    Advantage { peer: &'static str, min: f64 },
    /// aedb's own figure is at most this (times in seconds, sizes in bytes).
    AtMost(f64),
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

const TARGETS: [Target; 14] = [
    Target {
        workload: "W1",
        metric: "commits_per_s",
        goal: Goal::Advantage {
            peer: "sqlite",
            min: 1.0,
        },
        label: ">=1.0x sqlite",
    },
    Target {
        workload: "W1",
        metric: "commits_per_s",
        goal: Goal::Advantage {
            peer: "fsync_floor",
            min: 0.9,
        },
        label: ">=0.9x floor",
    },
    Target {
        workload: "W2",
        metric: "commits_per_s",
        goal: Goal::Advantage {
            peer: "sqlite",
            min: 3.0,
        },
        label: ">=3x sqlite",
    },
    Target {
        workload: "W3",
        metric: "commits_per_s",
        goal: Goal::Advantage {
            peer: "redb",
            min: 1.5,
        },
        label: ">=1.5x redb",
    },
    Target {
        workload: "W4",
        metric: "load_s",
        goal: Goal::Advantage {
            peer: "redb",
            min: 1.5,
        },
        label: ">=1.5x redb",
    },
    Target {
        workload: "W4",
        metric: "gets_per_s",
        goal: Goal::Advantage {
            peer: "redb",
            min: 1.0,
        },
        label: ">=1x redb",
    },
    Target {
        workload: "W4",
        metric: "peak_rss_bytes",
        goal: Goal::Advantage {
            peer: "redb",
            min: 0.5,
        },
        label: ">=0.5x redb (RSS <=2x)",
    },
    Target {
        workload: "W5",
        metric: "backup_full_s",
        goal: Goal::Advantage {
            peer: "sqlite",
            min: 0.5,
        },
        label: ">=0.5x sqlite (time <=2x)",
    },
    Target {
        workload: "W6",
        metric: "load_keys_per_s",
        goal: Goal::Advantage {
            peer: "redb",
            min: 1.0,
        },
        label: ">=1.0x redb",
    },
    Target {
        workload: "W6",
        metric: "gets_per_s",
        goal: Goal::Advantage {
            peer: "redb",
            min: 0.5,
        },
        label: ">=0.5x redb",
    },
    Target {
        workload: "W6",
        metric: "peak_rss_bytes",
        goal: Goal::AtMost(GIB),
        label: "<=1 GiB",
    },
    Target {
        workload: "W6",
        metric: "peak_rss_bytes",
        goal: Goal::Advantage {
            peer: "redb",
            min: 0.5,
        },
        label: ">=0.5x redb (RSS <=2x)",
    },
    Target {
        workload: "W6",
        metric: "reopen_s",
        goal: Goal::AtMost(1.0),
        label: "<=1 s",
    },
    Target {
        workload: "W6",
        metric: "max_commit_stall_s",
        goal: Goal::AtMost(0.050),
        label: "<=50 ms",
    },
];

fn higher_is_better(metric: &str) -> bool {
    metric.ends_with("_per_s")
}

/// aedb's advantage over a peer, oriented so that >1 always means aedb is
/// better: aedb/peer for throughput, peer/aedb for times and memory. The
/// aedb_enc/aedb column is aedb_enc's advantage over aedb, the same way.
pub fn advantage(metric: &str, aedb: f64, peer: f64) -> f64 {
    if higher_is_better(metric) {
        aedb / peer
    } else {
        peer / aedb
    }
}

pub fn format_value(metric: &str, value: f64) -> String {
    if metric.ends_with("_bytes") {
        format!("{:.1} MiB", value / (1024.0 * 1024.0))
    } else if metric.ends_with("_per_s") {
        if value >= 100.0 {
            group_thousands(value.round() as u64)
        } else {
            format!("{value:.1}")
        }
    } else if value >= 1.0 {
        format!("{value:.3} s")
    } else {
        format!("{:.2} ms", value * 1e3)
    }
}

fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn find(figures: &[Figure], workload: &str, engine: &str, metric: &str) -> Option<f64> {
    figures
        .iter()
        .find(|f| f.workload == workload && f.engine == engine && f.metric == metric)
        .map(|f| f.value)
}

/// Renders the comparison table. Rows with no figures at all are skipped;
/// missing cells (engine not selected or failed) show as "-".
pub fn render_table(figures: &[Figure]) -> String {
    let mut header: Vec<String> = vec!["workload".into(), "metric".into()];
    header.extend(ENGINE_COLUMNS.iter().map(|e| e.to_string()));
    header.extend(RATIO_PEERS.iter().map(|p| {
        let short = p.trim_start_matches("fsync_");
        format!("aedb/{short}")
    }));
    header.push(format!("{ENC}/aedb"));
    header.push("targets (on the ratios)".into());

    let mut rows = vec![header];
    for (workload, metric) in ROWS {
        let cells: Vec<Option<f64>> = ENGINE_COLUMNS
            .iter()
            .map(|e| find(figures, workload, e, metric))
            .collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        let aedb = cells[0];
        let mut row = vec![workload.to_string(), metric.to_string()];
        row.extend(
            cells
                .iter()
                .map(|c| c.map_or_else(|| "-".into(), |v| format_value(metric, v))),
        );
        for peer in RATIO_PEERS {
            let ratio = aedb.zip(find(figures, workload, peer, metric));
            row.push(ratio.map_or_else(
                || "-".into(),
                |(a, p)| format!("{:.2}x", advantage(metric, a, p)),
            ));
        }
        let enc = find(figures, workload, ENC, metric).zip(aedb);
        row.push(enc.map_or_else(
            || "-".into(),
            |(e, a)| format!("{:.2}x", advantage(metric, e, a)),
        ));
        row.push(target_text(figures, workload, metric));
        rows.push(row);
    }

    let widths: Vec<usize> = (0..rows[0].len())
        .map(|col| {
            rows.iter()
                .map(|r| r[col].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (col, cell) in row.iter().enumerate() {
            let pad = widths[col] - cell.chars().count();
            // Text columns left-aligned, numbers right-aligned.
            if col < 2 || col + 1 == row.len() {
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(line, "{}{cell}  ", " ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if n == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

fn target_text(figures: &[Figure], workload: &str, metric: &str) -> String {
    let parts: Vec<String> = TARGETS
        .iter()
        .filter(|t| t.workload == workload && t.metric == metric)
        .map(|t| {
            let aedb = find(figures, workload, "aedb", metric);
            let met = match t.goal {
                Goal::Advantage { peer, min } => aedb
                    .zip(find(figures, workload, peer, metric))
                    .map(|(a, p)| advantage(metric, a, p) >= min),
                Goal::AtMost(limit) => aedb.map(|a| a <= limit),
            };
            let verdict = match met {
                Some(true) => "ok",
                Some(false) => "MISS",
                None => "n/a",
            };
            format!("{} {verdict}", t.label)
        })
        .collect();
    if parts.is_empty() && workload == "W5" {
        return "report only".into();
    }
    parts.join("; ")
}

/// Lines printed under the table so its numbers can be read correctly.
pub const NOTES: &str = "\
Ratios are aedb's advantage: >1 means aedb is better (aedb/peer for throughput, \
peer/aedb for times and RSS). aedb_enc/aedb is the encrypted variant's advantage over plain \
aedb the same way: below 1 is the cost of encryption.
aedb is the development config (no keys); aedb_enc is AedbConfig::production(key)\
.with_checkpoint_key(key2) (the development handle over that production config): signed \
manifest, keyed WAL hash chain, AES-256-GCM WAL frames and checkpoints. Both use the default automatic checkpoints (every 64 MiB of WAL).
W1/W2/W4 durable: aedb Full+Durable; redb Durability::Immediate; sqlite WAL synchronous=FULL.
W3 relaxed: aedb Batch+Visible; redb Durability::None (no fsync; redb 4 has nothing in between); \
sqlite WAL synchronous=NORMAL.
W4/W5 run each engine in its own child process; peak RSS is that process's VmHWM, taken \
before the checkpoint.
W4 checkpoint (aedb only): after the gets and scan, an on-demand checkpoint of the whole data \
set while one thread commits single keys durably; checkpoint_s is the engine-reported duration, \
checkpoint_max_commit_stall_s the longest single commit overlapping the checkpoint call. W5 \
reopen then loads that checkpoint and replays only the log written after it.
W5 backups (aedb and sqlite; redb has no online backup), on the reopened store: \
backup_full_s is aedb backup_full into a fresh dir (a copy of the live checkpoint and the WAL \
after it, plus a signed descriptor with per-keyspace digests) vs sqlite's online backup API \
copying every page in one step; backup_incremental_s (aedb only) is backup_incremental of the WAL after 10,000 more keys \
in 100 durable commits; restore_verify_s is aedb restore_from_backup_chain of full+incremental \
(verifies signatures, hashes, links and the WAL chain, opens strictly, checks digests) vs \
sqlite copying its backup file into place, opening it and running PRAGMA integrity_check.";

/// Printed under the table when W6 ran.
pub const W6_NOTES: &str = "\
W6: each engine in its own child process, one after another, each in a fresh directory removed \
afterwards. Keys are 16 bytes (a seeded splitmix64 stream), values 1 KiB of seeded random bytes \
(incompressible), loaded in durable commits of 1,000 random keys (aedb Full+Durable, redb \
Immediate, sqlite synchronous=FULL). load_mib_per_s counts key and value bytes. Then random gets \
of loaded keys and one range scan on a snapshot, then close, reopen and first read (reopen_s). \
max_commit_stall_s is the longest single batch commit of the load (a background flush, \
checkpoint or compaction shows here), p99_commit_s its 99th percentile. peak_rss_bytes is the \
child's VmHWM at its end (reopen included); data_dir_bytes the blocks allocated under the store \
after the final close. Engines use their default caches (redb: 1 GiB).";

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(
        workload: &'static str,
        engine: &'static str,
        metric: &'static str,
        value: f64,
    ) -> Figure {
        Figure {
            workload,
            engine,
            metric,
            value,
        }
    }

    #[test]
    fn absolute_and_ratio_targets_are_judged_on_aedb() {
        let figures = [
            figure("W6", "aedb", "peak_rss_bytes", 3.0 * GIB),
            figure("W6", "redb", "peak_rss_bytes", 1.0 * GIB),
            figure("W6", "aedb", "reopen_s", 0.4),
            figure("W6", "aedb", "max_commit_stall_s", 0.051),
            figure("W6", "aedb", "gets_per_s", 500.0),
            figure("W6", "redb", "gets_per_s", 1_000.0),
        ];
        assert_eq!(
            target_text(&figures, "W6", "peak_rss_bytes"),
            "<=1 GiB MISS; >=0.5x redb (RSS <=2x) MISS"
        );
        assert_eq!(target_text(&figures, "W6", "reopen_s"), "<=1 s ok");
        assert_eq!(
            target_text(&figures, "W6", "max_commit_stall_s"),
            "<=50 ms MISS"
        );
        assert_eq!(target_text(&figures, "W6", "gets_per_s"), ">=0.5x redb ok");
        assert_eq!(
            target_text(&figures, "W6", "load_keys_per_s"),
            ">=1.0x redb n/a"
        );
    }

    #[test]
    fn w6_rows_appear_in_the_table() {
        let figures = [
            figure("W6", "aedb", "load_keys_per_s", 2_000.0),
            figure("W6", "redb", "load_keys_per_s", 1_000.0),
            figure("W6", "aedb", "data_dir_bytes", 2.0 * 1024.0 * 1024.0),
        ];
        let table = render_table(&figures);
        let load = table
            .lines()
            .find(|l| l.contains("load_keys_per_s"))
            .expect("a load_keys_per_s row");
        assert!(
            load.contains("2.00x") && load.ends_with(">=1.0x redb ok"),
            "{load}"
        );
        assert!(table.contains("2.0 MiB"), "{table}");
        assert!(
            !table.contains("gets_per_s"),
            "rows without figures are skipped"
        );
    }
}
