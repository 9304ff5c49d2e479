//! Fresh PostgreSQL databases for tests of the shared store: one database per
//! test on the machine's server (127.0.0.1:5432, trust authentication, user
//! `postgres`), dropped when the guard goes.
//!
//! Under `CI=true` a missing server fails the test (CI must run these);
//! elsewhere [`TestDatabase::create`] returns `None` after printing why, and
//! the test returns early.

use std::sync::atomic::{AtomicU64, Ordering};

/// The server tests use; `ARAGORA_TEST_PG_ADMIN_URL` overrides it (a
/// connection string to a database the user may `CREATE DATABASE` from).
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database of its own for one test; dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    /// `postgres://postgres@127.0.0.1:5432/<name>`: what `DATABASE_URL` gets.
    pub url: String,
    admin_url: String,
}

fn admin_url() -> String {
    std::env::var("ARAGORA_TEST_PG_ADMIN_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string())
}

/// The URL of database `name` on the admin URL's server.
fn url_for(admin: &str, name: &str) -> String {
    match admin.rsplit_once('/') {
        Some((server, _)) if admin.starts_with("postgres") => format!("{server}/{name}"),
        _ => format!("{admin} dbname={name}"),
    }
}

/// Runs SQL statements on the admin database (its own thread and runtime, so
/// this works from any test, async or not).
pub fn admin_sql(statements: &[String]) -> Result<(), String> {
    let url = admin_url();
    let statements = statements.to_vec();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        rt.block_on(async move {
            let (client, connection) = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                tokio_postgres::connect(&url, tokio_postgres::NoTls),
            )
            .await
            .map_err(|_| format!("connecting to {url}: timed out"))?
            .map_err(|e| format!("connecting to {url}: {e}"))?;
            let conn = tokio::spawn(connection);
            for s in &statements {
                client
                    .batch_execute(s)
                    .await
                    .map_err(|e| format!("{s}: {e}"))?;
            }
            drop(client);
            let _ = conn.await;
            Ok(())
        })
    })
    .join()
    .map_err(|_| "the admin SQL thread panicked".to_string())?
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

impl TestDatabase {
    /// A new, empty database, or `None` (with the reason printed) when no
    /// PostgreSQL server answers outside CI. Panics under `CI=true`.
    pub fn create() -> Option<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "aragora_t_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        let admin = admin_url();
        match admin_sql(&[format!("CREATE DATABASE {name}")]) {
            Ok(()) => Some(Self {
                url: url_for(&admin, &name),
                name,
                admin_url: admin,
            }),
            Err(e) if under_ci() => panic!(
                "PostgreSQL is required under CI=true ({admin}): {e}; the machine's server (127.0.0.1:5432, trust authentication) must be running"
            ),
            Err(e) => {
                eprintln!("skipped: no PostgreSQL for this test ({e})");
                None
            }
        }
    }

    /// Runs `f` with a client connected to this database (its own thread
    /// and runtime) and returns what it returns.
    pub fn with_client<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        let url = self.url.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"));
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
                let task = tokio::spawn(conn);
                let out = f(client).await;
                let _ = task.await;
                out
            })
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// The stored bytes of every record of `collection` (what PostgreSQL holds).
    pub fn stored_values(&self, collection: &str) -> Vec<Vec<u8>> {
        let collection = collection.to_string();
        self.with_client(move |client| async move {
            client
                .query(
                    "SELECT value FROM aragora_records WHERE collection = $1",
                    &[&collection],
                )
                .await
                .unwrap_or_else(|e| panic!("reading {collection}: {e}"))
                .iter()
                .map(|r| r.get::<_, Vec<u8>>(0))
                .collect()
        })
    }

    /// `SELECT <one bigint>` on this database.
    pub fn query_i64(&self, sql: &str) -> i64 {
        let sql = sql.to_string();
        self.with_client(move |client| async move {
            client
                .query_one(&sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get(0)
        })
    }

    /// Runs statements on this database.
    pub fn execute(&self, sql: &str) {
        let sql = sql.to_string();
        self.with_client(move |client| async move {
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
    }

    /// The admin connection string this database was created from.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Err(e) = admin_sql(&[format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )]) {
            eprintln!("dropping test database {}: {e}", self.name);
        }
    }
}

/// `TestDatabase::create`, or return from the test (outside CI) when there
/// is no PostgreSQL.
#[macro_export]
macro_rules! test_database_or_skip {
    () => {
        match $crate::postgres::TestDatabase::create() {
            Some(db) => db,
            None => return,
        }
    };
}
