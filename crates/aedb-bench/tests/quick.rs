//! End-to-end check of the harness: a `--quick --json` run must produce every
//! figure it promises. Deliberately asserts nothing about speed.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// (workload, engine, metric) of each figure a run reported.
type Figures = BTreeSet<(String, String, String)>;

/// Runs aedb-bench with `args` and `--dir dir`; the (workload, engine, metric)
/// of every JSON line, each checked to be a finite positive figure, and the
/// run's stderr for messages.
fn figures(args: &[&str], dir: &std::path::Path) -> Result<(Figures, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_aedb-bench"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        output.status.success(),
        "aedb-bench failed ({}):\n{stderr}",
        output.status
    );

    let mut seen = BTreeSet::new();
    for line in String::from_utf8(output.stdout)?.lines() {
        let figure: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
        let field = |name: &str| -> Result<String> {
            Ok(figure[name]
                .as_str()
                .with_context(|| format!("{name} missing in {line}"))?
                .to_owned())
        };
        let value = figure["value"]
            .as_f64()
            .with_context(|| format!("value missing in {line}"))?;
        ensure!(
            value.is_finite() && value > 0.0,
            "non-positive figure: {line}"
        );
        seen.insert((field("workload")?, field("engine")?, field("metric")?));
    }
    Ok((seen, stderr))
}

#[test]
fn quick_json_run_reports_every_figure() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let (seen, stderr) = figures(&["--quick", "--json"], scratch.path())?;

    let databases = ["aedb", "aedb_enc", "redb", "sqlite"];
    let mut expected = BTreeSet::new();
    for engine in databases.iter().chain(&["fsync_floor"]) {
        expected.insert(("W1", *engine, "commits_per_s"));
    }
    for engine in databases {
        expected.insert(("W2", engine, "commits_per_s"));
        expected.insert(("W3", engine, "commits_per_s"));
        for metric in ["load_s", "gets_per_s", "scan_keys_per_s", "peak_rss_bytes"] {
            expected.insert(("W4", engine, metric));
        }
        expected.insert(("W5", engine, "reopen_s"));
    }
    // Only aedb has an on-demand checkpoint to measure, and an incremental
    // backup.
    for engine in ["aedb", "aedb_enc"] {
        for metric in ["checkpoint_s", "checkpoint_max_commit_stall_s"] {
            expected.insert(("W4", engine, metric));
        }
        expected.insert(("W5", engine, "backup_incremental_s"));
    }
    // redb has no online backup.
    for engine in ["aedb", "aedb_enc", "sqlite"] {
        for metric in ["backup_full_s", "restore_verify_s"] {
            expected.insert(("W5", engine, metric));
        }
    }
    let expected: BTreeSet<(String, String, String)> = expected
        .into_iter()
        .map(|(w, e, m)| (w.to_owned(), e.to_owned(), m.to_owned()))
        .collect();

    let missing: Vec<_> = expected.difference(&seen).collect();
    ensure!(missing.is_empty(), "missing figures: {missing:?}\n{stderr}");
    let unexpected: Vec<_> = seen.difference(&expected).collect();
    ensure!(
        unexpected.is_empty(),
        "unexpected figures: {unexpected:?}\n{stderr}"
    );
    Ok(())
}

/// W6 only runs when named (the run above would report its figures as
/// unexpected otherwise). At 20k keys this checks its figures are all there
/// and that the run leaves nothing behind in `--dir`.
#[test]
fn quick_w6_json_run_reports_every_figure_and_cleans_up() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let (seen, stderr) = figures(
        &[
            "--quick",
            "--json",
            "--workloads",
            "W6",
            "--w6-keys",
            "20000",
        ],
        scratch.path(),
    )?;

    let metrics = [
        "load_s",
        "load_keys_per_s",
        "load_mib_per_s",
        "gets_per_s",
        "scan_keys_per_s",
        "peak_rss_bytes",
        "reopen_s",
        "max_commit_stall_s",
        "p99_commit_s",
        "data_dir_bytes",
    ];
    let mut expected = BTreeSet::new();
    for engine in ["aedb", "aedb_enc", "redb", "sqlite"] {
        for metric in metrics {
            expected.insert(("W6".to_owned(), engine.to_owned(), metric.to_owned()));
        }
    }
    ensure!(
        seen == expected,
        "missing: {:?}\nunexpected: {:?}\n{stderr}",
        expected.difference(&seen).collect::<Vec<_>>(),
        seen.difference(&expected).collect::<Vec<_>>()
    );

    let left: Vec<_> = std::fs::read_dir(scratch.path())?.collect::<Result<_, _>>()?;
    ensure!(left.is_empty(), "left behind in --dir: {left:?}");
    Ok(())
}
