//! The persisted state of a migration and the views of it: which stores can
//! be migrated, the progress record (`Collection::Migrations` `migration:{store}`)
//! and what the status and dry-run answers look like. The runner
//! (`runner.rs`) is the only writer of the progress record.

use std::ops::{Deref, DerefMut};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::MigrationError;
use crate::store::{Collection, Expect, Store, StoreError, WriteOp, get_json};

/// The encrypted stores `--store=NAME` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MigrationStore {
    Secrets,
}

impl MigrationStore {
    pub const ALL: [MigrationStore; 1] = [MigrationStore::Secrets];

    pub fn name(self) -> &'static str {
        match self {
            MigrationStore::Secrets => "secrets",
        }
    }

    pub fn collection(self) -> Collection {
        match self {
            MigrationStore::Secrets => Collection::Secrets,
        }
    }

    /// `NAME` or `all`.
    pub fn parse(name: &str) -> Result<Vec<MigrationStore>, MigrationError> {
        if name == "all" {
            return Ok(Self::ALL.to_vec());
        }
        Self::ALL
            .iter()
            .find(|s| s.name() == name)
            .map(|s| vec![*s])
            .ok_or_else(|| {
                let known: Vec<_> = Self::ALL.iter().map(|s| s.name()).collect();
                MigrationError::Invalid(format!(
                    "unknown store {name:?}: one of {} or all",
                    known.join(", ")
                ))
            })
    }

    pub(super) fn state_id(self) -> String {
        format!("migration:{}", self.name())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Never ran.
    #[default]
    Idle,
    Running,
    /// Persisted `running` but no run is active in this process: killed.
    Interrupted,
    Completed,
    CompletedWithErrors,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FailedRecord {
    pub record_id: String,
    pub store: String,
    pub error: String,
}

/// The persisted progress of one store's migration: everything the status
/// shows ([`MigrationView`], through `Deref`) plus what only the runner needs.
/// The view is flattened, so the stored record is one flat JSON object.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrationState {
    #[serde(flatten)]
    progress: MigrationView,
    /// `started_at` as a number: which store's migration started last.
    pub started_at_us: Option<i64>,
}

impl Deref for MigrationState {
    type Target = MigrationView;

    fn deref(&self) -> &MigrationView {
        &self.progress
    }
}

impl DerefMut for MigrationState {
    fn deref_mut(&mut self) -> &mut MigrationView {
        &mut self.progress
    }
}

impl MigrationState {
    /// A store's state before its first run.
    pub(super) fn new(store: MigrationStore) -> Self {
        Self {
            progress: MigrationView {
                store: store.name().to_string(),
                ..MigrationView::default()
            },
            started_at_us: None,
        }
    }

    /// The stored state of `store` with its version (0 and a fresh state when
    /// none is stored).
    pub(super) fn load(
        db: &dyn Store,
        store: MigrationStore,
    ) -> Result<(u64, MigrationState), StoreError> {
        Ok(
            get_json::<MigrationState>(db, Collection::Migrations, &store.state_id())?
                .unwrap_or_else(|| (0, MigrationState::new(store))),
        )
    }

    /// The write that stores this state, whatever is stored now.
    pub(super) fn op(&self, store: MigrationStore) -> Result<WriteOp, StoreError> {
        WriteOp::put_json(Collection::Migrations, store.state_id(), self, Expect::Any)
    }

    pub fn view(&self) -> MigrationView {
        self.progress.clone()
    }
}

/// A store's migration as `GET /api/security/migration/status` and the CLI
/// show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct MigrationView {
    pub state: RunState,
    pub store: String,
    pub target_key_id: Option<String>,
    pub cursor: Option<String>,
    pub total: u64,
    pub migrated: u64,
    pub already_current: u64,
    pub failed: u64,
    pub skipped: u64,
    pub failed_records: Vec<FailedRecord>,
    pub skipped_records: Vec<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: Option<String>,
    pub resumed: u32,
}

impl MigrationView {
    /// Records done so far (the progress line's numerator).
    pub fn processed(&self) -> u64 {
        self.migrated + self.already_current + self.failed + self.skipped
    }
}

/// A record a dry run could not read the header of.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct UnreadableRecord {
    pub record_id: String,
    pub error: String,
}

/// Records under one key (dry run).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyRecords {
    pub key_id: String,
    pub version: u32,
    pub records: u64,
    pub primary: bool,
}

/// What a run would change (`--dry-run`); writes nothing.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DryRunView {
    /// Always true: tells a dry run's answer apart from a run's.
    pub dry_run: bool,
    pub store: String,
    pub primary_key_id: String,
    pub total: u64,
    pub would_change: u64,
    pub already_current: u64,
    pub unreadable: u64,
    /// The first 100.
    pub unreadable_records: Vec<UnreadableRecord>,
    pub skipped: u64,
    pub by_key: Vec<KeyRecords>,
}
