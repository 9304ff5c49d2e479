//! aragora-bench: aragora's hot paths measured against their floor in one run,
//! printed as one table (or JSON lines).
//!
//! Each workload is a module with `run(&Options, &mut Report)`; add RBAC or
//! HTTP workloads as siblings of `crypto` and a `Workload` variant here.

mod crypto;
mod http;
mod migration;
mod pg;
mod rbac;
mod report;
mod scale;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, ValueEnum};

use report::Report;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Short rounds and few samples so the whole run takes a few seconds.
    #[arg(long)]
    quick: bool,

    /// Print one JSON object per figure and line instead of the table.
    #[arg(long)]
    json: bool,

    /// Workloads to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', ignore_case = true)]
    workloads: Vec<Workload>,

    /// Internal: run as the HTTP load generator against this port (the second
    /// process of the `http` workload).
    #[arg(long, hide = true)]
    load_gen_port: Option<u16>,
    #[arg(long, hide = true, default_value_t = 10.0)]
    load_gen_secs: f64,
    #[arg(long, hide = true, default_value_t = 32)]
    load_gen_conns: usize,

    /// PostgreSQL the `scale` and `catchup` workloads create their databases
    /// on (and drop them): a connection string to a database whose user may
    /// CREATE DATABASE.
    #[arg(long, env = "ARAGORA_BENCH_PG_ADMIN_URL", default_value = pg::DEFAULT_ADMIN_URL)]
    pg_admin_url: String,

    /// Redis for the `scale` workload's third mode (DATABASE_URL + REDIS_URL).
    #[arg(
        long,
        env = "ARAGORA_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    redis_url: String,

    /// PBKDF2 iterations to measure (default: the production setting).
    #[arg(long, default_value_t = aragora::crypto::kdf::PRODUCTION_PBKDF2_ITERATIONS)]
    pbkdf2_iterations: std::num::NonZeroU32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Workload {
    /// Envelope encrypt+decrypt vs raw AES-256-GCM, and PBKDF2 latency.
    Crypto,
    /// RBAC decision latency, cached and uncached.
    Rbac,
    /// Authorized GETs over loopback from a second process.
    Http,
    /// Re-encryption migration: records rewrapped per second after a rotation.
    Migration,
    /// The http workloads on the embedded store, PostgreSQL, and PostgreSQL
    /// + Redis side by side, with CPU per request (needs both services).
    Scale,
    /// The per-request cross-replica freshness check against PostgreSQL.
    Catchup,
}

/// What every workload module gets to size itself.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub quick: bool,
    pub pbkdf2_iterations: std::num::NonZeroU32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aragora-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    if let Some(port) = cli.load_gen_port {
        return http::load_gen(port, cli.load_gen_secs, cli.load_gen_conns);
    }
    let mut wanted = if cli.workloads.is_empty() {
        vec![
            Workload::Crypto,
            Workload::Rbac,
            Workload::Http,
            Workload::Migration,
        ]
    } else {
        cli.workloads.clone()
    };
    wanted.sort();
    wanted.dedup();
    let options = Options {
        quick: cli.quick,
        pbkdf2_iterations: cli.pbkdf2_iterations,
    };

    let backends = scale::Backends {
        pg_admin_url: cli.pg_admin_url.clone(),
        redis_url: cli.redis_url.clone(),
    };
    let mut report = Report::new(cli.json);
    for workload in wanted {
        match workload {
            Workload::Crypto => crypto::run(&options, &mut report)?,
            Workload::Rbac => rbac::run(&options, &mut report)?,
            Workload::Http => http::run(&options, &mut report)?,
            Workload::Migration => migration::run(&options, &mut report)?,
            Workload::Scale => scale::run(&options, &backends, &mut report)?,
            Workload::Catchup => scale::catchup(&options, &backends, &mut report)?,
        }
    }
    if !cli.json {
        println!(
            "aragora-bench {} run, one thread\n",
            if cli.quick { "quick" } else { "full" }
        );
        print!("{}", report.render());
    }
    Ok(())
}
