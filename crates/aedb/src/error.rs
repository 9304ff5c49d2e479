//! The errors of the engine. `AedbError` has one variant per failure; each
//! operation family (`ReadError`, `CommitError`, `OpenError`, `BackupError`,
//! `RestoreError`) has the variants it can actually return. Every variant names
//! what went wrong and where; none carries key material or row contents.
//!
//! A variant's fields and message are written once, in `error_enum!`'s table, so
//! a family's message is the engine's by construction.

use std::path::PathBuf;

/// Declares an error enum from variant names looked up in the table below (one
/// arm per variant: its message and fields). With `catch_all = X`, it also
/// declares `narrow` (an engine error into the family; anything outside it is
/// kept, message unchanged, boxed in `X`) and `From<family> for AedbError`.
macro_rules! error_enum {
    (
        $(#[$m:meta])* $vis:vis enum $name:ident { $($v:ident),* $(,)? }
        $(catch_all { $(#[$cm:meta])* $catch:ident })?
    ) => {
        error_enum!(@acc
            [$(#[$m])* $vis enum $name]
            [$($(#[$cm])* $catch)?]
            []
            []
            $($v)*
        );
    };

    // All variants looked up: the enum, and the conversions of a family.
    (@acc [$(#[$m:meta])* $vis:vis enum $name:ident] [] [$($body:tt)*] [$($pat:tt)*]) => {
        $(#[$m])*
        #[derive(Debug, thiserror::Error)]
        $vis enum $name { $($body)* }
    };
    (@acc [$(#[$m:meta])* $vis:vis enum $name:ident] [$(#[$cm:meta])* $catch:ident]
        [$($body:tt)*] [$(($($p:tt)*))*]) => {
        $(#[$m])*
        #[derive(Debug, thiserror::Error)]
        $vis enum $name {
            $($body)*
            $(#[$cm])*
            #[error(transparent)]
            $catch(Box<AedbError>),
        }

        impl $name {
            /// This family of an engine error.
            pub(crate) fn narrow(e: AedbError) -> Self {
                match e {
                    $(AedbError::$($p)* => $name::$($p)*,)*
                    other => $name::$catch(Box::new(other)),
                }
            }
        }

        impl From<$name> for AedbError {
            fn from(e: $name) -> Self {
                match e {
                    $($name::$($p)* => AedbError::$($p)*,)*
                    $name::$catch(e) => *e,
                }
            }
        }
    };

    // The table: each arm appends one variant and its conversion pattern.
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] InvalidConfig $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("invalid configuration: {}", problems.join("; "))]
            InvalidConfig { problems: Vec<String> },
        ] [$($pat)* (InvalidConfig { problems })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] Locked $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("data directory {dir} is locked by pid {pid}")]
            Locked { dir: PathBuf, pid: String },
        ] [$($pat)* (Locked { dir, pid })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] Io $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("I/O error on {path}: {source}")]
            Io {
                path: PathBuf,
                #[source]
                source: std::io::Error,
            },
        ] [$($pat)* (Io { path, source })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] Corruption $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("corruption in {file} at byte {offset}: {reason}")]
            Corruption {
                file: PathBuf,
                offset: u64,
                reason: String,
            },
        ] [$($pat)* (Corruption { file, offset, reason })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] RolledBack $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            /// The directory does not reach a chain head recorded earlier (off the
            /// machine): a stale copy of the directory, lost frames, or another history.
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
        ] [$($pat)* (RolledBack { dir, expected, found, reason })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] KeyMismatch $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("key mismatch for {file}: {reason}")]
            KeyMismatch { file: PathBuf, reason: String },
        ] [$($pat)* (KeyMismatch { file, reason })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] Conflict $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error(
                "write-write conflict on {what}: changed by commit {committed_seq} after this transaction's snapshot {snapshot_seq}"
            )]
            Conflict {
                what: String,
                snapshot_seq: u64,
                committed_seq: u64,
            },
        ] [$($pat)* (Conflict { what, snapshot_seq, committed_seq })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] AssertionFailed $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("assertion {index} failed: {description}")]
            AssertionFailed { index: usize, description: String },
        ] [$($pat)* (AssertionFailed { index, description })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] IdempotencyKeyReused $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("idempotency key {key:?} was already used by commit {first_seq} with different writes")]
            IdempotencyKeyReused { key: String, first_seq: u64 },
        ] [$($pat)* (IdempotencyKeyReused { key, first_seq })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] LimitExceeded $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("limit exceeded: {what} is {actual}, limit {limit}")]
            LimitExceeded {
                what: &'static str,
                limit: usize,
                actual: usize,
            },
        ] [$($pat)* (LimitExceeded { what, limit, actual })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] Overloaded $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("overloaded: {reason}; retry with backoff")]
            Overloaded { reason: String },
        ] [$($pat)* (Overloaded { reason })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] PermissionDenied $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("permission denied: caller {caller:?} lacks {permission}")]
            PermissionDenied { caller: String, permission: String },
        ] [$($pat)* (PermissionDenied { caller, permission })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] Timeout $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error(
                "commit timed out after {waited_ms} ms waiting to be admitted; it was not applied and will not be"
            )]
            Timeout { waited_ms: u64 },
        ] [$($pat)* (Timeout { waited_ms })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] NotFound $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("{kind} {name:?} not found")]
            NotFound { kind: NotFoundKind, name: String },
        ] [$($pat)* (NotFound { kind, name })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] AlreadyExists $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("{kind} {name:?} already exists")]
            AlreadyExists { kind: &'static str, name: String },
        ] [$($pat)* (AlreadyExists { kind, name })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] Schema $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("schema violation in table {table:?}: {reason}")]
            Schema { table: String, reason: String },
        ] [$($pat)* (Schema { table, reason })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] InvalidArgument $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("invalid argument: {0}")]
            InvalidArgument(String),
        ] [$($pat)* (InvalidArgument(m))] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] SnapshotUnavailable $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("snapshot at seq {requested} is not available (oldest kept {oldest}, head {head})")]
            SnapshotUnavailable {
                requested: u64,
                oldest: u64,
                head: u64,
            },
        ] [$($pat)* (SnapshotUnavailable { requested, oldest, head })] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] Poisoned $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error(
                "the write-ahead log failed earlier ({0}); the instance is read-only, reopen to recover"
            )]
            Poisoned(String),
        ] [$($pat)* (Poisoned(m))] $($rest)*);
    };
    (@acc $head:tt $catch:tt [$($body:tt)*] [$($pat:tt)*] Closed $($rest:ident)*) => {
        error_enum!(@acc $head $catch [$($body)*
            #[error("the instance is closed")]
            Closed,
        ] [$($pat)* (Closed)] $($rest)*);
    };
}

error_enum! {
    /// The one error of the engine's internals, and of the calls that have no
    /// family yet (`checkpoint`, `sync`, `wait_durable`, `chain_head`, `close`).
    pub enum AedbError {
        InvalidConfig, Locked, Io, Corruption, RolledBack, KeyMismatch, Conflict,
        AssertionFailed, IdempotencyKeyReused, LimitExceeded, Overloaded, PermissionDenied,
        Timeout, NotFound, AlreadyExists, Schema, InvalidArgument, SnapshotUnavailable,
        Poisoned, Closed,
    }
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

error_enum! {
    /// What a read (`kv_get`, scans, `query`, `ReadTx`, snapshots, `project_exists`)
    /// can fail with: reads never conflict or fail an assertion. Data that is not
    /// in memory is read from the table files: `Io`, `Corruption` (a block fails
    /// authentication: never wrong data) and `KeyMismatch` come from there.
    /// `From<ReadError> for AedbError` lets `?` widen it.
    pub enum ReadError {
        NotFound, PermissionDenied, Schema, InvalidArgument, SnapshotUnavailable, Poisoned,
        Closed, Io, Corruption, KeyMismatch,
    }
    catch_all {
        /// An authorized read records a denial or a GlobalAdmin use in the audit
        /// tables before it answers; that commit failed (`Timeout`, `Io`, ...), so
        /// the read was refused. The message is the commit's.
        AuditWrite
    }
}

error_enum! {
    /// What a commit (`commit*`, `kv_set`/`kv_del`, DDL, `begin_write*` and the
    /// writes of a `WriteTransaction`) can fail with. `Io` means writing the log or
    /// the manifest failed (the instance is poisoned). `From<CommitError> for
    /// AedbError` lets `?` widen it.
    pub enum CommitError {
        Conflict, AssertionFailed, IdempotencyKeyReused, LimitExceeded, Overloaded,
        PermissionDenied, Timeout, NotFound, AlreadyExists, Schema, InvalidArgument, Io,
        Poisoned, Closed,
    }
    catch_all {
        /// An engine error no commit is expected to produce (a bug if seen; the
        /// message is the engine's).
        Internal
    }
}

/// A read inside a write transaction fails like any read; widened for `?` in
/// code that commits.
impl From<ReadError> for CommitError {
    fn from(e: ReadError) -> Self {
        CommitError::narrow(e.into())
    }
}

error_enum! {
    /// What opening a data directory (`AedbInstance::open`, `open_secure`,
    /// `open_production`) can fail with: configuration, the directory lock, the
    /// disk, and what recovery refuses. `From<OpenError> for AedbError` lets `?`
    /// widen it.
    pub enum OpenError {
        InvalidConfig, Locked, Io, Corruption, RolledBack, KeyMismatch, NotFound,
        InvalidArgument,
    }
    catch_all {
        /// Anything else the open ran into (the bootstrap commit of
        /// `with_bootstrap_admin` timing out, ...); the message is the engine's.
        Internal
    }
}

error_enum! {
    /// What taking a backup (`backup_full*`, `backup_incremental*` and their
    /// `*_as` forms) can fail with (`Corruption`: the parent of an incremental
    /// backup does not verify). `From<BackupError> for AedbError` lets `?` widen it.
    pub enum BackupError {
        Io, Corruption, KeyMismatch, NotFound, InvalidArgument, PermissionDenied, Timeout,
        Poisoned, Closed,
    }
    catch_all {
        /// An engine error no backup is expected to produce (the message is the
        /// engine's).
        Internal
    }
}

error_enum! {
    /// What verifying, discovering and restoring backups (`verify_backup_dir`,
    /// `verify_backup_chain`, `discover_chain`, `restore_from_backup_chain`) can
    /// fail with. `Corruption` and `RolledBack` mean the backup is bad; the rest
    /// mean the check could not run. `From<RestoreError> for AedbError` lets `?`
    /// widen it.
    pub enum RestoreError {
        InvalidConfig, Io, Corruption, RolledBack, KeyMismatch, NotFound, InvalidArgument,
    }
    catch_all {
        /// An engine error no restore is expected to produce (the message is the
        /// engine's).
        Internal
    }
}

pub type Result<T, E = AedbError> = std::result::Result<T, E>;
