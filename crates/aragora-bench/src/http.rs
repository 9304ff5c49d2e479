//! HTTP throughput over loopback: the server runs in this process (the same
//! router and services as `aragora serve`, on an embedded store), the load comes
//! from a second process (this binary in `--load-gen` mode) with keep-alive
//! connections through hyper's client. Two phases: an authorized GET (JWT verify + session and user
//! lookups + RBAC + handler), and a secret read (the same, plus decryption and
//! its `secret_access` audit entry written durably before the response).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aragora::app::{AppState, router};
use aragora::auth::RequestMeta;
use aragora::config::Config;
use aragora::store::{EmbeddedStore, Store};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::Options;
use crate::report::Report;

pub const PATH: &str = "/api/security/rbac/cache/stats";
const SECRET_ID: &str = "bench-secret";
const SECRET_PATH: &str = "/api/secrets/bench-secret";

#[derive(Debug, Serialize, Deserialize)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

fn hex32(b: u8) -> String {
    hex_string(&[b; 32])
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The server's configuration and store for one mode: `extra` adds to the
/// variables every mode shares (DATABASE_URL, REDIS_URL).
pub fn vars(data_dir: &std::path::Path, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    vars.insert(
        "ARAGORA_DATA_DIR".to_string(),
        data_dir.display().to_string(),
    );
    vars.insert("ARAGORA_LOG_LEVEL".into(), "error".into());
    vars.insert("AEDB_MANIFEST_KEY".into(), hex32(5));
    vars.insert("AEDB_CHECKPOINT_KEY".into(), hex32(6));
    vars.insert("ARAGORA_ENCRYPTION_KEY".into(), hex32(7));
    vars.insert("JWT_SECRET".into(), JWT_SECRET.into());
    for (k, v) in extra {
        vars.insert((*k).to_string(), (*v).to_string());
    }
    vars
}

const JWT_SECRET: &str = "bench-jwt-secret-0123456789abcdef0123456789";

/// A server's state with the bench user, its token and the bench secret.
pub struct Prepared {
    pub state: Arc<AppState>,
    pub token: String,
}

/// Wires the services over `store` and seeds what the workloads read.
pub fn prepare(config: Config, store: Arc<dyn Store>) -> Result<Prepared> {
    let state = Arc::new(AppState::new(config, store, JWT_SECRET)?);
    let meta = RequestMeta::default();
    // The harness acts as an administrator (the privilege ceiling checks
    // the creator's grants).
    let harness = aragora::auth::Principal {
        user_id: "bench".into(),
        email: "bench-harness@example.com".into(),
        roles: vec!["admin".into()],
        credential: aragora::auth::Credential::ApiKey {
            key_id: "bench".into(),
        },
    };
    state
        .auth
        .create_user(
            &harness,
            "bench@example.com",
            Some("bench password 123"),
            vec!["security_analyst".into(), "member".into()],
            &meta,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (token, _, _) = state
        .auth
        .login("bench@example.com", "bench password 123", &meta)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let principal = state
        .auth
        .authenticate(Some(&format!("Bearer {token}")), &meta)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    state
        .secrets
        .put(
            &principal,
            SECRET_ID,
            &"s".repeat(64),
            "api_token",
            None,
            &meta,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Prepared { state, token })
}

/// Serves `state` on a loopback port from `rt` (2 worker threads, as the
/// published figures use) and returns the port.
pub fn serve(rt: &tokio::runtime::Runtime, state: Arc<AppState>) -> Result<u16> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

/// A runtime like `aragora serve`'s, on the 2 worker threads the published
/// figures were taken with.
pub fn server_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The two request workloads: (name, path, description, target).
pub const WORKLOADS: [(&str, &str, &str, &str); 2] = [
    (
        "http_authorized_get",
        PATH,
        "GET with a JWT",
        ">= 15,000/s, p99 < 10 ms",
    ),
    (
        "http_secret_read",
        SECRET_PATH,
        "secret read (decrypt + durable audit)",
        ">= 5,000/s",
    ),
];

pub fn run(options: &Options, report: &mut Report) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = Config::from_vars(&vars(dir.path(), &[]))?;
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(
        &dir.path().join("aedb"),
        [5; 32],
        [6; 32],
    )?);
    let Prepared { state, token } = prepare(config, store)?;
    let rt = server_runtime()?;
    let port = serve(&rt, state)?;

    let (secs, conns) = if options.quick { (1.0, 8) } else { (10.0, 32) };
    let mut table = String::new();
    for (workload, path, what, target) in WORKLOADS {
        let r = load(port, path, &token, secs, conns)?;
        let rps = r.requests as f64 / r.seconds;
        report.record(workload, "aragora", "requests_per_s", rps);
        report.record(workload, "aragora", "p99_s", r.p99_us as f64 / 1e6);
        writeln!(
            table,
            "http {what}: GET {path}, {conns} keep-alive connections from a second process, {secs} s, server on 2 worker threads"
        )?;
        writeln!(
            table,
            "  requests/s {:>10}   p50 {:>6} us   p99 {:>6} us   (target: {target})",
            crate::report::thousands(rps),
            r.p50_us,
            r.p99_us
        )?;
    }
    report.section(table);
    drop(rt);
    Ok(())
}

/// Runs the load generator process against `path` and returns its result.
pub fn load(port: u16, path: &str, token: &str, secs: f64, conns: usize) -> Result<LoadResult> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args([
            "--load-gen-port",
            &port.to_string(),
            "--load-gen-secs",
            &secs.to_string(),
            "--load-gen-conns",
            &conns.to_string(),
        ])
        .env("ARAGORA_BENCH_TOKEN", token)
        .env("ARAGORA_BENCH_PATH", path)
        .output()
        .context("starting the load generator process")?;
    if !out.status.success() {
        bail!(
            "load generator failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let r: LoadResult = serde_json::from_slice(&out.stdout).context("load generator output")?;
    if r.errors > 0 {
        bail!("{path}: {} of {} requests failed", r.errors, r.requests);
    }
    Ok(r)
}

/// The second process: `conns` connections, each sending GETs back to back for
/// `secs`, measuring every request's latency.
pub fn load_gen(port: u16, secs: f64, conns: usize) -> Result<()> {
    let token = std::env::var("ARAGORA_BENCH_TOKEN").context("ARAGORA_BENCH_TOKEN")?;
    let path = std::env::var("ARAGORA_BENCH_PATH").unwrap_or_else(|_| PATH.to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (path, token) = (path.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                connection(port, path, token, deadline).await
            }));
        }
        let mut all = (0u64, 0u64, Vec::new());
        for t in tasks {
            let (ok, err, mut lat) = t.await??;
            all.0 += ok;
            all.1 += err;
            all.2.append(&mut lat);
        }
        anyhow::Ok(all)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let (requests, errors, mut lat) = results;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let r = LoadResult {
        requests,
        errors,
        seconds,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// One keep-alive connection through hyper's client, sending GETs back to back
/// until `deadline`: (200s, other statuses, latencies in µs).
async fn connection(
    port: u16,
    path: String,
    token: String,
    deadline: Instant,
) -> Result<(u64, u64, Vec<u64>)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let driver = tokio::spawn(conn);
    let bearer = format!("Bearer {token}");
    let (mut ok, mut err, mut lat) = (0u64, 0u64, Vec::new());
    while Instant::now() < deadline {
        let req = http::Request::get(path.as_str())
            .header(http::header::HOST, "localhost")
            .header(http::header::AUTHORIZATION, bearer.as_str())
            .body(Empty::<Bytes>::new())?;
        let t = Instant::now();
        sender
            .ready()
            .await
            .context("the server closed the connection")?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        // The whole body, so the next request starts on a clean connection.
        resp.into_body().collect().await?;
        lat.push(t.elapsed().as_micros() as u64);
        if status == http::StatusCode::OK {
            ok += 1
        } else {
            err += 1
        }
    }
    drop(sender);
    let _ = driver.await;
    Ok((ok, err, lat))
}
