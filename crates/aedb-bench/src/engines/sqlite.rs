//! SQLite (bundled) in WAL mode with a `WITHOUT ROWID` table, which is the
//! layout a careful user would pick for a key-value store.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, Statement, params};

use super::{Engine, Mode, ReadView, ScanTotals, Session};

const INSERT: &str = "INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)";
const GET: &str = "SELECT v FROM kv WHERE k = ?1";
const SCAN: &str = "SELECT v FROM kv WHERE k >= ?1 ORDER BY k LIMIT ?2";
const FILE: &str = "bench.sqlite";

#[derive(Debug)]
pub struct SqliteEngine {
    path: PathBuf,
    mode: Mode,
    // The connection used to create the schema, handed to the first session
    // so single-threaded workloads never pay for a second open.
    spare: Mutex<Option<Connection>>,
}

impl SqliteEngine {
    fn connect(&self) -> Result<Connection> {
        connect(&self.path, self.mode)
    }
}

fn connect(path: &Path, mode: Mode) -> Result<Connection> {
    let conn = Connection::open(path)?;
    // W2 runs 16 writers on separate connections; without a generous busy
    // timeout they would fail with SQLITE_BUSY instead of queueing.
    conn.busy_timeout(Duration::from_secs(120))?;
    let journal: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !journal.eq_ignore_ascii_case("wal") {
        return Err(anyhow!("SQLite refused WAL mode (got {journal})"));
    }
    let synchronous = match mode {
        Mode::Durable => "FULL",
        Mode::Relaxed => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    Ok(conn)
}

impl Engine for SqliteEngine {
    type Session<'a> = SqliteSession;

    fn open(dir: &Path, mode: Mode) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let conn = connect(&path, mode)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID",
        )?;
        Ok(Self {
            path,
            mode,
            spare: Mutex::new(Some(conn)),
        })
    }

    fn session(&self) -> Result<SqliteSession> {
        let spare = self
            .spare
            .lock()
            .map_err(|_| anyhow!("sqlite spare-connection lock poisoned"))?
            .take();
        let conn = match spare {
            Some(conn) => conn,
            None => self.connect()?,
        };
        Ok(SqliteSession { conn })
    }

    fn close(self) -> Result<()> {
        let spare = self
            .spare
            .into_inner()
            .map_err(|_| anyhow!("sqlite spare-connection lock poisoned"))?;
        if let Some(conn) = spare {
            conn.close().map_err(|(_, e)| e)?;
        }
        Ok(())
    }

    const BACKUPS: bool = true;

    /// The online backup API into `dest/bench.sqlite`, all pages in one
    /// step: it holds a read transaction on the source for the whole copy,
    /// so the copy is one consistent snapshot (writers can still commit to
    /// the WAL meanwhile).
    fn backup_full(&self, dest: &Path) -> Result<()> {
        let source = self.connect()?;
        std::fs::create_dir_all(dest)?;
        let target = dest.join(FILE);
        ensure!(!target.exists(), "{} already exists", target.display());
        // The destination keeps SQLite's defaults (rollback journal,
        // synchronous=FULL), so the finished copy is on stable storage.
        let mut copy = Connection::open(&target)?;
        {
            let backup = Backup::new(&source, &mut copy)?;
            match backup.step(-1)? {
                StepResult::Done => {}
                other => return Err(anyhow!("backup step ended with {other:?}")),
            }
        }
        copy.close().map_err(|(_, e)| e)?;
        source.close().map_err(|(_, e)| e)?;
        Ok(())
    }

    /// Restore: copy the backup file into place, open it as the engine
    /// does, and run a full `PRAGMA integrity_check`.
    fn restore_backups(chain: &[PathBuf], target: &Path) -> Result<()> {
        let [full] = chain else {
            return Err(anyhow!("SQLite restores exactly one full backup"));
        };
        std::fs::create_dir_all(target)?;
        let path = target.join(FILE);
        ensure!(!path.exists(), "{} already exists", path.display());
        std::fs::copy(full.join(FILE), &path)?;
        let conn = connect(&path, Mode::Durable)?;
        let verdict: String = conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
        ensure!(verdict == "ok", "integrity_check after restore: {verdict}");
        conn.close().map_err(|(_, e)| e)?;
        Ok(())
    }
}

#[derive(Debug)]
pub struct SqliteSession {
    conn: Connection,
}

impl SqliteSession {
    /// Cached statements rather than `Transaction`, whose BEGIN/COMMIT are
    /// re-parsed every time: that parse is a visible share of a non-fsync
    /// commit (W3) and would penalise SQLite for the harness's sake.
    fn in_write_txn(&self, fill: impl FnOnce(&mut Statement<'_>) -> Result<()>) -> Result<()> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let filled = self
            .conn
            .prepare_cached(INSERT)
            .map_err(anyhow::Error::from)
            .and_then(|mut insert| fill(&mut insert));
        match filled {
            Ok(()) => {
                self.conn.prepare_cached("COMMIT")?.execute([])?;
                Ok(())
            }
            Err(e) => {
                // Best effort: the run is already failing with `e`.
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

impl Session for SqliteSession {
    type View<'v>
        = SqliteView<'v>
    where
        Self: 'v;

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.in_write_txn(|insert| {
            insert.execute(params![key, value])?;
            Ok(())
        })
    }

    fn put_batch<K: AsRef<[u8]>, V: AsRef<[u8]>>(&mut self, pairs: &[(K, V)]) -> Result<()> {
        self.in_write_txn(|insert| {
            for (key, value) in pairs {
                insert.execute(params![key.as_ref(), value.as_ref()])?;
            }
            Ok(())
        })
    }

    fn read_view(&mut self) -> Result<SqliteView<'_>> {
        // A deferred BEGIN pins the WAL snapshot at the first read and keeps
        // it until COMMIT, which matches the other engines' snapshots.
        self.conn.execute_batch("BEGIN")?;
        Ok(SqliteView {
            conn: &self.conn,
            get: self.conn.prepare(GET)?,
            scan: self.conn.prepare(SCAN)?,
        })
    }
}

#[derive(Debug)]
pub struct SqliteView<'c> {
    conn: &'c Connection,
    get: Statement<'c>,
    scan: Statement<'c>,
}

impl ReadView for SqliteView<'_> {
    fn get_len(&mut self, key: &[u8]) -> Result<Option<usize>> {
        let mut rows = self.get.query([key])?;
        match rows.next()? {
            Some(row) => Ok(Some(row.get_ref(0)?.as_blob()?.len())),
            None => Ok(None),
        }
    }

    fn scan(&mut self, start: &[u8], limit: usize) -> Result<ScanTotals> {
        let limit = i64::try_from(limit)?;
        let mut rows = self.scan.query(params![start, limit])?;
        let mut totals = ScanTotals::default();
        while let Some(row) = rows.next()? {
            totals.keys += 1;
            totals.value_bytes += row.get_ref(0)?.as_blob()?.len() as u64;
        }
        Ok(totals)
    }
}

impl Drop for SqliteView<'_> {
    fn drop(&mut self) {
        // Ending a read-only transaction cannot lose data; an error here only
        // means the transaction was already gone.
        let _ = self.conn.execute_batch("COMMIT");
    }
}
