//! `AedbInstance`: opening (recovery), the commit path, and read snapshots.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::audit::{
    ASSERTION_AUDIT, AUDIT_SCOPE, AUTHZ_AUDIT, AuditExport, AuditVerifyError, SYSTEM_PROJECT,
    chain_rows, now_unix,
};
use crate::authz::{CallerContext, Permission, validate_caller_id};
use crate::backup::{BackupProgress, BackupReport};
use crate::checkpoint;
use crate::config::{AedbConfig, CommitFinality, RecoveryMode};
use crate::error::{AedbError, BackupError, CommitError, NotFoundKind, OpenError, ReadError};
use crate::lock::DirLock;
use crate::metrics::OperationalMetrics;
use crate::model::value::TableSchema;
use crate::model::value::Value;
use crate::open::{
    ManifestState, check_segments_against_manifest, load_manifest_and_checkpoint, replay_start,
    secure_problems, write_manifest,
};
use crate::record::{DdlOperation, WalRecord};
use crate::txn::snapshot::{ConsistencyMode, Snapshot};
use crate::txn::write::{WriteTransaction, writes_digest};
use crate::wal::RecoveryReport;
use crate::wal::keys::WalKeys;
use crate::wal::recovery::recover;
use crate::wal::writer::WalWriter;

/// What a successful commit reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitResult {
    /// Sequence number (= WAL LSN) of this commit.
    pub commit_seq: u64,
    /// Highest sequence number known durable when the call returned.
    pub durable_head_seq: u64,
    /// True when an idempotency key matched an earlier commit, which is what
    /// `commit_seq` then names; nothing was applied by this call.
    pub idempotent_replay: bool,
}

/// What `checkpoint()` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The catalog checkpoint file (the data went to table files).
    pub file: PathBuf,
    pub lsn: u64,
    /// Bytes written: the checkpoint file plus the table files of the flush (what
    /// changed since the last checkpoint, or everything for a rewrite).
    pub bytes: u64,
    pub duration: Duration,
    /// WAL segment files removed because the checkpoint covers them.
    pub segments_removed: usize,
}

/// Marker type: a development instance, where the anonymous APIs are available.
#[derive(Debug)]
pub enum Dev {}

/// Marker type: a secure instance (`open_secure` / `open_production`). Only the
/// authenticated `*_as` APIs exist on it: the anonymous ones do not compile.
///
/// ```no_run
/// # use aedb::{AedbConfig, AedbInstance, CallerContext};
/// let db = AedbInstance::open_secure(AedbConfig::production([7; 32]), "/tmp/x")?;
/// let me = CallerContext::new("svc-payments")?;
/// let _ = db.kv_get(&me, "payments", "eu", b"order-1")?;
/// # Ok::<(), aedb::AedbError>(())
/// ```
///
/// ```compile_fail
/// # use aedb::{AedbConfig, AedbInstance};
/// let db = AedbInstance::open_secure(AedbConfig::production([7; 32]), "/tmp/x").unwrap();
/// let _ = db.snapshot(); // anonymous read: not available on a secure instance
/// ```
///
/// ```compile_fail
/// # use aedb::{AedbConfig, AedbInstance};
/// let db = AedbInstance::open_secure(AedbConfig::production([7; 32]), "/tmp/x").unwrap();
/// let tx = db.begin_write("payments").unwrap(); // anonymous write: not available
/// ```
///
/// ```compile_fail
/// # use aedb::{AedbConfig, AedbInstance};
/// let db = AedbInstance::open_secure(AedbConfig::production([7; 32]), "/tmp/x").unwrap();
/// db.backup_full("/tmp/b".as_ref()).unwrap(); // needs backup_full_as + Permission::Backup
/// ```
///
/// ```compile_fail
/// # use aedb::{AedbConfig, AedbInstance};
/// let db = AedbInstance::open_secure(AedbConfig::production([7; 32]), "/tmp/x").unwrap();
/// db.checkpoint().unwrap(); // needs checkpoint_as + Permission::Checkpoint
/// ```
#[derive(Debug)]
pub enum Secure {}

/// An open database. `Send + Sync`: share it behind an `Arc`.
pub struct AedbInstance<M = Dev> {
    inner: Arc<Inner>,
    _mode: PhantomData<fn() -> M>,
}

impl<M> std::fmt::Debug for AedbInstance<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AedbInstance")
            .field("dir", &self.inner.dir)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The caller a write transaction was begun for (`begin_write_as`), with the
/// instance whose current grants decide its reads. The instance is held weakly: a
/// transaction kept around must not keep the database open or its directory locked.
pub(crate) struct BoundCaller {
    caller: CallerContext,
    db: Weak<Inner>,
}

impl BoundCaller {
    pub(crate) fn caller_id(&self) -> &str {
        self.caller.caller_id()
    }

    /// The decision and audit trail of a `ReadTx` read (`authorize_read`).
    pub(crate) fn authorize_read(&self, project: &str, need: Permission) -> Result<(), AedbError> {
        let inner = self.db.upgrade().ok_or(AedbError::Closed)?;
        // The mode marker only gates which methods exist; authorization is the same.
        let db = AedbInstance::<Secure> {
            inner,
            _mode: PhantomData,
        };
        db.authorize_read(&self.caller, project, need)
    }
}

impl std::fmt::Debug for BoundCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BoundCaller")
            .field(&self.caller.caller_id())
            .finish()
    }
}

impl AedbInstance<Dev> {
    /// Opens (creating if needed) the database in `dir` for development and tests:
    /// anonymous APIs are available, permissions are checked only on `*_as` calls.
    pub fn open(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_inner(config, dir).map_err(OpenError::narrow)
    }

    /// The latest committed state. `Poisoned` once a WAL write or fsync failed: that
    /// state may hold commits that will never be durable (a `Snapshot` taken before
    /// stays readable as a plain value).
    pub fn snapshot(&self) -> Result<Snapshot, ReadError> {
        self.inner.wal.check_healthy().map_err(ReadError::narrow)?;
        Ok(self.snapshot_inner())
    }

    /// True when `project` exists (the system project included).
    pub fn project_exists(&self, project: &str) -> Result<bool, ReadError> {
        self.inner.wal.check_healthy().map_err(ReadError::narrow)?;
        Ok(self.inner.sequencer.load().projects.contains_key(project))
    }

    /// A read-only snapshot chosen by `mode`.
    pub fn begin_read(&self, mode: ConsistencyMode) -> Result<Snapshot, ReadError> {
        self.begin_read_inner(mode).map_err(ReadError::narrow)
    }

    /// Starts a write transaction on `project`, reading from the latest state.
    pub fn begin_write(&self, project: &str) -> Result<WriteTransaction, CommitError> {
        self.begin_write_inner(None, project)
            .map_err(CommitError::narrow)
    }

    /// Commits with the configured default finality (`Durable` under
    /// `DurabilityMode::Full`, `Visible` otherwise).
    pub fn commit(&self, tx: WriteTransaction) -> Result<CommitResult, CommitError> {
        self.commit_tx(None, tx, self.inner.config.default_finality())
            .map_err(CommitError::narrow)
    }

    pub fn commit_with_finality(
        &self,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, CommitError> {
        self.commit_tx(None, tx, finality)
            .map_err(CommitError::narrow)
    }

    pub fn create_project(&self, project: &str) -> Result<CommitResult, CommitError> {
        self.commit_ddl(
            None,
            vec![DdlOperation::CreateProject {
                project: project.to_string(),
                owner: None,
            }],
        )
        .map_err(CommitError::narrow)
    }

    pub fn create_scope(&self, project: &str, scope: &str) -> Result<CommitResult, CommitError> {
        self.commit_ddl(
            None,
            vec![DdlOperation::CreateScope {
                project: project.to_string(),
                scope: scope.to_string(),
            }],
        )
        .map_err(CommitError::narrow)
    }

    pub fn create_table(
        &self,
        project: &str,
        scope: &str,
        table: &str,
        schema: TableSchema,
    ) -> Result<CommitResult, CommitError> {
        self.commit_ddl(
            None,
            vec![DdlOperation::CreateTable {
                project: project.to_string(),
                scope: scope.to_string(),
                table: table.to_string(),
                schema,
            }],
        )
        .map_err(CommitError::narrow)
    }

    pub fn drop_table(
        &self,
        project: &str,
        scope: &str,
        table: &str,
    ) -> Result<CommitResult, CommitError> {
        self.commit_ddl(
            None,
            vec![DdlOperation::DropTable {
                project: project.to_string(),
                scope: scope.to_string(),
                table: table.to_string(),
            }],
        )
        .map_err(CommitError::narrow)
    }

    /// Several schema/authorization changes in one atomic commit (anonymous).
    pub fn commit_ddl_batch(&self, ops: Vec<DdlOperation>) -> Result<CommitResult, CommitError> {
        self.commit_ddl(None, ops).map_err(CommitError::narrow)
    }

    /// One-key convenience write, committed with the default finality.
    pub fn kv_set(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<CommitResult, CommitError> {
        let mut tx = self.begin_write(project)?;
        tx.kv_set(scope, key, value)?;
        self.commit(tx)
    }

    pub fn kv_del(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
    ) -> Result<CommitResult, CommitError> {
        let mut tx = self.begin_write(project)?;
        tx.kv_del(scope, key)?;
        self.commit(tx)
    }

    /// Rows of both audit tables with id >= `since_id`, each with its chain head.
    pub fn export_audit(&self, since_id: i64) -> Result<Vec<AuditExport>, ReadError> {
        self.export_audit_inner(&self.snapshot_inner(), since_id)
    }

    /// Writes a checkpoint of the current state, then removes the WAL segments and
    /// the older checkpoint it makes obsolete. Readers are never blocked; writers
    /// wait only while the state handle is taken.
    pub fn checkpoint(&self) -> Result<CheckpointInfo, AedbError> {
        self.inner.checkpoint()
    }

    /// A self-contained backup of the state now (writers keep going) into `dest`
    /// (absent or empty). See `backup` module docs for the format.
    pub fn backup_full(&self, dest: &Path) -> Result<BackupReport, BackupError> {
        self.backup_full_inner(dest, &mut |_| {})
            .map_err(BackupError::narrow)
    }

    pub fn backup_full_with_progress(
        &self,
        dest: &Path,
        progress: &mut dyn FnMut(BackupProgress),
    ) -> Result<BackupReport, BackupError> {
        self.backup_full_inner(dest, progress)
            .map_err(BackupError::narrow)
    }

    /// The WAL since the backup in `parent` (the chain's latest) into `dest`.
    pub fn backup_incremental(
        &self,
        dest: &Path,
        parent: &Path,
    ) -> Result<BackupReport, BackupError> {
        self.backup_incremental_inner(dest, parent, &mut |_| {})
            .map_err(BackupError::narrow)
    }

    pub fn backup_incremental_with_progress(
        &self,
        dest: &Path,
        parent: &Path,
        progress: &mut dyn FnMut(BackupProgress),
    ) -> Result<BackupReport, BackupError> {
        self.backup_incremental_inner(dest, parent, progress)
            .map_err(BackupError::narrow)
    }
}

impl AedbInstance<Secure> {
    /// Opens for production paths: refuses any configuration that weakens
    /// integrity, listing every problem at once. Accepts both presets
    /// (`production(key)` and `low_latency(key)`).
    pub fn open_secure(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, OpenError> {
        let problems = secure_problems(&config, false);
        if !problems.is_empty() {
            return Err(OpenError::InvalidConfig { problems });
        }
        Self::open_inner(config, dir).map_err(OpenError::narrow)
    }

    /// `open_secure` plus encryption at rest: a checkpoint key is required too.
    pub fn open_production(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, OpenError> {
        let problems = secure_problems(&config, true);
        if !problems.is_empty() {
            return Err(OpenError::InvalidConfig { problems });
        }
        Self::open_inner(config, dir).map_err(OpenError::narrow)
    }
}

/// Why the directory must be re-signed at open (a key rotation left something in
/// it that only a previous key verifies or decrypts), or None.
fn resign_reason(
    config: &AedbConfig,
    manifest_under_previous_key: bool,
    checkpoint: Option<&checkpoint::CheckpointMeta>,
    recovered: &crate::wal::recovery::Recovered,
    recorded_foreign: &[u64],
) -> Option<&'static str> {
    if manifest_under_previous_key {
        return Some("the manifest is signed under the previous manifest key");
    }
    let previous_ckpt = config
        .previous_checkpoint_key
        .as_ref()
        .map(crate::crypto::key_id);
    let current_ckpt = config.checkpoint_key.as_ref().map(crate::crypto::key_id);
    if let Some(m) = checkpoint
        && previous_ckpt == Some(m.key_id)
        && current_ckpt != Some(m.key_id)
    {
        return Some("the checkpoint is encrypted under the previous checkpoint key");
    }
    if recovered.replayed_under_previous_keys {
        return Some("frames after the checkpoint are under a previous key");
    }
    if recovered
        .segments
        .iter()
        .any(|s| s.foreign.is_some() && !recorded_foreign.contains(&s.index))
    {
        return Some("segments chained under the previous manifest key have no recorded digest");
    }
    None
}

impl<M> AedbInstance<M> {
    fn open_inner(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, AedbError> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let fs = config.storage.clone();
        // A data directory whose own entry is lost in a power loss loses every
        // commit in it: its parent is fsynced when it is created.
        crate::storage::create_dir_all_durable(&*fs, &dir).map_err(|e| AedbError::io(&dir, e))?;
        let lock = DirLock::acquire(&*fs, &dir, true)?;

        let mut cs = CommitState::recovering(config.limits.max_idempotency_records);
        let loaded = load_manifest_and_checkpoint(&dir, &config, false)?;
        let manifest_body = loaded.manifest;
        let (live_tables, next_table_id) = (loaded.tables, loaded.next_table_id);
        let cache = loaded.cache;
        let manifest_under_previous_key = loaded.manifest_under_previous_key;
        let mut ckpt_meta = None;
        // The checkpoint's state, kept for `ConsistencyMode::AtCheckpoint` (an O(1)
        // clone: it shares everything the WAL replay does not change).
        let mut ckpt_snapshot = None;
        let mut ckpt_written_at = None;
        if let Some((state, meta)) = loaded.checkpoint {
            ckpt_written_at = fs.modified(&dir.join(&meta.file));
            *cs.state_mut() = state.state;
            ckpt_snapshot = Some(Arc::new(cs.state().clone()));
            for e in state.idempotency {
                cs.remember(e.tag, e.seq, e.digest);
            }
            ckpt_meta = Some(meta);
        }
        let keys = WalKeys::new(
            config.manifest_key.as_ref(),
            config.checkpoint_key.as_ref(),
            config.previous_checkpoint_key.as_ref(),
        )
        .with_previous_chain(config.previous_manifest_key.as_ref());
        let start = replay_start(
            &dir,
            &config,
            manifest_body.as_ref(),
            ckpt_meta.as_ref(),
            false,
        )?;
        let recorded_foreign: Vec<u64> = start.foreign.iter().map(|(i, _)| *i).collect();
        let recovered = recover(&*fs, &dir, config.recovery, &keys, start, |lsn, payload| {
            let record = WalRecord::decode(payload).map_err(|e| e.to_string())?;
            cs.state_mut()
                .apply(&record, lsn)
                .map_err(|e| format!("frame at LSN {lsn} does not apply: {e}"))?;
            if let WalRecord::Commit {
                idempotency: Some(tag),
                ..
            } = &record
            {
                cs.remember(tag.clone(), lsn, writes_digest(&record));
            }
            Ok(())
        })?;
        if let Some(m) = &manifest_body
            && config.recovery == RecoveryMode::Strict
        {
            check_segments_against_manifest(&dir, m, &recovered.segments)?;
        }
        // Key rotation: whatever the directory still needs a previous key for is
        // re-signed below, before the instance accepts a write.
        let resign = resign_reason(
            &config,
            manifest_under_previous_key,
            ckpt_meta.as_ref(),
            &recovered,
            &recorded_foreign,
        );
        let wal = match (recovered.position, recovered.last_header) {
            (Some(pos), Some(h)) if keys.writes_like(&h) && !recovered.start_new_segment => {
                WalWriter::resume(fs.clone(), &dir, config.segment_bytes, keys, pos, &h)?
            }
            // Keys changed since the last segment was written, or permissive recovery
            // moved the log away: continue the chain in a new segment.
            (Some(pos), _) => WalWriter::create(
                fs.clone(),
                &dir,
                config.segment_bytes,
                keys,
                pos.segment_index + 1,
                pos.last_lsn + 1,
                pos.chain_head,
            )?,
            // No segment at all: a new database, or a restored full backup whose
            // log continues right after its checkpoint.
            _ => {
                let (lsn, head) = ckpt_meta
                    .as_ref()
                    .map_or((0, [0; 32]), |m| (m.lsn, m.chain_head));
                WalWriter::create(
                    fs.clone(),
                    &dir,
                    config.segment_bytes,
                    keys,
                    1,
                    lsn + 1,
                    head,
                )?
            }
        };
        let wal = Arc::new(wal);
        // The writer must continue exactly after the recovered state: a gap or an
        // overlap would break the LSN order every append asserts.
        let (_, wal_lsn, wal_head) = wal.head();
        if wal_lsn != cs.state().seq {
            return Err(AedbError::corruption(
                &dir,
                0,
                format!(
                    "recovery ended at LSN {} but the log continues after LSN {wal_lsn}",
                    cs.state().seq
                ),
            ));
        }
        let (active_index, active_first_lsn) = wal.active_segment();
        let mut ms = ManifestState {
            generation: manifest_body.as_ref().map_or(0, |m| m.generation),
            checkpoint: ckpt_meta,
            sealed: recovered
                .segments
                .iter()
                .filter(|s| s.index < active_index)
                .cloned()
                .collect(),
            active_index,
            active_first_lsn,
            backup_floor_lsn: manifest_body.as_ref().and_then(|m| m.backup_floor_lsn),
            // Recovery fsynced what it kept: the whole log is durable now.
            durable_head: Some(crate::wal::ChainHead {
                lsn: wal_lsn,
                hash: wal_head,
            }),
            tables: live_tables,
            next_table_id,
        };
        write_manifest(&dir, &config, &mut ms)?;
        // Nothing is open yet: replayed deletes need no tombstones.
        let seq = cs.state().seq;
        cs.state_mut().purge_tombstones(seq);
        if recovered.report.torn_tail.is_some() || recovered.report.dropped.is_some() {
            tracing::warn!(report = ?recovered.report, "recovery repaired the write-ahead log");
        }
        tracing::info!(dir = %dir.display(), seq, frames = recovered.report.frames_replayed, "aedb opened");

        let inner = Arc::new(Inner::new(
            dir,
            config,
            cs,
            wal,
            recovered.report,
            ms,
            CheckpointState::at_open(ckpt_snapshot, cache, ckpt_written_at),
            lock,
        ));
        if let Some(why) = resign {
            // A checkpoint under the current keys, then a manifest signed under the
            // current manifest key that names it and records a digest for every
            // segment still chained under the old one: after it, the directory
            // opens without the previous keys. A crash before the manifest switch
            // leaves the directory as it was (re-signed at the next open).
            let info = inner.checkpoint()?;
            tracing::info!(
                reason = why,
                lsn = info.lsn,
                "re-signed the data directory under the current keys"
            );
        }
        // Without background I/O (a simulated disk), `Visible` commits become
        // durable with the next durable commit, checkpoint, backup or close.
        if inner.config.storage.background_io() {
            inner.start_flusher()?;
        }
        spawn_checkpointer(&inner)?;
        let db = Self {
            inner,
            _mode: PhantomData,
        };
        if let Some(admin) = db.inner.config.bootstrap_admin.clone()
            && !db.inner.sequencer.load().authz.bootstrapped
        {
            db.bootstrap_global_admin(&admin)?;
        }
        Ok(db)
    }

    pub fn config(&self) -> &AedbConfig {
        &self.inner.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// What recovery found and repaired when this instance opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    fn snapshot_inner(&self) -> Snapshot {
        Snapshot {
            state: self.inner.sequencer.load_full(),
        }
    }

    fn begin_read_inner(&self, mode: ConsistencyMode) -> Result<Snapshot, AedbError> {
        // After a poison the latest state may hold commits that will never be
        // durable; like a database server that stops on a failed fsync, stop serving.
        self.inner.wal.check_healthy()?;
        match mode {
            ConsistencyMode::AtLatest => Ok(self.snapshot_inner()),
            ConsistencyMode::AtSeq(n) => Ok(Snapshot {
                state: self.inner.sequencer.state_at(n)?,
            }),
            ConsistencyMode::AtCheckpoint => self
                .inner
                .checkpoint_snapshot()
                .map(|state| Snapshot { state })
                .ok_or_else(|| {
                    AedbError::InvalidArgument("the database has no checkpoint yet".into())
                }),
        }
    }

    fn begin_write_inner(
        &self,
        caller: Option<&CallerContext>,
        project: &str,
    ) -> Result<WriteTransaction, AedbError> {
        self.inner.wal.check_healthy()?;
        let (snapshot, pin) = self.inner.pin_latest();
        if !snapshot.state.projects.contains_key(project) || project == SYSTEM_PROJECT {
            return Err(AedbError::NotFound {
                kind: NotFoundKind::Project,
                name: project.to_string(),
            });
        }
        let mut tx = WriteTransaction::new(project.to_string(), snapshot, self.inner.config.limits);
        tx.pin = Some(pin);
        tx.caller = caller.map(|c| BoundCaller {
            caller: c.clone(),
            db: Arc::downgrade(&self.inner),
        });
        Ok(tx)
    }
    fn export_audit_inner(
        &self,
        snap: &Snapshot,
        since_id: i64,
    ) -> Result<Vec<AuditExport>, ReadError> {
        self.inner.wal.check_healthy().map_err(ReadError::narrow)?;
        crate::audit::export_tables(&snap.state, since_id).map_err(ReadError::narrow)
    }

    /// Verifies the full hash chains of both audit tables in the current state.
    pub fn verify_audit_chains(&self) -> Result<(), AuditVerifyError> {
        let snap = self.snapshot_inner();
        for table in [AUTHZ_AUDIT, ASSERTION_AUDIT] {
            let rows: Vec<Vec<Value>> = match snap.table(SYSTEM_PROJECT, AUDIT_SCOPE, table) {
                Ok(t) => t
                    .rows()
                    .filter_map(|r| r.map(|(_, e)| e.value.map(|r| r.to_vec())).transpose())
                    .collect::<Result<_, _>>()
                    .map_err(|e| AuditVerifyError::Unreadable {
                        table: table.to_string(),
                        reason: e.to_string(),
                    })?,
                Err(_) => continue,
            };
            crate::audit::verify_rows(table, &rows, None)?;
        }
        Ok(())
    }

    /// The one-time, public bootstrap of the first GlobalAdmin of a database
    /// (recorded in `authz_audit`). Fails once any GlobalAdmin was bootstrapped.
    pub fn bootstrap_global_admin(&self, admin: &str) -> Result<CommitResult, CommitError> {
        self.bootstrap_global_admin_inner(admin)
            .map_err(CommitError::narrow)
    }

    fn bootstrap_global_admin_inner(&self, admin: &str) -> Result<CommitResult, AedbError> {
        validate_caller_id(admin)?;
        let _slot = self.admit()?;
        let mut cs = self.lock_commit()?;
        cs.drain();
        if cs.state().authz.bootstrapped {
            return Err(AedbError::AlreadyExists {
                kind: "bootstrapped GlobalAdmin",
                name: "(this database already has one; grant further admins through it)".into(),
            });
        }
        let seq = cs.state().seq + 1;
        let event = audit_writer::bootstrap(admin);
        let record = WalRecord::Bootstrap {
            admin: admin.to_string(),
            audit: chain_rows(cs.state(), &[event], seq, now_unix())?,
        };
        self.commit_serial(&mut cs, &record, seq)?;
        drop(cs);
        tracing::info!(admin, "bootstrapped the first GlobalAdmin");
        self.finish(seq, CommitFinality::Durable, false)
    }

    /// (last LSN, chain head) of the log.
    pub(crate) fn head_for_backup(&self) -> (u64, [u8; 32]) {
        let (_, lsn, head) = self.inner.wal.head();
        (lsn, head)
    }

    /// True once a WAL write, fsync or manifest update failed (or a commit could
    /// not be applied): every later commit and fallible read returns
    /// `AedbError::Poisoned`, and nothing after `durable_head_seq()` will ever
    /// become durable. Reopen the database to recover from the log.
    pub fn is_poisoned(&self) -> bool {
        self.inner.wal.check_healthy().is_err()
    }

    /// Highest sequence number on stable storage.
    pub fn durable_head_seq(&self) -> u64 {
        self.inner.wal.durable_lsn()
    }

    /// Returns once the commit with sequence number `seq` is on stable storage
    /// (for a `Visible` commit whose caller must not answer before it is durable).
    /// A `seq` no commit has been given yet is `InvalidArgument`.
    pub fn wait_durable(&self, seq: u64) -> Result<(), AedbError> {
        self.inner.wal.wait_durable(seq)
    }

    /// Makes every commit so far durable (for `Visible` commits).
    pub fn sync(&self) -> Result<u64, AedbError> {
        let last = self.inner.wal.last_lsn();
        self.inner.wal.wait_durable(last)?;
        Ok(last)
    }

    pub fn operational_metrics(&self) -> OperationalMetrics {
        let mut m = OperationalMetrics::default();
        self.inner.counters.fill(&mut m);
        m.fsyncs = self.inner.wal.fsyncs();
        m.poisoned = self.is_poisoned();
        {
            let state = self.inner.sequencer.load();
            m.head_seq = state.seq;
            m.tombstones = state.tombstones() as u64;
        }
        m.durable_seq = self.inner.wal.durable_lsn();
        m.queued_commits = self.inner.admission.queued() as u64;
        m.max_commits_per_sec = self.inner.admission.max_per_sec();
        m.wal_pending_bytes = self.inner.wal.pending_bytes() as u64;
        m.wal_bytes_written = self.inner.wal.appended_bytes();
        self.inner.fill_checkpoint_metrics(&mut m);
        m
    }

    /// Flushes and fsyncs everything and releases the directory lock.
    pub fn close(self) -> Result<(), AedbError> {
        self.inner.shutdown()
    }
}

mod admission;
mod api;
mod audit_writer;
mod authz_gate;
mod backups;
mod commit;
mod inner;
mod read;
mod sequencer;

/// Test-only fault injection on the commit path. Armed per thread: a commit runs
/// on its caller's thread, so parallel tests do not see each other's faults.
#[cfg(test)]
pub(crate) mod failpoints {
    use std::cell::Cell;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Failpoint {
        /// Recording a sealed segment in the manifest fails (a full disk, an EIO).
        RecordRotation,
        /// Applying a commit's writes panics (a bug in apply).
        PanicInApply,
    }

    thread_local! {
        static ARMED: Cell<Option<Failpoint>> = const { Cell::new(None) };
    }

    /// Makes the next pass through `fp` on this thread fail.
    pub(crate) fn arm(fp: Failpoint) {
        ARMED.with(|a| a.set(Some(fp)));
    }

    /// True (once) when `fp` is armed on this thread.
    pub(crate) fn hit(fp: Failpoint) -> bool {
        ARMED.with(|a| {
            let hit = a.get() == Some(fp);
            if hit {
                a.set(None);
            }
            hit
        })
    }
}

pub(crate) use inner::SnapshotPin;
use inner::{CheckpointState, Inner, spawn_checkpointer};
pub use read::ReadTx;
use sequencer::CommitState;

#[cfg(test)]
mod fault_tests;
