//! Crash safety under a real SIGKILL.
//!
//! The test binary re-executes itself as a writer child (`crash_child_writer`, an
//! ignored test that does nothing unless `AEDB_CRASH_CHILD_DIR` is set; see
//! `crash_support`). The child makes durable commits of `k{n}` and reports each
//! acknowledged one on stdout; the parent kills it after a random number of
//! acknowledged commits plus a small random delay (never on a timer started at
//! spawn, so a slow machine changes nothing), reopens the directory strictly and
//! checks that every
//! acknowledged commit survived, that nothing beyond what was attempted appeared and
//! that the recovered keys form a prefix. The next child continues on the same
//! directory, so crashes (and torn-tail repairs) accumulate across reopens. Writers
//! vary: single-key, multi-key, key+row, and single-key with a thread writing
//! checkpoints (which remove obsolete segments) so kills also land mid-checkpoint.
//! Every tenth iteration also kills a child during the first open of a fresh directory.
//!
//! `AEDB_CRASH_SEED` replays a run, `AEDB_CRASH_ITERATIONS` (default 100) sets its length.

mod crash_support;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use aedb::{
    AedbConfig, AedbInstance, Column, ColumnType, CommitFinality, DurabilityMode, Limits,
    RecoveryMode, TableSchema, Value,
};
use crash_support::say;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_DIR_ENV: &str = "AEDB_CRASH_CHILD_DIR";
const CHILD_MODE_ENV: &str = "AEDB_CRASH_CHILD_MODE";
/// Child mode for `a_child_that_panics_in_any_thread_fails_the_test`.
const SELFTEST_PANIC: &str = "selftest-panic";

const PROJECT: &str = "p";
const SCOPE: &str = "s";
const TABLE: &str = "t";

/// How a child writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One key per durable commit.
    Single,
    /// 2..=8 consecutive keys per durable commit.
    Multi,
    /// One key plus one table row (`id = n`) per durable commit.
    Table,
    /// Single-key commits while another thread keeps writing checkpoints (which
    /// also remove the segments they make obsolete).
    Checkpoint,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::Multi => "multi",
            Mode::Table => "table",
            Mode::Checkpoint => "checkpoint",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "multi" => Mode::Multi,
            "table" => Mode::Table,
            "checkpoint" => Mode::Checkpoint,
            _ => Mode::Single,
        }
    }
}

fn config() -> AedbConfig {
    AedbConfig::development()
        .with_durability(DurabilityMode::Full)
        .with_recovery_mode(RecoveryMode::Strict)
        .with_segment_bytes(1 << 20)
        // Checkpoints are taken explicitly by `Mode::Checkpoint` children.
        .with_checkpoint_policy(None, None)
        .with_limits(Limits {
            max_txn_bytes: 256 * 1024,
            max_value_bytes: 64 * 1024,
            ..Limits::default()
        })
}

fn key(n: u64) -> Vec<u8> {
    format!("k{n}").into_bytes()
}

/// A value derived from `n`, 32..3032 bytes long, so segments fill and rotate.
fn value(n: u64) -> Vec<u8> {
    let len = 32 + (n.wrapping_mul(2_654_435_761) % 3000) as usize;
    format!("v{n}:")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(len)
        .collect()
}

fn row(n: u64) -> Vec<Value> {
    let id = i64::try_from(n).expect("n fits i64");
    vec![
        Value::Int(id),
        Value::Text(format!("row-{n}")),
        Value::Int(id.wrapping_mul(3)),
    ]
}

fn table_schema() -> TableSchema {
    TableSchema::new(
        vec![
            Column::new("id", ColumnType::Int),
            Column::new("label", ColumnType::Text),
            Column::new("triple", ColumnType::Int),
        ],
        vec!["id".into()],
    )
}

/// The writer child: runs only when re-executed by the crash test.
#[test]
#[ignore = "SIGKILL child of sigkill_during_durable_commits_loses_nothing_acknowledged; runs only when re-executed by it"]
fn crash_child_writer() {
    let Some(dir) = crash_support::child_env(
        CHILD_DIR_ENV,
        "sigkill_during_durable_commits_loses_nothing_acknowledged",
    ) else {
        return;
    };
    let mode_name = std::env::var(CHILD_MODE_ENV).unwrap_or_default();
    let mode = Mode::parse(&mode_name);
    if mode_name == SELFTEST_PANIC {
        // Self-test of the harness: a background thread panics while the main
        // thread keeps committing; the child must not survive it silently.
        std::thread::spawn(|| panic!("injected background-thread panic"));
    }
    say("opening");
    let db = std::sync::Arc::new(AedbInstance::open(config(), &dir).expect("child: open"));
    if !db
        .snapshot()
        .expect("snapshot")
        .projects()
        .iter()
        .any(|p| p == PROJECT)
    {
        db.create_project(PROJECT).expect("child: create project");
    }
    if !db
        .snapshot()
        .expect("snapshot")
        .scopes(PROJECT)
        .expect("child: scopes")
        .iter()
        .any(|s| s == SCOPE)
    {
        db.create_scope(PROJECT, SCOPE)
            .expect("child: create scope");
    }
    if !db
        .snapshot()
        .expect("snapshot")
        .tables(PROJECT, SCOPE)
        .expect("child: tables")
        .iter()
        .any(|t| t == TABLE)
    {
        db.create_table(PROJECT, SCOPE, TABLE, table_schema())
            .expect("child: create table");
    }
    let mut next = db
        .snapshot()
        .expect("snapshot")
        .kv(PROJECT, SCOPE)
        .expect("child: kv")
        .len() as u64
        + 1;
    say(&format!("ready {next}"));
    let mut rng = StdRng::seed_from_u64(next);
    // The child runs until the parent kills it (or its stdin closes: see crash_support).
    if mode == Mode::Checkpoint {
        let db = db.clone();
        let mut rng = StdRng::seed_from_u64(next ^ 0xC4EC);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_micros(rng.random_range(1_000..=10_000)));
                db.checkpoint().expect("child: checkpoint");
                say("checkpoint");
            }
        });
    }
    loop {
        let batch = match mode {
            Mode::Multi => rng.random_range(2..=8u64),
            Mode::Single | Mode::Table | Mode::Checkpoint => 1,
        };
        let last = next + batch - 1;
        let mut tx = db.begin_write(PROJECT).expect("child: begin");
        for n in next..=last {
            tx.kv_set(SCOPE, &key(n), &value(n)).expect("child: kv_set");
            if mode == Mode::Table {
                tx.put_row(SCOPE, TABLE, row(n)).expect("child: put_row");
            }
        }
        // Printed before the commit starts: nothing beyond it may ever be recovered.
        say(&format!("attempt {last}"));
        let r = db
            .commit_with_finality(tx, CommitFinality::Durable)
            .expect("child: durable commit");
        for n in next..=last {
            say(&format!("durable {n} {}", r.commit_seq));
        }
        next = last + 1;
    }
}

/// When the parent kills the child.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// `delay` after the child announces it is about to open (kills land in open,
    /// recovery or DDL; whether any commit happens first does not matter).
    Opening { delay: Duration },
    /// `delay` after the child has acknowledged `acks` commit reports (and, when
    /// `checkpoints` > 0, after that many checkpoints completed too).
    Acked {
        acks: usize,
        checkpoints: usize,
        delay: Duration,
    },
}

struct ChildRun {
    lines: Vec<String>,
    stderr: String,
    reached_trigger: bool,
}

impl ChildRun {
    fn attempted_max(&self) -> Option<u64> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("attempt "))
            .filter_map(|n| n.parse().ok())
            .max()
    }

    fn durable(&self) -> Vec<(u64, u64)> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("durable "))
            .filter_map(|rest| {
                let (n, seq) = rest.split_once(' ')?;
                Some((n.parse().ok()?, seq.parse().ok()?))
            })
            .collect()
    }

    fn ready_next(&self) -> Option<u64> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("ready "))
            .find_map(|n| n.parse().ok())
    }
}

/// Runs one child on `dir` and SIGKILLs it as `kill` says. The child must die by
/// that SIGKILL: a child that exits, panics (in any thread) or aborts on its own
/// fails the test with its stderr.
fn run_child(dir: &Path, mode: Mode, kill: Kill, ctx: &str) -> ChildRun {
    let mut child = crash_support::spawn(
        "crash_child_writer",
        &[
            (CHILD_DIR_ENV, OsString::from(dir)),
            (CHILD_MODE_ENV, OsString::from(mode.as_str())),
        ],
    );
    let (reached_trigger, delay) = match kill {
        Kill::Opening { delay } => (child.wait_for("opening", 1), delay),
        Kill::Acked {
            acks,
            checkpoints,
            delay,
        } => (
            child.wait_for("ready ", 1)
                && child.wait_for("durable ", acks)
                && child.wait_for("checkpoint", checkpoints),
            delay,
        ),
    };
    let done = child.kill_after(delay);
    done.assert_killed(&format!("{ctx}: writer child"));
    ChildRun {
        lines: done.lines,
        stderr: done.stderr,
        reached_trigger,
    }
}

/// What the parent knows about the main directory across iterations.
#[derive(Default)]
struct Expected {
    /// Keys 1..=count were verified present after the last reopen.
    count: u64,
    /// Highest n acknowledged durable, ever.
    durable_max: u64,
    /// Commit sequence reported for each acknowledged n.
    durable_seq: HashMap<u64, u64>,
    /// Writer mode of the attempt that wrote each n (index n - 1).
    mode_of: Vec<Mode>,
}

struct Stats {
    checkpoints: usize,
    torn_tails: usize,
    commits_acknowledged: usize,
    kills_before_ready: usize,
}

fn seed() -> u64 {
    match std::env::var("AEDB_CRASH_SEED") {
        Ok(s) => s.trim().parse().expect("AEDB_CRASH_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed),
    }
}

fn iterations() -> usize {
    std::env::var("AEDB_CRASH_ITERATIONS")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .expect("AEDB_CRASH_ITERATIONS must be a number")
        })
        .unwrap_or(100)
}

/// Indices of the WAL segments in `dir` (checkpoints remove the old ones).
fn segment_indices(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix("wal-")?.strip_suffix(".seg")?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Reopens `dir` strictly and checks it against `exp`, then advances `exp`.
fn verify_main(dir: &Path, run: &ChildRun, mode: Mode, exp: &mut Expected, ctx: &str) -> bool {
    // Modes of this run's attempts (they overwrite lost attempts of earlier runs).
    let attempted = run.attempted_max().unwrap_or(exp.count).max(exp.count);
    if let Some(ready) = run.ready_next() {
        assert_eq!(
            ready,
            exp.count + 1,
            "{ctx}: child started at a different key than the parent verified"
        );
    }
    exp.mode_of.truncate(exp.count as usize);
    exp.mode_of.resize(attempted as usize, mode);
    for (n, seq) in run.durable() {
        assert!(n <= attempted, "{ctx}: durable {n} was never attempted");
        exp.durable_max = exp.durable_max.max(n);
        exp.durable_seq.insert(n, seq);
    }

    let db = AedbInstance::open(config(), dir).unwrap_or_else(|e| {
        panic!(
            "{ctx}: strict reopen after SIGKILL failed: {e}\nchild stderr:\n{}",
            run.stderr
        )
    });
    let report = db.recovery_report().clone();
    assert!(
        report.dropped.is_none(),
        "{ctx}: strict recovery dropped data: {report:?}"
    );
    let torn = report.torn_tail.is_some();
    let snap = db.snapshot().expect("snapshot");
    let has_scope = snap.projects().iter().any(|p| p == PROJECT)
        && snap
            .scopes(PROJECT)
            .expect("scopes")
            .iter()
            .any(|s| s == SCOPE);
    if !has_scope {
        assert_eq!(
            exp.durable_max, 0,
            "{ctx}: the schema is gone but commits were acknowledged"
        );
        assert_eq!(report.last_lsn, snap.seq());
        db.close().expect("close");
        exp.count = 0;
        return torn;
    }
    let kv = snap.kv(PROJECT, SCOPE).expect("kv");
    let count = kv.len() as u64;
    assert!(
        count >= exp.durable_max,
        "{ctx}: acknowledged durable commit lost: {count} keys recovered, k{} was acknowledged",
        exp.durable_max
    );
    assert!(
        count <= attempted,
        "{ctx}: {count} keys recovered but only up to k{attempted} was ever attempted"
    );
    let table = snap.table(PROJECT, SCOPE, TABLE).ok();
    if count > 0 {
        assert!(table.is_some(), "{ctx}: table missing after commits");
    }
    let mut rows_expected = 0usize;
    for n in 1..=count {
        let (version, v) = kv
            .get_versioned(&key(n))
            .expect("get")
            .unwrap_or_else(|| panic!("{ctx}: k{n} missing but k{count} exists (not a prefix)"));
        assert_eq!(&*v, &value(n)[..], "{ctx}: k{n} has the wrong value");
        assert!(version <= snap.seq(), "{ctx}: k{n} version from the future");
        if let Some(&seq) = exp.durable_seq.get(&n) {
            assert_eq!(
                version, seq,
                "{ctx}: k{n} carries another commit than the acknowledged one"
            );
        }
        let want_row = exp.mode_of[(n - 1) as usize] == Mode::Table;
        let got_row = table
            .as_ref()
            .map(|t| t.get(&[Value::Int(n as i64)]).expect("row get"));
        match (want_row, got_row.flatten()) {
            (true, Some(r)) => {
                assert_eq!(*r, row(n), "{ctx}: row {n} has the wrong contents");
                rows_expected += 1;
            }
            (false, None) => {}
            (true, None) => panic!("{ctx}: k{n} committed without its row (not atomic)"),
            (false, Some(_)) => panic!("{ctx}: row {n} exists but was never written"),
        }
    }
    assert!(kv.get(&key(count + 1)).expect("get").is_none());
    if let Some(t) = &table {
        assert_eq!(t.len(), rows_expected, "{ctx}: extra or missing rows");
    }
    // What was attempted and lost is gone for good; the next child redoes it.
    exp.count = count;
    exp.durable_seq.retain(|&n, _| n <= count);
    db.close().expect("close after verify");
    torn
}

/// A child killed during the very first open of a fresh directory: the directory
/// must still open strictly and accept writes afterwards.
fn first_open_crash(root: &Path, it: usize, rng: &mut StdRng, seed: u64) -> bool {
    let dir = root.join(format!("fresh-{it}"));
    let delay = Duration::from_micros(rng.random_range(0..=8_000));
    let ctx = format!("seed {seed} iteration {it} (kill {delay:?} into a first open)");
    let run = run_child(&dir, Mode::Single, Kill::Opening { delay }, &ctx);
    assert!(
        run.reached_trigger,
        "{ctx}: child never started\n{}",
        run.stderr
    );
    std::fs::create_dir_all(&dir).expect("dir");
    let db = AedbInstance::open(config(), &dir)
        .unwrap_or_else(|e| panic!("{ctx}: strict open after a crash in first open: {e}"));
    assert!(db.recovery_report().dropped.is_none());
    let snap = db.snapshot().expect("snapshot");
    let acknowledged = run.durable().len();
    if !snap.projects().iter().any(|p| p == PROJECT) {
        assert_eq!(acknowledged, 0, "{ctx}: acknowledged commits lost");
        db.create_project(PROJECT).expect("project");
    }
    if db
        .snapshot()
        .expect("snapshot")
        .scopes(PROJECT)
        .expect("scopes")
        .is_empty()
    {
        assert_eq!(acknowledged, 0, "{ctx}: acknowledged commits lost");
        db.create_scope(PROJECT, SCOPE).expect("scope");
    }
    let before = db
        .snapshot()
        .expect("snapshot")
        .kv(PROJECT, SCOPE)
        .expect("kv")
        .len();
    assert!(before >= acknowledged, "{ctx}: acknowledged commits lost");
    db.kv_set(PROJECT, SCOPE, b"after-crash", b"ok")
        .expect("write after crash");
    db.close().expect("close");
    let db = AedbInstance::open(config(), &dir).expect("strict reopen");
    assert_eq!(
        db.snapshot()
            .expect("snapshot")
            .kv(PROJECT, SCOPE)
            .expect("kv")
            .get(b"after-crash")
            .expect("get")
            .as_deref(),
        Some(&b"ok"[..])
    );
    db.close().expect("close");
    std::fs::remove_dir_all(&dir).expect("remove fresh dir");
    !run.lines.iter().any(|l| l.starts_with("ready "))
}

#[test]
fn sigkill_during_durable_commits_loses_nothing_acknowledged() {
    let seed = seed();
    let iterations = iterations();
    println!("crash test: seed {seed} (AEDB_CRASH_SEED={seed} replays), {iterations} iterations");
    let started = Instant::now();
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("db");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut exp = Expected::default();
    let mut stats = Stats {
        checkpoints: 0,
        torn_tails: 0,
        commits_acknowledged: 0,
        kills_before_ready: 0,
    };
    let mut first_open_kills = 0;
    let mut first_open_before_ready = 0;
    for it in 0..iterations {
        // Every tenth iteration also crashes a fresh directory during its first open.
        if it % 10 == 3 {
            first_open_kills += 1;
            if first_open_crash(root.path(), it, &mut rng, seed) {
                first_open_before_ready += 1;
            }
        }
        let mode = match rng.random_range(0..4u8) {
            0 => Mode::Single,
            1 => Mode::Multi,
            2 => Mode::Table,
            _ => Mode::Checkpoint,
        };
        // Mostly kill while committing (after a random number of acknowledged
        // commits); sometimes during open, recovery or DDL.
        let kill = if it == 0 {
            Kill::Opening {
                delay: Duration::from_micros(rng.random_range(0..=3_000)),
            }
        } else if rng.random_bool(0.2) {
            Kill::Opening {
                delay: Duration::from_micros(rng.random_range(0..=20_000)),
            }
        } else {
            Kill::Acked {
                acks: rng.random_range(1..=30),
                // Checkpoint children sometimes wait for a completed checkpoint,
                // so kills also land in the ones after it.
                checkpoints: usize::from(mode == Mode::Checkpoint && rng.random_bool(0.5)),
                delay: Duration::from_micros(rng.random_range(0..=2_000)),
            }
        };
        let ctx = format!("seed {seed} iteration {it} ({mode:?}, {kill:?})");
        let run = run_child(&dir, mode, kill, &ctx);
        assert!(
            run.reached_trigger,
            "{ctx}: child exited before {kill:?}\nstdout:\n{}\nstderr:\n{}",
            run.lines.join("\n"),
            run.stderr
        );
        if run.ready_next().is_none() {
            stats.kills_before_ready += 1;
        }
        stats.commits_acknowledged += run.durable().len();
        stats.checkpoints += run.lines.iter().filter(|l| *l == "checkpoint").count();
        if verify_main(&dir, &run, mode, &mut exp, &ctx) {
            stats.torn_tails += 1;
        }
    }
    let segments = segment_indices(&dir);
    let highest = segments.last().copied().unwrap_or(0);
    println!(
        "crash test: {iterations} kills in {:?}; {} keys recovered, {} commit reports, {} checkpoints, {} torn tails repaired, {} kills before the writer was ready, segments {segments:?}; {first_open_kills} first-open kills ({first_open_before_ready} before ready)",
        started.elapsed(),
        exp.count,
        stats.commits_acknowledged,
        stats.checkpoints,
        stats.torn_tails,
        stats.kills_before_ready,
    );
    assert!(
        exp.count > 0,
        "no commit ever survived: the kill delays are too short to test anything"
    );
    if iterations >= 100 {
        assert!(
            highest >= 2,
            "the log never rotated (segments {segments:?}); the test no longer covers rotation"
        );
        assert!(
            stats.checkpoints > 0,
            "no checkpoint completed; the test no longer covers them"
        );
    }
}

/// The harness itself: a child whose background thread panics (as a failing
/// checkpoint thread would) dies by SIGABRT with the panic on stderr, and the
/// check every crash test applies to its children refuses it.
#[test]
fn a_child_that_panics_in_any_thread_fails_the_test() {
    let root = tempfile::tempdir().expect("tempdir");
    let child = crash_support::spawn(
        "crash_child_writer",
        &[
            (CHILD_DIR_ENV, OsString::from(root.path().join("db"))),
            (CHILD_MODE_ENV, OsString::from(SELFTEST_PANIC)),
        ],
    );
    let done = child.finish();
    assert!(
        done.stderr.contains(crash_support::PANIC_MARK)
            && done.stderr.contains("injected background-thread panic"),
        "{}",
        done.stderr
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(done.status.signal(), Some(6), "SIGABRT: {}", done.status);
    let refused = std::panic::catch_unwind(|| done.assert_killed("self-test"));
    assert!(
        refused.is_err(),
        "a panicking child passed the SIGKILL check"
    );
}
