//! A fresh PostgreSQL database per bench run (created from an admin
//! connection, dropped with its connections when the guard goes), as the test
//! kit's `TestDatabase` does, and the CPU the server's backends spend on it.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};

/// Where databases are created from, unless `--pg-admin-url` says otherwise.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug)]
pub struct BenchDatabase {
    pub name: String,
    /// What `DATABASE_URL` gets.
    pub url: String,
    admin_url: String,
}

/// Runs `f` with a client on `url`, on a thread and runtime of its own (so it
/// works whether or not the caller is inside a runtime).
fn with_client<T, F, Fut>(url: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let url = url.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (client, connection) = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_postgres::connect(&url, tokio_postgres::NoTls),
            )
            .await
            .map_err(|_| anyhow!("connecting to PostgreSQL: timed out"))?
            .context("connecting to PostgreSQL (--pg-admin-url)")?;
            let conn = tokio::spawn(connection);
            let out = f(client).await;
            let _ = conn.await;
            out
        })
    })
    .join()
    .map_err(|_| anyhow!("the PostgreSQL admin thread panicked"))?
}

fn url_for(admin: &str, name: &str) -> String {
    match admin.rsplit_once('/') {
        Some((server, _)) if admin.starts_with("postgres") => format!("{server}/{name}"),
        _ => format!("{admin} dbname={name}"),
    }
}

impl BenchDatabase {
    /// A new, empty database on the admin URL's server; an error naming the
    /// server when none answers (the scale workloads cannot run without it).
    pub fn create(admin_url: &str, label: &str) -> Result<Self> {
        let name = format!(
            "aragora_bench_{label}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        let sql = format!("CREATE DATABASE {name}");
        with_client(admin_url, move |client| async move {
            client.batch_execute(&sql).await?;
            Ok(())
        })
        .with_context(|| {
            format!(
                "creating a bench database on {} (PostgreSQL is required for the scale and catchup workloads)",
                aragora::store::postgres::describe_url(admin_url)
                    .unwrap_or_else(|_| "the --pg-admin-url server".into())
            )
        })?;
        Ok(Self {
            url: url_for(admin_url, &name),
            name,
            admin_url: admin_url.to_string(),
        })
    }

    /// The server processes serving connections to this database.
    pub fn backend_pids(&self) -> Result<Vec<u32>> {
        let name = self.name.clone();
        with_client(&self.admin_url, move |client| async move {
            let rows = client
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1",
                    &[&name],
                )
                .await?;
            Ok(rows
                .iter()
                .filter_map(|r| u32::try_from(r.get::<_, i32>(0)).ok())
                .collect())
        })
    }
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = with_client(&self.admin_url, move |client| async move {
            client.batch_execute(&sql).await?;
            Ok(())
        }) {
            eprintln!(
                "aragora-bench: dropping bench database {}: {e:#}",
                self.name
            );
        }
    }
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on
/// every Linux this runs on when that cannot be asked).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// User + system CPU seconds of process `pid` ("self" for this one) so far,
/// from /proc/<pid>/stat; `None` when it is gone or unreadable.
pub fn cpu_secs(pid: &str, ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// CPU seconds so far of each of `pids`.
pub fn cpu_of(pids: &[u32], ticks: f64) -> std::collections::BTreeMap<u32, f64> {
    pids.iter()
        .filter_map(|p| Some((*p, cpu_secs(&p.to_string(), ticks)?)))
        .collect()
}
