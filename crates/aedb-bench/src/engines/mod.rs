//! The contract every engine adapter implements, so each workload is written
//! once and runs identically against every engine.

pub mod aedb;
pub mod floor;
pub mod redb;
pub mod sqlite;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

/// How much a commit promises when it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The commit is on stable storage (fsync'd) before it returns.
    Durable,
    /// The commit is visible but may still be lost on power failure.
    Relaxed,
}

/// An open database. `Sync` because W2 shares one instance across threads.
pub trait Engine: Sized + Sync {
    type Session<'a>: Session
    where
        Self: 'a;

    /// Opens the store in `dir`, creating it (and its table) if missing.
    fn open(dir: &Path, mode: Mode) -> Result<Self>;

    /// A per-thread handle. Cheap for aedb and redb; SQLite needs a
    /// connection per thread, so its sessions own one.
    fn session(&self) -> Result<Self::Session<'_>>;

    /// Releases the store so it can be reopened by the same process.
    fn close(self) -> Result<()>;

    /// Whether `checkpoint` is supported (aedb only: redb and SQLite have no
    /// separate, on-demand snapshot of the whole data set to measure).
    const CHECKPOINTS: bool = false;

    /// Writes an on-demand checkpoint of the whole data set while other
    /// threads keep committing.
    fn checkpoint(&self) -> Result<Checkpointed> {
        bail!("this engine has no on-demand checkpoint")
    }

    /// Whether `backup_full` and `restore_backups` are supported (aedb and
    /// SQLite; redb has no online backup to measure).
    const BACKUPS: bool = false;

    /// Whether `backup_incremental` is supported (aedb only: SQLite's backup
    /// API always copies the whole database).
    const INCREMENTAL_BACKUPS: bool = false;

    /// Writes a consistent backup of the whole store into `dest` (absent or
    /// an empty directory) while the store stays open.
    fn backup_full(&self, _dest: &Path) -> Result<()> {
        bail!("this engine has no online backup")
    }

    /// Writes what changed since the backup in `parent` into `dest`.
    fn backup_incremental(&self, _dest: &Path, _parent: &Path) -> Result<()> {
        bail!("this engine has no incremental backup")
    }

    /// Restores the backups in `chain` (a full one, then incremental ones)
    /// into `target` (absent or empty), verifies the result and leaves a
    /// store that `open(target, Mode::Durable)` opens.
    fn restore_backups(_chain: &[PathBuf], _target: &Path) -> Result<()> {
        bail!("this engine has no backups to restore")
    }
}

/// What one on-demand checkpoint wrote, as the engine reports it.
#[derive(Clone, Copy, Debug)]
pub struct Checkpointed {
    pub duration: Duration,
    pub bytes: u64,
}

pub trait Session {
    type View<'a>: ReadView
    where
        Self: 'a;

    /// One single-key transaction, committed with the engine's mode.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()>;

    /// All pairs in one transaction, committed with the engine's mode.
    /// Generic over the pair types so W4's 100-byte and W6's 1 KiB values
    /// share the path.
    fn put_batch<K: AsRef<[u8]>, V: AsRef<[u8]>>(&mut self, pairs: &[(K, V)]) -> Result<()>;

    /// A consistent snapshot that every following read goes through.
    fn read_view(&mut self) -> Result<Self::View<'_>>;
}

pub trait ReadView {
    /// The value's length, so the engine has to produce the value.
    fn get_len(&mut self, key: &[u8]) -> Result<Option<usize>>;

    /// Reads up to `limit` pairs from `start` upwards in key order.
    fn scan(&mut self, start: &[u8], limit: usize) -> Result<ScanTotals>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanTotals {
    pub keys: u64,
    pub value_bytes: u64,
}

/// The engines a run can include. `Floor` is not a database: it is the
/// append-plus-fdatasync loop every durable commit has to pay at least once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum EngineKind {
    Aedb,
    /// aedb in its production configuration: WAL frames and checkpoints
    /// encrypted (AES-256-GCM), manifest signed.
    #[value(name = "aedb_enc", alias = "aedb-enc")]
    AedbEnc,
    Redb,
    Sqlite,
    #[value(name = "fsync_floor", alias = "floor")]
    Floor,
}

impl EngineKind {
    pub const ALL: [EngineKind; 5] = [
        Self::Aedb,
        Self::AedbEnc,
        Self::Redb,
        Self::Sqlite,
        Self::Floor,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Aedb => "aedb",
            Self::AedbEnc => "aedb_enc",
            Self::Redb => "redb",
            Self::Sqlite => "sqlite",
            Self::Floor => "fsync_floor",
        }
    }
}

/// Runs `$body` with `$E` bound to the adapter type for `$kind`, so generic
/// workload code is monomorphised per engine instead of going through `dyn`.
#[macro_export]
macro_rules! with_engine {
    ($kind:expr, $E:ident => $body:expr) => {
        match $kind {
            $crate::engines::EngineKind::Aedb => {
                type $E = $crate::engines::aedb::PlainAedb;
                $body
            }
            $crate::engines::EngineKind::AedbEnc => {
                type $E = $crate::engines::aedb::EncryptedAedb;
                $body
            }
            $crate::engines::EngineKind::Redb => {
                type $E = $crate::engines::redb::RedbEngine;
                $body
            }
            $crate::engines::EngineKind::Sqlite => {
                type $E = $crate::engines::sqlite::SqliteEngine;
                $body
            }
            $crate::engines::EngineKind::Floor => Err(::anyhow::anyhow!(
                "the fsync floor is not a database engine"
            )),
        }
    };
}
