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

/// What a read (`kv_get`, scans, `query`, `ReadTx`, snapshots, `project_exists`)
/// can fail with: reads never conflict, fail an assertion or touch the disk. The
/// messages are those of the `AedbError` variants of the same names, and
/// `From<ReadError> for AedbError` lets `?` widen it.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: NotFoundKind, name: String },

    #[error("permission denied: caller {caller:?} lacks {permission}")]
    PermissionDenied { caller: String, permission: String },

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

    /// An authorized read records a denial or a GlobalAdmin use in the audit
    /// tables before it answers; that commit failed (`Timeout`, `Io`, ...), so the
    /// read was refused. The message is the commit's.
    #[error(transparent)]
    AuditWrite(Box<AedbError>),
}

impl ReadError {
    /// The read family of an engine error. Reads run in memory: the variants
    /// outside the family come only from committing the read's audit row.
    pub(crate) fn narrow(e: AedbError) -> Self {
        match e {
            AedbError::NotFound { kind, name } => ReadError::NotFound { kind, name },
            AedbError::PermissionDenied { caller, permission } => {
                ReadError::PermissionDenied { caller, permission }
            }
            AedbError::Schema { table, reason } => ReadError::Schema { table, reason },
            AedbError::InvalidArgument(m) => ReadError::InvalidArgument(m),
            AedbError::SnapshotUnavailable {
                requested,
                oldest,
                head,
            } => ReadError::SnapshotUnavailable {
                requested,
                oldest,
                head,
            },
            AedbError::Poisoned(m) => ReadError::Poisoned(m),
            AedbError::Closed => ReadError::Closed,
            other @ (AedbError::InvalidConfig { .. }
            | AedbError::Locked { .. }
            | AedbError::Io { .. }
            | AedbError::Corruption { .. }
            | AedbError::RolledBack { .. }
            | AedbError::KeyMismatch { .. }
            | AedbError::Conflict { .. }
            | AedbError::AssertionFailed { .. }
            | AedbError::IdempotencyKeyReused { .. }
            | AedbError::LimitExceeded { .. }
            | AedbError::Overloaded { .. }
            | AedbError::Timeout { .. }
            | AedbError::AlreadyExists { .. }) => ReadError::AuditWrite(Box::new(other)),
        }
    }
}

impl From<ReadError> for AedbError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::NotFound { kind, name } => AedbError::NotFound { kind, name },
            ReadError::PermissionDenied { caller, permission } => {
                AedbError::PermissionDenied { caller, permission }
            }
            ReadError::Schema { table, reason } => AedbError::Schema { table, reason },
            ReadError::InvalidArgument(m) => AedbError::InvalidArgument(m),
            ReadError::SnapshotUnavailable {
                requested,
                oldest,
                head,
            } => AedbError::SnapshotUnavailable {
                requested,
                oldest,
                head,
            },
            ReadError::Poisoned(m) => AedbError::Poisoned(m),
            ReadError::Closed => AedbError::Closed,
            ReadError::AuditWrite(e) => *e,
        }
    }
}

/// What a commit (`commit*`, `kv_set`/`kv_del`, DDL, `begin_write*` and the
/// writes of a `WriteTransaction`) can fail with. The messages are those of the
/// `AedbError` variants of the same names, and `From<CommitError> for AedbError`
/// lets `?` widen it.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
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

    /// Writing the log or the manifest failed; the instance is poisoned.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "the write-ahead log failed earlier ({0}); the instance is read-only, reopen to recover"
    )]
    Poisoned(String),

    #[error("the instance is closed")]
    Closed,

    /// An engine error no commit is expected to produce (a bug if seen; the
    /// message is the engine's).
    #[error(transparent)]
    Internal(Box<AedbError>),
}

impl CommitError {
    /// The commit family of an engine error.
    pub(crate) fn narrow(e: AedbError) -> Self {
        match e {
            AedbError::Conflict {
                what,
                snapshot_seq,
                committed_seq,
            } => CommitError::Conflict {
                what,
                snapshot_seq,
                committed_seq,
            },
            AedbError::AssertionFailed { index, description } => {
                CommitError::AssertionFailed { index, description }
            }
            AedbError::IdempotencyKeyReused { key, first_seq } => {
                CommitError::IdempotencyKeyReused { key, first_seq }
            }
            AedbError::LimitExceeded {
                what,
                limit,
                actual,
            } => CommitError::LimitExceeded {
                what,
                limit,
                actual,
            },
            AedbError::Overloaded { reason } => CommitError::Overloaded { reason },
            AedbError::PermissionDenied { caller, permission } => {
                CommitError::PermissionDenied { caller, permission }
            }
            AedbError::Timeout { waited_ms } => CommitError::Timeout { waited_ms },
            AedbError::NotFound { kind, name } => CommitError::NotFound { kind, name },
            AedbError::AlreadyExists { kind, name } => CommitError::AlreadyExists { kind, name },
            AedbError::Schema { table, reason } => CommitError::Schema { table, reason },
            AedbError::InvalidArgument(m) => CommitError::InvalidArgument(m),
            AedbError::Io { path, source } => CommitError::Io { path, source },
            AedbError::Poisoned(m) => CommitError::Poisoned(m),
            AedbError::Closed => CommitError::Closed,
            other @ (AedbError::InvalidConfig { .. }
            | AedbError::Locked { .. }
            | AedbError::Corruption { .. }
            | AedbError::RolledBack { .. }
            | AedbError::KeyMismatch { .. }
            | AedbError::SnapshotUnavailable { .. }) => CommitError::Internal(Box::new(other)),
        }
    }
}

impl From<CommitError> for AedbError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Conflict {
                what,
                snapshot_seq,
                committed_seq,
            } => AedbError::Conflict {
                what,
                snapshot_seq,
                committed_seq,
            },
            CommitError::AssertionFailed { index, description } => {
                AedbError::AssertionFailed { index, description }
            }
            CommitError::IdempotencyKeyReused { key, first_seq } => {
                AedbError::IdempotencyKeyReused { key, first_seq }
            }
            CommitError::LimitExceeded {
                what,
                limit,
                actual,
            } => AedbError::LimitExceeded {
                what,
                limit,
                actual,
            },
            CommitError::Overloaded { reason } => AedbError::Overloaded { reason },
            CommitError::PermissionDenied { caller, permission } => {
                AedbError::PermissionDenied { caller, permission }
            }
            CommitError::Timeout { waited_ms } => AedbError::Timeout { waited_ms },
            CommitError::NotFound { kind, name } => AedbError::NotFound { kind, name },
            CommitError::AlreadyExists { kind, name } => AedbError::AlreadyExists { kind, name },
            CommitError::Schema { table, reason } => AedbError::Schema { table, reason },
            CommitError::InvalidArgument(m) => AedbError::InvalidArgument(m),
            CommitError::Io { path, source } => AedbError::Io { path, source },
            CommitError::Poisoned(m) => AedbError::Poisoned(m),
            CommitError::Closed => AedbError::Closed,
            CommitError::Internal(e) => *e,
        }
    }
}

/// A read inside a write transaction fails like any read; widened for `?` in
/// code that commits.
impl From<ReadError> for CommitError {
    fn from(e: ReadError) -> Self {
        CommitError::narrow(e.into())
    }
}

pub type Result<T, E = AedbError> = std::result::Result<T, E>;

/// `narrow` (engine error -> family, anything outside the family boxed in
/// `Internal`) and `From<family> for AedbError` for a family whose variants
/// carry the same fields as the `AedbError` variants of the same names.
macro_rules! family_conversions {
    ($family:ident { $($v:ident $({ $($f:ident),* })? $(( $t:ident ))?),* $(,)? }) => {
        impl $family {
            #[allow(dead_code)]
            pub(crate) fn narrow(e: AedbError) -> Self {
                match e {
                    $(AedbError::$v $({ $($f),* })? $(($t))? => $family::$v $({ $($f),* })? $(($t))?,)*
                    other => $family::Internal(Box::new(other)),
                }
            }
        }

        impl From<$family> for AedbError {
            fn from(e: $family) -> Self {
                match e {
                    $($family::$v $({ $($f),* })? $(($t))? => AedbError::$v $({ $($f),* })? $(($t))?,)*
                    $family::Internal(e) => *e,
                }
            }
        }
    };
}

/// What opening a data directory (`AedbInstance::open`, `open_secure`,
/// `open_production`) can fail with: configuration, the directory lock, the disk,
/// and what recovery refuses. The messages are those of the `AedbError` variants
/// of the same names, and `From<OpenError> for AedbError` lets `?` widen it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
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

    #[error(
        "{dir} is behind the expected chain head {expected} (the directory's head is {found}): {reason}"
    )]
    RolledBack {
        dir: PathBuf,
        expected: Box<crate::wal::ChainHead>,
        found: Box<crate::wal::ChainHead>,
        reason: String,
    },

    #[error("key mismatch for {file}: {reason}")]
    KeyMismatch { file: PathBuf, reason: String },

    #[error("{kind} {name:?} not found")]
    NotFound { kind: NotFoundKind, name: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Anything else the open ran into (the bootstrap commit of
    /// `with_bootstrap_admin` timing out, ...); the message is the engine's.
    #[error(transparent)]
    Internal(Box<AedbError>),
}

family_conversions!(OpenError {
    InvalidConfig { problems },
    Locked { dir, pid },
    Io { path, source },
    Corruption { file, offset, reason },
    RolledBack { dir, expected, found, reason },
    KeyMismatch { file, reason },
    NotFound { kind, name },
    InvalidArgument(m),
});

/// What taking a backup (`backup_full*`, `backup_incremental*` and their `*_as`
/// forms) can fail with. The messages are those of the `AedbError` variants of
/// the same names, and `From<BackupError> for AedbError` lets `?` widen it.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The parent of an incremental backup does not verify.
    #[error("corruption in {file} at byte {offset}: {reason}")]
    Corruption {
        file: PathBuf,
        offset: u64,
        reason: String,
    },

    #[error("key mismatch for {file}: {reason}")]
    KeyMismatch { file: PathBuf, reason: String },

    #[error("{kind} {name:?} not found")]
    NotFound { kind: NotFoundKind, name: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("permission denied: caller {caller:?} lacks {permission}")]
    PermissionDenied { caller: String, permission: String },

    #[error(
        "commit timed out after {waited_ms} ms waiting to be admitted; it was not applied and will not be"
    )]
    Timeout { waited_ms: u64 },

    #[error(
        "the write-ahead log failed earlier ({0}); the instance is read-only, reopen to recover"
    )]
    Poisoned(String),

    #[error("the instance is closed")]
    Closed,

    /// An engine error no backup is expected to produce (the message is the
    /// engine's).
    #[error(transparent)]
    Internal(Box<AedbError>),
}

family_conversions!(BackupError {
    Io { path, source },
    Corruption { file, offset, reason },
    KeyMismatch { file, reason },
    NotFound { kind, name },
    InvalidArgument(m),
    PermissionDenied { caller, permission },
    Timeout { waited_ms },
    Poisoned(m),
    Closed,
});

/// What verifying, discovering and restoring backups (`verify_backup_dir`,
/// `verify_backup_chain`, `discover_chain`, `restore_from_backup_chain`) can fail
/// with. `Corruption` and `RolledBack` mean the backup is bad; the rest mean the
/// check could not run. The messages are those of the `AedbError` variants of
/// the same names, and `From<RestoreError> for AedbError` lets `?` widen it.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid configuration: {}", problems.join("; "))]
    InvalidConfig { problems: Vec<String> },

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

    #[error(
        "{dir} is behind the expected chain head {expected} (the directory's head is {found}): {reason}"
    )]
    RolledBack {
        dir: PathBuf,
        expected: Box<crate::wal::ChainHead>,
        found: Box<crate::wal::ChainHead>,
        reason: String,
    },

    #[error("key mismatch for {file}: {reason}")]
    KeyMismatch { file: PathBuf, reason: String },

    #[error("{kind} {name:?} not found")]
    NotFound { kind: NotFoundKind, name: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An engine error no restore is expected to produce (the message is the
    /// engine's).
    #[error(transparent)]
    Internal(Box<AedbError>),
}

family_conversions!(RestoreError {
    InvalidConfig { problems },
    Io { path, source },
    Corruption { file, offset, reason },
    RolledBack { dir, expected, found, reason },
    KeyMismatch { file, reason },
    NotFound { kind, name },
    InvalidArgument(m),
});
