//! RBAC decision latency in-process: the decision cache hit path and the
//! uncached evaluation (cache disabled), over users with different roles and
//! every catalogue permission. Each decision includes recording its metrics,
//! as in the server.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use aragora::metrics::Metrics;
use aragora::rbac::Rbac;
use aragora::rbac::catalogue::{BUILTIN_ROLES, PERMISSIONS};
use aragora::store::EmbeddedStore;

use crate::Options;
use crate::report::Report;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn measure(rbac: &Rbac, users: &[(String, Vec<String>)], decisions: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(decisions);
    let mut allowed = 0usize;
    for i in 0..decisions {
        let (user, roles) = &users[i % users.len()];
        let permission = PERMISSIONS[(i / users.len()) % PERMISSIONS.len()].name;
        let started = Instant::now();
        let d = rbac.check(user, roles, permission);
        samples.push(started.elapsed());
        allowed += usize::from(d.allowed);
    }
    std::hint::black_box(allowed);
    samples.sort_unstable();
    samples
}

pub fn run(options: &Options, report: &mut Report) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(dir.path(), [3; 32], [4; 32])?;
    let users: Vec<(String, Vec<String>)> = (0..1000)
        .map(|i| {
            let role = BUILTIN_ROLES[i % BUILTIN_ROLES.len()].name.to_string();
            (format!("usr_{i:08}"), vec![role])
        })
        .collect();
    let decisions = if options.quick { 20_000 } else { 1_000_000 };
    let mut table = String::new();
    writeln!(
        table,
        "rbac: {decisions} decisions over {} users x {} permissions, one thread (metrics recorded per decision)",
        users.len(),
        PERMISSIONS.len()
    )?;
    writeln!(
        table,
        "{:<10} {:>10} {:>10} {:>10} {:>10}  target p99",
        "path", "p50", "p99", "p99.9", "max"
    )?;
    for (name, ttl, target) in [
        ("cached", Duration::from_secs(300), "<= 10 us"),
        ("uncached", Duration::ZERO, "<= 100 us"),
    ] {
        let rbac = Rbac::load(&store, Metrics::new()?, ttl)?;
        if !ttl.is_zero() {
            // Warm: every (user, permission) once, so the measured pass hits.
            rbac.warmup(users.iter().map(|(u, r)| (u.as_str(), r.as_slice())));
        }
        let s = measure(&rbac, &users, decisions);
        let (p50, p99, p999, max) = (
            percentile(&s, 0.50),
            percentile(&s, 0.99),
            percentile(&s, 0.999),
            percentile(&s, 1.0),
        );
        let workload = if ttl.is_zero() {
            "rbac_uncached"
        } else {
            "rbac_cached"
        };
        report.record(workload, "aragora", "p50_s", p50.as_secs_f64());
        report.record(workload, "aragora", "p99_s", p99.as_secs_f64());
        writeln!(
            table,
            "{name:<10} {:>10.2?} {:>10.2?} {:>10.2?} {:>10.2?}  {target}",
            p50, p99, p999, max
        )?;
    }
    report.section(table);
    Ok(())
}
