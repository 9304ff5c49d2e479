//! The workloads, written once against the `Engine` traits. Each returns its
//! figure; timing covers only the work being measured (opening the store,
//! spawning threads and building keys up front are excluded).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::engines::{Checkpointed, Engine, Mode, ReadView, Session};

pub const KEY_LEN: usize = 16;
pub const VALUE_LEN: usize = 100;
pub type Key = [u8; KEY_LEN];
pub type Value = [u8; VALUE_LEN];

/// Key `i` is `mix(i)` followed by `i`, both big-endian. `mix` is a bijection
/// (the splitmix64 finaliser), so keys are unique, and loading `0..n` in order
/// lands at pseudo-random places in key order: the load exercises real tree
/// inserts instead of the append-only fast path a sequential load would hit.
/// The trailing index keeps a key readable when debugging.
pub fn key(i: u64) -> Key {
    let mut k = [0u8; KEY_LEN];
    k[..8].copy_from_slice(&mix(i).to_be_bytes());
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Non-constant so no engine can compress values to nothing.
pub fn value(i: u64) -> Value {
    let mut v = [0u8; VALUE_LEN];
    let seed = mix(i ^ 0x5555_5555_5555_5555).to_le_bytes();
    for (n, byte) in v.iter_mut().enumerate() {
        *byte = seed[n % 8].wrapping_add(n as u8);
    }
    v
}

/// Where the W4 scan starts: a quarter of the way into the key space, so
/// about three quarters of the loaded keys lie after it and the scan begins
/// mid-tree rather than at its left edge.
const SCAN_START: Key = {
    let mut k = [0u8; KEY_LEN];
    k[0] = 0x40;
    k
};

#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub w1_commits: u64,
    pub w2_threads: u64,
    pub w2_commits_per_thread: u64,
    pub w3_commits: u64,
    pub w4: LoadSizes,
}

#[derive(Clone, Copy, Debug)]
pub struct LoadSizes {
    pub keys: u64,
    pub batch: u64,
    pub gets: u64,
    pub scan: u64,
}

impl Sizes {
    pub const FULL: Sizes = Sizes {
        w1_commits: 20_000,
        w2_threads: 16,
        w2_commits_per_thread: 2_000,
        w3_commits: 100_000,
        w4: LoadSizes {
            keys: 1_000_000,
            batch: 1_000,
            gets: 1_000_000,
            scan: 100_000,
        },
    };

    pub const QUICK: Sizes = Sizes {
        w1_commits: 200,
        w2_threads: 4,
        w2_commits_per_thread: 50,
        w3_commits: 2_000,
        w4: LoadSizes {
            keys: 20_000,
            batch: 1_000,
            gets: 2_000,
            scan: 1_000,
        },
    };
}

pub(crate) fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// W1 (`Mode::Durable`) and W3 (`Mode::Relaxed`): one put per commit, one
/// thread. Returns commits per second.
pub fn single_commits<E: Engine>(dir: &Path, mode: Mode, commits: u64) -> Result<f64> {
    let engine = E::open(dir, mode)?;
    let elapsed = {
        let mut session = engine.session()?;
        let start = Instant::now();
        for i in 0..commits {
            session.put(&key(i), &value(i))?;
        }
        start.elapsed()
    };
    engine.close()?;
    Ok(per_second(commits, elapsed))
}

/// W2: `threads` writers sharing one engine, each committing its own keys
/// durably. Returns total commits per second.
pub fn concurrent_commits<E: Engine>(dir: &Path, threads: u64, per_thread: u64) -> Result<f64> {
    let engine = E::open(dir, Mode::Durable)?;
    // Every writer has its session before the clock starts, so SQLite's
    // per-thread connection open is not timed.
    let barrier = Barrier::new(usize::try_from(threads)? + 1);
    let elapsed = std::thread::scope(|scope| -> Result<Duration> {
        let writers: Vec<_> = (0..threads)
            .map(|t| {
                let (engine, barrier) = (&engine, &barrier);
                scope.spawn(move || -> Result<()> {
                    let session = engine.session();
                    // Wait even on error: the other threads are waiting too.
                    barrier.wait();
                    let mut session = session?;
                    for i in t * per_thread..(t + 1) * per_thread {
                        session.put(&key(i), &value(i))?;
                    }
                    Ok(())
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for writer in writers {
            writer
                .join()
                .map_err(|_| anyhow!("a W2 writer thread panicked"))??;
        }
        Ok(start.elapsed())
    })?;
    engine.close()?;
    Ok(per_second(threads * per_thread, elapsed))
}

/// W4 and W5 results; one JSON line from the child process.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct LoadReport {
    pub load_s: f64,
    pub gets_per_s: f64,
    pub scan_keys_per_s: f64,
    pub peak_rss_bytes: f64,
    pub reopen_s: f64,
    /// Engines with an on-demand checkpoint only (aedb).
    pub checkpoint: Option<CheckpointStall>,
    /// Engines with backups only (aedb, SQLite).
    pub backup: Option<BackupTimes>,
}

/// W5 backup and restore of the loaded data set.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct BackupTimes {
    /// A full online backup into a fresh directory.
    pub backup_full_s: f64,
    /// An incremental backup after `INCREMENTAL_COMMITS` more durable
    /// commits (aedb only; SQLite has no incremental backup).
    pub backup_incremental_s: Option<f64>,
    /// Restoring the chain into a fresh directory, verification included.
    pub restore_verify_s: f64,
}

/// An on-demand checkpoint of the loaded data set while a writer commits.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct CheckpointStall {
    /// The checkpoint's duration as the engine reports it.
    pub checkpoint_s: f64,
    /// The longest single durable commit that overlapped the checkpoint call.
    pub max_commit_stall_s: f64,
    /// How many commits overlapped the checkpoint call.
    pub overlapping_commits: u64,
    /// The writer's median commit latency over its whole run, for scale.
    pub median_commit_s: f64,
    pub checkpoint_bytes: u64,
}

/// W4 then W5. Meant to run alone in a child process so the peak RSS is the
/// engine's (plus a small, equal harness overhead), not the whole run's.
/// `root` holds the store (`db`) and, for W5, its backups and the restore.
pub fn load_read_reopen<E: Engine>(root: &Path, sizes: LoadSizes) -> Result<LoadReport> {
    let dir = &root.join("db");
    let engine = E::open(dir, Mode::Durable)?;
    let mut session = engine.session()?;

    let mut batch: Vec<(Key, Value)> = Vec::with_capacity(usize::try_from(sizes.batch)?);
    let start = Instant::now();
    let mut next = 0;
    while next < sizes.keys {
        let end = sizes.keys.min(next + sizes.batch);
        batch.clear();
        batch.extend((next..end).map(|i| (key(i), value(i))));
        session.put_batch(&batch)?;
        next = end;
    }
    let load = start.elapsed();
    drop(batch);

    let (gets_per_s, scan_keys_per_s) = {
        let mut view = session.read_view()?;
        // Indices are drawn inside the timed loop rather than precomputed, so
        // a million-entry key list does not inflate every engine's RSS.
        let mut rng = SmallRng::seed_from_u64(0x00ae_db00);
        let mut value_bytes = 0u64;
        let start = Instant::now();
        for _ in 0..sizes.gets {
            let i = rng.random_range(0..sizes.keys);
            let len = view
                .get_len(&key(i))?
                .with_context(|| format!("key {i} missing after the load"))?;
            value_bytes += len as u64;
        }
        let gets = start.elapsed();
        if black_box(value_bytes) != sizes.gets * VALUE_LEN as u64 {
            bail!("gets returned {value_bytes} value bytes, expected 100 per get");
        }

        let limit = usize::try_from(sizes.scan)?;
        let start = Instant::now();
        let totals = view.scan(&SCAN_START, limit)?;
        let scan = start.elapsed();
        if totals.keys != sizes.scan
            || black_box(totals.value_bytes) != sizes.scan * VALUE_LEN as u64
        {
            bail!("scan returned {totals:?}, expected {} keys", sizes.scan);
        }
        (per_second(sizes.gets, gets), per_second(sizes.scan, scan))
    };
    // Taken before the checkpoint so the figure stays comparable with the
    // engines that have none; the child logs the peak after it separately.
    let peak_rss_bytes = peak_rss_bytes()? as f64;
    drop(session);

    // The writer's keys start after the loaded ones, so it adds keys instead
    // of overwriting loaded ones.
    let checkpoint = if E::CHECKPOINTS {
        let (stall, last_written) = checkpoint_under_writes(&engine, sizes.keys)?;
        eprintln!(
            "  checkpoint: {:.3} s, {:.1} MiB; {} commits overlapped it, longest {:.2} ms \
             (writer median {:.3} ms); peak RSS after it {:.1} MiB",
            stall.checkpoint_s,
            stall.checkpoint_bytes as f64 / (1024.0 * 1024.0),
            stall.overlapping_commits,
            stall.max_commit_stall_s * 1e3,
            stall.median_commit_s * 1e3,
            self::peak_rss_bytes()? as f64 / (1024.0 * 1024.0),
        );
        Some((stall, last_written))
    } else {
        None
    };
    engine.close()?;

    // W5: with a checkpoint, reopening loads it and replays only the log
    // written after it.
    let start = Instant::now();
    let engine = E::open(dir, Mode::Durable)?;
    let reopen = {
        let mut session = engine.session()?;
        let mut view = session.read_view()?;
        view.get_len(&key(0))?
            .context("key 0 missing after reopen")?;
        start.elapsed()
    };
    if let Some((_, last_written)) = checkpoint {
        // Untimed: the writer's durable commits after the checkpoint must
        // have survived the reopen.
        let mut session = engine.session()?;
        let mut view = session.read_view()?;
        view.get_len(&key(last_written))?.with_context(|| {
            format!("key {last_written} (written during the checkpoint) missing after reopen")
        })?;
    }

    // W5 backups, on the reopened store. Keys written for the incremental
    // one follow every key written so far.
    let next_key = checkpoint.map_or(sizes.keys, |(_, last_written)| last_written + 1);
    let backup = if E::BACKUPS {
        Some(backup_and_restore(engine, root, next_key)?)
    } else {
        engine.close()?;
        None
    };

    Ok(LoadReport {
        load_s: load.as_secs_f64(),
        gets_per_s,
        scan_keys_per_s,
        peak_rss_bytes,
        reopen_s: reopen.as_secs_f64(),
        checkpoint: checkpoint.map(|(stall, _)| stall),
        backup,
    })
}

/// Durable commits written between the full and the incremental backup.
const INCREMENTAL_COMMITS: u64 = 100;
/// Keys per commit written between the full and the incremental backup.
const INCREMENTAL_BATCH: u64 = 100;

/// W5 backups: a full backup of the open store; for engines that have them,
/// `INCREMENTAL_COMMITS` durable commits of `INCREMENTAL_BATCH` new keys
/// (from `next_key`) and an incremental backup; then, with the store closed,
/// a restore of the chain into a fresh directory. Each figure times only the
/// engine's backup or restore call. Afterwards (untimed) the restored store
/// is opened and must hold the last key the chain covers.
fn backup_and_restore<E: Engine>(engine: E, root: &Path, next_key: u64) -> Result<BackupTimes> {
    let full_dir = root.join("backup-full");
    let start = Instant::now();
    engine.backup_full(&full_dir).context("full backup")?;
    let backup_full = start.elapsed();
    let mut chain: Vec<PathBuf> = vec![full_dir];
    let mut last_key = next_key - 1;

    let backup_incremental = if E::INCREMENTAL_BACKUPS {
        let mut session = engine.session()?;
        let mut batch: Vec<(Key, Value)> = Vec::with_capacity(usize::try_from(INCREMENTAL_BATCH)?);
        let start = Instant::now();
        for commit in 0..INCREMENTAL_COMMITS {
            let first = next_key + commit * INCREMENTAL_BATCH;
            batch.clear();
            batch.extend((first..first + INCREMENTAL_BATCH).map(|i| (key(i), value(i))));
            session.put_batch(&batch)?;
        }
        let writes = start.elapsed();
        drop(session);
        last_key = next_key + INCREMENTAL_COMMITS * INCREMENTAL_BATCH - 1;

        let incremental_dir = root.join("backup-incremental");
        let start = Instant::now();
        engine
            .backup_incremental(&incremental_dir, &chain[0])
            .context("incremental backup")?;
        let took = start.elapsed();
        eprintln!(
            "  backup: {} keys in {INCREMENTAL_COMMITS} durable commits took {:.3} s before \
             the incremental backup",
            INCREMENTAL_COMMITS * INCREMENTAL_BATCH,
            writes.as_secs_f64(),
        );
        chain.push(incremental_dir);
        Some(took)
    } else {
        None
    };
    engine.close()?;

    let target = root.join("restored");
    let start = Instant::now();
    E::restore_backups(&chain, &target).context("restore from backup")?;
    let restore = start.elapsed();

    let restored = E::open(&target, Mode::Durable).context("opening the restored store")?;
    {
        let mut session = restored.session()?;
        let mut view = session.read_view()?;
        for i in [0, last_key] {
            view.get_len(&key(i))?
                .with_context(|| format!("key {i} missing after the restore"))?;
        }
    }
    restored.close()?;

    Ok(BackupTimes {
        backup_full_s: backup_full.as_secs_f64(),
        backup_incremental_s: backup_incremental.map(|d| d.as_secs_f64()),
        restore_verify_s: restore.as_secs_f64(),
    })
}

/// Commits the writer makes before the checkpoint starts, so it is in its
/// steady state when the checkpoint begins.
const WARMUP_COMMITS: u64 = 20;

/// One thread commits single keys durably (keys `first_key..`) in a loop
/// while this thread runs `engine.checkpoint()`. Returns the stall figures
/// and the index of the last key the writer committed.
///
/// A commit counts if its interval overlaps the checkpoint call's (so the
/// commit that was waiting when the checkpoint ended counts too). The call's
/// window can be longer than the reported duration if it first waited for an
/// automatic checkpoint already running.
fn checkpoint_under_writes<E: Engine>(
    engine: &E,
    first_key: u64,
) -> Result<(CheckpointStall, u64)> {
    let stop = AtomicBool::new(false);
    let committed = AtomicU64::new(0);
    let (result, window, commits) = std::thread::scope(|scope| -> Result<_> {
        let writer = scope.spawn(|| -> Result<Vec<(Instant, Instant)>> {
            let mut session = engine.session()?;
            let mut commits = Vec::new();
            let mut i = first_key;
            while !stop.load(Ordering::Acquire) {
                let start = Instant::now();
                session.put(&key(i), &value(i))?;
                commits.push((start, Instant::now()));
                committed.fetch_add(1, Ordering::Release);
                i += 1;
            }
            Ok(commits)
        });
        while committed.load(Ordering::Acquire) < WARMUP_COMMITS && !writer.is_finished() {
            std::thread::sleep(Duration::from_micros(200));
        }
        let start = Instant::now();
        let result = engine.checkpoint();
        let end = Instant::now();
        // Stop the writer whatever the checkpoint's outcome.
        stop.store(true, Ordering::Release);
        let commits = writer
            .join()
            .map_err(|_| anyhow!("the checkpoint writer thread panicked"))??;
        Ok((result, (start, end), commits))
    })?;
    let Checkpointed {
        duration, bytes, ..
    } = result.context("on-demand checkpoint")?;

    let (window_start, window_end) = window;
    let overlapping: Vec<Duration> = commits
        .iter()
        .filter(|(start, end)| *start < window_end && *end > window_start)
        .map(|(start, end)| *end - *start)
        .collect();
    let max_stall = overlapping
        .iter()
        .max()
        .copied()
        .context("the writer completed no commit during the checkpoint")?;
    let mut latencies: Vec<Duration> = commits.iter().map(|(s, e)| *e - *s).collect();
    latencies.sort_unstable();
    let median = latencies[latencies.len() / 2];
    let last_written = first_key + commits.len() as u64 - 1;
    Ok((
        CheckpointStall {
            checkpoint_s: duration.as_secs_f64(),
            max_commit_stall_s: max_stall.as_secs_f64(),
            overlapping_commits: overlapping.len() as u64,
            median_commit_s: median.as_secs_f64(),
            checkpoint_bytes: bytes,
        },
        last_written,
    ))
}

/// The process's peak resident set (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kib: u64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("unparsable VmHWM {line:?}"))?;
    Ok(kib * 1024)
}
