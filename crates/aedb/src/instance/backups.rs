//! Taking backups of a live instance (format, verification and restore are in
//! `crate::backup`).

use std::path::Path;

use super::AedbInstance;
use crate::backup::{BackupProgress, BackupReport, Captured};
use crate::error::AedbError;

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

    /// A self-contained backup of the state now (writers keep going) into `dest`
    /// (absent or empty); callers authorize first. See `backup` module docs for
    /// the format.
    pub(super) fn backup_full_inner(
        &self,
        dest: &Path,
        progress: &mut dyn FnMut(BackupProgress),
    ) -> Result<BackupReport, AedbError> {
        // Checkpoints wait while the live files are copied: they would delete them.
        let _no_checkpoint = self.inner.hold_checkpoints();
        let cap = self.capture()?;
        let live = self.inner.live_files();
        let r = crate::backup::write_full(
            dest,
            &self.inner.dir,
            &live,
            &cap,
            &self.inner.config,
            progress,
        )?;
        self.inner.set_backup_floor(r.end_lsn)?;
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
        let segments = self.inner.live_segments();
        let r = crate::backup::write_incremental(
            dest,
            parent,
            &self.inner.dir,
            &segments,
            &cap,
            &self.inner.config,
            progress,
        )?;
        self.inner.set_backup_floor(r.end_lsn)?;
        tracing::info!(dir = %dest.display(), start_lsn = r.start_lsn, end_lsn = r.end_lsn, "incremental backup written");
        Ok(r)
    }
}
