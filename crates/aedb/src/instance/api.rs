//! The authenticated `*_as` API: every caller-facing operation with a `CallerContext`
//! (the only API of a `Secure` instance).

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use super::read::ReadTx;
use super::{AedbInstance, CheckpointInfo, CommitResult};
use crate::audit::{AuditExport, SYSTEM_PROJECT};
use crate::authz::{CallerContext, Decision, Grant, Permission};
use crate::backup::{BackupProgress, BackupReport};
use crate::config::CommitFinality;
use crate::error::{AedbError, BackupError, CommitError, ReadError};
use crate::record::DdlOperation;
use crate::txn::query::{Query, QueryResult};
use crate::txn::snapshot::{ConsistencyMode, KvPair, VersionedKvPair};
use crate::txn::write::WriteTransaction;

impl<M> AedbInstance<M> {
    pub fn begin_write_as(
        &self,
        caller: &CallerContext,
        project: &str,
    ) -> Result<WriteTransaction, CommitError> {
        self.begin_write_inner(Some(caller), project)
            .map_err(CommitError::narrow)
    }

    pub fn commit_as(
        &self,
        caller: &CallerContext,
        tx: WriteTransaction,
    ) -> Result<CommitResult, CommitError> {
        self.commit_tx(Some(caller), tx, self.inner.config.default_finality())
            .map_err(CommitError::narrow)
    }

    pub fn commit_as_with_finality(
        &self,
        caller: &CallerContext,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, CommitError> {
        self.commit_tx(Some(caller), tx, finality)
            .map_err(CommitError::narrow)
    }

    /// Schema and authorization changes (`GrantPermission`, `RevokePermission`,
    /// `TransferOwnership`, ...), all-or-nothing, one audit row per change.
    pub fn commit_ddl_as(
        &self,
        caller: &CallerContext,
        ops: Vec<DdlOperation>,
    ) -> Result<CommitResult, CommitError> {
        self.commit_ddl(Some(caller), ops)
            .map_err(CommitError::narrow)
    }

    pub fn create_project_as(
        &self,
        caller: &CallerContext,
        project: &str,
    ) -> Result<CommitResult, CommitError> {
        self.commit_ddl_as(
            caller,
            vec![DdlOperation::CreateProject {
                project: project.to_string(),
                owner: None,
            }],
        )
    }

    pub fn create_scope_as(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
    ) -> Result<CommitResult, CommitError> {
        self.commit_ddl_as(
            caller,
            vec![DdlOperation::CreateScope {
                project: project.to_string(),
                scope: scope.to_string(),
            }],
        )
    }

    pub fn kv_set_as(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<CommitResult, CommitError> {
        let mut tx = self.begin_write_as(caller, project)?;
        tx.kv_set(scope, key, value)?;
        self.commit_as(caller, tx)
    }

    pub fn kv_del_as(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
        key: &[u8],
    ) -> Result<CommitResult, CommitError> {
        let mut tx = self.begin_write_as(caller, project)?;
        tx.kv_del(scope, key)?;
        self.commit_as(caller, tx)
    }

    pub fn kv_get(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
        key: &[u8],
    ) -> Result<Option<Arc<[u8]>>, ReadError> {
        self.begin_read_tx_as(caller, ConsistencyMode::AtLatest)?
            .kv_get(project, scope, key)
    }

    pub fn kv_scan_prefix(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        self.begin_read_tx_as(caller, ConsistencyMode::AtLatest)?
            .kv_scan_prefix(project, scope, prefix, limit)
    }

    pub fn kv_scan_range(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        self.begin_read_tx_as(caller, ConsistencyMode::AtLatest)?
            .kv_scan_range(project, scope, start, end, limit)
    }

    /// `kv_scan_prefix` with the version of each value.
    pub fn kv_scan_prefix_versioned(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<VersionedKvPair>, ReadError> {
        self.begin_read_tx_as(caller, ConsistencyMode::AtLatest)?
            .kv_scan_prefix_versioned(project, scope, prefix, limit)
    }

    /// `kv_scan_range` with the version of each value.
    pub fn kv_scan_range_versioned(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<VersionedKvPair>, ReadError> {
        self.begin_read_tx_as(caller, ConsistencyMode::AtLatest)?
            .kv_scan_range_versioned(project, scope, start, end, limit)
    }

    pub fn query_as(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
        table: &str,
        q: &Query,
    ) -> Result<QueryResult, ReadError> {
        self.begin_read_tx_as(caller, ConsistencyMode::AtLatest)?
            .query(project, scope, table, q)
    }

    /// True when `project` exists and `caller` holds something in it (ownership,
    /// a grant confined to it, or GlobalAdmin, whose use is audited; `AuditRead`
    /// for the system project). False otherwise: a caller learns nothing about
    /// projects it has no access to, so asking is not a denial and is not audited.
    pub fn project_exists_as(
        &self,
        caller: &CallerContext,
        project: &str,
    ) -> Result<bool, ReadError> {
        self.project_exists_as_inner(caller, project)
            .map_err(ReadError::narrow)
    }

    fn project_exists_as_inner(
        &self,
        caller: &CallerContext,
        project: &str,
    ) -> Result<bool, AedbError> {
        self.inner.wal.check_healthy()?;
        let state = self.inner.sequencer.load_full();
        let decision = if project == SYSTEM_PROJECT {
            state.authz.decide(caller, &Permission::AuditRead)
        } else {
            state.authz.sees_project(caller, project)
        };
        match decision {
            Decision::Allowed => {}
            Decision::AllowedAsGlobalAdmin => {
                let mut cs = self.lock_commit()?;
                self.record_global_admin_use(
                    &mut cs,
                    caller,
                    &Permission::GlobalAdmin,
                    &format!("project_exists {project}"),
                )?;
            }
            Decision::Denied => return Ok(false),
        }
        Ok(state.projects.contains_key(project))
    }

    /// A read transaction whose every read is authorized for `caller` at the time
    /// of the read.
    pub fn begin_read_tx_as(
        &self,
        caller: &CallerContext,
        mode: ConsistencyMode,
    ) -> Result<ReadTx<'_, M>, ReadError> {
        Ok(ReadTx {
            db: self,
            caller: caller.clone(),
            snapshot: self.begin_read_inner(mode).map_err(ReadError::narrow)?,
        })
    }

    /// Rows of both audit tables with id >= `since_id` (needs `AuditRead`).
    pub fn export_audit_as(
        &self,
        caller: &CallerContext,
        since_id: i64,
    ) -> Result<Vec<AuditExport>, ReadError> {
        self.authorize_read(caller, SYSTEM_PROJECT, Permission::AuditRead)
            .map_err(ReadError::narrow)?;
        self.export_audit_inner(&self.snapshot_inner(), since_id)
    }

    /// `checkpoint` on demand (needs `Checkpoint`; audited).
    pub fn checkpoint_as(&self, caller: &CallerContext) -> Result<CheckpointInfo, AedbError> {
        let target = self.inner.dir.display().to_string();
        self.authorize_maintenance(caller, Permission::Checkpoint, "checkpoint", &target)?;
        self.inner.checkpoint()
    }

    /// A full backup into `dest` (needs `Backup`; audited with `dest`).
    pub fn backup_full_as(
        &self,
        caller: &CallerContext,
        dest: &Path,
    ) -> Result<BackupReport, BackupError> {
        self.backup_full_as_with_progress(caller, dest, &mut |_| {})
    }

    pub fn backup_full_as_with_progress(
        &self,
        caller: &CallerContext,
        dest: &Path,
        progress: &mut dyn FnMut(BackupProgress),
    ) -> Result<BackupReport, BackupError> {
        let target = dest.display().to_string();
        self.authorize_maintenance(caller, Permission::Backup, "backup_full", &target)
            .map_err(BackupError::narrow)?;
        self.backup_full_inner(dest, progress)
            .map_err(BackupError::narrow)
    }

    /// An incremental backup after `parent` into `dest` (needs `Backup`; audited
    /// with both paths).
    pub fn backup_incremental_as(
        &self,
        caller: &CallerContext,
        dest: &Path,
        parent: &Path,
    ) -> Result<BackupReport, BackupError> {
        self.backup_incremental_as_with_progress(caller, dest, parent, &mut |_| {})
    }

    pub fn backup_incremental_as_with_progress(
        &self,
        caller: &CallerContext,
        dest: &Path,
        parent: &Path,
        progress: &mut dyn FnMut(BackupProgress),
    ) -> Result<BackupReport, BackupError> {
        let target = format!("{} (parent {})", dest.display(), parent.display());
        self.authorize_maintenance(caller, Permission::Backup, "backup_incremental", &target)
            .map_err(BackupError::narrow)?;
        self.backup_incremental_inner(dest, parent, progress)
            .map_err(BackupError::narrow)
    }

    /// Changes the commit admission rate while the instance runs (`None`: unlimited;
    /// what `Limits::max_commits_per_sec` set at open until then) and returns the
    /// rate it replaced. Runtime only: a reopen starts from `Limits` again.
    ///
    /// Slowing every writer of every project is an instance-wide operator action,
    /// so it needs `GlobalAdmin` (no grant short of it covers all projects' writes);
    /// each change is an `authz_audit` row (`global_admin_use`, naming the rate),
    /// durable before the new rate applies, and a denial is audited as usual. The
    /// audit row bypasses admission, so even a rate of 1/s can always be lifted.
    pub fn set_max_commits_per_sec_as(
        &self,
        caller: &CallerContext,
        max_commits_per_sec: Option<u32>,
    ) -> Result<Option<u32>, AedbError> {
        let target = match max_commits_per_sec.filter(|n| *n > 0) {
            Some(n) => format!("{n} commits/s"),
            None => "unlimited".to_string(),
        };
        self.authorize_maintenance(
            caller,
            Permission::GlobalAdmin,
            "set_max_commits_per_sec",
            &target,
        )?;
        self.sync()?;
        let previous = self.inner.admission.set_max_per_sec(max_commits_per_sec);
        tracing::warn!(
            caller = caller.caller_id(),
            previous = ?previous,
            max_commits_per_sec = %target,
            "commit admission rate changed"
        );
        Ok(previous)
    }

    /// Grants held by a caller id or `role:NAME` (needs `AuditRead`).
    pub fn grants_of_as(
        &self,
        caller: &CallerContext,
        principal: &str,
    ) -> Result<Vec<Grant>, ReadError> {
        self.authorize_read(caller, SYSTEM_PROJECT, Permission::AuditRead)
            .map_err(ReadError::narrow)?;
        Ok(self.inner.sequencer.load().authz.grants_of(principal))
    }
}
