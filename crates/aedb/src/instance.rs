//! `AedbInstance`: opening (recovery), the commit path, and read snapshots.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::{Condvar, Mutex};

use crate::audit::{
    ASSERTION_AUDIT, AUDIT_SCOPE, AUTHZ_AUDIT, AuditEvent, AuditExport, AuditVerifyError,
    SYSTEM_PROJECT, chain_rows, now_unix,
};
use crate::authz::{CallerContext, Decision, Grant, Permission};
use crate::backup::{BackupProgress, BackupReport, Captured};
use crate::checkpoint;
use crate::config::{AedbConfig, CommitFinality, DurabilityMode, RecoveryMode};
use crate::error::AedbError;
use crate::lock::DirLock;
use crate::metrics::AlertKind;
use crate::metrics::{Counters, OperationalMetrics};
use crate::model::state::DbState;
use crate::model::validate_name;
use crate::model::value::TableSchema;
use crate::model::value::{Row, Value};
use crate::open::{
    ManifestState, check_segments_against_manifest, load_manifest_and_checkpoint, secure_problems,
    write_manifest,
};
use crate::record::{DdlOperation, IdempotencyTag, WalRecord};
use crate::txn::query::{Query, QueryResult};
use crate::txn::snapshot::{ConsistencyMode, KvPair, Snapshot};
use crate::txn::write::WriteTransaction;
use crate::wal::RecoveryReport;
use crate::wal::format::segment_file_name;
use crate::wal::keys::WalKeys;
use crate::wal::recovery::{ReplayStart, recover};
use crate::wal::writer::{HARD_BUFFER_BYTES, SOFT_BUFFER_BYTES, WalWriter};

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

/// Writer-side state, guarded by the commit lock.
struct CommitState {
    /// The published state (what readers see).
    state: DbState,
    /// Next sequence number to hand out. Above `state.seq + 1` while commits that
    /// already have their WAL frame are still applying; they publish in order.
    next_seq: u64,
    idempotency: HashMap<IdempotencyTag, u64>,
    idempotency_order: VecDeque<IdempotencyTag>,
    history: VecDeque<Arc<DbState>>,
}

impl CommitState {
    fn remember(&mut self, tag: IdempotencyTag, seq: u64, max: usize) {
        if self.idempotency.insert(tag.clone(), seq).is_none() {
            self.idempotency_order.push_back(tag);
        }
        while self.idempotency_order.len() > max {
            if let Some(old) = self.idempotency_order.pop_front() {
                self.idempotency.remove(&old);
            }
        }
    }
}

#[derive(Default)]
struct FlusherSignal {
    stop: bool,
    kicked: bool,
}

struct Flusher {
    signal: Arc<(Mutex<FlusherSignal>, Condvar)>,
    handle: JoinHandle<()>,
}

struct Inner {
    dir: PathBuf,
    config: AedbConfig,
    current: ArcSwap<DbState>,
    commit: Mutex<CommitState>,
    wal: Arc<WalWriter>,
    queued: AtomicUsize,
    admission_rate: Option<governor::DefaultDirectRateLimiter>,
    counters: Counters,
    flusher: Mutex<Option<Flusher>>,
    recovery: RecoveryReport,
    closed: AtomicBool,
    manifest: Mutex<ManifestState>,
    /// One checkpoint at a time; close waits for a running one.
    checkpointing: Mutex<CheckpointState>,
    checkpointer: Arc<(Mutex<bool>, Condvar)>,
    /// Signalled (with the commit lock) whenever a sequence number is published.
    published: Condvar,
    /// One lock per project: a commit holds its project's lock from validation to
    /// publication, so commits to different projects proceed in parallel.
    project_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    _lock: DirLock,
}

struct CheckpointState {
    snapshot: Option<Arc<DbState>>,
    last_at: std::time::Instant,
    last_appended: u64,
    last_duration: Duration,
}

/// What `checkpoint()` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub file: PathBuf,
    pub lsn: u64,
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
/// let me = CallerContext::new("svc-payments");
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

/// Holds one slot of the bounded commit queue.
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

const ANONYMOUS: &str = "anonymous";

impl AedbInstance<Dev> {
    /// Opens (creating if needed) the database in `dir` for development and tests:
    /// anonymous APIs are available, permissions are checked only on `*_as` calls.
    pub fn open(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, AedbError> {
        Self::open_inner(config, dir)
    }

    /// The latest committed state.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_inner()
    }

    /// A read-only snapshot chosen by `mode`.
    pub fn begin_read(&self, mode: ConsistencyMode) -> Result<Snapshot, AedbError> {
        self.begin_read_inner(mode)
    }

    /// Starts a write transaction on `project`, reading from the latest state.
    pub fn begin_write(&self, project: &str) -> Result<WriteTransaction, AedbError> {
        self.begin_write_inner(None, project)
    }

    /// Commits with the configured default finality (`Durable` under
    /// `DurabilityMode::Full`, `Visible` otherwise).
    pub fn commit(&self, tx: WriteTransaction) -> Result<CommitResult, AedbError> {
        self.commit_tx(None, tx, self.inner.config.default_finality())
    }

    pub fn commit_with_finality(
        &self,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, AedbError> {
        self.commit_tx(None, tx, finality)
    }

    pub fn create_project(&self, project: &str) -> Result<CommitResult, AedbError> {
        self.commit_ddl(
            None,
            vec![DdlOperation::CreateProject {
                project: project.to_string(),
                owner: None,
            }],
        )
    }

    pub fn create_scope(&self, project: &str, scope: &str) -> Result<CommitResult, AedbError> {
        self.commit_ddl(
            None,
            vec![DdlOperation::CreateScope {
                project: project.to_string(),
                scope: scope.to_string(),
            }],
        )
    }

    pub fn create_table(
        &self,
        project: &str,
        scope: &str,
        table: &str,
        schema: TableSchema,
    ) -> Result<CommitResult, AedbError> {
        self.commit_ddl(
            None,
            vec![DdlOperation::CreateTable {
                project: project.to_string(),
                scope: scope.to_string(),
                table: table.to_string(),
                schema,
            }],
        )
    }

    pub fn drop_table(
        &self,
        project: &str,
        scope: &str,
        table: &str,
    ) -> Result<CommitResult, AedbError> {
        self.commit_ddl(
            None,
            vec![DdlOperation::DropTable {
                project: project.to_string(),
                scope: scope.to_string(),
                table: table.to_string(),
            }],
        )
    }

    /// Several schema/authorization changes in one atomic commit (anonymous).
    pub fn commit_ddl_batch(&self, ops: Vec<DdlOperation>) -> Result<CommitResult, AedbError> {
        self.commit_ddl(None, ops)
    }

    /// One-key convenience write, committed with the default finality.
    pub fn kv_set(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<CommitResult, AedbError> {
        let mut tx = self.begin_write(project)?;
        tx.kv_set(scope, key, value)?;
        self.commit(tx)
    }

    pub fn kv_del(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
    ) -> Result<CommitResult, AedbError> {
        let mut tx = self.begin_write(project)?;
        tx.kv_del(scope, key)?;
        self.commit(tx)
    }

    /// Rows of both audit tables with id >= `since_id`, each with its chain head.
    pub fn export_audit(&self, since_id: i64) -> Result<Vec<AuditExport>, AedbError> {
        self.export_audit_inner(&self.snapshot_inner(), since_id)
    }
}

impl AedbInstance<Secure> {
    /// Opens for production paths: refuses any configuration that weakens
    /// integrity, listing every problem at once. Accepts both presets
    /// (`production(key)` and `low_latency(key)`).
    pub fn open_secure(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, AedbError> {
        let problems = secure_problems(&config, false);
        if !problems.is_empty() {
            return Err(AedbError::InvalidConfig { problems });
        }
        Self::open_inner(config, dir)
    }

    /// `open_secure` plus encryption at rest: a checkpoint key is required too.
    pub fn open_production(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, AedbError> {
        let problems = secure_problems(&config, true);
        if !problems.is_empty() {
            return Err(AedbError::InvalidConfig { problems });
        }
        Self::open_inner(config, dir)
    }
}

impl<M> AedbInstance<M> {
    fn open_inner(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, AedbError> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| AedbError::io(&dir, e))?;
        let lock = DirLock::acquire(&dir, true)?;

        let mut cs = CommitState {
            state: DbState::initial(),
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            history: VecDeque::new(),
            next_seq: 0,
        };
        let max_idem = config.limits.max_idempotency_records;
        let loaded = load_manifest_and_checkpoint(&dir, &config, false)?;
        let manifest_body = loaded.manifest;
        let mut ckpt_meta = None;
        if let Some((state, meta)) = loaded.checkpoint {
            cs.state = state.state;
            let max = config.limits.max_idempotency_records;
            for (tag, seq) in state.idempotency {
                cs.remember(tag, seq, max);
            }
            ckpt_meta = Some(meta);
        }
        let keys = WalKeys::new(
            config.manifest_key.as_ref(),
            config.checkpoint_key.as_ref(),
            config.previous_checkpoint_key.as_ref(),
        );
        let start = ReplayStart {
            checkpoint: ckpt_meta.as_ref().map(|m| (m.lsn, m.chain_head)),
            read_only: false,
        };
        let recovered = recover(&dir, config.recovery, &keys, start, |lsn, payload| {
            let record = WalRecord::decode(payload).map_err(|e| e.to_string())?;
            cs.state
                .apply(&record, lsn)
                .map_err(|e| format!("frame at LSN {lsn} does not apply: {e}"))?;
            if let WalRecord::Commit {
                idempotency: Some(tag),
                ..
            } = record
            {
                cs.remember(tag, lsn, max_idem);
            }
            Ok(())
        })?;
        if let Some(m) = &manifest_body
            && config.recovery == RecoveryMode::Strict
        {
            check_segments_against_manifest(&dir, m, &recovered.segments)?;
        }
        let wal = match (recovered.position, recovered.last_header) {
            (Some(pos), Some(h)) if keys.writes_like(&h) => {
                WalWriter::resume(&dir, config.segment_bytes, keys, pos, &h)?
            }
            // Keys changed since the last segment was written: continue the chain in
            // a new segment under the current keys.
            (Some(pos), Some(_)) => WalWriter::create(
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
                WalWriter::create(&dir, config.segment_bytes, keys, 1, lsn + 1, head)?
            }
        };
        let wal = Arc::new(wal);
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
        };
        write_manifest(&dir, &config, &mut ms)?;
        cs.next_seq = cs.state.seq + 1;
        let published = Arc::new(cs.state.clone());
        cs.history.push_back(published.clone());
        if recovered.report.torn_tail.is_some() || recovered.report.dropped.is_some() {
            tracing::warn!(report = ?recovered.report, "recovery repaired the write-ahead log");
        }
        tracing::info!(dir = %dir.display(), seq = cs.state.seq, frames = recovered.report.frames_replayed, "aedb opened");

        let inner = Arc::new(Inner {
            dir,
            current: ArcSwap::new(published),
            commit: Mutex::new(cs),
            wal: wal.clone(),
            queued: AtomicUsize::new(0),
            admission_rate: config
                .limits
                .max_commits_per_sec
                .and_then(std::num::NonZeroU32::new)
                .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n))),
            counters: Counters::default(),
            flusher: Mutex::new(None),
            recovery: recovered.report,
            closed: AtomicBool::new(false),
            manifest: Mutex::new(ms),
            checkpointing: Mutex::new(CheckpointState {
                snapshot: None,
                last_at: std::time::Instant::now(),
                last_appended: 0,
                last_duration: Duration::ZERO,
            }),
            checkpointer: Arc::new((Mutex::new(false), Condvar::new())),
            published: Condvar::new(),
            project_locks: Mutex::new(HashMap::new()),
            _lock: lock,
            config,
        });
        *inner.flusher.lock() = Some(spawn_flusher(
            wal,
            inner.config.durability,
            inner.config.batch_interval,
        )?);
        spawn_checkpointer(&inner)?;
        let db = Self {
            inner,
            _mode: PhantomData,
        };
        if let Some(admin) = db.inner.config.bootstrap_admin.clone()
            && !db.inner.current.load().authz.bootstrapped
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
            state: self.inner.current.load_full(),
        }
    }

    fn begin_read_inner(&self, mode: ConsistencyMode) -> Result<Snapshot, AedbError> {
        match mode {
            ConsistencyMode::AtLatest => Ok(self.snapshot_inner()),
            ConsistencyMode::AtSeq(n) => {
                let cs = self.inner.commit.lock();
                let head = cs.state.seq;
                let oldest = cs.history.front().map_or(head, |s| s.seq);
                if n > head || n < oldest {
                    return Err(AedbError::SnapshotUnavailable {
                        requested: n,
                        oldest,
                        head,
                    });
                }
                // The state after commit n is the newest kept state with seq <= n.
                let state = cs
                    .history
                    .iter()
                    .rev()
                    .find(|s| s.seq <= n)
                    .cloned()
                    .ok_or(AedbError::SnapshotUnavailable {
                        requested: n,
                        oldest,
                        head,
                    })?;
                Ok(Snapshot { state })
            }
            ConsistencyMode::AtCheckpoint => self
                .inner
                .checkpointing
                .lock()
                .snapshot
                .clone()
                .map(|state| Snapshot { state })
                .ok_or_else(|| {
                    AedbError::InvalidArgument(
                        "no checkpoint has been written since this instance opened".into(),
                    )
                }),
        }
    }

    fn begin_write_inner(
        &self,
        caller: Option<&CallerContext>,
        project: &str,
    ) -> Result<WriteTransaction, AedbError> {
        let snapshot = self.snapshot_inner();
        if !snapshot.state.projects.contains_key(project) || project == SYSTEM_PROJECT {
            return Err(AedbError::NotFound {
                kind: "project",
                name: project.to_string(),
            });
        }
        let mut tx = WriteTransaction::new(project.to_string(), snapshot, self.inner.config.limits);
        tx.caller = caller.map(|c| c.caller_id.clone());
        Ok(tx)
    }
    fn admit(&self) -> Result<QueueSlot<'_>, AedbError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(AedbError::Closed);
        }
        let limit = self.inner.config.limits.max_queued_commits;
        let queued = self.inner.queued.fetch_add(1, Ordering::AcqRel);
        let slot = QueueSlot(&self.inner.queued);
        if queued >= limit {
            return Err(AedbError::Overloaded {
                reason: format!("{queued} commits queued (limit {limit})"),
            });
        }
        if let Some(rl) = &self.inner.admission_rate
            && rl.check().is_err()
        {
            return Err(AedbError::Overloaded {
                reason: format!(
                    "admission rate of {} commits/s exceeded",
                    self.inner.config.limits.max_commits_per_sec.unwrap_or(0)
                ),
            });
        }
        Ok(slot)
    }

    /// Takes the commit lock within the commit timeout. A timeout here guarantees
    /// the commit was not applied and never will be.
    fn lock_commit(&self) -> Result<parking_lot::MutexGuard<'_, CommitState>, AedbError> {
        let timeout = self.inner.config.commit_timeout;
        self.inner
            .commit
            .try_lock_for(timeout)
            .ok_or(AedbError::Timeout {
                waited_ms: timeout.as_millis() as u64,
            })
    }

    fn count_outcome(&self, caller: Option<&CallerContext>, r: &Result<CommitResult, AedbError>) {
        let c = &self.inner.counters;
        match r {
            Ok(res) if res.idempotent_replay => Counters::bump(&c.idempotent_replays),
            Ok(_) => Counters::bump(&c.commits),
            Err(AedbError::Conflict { .. }) => Counters::bump(&c.aborts_conflict),
            Err(AedbError::AssertionFailed { .. }) => {
                Counters::bump(&c.aborts_assertion);
                c.alert(caller_name(caller), AlertKind::AssertionFailure);
            }
            Err(AedbError::Overloaded { .. }) => Counters::bump(&c.aborts_admission),
            Err(AedbError::Timeout { .. }) => Counters::bump(&c.aborts_timeout),
            Err(AedbError::PermissionDenied { .. }) => Counters::bump(&c.aborts_permission),
            Err(_) => Counters::bump(&c.aborts_other),
        }
    }

    fn commit_tx(
        &self,
        caller: Option<&CallerContext>,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, AedbError> {
        let started = Instant::now();
        let r = self.commit_tx_inner(caller, tx, finality);
        self.count_outcome(caller, &r);
        if r.as_ref().is_ok_and(|r| !r.idempotent_replay) {
            self.inner
                .counters
                .record_latency(finality, started.elapsed());
        }
        r
    }

    fn commit_tx_inner(
        &self,
        caller: Option<&CallerContext>,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, AedbError> {
        if let Some(c) = caller
            && tx.caller.as_deref() != Some(c.caller_id.as_str())
        {
            return Err(AedbError::InvalidArgument(format!(
                "transaction was begun by {:?}, committed by {:?}",
                tx.caller, c.caller_id
            )));
        }
        let _slot = self.admit()?;
        let tag = tx.idempotency_tag();
        let mut record = tx.to_record();
        // Encoding happens outside the commit lock: it does not depend on the LSN.
        let mut payload = record.encode()?;
        let limit = self.inner.config.limits.max_txn_bytes;
        if payload.len() > limit {
            return Err(AedbError::LimitExceeded {
                what: "encoded transaction bytes",
                limit,
                actual: payload.len(),
            });
        }

        // Phase A, under this project's lock only: commits to other projects run
        // their validation and apply in parallel; they meet only to take a sequence
        // number with the WAL append, and to publish in sequence order.
        let project_lock = self.inner.project_lock(tx.project());
        let project_guard = project_lock
            .try_lock_for(self.inner.config.commit_timeout)
            .ok_or(AedbError::Timeout {
                waited_ms: self.inner.config.commit_timeout.as_millis() as u64,
            })?;
        self.inner.wal.check_healthy()?;
        // The published state is current for this project: only holders of its lock
        // change it, and they publish before releasing the lock.
        let latest = self.inner.current.load_full();
        let mut events = Vec::new();
        if let Some(c) = caller {
            for need in tx.required_permissions() {
                match latest.authz.decide(c, &need) {
                    Decision::Allowed => {}
                    Decision::AllowedAsGlobalAdmin => {
                        events.push(global_admin_use(
                            c,
                            &need,
                            &format!("commit to {}", tx.project()),
                        ));
                    }
                    Decision::Denied => {
                        let mut cs = self.lock_commit()?;
                        return self.deny(&mut cs, c, tx.project(), &need);
                    }
                }
            }
        }
        tx.check_conflicts(&latest)?;
        if let Err(e) = tx.check_assertions(&latest) {
            if let AedbError::AssertionFailed { index, description } = &e {
                let actual = tx.assertions[*index].actual_redacted(&latest, tx.project());
                let event = AuditEvent::Assertion {
                    actor: caller_name(caller).to_string(),
                    project: tx.project().to_string(),
                    kind: "assertion_failed".into(),
                    detail: format!(
                        "assertion {index} of a transaction at snapshot {}",
                        tx.snapshot_seq()
                    ),
                    expected: description.clone(),
                    actual,
                };
                let mut cs = self.lock_commit()?;
                self.write_audit_locked(&mut cs, &[event])?;
            }
            return Err(e);
        }

        // Phase B1, under the commit lock: idempotency, a final authorization check
        // if grants changed meanwhile, the sequence number and the WAL append.
        let mut cs = self.lock_commit()?;
        self.inner.wal.check_healthy()?;
        if let Some(seq) = tag.as_ref().and_then(|t| cs.idempotency.get(t).copied()) {
            drop(cs);
            return self.finish(seq, finality, true);
        }
        if let Some(c) = caller
            && cs.state.authz.generation != latest.authz.generation
        {
            for need in tx.required_permissions() {
                if cs.state.authz.decide(c, &need) == Decision::Denied {
                    return self.deny(&mut cs, c, tx.project(), &need);
                }
            }
        }
        if tx.is_empty() && events.is_empty() {
            let seq = cs.state.seq;
            drop(cs);
            return self.finish(seq, finality, false);
        }
        if !events.is_empty() {
            // Audit rows chain from the audit tables' tails: let every reserved
            // commit publish first so the tails are final.
            self.drain(&mut cs);
            if let WalRecord::Commit { audit, .. } = &mut record {
                *audit = chain_rows(&cs.state, &events, cs.next_seq, now_unix());
            }
            payload = record.encode()?;
            for _ in &events {
                self.inner
                    .counters
                    .alert(caller_name(caller), AlertKind::GlobalAdminUse);
            }
        }
        let seq = cs.next_seq;
        let pending = self.inner.wal.append(seq, &payload)?;
        cs.next_seq += 1;
        if let Err(e) = self.inner.record_rotation() {
            self.inner.wal.poison(&e);
        }
        if let Some(tag) = tag {
            cs.remember(tag, seq, self.inner.config.limits.max_idempotency_records);
        }
        drop(cs);

        // Phase A2, back under the project lock only: apply to this project's state.
        let mut project = latest
            .projects
            .get(tx.project())
            .cloned()
            .unwrap_or_default();
        let applied = match &record {
            WalRecord::Commit {
                project: name, ops, ..
            } => project.apply_ops(name, ops, seq),
            _ => Ok(()),
        };

        // Phase B2: publish in sequence order.
        let mut cs = self.inner.commit.lock();
        while cs.state.seq + 1 < seq {
            self.inner.published.wait(&mut cs);
        }
        match applied {
            Ok(()) => {
                cs.state.projects.insert(tx.project().to_string(), project);
                if let WalRecord::Commit { audit, .. } = &record
                    && let Err(e) = cs.state.append_audit(audit, seq)
                {
                    self.inner.wal.poison(&e);
                }
            }
            // Validated above, so this is a bug; the frame is in the log, the state
            // is not: refuse further commits until a reopen replays it.
            Err(e) => self.inner.wal.poison(&e),
        }
        cs.state.seq = seq;
        self.publish(&mut cs);
        drop(cs);
        // Published: the next commit to this project may start while this one
        // waits for its fsync, so concurrent durable commits share one (group commit).
        drop(project_guard);
        self.bound_buffer(pending)?;
        self.finish(seq, finality, false)
    }

    /// Waits until every reserved sequence number has been published, so the
    /// commit state is exactly the log's state (serial operations need that).
    fn drain(&self, cs: &mut parking_lot::MutexGuard<'_, CommitState>) {
        self.inner.drain(cs);
    }

    /// Records a permission denial in `assertion_audit` and returns the error.
    fn deny<T>(
        &self,
        cs: &mut parking_lot::MutexGuard<'_, CommitState>,
        caller: &CallerContext,
        project: &str,
        need: &Permission,
    ) -> Result<T, AedbError> {
        let event = AuditEvent::Assertion {
            actor: caller.caller_id.clone(),
            project: project.to_string(),
            kind: "permission_denied".into(),
            detail: format!("operation needs {need}"),
            expected: need.to_string(),
            actual: "not granted".into(),
        };
        self.write_audit_locked(cs, &[event])?;
        self.inner
            .counters
            .alert(&caller.caller_id, AlertKind::PermissionDenial);
        Err(AedbError::PermissionDenied {
            caller: caller.caller_id.clone(),
            permission: need.to_string(),
        })
    }

    /// Appends audit rows as their own commit (commit lock held), after every
    /// reserved commit has published. Not waited for: the flusher makes it durable
    /// within the batch interval.
    fn write_audit_locked(
        &self,
        cs: &mut parking_lot::MutexGuard<'_, CommitState>,
        events: &[AuditEvent],
    ) -> Result<(), AedbError> {
        self.drain(cs);
        self.write_audit_locked_inner(cs, events)
    }

    fn write_audit_locked_inner(
        &self,
        cs: &mut CommitState,
        events: &[AuditEvent],
    ) -> Result<(), AedbError> {
        let seq = cs.state.seq + 1;
        let record = WalRecord::Audit {
            rows: chain_rows(&cs.state, events, seq, now_unix()),
        };
        let payload = record.encode()?;
        let mut next = cs.state.clone();
        next.apply(&record, seq)?;
        self.inner.wal.append(seq, &payload)?;
        self.inner.record_rotation()?;
        cs.state = next;
        self.publish(cs);
        Ok(())
    }

    /// Checks a read against the current grants (so revokes apply at once, even to
    /// older snapshots); audits denials and GlobalAdmin use.
    fn authorize_read(
        &self,
        caller: &CallerContext,
        project: &str,
        need: Permission,
    ) -> Result<(), AedbError> {
        let decision = self.inner.current.load().authz.decide(caller, &need);
        match decision {
            Decision::Allowed => Ok(()),
            Decision::AllowedAsGlobalAdmin => {
                let mut cs = self.lock_commit()?;
                self.write_audit_locked(&mut cs, &[global_admin_use(caller, &need, "read")])?;
                self.inner
                    .counters
                    .alert(&caller.caller_id, AlertKind::GlobalAdminUse);
                Ok(())
            }
            Decision::Denied => {
                let mut cs = self.lock_commit()?;
                Counters::bump(&self.inner.counters.aborts_permission);
                self.deny(&mut cs, caller, project, &need)
            }
        }
    }

    fn publish(&self, cs: &mut CommitState) {
        cs.next_seq = cs.next_seq.max(cs.state.seq + 1);
        self.inner.published.notify_all();
        let published = Arc::new(cs.state.clone());
        self.inner.current.store(published.clone());
        cs.history.push_back(published);
        while cs.history.len() > self.inner.config.limits.snapshot_history.max(1) {
            cs.history.pop_front();
        }
    }

    /// Keeps the in-memory WAL buffer bounded when commits do not wait for fsync.
    fn bound_buffer(&self, pending: usize) -> Result<(), AedbError> {
        if pending >= HARD_BUFFER_BYTES {
            self.inner.wal.write_out()?;
        } else if pending >= SOFT_BUFFER_BYTES
            && let Some(f) = self.inner.flusher.lock().as_ref()
        {
            f.signal.0.lock().kicked = true;
            f.signal.1.notify_one();
        }
        Ok(())
    }

    fn finish(
        &self,
        seq: u64,
        finality: CommitFinality,
        idempotent_replay: bool,
    ) -> Result<CommitResult, AedbError> {
        if finality == CommitFinality::Durable {
            self.inner.wal.wait_durable(seq)?;
        }
        Ok(CommitResult {
            commit_seq: seq,
            durable_head_seq: self.inner.wal.durable_lsn(),
            idempotent_replay,
        })
    }

    /// Validates names, authorizes, audits, and commits schema and authorization
    /// changes atomically in one record.
    fn commit_ddl(
        &self,
        caller: Option<&CallerContext>,
        mut ops: Vec<DdlOperation>,
    ) -> Result<CommitResult, AedbError> {
        if ops.is_empty() {
            return Err(AedbError::InvalidArgument("no DDL operations given".into()));
        }
        let max = self.inner.config.limits.max_name_bytes;
        for op in &mut ops {
            validate_ddl(op, max)?;
            if let DdlOperation::CreateProject { owner, .. } = op
                && owner.is_none()
            {
                *owner = caller.map(|c| c.caller_id.clone());
            }
        }
        let _slot = self.admit()?;
        // Schema changes to a project wait for its in-flight commits (sorted order:
        // no deadlock between batches touching several projects).
        let mut touched: Vec<&str> = ops.iter().filter_map(ddl_project).collect();
        touched.sort_unstable();
        touched.dedup();
        let locks: Vec<Arc<Mutex<()>>> =
            touched.iter().map(|p| self.inner.project_lock(p)).collect();
        let _guards: Vec<_> = locks.iter().map(|l| l.lock()).collect();
        let mut cs = self.lock_commit()?;
        self.drain(&mut cs);
        self.inner.wal.check_healthy()?;
        let actor = caller_name(caller).to_string();
        let mut events = Vec::new();
        for op in &ops {
            if let Some(c) = caller {
                let decision = match op {
                    DdlOperation::GrantPermission { permission, .. }
                    | DdlOperation::RevokePermission { permission, .. } => (
                        cs.state.authz.may_delegate(c, permission),
                        permission.clone(),
                    ),
                    other => {
                        let need = ddl_need(other);
                        (cs.state.authz.decide(c, &need), need)
                    }
                };
                match decision {
                    (Decision::Allowed, _) => {}
                    (Decision::AllowedAsGlobalAdmin, need) => {
                        events.push(global_admin_use(c, &need, ddl_name(op)));
                    }
                    (Decision::Denied, need) => {
                        let project = need.project().unwrap_or("*").to_string();
                        let r = self.deny(&mut cs, c, &project, &need);
                        Counters::bump(&self.inner.counters.aborts_permission);
                        return r;
                    }
                }
            }
            if let Some(e) = authz_event(&actor, op) {
                events.push(e);
            }
        }
        let seq = cs.state.seq + 1;
        let record = WalRecord::Ddl {
            actor: caller.map(|c| c.caller_id.clone()),
            audit: chain_rows(&cs.state, &events, seq, now_unix()),
            ops,
        };
        let payload = record.encode()?;
        let mut next = cs.state.clone();
        next.apply(&record, seq)?;
        self.inner.wal.append(seq, &payload)?;
        self.inner.record_rotation()?;
        cs.state = next;
        self.publish(&mut cs);
        drop(cs);
        for e in &events {
            let kind = match e {
                AuditEvent::Authz { action, .. } if action == "global_admin_use" => {
                    AlertKind::GlobalAdminUse
                }
                _ => AlertKind::PermissionChange,
            };
            self.inner.counters.alert(&actor, kind);
        }
        Counters::bump(&self.inner.counters.commits);
        // Schema and permission changes are rare and everything after depends on them.
        self.finish(seq, CommitFinality::Durable, false)
    }

    fn export_audit_inner(
        &self,
        snap: &Snapshot,
        since_id: i64,
    ) -> Result<Vec<AuditExport>, AedbError> {
        Ok(crate::audit::export_tables(&snap.state, since_id))
    }

    /// Verifies the full hash chains of both audit tables in the current state.
    pub fn verify_audit_chains(&self) -> Result<(), AuditVerifyError> {
        let snap = self.snapshot_inner();
        for table in [AUTHZ_AUDIT, ASSERTION_AUDIT] {
            let rows: Vec<Vec<Value>> = match snap.table(SYSTEM_PROJECT, AUDIT_SCOPE, table) {
                Ok(t) => t.raw_rows().map(|r| r.to_vec()).collect(),
                Err(_) => continue,
            };
            crate::audit::verify_rows(table, &rows, None)?;
        }
        Ok(())
    }

    /// The one-time, public bootstrap of the first GlobalAdmin of a database
    /// (recorded in `authz_audit`). Fails once any GlobalAdmin was bootstrapped.
    pub fn bootstrap_global_admin(&self, admin: &str) -> Result<CommitResult, AedbError> {
        validate_caller_id(admin)?;
        let _slot = self.admit()?;
        let mut cs = self.lock_commit()?;
        self.drain(&mut cs);
        if cs.state.authz.bootstrapped {
            return Err(AedbError::AlreadyExists {
                kind: "bootstrapped GlobalAdmin",
                name: "(this database already has one; grant further admins through it)".into(),
            });
        }
        let seq = cs.state.seq + 1;
        let event = AuditEvent::Authz {
            actor: "bootstrap".into(),
            action: "bootstrap".into(),
            permission: Permission::GlobalAdmin.to_string(),
            target: admin.to_string(),
            delegable: true,
            outcome: "applied".into(),
        };
        let record = WalRecord::Bootstrap {
            admin: admin.to_string(),
            audit: chain_rows(&cs.state, &[event], seq, now_unix()),
        };
        let payload = record.encode()?;
        let mut next = cs.state.clone();
        next.apply(&record, seq)?;
        self.inner.wal.append(seq, &payload)?;
        self.inner.record_rotation()?;
        cs.state = next;
        self.publish(&mut cs);
        drop(cs);
        tracing::info!(admin, "bootstrapped the first GlobalAdmin");
        self.finish(seq, CommitFinality::Durable, false)
    }

    // ---- Authenticated API (available on every instance; the only one on Secure) ----

    pub fn begin_write_as(
        &self,
        caller: &CallerContext,
        project: &str,
    ) -> Result<WriteTransaction, AedbError> {
        self.begin_write_inner(Some(caller), project)
    }

    pub fn commit_as(
        &self,
        caller: &CallerContext,
        tx: WriteTransaction,
    ) -> Result<CommitResult, AedbError> {
        self.commit_tx(Some(caller), tx, self.inner.config.default_finality())
    }

    pub fn commit_as_with_finality(
        &self,
        caller: &CallerContext,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, AedbError> {
        self.commit_tx(Some(caller), tx, finality)
    }

    /// Schema and authorization changes (`GrantPermission`, `RevokePermission`,
    /// `TransferOwnership`, ...), all-or-nothing, one audit row per change.
    pub fn commit_ddl_as(
        &self,
        caller: &CallerContext,
        ops: Vec<DdlOperation>,
    ) -> Result<CommitResult, AedbError> {
        self.commit_ddl(Some(caller), ops)
    }

    pub fn create_project_as(
        &self,
        caller: &CallerContext,
        project: &str,
    ) -> Result<CommitResult, AedbError> {
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
    ) -> Result<CommitResult, AedbError> {
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
    ) -> Result<CommitResult, AedbError> {
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
    ) -> Result<CommitResult, AedbError> {
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
    ) -> Result<Option<Arc<[u8]>>, AedbError> {
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
    ) -> Result<Vec<KvPair>, AedbError> {
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
    ) -> Result<Vec<KvPair>, AedbError> {
        self.begin_read_tx_as(caller, ConsistencyMode::AtLatest)?
            .kv_scan_range(project, scope, start, end, limit)
    }

    pub fn query_as(
        &self,
        caller: &CallerContext,
        project: &str,
        scope: &str,
        table: &str,
        q: &Query,
    ) -> Result<QueryResult, AedbError> {
        self.begin_read_tx_as(caller, ConsistencyMode::AtLatest)?
            .query(project, scope, table, q)
    }

    /// A read transaction whose every read is authorized for `caller` at the time
    /// of the read.
    pub fn begin_read_tx_as(
        &self,
        caller: &CallerContext,
        mode: ConsistencyMode,
    ) -> Result<ReadTx<'_, M>, AedbError> {
        Ok(ReadTx {
            db: self,
            caller: caller.clone(),
            snapshot: self.begin_read_inner(mode)?,
        })
    }

    /// Rows of both audit tables with id >= `since_id` (needs `AuditRead`).
    pub fn export_audit_as(
        &self,
        caller: &CallerContext,
        since_id: i64,
    ) -> Result<Vec<AuditExport>, AedbError> {
        self.authorize_read(caller, SYSTEM_PROJECT, Permission::AuditRead)?;
        self.export_audit_inner(&self.snapshot_inner(), since_id)
    }

    /// Grants held by a caller id or `role:NAME` (needs `AuditRead`).
    pub fn grants_of_as(
        &self,
        caller: &CallerContext,
        principal: &str,
    ) -> Result<Vec<Grant>, AedbError> {
        self.authorize_read(caller, SYSTEM_PROJECT, Permission::AuditRead)?;
        Ok(self.inner.current.load().authz.grants_of(principal))
    }

    /// Writes a checkpoint of the current state, then removes the WAL segments and
    /// the older checkpoint it makes obsolete. Readers are never blocked; writers
    /// wait only while the state handle is taken.
    pub fn checkpoint(&self) -> Result<CheckpointInfo, AedbError> {
        self.inner.checkpoint()
    }

    /// (last LSN, chain head) of the log.
    pub(crate) fn head_for_backup(&self) -> (u64, [u8; 32]) {
        let (_, lsn, head) = self.inner.wal.head();
        (lsn, head)
    }

    /// Captures a consistent snapshot (state, idempotency records, chain head) and
    /// waits until the log is durable up to it.
    fn capture(&self) -> Result<Captured, AedbError> {
        let cap = {
            let mut cs = self.lock_commit()?;
            self.drain(&mut cs);
            Captured {
                state: cs
                    .history
                    .back()
                    .cloned()
                    .unwrap_or_else(|| Arc::new(cs.state.clone())),
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
    /// (absent or empty). See `backup` module docs for the format.
    pub fn backup_full(&self, dest: &Path) -> Result<BackupReport, AedbError> {
        self.backup_full_with_progress(dest, &mut |_| {})
    }

    pub fn backup_full_with_progress(
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

    /// The WAL since the backup in `parent` (the chain's latest) into `dest`.
    pub fn backup_incremental(
        &self,
        dest: &Path,
        parent: &Path,
    ) -> Result<BackupReport, AedbError> {
        self.backup_incremental_with_progress(dest, parent, &mut |_| {})
    }

    pub fn backup_incremental_with_progress(
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

    /// Highest sequence number on stable storage.
    pub fn durable_head_seq(&self) -> u64 {
        self.inner.wal.durable_lsn()
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
        m.head_seq = self.inner.current.load().seq;
        m.durable_seq = self.inner.wal.durable_lsn();
        m.queued_commits = self.inner.queued.load(Ordering::Relaxed) as u64;
        m.wal_pending_bytes = self.inner.wal.pending_bytes() as u64;
        m.wal_bytes_written = self.inner.wal.appended_bytes();
        {
            let ms = self.inner.manifest.lock();
            m.wal_segments = ms.sealed.len() as u64 + 1;
            m.checkpoint_lsn = ms.checkpoint.as_ref().map(|c| c.lsn);
        }
        {
            let ck = self.inner.checkpointing.lock();
            if ck.snapshot.is_some() {
                m.checkpoint_age_secs = Some(ck.last_at.elapsed().as_secs_f64());
                m.checkpoint_duration_secs = Some(ck.last_duration.as_secs_f64());
            }
        }
        m
    }

    /// Flushes and fsyncs everything and releases the directory lock.
    pub fn close(self) -> Result<(), AedbError> {
        self.inner.shutdown()
    }
}

/// Reads on one snapshot, each authorized for the caller when it happens.
#[derive(Debug)]
pub struct ReadTx<'a, M> {
    db: &'a AedbInstance<M>,
    caller: CallerContext,
    snapshot: Snapshot,
}

impl<M> ReadTx<'_, M> {
    pub fn seq(&self) -> u64 {
        self.snapshot.seq()
    }

    fn check(&self, project: &str, need: Permission) -> Result<(), AedbError> {
        self.db.authorize_read(&self.caller, project, need)
    }

    pub fn kv_get(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
    ) -> Result<Option<Arc<[u8]>>, AedbError> {
        self.check(
            project,
            Permission::KvRead {
                project: project.to_string(),
                scope: Some(scope.to_string()),
                prefix: Some(key.to_vec()),
            },
        )?;
        Ok(self.snapshot.kv(project, scope)?.get(key))
    }

    pub fn kv_scan_prefix(
        &self,
        project: &str,
        scope: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KvPair>, AedbError> {
        self.check(
            project,
            Permission::KvRead {
                project: project.to_string(),
                scope: Some(scope.to_string()),
                prefix: Some(prefix.to_vec()),
            },
        )?;
        Ok(self.snapshot.kv(project, scope)?.scan_prefix(prefix, limit))
    }

    /// A range scan needs read access to the whole scope (a range is not a prefix).
    pub fn kv_scan_range(
        &self,
        project: &str,
        scope: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, AedbError> {
        self.check(
            project,
            Permission::KvRead {
                project: project.to_string(),
                scope: Some(scope.to_string()),
                prefix: None,
            },
        )?;
        Ok(self
            .snapshot
            .kv(project, scope)?
            .scan_range(start, end, limit))
    }

    pub fn query(
        &self,
        project: &str,
        scope: &str,
        table: &str,
        q: &Query,
    ) -> Result<QueryResult, AedbError> {
        let need = if project == SYSTEM_PROJECT {
            Permission::AuditRead
        } else {
            Permission::TableRead {
                project: project.to_string(),
                scope: Some(scope.to_string()),
                table: Some(table.to_string()),
            }
        };
        self.check(project, need)?;
        self.snapshot.table(project, scope, table)?.query(q)
    }

    pub fn get_row(
        &self,
        project: &str,
        scope: &str,
        table: &str,
        pk: &[Value],
    ) -> Result<Option<Arc<Row>>, AedbError> {
        self.check(
            project,
            Permission::TableRead {
                project: project.to_string(),
                scope: Some(scope.to_string()),
                table: Some(table.to_string()),
            },
        )?;
        self.snapshot.table(project, scope, table)?.get(pk)
    }
}

fn caller_name(caller: Option<&CallerContext>) -> &str {
    caller.map_or(ANONYMOUS, |c| c.caller_id.as_str())
}

fn global_admin_use(caller: &CallerContext, need: &Permission, operation: &str) -> AuditEvent {
    AuditEvent::Authz {
        actor: caller.caller_id.clone(),
        action: "global_admin_use".into(),
        permission: need.to_string(),
        target: operation.to_string(),
        delegable: false,
        outcome: "allowed".into(),
    }
}

fn ddl_name(op: &DdlOperation) -> &'static str {
    match op {
        DdlOperation::CreateProject { .. } => "create_project",
        DdlOperation::CreateScope { .. } => "create_scope",
        DdlOperation::CreateTable { .. } => "create_table",
        DdlOperation::DropTable { .. } => "drop_table",
        DdlOperation::GrantPermission { .. } => "grant",
        DdlOperation::RevokePermission { .. } => "revoke",
        DdlOperation::TransferOwnership { .. } => "transfer_ownership",
    }
}

/// The permission a schema operation needs.
fn ddl_need(op: &DdlOperation) -> Permission {
    match op {
        DdlOperation::CreateProject { .. } => Permission::GlobalAdmin,
        DdlOperation::CreateScope { project, .. }
        | DdlOperation::TransferOwnership { project, .. } => Permission::ProjectAdmin {
            project: project.clone(),
        },
        DdlOperation::CreateTable { project, scope, .. }
        | DdlOperation::DropTable { project, scope, .. } => Permission::TableDdl {
            project: project.clone(),
            scope: Some(scope.clone()),
        },
        DdlOperation::GrantPermission { permission, .. }
        | DdlOperation::RevokePermission { permission, .. } => permission.clone(),
    }
}

/// The `authz_audit` row a grant, revoke or ownership change produces.
fn authz_event(actor: &str, op: &DdlOperation) -> Option<AuditEvent> {
    let (action, permission, target, delegable) = match op {
        DdlOperation::GrantPermission {
            grantee,
            permission,
            delegable,
        } => ("grant", permission.to_string(), grantee.clone(), *delegable),
        DdlOperation::RevokePermission {
            grantee,
            permission,
        } => ("revoke", permission.to_string(), grantee.clone(), false),
        DdlOperation::TransferOwnership { project, new_owner } => (
            "transfer_ownership",
            format!("owner of {project}"),
            new_owner.clone(),
            false,
        ),
        _ => return None,
    };
    Some(AuditEvent::Authz {
        actor: actor.to_string(),
        action: action.into(),
        permission,
        target,
        delegable,
        outcome: "applied".into(),
    })
}

fn validate_ddl(op: &DdlOperation, max: usize) -> Result<(), AedbError> {
    let user_project = |p: &str| {
        validate_name("project", p, max)?;
        if p.starts_with('_') {
            return Err(AedbError::InvalidArgument(format!(
                "project names starting with '_' are reserved for the system ({p:?})"
            )));
        }
        Ok(())
    };
    match op {
        DdlOperation::CreateProject { project, owner } => {
            user_project(project)?;
            if let Some(o) = owner {
                validate_caller_id(o)?;
            }
        }
        DdlOperation::CreateScope { project, scope } => {
            user_project(project)?;
            validate_name("scope", scope, max)?;
        }
        DdlOperation::CreateTable {
            project,
            scope,
            table,
            schema,
        } => {
            user_project(project)?;
            validate_name("table", table, max)?;
            validate_name("scope", scope, max)?;
            schema.validate(table, max)?;
        }
        DdlOperation::DropTable { project, table, .. } => {
            user_project(project)?;
            validate_name("table", table, max)?;
        }
        DdlOperation::GrantPermission {
            grantee,
            permission,
            ..
        }
        | DdlOperation::RevokePermission {
            grantee,
            permission,
        } => {
            validate_principal(grantee, max)?;
            if let Some(p) = permission.project() {
                validate_name("project", p, max)?;
            }
        }
        DdlOperation::TransferOwnership { project, new_owner } => {
            user_project(project)?;
            validate_caller_id(new_owner)?;
        }
    }
    Ok(())
}

fn validate_principal(p: &str, max: usize) -> Result<(), AedbError> {
    match p.strip_prefix("role:") {
        Some(role) => validate_name("role", role, max),
        None => validate_caller_id(p),
    }
}

/// Caller ids come from the host's authentication (user ids, emails, service
/// names): printable ASCII without spaces, 1..=256 bytes.
pub(crate) fn validate_caller_id(id: &str) -> Result<(), AedbError> {
    if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AedbError::InvalidArgument(format!(
            "caller id must be 1..=256 printable ASCII characters without spaces, got {} bytes",
            id.len()
        )));
    }
    Ok(())
}

impl Inner {
    /// Waits until every reserved sequence number has been published, so the
    /// commit state is exactly the log's state (serial operations need that).
    fn drain(&self, cs: &mut parking_lot::MutexGuard<'_, CommitState>) {
        while cs.state.seq + 1 < cs.next_seq {
            self.published.wait(cs);
        }
    }

    fn project_lock(&self, project: &str) -> Arc<Mutex<()>> {
        self.project_locks
            .lock()
            .entry(project.to_string())
            .or_default()
            .clone()
    }

    /// Records segments sealed by the last append in the manifest (commit lock held).
    fn record_rotation(&self) -> Result<(), AedbError> {
        let sealed = self.wal.take_newly_sealed();
        if sealed.is_empty() {
            return Ok(());
        }
        let mut ms = self.manifest.lock();
        ms.sealed.extend(sealed);
        let (index, first) = self.wal.active_segment();
        ms.active_index = index;
        ms.active_first_lsn = first;
        write_manifest(&self.dir, &self.config, &mut ms)
    }

    fn checkpoint(&self) -> Result<CheckpointInfo, AedbError> {
        let mut ck = self.checkpointing.lock();
        let started = std::time::Instant::now();
        let (state, idempotency, chain_head) = {
            let mut cs = self.commit.lock();
            self.drain(&mut cs);
            let state = cs
                .history
                .back()
                .cloned()
                .unwrap_or_else(|| Arc::new(cs.state.clone()));
            let idem: Vec<(IdempotencyTag, u64)> = cs
                .idempotency_order
                .iter()
                .filter_map(|t| cs.idempotency.get(t).map(|s| (t.clone(), *s)))
                .collect();
            (state, idem, self.wal.head().2)
        };
        // The checkpoint must never be ahead of the durable log.
        self.wal.wait_durable(state.seq)?;
        let appended = self.wal.appended_bytes();
        let meta = checkpoint::write(
            &self.dir,
            &state,
            &idempotency,
            chain_head,
            self.config.checkpoint_key.as_ref(),
            &mut |_| {},
        )?;
        let (old, obsolete) = {
            let mut ms = self.manifest.lock();
            let old = ms.checkpoint.replace(meta.clone());
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
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "could not remove an obsolete segment");
            }
        }
        if let Some(old) = old.filter(|o| o.file != meta.file) {
            let p = self.dir.join(&old.file);
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "could not remove the old checkpoint");
            }
        }
        let duration = started.elapsed();
        ck.snapshot = Some(state);
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
    fn checkpoint_due(&self) -> bool {
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

    fn shutdown(&self) -> Result<(), AedbError> {
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
        self.wal.shutdown()
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

/// Runs the automatic checkpoint policy. Holds only a weak reference, so it never
/// keeps a dropped instance alive; it exits once the instance is gone or closed.
fn spawn_checkpointer(inner: &Arc<Inner>) -> Result<(), AedbError> {
    if inner.config.checkpoint_wal_bytes.is_none() && inner.config.checkpoint_interval.is_none() {
        return Ok(());
    }
    let weak = Arc::downgrade(inner);
    let stop = inner.checkpointer.clone();
    std::thread::Builder::new()
        .name("aedb-checkpointer".into())
        .spawn(move || {
            loop {
                {
                    let mut stopped = stop.0.lock();
                    if !*stopped {
                        stop.1.wait_for(&mut stopped, Duration::from_millis(500));
                    }
                    if *stopped {
                        return;
                    }
                }
                let Some(inner) = weak.upgrade() else { return };
                if inner.closed.load(Ordering::Acquire) {
                    return;
                }
                if inner.checkpoint_due()
                    && let Err(e) = inner.checkpoint()
                {
                    tracing::error!(error = %e, "automatic checkpoint failed; will retry");
                }
            }
        })
        .map_err(|e| AedbError::io("aedb-checkpointer thread", e))?;
    Ok(())
}

/// The existing project a schema operation changes (CreateProject adds a new one
/// under the commit lock alone).
fn ddl_project(op: &DdlOperation) -> Option<&str> {
    match op {
        DdlOperation::CreateScope { project, .. }
        | DdlOperation::CreateTable { project, .. }
        | DdlOperation::DropTable { project, .. }
        | DdlOperation::TransferOwnership { project, .. } => Some(project),
        _ => None,
    }
}
