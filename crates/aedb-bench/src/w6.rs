//! W6: a data set far larger than any engine's cache. Keys with 1 KiB values
//! are loaded in durable batches, then read back with random gets and one
//! range scan, and the store is reopened. Every batch commit is timed: the
//! longest one is the stall a background flush, checkpoint or compaction
//! puts in front of a writer.

use std::hint::black_box;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::engines::{Engine, Mode, ReadView, Session};
use crate::workloads::{LoadSizes, mix, peak_rss_bytes, per_second};

pub const KEY_LEN: usize = 16;
pub const VALUE_LEN: usize = 1024;
pub type W6Key = [u8; KEY_LEN];
pub type W6Value = [u8; VALUE_LEN];

/// Keys per durable commit during the load (the figure).
pub const BATCH: u64 = 1_000;
/// A batch is built in memory before its commit; this bounds that buffer
/// (100 MiB) whatever a caller passes.
const MAX_BATCH: u64 = 100_000;
/// Raw bytes one loaded pair adds, before any engine overhead.
pub const PAIR_BYTES: u64 = (KEY_LEN + VALUE_LEN) as u64;
/// Free space required per raw data byte. The engines run one after another
/// and each store is removed before the next starts, so this is headroom for
/// one store and its log side by side (aedb's WAL and checkpoint, SQLite's
/// WAL and database file, redb's copy-on-write pages), and equally what
/// three engines' raw data would need at once.
pub const FREE_SPACE_FACTOR: u64 = 3;
/// How often the load reports progress: every 1/20th (5%).
const LOAD_PROGRESS_STEPS: u64 = 20;
/// The gets are far quicker than the load; every quarter is enough.
const GETS_PROGRESS_STEPS: u64 = 4;
/// The data-size walk gives up rather than wander an unexpected tree.
const MAX_DIRECTORIES: usize = 10_000;

const KEY_SEED: u64 = 0x5736_6b65_7973_0001;
const VALUE_SEED: u64 = 0x5736_7661_6c75_6573;
const GET_SEED: u64 = 0x5736_6765_7473_0001;
/// splitmix64's increment (an odd constant, so `i * GAMMA` is a bijection).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Key `i`: the `i`-th output of a splitmix64 stream seeded with `KEY_SEED`,
/// then `i`, both big-endian. Random access into a seeded PRNG lets the gets
/// name any loaded key without a 10M-entry key list inflating RSS; the
/// output is a bijection of `i`, so keys are unique and land at random
/// places in key order. The suffix keeps a key readable when debugging.
pub fn key(i: u64) -> W6Key {
    let mut k = [0u8; KEY_LEN];
    let state = KEY_SEED.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA));
    k[..8].copy_from_slice(&mix(state).to_be_bytes());
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

/// Where the scan starts when enough keys follow it: a quarter of the way
/// into the key space, so it begins mid-tree rather than at its left edge.
const SCAN_START: W6Key = {
    let mut k = [0u8; KEY_LEN];
    k[0] = 0x40;
    k
};

/// The scan's start: `SCAN_START` if at least `scan` of the `keys` loaded
/// keys lie at or after it, else the smallest key, so the scan always
/// returns exactly `scan` keys. Counting costs a hash per key, untimed.
fn scan_start(keys: u64, scan: u64) -> &'static [u8] {
    let after = (0..keys).filter(|&i| key(i) >= SCAN_START).count() as u64;
    if after >= scan { &SCAN_START } else { &[] }
}

/// The default sizes (10M keys; 20k with `--quick`) with the command line's
/// overrides; gets and scan never exceed the keys loaded.
pub fn sizes(quick: bool, keys: Option<u64>, gets: Option<u64>) -> LoadSizes {
    let (default_keys, default_gets, default_scan) = if quick {
        (20_000, 2_000, 1_000)
    } else {
        (10_000_000, 1_000_000, 100_000)
    };
    let keys = keys.unwrap_or(default_keys);
    LoadSizes {
        keys,
        batch: BATCH,
        gets: gets.unwrap_or(default_gets).min(keys),
        scan: default_scan.min(keys),
    }
}

/// Free space the run needs on the scratch filesystem for `keys` keys.
pub fn required_free_bytes(keys: u64) -> u64 {
    keys.saturating_mul(PAIR_BYTES)
        .saturating_mul(FREE_SPACE_FACTOR)
}

/// Refuses, before anything is written, a run that would fill the disk.
pub fn check_free_space(dir: &Path, free: u64, keys: u64) -> Result<()> {
    let required = required_free_bytes(keys);
    if free < required {
        bail!(
            "W6 with {keys} keys needs about {:.1} GiB free in {} ({FREE_SPACE_FACTOR}x \
             {keys} keys x {PAIR_BYTES} bytes; the engines run one at a time) but only \
             {:.1} GiB is free: pass --dir on a larger filesystem or a smaller --w6-keys",
            gib(required),
            dir.display(),
            gib(free),
        );
    }
    Ok(())
}

/// Bytes available to an unprivileged writer on `dir`'s filesystem.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let stats = rustix::fs::statvfs(dir)
        .with_context(|| format!("reading the free space of {}", dir.display()))?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// One engine's W6 figures; one JSON line from the child process.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct W6Report {
    pub load_s: f64,
    pub load_keys_per_s: f64,
    /// Key and value bytes loaded per second, in MiB.
    pub load_mib_per_s: f64,
    pub gets_per_s: f64,
    pub scan_keys_per_s: f64,
    /// VmHWM at the end of the child: the whole run's peak, reopen included.
    pub peak_rss_bytes: f64,
    /// Close, open, and the first read.
    pub reopen_s: f64,
    /// The longest single batch commit of the load.
    pub max_commit_stall_s: f64,
    pub p99_commit_s: f64,
    pub median_commit_s: f64,
    /// Blocks allocated under the store's directory after the final close.
    pub data_dir_bytes: f64,
    pub commits: u64,
}

impl W6Report {
    /// The figures reported as JSON lines and table rows, in table order.
    pub fn figures(&self) -> [(&'static str, f64); 10] {
        [
            ("load_s", self.load_s),
            ("load_keys_per_s", self.load_keys_per_s),
            ("load_mib_per_s", self.load_mib_per_s),
            ("gets_per_s", self.gets_per_s),
            ("scan_keys_per_s", self.scan_keys_per_s),
            ("peak_rss_bytes", self.peak_rss_bytes),
            ("reopen_s", self.reopen_s),
            ("max_commit_stall_s", self.max_commit_stall_s),
            ("p99_commit_s", self.p99_commit_s),
            ("data_dir_bytes", self.data_dir_bytes),
        ]
    }
}

/// Reports progress on stderr every `1/steps` of a phase.
struct Progress<'a> {
    engine: &'a str,
    phase: &'static str,
    total: u64,
    step: u64,
    start: Instant,
}

impl<'a> Progress<'a> {
    fn start(engine: &'a str, phase: &'static str, total: u64, steps: u64) -> Self {
        Self {
            engine,
            phase,
            total,
            step: (total / steps).max(1),
            start: Instant::now(),
        }
    }

    fn tick(&self, done: u64, detail: impl FnOnce() -> String) {
        if done.is_multiple_of(self.step) || done == self.total {
            eprintln!(
                "  [W6] {}: {} {:>3}% ({done} of {}) {:.1} s{}",
                self.engine,
                self.phase,
                done * 100 / self.total.max(1),
                self.total,
                self.start.elapsed().as_secs_f64(),
                detail(),
            );
        }
    }
}

/// The whole of W6 for one engine. Meant to run alone in a child process so
/// the peak RSS is this engine's (plus a small, equal harness overhead).
/// `root` holds the store in `db`.
pub fn run<E: Engine>(root: &Path, sizes: LoadSizes, engine_name: &str) -> Result<W6Report> {
    ensure!(sizes.keys > 0, "W6 needs at least one key");
    ensure!(
        (1..=MAX_BATCH).contains(&sizes.batch),
        "W6 batch must be 1..={MAX_BATCH} keys, got {}",
        sizes.batch
    );
    ensure!(
        sizes.gets <= sizes.keys && sizes.scan <= sizes.keys,
        "W6 gets ({}) and scan ({}) cannot exceed the keys ({})",
        sizes.gets,
        sizes.scan,
        sizes.keys
    );
    let dir = root.join("db");
    let engine = E::open(&dir, Mode::Durable)?;
    let (load, commits, gets_per_s, scan_keys_per_s) = {
        let mut session = engine.session()?;
        let (load, commits) = load(&mut session, sizes, engine_name)?;
        let mut view = session.read_view()?;
        let gets_per_s = random_gets(&mut view, sizes, engine_name)?;
        let scan_keys_per_s = scan(&mut view, sizes)?;
        (load, commits, gets_per_s, scan_keys_per_s)
    };
    engine.close()?;

    let start = Instant::now();
    let engine = E::open(&dir, Mode::Durable)?;
    let reopen = {
        let mut session = engine.session()?;
        let mut view = session.read_view()?;
        view.get_len(&key(0))?
            .context("key 0 missing after reopen")?;
        let reopen = start.elapsed();
        // Untimed: the last durable batch must have survived too.
        let last = sizes.keys - 1;
        view.get_len(&key(last))?
            .with_context(|| format!("key {last} missing after reopen"))?;
        reopen
    };
    engine.close()?;

    let data_dir_bytes = allocated_bytes(&dir)?;
    let latencies = CommitLatencies::new(commits);
    let report = W6Report {
        load_s: load.as_secs_f64(),
        load_keys_per_s: per_second(sizes.keys, load),
        load_mib_per_s: per_second(sizes.keys * PAIR_BYTES, load) / f64::from(1u32 << 20),
        gets_per_s,
        scan_keys_per_s,
        peak_rss_bytes: peak_rss_bytes()? as f64,
        reopen_s: reopen.as_secs_f64(),
        max_commit_stall_s: latencies.max.as_secs_f64(),
        p99_commit_s: latencies.p99.as_secs_f64(),
        median_commit_s: latencies.median.as_secs_f64(),
        data_dir_bytes: data_dir_bytes as f64,
        commits: latencies.count,
    };
    Ok(report)
}

/// Loads `sizes.keys` keys in durable batches of `sizes.batch`. Returns the
/// load's wall time (building each batch included: a seeded PRNG filling
/// 1 KiB, far below a durable commit's cost) and every commit's latency.
fn load<S: Session>(
    session: &mut S,
    sizes: LoadSizes,
    engine_name: &str,
) -> Result<(Duration, Vec<Duration>)> {
    let batches = sizes.keys.div_ceil(sizes.batch);
    let mut commits = Vec::with_capacity(usize::try_from(batches)?);
    let mut batch: Vec<(W6Key, W6Value)> = Vec::with_capacity(usize::try_from(sizes.batch)?);
    // Random bytes, so no engine's compression can shrink the values.
    let mut values = SmallRng::seed_from_u64(VALUE_SEED);
    let progress = Progress::start(engine_name, "load", sizes.keys, LOAD_PROGRESS_STEPS);
    let mut longest = Duration::ZERO;
    let start = Instant::now();
    let mut next = 0;
    while next < sizes.keys {
        let end = sizes.keys.min(next + sizes.batch);
        batch.clear();
        for i in next..end {
            let mut value = [0u8; VALUE_LEN];
            values.fill(&mut value[..]);
            batch.push((key(i), value));
        }
        let commit_start = Instant::now();
        session.put_batch(&batch)?;
        let took = commit_start.elapsed();
        commits.push(took);
        longest = longest.max(took);
        next = end;
        progress.tick(next, || {
            format!(
                ", longest commit so far {:.1} ms",
                longest.as_secs_f64() * 1e3
            )
        });
    }
    let load = start.elapsed();
    assert_eq!(
        commits.len() as u64,
        batches,
        "one latency per batch commit"
    );
    Ok((load, commits))
}

/// `sizes.gets` gets of uniformly random loaded keys, each checked present
/// with a full-size value. Returns gets per second.
fn random_gets<V: ReadView>(view: &mut V, sizes: LoadSizes, engine_name: &str) -> Result<f64> {
    let mut rng = SmallRng::seed_from_u64(GET_SEED);
    let progress = Progress::start(engine_name, "gets", sizes.gets, GETS_PROGRESS_STEPS);
    let mut value_bytes = 0u64;
    let start = Instant::now();
    for n in 1..=sizes.gets {
        let i = rng.random_range(0..sizes.keys);
        let len = view
            .get_len(&key(i))?
            .with_context(|| format!("key {i} missing after the load"))?;
        value_bytes += len as u64;
        progress.tick(n, String::new);
    }
    let elapsed = start.elapsed();
    if black_box(value_bytes) != sizes.gets * VALUE_LEN as u64 {
        bail!("gets returned {value_bytes} value bytes, expected {VALUE_LEN} per get");
    }
    Ok(per_second(sizes.gets, elapsed))
}

/// One range scan of `sizes.scan` keys. Returns keys per second.
fn scan<V: ReadView>(view: &mut V, sizes: LoadSizes) -> Result<f64> {
    let start_key = scan_start(sizes.keys, sizes.scan);
    let limit = usize::try_from(sizes.scan)?;
    let start = Instant::now();
    let totals = view.scan(start_key, limit)?;
    let elapsed = start.elapsed();
    if totals.keys != sizes.scan || black_box(totals.value_bytes) != sizes.scan * VALUE_LEN as u64 {
        bail!("scan returned {totals:?}, expected {} keys", sizes.scan);
    }
    Ok(per_second(sizes.scan, elapsed))
}

/// Summary of the load's batch-commit latencies.
#[derive(Debug, PartialEq, Eq)]
struct CommitLatencies {
    count: u64,
    median: Duration,
    p99: Duration,
    max: Duration,
}

impl CommitLatencies {
    /// Nearest-rank percentiles; `latencies` is never empty (a load has at
    /// least one key, so at least one commit).
    fn new(mut latencies: Vec<Duration>) -> Self {
        latencies.sort_unstable();
        let count = latencies.len();
        let rank = |percent: usize| latencies[(count * percent).div_ceil(100).max(1) - 1];
        Self {
            count: count as u64,
            median: rank(50),
            p99: rank(99),
            max: latencies[count - 1],
        }
    }
}

/// Bytes allocated on disk under `dir`: blocks rather than lengths, so
/// preallocated log segments count as what they occupy and sparse files
/// do not count their holes.
pub fn allocated_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    let mut visited = 0usize;
    while let Some(current) = pending.pop() {
        visited += 1;
        ensure!(
            visited <= MAX_DIRECTORIES,
            "more than {MAX_DIRECTORIES} directories under {}",
            dir.display()
        );
        let entries = std::fs::read_dir(&current)
            .with_context(|| format!("listing {}", current.display()))?;
        for entry in entries {
            let entry = entry?;
            // Not followed through symlinks: only what the store itself holds.
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            }
            total = total.saturating_add(meta.blocks().saturating_mul(512));
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn keys_are_fixed_width_unique_and_deterministic() {
        let keys: BTreeSet<W6Key> = (0..10_000).map(key).collect();
        assert_eq!(keys.len(), 10_000);
        assert_eq!(key(42), key(42));
        // Random order: sorted keys are not the index order.
        let in_order = (0..100).map(key).collect::<Vec<_>>();
        assert!(in_order.windows(2).any(|w| w[0] > w[1]));
    }

    #[test]
    fn scan_start_leaves_enough_keys_after_it() {
        for (keys, scan) in [
            (1, 1),
            (3, 3),
            (1_000, 500),
            (1_000, 1_000),
            (20_000, 1_000),
        ] {
            let start = scan_start(keys, scan);
            let after = (0..keys).filter(|&i| key(i).as_slice() >= start).count() as u64;
            assert!(
                after >= scan,
                "{keys} keys, scan {scan}: {after} after start"
            );
        }
        assert_eq!(scan_start(20_000, 1_000), SCAN_START.as_slice());
    }

    #[test]
    fn sizes_scale_gets_and_scan_down_to_the_keys() {
        let full = sizes(false, None, None);
        assert_eq!(
            (full.keys, full.batch, full.gets, full.scan),
            (10_000_000, 1_000, 1_000_000, 100_000)
        );
        let small = sizes(false, Some(50_000), None);
        assert_eq!((small.gets, small.scan), (50_000, 50_000));
        let quick = sizes(true, Some(20_000), Some(5_000));
        assert_eq!((quick.keys, quick.gets, quick.scan), (20_000, 5_000, 1_000));
    }

    #[test]
    fn free_space_check_refuses_less_than_three_times_the_data() {
        let dir = Path::new("/scratch");
        let needed = 1_000 * PAIR_BYTES * 3;
        assert!(check_free_space(dir, needed, 1_000).is_ok());
        let refusal = check_free_space(dir, needed - 1, 1_000)
            .expect_err("one byte short must be refused")
            .to_string();
        assert!(refusal.contains("--w6-keys"), "{refusal}");
        assert_eq!(required_free_bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn commit_latencies_use_nearest_rank() {
        let ms = Duration::from_millis;
        let summary = CommitLatencies::new((1..=200).rev().map(ms).collect());
        assert_eq!(
            summary,
            CommitLatencies {
                count: 200,
                median: ms(100),
                p99: ms(198),
                max: ms(200),
            }
        );
        let one = CommitLatencies::new(vec![ms(7)]);
        assert_eq!((one.median, one.p99, one.max), (ms(7), ms(7), ms(7)));
    }

    #[test]
    fn allocated_bytes_counts_nested_files() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("sub"))?;
        // Synced so the blocks are allocated on any filesystem.
        let mut file = std::fs::File::create(dir.path().join("sub/data"))?;
        std::io::Write::write_all(&mut file, &[1u8; 64 * 1024])?;
        file.sync_all()?;
        assert!(allocated_bytes(dir.path())? >= 64 * 1024);
        Ok(())
    }
}
