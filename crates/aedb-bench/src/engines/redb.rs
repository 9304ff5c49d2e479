//! redb 4.x with its defaults (including its default page cache), so the
//! comparison is against redb as users get it.

use std::path::Path;

use anyhow::Result;
use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, TableDefinition,
};

use super::{Engine, Mode, ReadView, ScanTotals, Session};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

#[derive(Debug)]
pub struct RedbEngine {
    db: Database,
    durability: Durability,
}

impl Engine for RedbEngine {
    type Session<'a> = RedbSession<'a>;

    fn open(dir: &Path, mode: Mode) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("bench.redb"))?;
        // Creating the table is a commit of its own; do it here so the first
        // timed commit does not pay for it.
        let tx = db.begin_write()?;
        tx.open_table(TABLE)?;
        tx.commit()?;
        let durability = match mode {
            Mode::Durable => Durability::Immediate,
            // redb 4 has no intermediate level: `None` skips the fsync and
            // the commit becomes durable with the next `Immediate` one.
            Mode::Relaxed => Durability::None,
        };
        Ok(Self { db, durability })
    }

    fn session(&self) -> Result<RedbSession<'_>> {
        Ok(RedbSession { engine: self })
    }

    fn close(self) -> Result<()> {
        drop(self.db);
        Ok(())
    }
}

#[derive(Debug)]
pub struct RedbSession<'a> {
    engine: &'a RedbEngine,
}

impl RedbSession<'_> {
    fn commit_with(
        &self,
        fill: impl FnOnce(&mut redb::Table<&[u8], &[u8]>) -> Result<()>,
    ) -> Result<()> {
        let mut tx = self.engine.db.begin_write()?;
        tx.set_durability(self.engine.durability)?;
        {
            let mut table = tx.open_table(TABLE)?;
            fill(&mut table)?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl Session for RedbSession<'_> {
    type View<'v>
        = RedbView
    where
        Self: 'v;

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.commit_with(|table| {
            table.insert(key, value)?;
            Ok(())
        })
    }

    fn put_batch<K: AsRef<[u8]>, V: AsRef<[u8]>>(&mut self, pairs: &[(K, V)]) -> Result<()> {
        self.commit_with(|table| {
            for (key, value) in pairs {
                table.insert(key.as_ref(), value.as_ref())?;
            }
            Ok(())
        })
    }

    fn read_view(&mut self) -> Result<RedbView> {
        let tx = self.engine.db.begin_read()?;
        let table = tx.open_table(TABLE)?;
        Ok(RedbView { table, _tx: tx })
    }
}

#[derive(Debug)]
pub struct RedbView {
    table: ReadOnlyTable<&'static [u8], &'static [u8]>,
    // Held so the snapshot's lifetime is explicit rather than implied by the
    // table handle's internal guard.
    _tx: ReadTransaction,
}

impl ReadView for RedbView {
    fn get_len(&mut self, key: &[u8]) -> Result<Option<usize>> {
        Ok(self.table.get(key)?.map(|v| v.value().len()))
    }

    fn scan(&mut self, start: &[u8], limit: usize) -> Result<ScanTotals> {
        let mut totals = ScanTotals::default();
        for item in self.table.range(start..)?.take(limit) {
            let (_key, value) = item?;
            totals.keys += 1;
            totals.value_bytes += value.value().len() as u64;
        }
        Ok(totals)
    }
}
