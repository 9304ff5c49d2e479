//! aedb through its public API only (see notes/api.md): one project and one
//! scope hold the benchmark's keys. Two variants: `PlainAedb` (development
//! config, no keys) and `EncryptedAedb` (production config: signed manifest,
//! AES-256-GCM WAL frames and checkpoints), otherwise identical.

use std::ops::Bound;
use std::path::{Path, PathBuf};

use aedb::{AedbConfig, AedbInstance, CommitFinality, DurabilityMode, KvView, Snapshot};
use anyhow::Result;

use super::{Checkpointed, Engine, Mode, ReadView, ScanTotals, Session};

const PROJECT: &str = "bench";
const SCOPE: &str = "kv";

/// Fixed test keys for `EncryptedAedb`: the benchmark measures what
/// encryption costs, not what it protects.
const MANIFEST_KEY: [u8; 32] = [0xa5; 32];
const CHECKPOINT_KEY: [u8; 32] = [0x5a; 32];

pub type PlainAedb = AedbEngine<false>;
pub type EncryptedAedb = AedbEngine<true>;

#[derive(Debug)]
pub struct AedbEngine<const ENCRYPTED: bool> {
    db: AedbInstance,
    finality: CommitFinality,
}

impl<const ENCRYPTED: bool> AedbEngine<ENCRYPTED> {
    /// The configuration the store is opened with; restoring a backup uses
    /// the same one.
    fn config(mode: Mode) -> Result<AedbConfig> {
        let durability = match mode {
            Mode::Durable => DurabilityMode::Full,
            Mode::Relaxed => DurabilityMode::Batch,
        };
        Ok(if ENCRYPTED {
            let cfg = AedbConfig::production(MANIFEST_KEY)
                .with_checkpoint_key(CHECKPOINT_KEY)
                .with_durability(durability);
            // Keeps this variant from silently measuring the plain engine.
            anyhow::ensure!(cfg.has_checkpoint_key() && cfg.has_manifest_key());
            cfg
        } else {
            AedbConfig::development().with_durability(durability)
        })
    }
}

impl<const ENCRYPTED: bool> Engine for AedbEngine<ENCRYPTED> {
    type Session<'a> = AedbSession<'a, ENCRYPTED>;

    fn open(dir: &Path, mode: Mode) -> Result<Self> {
        let fresh = !dir.exists();
        let finality = match mode {
            Mode::Durable => CommitFinality::Durable,
            // Batch durability fsyncs on a timer; Visible returns once the
            // commit is applied, without waiting for that fsync.
            Mode::Relaxed => CommitFinality::Visible,
        };
        // The development handle (anonymous API) also over the production
        // config: the bench measures storage and crypto, not authorization.
        let db = AedbInstance::open(Self::config(mode)?, dir)?;
        if fresh {
            db.create_project(PROJECT)?;
            db.create_scope(PROJECT, SCOPE)?;
        }
        Ok(Self { db, finality })
    }

    fn session(&self) -> Result<AedbSession<'_, ENCRYPTED>> {
        Ok(AedbSession {
            engine: self,
            snapshot: None,
        })
    }

    fn close(self) -> Result<()> {
        self.db.close()?;
        Ok(())
    }

    const CHECKPOINTS: bool = true;

    fn checkpoint(&self) -> Result<Checkpointed> {
        let info = self.db.checkpoint()?;
        Ok(Checkpointed {
            duration: info.duration,
            bytes: info.bytes,
        })
    }

    const BACKUPS: bool = true;
    const INCREMENTAL_BACKUPS: bool = true;

    fn backup_full(&self, dest: &Path) -> Result<()> {
        self.db.backup_full(dest)?;
        Ok(())
    }

    fn backup_incremental(&self, dest: &Path, parent: &Path) -> Result<()> {
        self.db.backup_incremental(dest, parent)?;
        Ok(())
    }

    fn restore_backups(chain: &[PathBuf], target: &Path) -> Result<()> {
        // Verifies every descriptor signature, member hash, parent link and
        // the WAL chain, opens the result strictly and checks its digests.
        aedb::restore_from_backup_chain(&Self::config(Mode::Durable)?, chain, target)?;
        Ok(())
    }
}

#[derive(Debug)]
pub struct AedbSession<'a, const ENCRYPTED: bool> {
    engine: &'a AedbEngine<ENCRYPTED>,
    // Owned here so a view can borrow it whether or not `KvView` borrows
    // its snapshot.
    snapshot: Option<Snapshot>,
}

impl<const ENCRYPTED: bool> Session for AedbSession<'_, ENCRYPTED> {
    type View<'v>
        = AedbView<'v>
    where
        Self: 'v;

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let db = &self.engine.db;
        let mut tx = db.begin_write(PROJECT)?;
        tx.kv_set(SCOPE, key, value)?;
        db.commit_with_finality(tx, self.engine.finality)?;
        Ok(())
    }

    fn put_batch<K: AsRef<[u8]>, V: AsRef<[u8]>>(&mut self, pairs: &[(K, V)]) -> Result<()> {
        let db = &self.engine.db;
        let mut tx = db.begin_write(PROJECT)?;
        for (key, value) in pairs {
            tx.kv_set(SCOPE, key.as_ref(), value.as_ref())?;
        }
        db.commit_with_finality(tx, self.engine.finality)?;
        Ok(())
    }

    fn read_view(&mut self) -> Result<AedbView<'_>> {
        let snapshot = self.snapshot.insert(self.engine.db.snapshot()?);
        Ok(AedbView {
            kv: snapshot.kv(PROJECT, SCOPE)?,
        })
    }
}

#[derive(Debug)]
pub struct AedbView<'s> {
    kv: KvView<'s>,
}

impl ReadView for AedbView<'_> {
    fn get_len(&mut self, key: &[u8]) -> Result<Option<usize>> {
        Ok(self.kv.get(key)?.map(|v| v.len()))
    }

    fn scan(&mut self, start: &[u8], limit: usize) -> Result<ScanTotals> {
        // The API materialises the range as a Vec, so this includes building
        // it; that is what a caller of aedb pays too.
        let rows = self
            .kv
            .scan_range(Bound::Included(start), Bound::Unbounded, limit)?;
        Ok(ScanTotals {
            keys: rows.len() as u64,
            value_bytes: rows.iter().map(|(_, v)| v.len() as u64).sum(),
        })
    }
}
