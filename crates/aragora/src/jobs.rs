//! Long operations as jobs: the only way a migration run or a
//! rotation-by-accessor starts, from HTTP (`POST /api/security/migration/run`,
//! in the background) or the control socket (`aragora migration`, `aragora
//! rotation`, in the foreground).
//!
//! # One at a time, atomically
//!
//! Starting claims the slot under a lock and writes the job record with an
//! `active` marker that must be absent, in one durable store write; a second
//! start while a job runs is refused with the running job's id and kind
//! (409), never accepted and failed later.
//!
//! # Persisted, resumable
//!
//! `Collection::Jobs` holds one [`JobRecord`] per job (its state, each store's
//! result as it finishes, timestamps) and the `active` marker. A process that
//! dies leaves the record `running` with the marker: the next boot marks it
//! `interrupted` and clears the marker; the next start of the same kind
//! resumes that job (same id, `resumed` + 1), skipping the stores it
//! finished, and the migration itself continues after its durable cursor.

use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::clock::{format_us, now_us};
use crate::config::{FaultPlan, FaultPoint};
use crate::encryption::migration::{MigrationError, MigrationStore, MigrationView, Migrator};
use crate::error::ServiceError;
use crate::secrets::{RotationMarks, SecretsService};
use crate::store::{Collection, Durability, Expect, Store, StoreError, WriteOp, get_json};

/// The marker record naming the job that holds the slot.
const ACTIVE_ID: &str = "active";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Rewrap the records of one or more encrypted stores under the primary.
    MigrationRun,
    /// Mark for rotation every secret a user read.
    SecretRotation,
    /// An approved request's operation (`approval_id` names the request). It
    /// does not take the slot: a short operation never waits for a migration.
    ApprovedOperation,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::MigrationRun => "migration_run",
            JobKind::SecretRotation => "secret_rotation",
            JobKind::ApprovedOperation => "approved_operation",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Completed,
    Failed,
    /// The process running it stopped; the next start of its kind resumes it.
    Interrupted,
}

/// A job as stored and as `GET /api/security/jobs/{id}` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub actor: String,
    /// The stores a migration job rewraps, in order.
    pub stores: Vec<String>,
    /// Each finished store's final migration state.
    pub results: Vec<MigrationView>,
    /// A rotation's subject: the user whose reads expose the secrets.
    #[serde(default)]
    pub user_id: Option<String>,
    /// A rotation's outcome.
    #[serde(default)]
    pub marked: Option<RotationMarks>,
    pub error: Option<String>,
    pub started_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    /// How often it was resumed after an interruption.
    pub resumed: u32,
    /// The approval request this job runs (approved operations).
    #[serde(default)]
    pub approval_id: Option<String>,
    /// The approved operation's name and outcome.
    #[serde(default)]
    pub operation: Option<String>,
    #[serde(default)]
    pub result: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ActiveMarker {
    job_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("a {} job is already running ({job_id}); see GET /api/security/jobs/{job_id}", kind.name())]
    Running { job_id: String, kind: JobKind },
    #[error("no job {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<JobError> for ServiceError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Running { job_id, kind } => ServiceError::JobRunning {
                message: JobError::Running {
                    job_id: job_id.clone(),
                    kind,
                }
                .to_string(),
                job_id,
                kind: kind.name(),
            },
            JobError::NotFound(_) => ServiceError::NotFound(e.to_string()),
            JobError::Store(s) => s.into(),
            JobError::Migration(m) => m.into(),
            JobError::Service(s) => s,
        }
    }
}

#[derive(Debug)]
pub struct Jobs {
    store: Arc<dyn Store>,
    migration: Arc<Migrator>,
    secrets: Arc<SecretsService>,
    faults: FaultPlan,
    /// The job this process runs, if any (the slot).
    active: Mutex<Option<JobRecord>>,
}

pub fn new_job_id() -> Result<String, JobError> {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| StoreError::Backend("the system random source failed".into()))?;
    Ok(format!("job_{}", hex::encode(b)))
}

impl Jobs {
    /// Opens the service; a job a dead process left `running` is marked
    /// `interrupted` (and its slot freed).
    pub fn open(
        store: Arc<dyn Store>,
        migration: Arc<Migrator>,
        secrets: Arc<SecretsService>,
        faults: FaultPlan,
    ) -> Result<Self, JobError> {
        let jobs = Self {
            store,
            migration,
            secrets,
            faults,
            active: Mutex::new(None),
        };
        jobs.mark_interrupted()?;
        Ok(jobs)
    }

    fn mark_interrupted(&self) -> Result<(), JobError> {
        let Some((mv, marker)) =
            get_json::<ActiveMarker>(self.store.as_ref(), Collection::Jobs, ACTIVE_ID)?
        else {
            return Ok(());
        };
        let mut ops = vec![WriteOp::delete(
            Collection::Jobs,
            ACTIVE_ID,
            Expect::Version(mv),
        )];
        if let Some((v, mut job)) =
            get_json::<JobRecord>(self.store.as_ref(), Collection::Jobs, &marker.job_id)?
            && job.state == JobState::Running
        {
            job.state = JobState::Interrupted;
            job.updated_at = format_us(now_us());
            ops.push(WriteOp::put_json(
                Collection::Jobs,
                &job.id,
                &job,
                Expect::Version(v),
            )?);
            tracing::warn!(job_id = %job.id, kind = job.kind.name(), "job interrupted by a restart; the next start resumes it");
        }
        self.store.write(ops, Durability::Durable)?;
        Ok(())
    }

    /// A job by id (with the live one's latest state).
    pub fn get(&self, id: &str) -> Result<JobRecord, JobError> {
        if let Some(j) = self.active.lock().as_ref()
            && j.id == id
        {
            return Ok(j.clone());
        }
        get_json::<JobRecord>(self.store.as_ref(), Collection::Jobs, id)?
            .map(|(_, j)| j)
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// The latest interrupted job of `kind`, if any (resumed by the next start).
    fn interrupted(&self, kind: JobKind) -> Result<Option<(u64, JobRecord)>, JobError> {
        let mut best: Option<(u64, JobRecord)> = None;
        crate::store::for_each_json::<serde_json::Value>(
            self.store.as_ref(),
            Collection::Jobs,
            |id, v, raw| {
                if id == ACTIVE_ID {
                    return Ok(());
                }
                if let Ok(j) = serde_json::from_value::<JobRecord>(raw)
                    && j.kind == kind
                    && j.state == JobState::Interrupted
                    && best
                        .as_ref()
                        .is_none_or(|(_, b)| j.started_at > b.started_at)
                {
                    best = Some((v, j));
                }
                Ok(())
            },
        )?;
        Ok(best)
    }

    /// Takes the slot for a new (or resumed) job, atomically: in this process
    /// under the lock, and in the store with the marker that must be absent.
    fn claim(
        &self,
        kind: JobKind,
        stores: &[MigrationStore],
        user_id: Option<&str>,
        actor: &str,
    ) -> Result<JobRecord, JobError> {
        let mut active = self.active.lock();
        if let Some(j) = active.as_ref() {
            return Err(JobError::Running {
                job_id: j.id.clone(),
                kind: j.kind,
            });
        }
        let now = format_us(now_us());
        let names: Vec<String> = stores.iter().map(|s| s.name().to_string()).collect();
        let (expect, job) = match self.interrupted(kind)? {
            Some((v, mut j)) if j.stores == names && j.user_id.as_deref() == user_id => {
                j.state = JobState::Running;
                j.resumed += 1;
                j.updated_at = now;
                (Expect::Version(v), j)
            }
            _ => (
                Expect::Absent,
                JobRecord {
                    id: new_job_id()?,
                    kind,
                    state: JobState::Running,
                    actor: actor.to_string(),
                    stores: names,
                    results: Vec::new(),
                    user_id: user_id.map(str::to_string),
                    marked: None,
                    error: None,
                    started_at: now.clone(),
                    updated_at: now,
                    finished_at: None,
                    resumed: 0,
                    approval_id: None,
                    operation: None,
                    result: None,
                },
            ),
        };
        let ops = vec![
            WriteOp::put_json(Collection::Jobs, &job.id, &job, expect)?,
            WriteOp::put_json(
                Collection::Jobs,
                ACTIVE_ID,
                &ActiveMarker {
                    job_id: job.id.clone(),
                },
                Expect::Absent,
            )?,
        ];
        match self.store.write(ops, Durability::Durable) {
            Ok(_) => {}
            Err(StoreError::Conflict { id, .. }) if id == ACTIVE_ID => {
                // Another process holds the slot (a shared store).
                let holder =
                    get_json::<ActiveMarker>(self.store.as_ref(), Collection::Jobs, ACTIVE_ID)?
                        .map(|(_, m)| m.job_id)
                        .unwrap_or_default();
                let kind = self.get(&holder).map_or(kind, |j| j.kind);
                return Err(JobError::Running {
                    job_id: holder,
                    kind,
                });
            }
            Err(e) => return Err(e.into()),
        }
        *active = Some(job.clone());
        Ok(job)
    }

    /// Starts a migration of `store` (a name or `all`) in the background.
    pub fn start_migration(
        self: &Arc<Self>,
        store: &str,
        actor: &str,
    ) -> Result<JobRecord, JobError> {
        let stores = MigrationStore::parse(store)?;
        let job = self.claim(JobKind::MigrationRun, &stores, None, actor)?;
        let me = self.clone();
        let running = job.clone();
        std::thread::spawn(move || {
            if let Err(e) = me.execute(running, &stores) {
                tracing::error!(error = %e, "job failed");
            }
        });
        Ok(job)
    }

    /// Runs a migration of `store` in the foreground (the CLI waits for it);
    /// the same slot as the background start.
    pub fn run_migration(&self, store: &str, actor: &str) -> Result<JobRecord, JobError> {
        let stores = MigrationStore::parse(store)?;
        let job = self.claim(JobKind::MigrationRun, &stores, None, actor)?;
        self.execute(job, &stores)
    }

    /// `aragora rotation --secrets-accessed-by=USER_ID` (not a dry run): marks
    /// the secrets as one job, in the foreground.
    pub fn run_secret_rotation(&self, user_id: &str, actor: &str) -> Result<JobRecord, JobError> {
        let mut job = self.claim(JobKind::SecretRotation, &[], Some(user_id), actor)?;
        self.faults.at(FaultPoint::JobStarted);
        let outcome = self.secrets.mark_accessed_by(user_id, false, &job.actor);
        let now = format_us(now_us());
        job.finished_at = Some(now.clone());
        job.updated_at = now;
        match outcome {
            Ok(marks) => {
                job.state = JobState::Completed;
                job.marked = Some(marks);
                self.save(&job, true)?;
                Ok(job)
            }
            Err(e) => {
                job.state = JobState::Failed;
                job.error = Some(e.to_string());
                self.save(&job, true)?;
                Err(e.into())
            }
        }
    }

    /// Records the start of an approved request's operation under `job_id`
    /// (chosen by the approval executor before it claimed the request), before
    /// anything runs: a job record that is `running` after a crash says the
    /// operation may have started; none says it did not.
    pub fn start_approved(
        &self,
        job_id: &str,
        approval_id: &str,
        operation: &str,
        actor: &str,
    ) -> Result<JobRecord, JobError> {
        let now = format_us(now_us());
        let job = JobRecord {
            id: job_id.to_string(),
            kind: JobKind::ApprovedOperation,
            state: JobState::Running,
            actor: actor.to_string(),
            stores: Vec::new(),
            results: Vec::new(),
            user_id: None,
            marked: None,
            error: None,
            started_at: now.clone(),
            updated_at: now,
            finished_at: None,
            resumed: 0,
            approval_id: Some(approval_id.to_string()),
            operation: Some(operation.to_string()),
            result: None,
        };
        self.store.write(
            vec![WriteOp::put_json(
                Collection::Jobs,
                &job.id,
                &job,
                Expect::Absent,
            )?],
            Durability::Durable,
        )?;
        Ok(job)
    }

    /// Records how an approved operation ended.
    pub fn finish_approved(
        &self,
        mut job: JobRecord,
        outcome: &Result<serde_json::Value, String>,
    ) -> Result<JobRecord, JobError> {
        let now = format_us(now_us());
        match outcome {
            Ok(v) => {
                job.state = JobState::Completed;
                job.result = Some(v.clone());
            }
            Err(e) => {
                job.state = JobState::Failed;
                job.error = Some(e.clone());
            }
        }
        job.finished_at = Some(now.clone());
        job.updated_at = now;
        self.store.write(
            vec![WriteOp::put_json(
                Collection::Jobs,
                &job.id,
                &job,
                Expect::Any,
            )?],
            Durability::Durable,
        )?;
        Ok(job)
    }

    /// A job by id, if it exists.
    pub fn find(&self, id: &str) -> Result<Option<JobRecord>, JobError> {
        match self.get(id) {
            Ok(j) => Ok(Some(j)),
            Err(JobError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn execute(
        &self,
        mut job: JobRecord,
        stores: &[MigrationStore],
    ) -> Result<JobRecord, JobError> {
        self.faults.at(FaultPoint::JobStarted);
        let mut failure = None;
        for s in stores {
            if job.results.iter().any(|r| r.store == s.name()) {
                continue;
            }
            match self.migration.run(*s, &job.actor, &|_| {}) {
                Ok(st) => {
                    job.results.push(st.view());
                    job.updated_at = format_us(now_us());
                    // Progress only: the store's own migration state is
                    // durable, and the job must still reach its end (which
                    // frees the slot).
                    if let Err(e) = self.save(&job, false) {
                        tracing::warn!(job_id = %job.id, error = %e, "job progress not saved");
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let now = format_us(now_us());
        job.state = if failure.is_some() {
            JobState::Failed
        } else {
            JobState::Completed
        };
        job.error = failure.as_ref().map(ToString::to_string);
        job.finished_at = Some(now.clone());
        job.updated_at = now;
        self.save(&job, true)?;
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(job),
        }
    }

    /// Persists the job's progress; `done` also frees the slot.
    fn save(&self, job: &JobRecord, done: bool) -> Result<(), JobError> {
        let mut ops = vec![WriteOp::put_json(
            Collection::Jobs,
            &job.id,
            job,
            Expect::Any,
        )?];
        if done {
            ops.push(WriteOp::delete(Collection::Jobs, ACTIVE_ID, Expect::Any));
        }
        let mut active = self.active.lock();
        let written = self.store.write(ops, Durability::Durable);
        *active = if done { None } else { Some(job.clone()) };
        written?;
        Ok(())
    }
}
