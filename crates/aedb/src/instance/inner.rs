//! The shared inner state: manifest updates, checkpoints, shutdown, and the
//! flusher and checkpointer threads. The manifest, the checkpoint state, the
//! background threads, the project locks and the write pins are private to this
//! file; the rest of `instance/` reaches them through the methods below.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::admission::Admission;
use super::sequencer::{CommitState, Sequencer};
use super::{AedbInstance, CheckpointInfo};
use crate::backup::LiveFiles;
use crate::checkpoint;
use crate::config::{AedbConfig, DurabilityMode};
use crate::error::AedbError;
use crate::lock::DirLock;
use crate::lsm::{self, LiveTable};
use crate::metrics::{Counters, OperationalMetrics};
use crate::model::state::DbState;
use crate::open::{ManifestState, write_manifest};
use crate::table::BlockCache;
use crate::tableset::{OpenTable, TableSet};
use crate::txn::snapshot::Snapshot;
use crate::wal::format::segment_file_name;
use crate::wal::writer::WalWriter;
use crate::wal::{ChainHead, RecoveryReport};

#[derive(Default)]
struct FlusherSignal {
    stop: bool,
    kicked: bool,
}

struct Flusher {
    signal: Arc<(Mutex<FlusherSignal>, Condvar)>,
    handle: JoinHandle<()>,
}

pub(super) struct Inner {
    pub(super) dir: PathBuf,
    pub(super) config: AedbConfig,
    pub(super) sequencer: Sequencer,
    pub(super) wal: Arc<WalWriter>,
    pub(super) admission: Admission,
    pub(super) counters: Counters,
    pub(super) recovery: RecoveryReport,
    flusher: Mutex<Option<Flusher>>,
    closed: AtomicBool,
    manifest: Mutex<ManifestState>,
    /// One checkpoint at a time; close waits for a running one.
    checkpointing: Mutex<CheckpointState>,
    checkpointer: Arc<(Mutex<bool>, Condvar)>,
    /// One lock per project: a commit holds its project's lock from validation to
    /// publication, so commits to different projects proceed in parallel.
    project_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Snapshot seqs of open write transactions (seq -> how many): tombstones at
    /// or before the oldest are no longer needed for conflict detection.
    write_pins: Arc<Mutex<BTreeMap<u64, usize>>>,
    _lock: DirLock,
}

/// What `flush_tables` wrote.
struct Flush {
    written: Vec<LiveTable>,
    /// The tables replace every listed one (else they are added).
    rewrite: bool,
}

pub(super) struct CheckpointState {
    snapshot: Option<Arc<DbState>>,
    /// The block cache every table of this instance reads through.
    cache: Arc<BlockCache>,
    /// When the live checkpoint was written (its file time after a reopen).
    written_at: Option<std::time::SystemTime>,
    last_at: std::time::Instant,
    last_appended: u64,
    last_duration: Duration,
}

impl CheckpointState {
    /// The checkpoint recovery started from (if any), as found at open.
    pub(super) fn at_open(
        snapshot: Option<Arc<DbState>>,
        cache: Arc<BlockCache>,
        written_at: Option<std::time::SystemTime>,
    ) -> Self {
        Self {
            snapshot,
            cache,
            written_at,
            last_at: std::time::Instant::now(),
            last_appended: 0,
            last_duration: Duration::ZERO,
        }
    }
}

/// Keeps tombstones newer than a write transaction's snapshot while it is open
/// (it needs them to see a write-write conflict with a delete).
pub(crate) struct SnapshotPin {
    seq: u64,
    pins: Arc<Mutex<BTreeMap<u64, usize>>>,
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock();
        if let Some(n) = pins.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.seq);
            }
        }
    }
}

impl std::fmt::Debug for SnapshotPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SnapshotPin").field(&self.seq).finish()
    }
}

/// (index, first LSN) of every segment a backup may need: the sealed ones and
/// the active one.
fn live_segments(ms: &ManifestState) -> Vec<(u64, u64)> {
    ms.sealed
        .iter()
        .map(|s| (s.index, s.first_lsn))
        .chain(std::iter::once((ms.active_index, ms.active_first_lsn)))
        .collect()
}

impl Inner {
    // The one constructor, called once by open with what recovery produced.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        dir: PathBuf,
        config: AedbConfig,
        commit_state: CommitState,
        wal: Arc<WalWriter>,
        recovery: RecoveryReport,
        manifest: ManifestState,
        checkpointing: CheckpointState,
        lock: DirLock,
    ) -> Self {
        Self {
            dir,
            sequencer: Sequencer::new(
                commit_state,
                config.limits.snapshot_history,
                config.commit_timeout,
            ),
            wal,
            admission: Admission::new(&config.limits),
            counters: Counters::default(),
            flusher: Mutex::new(None),
            recovery,
            closed: AtomicBool::new(false),
            manifest: Mutex::new(manifest),
            checkpointing: Mutex::new(checkpointing),
            checkpointer: Arc::new((Mutex::new(false), Condvar::new())),
            project_locks: Mutex::new(HashMap::new()),
            write_pins: Arc::new(Mutex::new(BTreeMap::new())),
            _lock: lock,
            config,
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Starts the flusher thread (only for a storage with background I/O).
    pub(super) fn start_flusher(&self) -> Result<(), AedbError> {
        *self.flusher.lock() = Some(spawn_flusher(
            self.wal.clone(),
            self.config.durability,
            self.config.batch_interval,
        )?);
        Ok(())
    }

    /// Asks the flusher (if there is one) to write the buffer out now.
    pub(super) fn kick_flusher(&self) {
        if let Some(f) = self.flusher.lock().as_ref() {
            f.signal.0.lock().kicked = true;
            f.signal.1.notify_one();
        }
    }

    /// The latest state, pinned for a write transaction. Taken and pinned under
    /// one lock, so a purge either sees the pin or runs against a state no older
    /// than this snapshot.
    pub(super) fn pin_latest(&self) -> (Snapshot, SnapshotPin) {
        let mut pins = self.write_pins.lock();
        let snapshot = Snapshot {
            state: self.sequencer.load_full(),
        };
        *pins.entry(snapshot.seq()).or_default() += 1;
        let pin = SnapshotPin {
            seq: snapshot.seq(),
            pins: self.write_pins.clone(),
        };
        (snapshot, pin)
    }

    /// The snapshot seq at or before which no open write transaction needs a
    /// tombstone: the oldest pinned one, or the published state if none is open.
    pub(super) fn tombstone_horizon(&self) -> u64 {
        let pins = self.write_pins.lock();
        let published = self.sequencer.load().seq;
        pins.keys()
            .next()
            .map_or(published, |&oldest| oldest.min(published))
    }

    /// The state of the live checkpoint (`ConsistencyMode::AtCheckpoint`).
    pub(super) fn checkpoint_snapshot(&self) -> Option<Arc<DbState>> {
        self.checkpointing.lock().snapshot.clone()
    }

    /// Keeps checkpoints (which delete the files they make obsolete) waiting while
    /// the guard lives.
    pub(super) fn hold_checkpoints(&self) -> MutexGuard<'_, CheckpointState> {
        self.checkpointing.lock()
    }

    /// The files a full backup copies: the live checkpoint and every segment.
    pub(super) fn live_files(&self) -> LiveFiles {
        let ms = self.manifest.lock();
        LiveFiles {
            checkpoint: ms.checkpoint.clone(),
            segments: live_segments(&ms),
            tables: ms.tables.clone(),
        }
    }

    /// The segments an incremental backup reads from.
    pub(super) fn live_segments(&self) -> Vec<(u64, u64)> {
        live_segments(&self.manifest.lock())
    }

    /// Keeps the WAL after `lsn` on disk for the next incremental backup.
    pub(super) fn set_backup_floor(&self, lsn: u64) -> Result<(), AedbError> {
        let mut ms = self.manifest.lock();
        ms.backup_floor_lsn = Some(lsn);
        write_manifest(&self.dir, &self.config, &mut ms)
    }

    /// The manifest and checkpoint figures of `operational_metrics()`.
    pub(super) fn fill_checkpoint_metrics(&self, m: &mut OperationalMetrics) {
        {
            let ms = self.manifest.lock();
            m.wal_segments = ms.sealed.len() as u64 + 1;
            m.table_files = ms.tables.len() as u64;
            m.table_bytes = ms.tables.iter().map(|t| t.bytes).sum();
            m.checkpoint_lsn = ms.checkpoint.as_ref().map(|c| c.lsn);
        }
        let ck = self.checkpointing.lock();
        if let Some(at) = ck.written_at {
            m.checkpoint_age_secs = at.elapsed().ok().map(|d| d.as_secs_f64());
            m.checkpoint_duration_secs =
                (!ck.last_duration.is_zero()).then(|| ck.last_duration.as_secs_f64());
        }
    }

    pub(super) fn project_lock(&self, project: &str) -> Arc<Mutex<()>> {
        self.project_locks
            .lock()
            .entry(project.to_string())
            .or_default()
            .clone()
    }

    /// Records segments sealed by the last append in the manifest (commit lock held).
    pub(super) fn record_rotation(&self) -> Result<(), AedbError> {
        let sealed = self.wal.take_newly_sealed();
        if sealed.is_empty() {
            return Ok(());
        }
        let mut ms = self.manifest.lock();
        // A segment is sealed only once everything in it is durable.
        if let Some(last) = sealed.last() {
            ms.advance_durable_head(ChainHead {
                lsn: last.last_lsn,
                hash: last.end_hash,
            });
        }
        ms.sealed.extend(sealed);
        let (index, first) = self.wal.active_segment();
        ms.active_index = index;
        ms.active_first_lsn = first;
        write_manifest(&self.dir, &self.config, &mut ms)
    }

    /// Records in the manifest how far the log is durable, so that strict recovery
    /// can tell acknowledged frames from a torn tail. `pending` carries a head seen
    /// on the previous call: under steady load the log's head is never durable at
    /// the instant it is read, but the one read a call earlier is.
    pub(super) fn record_durable_head(
        &self,
        pending: &mut Option<ChainHead>,
    ) -> Result<(), AedbError> {
        let (_, lsn, hash) = self.wal.head();
        let now = ChainHead { lsn, hash };
        let durable = self.wal.durable_lsn();
        let record = if durable >= now.lsn {
            *pending = None;
            Some(now)
        } else {
            let earlier = pending.filter(|p| durable >= p.lsn);
            if earlier.is_some() || pending.is_none() {
                *pending = Some(now);
            }
            earlier
        };
        let Some(head) = record else {
            return Ok(());
        };
        let mut ms = self.manifest.lock();
        // After close the manifest is final (and the directory may be someone else's).
        if self.closed.load(Ordering::Acquire) || !ms.advance_durable_head(head) {
            return Ok(());
        }
        write_manifest(&self.dir, &self.config, &mut ms)
    }

    pub(super) fn checkpoint(&self) -> Result<CheckpointInfo, AedbError> {
        let mut ck = self.checkpointing.lock();
        let started = std::time::Instant::now();
        let (state, idempotency, chain_head) = {
            let mut cs = self.sequencer.lock_blocking();
            cs.drain();
            (cs.latest(), cs.idempotency_entries(), self.wal.head().2)
        };
        // The checkpoint must never be ahead of the durable log.
        self.wal.wait_durable(state.seq)?;
        let appended = self.wal.appended_bytes();
        let name = {
            let ms = self.manifest.lock();
            // The file the durable manifest names may not be the one in memory: a
            // checkpoint whose manifest write failed already moved `ms.checkpoint`
            // on. No existing file is ever replaced (the generation only grows, so
            // the other form is always new).
            let plain = checkpoint::file_name(state.seq, None, 0);
            let path = self.dir.join(&plain);
            let taken = ms.checkpoint.as_ref().is_some_and(|c| c.file == plain)
                || self
                    .config
                    .storage
                    .try_exists(&path)
                    .map_err(|e| AedbError::io(&path, e))?;
            checkpoint::file_name(
                state.seq,
                taken.then_some(plain.as_str()),
                ms.generation + 1,
            )
        };
        let flush = self.flush_tables(&state)?;
        // Opened before the manifest switch: a table that does not open leaves
        // the directory as it was.
        let opened = self.open_written(&flush.written, &ck.cache)?;
        let meta = checkpoint::write(
            &*self.config.storage,
            &self.dir,
            &name,
            &lsm::catalog_only(&state),
            &idempotency,
            chain_head,
            self.config.checkpoint_key.as_ref(),
            &mut |_| {},
        )?;
        let table_bytes: u64 = flush.written.iter().map(|t| t.bytes).sum();
        let (tables_written, rewrite) = (flush.written.len(), flush.rewrite);
        let (old, obsolete, replaced_tables) = {
            let mut ms = self.manifest.lock();
            let replaced_tables = if flush.rewrite {
                std::mem::replace(&mut ms.tables, flush.written)
            } else {
                ms.tables.extend(flush.written);
                Vec::new()
            };
            let old = ms.checkpoint.replace(meta.clone());
            ms.advance_durable_head(ChainHead {
                lsn: meta.lsn,
                hash: meta.chain_head,
            });
            // A backup chain needs every frame after its last backup.
            let removable_to = ms.backup_floor_lsn.map_or(meta.lsn, |f| f.min(meta.lsn));
            let (obsolete, keep): (Vec<_>, Vec<_>) = ms
                .sealed
                .drain(..)
                .partition(|s| s.last_lsn <= removable_to);
            ms.sealed = keep;
            write_manifest(&self.dir, &self.config, &mut ms)?;
            (old, obsolete, replaced_tables)
        };
        // The tables beneath the states published from now on: the new ones on
        // top (or alone, after a rewrite), holding everything up to `state.seq`.
        let mut set: Vec<Arc<OpenTable>> = opened;
        if !rewrite {
            set.extend(state.tables.tables.iter().cloned());
        }
        let set = Arc::new(TableSet {
            tables: set,
            flushed_seq: state.seq,
        });
        // A replaced table is garbage once no state reads it: snapshots taken
        // before this switch keep theirs until they drop.
        for t in &replaced_tables {
            match state.tables.tables.iter().find(|o| o.meta.id == t.id) {
                Some(open) => open.retire(),
                None => {
                    let p = self.dir.join(t.file());
                    if let Err(e) = self.config.storage.remove_file(&p) {
                        tracing::warn!(file = %p.display(), error = %e, "could not remove a replaced table");
                    }
                }
            }
        }
        // The memtable drops what the tables now hold (the latest state may be
        // ahead of `state`: only entries at or before `state.seq` go).
        {
            let mut cs = self.sequencer.lock_blocking();
            let next = lsm::evict(cs.state(), Arc::clone(&set));
            debug_assert!(next.seq >= state.seq);
            cs.replace_published(next);
        }
        // Only now that the new manifest is durable are the old files garbage.
        for s in &obsolete {
            let p = self.dir.join(segment_file_name(s.index));
            if let Err(e) = self.config.storage.remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "could not remove an obsolete segment");
            }
        }
        if let Some(old) = old.filter(|o| o.file != meta.file) {
            let p = self.dir.join(&old.file);
            if let Err(e) = self.config.storage.remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "could not remove the old checkpoint");
            }
        }
        let duration = started.elapsed();
        ck.snapshot = Some(Arc::new(lsm::evict(&state, set)));
        ck.written_at = Some(std::time::SystemTime::now());
        ck.last_at = std::time::Instant::now();
        ck.last_appended = appended;
        ck.last_duration = duration;
        tracing::info!(
            lsn = meta.lsn,
            bytes = meta.bytes,
            table_bytes,
            tables_written,
            rewrite,
            ?duration,
            removed = obsolete.len(),
            "checkpoint written"
        );
        Ok(CheckpointInfo {
            file: self.dir.join(&meta.file),
            lsn: meta.lsn,
            bytes: meta.bytes + table_bytes,
            duration,
            segments_removed: obsolete.len(),
        })
    }

    /// Opens the tables a flush wrote, newest first.
    fn open_written(
        &self,
        written: &[LiveTable],
        cache: &Arc<BlockCache>,
    ) -> Result<Vec<Arc<OpenTable>>, AedbError> {
        let key = self.config.checkpoint_key.as_ref();
        let keys: Vec<&crate::config::SecretKey> = key.into_iter().collect();
        let readers = lsm::open_tables(
            &*self.config.storage,
            &self.dir,
            written,
            &keys,
            cache,
            false,
            false,
        )?;
        let mut open: Vec<Arc<OpenTable>> = written
            .iter()
            .cloned()
            .zip(readers)
            .map(|(meta, reader)| {
                let path = self.dir.join(meta.file());
                Arc::new(OpenTable::new(
                    meta,
                    reader,
                    self.config.storage.clone(),
                    path,
                ))
            })
            .collect();
        open.reverse();
        Ok(open)
    }

    /// Writes the user data of `state` into table files: the memtable's entries
    /// after the tables' `flushed_seq` as level-0 tables, or the memtable merged
    /// over every table as level-1 tables when there is no table yet, when
    /// `COMPACT_AT_TABLES` level-0 tables have piled up, or when a table is sealed
    /// under another key than the configured one (a key rotation). The manifest is
    /// not changed here.
    fn flush_tables(&self, state: &DbState) -> Result<Flush, AedbError> {
        let key = self.config.checkpoint_key.as_ref();
        let key_id = key.map(crate::crypto::key_id).unwrap_or_default();
        let tables = &state.tables.tables;
        let rewrite = tables.is_empty()
            || tables.iter().filter(|t| t.meta.level == 0).count() >= lsm::COMPACT_AT_TABLES
            || tables.iter().any(|t| t.meta.key_id != key_id);
        let mut next_id = || self.manifest.lock().allocate_table_id();
        let mut sink = lsm::FlushSink::new(
            &*self.config.storage,
            &self.dir,
            key,
            if rewrite { 1 } else { 0 },
            &mut next_id,
        );
        if rewrite {
            lsm::write_rewrite(&mut sink, state)?;
        } else {
            lsm::write_flush(&mut sink, state)?;
        }
        Ok(Flush {
            written: sink.finish()?,
            rewrite,
        })
    }

    /// Whether the automatic policy calls for a checkpoint now.
    pub(super) fn checkpoint_due(&self) -> bool {
        let ck = self.checkpointing.lock();
        let written = self.wal.appended_bytes().saturating_sub(ck.last_appended);
        if written == 0 {
            return false;
        }
        self.config
            .checkpoint_wal_bytes
            .is_some_and(|b| written >= b)
            || self
                .config
                .checkpoint_interval
                .is_some_and(|i| ck.last_at.elapsed() >= i)
    }

    pub(super) fn shutdown(&self) -> Result<(), AedbError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        *self.checkpointer.0.lock() = true;
        self.checkpointer.1.notify_all();
        // Waits for a running checkpoint to finish.
        drop(self.checkpointing.lock());
        if let Some(f) = self.flusher.lock().take() {
            f.signal.0.lock().stop = true;
            f.signal.1.notify_one();
            let _ = f.handle.join();
        }
        self.wal.shutdown()?;
        // Everything is durable now: the final manifest records the log's end, so
        // a later loss of any of it is refused by strict recovery.
        let (_, lsn, hash) = self.wal.head();
        let mut ms = self.manifest.lock();
        if ms.advance_durable_head(ChainHead { lsn, hash }) {
            write_manifest(&self.dir, &self.config, &mut ms)?;
        }
        Ok(())
    }
}

impl<M> AedbInstance<M> {
    /// Makes every commit so far durable and returns the head of the log: its last
    /// LSN and the chain hash that commits to every frame up to it. Store it off
    /// the machine (it is not secret) and pass it to `AedbConfig::with_expected_head`
    /// or `aedb check invariants --expect-head LSN:HASH` later: a directory behind
    /// it (a stale copy, a truncated log) or on another history is refused.
    pub fn chain_head(&self) -> Result<ChainHead, AedbError> {
        let (_, lsn, hash) = self.inner.wal.head();
        self.inner.wal.wait_durable(lsn)?;
        Ok(ChainHead { lsn, hash })
    }
}

impl<M> AedbInstance<M> {
    /// Runs one round of what the background threads do: the flusher's (make the
    /// log durable under `Full` and `Batch`, write the buffer out under
    /// `OsBuffered`) and recording the durable head in the manifest. Returns the
    /// durable LSN after it. For a storage without background I/O
    /// (`Storage::background_io`), where no thread does this, so a test can run it
    /// at chosen points.
    pub fn run_background_round(&self) -> Result<u64, AedbError> {
        let wal = &self.inner.wal;
        match self.inner.config.durability {
            DurabilityMode::OsBuffered => wal.write_out()?,
            DurabilityMode::Full | DurabilityMode::Batch => wal.wait_durable(wal.last_lsn())?,
        }
        self.inner.record_durable_head(&mut None)?;
        Ok(wal.durable_lsn())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "aedb: final flush on drop failed");
        }
    }
}

/// Background thread bounding how long a `Visible` commit stays unsynced
/// (`Full`/`Batch`) or unwritten (`OsBuffered`).
fn spawn_flusher(
    wal: Arc<WalWriter>,
    mode: DurabilityMode,
    interval: Duration,
) -> Result<Flusher, AedbError> {
    let signal = Arc::new((Mutex::new(FlusherSignal::default()), Condvar::new()));
    let sig = signal.clone();
    let handle = std::thread::Builder::new()
        .name("aedb-flusher".into())
        .spawn(move || {
            loop {
                {
                    let mut s = sig.0.lock();
                    if !s.stop && !s.kicked {
                        sig.1.wait_for(&mut s, interval);
                    }
                    if s.stop {
                        return;
                    }
                    s.kicked = false;
                }
                let last = wal.last_lsn();
                // Errors poison the writer; committers see them on their next call.
                let _ = match mode {
                    DurabilityMode::OsBuffered => wal.write_out(),
                    DurabilityMode::Full | DurabilityMode::Batch => {
                        if wal.durable_lsn() < last {
                            wal.wait_durable(last)
                        } else {
                            Ok(())
                        }
                    }
                };
            }
        })
        .map_err(|e| AedbError::io("aedb-flusher thread", e))?;
    Ok(Flusher { signal, handle })
}

/// Runs the automatic checkpoint policy (evaluated every `CHECKPOINT_POLL`) and
/// records the durable head in the manifest every `durable_head_interval`. Holds
/// only a weak reference, so it never keeps a dropped instance alive; it exits once
/// the instance is gone or closed.
pub(super) fn spawn_checkpointer(inner: &Arc<Inner>) -> Result<(), AedbError> {
    let checkpoints =
        inner.config.checkpoint_wal_bytes.is_some() || inner.config.checkpoint_interval.is_some();
    let head_interval = inner.config.durable_head_interval;
    // A storage that must see its calls in a reproducible order gets none from
    // background threads: checkpoints and durable-head records are then explicit.
    if (!checkpoints && head_interval.is_none()) || !inner.config.storage.background_io() {
        return Ok(());
    }
    let weak = Arc::downgrade(inner);
    let stop = inner.checkpointer.clone();
    std::thread::Builder::new()
        .name("aedb-checkpointer".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let mut next_policy = started + CHECKPOINT_POLL;
            let mut next_head = head_interval.map(|i| started + i);
            let mut pending_head = None;
            loop {
                {
                    let wake = match next_head {
                        Some(h) if !checkpoints || h < next_policy => h,
                        _ => next_policy,
                    };
                    let mut stopped = stop.0.lock();
                    if !*stopped {
                        stop.1.wait_until(&mut stopped, wake);
                    }
                    if *stopped {
                        return;
                    }
                }
                let Some(inner) = weak.upgrade() else { return };
                if inner.closed.load(Ordering::Acquire) {
                    return;
                }
                let now = std::time::Instant::now();
                if checkpoints && now >= next_policy {
                    next_policy = now + CHECKPOINT_POLL;
                    if inner.checkpoint_due()
                        && let Err(e) = inner.checkpoint()
                    {
                        tracing::error!(error = %e, "automatic checkpoint failed; will retry");
                    }
                }
                if let (Some(at), Some(i)) = (next_head, head_interval)
                    && now >= at
                {
                    next_head = Some(now + i);
                    if let Err(e) = inner.record_durable_head(&mut pending_head) {
                        tracing::error!(error = %e, "recording the durable head in the manifest failed; will retry");
                    }
                }
            }
        })
        .map_err(|e| AedbError::io("aedb-checkpointer thread", e))?;
    Ok(())
}

/// How often the automatic checkpoint policy is evaluated.
const CHECKPOINT_POLL: Duration = Duration::from_millis(500);
