//! Taking backups of a live instance (format, verification and restore are in
//! `crate::backup`).

use std::path::Path;

use super::AedbInstance;
use crate::backup::{BackupProgress, BackupReport, Captured};
use crate::error::AedbError;
use crate::open::write_manifest;

impl<M> AedbInstance<M> {
    /// Captures a consistent snapshot (state, idempotency records, chain head) and
    /// waits until the log is durable up to it.
    fn capture(&self) -> Result<Captured, AedbError> {
        let cap = {
            let mut cs = self.lock_commit()?;
            cs.drain();
            Captured {
                state: cs.latest(),
                chain_head: self.inner.wal.head().2,
            }
        };
        self.inner.wal.wait_durable(cap.state.seq)?;
        Ok(cap)
    }

    /// Keeps the WAL after `lsn` on disk for the next incremental backup.
    fn set_backup_floor(&self, lsn: u64) -> Result<(), AedbError> {
        let mut ms = self.inner.manifest.lock();
        ms.backup_floor_lsn = Some(lsn);
        write_manifest(&self.inner.dir, &self.inner.config, &mut ms)
    }

    /// A self-contained backup of the state now (writers keep going) into `dest`
    /// (absent or empty); callers authorize first. See `backup` module docs for
    /// the format.
    pub(super) fn backup_full_inner(
        &self,
        dest: &Path,
        progress: &mut dyn FnMut(BackupProgress),
    ) -> Result<BackupReport, AedbError> {
        // Checkpoints wait while the live files are copied: they would delete them.
        let _no_checkpoint = self.inner.checkpointing.lock();
        let cap = self.capture()?;
        let live = {
            let ms = self.inner.manifest.lock();
            crate::backup::LiveFiles {
                checkpoint: ms.checkpoint.clone(),
                segments: ms
                    .sealed
                    .iter()
                    .map(|s| (s.index, s.first_lsn))
                    .chain(std::iter::once((ms.active_index, ms.active_first_lsn)))
                    .collect(),
            }
        };
        let r = crate::backup::write_full(
            dest,
            &self.inner.dir,
            &live,
            &cap,
            &self.inner.config,
            progress,
        )?;
        self.set_backup_floor(r.end_lsn)?;
        tracing::info!(dir = %dest.display(), end_lsn = r.end_lsn, bytes = r.bytes, "full backup written");
        Ok(r)
    }

    /// The WAL since the backup in `parent` (the chain's latest) into `dest`;
    /// callers authorize first.
    pub(super) fn backup_incremental_inner(
        &self,
        dest: &Path,
        parent: &Path,
        progress: &mut dyn FnMut(BackupProgress),
    ) -> Result<BackupReport, AedbError> {
        let cap = self.capture()?;
        let segments: Vec<(u64, u64)> = {
            let ms = self.inner.manifest.lock();
            ms.sealed
                .iter()
                .map(|s| (s.index, s.first_lsn))
                .chain(std::iter::once((ms.active_index, ms.active_first_lsn)))
                .collect()
        };
        let r = crate::backup::write_incremental(
            dest,
            parent,
            &self.inner.dir,
            &segments,
            &cap,
            &self.inner.config,
            progress,
        )?;
        self.set_backup_floor(r.end_lsn)?;
        tracing::info!(dir = %dest.display(), start_lsn = r.start_lsn, end_lsn = r.end_lsn, "incremental backup written");
        Ok(r)
    }
}
