//! aedb-bench: the same workloads on aedb, redb and SQLite, plus the fsync
//! floor, in one run, printed as one comparison table (or JSON lines).

mod engines;
mod report;
mod workloads;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use tempfile::TempDir;

use engines::{EngineKind, Mode};
use report::Figure;
use workloads::{LoadReport, LoadSizes, Sizes};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Small sizes so the whole run takes a few seconds.
    #[arg(long)]
    quick: bool,

    /// Print one JSON object per figure and line instead of the table.
    #[arg(long)]
    json: bool,

    /// Workloads to run, comma-separated (default: all). W4 and W5 share
    /// one child process per engine, so selecting either runs both.
    #[arg(long, value_delimiter = ',', ignore_case = true)]
    workloads: Vec<Workload>,

    /// Engines to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', ignore_case = true)]
    engines: Vec<EngineKind>,

    /// In a normal run: where to create the scratch directory (a fresh
    /// subdirectory, removed afterwards). In a child: the engine's directory.
    #[arg(long)]
    dir: Option<PathBuf>,

    /// Internal: run one engine's W4+W5 in this process and print its
    /// figures as one JSON line.
    #[arg(long, hide = true, requires_all = ["engine", "dir", "keys", "batch", "gets", "scan"])]
    child: Option<ChildTask>,
    #[arg(long, hide = true)]
    engine: Option<EngineKind>,
    #[arg(long, hide = true)]
    keys: Option<u64>,
    #[arg(long, hide = true)]
    batch: Option<u64>,
    #[arg(long, hide = true)]
    gets: Option<u64>,
    #[arg(long, hide = true)]
    scan: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Workload {
    #[value(name = "W1")]
    W1,
    #[value(name = "W2")]
    W2,
    #[value(name = "W3")]
    W3,
    #[value(name = "W4")]
    W4,
    #[value(name = "W5")]
    W5,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ChildTask {
    W4,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aedb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<ExitCode> {
    if let Some(ChildTask::W4) = cli.child {
        child_w4(cli)?;
        return Ok(ExitCode::SUCCESS);
    }

    let sizes = if cli.quick { Sizes::QUICK } else { Sizes::FULL };
    let mut wanted = if cli.workloads.is_empty() {
        vec![
            Workload::W1,
            Workload::W2,
            Workload::W3,
            Workload::W4,
            Workload::W5,
        ]
    } else {
        cli.workloads.clone()
    };
    wanted.sort();
    wanted.dedup();
    let mut kinds = if cli.engines.is_empty() {
        EngineKind::ALL.to_vec()
    } else {
        cli.engines.clone()
    };
    kinds.sort();
    kinds.dedup();

    let (scratch, fs) = scratch_dir(cli.dir.as_deref())?;
    eprintln!(
        "aedb-bench: scratch directory {} (filesystem {fs})",
        scratch.path().display()
    );
    let w4 = sizes.w4;
    let banner = format!(
        "aedb-bench {} run on {fs}: W1 {} commits; W2 {}x{} commits; W3 {} commits; \
         W4 {} keys in {}-key batches, {} gets, {}-key scan",
        if cli.quick { "quick" } else { "full" },
        sizes.w1_commits,
        sizes.w2_threads,
        sizes.w2_commits_per_thread,
        sizes.w3_commits,
        w4.keys,
        w4.batch,
        w4.gets,
        w4.scan,
    );

    let mut run = Run {
        json: cli.json,
        scratch: scratch.path().to_path_buf(),
        figures: Vec::new(),
        failures: 0,
    };
    let databases = || kinds.iter().copied().filter(|e| *e != EngineKind::Floor);

    if wanted.contains(&Workload::W1) {
        for engine in kinds.iter().copied() {
            run.measure("W1", engine, "commits_per_s", |dir| match engine {
                EngineKind::Floor => engines::floor::commits_per_s(dir, sizes.w1_commits),
                _ => with_engine!(engine, E => workloads::single_commits::<E>(
                    dir,
                    Mode::Durable,
                    sizes.w1_commits,
                )),
            });
        }
    }
    if wanted.contains(&Workload::W2) {
        for engine in databases() {
            run.measure("W2", engine, "commits_per_s", |dir| {
                with_engine!(engine, E => workloads::concurrent_commits::<E>(
                    dir,
                    sizes.w2_threads,
                    sizes.w2_commits_per_thread,
                ))
            });
        }
    }
    if wanted.contains(&Workload::W3) {
        for engine in databases() {
            run.measure("W3", engine, "commits_per_s", |dir| {
                with_engine!(engine, E => workloads::single_commits::<E>(
                    dir,
                    Mode::Relaxed,
                    sizes.w3_commits,
                ))
            });
        }
    }
    let want_w4 = wanted.contains(&Workload::W4);
    let want_w5 = wanted.contains(&Workload::W5);
    if want_w4 || want_w5 {
        for engine in databases() {
            run.load_in_child(engine, sizes.w4, want_w4, want_w5);
        }
    }

    if !cli.json {
        println!("{banner}");
        println!();
        print!("{}", report::render_table(&run.figures));
        println!();
        println!("{}", report::NOTES);
    }
    if run.failures > 0 {
        eprintln!(
            "aedb-bench: {} measurement(s) failed; see above",
            run.failures
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Collects figures; a failing engine is reported and skipped so the other
/// engines' numbers still come out.
struct Run {
    json: bool,
    scratch: PathBuf,
    figures: Vec<Figure>,
    failures: usize,
}

impl Run {
    fn record(&mut self, figure: Figure) {
        if self.json {
            match serde_json::to_string(&figure) {
                Ok(line) => {
                    println!("{line}");
                    // Flushed per line so a later crash keeps earlier figures.
                    let _ = std::io::stdout().flush();
                }
                Err(e) => eprintln!("aedb-bench: cannot encode {figure:?}: {e}"),
            }
        }
        self.figures.push(figure);
    }

    fn fail(&mut self, workload: &str, engine: EngineKind, error: &anyhow::Error) {
        eprintln!("[{workload}] {}: FAILED: {error:#}", engine.name());
        self.failures += 1;
    }

    /// Runs one single-figure measurement in a fresh directory.
    fn measure(
        &mut self,
        workload: &'static str,
        engine: EngineKind,
        metric: &'static str,
        body: impl FnOnce(&Path) -> Result<f64>,
    ) {
        let dir = self.scratch.join(format!("{workload}-{}", engine.name()));
        eprintln!("[{workload}] {}: running", engine.name());
        let start = Instant::now();
        let result = body(&dir);
        remove_scratch(&dir);
        match result {
            Ok(value) => {
                eprintln!(
                    "[{workload}] {}: {} {metric} ({:.1}s)",
                    engine.name(),
                    report::format_value(metric, value),
                    start.elapsed().as_secs_f64()
                );
                self.record(Figure {
                    workload,
                    engine: engine.name(),
                    metric,
                    value,
                });
            }
            Err(e) => self.fail(workload, engine, &e),
        }
    }

    /// W4 and W5 for one engine, in a child process so its peak RSS is its own.
    fn load_in_child(&mut self, engine: EngineKind, sizes: LoadSizes, w4: bool, w5: bool) {
        let dir = self.scratch.join(format!("W4-{}", engine.name()));
        eprintln!("[W4+W5] {}: running in a child process", engine.name());
        let start = Instant::now();
        let result = spawn_child(engine, &dir, sizes);
        remove_scratch(&dir);
        let report = match result {
            Ok(report) => report,
            Err(e) => return self.fail("W4+W5", engine, &e),
        };
        eprintln!(
            "[W4+W5] {}: load {}, {} gets/s, {} scan keys/s, peak RSS {}, reopen {} ({:.1}s)",
            engine.name(),
            report::format_value("load_s", report.load_s),
            report::format_value("gets_per_s", report.gets_per_s),
            report::format_value("scan_keys_per_s", report.scan_keys_per_s),
            report::format_value("peak_rss_bytes", report.peak_rss_bytes),
            report::format_value("reopen_s", report.reopen_s),
            start.elapsed().as_secs_f64()
        );
        if let Some(ck) = report.checkpoint {
            eprintln!(
                "[W4+W5] {}: checkpoint {}, longest commit during it {}",
                engine.name(),
                report::format_value("checkpoint_s", ck.checkpoint_s),
                report::format_value("checkpoint_max_commit_stall_s", ck.max_commit_stall_s),
            );
        }
        if let Some(b) = report.backup {
            eprintln!(
                "[W4+W5] {}: full backup {}, incremental backup {}, restore+verify {}",
                engine.name(),
                report::format_value("backup_full_s", b.backup_full_s),
                b.backup_incremental_s.map_or_else(
                    || "-".into(),
                    |v| report::format_value("backup_incremental_s", v)
                ),
                report::format_value("restore_verify_s", b.restore_verify_s),
            );
        }
        let mut figures = Vec::new();
        if w4 {
            figures.extend([
                ("W4", "load_s", report.load_s),
                ("W4", "gets_per_s", report.gets_per_s),
                ("W4", "scan_keys_per_s", report.scan_keys_per_s),
                ("W4", "peak_rss_bytes", report.peak_rss_bytes),
            ]);
            if let Some(ck) = report.checkpoint {
                figures.extend([
                    ("W4", "checkpoint_s", ck.checkpoint_s),
                    ("W4", "checkpoint_max_commit_stall_s", ck.max_commit_stall_s),
                ]);
            }
        }
        if w5 {
            figures.push(("W5", "reopen_s", report.reopen_s));
            if let Some(b) = report.backup {
                figures.push(("W5", "backup_full_s", b.backup_full_s));
                if let Some(incremental) = b.backup_incremental_s {
                    figures.push(("W5", "backup_incremental_s", incremental));
                }
                figures.push(("W5", "restore_verify_s", b.restore_verify_s));
            }
        }
        for (workload, metric, value) in figures {
            self.record(Figure {
                workload,
                engine: engine.name(),
                metric,
                value,
            });
        }
    }
}

fn spawn_child(engine: EngineKind, dir: &Path, sizes: LoadSizes) -> Result<LoadReport> {
    let exe = std::env::current_exe().context("locating the aedb-bench binary")?;
    let output = Command::new(exe)
        .args(["--child", "w4", "--engine", engine.name(), "--dir"])
        .arg(dir)
        .args(["--keys", &sizes.keys.to_string()])
        .args(["--batch", &sizes.batch.to_string()])
        .args(["--gets", &sizes.gets.to_string()])
        .args(["--scan", &sizes.scan.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("spawning the W4 child process")?;
    if !output.status.success() {
        bail!("child process failed ({})", output.status);
    }
    let stdout = String::from_utf8(output.stdout).context("child output is not UTF-8")?;
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("child printed no result")?;
    serde_json::from_str(line).with_context(|| format!("unparsable child result {line:?}"))
}

fn child_w4(cli: &Cli) -> Result<()> {
    let (Some(engine), Some(dir), Some(keys), Some(batch), Some(gets), Some(scan)) = (
        cli.engine, &cli.dir, cli.keys, cli.batch, cli.gets, cli.scan,
    ) else {
        bail!("--child needs --engine, --dir, --keys, --batch, --gets and --scan");
    };
    if keys == 0 || batch == 0 {
        bail!("--keys and --batch must be positive");
    }
    let sizes = LoadSizes {
        keys,
        batch,
        gets,
        scan,
    };
    let report = with_engine!(engine, E => workloads::load_read_reopen::<E>(dir, sizes))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn remove_scratch(dir: &Path) {
    if dir.exists()
        && let Err(e) = std::fs::remove_dir_all(dir)
    {
        eprintln!("aedb-bench: could not remove {}: {e}", dir.display());
    }
}

/// A fresh scratch directory and the filesystem it lives on. Without `--dir`
/// it goes in the temp dir unless that is memory-backed, where fsync is free
/// and every durable figure would be meaningless; then the current directory.
fn scratch_dir(base: Option<&Path>) -> Result<(TempDir, String)> {
    let base = match base {
        Some(base) => {
            std::fs::create_dir_all(base)
                .with_context(|| format!("creating {}", base.display()))?;
            base.to_path_buf()
        }
        None => {
            let tmp = std::env::temp_dir();
            match filesystem_of(&tmp).as_deref() {
                Some("tmpfs" | "ramfs") => std::env::current_dir()?,
                _ => tmp,
            }
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("aedb-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a scratch directory in {}", base.display()))?;
    let fs = filesystem_of(dir.path()).unwrap_or_else(|| "unknown".into());
    if matches!(fs.as_str(), "tmpfs" | "ramfs") {
        eprintln!("aedb-bench: warning: {fs} ignores fsync; durable figures will be inflated");
    }
    Ok((dir, fs))
}

/// The type of the longest mount point containing `path`, from /proc/mounts.
fn filesystem_of(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            Some((fields.next()?, fields.next()?))
        })
        .filter(|(mount, _)| path.starts_with(mount))
        .max_by_key(|(mount, _)| mount.len())
        .map(|(_, fs)| fs.to_string())
}
