//! The migration runner: one run at a time per process, page by page, each
//! batch of rewrapped records written atomically with the progress that
//! describes it; retrying failed records; marking records skipped. The state
//! it persists and the views it answers with are in `state.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use zeroize::Zeroizing;

use super::error::MigrationError;
use super::state::{
    DryRunView, FailedRecord, KeyRecords, MigrationState, MigrationStore, MigrationView, RunState,
    UnreadableRecord,
};
use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::clock::{format_us, now_us};
use crate::config::{Config, FaultPlan, FaultPoint};
use crate::crypto;
use crate::encryption::KeyRing;
use crate::encryption::collection::{EncryptedCollection, for_each_page, for_each_stored};
use crate::metrics::Metrics;
use crate::store::{Collection, Durability, Expect, Store, StoreError, WriteOp};

/// Records per atomic store batch.
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// Failed records listed in the state (all are counted).
pub const MAX_LISTED_FAILURES: usize = 10_000;
/// Times one record is re-read after losing a race to a concurrent write
/// before it is reported as failed for this run.
const CONFLICT_RETRIES: u32 = 16;

/// Sizes and faults.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    pub batch_size: usize,
    /// Return `Stopped` after this many batches (unit tests of resumption).
    pub stop_after_batches: Option<u64>,
    /// The configuration's fault plan (a crash at a chosen batch).
    pub faults: FaultPlan,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_BATCH_SIZE,
            stop_after_batches: None,
            faults: FaultPlan::default(),
        }
    }
}

impl MigrationOptions {
    pub fn from_config(config: &Config) -> Self {
        Self {
            batch_size: config.migration_batch_size,
            stop_after_batches: None,
            faults: config.faults.clone(),
        }
    }
}

/// What to do with one record.
enum Plan {
    Current,
    Rewrap {
        version: u64,
        /// The stored record as read.
        value: Arc<[u8]>,
        plaintext: Zeroizing<Vec<u8>>,
    },
    Failed(String),
    Skipped,
    /// Deleted meanwhile (retry path): nothing to count.
    Gone,
}

/// Creates the migration's series for every store (at zero), so
/// `/metrics` names them before the first run. The migration owns its label
/// values; `Metrics` only holds the families.
pub fn register_metrics(metrics: &Metrics) {
    for store in MigrationStore::ALL {
        metrics.migration_errors.with_label_values(&[store.name()]);
        metrics
            .migration_records
            .with_label_values(&[store.name(), "migrated"]);
        metrics.migration_running.with_label_values(&[store.name()]);
        metrics
            .migration_processed
            .with_label_values(&[store.name()]);
    }
}

#[derive(Debug)]
pub struct Migrator {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    keyring: Arc<KeyRing>,
    metrics: Metrics,
    options: MigrationOptions,
    /// One run at a time in this process.
    running: Mutex<()>,
    active: AtomicBool,
    /// The state of the active run, for progress without a store read.
    live: RwLock<Option<MigrationState>>,
}

impl Migrator {
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        keyring: Arc<KeyRing>,
        metrics: Metrics,
        options: MigrationOptions,
    ) -> Self {
        register_metrics(&metrics);
        Self {
            store,
            audit,
            keyring,
            metrics,
            options,
            running: Mutex::new(()),
            active: AtomicBool::new(false),
            live: RwLock::new(None),
        }
    }

    fn load(&self, store: MigrationStore) -> Result<(u64, MigrationState), MigrationError> {
        Ok(MigrationState::load(self.store.as_ref(), store)?)
    }

    fn shown(&self, mut s: MigrationState) -> MigrationState {
        if s.state == RunState::Running && !self.active.load(Ordering::Relaxed) {
            s.state = RunState::Interrupted;
        }
        s
    }

    /// Whether a run is active in this process.
    pub fn is_running(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The progress of the active run, if any.
    pub fn live(&self) -> Option<MigrationState> {
        self.live.read().clone()
    }

    /// `GET /api/security/migration/status`: the named store, or the store
    /// whose migration started last.
    pub fn status(&self, store: Option<&str>) -> Result<MigrationView, MigrationError> {
        if let Some(live) = self.live()
            && store.is_none_or(|s| s == live.store)
        {
            return Ok(live.view());
        }
        let stores = match store {
            Some(name) => MigrationStore::parse(name)?,
            None => MigrationStore::ALL.to_vec(),
        };
        let mut best: Option<MigrationState> = None;
        for s in stores {
            let (_, st) = self.load(s)?;
            if best
                .as_ref()
                .is_none_or(|b| st.started_at_us > b.started_at_us)
            {
                best = Some(st);
            }
        }
        let best = best.unwrap_or_else(|| MigrationState::new(MigrationStore::Secrets));
        Ok(self.shown(best).view())
    }

    fn begin(&self) -> Result<RunGuard<'_>, MigrationError> {
        let guard = self.running.try_lock().ok_or(MigrationError::Busy)?;
        self.active.store(true, Ordering::Relaxed);
        Ok(RunGuard {
            migrator: self,
            _guard: guard,
        })
    }

    /// Dry run: how many records each key encrypts and how many a run would
    /// rewrap. Writes nothing.
    pub fn dry_run(&self, store: MigrationStore) -> Result<DryRunView, MigrationError> {
        let coll = self.collection_of(store)?;
        let primary = self.keyring.primary_key_id()?;
        let (_, st) = self.load(store)?;
        let skipped: HashSet<&str> = st.skipped_records.iter().map(String::as_str).collect();
        let mut by_key: BTreeMap<(String, u32), u64> = BTreeMap::new();
        let (mut total, mut would_change, mut current, mut unreadable, mut skip) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut unreadable_records = Vec::new();
        for_each_stored(
            self.store.as_ref(),
            store.collection(),
            self.options.batch_size,
            |id, rec| {
                total += 1;
                if skipped.contains(id) {
                    skip += 1;
                    return;
                }
                match coll.header(&rec.value) {
                    Ok(h) => {
                        if h.key_id == primary {
                            current += 1;
                        } else {
                            would_change += 1;
                        }
                        *by_key.entry((h.key_id, h.version)).or_insert(0) += 1;
                    }
                    Err(e) => {
                        unreadable += 1;
                        if unreadable_records.len() < 100 {
                            unreadable_records.push(UnreadableRecord {
                                record_id: id.to_string(),
                                error: e,
                            });
                        }
                    }
                }
            },
        )?;
        Ok(DryRunView {
            dry_run: true,
            store: store.name().to_string(),
            total,
            would_change,
            already_current: current,
            unreadable,
            unreadable_records,
            skipped: skip,
            by_key: by_key
                .into_iter()
                .map(|((key_id, version), records)| KeyRecords {
                    primary: key_id == primary,
                    key_id,
                    version,
                    records,
                })
                .collect(),
            primary_key_id: primary,
        })
    }

    /// Runs (or resumes) the migration of `store`. `progress` is called after
    /// every batch.
    pub fn run(
        &self,
        store: MigrationStore,
        actor: &str,
        progress: &dyn Fn(&MigrationState),
    ) -> Result<MigrationState, MigrationError> {
        let _run = self.begin()?;
        self.run_inner(store, actor, progress)
    }

    /// The registered collection behind a store name.
    fn collection_of(
        &self,
        store: MigrationStore,
    ) -> Result<Arc<dyn EncryptedCollection>, MigrationError> {
        self.keyring
            .encrypted_collections()
            .iter()
            .find(|c| c.name() == store.name())
            .cloned()
            .ok_or_else(|| {
                MigrationError::Invalid(format!("store {} is not registered", store.name()))
            })
    }

    fn run_inner(
        &self,
        store: MigrationStore,
        actor: &str,
        progress: &dyn Fn(&MigrationState),
    ) -> Result<MigrationState, MigrationError> {
        let coll = self.collection_of(store)?;
        let (_, mut prev) = self.load(store)?;
        let now = now_us();
        let primary = self.keyring.primary_key_id()?;
        // Resume only towards the same primary: after another rotation the
        // records before the cursor need rewrapping again, so start over.
        let resuming = prev.state == RunState::Running
            && prev.target_key_id.as_deref() == Some(primary.as_str());
        let mut st = if resuming {
            let mut s = prev;
            s.resumed += 1;
            s
        } else {
            let mut s = MigrationState::new(store);
            s.skipped_records = std::mem::take(&mut prev.skipped_records);
            s.started_at = Some(format_us(now));
            s.started_at_us = Some(now);
            s
        };
        st.state = RunState::Running;
        st.finished_at = None;
        st.target_key_id = Some(primary);
        st.total = st.processed() + self.count_after(store, st.cursor.as_deref())?;
        st.updated_at = Some(format_us(now));
        let event =
            AuditEvent::new("migration_started", actor, Outcome::Success).details(RunStarted {
                store: store.name(),
                resumed: resuming,
                cursor: st.cursor.as_deref(),
                total: st.total,
                target_key_id: st.target_key_id.as_deref(),
            });
        self.audit.record_with(event, vec![st.op(store)?])?;
        tracing::info!(
            store = store.name(),
            resumed = resuming,
            total = st.total,
            actor = %actor,
            "migration started"
        );
        *self.live.write() = Some(st.clone());
        progress(&st);

        let skipped: HashSet<String> = st.skipped_records.iter().cloned().collect();
        let mut batches = 0u64;
        let cursor = st.cursor.clone();
        for_each_page(
            self.store.as_ref(),
            store.collection(),
            cursor.as_deref(),
            self.options.batch_size,
            |page| {
                let Some(last) = page.last().map(|(id, _)| id.clone()) else {
                    return Ok(());
                };
                let primary = self.keyring.primary_key_id()?;
                let plans: Vec<(String, Plan)> = page
                    .into_iter()
                    .map(|(id, rec)| {
                        let plan = if skipped.contains(&id) {
                            Plan::Skipped
                        } else {
                            self.plan(coll.as_ref(), &id, rec.version, &rec.value, &primary)
                        };
                        (id, plan)
                    })
                    .collect();
                self.commit(store, plans, &mut st, |s| s.cursor = Some(last.clone()))?;
                *self.live.write() = Some(st.clone());
                progress(&st);
                batches += 1;
                self.options
                    .faults
                    .at(FaultPoint::MigrationBatchDurable { batches });
                if self.options.stop_after_batches == Some(batches) {
                    return Err(MigrationError::Stopped(batches));
                }
                Ok(())
            },
        )?;

        st.state = if st.failed > 0 {
            RunState::CompletedWithErrors
        } else {
            RunState::Completed
        };
        st.total = st.processed();
        let done = now_us();
        st.finished_at = Some(format_us(done));
        st.updated_at = st.finished_at.clone();
        self.record_finished(actor, store, &st, Counts::of(&st))?;
        tracing::info!(
            store = store.name(),
            migrated = st.migrated,
            failed = st.failed,
            actor = %actor,
            "migration finished"
        );
        Ok(st)
    }

    /// Retries only the records listed as failed. `None` when none is: nothing
    /// runs and nothing is audited (the last run's state is not a retry's result).
    pub fn retry_failed(
        &self,
        store: MigrationStore,
        actor: &str,
    ) -> Result<Option<MigrationState>, MigrationError> {
        let _run = self.begin()?;
        let (_, st) = self.load(store)?;
        if !st.failed_records.iter().any(|f| f.store == store.name()) {
            return Ok(None);
        }
        self.retry_inner(store, actor).map(Some)
    }

    fn retry_inner(
        &self,
        store: MigrationStore,
        actor: &str,
    ) -> Result<MigrationState, MigrationError> {
        let (_, mut st) = self.load(store)?;
        let ids: Vec<String> = st
            .failed_records
            .iter()
            .filter(|f| f.store == store.name())
            .map(|f| f.record_id.clone())
            .collect();
        let event =
            AuditEvent::new("migration_started", actor, Outcome::Success).details(RetryStarted {
                store: store.name(),
                mode: "retry_failed",
                records: ids.len(),
            });
        self.audit
            .record(event)
            .map_err(|e| MigrationError::Audit(e.to_string()))?;
        let before = (st.migrated, st.failed);
        for chunk in ids.chunks(self.options.batch_size) {
            let primary = self.keyring.primary_key_id()?;
            let mut plans = Vec::with_capacity(chunk.len());
            for id in chunk {
                // Un-count it; the new plan counts it again.
                st.failed = st.failed.saturating_sub(1);
                st.failed_records.retain(|f| &f.record_id != id);
                plans.push((id.clone(), self.replan(store, id, &primary)?));
            }
            self.commit(store, plans, &mut st, |_| {})?;
        }
        if st.state == RunState::CompletedWithErrors && st.failed == 0 {
            st.state = RunState::Completed;
        }
        st.total = st.processed();
        st.updated_at = Some(format_us(now_us()));
        let details = RetryFinished {
            counts: Counts::of(&st),
            mode: "retry_failed",
            recovered: st.migrated - before.0,
        };
        self.record_finished(actor, store, &st, details)?;
        Ok(st)
    }

    /// Marks a record skipped: later runs leave it alone; it leaves the failed
    /// list. Recorded in the state and audited.
    pub fn skip_record(
        &self,
        store: MigrationStore,
        record_id: &str,
        actor: &str,
    ) -> Result<MigrationState, MigrationError> {
        if record_id.is_empty() || record_id.len() > 1000 {
            return Err(MigrationError::Invalid(
                "--skip-record needs a record id".into(),
            ));
        }
        let _run = self.begin()?;
        let (version, mut st) = self.load(store)?;
        let was_failed = st.failed_records.iter().any(|f| f.record_id == record_id);
        if !st.skipped_records.iter().any(|r| r == record_id) {
            st.skipped_records.push(record_id.to_string());
            if was_failed {
                st.failed_records.retain(|f| f.record_id != record_id);
                st.failed = st.failed.saturating_sub(1);
                st.skipped += 1;
            }
        }
        if st.state == RunState::CompletedWithErrors && st.failed == 0 {
            st.state = RunState::Completed;
        }
        st.updated_at = Some(format_us(now_us()));
        let expect = if version == 0 {
            Expect::Absent
        } else {
            Expect::Version(version)
        };
        let op = WriteOp::put_json(Collection::Migrations, store.state_id(), &st, expect)?;
        let event = AuditEvent::new("migration_record_skipped", actor, Outcome::Success).details(
            RecordSkipped {
                store: store.name(),
                record_id,
                was_failed,
            },
        );
        self.audit.record_with(event, vec![op])?;
        Ok(st)
    }

    fn count_after(
        &self,
        store: MigrationStore,
        after: Option<&str>,
    ) -> Result<u64, MigrationError> {
        // Counting only: a larger page than a batch, nothing is decoded.
        const PAGE: usize = 10_000;
        let mut n = 0u64;
        for_each_page::<StoreError>(
            self.store.as_ref(),
            store.collection(),
            after,
            PAGE,
            |page| {
                n += page.len() as u64;
                Ok(())
            },
        )?;
        Ok(n)
    }

    fn plan(
        &self,
        coll: &dyn EncryptedCollection,
        id: &str,
        version: u64,
        value: &Arc<[u8]>,
        primary: &str,
    ) -> Plan {
        let envelope = match coll.envelope(value) {
            Ok(b) => b,
            Err(e) => return Plan::Failed(e),
        };
        match crypto::parse_header(&envelope) {
            Ok(h) if h.key_id == primary => return Plan::Current,
            Ok(_) => {}
            Err(e) => return Plan::Failed(e.to_string()),
        }
        match self.keyring.decrypt(id, &envelope, None) {
            Ok(p) => Plan::Rewrap {
                version,
                value: value.clone(),
                plaintext: Zeroizing::new(p),
            },
            Err(e) => Plan::Failed(e.to_string()),
        }
    }

    fn replan(
        &self,
        store: MigrationStore,
        id: &str,
        primary: &str,
    ) -> Result<Plan, MigrationError> {
        let coll = self.collection_of(store)?;
        Ok(match self.store.get(store.collection(), id)? {
            Some(r) => self.plan(coll.as_ref(), id, r.version, &r.value, primary),
            None => Plan::Gone,
        })
    }

    /// Writes one batch (the rewrapped records and the state after it)
    /// atomically and durably; on a lost race re-reads the record and retries.
    fn commit(
        &self,
        store: MigrationStore,
        mut plans: Vec<(String, Plan)>,
        st: &mut MigrationState,
        advance: impl Fn(&mut MigrationState),
    ) -> Result<(), MigrationError> {
        let coll = self.collection_of(store)?;
        let mut conflicts: HashMap<String, u32> = HashMap::new();
        loop {
            let mut next = st.clone();
            advance(&mut next);
            let mut new_failures = 0u64;
            for (id, plan) in &plans {
                match plan {
                    Plan::Current => next.already_current += 1,
                    Plan::Rewrap { .. } => next.migrated += 1,
                    Plan::Skipped => next.skipped += 1,
                    Plan::Gone => {}
                    Plan::Failed(error) => {
                        new_failures += 1;
                        next.failed += 1;
                        if next.failed_records.len() < MAX_LISTED_FAILURES {
                            next.failed_records.push(FailedRecord {
                                record_id: id.clone(),
                                store: store.name().to_string(),
                                error: error.clone(),
                            });
                        }
                    }
                }
            }
            next.updated_at = Some(format_us(now_us()));
            let items: Vec<(&str, &[u8])> = plans
                .iter()
                .filter_map(|(id, p)| match p {
                    Plan::Rewrap { plaintext, .. } => Some((id.as_str(), plaintext.as_slice())),
                    _ => None,
                })
                .collect();
            let written = self.keyring.seal_many_and_write(
                &items,
                |envelopes, key_id, key_version| -> Result<_, MigrationError> {
                    let mut ops = Vec::with_capacity(envelopes.len() + 1);
                    let mut envs = envelopes.into_iter();
                    for (id, p) in &plans {
                        if let Plan::Rewrap { version, value, .. } = p {
                            let env = envs.next().ok_or_else(|| {
                                MigrationError::Invalid("envelope count mismatch".into())
                            })?;
                            ops.push(WriteOp::Put {
                                collection: store.collection(),
                                id: id.clone(),
                                value: coll
                                    .reseal(value, &env, key_id, key_version)
                                    .map_err(MigrationError::Invalid)?,
                                expect: Expect::Version(*version),
                            });
                        }
                    }
                    ops.push(next.op(store)?);
                    Ok(self.store.write(ops, Durability::Visible)?)
                },
            );
            match written {
                Ok(receipt) => {
                    self.store.wait_durable(receipt)?;
                    if new_failures > 0 {
                        self.metrics
                            .migration_errors
                            .with_label_values(&[store.name()])
                            .inc_by(new_failures);
                        for (id, p) in &plans {
                            if let Plan::Failed(e) = p {
                                tracing::warn!(store = store.name(), record_id = %id, error = %e, "migration: record failed");
                            }
                        }
                    }
                    let rewrapped = next.migrated - st.migrated;
                    self.metrics
                        .migration_records
                        .with_label_values(&[store.name(), "migrated"])
                        .inc_by(rewrapped);
                    *st = next;
                    return Ok(());
                }
                Err(MigrationError::Store(StoreError::Conflict { collection, id, .. }))
                    if collection == store.collection().name() =>
                {
                    let tries = conflicts.entry(id.clone()).or_insert(0);
                    *tries += 1;
                    let primary = self.keyring.primary_key_id()?;
                    let plan = if *tries > CONFLICT_RETRIES {
                        Plan::Failed(format!(
                            "changed concurrently {CONFLICT_RETRIES} times during the migration; \
                             retry with --retry-failed"
                        ))
                    } else {
                        self.replan(store, &id, &primary)?
                    };
                    if let Some(slot) = plans.iter_mut().find(|(pid, _)| *pid == id) {
                        slot.1 = plan;
                    } else {
                        return Err(MigrationError::Invalid(format!(
                            "conflict on {id}, which is not in the batch"
                        )));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Migrator {
    /// Writes the final state of a run with its `migration_finished` entry (a
    /// failure outcome when any record failed).
    fn record_finished(
        &self,
        actor: &str,
        store: MigrationStore,
        st: &MigrationState,
        details: impl Serialize,
    ) -> Result<(), MigrationError> {
        let outcome = if st.failed > 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        let event = AuditEvent::new("migration_finished", actor, outcome).details(details);
        self.audit.record_with(event, vec![st.op(store)?])?;
        Ok(())
    }
}

struct RunGuard<'a> {
    migrator: &'a Migrator,
    _guard: parking_lot::MutexGuard<'a, ()>,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        self.migrator.active.store(false, Ordering::Relaxed);
        *self.migrator.live.write() = None;
    }
}

/// `migration_started` of a run.
#[derive(Serialize)]
struct RunStarted<'a> {
    store: &'a str,
    resumed: bool,
    cursor: Option<&'a str>,
    total: u64,
    target_key_id: Option<&'a str>,
}

/// `migration_started` of `--retry-failed`.
#[derive(Serialize)]
struct RetryStarted<'a> {
    store: &'a str,
    mode: &'static str,
    records: usize,
}

/// `migration_record_skipped`.
#[derive(Serialize)]
struct RecordSkipped<'a> {
    store: &'a str,
    record_id: &'a str,
    was_failed: bool,
}

/// `migration_finished`: the counts of the run.
#[derive(Serialize)]
struct Counts<'a> {
    store: &'a str,
    state: RunState,
    total: u64,
    migrated: u64,
    already_current: u64,
    failed: u64,
    skipped: u64,
    target_key_id: Option<&'a str>,
    resumed: u32,
}

impl<'a> Counts<'a> {
    fn of(st: &'a MigrationState) -> Self {
        Counts {
            store: &st.store,
            state: st.state,
            total: st.total,
            migrated: st.migrated,
            already_current: st.already_current,
            failed: st.failed,
            skipped: st.skipped,
            target_key_id: st.target_key_id.as_deref(),
            resumed: st.resumed,
        }
    }
}

/// `migration_finished` of `--retry-failed`.
#[derive(Serialize)]
struct RetryFinished<'a> {
    #[serde(flatten)]
    counts: Counts<'a>,
    mode: &'static str,
    recovered: u64,
}
