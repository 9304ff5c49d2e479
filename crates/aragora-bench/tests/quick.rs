//! End-to-end check of the harness: a `--quick --json` run must print every
//! figure it promises, each a positive number. Asserts nothing about speed.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result, ensure};

#[test]
fn quick_json_run_reports_every_figure() -> Result<()> {
    let output = Command::new(env!("CARGO_BIN_EXE_aragora-bench"))
        // Dev-setting iterations: this checks the plumbing, not the cost.
        .args(["--quick", "--json", "--pbkdf2-iterations", "1000"])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "aragora-bench failed ({}):\n{stderr}",
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

    let mut expected = BTreeSet::new();
    for workload in ["crypto_64B", "crypto_16KiB"] {
        for engine in ["aragora", "raw_ring"] {
            for metric in ["records_per_s", "gb_per_s"] {
                expected.insert((workload, engine, metric));
            }
        }
        expected.insert((workload, "aragora", "ratio_vs_raw"));
    }
    for metric in ["p50_s", "p95_s", "iterations"] {
        expected.insert(("pbkdf2_sha256", "aragora", metric));
    }
    for workload in ["rbac_cached", "rbac_uncached"] {
        for metric in ["p50_s", "p99_s"] {
            expected.insert((workload, "aragora", metric));
        }
    }
    for workload in ["http_authorized_get", "http_secret_read"] {
        for metric in ["requests_per_s", "p99_s"] {
            expected.insert((workload, "aragora", metric));
        }
    }
    for metric in ["records_per_s", "seconds_per_1m"] {
        expected.insert(("migration", "aragora", metric));
    }
    let expected: BTreeSet<(String, String, String)> = expected
        .into_iter()
        .map(|(w, e, m)| (w.to_owned(), e.to_owned(), m.to_owned()))
        .collect();
    ensure!(
        seen == expected,
        "figures differ\n missing: {:?}\n unexpected: {:?}",
        expected.difference(&seen).collect::<Vec<_>>(),
        seen.difference(&expected).collect::<Vec<_>>()
    );
    Ok(())
}

/// Whether the services the scale workloads need answer; under `CI=true`
/// they must (the bench then fails naming the missing one), elsewhere a
/// machine without them skips the test.
fn services_or_skip() -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        return true;
    }
    let missing: Vec<&str> = [
        ("PostgreSQL", "127.0.0.1:5432"),
        ("Redis", "127.0.0.1:6379"),
    ]
    .into_iter()
    .filter(|(_, addr)| std::net::TcpStream::connect(addr).is_err())
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() {
        eprintln!("skipped: no {} on this machine", missing.join(" or "));
    }
    missing.is_empty()
}

/// `--workloads scale,catchup --quick`: the three modes side by side, each
/// with its throughput, latency and CPU per request, the PostgreSQL modes
/// with their ratios, and the freshness check's latency. Asserts nothing
/// about speed.
#[test]
fn quick_scale_run_reports_every_mode_and_the_freshness_check() -> Result<()> {
    if !services_or_skip() {
        return Ok(());
    }
    let output = Command::new(env!("CARGO_BIN_EXE_aragora-bench"))
        .args(["--quick", "--json", "--workloads", "scale,catchup"])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "aragora-bench failed ({}):\n{stderr}",
        output.status
    );
    let mut seen = BTreeSet::new();
    for line in String::from_utf8(output.stdout)?.lines() {
        let figure: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
        let value = figure["value"]
            .as_f64()
            .with_context(|| format!("value missing in {line}"))?;
        let field = |n: &str| figure[n].as_str().unwrap_or_default().to_owned();
        // A mode whose requests never reach the database (postgres_redis's
        // confirmed reads) may spend less than one clock tick there.
        let may_be_zero = field("metric") == "db_cpu_s_per_request";
        ensure!(
            value.is_finite() && (value > 0.0 || (may_be_zero && value == 0.0)),
            "non-positive figure: {line}"
        );
        seen.insert((field("workload"), field("engine"), field("metric")));
    }
    let mut expected = BTreeSet::new();
    for workload in ["scale_authorized_get", "scale_secret_read"] {
        for engine in ["embedded", "postgres", "postgres_redis"] {
            for metric in ["requests_per_s", "p50_s", "p99_s", "cpu_s_per_request"] {
                expected.insert((workload, engine, metric));
            }
            if engine != "embedded" {
                for metric in [
                    "db_cpu_s_per_request",
                    "ratio_vs_embedded",
                    "cpu_ratio_vs_embedded",
                ] {
                    expected.insert((workload, engine, metric));
                }
            }
        }
    }
    for engine in [
        "postgres",
        "postgres_middleware",
        "postgres_spawn_blocking",
        "postgres_redis_middleware",
    ] {
        for metric in ["p50_s", "p99_s"] {
            expected.insert(("catchup", engine, metric));
        }
    }
    let expected: BTreeSet<(String, String, String)> = expected
        .into_iter()
        .map(|(w, e, m)| (w.to_owned(), e.to_owned(), m.to_owned()))
        .collect();
    ensure!(
        seen == expected,
        "figures differ\n missing: {:?}\n unexpected: {:?}",
        expected.difference(&seen).collect::<Vec<_>>(),
        seen.difference(&expected).collect::<Vec<_>>()
    );
    Ok(())
}
