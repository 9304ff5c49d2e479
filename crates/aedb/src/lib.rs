//! aedb: an embedded, transactional database with a hash-chained, CRC-checked
//! write-ahead log, group commit and crash-safe recovery.
//!
//! See `FORMAT.md` for the on-disk format and the README for the operational model.

pub mod audit;
pub mod authz;
pub mod backup;
pub mod check;
pub(crate) mod checkpoint;
pub mod config;
pub(crate) mod crypto;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod instance;
mod lock;
pub(crate) mod lsm;
#[cfg(test)]
mod lsm_tests;
pub(crate) mod manifest;
pub mod metrics;
pub(crate) mod model;
pub(crate) mod open;
pub(crate) mod record;
pub mod storage;
mod table;
pub(crate) mod tableset;
pub mod txn;
pub mod wal;

pub use audit::{AuditExport, AuditVerifyError, verify_audit_export};
pub use authz::{CallerContext, Grant, Permission};
pub use backup::{
    BackupDescriptor, BackupProgress, BackupReport, ChainReport, RestoreReport, discover_chain,
    restore_from_backup_chain, verify_backup_chain,
};
pub use check::{CheckResult, InspectReport, KeyspaceDigest, inspect};
pub use config::{AedbConfig, CommitFinality, DurabilityMode, Limits, RecoveryMode, SecretKey};
pub use error::{
    AedbError, BackupError, CommitError, NotFoundKind, OpenError, ReadError, RestoreError,
};
pub use instance::{AedbInstance, CheckpointInfo, CommitResult, Dev, ReadTx, Secure};
pub use metrics::{CallerAlertCounters, LatencySummary, OperationalMetrics};
pub use model::bytes::Bytes as Key;
pub use model::value::{Column, ColumnType, Row, TableSchema, Value};
pub use record::DdlOperation;
pub use storage::{FaultKind, FaultPlan, FaultStorage, OsStorage, Storage};
pub use txn::assertion::{CompareOp, ReadAssertion};
pub use txn::query::{Filter, Query, QueryResult};
pub use txn::snapshot::{
    ConsistencyMode, KvPair, KvView, Snapshot, TableView, Versioned, VersionedKvPair,
};
pub use txn::write::WriteTransaction;
pub use wal::{ChainHead, DroppedTail, RecoveryReport, TornTail};
