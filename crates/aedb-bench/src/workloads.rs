//! The workloads, written once against the `Engine` traits. Each returns its
//! figure; timing covers only the work being measured (opening the store,
//! spawning threads and building keys up front are excluded).

use std::hint::black_box;
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::engines::{Engine, Mode, ReadView, Session};

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

fn mix(mut z: u64) -> u64 {
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

fn per_second(count: u64, elapsed: Duration) -> f64 {
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
}

/// W4 then W5. Meant to run alone in a child process so the peak RSS is the
/// engine's (plus a small, equal harness overhead), not the whole run's.
pub fn load_read_reopen<E: Engine>(dir: &Path, sizes: LoadSizes) -> Result<LoadReport> {
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
    let peak_rss_bytes = peak_rss_bytes()? as f64;
    drop(session);
    engine.close()?;

    let start = Instant::now();
    let engine = E::open(dir, Mode::Durable)?;
    let reopen = {
        let mut session = engine.session()?;
        let mut view = session.read_view()?;
        view.get_len(&key(0))?
            .context("key 0 missing after reopen")?;
        start.elapsed()
    };
    engine.close()?;

    Ok(LoadReport {
        load_s: load.as_secs_f64(),
        gets_per_s,
        scan_keys_per_s,
        peak_rss_bytes,
        reopen_s: reopen.as_secs_f64(),
    })
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
