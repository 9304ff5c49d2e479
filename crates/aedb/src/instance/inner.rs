//! The shared inner state: manifest updates, checkpoints, shutdown, and the
//! flusher and checkpointer threads.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::{AedbInstance, CheckpointInfo, Flusher, FlusherSignal, Inner};
use crate::checkpoint;
use crate::config::DurabilityMode;
use crate::error::AedbError;
use crate::open::write_manifest;
use crate::wal::ChainHead;
use crate::wal::format::segment_file_name;
use crate::wal::writer::WalWriter;

impl Inner {
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
        let meta = checkpoint::write(
            &*self.config.storage,
            &self.dir,
            &name,
            &state,
            &idempotency,
            chain_head,
            self.config.checkpoint_key.as_ref(),
            &mut |_| {},
        )?;
        let (old, obsolete) = {
            let mut ms = self.manifest.lock();
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
            (old, obsolete)
        };
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
        ck.snapshot = Some(state);
        ck.written_at = Some(std::time::SystemTime::now());
        ck.last_at = std::time::Instant::now();
        ck.last_appended = appended;
        ck.last_duration = duration;
        tracing::info!(
            lsn = meta.lsn,
            bytes = meta.bytes,
            ?duration,
            removed = obsolete.len(),
            "checkpoint written"
        );
        Ok(CheckpointInfo {
            file: self.dir.join(&meta.file),
            lsn: meta.lsn,
            bytes: meta.bytes,
            duration,
            segments_removed: obsolete.len(),
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
pub(super) fn spawn_flusher(
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
