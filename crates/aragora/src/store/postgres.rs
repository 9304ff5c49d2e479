//! The shared store (scale-out): every record in PostgreSQL, so several
//! `aragora serve` replicas and the offline operator commands work on one
//! state. Values are the bytes the domain code hands over (secrets are already
//! envelope-encrypted by aragora), so PostgreSQL never sees plaintext.
//!
//! Layout: one table `aragora_records (collection, id, version, value)` keyed
//! by `(collection, id)`, ids in the `"C"` collation so range scans run in byte
//! order like the embedded store's, and one sequence: each write draws one
//! number and every record it puts gets it as version (`Receipt::seq`), so
//! versions grow across the whole store.
//!
//! A write is one call of the `aragora_apply` function (migration 2), so one
//! statement, one transaction (READ COMMITTED) and one round trip whatever
//! the batch holds. Each expectation is checked by the statement that applies
//! it (`INSERT .. ON CONFLICT DO NOTHING` for absent, `UPDATE .. WHERE
//! version = v` for a version), which waits for a concurrent writer of the
//! same row and then re-checks against what it committed: compare-and-set
//! across processes without a serializable isolation level. A failed
//! expectation raises, so nothing of the batch applies. Rows are written in
//! one global order (collection, id), so two batches never deadlock on each
//! other; a deadlock or serialization failure from elsewhere is retried with
//! a fresh call.
//!
//! Commits are synchronous (PostgreSQL's default `synchronous_commit = on`):
//! `Durability::Visible` is durable too and `wait_durable` has nothing left to
//! wait for.
//!
//! The client is async (tokio-postgres with a deadpool pool) and runs on a small
//! runtime owned by the store; the `Store` methods hand their work to it and
//! wait on a channel. That keeps them callable from any thread, a blocking
//! thread or an async task alike, without "cannot start a runtime from within
//! a runtime".

use std::fmt;
use std::future::Future;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Config as PgConfig, NoTls};

use super::{
    Collection, Durability, Expect, ListQuery, Receipt, Record, Store, StoreError, WriteOp,
};

/// The migrations, in order: `(version, description, SQL)`. Forward only: a
/// released entry is never edited, a change is a new entry.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "records and the version sequence",
        r#"
    CREATE SEQUENCE aragora_version_seq AS bigint;
    CREATE TABLE aragora_records (
        collection text COLLATE "C" NOT NULL,
        id text COLLATE "C" NOT NULL,
        version bigint NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (collection, id)
    );
    "#,
    ),
    (
        2,
        "aragora_apply: a write batch in one statement",
        // A batch applied by one call, so a write is one round trip and one
        // statement's worth of server work instead of BEGIN, nextval, one
        // statement per op and COMMIT. Ops apply in array order; an
        // expectation that fails raises AR001 (the record exists) or AR002
        // (absent, or at another version) with the op's 1-based index as the
        // message, which aborts the statement and so the whole batch.
        r#"
    CREATE FUNCTION aragora_apply(
        kinds smallint[], cols text[], ids text[], vals bytea[], expected bigint[]
    ) RETURNS bigint LANGUAGE plpgsql AS $fn$
    DECLARE
        seq bigint := nextval('aragora_version_seq');
        n bigint;
    BEGIN
        FOR i IN 1 .. coalesce(array_length(kinds, 1), 0) LOOP
            CASE kinds[i]
            WHEN 0 THEN
                INSERT INTO aragora_records (collection, id, version, value)
                VALUES (cols[i], ids[i], seq, vals[i])
                ON CONFLICT (collection, id)
                DO UPDATE SET version = EXCLUDED.version, value = EXCLUDED.value;
            WHEN 1 THEN
                INSERT INTO aragora_records (collection, id, version, value)
                VALUES (cols[i], ids[i], seq, vals[i])
                ON CONFLICT (collection, id) DO NOTHING;
                GET DIAGNOSTICS n = ROW_COUNT;
                IF n = 0 THEN
                    RAISE EXCEPTION USING ERRCODE = 'AR001', MESSAGE = i::text;
                END IF;
            WHEN 2 THEN
                UPDATE aragora_records SET version = seq, value = vals[i]
                WHERE collection = cols[i] AND id = ids[i] AND version = expected[i];
                GET DIAGNOSTICS n = ROW_COUNT;
                IF n = 0 THEN
                    RAISE EXCEPTION USING ERRCODE = 'AR002', MESSAGE = i::text;
                END IF;
            WHEN 3 THEN
                DELETE FROM aragora_records WHERE collection = cols[i] AND id = ids[i];
            WHEN 4 THEN
                DELETE FROM aragora_records WHERE collection = cols[i] AND id = ids[i];
                GET DIAGNOSTICS n = ROW_COUNT;
                IF n > 0 THEN
                    RAISE EXCEPTION USING ERRCODE = 'AR001', MESSAGE = i::text;
                END IF;
            WHEN 5 THEN
                DELETE FROM aragora_records
                WHERE collection = cols[i] AND id = ids[i] AND version = expected[i];
                GET DIAGNOSTICS n = ROW_COUNT;
                IF n = 0 THEN
                    RAISE EXCEPTION USING ERRCODE = 'AR002', MESSAGE = i::text;
                END IF;
            ELSE
                RAISE EXCEPTION 'aragora_apply: unknown op kind %', kinds[i];
            END CASE;
        END LOOP;
        RETURN seq;
    END
    $fn$;
    "#,
    ),
];

/// The newest schema this binary knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// `pg_advisory_xact_lock` key of the migrations ("aragora" in ASCII): replicas
/// booting at once migrate one after the other.
const MIGRATION_LOCK: i64 = 0x0061_7261_676f_7261;

/// `ARAGORA_DATABASE_POOL_SIZE`'s default.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// A batch that keeps losing to deadlocks or serialization failures is
/// reported after this many fresh attempts.
const WRITE_RETRIES: usize = 8;

/// How long a call waits for a connection, and a connection for the server.
const POOL_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PostgresStore {
    pool: Pool,
    /// Runs the pool's connections; `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    /// `host:port/dbname` for messages: never the password.
    target: String,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // A runtime dropped inside another (the last `Arc` released by an
        // async task) would panic waiting for its workers.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Where a URL points, without its credentials.
pub fn describe_url(url: &str) -> Result<String, StoreError> {
    let config: PgConfig = url.parse().map_err(|e| {
        StoreError::Backend(format!(
            "DATABASE_URL is not a PostgreSQL connection string ({e})"
        ))
    })?;
    Ok(describe(&config))
}

fn describe(config: &PgConfig) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                Host::Tcp(h) => h.clone(),
                Host::Unix(p) => p.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let host = if hosts.is_empty() {
        "localhost".to_string()
    } else {
        hosts.join(",")
    };
    format!(
        "{host}/{}",
        config.get_dbname().unwrap_or("(default database)")
    )
}

impl PostgresStore {
    /// Connects to `url` (a `postgres://` URL or key=value string) with at
    /// most `pool_size` connections, and brings the schema up to date under an
    /// advisory lock. Refuses a database whose schema is newer than this
    /// binary's.
    pub fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        Self::connect_with(url, pool_size, None)
    }

    /// `connect`, with the roots for TLS (`ARAGORA_DATABASE_CA_FILE`) when the
    /// connection string's `sslmode` asks for it (`postgres_tls`).
    pub fn connect_with(
        url: &str,
        pool_size: usize,
        ca_file: Option<&std::path::PathBuf>,
    ) -> Result<Self, StoreError> {
        let (tls_mode, url) = super::postgres_tls::tls_mode(url)?;
        let mut config: PgConfig = url.parse().map_err(|e| {
            StoreError::Backend(format!(
                "DATABASE_URL is not a PostgreSQL connection string ({e})"
            ))
        })?;
        let target = describe(&config);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("aragora");
        }

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("aragora-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("starting the PostgreSQL client: {e}")))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match super::postgres_tls::connector(tls_mode, ca_file)? {
            Some(tls) => Manager::from_config(config, tls, manager_config),
            None => Manager::from_config(config, NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            // Every query of this store reads by primary key (a record or a
            // range of one collection). A statement prepared while the table
            // was small keeps the plan those statistics gave until the next
            // autoanalyze: measured, `get_many` ran as a sequential scan of the
            // whole (growing) table, 0.5 ms a call. Without sequential scans
            // the index is used whatever the statistics said. A SET after
            // connecting, not a startup option: PgBouncer refuses those.
            .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                Box::pin(async move {
                    client
                        .batch_execute("SET enable_seqscan = off")
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)
                })
            }))
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(format!("PostgreSQL pool for {target}: {e}")))?;
        let store = Self {
            pool,
            rt: Some(rt),
            target,
        };
        store.migrate()?;
        tracing::info!(
            database = %store.target,
            schema = SCHEMA_VERSION,
            tls = tls_mode.name(),
            "PostgreSQL store open"
        );
        Ok(store)
    }

    /// `host:port/dbname` (no credentials).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Runs `f` on the store's runtime and waits for it from this thread.
    fn run<T, F>(&self, f: impl FnOnce(Pool, String) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the PostgreSQL store is closing".into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = f(self.pool.clone(), self.target.clone());
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| {
            StoreError::Unavailable(format!(
                "the PostgreSQL client task for {} stopped",
                self.target
            ))
        })?
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.run(|pool, target| async move {
            let mut client = pool.get().await.map_err(|e| pool_err(e, &target))?;
            let tx = client
                .transaction()
                .await
                .map_err(|e| pg_err(e, &target, None))?;
            let e = |err| pg_err(err, &target, None);
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(e)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS aragora_schema_migrations (
                    version bigint PRIMARY KEY,
                    description text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )",
            )
            .await
            .map_err(e)?;
            let current: Option<i64> = tx
                .query_one("SELECT max(version) FROM aragora_schema_migrations", &[])
                .await
                .map_err(e)?
                .get(0);
            let current = current.unwrap_or(0);
            if current > SCHEMA_VERSION {
                return Err(StoreError::Backend(format!(
                    "the database {target} has schema version {current}, newer than this \
                     aragora knows ({SCHEMA_VERSION}): run a release that knows it \
                     (schema changes are forward-only)"
                )));
            }
            for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
                tx.batch_execute(sql).await.map_err(e)?;
                tx.execute(
                    "INSERT INTO aragora_schema_migrations (version, description) VALUES ($1, $2)",
                    &[version, description],
                )
                .await
                .map_err(e)?;
                tracing::info!(database = %target, version, description, "schema migration applied");
            }
            tx.commit().await.map_err(e)?;
            Ok(())
        })
    }
}

/// A pool failure: the server cannot be reached (or the pool is exhausted).
fn pool_err(e: PoolError, target: &str) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_err(e, target, None),
        other => StoreError::Unavailable(format!("PostgreSQL at {target}: {other}")),
    }
}

/// A database error, with the record it concerns when there is one: a
/// conflict (serialization failure, deadlock, unique violation) names it; a
/// lost connection is `Unavailable` naming the server.
fn pg_err(
    e: tokio_postgres::Error,
    target: &str,
    record: Option<(Collection, &str)>,
) -> StoreError {
    if let Some(code) = e.code() {
        let conflict = [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::UNIQUE_VIOLATION,
        ];
        if conflict.contains(code) {
            let (collection, id) = record
                .map(|(c, id)| (c.name(), id))
                .unwrap_or(("aragora_records", "(batch)"));
            return StoreError::Conflict {
                collection,
                id: id.to_string(),
                reason: format!("a concurrent writer got there first ({})", code.code()),
            };
        }
        let class = &code.code()[..2];
        // 08: connection exception, 53: insufficient resources, 57: operator
        // intervention (shutdown, cancel), 58: system error.
        if ["08", "53", "57", "58"].contains(&class) {
            return StoreError::Unavailable(format!("PostgreSQL at {target}: {}", db_message(&e)));
        }
        return StoreError::Backend(format!("PostgreSQL at {target}: {}", db_message(&e)));
    }
    // No SQLSTATE: the connection (refused, closed, timed out); the cause
    // ("Connection refused") is in the source chain.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        msg.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    StoreError::Unavailable(format!("PostgreSQL at {target}: {msg}"))
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

fn version_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

const GET: &str = "SELECT version, value FROM aragora_records WHERE collection = $1 AND id = $2";
/// One primary-key probe per key (a lateral join: never a hash join that
/// reads the whole table to answer a handful of keys).
const GET_MANY: &str = r#"SELECT k.ord, r.version, r.value
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(collection, id, ord)
    CROSS JOIN LATERAL (
        SELECT version, value FROM aragora_records
        WHERE collection = k.collection COLLATE "C" AND id = k.id COLLATE "C"
    ) r"#;
const APPLY: &str =
    "SELECT aragora_apply($1::smallint[], $2::text[], $3::text[], $4::bytea[], $5::bigint[])";

/// `aragora_apply`'s op kinds (migration 2).
fn op_kind(op: &WriteOp) -> (i16, i64) {
    let version = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    match op {
        WriteOp::Put { expect, .. } => match expect {
            Expect::Any => (0, 0),
            Expect::Absent => (1, 0),
            Expect::Version(v) => (2, version(*v)),
        },
        WriteOp::Delete { expect, .. } => match expect {
            Expect::Any => (3, 0),
            Expect::Absent => (4, 0),
            Expect::Version(v) => (5, version(*v)),
        },
    }
}

/// An expectation `aragora_apply` found false: the conflict, naming the op.
fn expectation_failed(
    e: &tokio_postgres::Error,
    ops: &[WriteOp],
    order: &[usize],
) -> Option<StoreError> {
    let db = e.as_db_error()?;
    let reason = match db.code().code() {
        "AR001" => "already exists",
        "AR002" => "changed since it was read",
        _ => return None,
    };
    let position: usize = db.message().trim().parse().ok()?;
    let op = order
        .get(position.checked_sub(1)?)
        .and_then(|&i| ops.get(i))?;
    let (collection, id) = op.target();
    Some(StoreError::Conflict {
        collection: collection.name(),
        id: id.to_string(),
        reason: reason.into(),
    })
}

/// The order a batch's rows are written in: by (collection, id), so any two
/// batches lock shared rows in the same order and cannot deadlock. A batch
/// naming one record twice keeps its own order (the later op sees the
/// earlier).
fn lock_order(ops: &[WriteOp]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by(|&a, &b| {
        let (ca, ia) = ops[a].target();
        let (cb, ib) = ops[b].target();
        (ca.name(), ia.as_bytes()).cmp(&(cb.name(), ib.as_bytes()))
    });
    let distinct = order
        .windows(2)
        .all(|w| ops[w[0]].target() != ops[w[1]].target());
    if distinct {
        order
    } else {
        (0..ops.len()).collect()
    }
}

/// One attempt at a batch: one `aragora_apply` call, its own transaction.
/// `Err` is a database error worth a fresh attempt (deadlock, serialization).
async fn write_once(
    pool: &Pool,
    target: &str,
    ops: &[WriteOp],
    order: &[usize],
) -> Result<Result<Receipt, StoreError>, tokio_postgres::Error> {
    let client = match pool.get().await {
        Ok(c) => c,
        Err(e) => return Ok(Err(pool_err(e, target))),
    };
    let mut kinds = Vec::with_capacity(order.len());
    let mut cols = Vec::with_capacity(order.len());
    let mut ids = Vec::with_capacity(order.len());
    let mut vals: Vec<Option<&[u8]>> = Vec::with_capacity(order.len());
    let mut expected = Vec::with_capacity(order.len());
    for &i in order {
        let op = &ops[i];
        let (collection, id) = op.target();
        let (kind, version) = op_kind(op);
        kinds.push(kind);
        cols.push(collection.name());
        ids.push(id);
        vals.push(match op {
            WriteOp::Put { value, .. } => Some(value.as_slice()),
            WriteOp::Delete { .. } => None,
        });
        expected.push(version);
    }
    let stmt = client.prepare_cached(APPLY).await?;
    match client
        .query_one(&stmt, &[&kinds, &cols, &ids, &vals, &expected])
        .await
    {
        Ok(row) => Ok(Ok(Receipt {
            seq: version_of(row.get(0)),
        })),
        Err(e) if retryable(&e) => Err(e),
        Err(e) => Ok(Err(expectation_failed(&e, ops, order).unwrap_or_else(
            || {
                let record = order.first().map(|&i| ops[i].target());
                pg_err(e, target, record)
            },
        ))),
    }
}

async fn get_many_on(
    pool: Pool,
    target: String,
    keys: Vec<(Collection, String)>,
) -> Result<Vec<Option<Record>>, StoreError> {
    let collections: Vec<&'static str> = keys.iter().map(|(c, _)| c.name()).collect();
    let ids: Vec<&str> = keys.iter().map(|(_, id)| id.as_str()).collect();
    let client = pool.get().await.map_err(|e| pool_err(e, &target))?;
    let stmt = client
        .prepare_cached(GET_MANY)
        .await
        .map_err(|e| pg_err(e, &target, None))?;
    let rows = client
        .query(&stmt, &[&collections, &ids])
        .await
        .map_err(|e| pg_err(e, &target, None))?;
    let mut out: Vec<Option<Record>> = vec![None; keys.len()];
    for r in rows {
        let ord: i64 = r.get(0);
        let slot = usize::try_from(ord - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| {
                StoreError::Backend(format!(
                    "PostgreSQL at {target}: get_many row {ord} out of range"
                ))
            })?;
        *slot = Some(Record {
            version: version_of(r.get(1)),
            value: Arc::from(r.get::<_, Vec<u8>>(2)),
        });
    }
    Ok(out)
}

impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn get(&self, collection: Collection, id: &str) -> Result<Option<Record>, StoreError> {
        let id = id.to_string();
        self.run(move |pool, target| async move {
            let client = pool.get().await.map_err(|e| pool_err(e, &target))?;
            let record = Some((collection, id.as_str()));
            let stmt = client
                .prepare_cached(GET)
                .await
                .map_err(|e| pg_err(e, &target, record))?;
            let row = client
                .query_opt(&stmt, &[&collection.name(), &id])
                .await
                .map_err(|e| pg_err(e, &target, record))?;
            Ok(row.map(|r| Record {
                version: version_of(r.get(0)),
                value: Arc::from(r.get::<_, Vec<u8>>(1)),
            }))
        })
    }

    /// One statement, so one snapshot: the records as of one point in time.
    fn get_many(&self, keys: &[(Collection, &str)]) -> Result<Vec<Option<Record>>, StoreError> {
        let keys: Vec<(Collection, String)> =
            keys.iter().map(|(c, id)| (*c, id.to_string())).collect();
        self.run(move |pool, target| get_many_on(pool, target, keys))
    }

    /// Runs on the store's runtime (where its connections live) and is
    /// awaited from the caller's: no blocking thread waits on the round trip.
    fn get_many_async(&self, keys: Vec<(Collection, String)>) -> super::ManyFuture {
        let Some(rt) = self.rt.as_ref() else {
            return Box::pin(std::future::ready(Err(StoreError::Unavailable(
                "the PostgreSQL store is closing".into(),
            ))));
        };
        let task = rt.spawn(get_many_on(self.pool.clone(), self.target.clone(), keys));
        let target = self.target.clone();
        Box::pin(async move {
            task.await.unwrap_or_else(|e| {
                Err(StoreError::Unavailable(format!(
                    "the PostgreSQL client task for {target} stopped: {e}"
                )))
            })
        })
    }

    fn list(
        &self,
        collection: Collection,
        q: &ListQuery<'_>,
    ) -> Result<Vec<(String, Record)>, StoreError> {
        let mut sql =
            String::from("SELECT id, version, value FROM aragora_records WHERE collection = $1");
        let mut params: Vec<String> = vec![collection.name().to_string()];
        let mut bound = |b: Bound<&str>, incl: &str, excl: &str| match b {
            Bound::Included(v) | Bound::Excluded(v) => {
                params.push(v.to_string());
                let op = if matches!(b, Bound::Included(_)) {
                    incl
                } else {
                    excl
                };
                sql.push_str(&format!(" AND id {op} ${}", params.len()));
            }
            Bound::Unbounded => {}
        };
        bound(q.start, ">=", ">");
        bound(q.end, "<=", "<");
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        sql.push_str(&format!(
            " ORDER BY id {} LIMIT ${}",
            if q.reverse { "DESC" } else { "ASC" },
            params.len() + 1
        ));
        self.run(move |pool, target| async move {
            let client = pool.get().await.map_err(|e| pool_err(e, &target))?;
            let stmt = client
                .prepare_cached(&sql)
                .await
                .map_err(|e| pg_err(e, &target, None))?;
            let mut args: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            args.push(&limit);
            let rows = client
                .query(&stmt, &args)
                .await
                .map_err(|e| pg_err(e, &target, None))?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        Record {
                            version: version_of(r.get(1)),
                            value: Arc::from(r.get::<_, Vec<u8>>(2)),
                        },
                    )
                })
                .collect())
        })
    }

    fn write(&self, ops: Vec<WriteOp>, _durability: Durability) -> Result<Receipt, StoreError> {
        self.run(move |pool, target| async move {
            let order = lock_order(&ops);
            let mut last = None;
            for _ in 0..WRITE_RETRIES {
                match write_once(&pool, &target, &ops, &order).await {
                    Ok(outcome) => return outcome,
                    Err(e) if retryable(&e) => last = Some(e),
                    Err(e) => {
                        let record = ops.first().map(WriteOp::target);
                        return Err(pg_err(e, &target, record));
                    }
                }
            }
            let record = ops.first().map(WriteOp::target);
            Err(match last {
                Some(e) => pg_err(e, &target, record),
                None => StoreError::Unavailable(format!("PostgreSQL at {target}: no attempt made")),
            })
        })
    }

    /// Every write committed synchronously: durable already.
    fn wait_durable(&self, _receipt: Receipt) -> Result<(), StoreError> {
        Ok(())
    }

    fn engine_backup(
        &self,
        _dest: &std::path::Path,
        _parent: Option<&std::path::Path>,
    ) -> Result<aedb::BackupReport, StoreError> {
        Err(StoreError::Backend(format!(
            "the PostgreSQL store ({}) has no aragora engine backup: back it up with \
             PostgreSQL's tools (pg_dump -Fc, or the server's continuous archiving) and keep \
             the key-ring backups (data/keyring-backups/) and the master key with it",
            self.target
        )))
    }
}
