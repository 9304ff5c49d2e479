//! The one error type of the engine. Every variant names what went wrong and where;
//! none carries key material or row contents.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AedbError {
    #[error("invalid configuration: {}", problems.join("; "))]
    InvalidConfig { problems: Vec<String> },

    #[error("data directory {dir} is locked by pid {pid}")]
    Locked { dir: PathBuf, pid: String },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("corruption in {file} at byte {offset}: {reason}")]
    Corruption {
        file: PathBuf,
        offset: u64,
        reason: String,
    },

    /// The directory does not reach a chain head recorded earlier (off the machine):
    /// a stale copy of the directory, lost frames, or another history.
    #[error(
        "{dir} is behind the expected chain head {expected} (the directory's head is {found}): {reason}"
    )]
    RolledBack {
        dir: PathBuf,
        // Boxed: every `Result` of the crate carries this enum.
        expected: Box<crate::wal::ChainHead>,
        found: Box<crate::wal::ChainHead>,
        reason: String,
    },

    #[error("key mismatch for {file}: {reason}")]
    KeyMismatch { file: PathBuf, reason: String },

    #[error(
        "write-write conflict on {what}: changed by commit {committed_seq} after this transaction's snapshot {snapshot_seq}"
    )]
    Conflict {
        what: String,
        snapshot_seq: u64,
        committed_seq: u64,
    },

    #[error("assertion {index} failed: {description}")]
    AssertionFailed { index: usize, description: String },

    #[error("idempotency key {key:?} was already used by commit {first_seq} with different writes")]
    IdempotencyKeyReused { key: String, first_seq: u64 },

    #[error("limit exceeded: {what} is {actual}, limit {limit}")]
    LimitExceeded {
        what: &'static str,
        limit: usize,
        actual: usize,
    },

    #[error("overloaded: {reason}; retry with backoff")]
    Overloaded { reason: String },

    #[error("permission denied: caller {caller:?} lacks {permission}")]
    PermissionDenied { caller: String, permission: String },

    #[error(
        "commit timed out after {waited_ms} ms waiting to be admitted; it was not applied and will not be"
    )]
    Timeout { waited_ms: u64 },

    #[error("{kind} {name:?} not found")]
    NotFound { kind: NotFoundKind, name: String },

    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },

    #[error("schema violation in table {table:?}: {reason}")]
    Schema { table: String, reason: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("snapshot at seq {requested} is not available (oldest kept {oldest}, head {head})")]
    SnapshotUnavailable {
        requested: u64,
        oldest: u64,
        head: u64,
    },

    #[error(
        "the write-ahead log failed earlier ({0}); the instance is read-only, reopen to recover"
    )]
    Poisoned(String),

    #[error("the instance is closed")]
    Closed,
}

/// What a `NotFound` error did not find; matched on by hosts (a missing project
/// is set up, a missing key is not an error), so it is typed, not a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotFoundKind {
    Project,
    Scope,
    Table,
    /// No backup in the directory a chain was to be discovered in.
    Backup,
    /// A backup names a parent that is not beside it.
    ParentBackup,
    DataDirectory,
}

impl NotFoundKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NotFoundKind::Project => "project",
            NotFoundKind::Scope => "scope",
            NotFoundKind::Table => "table",
            NotFoundKind::Backup => "backup",
            NotFoundKind::ParentBackup => "parent backup",
            NotFoundKind::DataDirectory => "data directory",
        }
    }
}

impl std::fmt::Display for NotFoundKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AedbError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AedbError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corruption(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        AedbError::Corruption {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = AedbError> = std::result::Result<T, E>;
