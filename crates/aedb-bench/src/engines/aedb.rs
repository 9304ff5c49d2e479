//! aedb through its public API only (see notes/api.md): one project and one
//! scope hold the benchmark's keys.

use std::ops::Bound;
use std::path::Path;

use aedb::{AedbConfig, AedbInstance, CommitFinality, DurabilityMode, KvView, Snapshot};
use anyhow::Result;

use super::{Engine, Mode, ReadView, ScanTotals, Session};
use crate::workloads::{Key, Value};

const PROJECT: &str = "bench";
const SCOPE: &str = "kv";

#[derive(Debug)]
pub struct AedbEngine {
    db: AedbInstance,
    finality: CommitFinality,
}

impl Engine for AedbEngine {
    type Session<'a> = AedbSession<'a>;

    fn open(dir: &Path, mode: Mode) -> Result<Self> {
        let fresh = !dir.exists();
        let (durability, finality) = match mode {
            Mode::Durable => (DurabilityMode::Full, CommitFinality::Durable),
            // Batch durability fsyncs on a timer; Visible returns once the
            // commit is applied, without waiting for that fsync.
            Mode::Relaxed => (DurabilityMode::Batch, CommitFinality::Visible),
        };
        let cfg = AedbConfig::development().with_durability(durability);
        let db = AedbInstance::open(cfg, dir)?;
        if fresh {
            db.create_project(PROJECT)?;
            db.create_scope(PROJECT, SCOPE)?;
        }
        Ok(Self { db, finality })
    }

    fn session(&self) -> Result<AedbSession<'_>> {
        Ok(AedbSession {
            engine: self,
            snapshot: None,
        })
    }

    fn close(self) -> Result<()> {
        self.db.close()?;
        Ok(())
    }
}

#[derive(Debug)]
pub struct AedbSession<'a> {
    engine: &'a AedbEngine,
    // Owned here so a view can borrow it whether or not `KvView` borrows
    // its snapshot.
    snapshot: Option<Snapshot>,
}

impl Session for AedbSession<'_> {
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

    fn put_batch(&mut self, pairs: &[(Key, Value)]) -> Result<()> {
        let db = &self.engine.db;
        let mut tx = db.begin_write(PROJECT)?;
        for (key, value) in pairs {
            tx.kv_set(SCOPE, key, value)?;
        }
        db.commit_with_finality(tx, self.engine.finality)?;
        Ok(())
    }

    fn read_view(&mut self) -> Result<AedbView<'_>> {
        let snapshot = self.snapshot.insert(self.engine.db.snapshot());
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
        Ok(self.kv.get(key).map(|v| v.len()))
    }

    fn scan(&mut self, start: &[u8], limit: usize) -> Result<ScanTotals> {
        // The API materialises the range as a Vec, so this includes building
        // it; that is what a caller of aedb pays too.
        let rows = self
            .kv
            .scan_range(Bound::Included(start), Bound::Unbounded, limit);
        Ok(ScanTotals {
            keys: rows.len() as u64,
            value_bytes: rows.iter().map(|(_, v)| v.len() as u64).sum(),
        })
    }
}
