//! aedb-bench: the same workloads on aedb, redb and SQLite, plus the fsync
//! floor, in one run, printed as one comparison table (or JSON lines).

mod engines;
mod report;
mod w6;
mod workloads;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde::de::DeserializeOwned;
use tempfile::TempDir;

use engines::{EngineKind, Mode};
use report::Figure;
use w6::W6Report;
use workloads::{LoadReport, LoadSizes, Sizes};

/// Set by Ctrl-C or SIGTERM in the parent: running children are killed, no
/// further measurement starts, and the scratch directory is removed on the
/// way out, so an interrupted W6 does not leave gigabytes behind.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// How often the parent checks a running child for exit or an interrupt.
const CHILD_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Small sizes so the whole run takes a few seconds.
    #[arg(long)]
    quick: bool,

    /// Print one JSON object per figure and line instead of the table.
    #[arg(long)]
    json: bool,

    /// Workloads to run, comma-separated (default: W1..W5; W6 only when
    /// named, it writes ~1 KiB x --w6-keys per engine). W4 and W5 share
    /// one child process per engine, so selecting either runs both.
    #[arg(long, value_delimiter = ',', ignore_case = true)]
    workloads: Vec<Workload>,

    /// W6: keys loaded, each with a 1 KiB value [default: 10000000, or
    /// 20000 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    w6_keys: Option<u64>,

    /// W6: random gets after the load, at most --w6-keys [default: 1000000,
    /// or 2000 with --quick].
    #[arg(long)]
    w6_gets: Option<u64>,

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
    #[value(name = "W6")]
    W6,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ChildTask {
    W4,
    W6,
}

impl ChildTask {
    fn name(self) -> &'static str {
        match self {
            Self::W4 => "w4",
            Self::W6 => "w6",
        }
    }
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
    match cli.child {
        Some(ChildTask::W4) => {
            child_w4(cli)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(ChildTask::W6) => {
            child_w6(cli)?;
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    install_interrupt_handler()?;

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
    let want_w6 = wanted.contains(&Workload::W6);
    let w6_sizes = w6::sizes(cli.quick, cli.w6_keys, cli.w6_gets);
    if want_w6 {
        // Before any workload runs, so a run that cannot finish does not
        // spend an hour first.
        let free = w6::free_bytes(scratch.path())?;
        w6::check_free_space(scratch.path(), free, w6_sizes.keys)?;
    }
    let w4 = sizes.w4;
    let mut banner = format!(
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
    if want_w6 {
        banner.push_str(&format!(
            "; W6 {} keys x {} B in {}-key durable batches, {} gets, {}-key scan",
            w6_sizes.keys,
            w6::VALUE_LEN,
            w6_sizes.batch,
            w6_sizes.gets,
            w6_sizes.scan,
        ));
    }

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
    if want_w6 {
        for engine in databases() {
            run.w6_in_child(engine, w6_sizes);
        }
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; the scratch directory is removed on exit");
    }

    if !cli.json {
        println!("{banner}");
        println!();
        print!("{}", report::render_table(&run.figures));
        println!();
        println!("{}", report::NOTES);
        if want_w6 {
            println!("{}", report::W6_NOTES);
        }
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
        if INTERRUPTED.load(Ordering::SeqCst) {
            return;
        }
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
        if INTERRUPTED.load(Ordering::SeqCst) {
            return;
        }
        let dir = self.scratch.join(format!("W4-{}", engine.name()));
        eprintln!("[W4+W5] {}: running in a child process", engine.name());
        let start = Instant::now();
        let result = spawn_child::<LoadReport>(ChildTask::W4, engine, &dir, sizes);
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

    /// W6 for one engine, in a child process so its peak RSS is its own.
    fn w6_in_child(&mut self, engine: EngineKind, sizes: LoadSizes) {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return;
        }
        let dir = self.scratch.join(format!("W6-{}", engine.name()));
        eprintln!(
            "[W6] {}: running in a child process ({} keys x {} B)",
            engine.name(),
            sizes.keys,
            w6::VALUE_LEN
        );
        let start = Instant::now();
        let result = spawn_child::<W6Report>(ChildTask::W6, engine, &dir, sizes);
        remove_scratch(&dir);
        let report = match result {
            Ok(report) => report,
            Err(e) => return self.fail("W6", engine, &e),
        };
        eprintln!(
            "[W6] {}: load {} keys/s ({} MiB/s), {} gets/s, {} scan keys/s, peak RSS {}, \
             reopen {}, {} commits: longest {}, p99 {}, median {}; {} on disk ({:.1}s)",
            engine.name(),
            report::format_value("load_keys_per_s", report.load_keys_per_s),
            report::format_value("load_mib_per_s", report.load_mib_per_s),
            report::format_value("gets_per_s", report.gets_per_s),
            report::format_value("scan_keys_per_s", report.scan_keys_per_s),
            report::format_value("peak_rss_bytes", report.peak_rss_bytes),
            report::format_value("reopen_s", report.reopen_s),
            report.commits,
            report::format_value("max_commit_stall_s", report.max_commit_stall_s),
            report::format_value("p99_commit_s", report.p99_commit_s),
            report::format_value("median_commit_s", report.median_commit_s),
            report::format_value("data_dir_bytes", report.data_dir_bytes),
            start.elapsed().as_secs_f64()
        );
        for (metric, value) in report.figures() {
            self.record(Figure {
                workload: "W6",
                engine: engine.name(),
                metric,
                value,
            });
        }
    }
}

fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            // A second signal: the user wants out now, cleanup or not.
            std::process::exit(130);
        }
        eprintln!(
            "aedb-bench: interrupted; stopping the running measurement and removing the \
             scratch directory (interrupt again to exit at once)"
        );
    })
    .context("installing the interrupt handler")
}

/// Runs one engine's `task` in a re-executed copy of this binary and parses
/// the JSON line it prints last.
fn spawn_child<T: DeserializeOwned>(
    task: ChildTask,
    engine: EngineKind,
    dir: &Path,
    sizes: LoadSizes,
) -> Result<T> {
    let exe = std::env::current_exe().context("locating the aedb-bench binary")?;
    let mut child = Command::new(exe)
        .args(["--child", task.name(), "--engine", engine.name(), "--dir"])
        .arg(dir)
        .args(["--keys", &sizes.keys.to_string()])
        .args(["--batch", &sizes.batch.to_string()])
        .args(["--gets", &sizes.gets.to_string()])
        .args(["--scan", &sizes.scan.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawning the {} child process", task.name()))?;
    // Polled rather than waited on, so an interrupt can stop the child. A
    // child prints one short line on stdout, far below the pipe's buffer, so
    // it cannot block on a full pipe while nobody reads it.
    while child.try_wait()?.is_none() {
        if INTERRUPTED.load(Ordering::SeqCst) {
            // Either may fail because the child already exited; it is gone
            // either way.
            let _ = child.kill();
            let _ = child.wait();
            bail!("interrupted");
        }
        std::thread::sleep(CHILD_POLL);
    }
    let output = child
        .wait_with_output()
        .context("collecting the child's output")?;
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

fn child_w6(cli: &Cli) -> Result<()> {
    let (Some(engine), Some(dir), Some(keys), Some(batch), Some(gets), Some(scan)) = (
        cli.engine, &cli.dir, cli.keys, cli.batch, cli.gets, cli.scan,
    ) else {
        bail!("--child needs --engine, --dir, --keys, --batch, --gets and --scan");
    };
    let sizes = LoadSizes {
        keys,
        batch,
        gets,
        scan,
    };
    let report = with_engine!(engine, E => w6::run::<E>(dir, sizes, engine.name()))?;
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
