//! Issue #17's targets: the http workloads against the embedded store, the
//! PostgreSQL store (`DATABASE_URL`) and PostgreSQL + Redis (`REDIS_URL`),
//! side by side in one run, with the CPU each mode spends per request; and
//! the per-request cross-replica freshness check (`AppState::catch_up`)
//! timed on its own against PostgreSQL.
//!
//! Rounds alternate the modes (embedded, postgres, postgres+redis, again...)
//! so a neighbour's build slowing the machine for a while hits all three
//! rather than one. CPU is the server's (this process: the router, the
//! services and the PostgreSQL client) from /proc/self/stat, and apart from
//! it PostgreSQL's backends serving the mode's database.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aragora::app::AppState;
use aragora::config::Config;
use aragora::store::{EmbeddedStore, PostgresStore, Store};

use crate::Options;
use crate::http::{self, Prepared};
use crate::pg::{self, BenchDatabase};
use crate::report::{Report, thousands};

/// Where the PostgreSQL and Redis modes connect.
#[derive(Clone, Debug)]
pub struct Backends {
    pub pg_admin_url: String,
    pub redis_url: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Embedded,
    Postgres,
    PostgresRedis,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Embedded, Mode::Postgres, Mode::PostgresRedis];

    fn engine(self) -> &'static str {
        match self {
            Mode::Embedded => "embedded",
            Mode::Postgres => "postgres",
            Mode::PostgresRedis => "postgres_redis",
        }
    }
}

/// One mode's server, serving on its own runtime until dropped.
struct ModeServer {
    mode: Mode,
    port: u16,
    token: String,
    state: Arc<AppState>,
    rt: Option<tokio::runtime::Runtime>,
    db: Option<BenchDatabase>,
    _dir: tempfile::TempDir,
}

impl Drop for ModeServer {
    fn drop(&mut self) {
        // The server before its database, whose drop ends its connections.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Fails naming Redis when it does not answer PING: the third mode would
/// otherwise measure the per-replica fallback and call it Redis.
fn check_redis(url: &str) -> Result<()> {
    let host = aragora::redis_link::redacted_host(url);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&host)
        .with_context(|| format!("resolving Redis at {host}"))?
        .next()
        .with_context(|| format!("resolving Redis at {host}"))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| {
            format!("Redis at {host} (--redis-url) is required for the scale workload")
        })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    // A password-protected Redis answers NOERR/NOAUTH: the server logs in
    // itself, so only a reply of any kind is required here.
    ensure!(n > 0, "Redis at {host} did not answer PING");
    if !(reply.starts_with("+PONG") || reply.starts_with("-NOAUTH")) {
        bail!("Redis at {host} answered PING with {reply:?}");
    }
    Ok(())
}

/// The pid of the Redis at `url` when it runs on this machine (its CPU is
/// counted with the mode that uses it), from `INFO server`.
fn local_redis_pid(url: &str) -> Option<u32> {
    let host = aragora::redis_link::redacted_host(url);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&host)
        .ok()?
        .next()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"INFO server\r\n").ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // The reply is a few KiB; stop once the line is in.
    while reply.len() < 64 * 1024 {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some(rest) = text.split("process_id:").nth(1)
            && let Some((pid, _)) = rest.split_once("\r\n")
        {
            let pid: u32 = pid.trim().parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            return comm.starts_with("redis").then_some(pid);
        }
    }
    None
}

fn start(mode: Mode, backends: &Backends) -> Result<ModeServer> {
    let dir = tempfile::tempdir()?;
    let (store, db, config): (Arc<dyn Store>, _, _) = match mode {
        Mode::Embedded => {
            let config = Config::from_vars(&http::vars(dir.path(), &[]))?;
            let store = Arc::new(EmbeddedStore::open(
                &dir.path().join("aedb"),
                [5; 32],
                [6; 32],
            )?);
            (store, None, config)
        }
        Mode::Postgres | Mode::PostgresRedis => {
            let db = BenchDatabase::create(&backends.pg_admin_url, mode.engine())?;
            let mut extra = vec![("DATABASE_URL", db.url.as_str())];
            if mode == Mode::PostgresRedis {
                extra.push(("REDIS_URL", backends.redis_url.as_str()));
            }
            let config = Config::from_vars(&http::vars(dir.path(), &extra))?;
            // The pool size a deployment gets by default.
            let pool = config
                .database
                .as_ref()
                .map_or(aragora::store::postgres::DEFAULT_POOL_SIZE, |d| d.pool_size);
            let store = Arc::new(
                PostgresStore::connect(&db.url, pool)
                    .with_context(|| format!("opening the bench database {}", db.name))?,
            );
            (store, Some(db), config)
        }
    };
    let Prepared { state, token } = http::prepare(config, store)?;
    let rt = http::server_runtime()?;
    let port = http::serve(&rt, state.clone())?;
    Ok(ModeServer {
        mode,
        port,
        token,
        state,
        rt: Some(rt),
        db,
        _dir: dir,
    })
}

#[derive(Default)]
struct Totals {
    requests: u64,
    seconds: f64,
    p50_us: Vec<u64>,
    p99_us: Vec<u64>,
    cpu_s: f64,
    pg_cpu_s: f64,
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

pub fn run(options: &Options, backends: &Backends, report: &mut Report) -> Result<()> {
    check_redis(&backends.redis_url)?;
    let redis_pid = local_redis_pid(&backends.redis_url);
    let ticks = pg::clock_ticks();
    let servers = Mode::ALL
        .iter()
        .map(|m| start(*m, backends))
        .collect::<Result<Vec<_>>>()?;
    let (rounds, secs, conns) = if options.quick {
        (1, 1.0, 8)
    } else {
        (3, 5.0, 32)
    };

    let mut table = String::new();
    writeln!(
        table,
        "scale: the http workloads on three stores side by side; {rounds} round(s) of {secs} s per mode, modes alternating; \
         {conns} keep-alive connections from a second process; each server on 2 worker threads in this process"
    )?;
    writeln!(
        table,
        "{:<16} {:<15} {:>10} {:>8} {:>8} {:>12} {:>12} {:>12} {:>9} {:>9}  target",
        "workload",
        "mode",
        "req/s",
        "p50 us",
        "p99 us",
        "srv cpu/req",
        "db cpu/req",
        "all cpu/req",
        "vs emb",
        "cpu x emb"
    )?;
    for (workload, path, _, _) in http::WORKLOADS {
        let name = workload.trim_start_matches("http_");
        // Warm-up: pools filled, caches and the key ring loaded, so the first
        // mode measured is not the one paying for it.
        for s in &servers {
            http::load(
                s.port,
                path,
                &s.token,
                if options.quick { 0.2 } else { 1.0 },
                conns,
            )?;
        }
        let mut totals: BTreeMap<&'static str, Totals> = BTreeMap::new();
        for _ in 0..rounds {
            for s in &servers {
                let pids = match &s.db {
                    Some(db) => db.backend_pids()?,
                    None => Vec::new(),
                };
                let pg_before = pg::cpu_of(&pids, ticks);
                let redis_cpu = || match (s.mode, redis_pid) {
                    (Mode::PostgresRedis, Some(pid)) => pg::cpu_secs(&pid.to_string(), ticks),
                    _ => None,
                };
                let redis_before = redis_cpu();
                let cpu_before = pg::cpu_secs("self", ticks).context("reading /proc/self/stat")?;
                let r = http::load(s.port, path, &s.token, secs, conns)?;
                let cpu_after = pg::cpu_secs("self", ticks).context("reading /proc/self/stat")?;
                let pg_cpu = match &s.db {
                    Some(db) => {
                        let after = pg::cpu_of(&db.backend_pids()?, ticks);
                        // A backend started during the run counts whole.
                        after
                            .iter()
                            .map(|(pid, a)| a - pg_before.get(pid).copied().unwrap_or(0.0))
                            .sum::<f64>()
                    }
                    None => 0.0,
                };
                let pg_cpu = pg_cpu
                    + match (redis_before, redis_cpu()) {
                        (Some(b), Some(a)) => a - b,
                        _ => 0.0,
                    };
                let t = totals.entry(s.mode.engine()).or_default();
                t.requests += r.requests;
                t.seconds += r.seconds;
                t.p50_us.push(r.p50_us);
                t.p99_us.push(r.p99_us);
                t.cpu_s += cpu_after - cpu_before;
                t.pg_cpu_s += pg_cpu;
            }
        }
        let workload_name: &'static str = match name {
            "authorized_get" => "scale_authorized_get",
            _ => "scale_secret_read",
        };
        let per_req = |t: &Totals| {
            (
                t.requests as f64 / t.seconds,
                t.cpu_s / t.requests.max(1) as f64,
                t.pg_cpu_s / t.requests.max(1) as f64,
            )
        };
        let base = totals
            .get(Mode::Embedded.engine())
            .map(per_req)
            .context("no embedded figures")?;
        for mode in Mode::ALL {
            let Some(t) = totals.get(mode.engine()) else {
                continue;
            };
            let (rps, cpu, pg_cpu) = per_req(t);
            let engine = mode.engine();
            report.record(workload_name, engine, "requests_per_s", rps);
            report.record(
                workload_name,
                engine,
                "p50_s",
                median(&t.p50_us) as f64 / 1e6,
            );
            report.record(
                workload_name,
                engine,
                "p99_s",
                median(&t.p99_us) as f64 / 1e6,
            );
            report.record(workload_name, engine, "cpu_s_per_request", cpu);
            let (ratio, cpu_ratio, target) = if mode == Mode::Embedded {
                (String::new(), String::new(), String::new())
            } else {
                let ratio = rps / base.0;
                let cpu_ratio = (cpu + pg_cpu) / (base.1 + base.2);
                report.record(workload_name, engine, "db_cpu_s_per_request", pg_cpu);
                report.record(workload_name, engine, "ratio_vs_embedded", ratio);
                report.record(workload_name, engine, "cpu_ratio_vs_embedded", cpu_ratio);
                (
                    format!("{ratio:.2}x"),
                    format!("{cpu_ratio:.2}x"),
                    format!(">=0.5x {}", if ratio >= 0.5 { "ok" } else { "MISS" }),
                )
            };
            writeln!(
                table,
                "{:<16} {:<15} {:>10} {:>8} {:>8} {:>9.1} us {:>9.1} us {:>9.1} us {:>9} {:>9}  {}",
                name,
                engine,
                thousands(rps),
                median(&t.p50_us),
                median(&t.p99_us),
                cpu * 1e6,
                pg_cpu * 1e6,
                (cpu + pg_cpu) * 1e6,
                ratio,
                cpu_ratio,
                target
            )?;
        }
    }
    // Mode (c) must really have shared its limits through Redis.
    for s in &servers {
        if s.mode == Mode::PostgresRedis {
            let status = s
                .state
                .auth
                .redis_status()
                .context("the postgres_redis server has no Redis link")?;
            ensure!(
                status.up,
                "Redis at {} went down during the run",
                status.host
            );
        }
    }
    writeln!(
        table,
        "cpu/req: CPU seconds per request from /proc/<pid>/stat utime+stime: srv = this process (router, services, \
         PostgreSQL client; the load generator is another process), db = PostgreSQL's backends for the mode's database \
         and, for postgres_redis, redis-server when it runs on this machine; \
         vs emb = req/s against embedded, cpu x emb = all cpu/req against embedded's"
    )?;
    report.section(table);
    drop(servers);
    Ok(())
}

/// The freshness check alone: `AppState::catch_up()` (one `get_many` of the
/// generation records) against PostgreSQL with nothing changed, called
/// directly, the way the request middleware calls it
/// (`catch_up_reading_async` awaited from a request task, with a session
/// token's records read in the same query), through `spawn_blocking` (how
/// the middleware called it before), and the middleware's call on a replica
/// with `REDIS_URL` (the read cached and confirmed through Redis).
pub fn catchup(options: &Options, backends: &Backends, report: &mut Report) -> Result<()> {
    let n = if options.quick { 200 } else { 20_000 };
    let with_redis = catchup_with_redis(backends, n)?;
    let (db, _dir, Prepared { state, token }) = catchup_state(backends, "catchup", None)?;
    ensure!(
        state.cluster.enabled(),
        "the PostgreSQL store must be treated as shared (cluster sync enabled)"
    );

    // Warm: the pool's connection and the prepared statement exist.
    for _ in 0..50 {
        state.catch_up().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut direct = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        state.catch_up().map_err(|e| anyhow::anyhow!("{e}"))?;
        direct.push(t.elapsed().as_nanos() as u64);
    }

    let rt = http::server_runtime()?;
    let via_middleware = middleware_loop(&rt, &state, &token, n)?;
    let s = state.clone();
    let via_blocking_pool: Vec<u64> = rt.block_on(async move {
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let s = s.clone();
                let t = Instant::now();
                tokio::task::spawn_blocking(move || s.catch_up())
                    .await
                    .context("catch-up task")?
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                out.push(t.elapsed().as_nanos() as u64);
            }
            anyhow::Ok(out)
        })
        .await
        .context("catch-up loop")?
    })?;
    drop(rt);

    let pct = |v: &[u64], p: f64| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1e9
    };
    let mut table = format!(
        "catchup: the per-request freshness check (AppState::catch_up: one get_many of {} generation records) against PostgreSQL, {n} calls, nothing changed\n",
        aragora::cluster::WATCHED.len()
    );
    for (engine, v) in [
        ("postgres", &direct),
        ("postgres_middleware", &via_middleware),
        ("postgres_spawn_blocking", &via_blocking_pool),
        ("postgres_redis_middleware", &with_redis),
    ] {
        let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
        report.record("catchup", engine, "p50_s", p50);
        report.record("catchup", engine, "p99_s", p99);
        writeln!(
            table,
            "  {engine:<24} p50 {:>7.1} us   p99 {:>7.1} us   (target: p50 <= 200 us {})",
            p50 * 1e6,
            p99 * 1e6,
            if p50 <= 200e-6 { "ok" } else { "MISS" }
        )?;
    }
    writeln!(
        table,
        "  (postgres: called on this thread; postgres_middleware: as the request middleware calls it, awaited from a task on the server's runtime with the session's records in the same query; postgres_spawn_blocking: through the blocking pool, as it was called before; postgres_redis_middleware: the middleware's call on a replica with REDIS_URL, the read cached and confirmed by one Redis MGET)"
    )?;
    report.section(table);
    drop(state);
    drop(db);
    Ok(())
}

/// `catch_up_reading_async` with a session token, `n` times from one task on
/// the server's runtime: the request middleware's call.
fn middleware_loop(
    rt: &tokio::runtime::Runtime,
    state: &Arc<AppState>,
    token: &str,
    n: usize,
) -> Result<Vec<u64>> {
    let s = state.clone();
    let bearer = format!("Bearer {token}");
    rt.block_on(async move {
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let prefetch = s
                    .catch_up_reading_async(Some(&bearer))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                ensure!(prefetch.is_some(), "the session's records were read ahead");
                out.push(t.elapsed().as_nanos() as u64);
            }
            anyhow::Ok(out)
        })
        .await
        .context("catch-up loop")?
    })
}

/// A replica on a database of its own named `name`, with `REDIS_URL` when
/// `redis_url` is given.
fn catchup_state(
    backends: &Backends,
    name: &str,
    redis_url: Option<&str>,
) -> Result<(BenchDatabase, tempfile::TempDir, Prepared)> {
    let db = BenchDatabase::create(&backends.pg_admin_url, name)?;
    let dir = tempfile::tempdir()?;
    let mut vars = vec![("DATABASE_URL", db.url.as_str())];
    if let Some(url) = redis_url {
        vars.push(("REDIS_URL", url));
    }
    let config = Config::from_vars(&http::vars(dir.path(), &vars))?;
    let pool = config
        .database
        .as_ref()
        .map_or(aragora::store::postgres::DEFAULT_POOL_SIZE, |d| d.pool_size);
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&db.url, pool)?);
    let prepared = http::prepare(config, store)?;
    Ok((db, dir, prepared))
}

/// The middleware's call on a replica with `REDIS_URL` (its own database).
fn catchup_with_redis(backends: &Backends, n: usize) -> Result<Vec<u64>> {
    let (db, _dir, Prepared { state, token }) =
        catchup_state(backends, "catchup_redis", Some(&backends.redis_url))?;
    let rt = http::server_runtime()?;
    // Warm: the tags exist and the read is cached.
    middleware_loop(&rt, &state, &token, 50)?;
    let v = middleware_loop(&rt, &state, &token, n)?;
    drop(rt);
    drop(state);
    drop(db);
    Ok(v)
}
