//! `aragora serve`, and the state lifecycle the operator commands share with
//! it: configuration and logging, opening the store and the services on it,
//! and closing them so the store is flushed. Serving is binding the listener
//! and the control socket, the periodic tasks (chain-head anchor, approvals
//! tick, notifier), plain or TLS serving, and the signals that stop or reload
//! it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aragora::app::{AppState, router};
use aragora::config::{Config, TlsFiles};
use aragora::control;
use aragora::store::{EmbeddedStore, PostgresStore};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// How often the store's chain head is logged while serving.
const CHAIN_HEAD_LOG_INTERVAL: Duration = Duration::from_secs(300);

/// How long connections in flight may finish after SIGTERM (TLS; the plain
/// server waits for them).
const TLS_GRACE: Duration = Duration::from_secs(20);

/// How long the runtime's blocking work may take to finish at shutdown.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(10);

/// The validated configuration (logging set up as soon as it is known).
pub fn load_config() -> Result<Config> {
    Ok(Config::load(&|c| init_logging(&c.log_level, c.log_json))?)
}

/// The store this process opened: the embedded one (its directory lock
/// makes this process its only user) or the shared PostgreSQL one.
#[derive(Clone, Debug)]
pub enum OpenStore {
    Embedded(Arc<EmbeddedStore>),
    Postgres(Arc<PostgresStore>),
}

pub fn open_state(config: Config) -> Result<(OpenStore, Arc<AppState>)> {
    let jwt = config
        .jwt_secret
        .clone()
        .ok_or_else(|| anyhow!("JWT_SECRET is not set"))?;
    if let Some(db) = &config.database {
        // The embedded store (and its directory lock) is not used at all.
        let store = Arc::new(
            PostgresStore::connect_with(db.url.expose(), db.pool_size, db.ca_file.as_ref())
                .with_context(|| {
                    format!("opening the PostgreSQL store (DATABASE_URL: {})", db.target)
                })?,
        );
        let state = Arc::new(AppState::new(config, store.clone(), jwt.expose())?);
        return Ok((OpenStore::Postgres(store), state));
    }
    let (Some(mk), Some(ck)) = (&config.aedb_manifest_key, &config.aedb_checkpoint_key) else {
        anyhow::bail!("AEDB_MANIFEST_KEY and AEDB_CHECKPOINT_KEY are required");
    };
    let store_dir = config.data_dir.join("aedb");
    let store = Arc::new(
        EmbeddedStore::open_rotating(
            &store_dir,
            mk.bytes(),
            ck.bytes(),
            &aragora::store::embedded::PreviousKeys {
                manifest: config
                    .aedb_previous_manifest_key
                    .as_ref()
                    .map(|k| zeroize::Zeroizing::new(k.bytes())),
                checkpoint: config
                    .aedb_previous_checkpoint_key
                    .as_ref()
                    .map(|k| zeroize::Zeroizing::new(k.bytes())),
            },
        )
        .with_context(|| format!("opening the store in {}", store_dir.display()))?,
    );
    let state = Arc::new(AppState::new(config, store.clone(), jwt.expose())?);
    Ok((OpenStore::Embedded(store), state))
}

/// Flushes and closes the store once every other holder is gone.
pub fn close(store: OpenStore, state: Arc<AppState>) -> Result<()> {
    // Counted refusals whose window has not closed yet.
    state.auth.flush_failure_audit();
    state.settle_replicas();
    drop(state);
    let store = match store {
        OpenStore::Embedded(store) => store,
        // Every commit is durable already; dropping closes the pool.
        OpenStore::Postgres(store) => {
            drop(store);
            return Ok(());
        }
    };
    match store.engine().chain_head() {
        Ok(head) => tracing::info!(chain_head = %head, "aedb chain head at shutdown (anchor)"),
        Err(e) => tracing::error!(error = %e, "aedb chain head at shutdown could not be read"),
    }
    match Arc::try_unwrap(store) {
        Ok(s) => s.close().context("closing the store"),
        Err(_) => {
            tracing::warn!("store still referenced at shutdown; relying on drop to flush");
            Ok(())
        }
    }
}

fn init_logging(level: &str, json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::new(level);
    // Colour only on a terminal: under `kubectl logs`, a pipe or a file the
    // escape codes would end up in the fields the runbook's greps and awk read.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// `aragora serve`: until SIGTERM or SIGINT, then a graceful stop and a
/// flushed store.
pub fn run() -> Result<ExitCode> {
    let config = load_config()?;
    match config.maintenance_boot {
        aragora::maintenance::MaintenanceMode::On => tracing::warn!(
            "MAINTENANCE_MODE=true: only health, metrics and /api/admin/* are served"
        ),
        aragora::maintenance::MaintenanceMode::ReadOnly => {
            tracing::warn!("MAINTENANCE_MODE=read-only: writes are refused except /api/admin/*")
        }
        aragora::maintenance::MaintenanceMode::Off => {}
    }
    // A bad certificate stops boot before the store is touched.
    let tls = match &config.tls {
        Some(files) => Some((aragora::tls::server_config(files)?, files.clone())),
        None => None,
    };
    let bind = config.bind;
    let socket = control::socket_path(&config.data_dir);
    let (store, state) = open_state(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(state.clone(), store.clone(), bind, socket, tls))?;
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    close(store, state)?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    state: Arc<AppState>,
    store: OpenStore,
    bind: SocketAddr,
    socket: std::path::PathBuf,
    tls: Option<(Arc<rustls::ServerConfig>, TlsFiles)>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding {bind} (ARAGORA_BIND)"))?;
    control::serve(state.clone(), socket.clone())
        .await
        .with_context(|| format!("binding the control socket {}", socket.display()))?;
    let addr = listener.local_addr()?;
    // Before the listen line: whoever reads it (the test kit, a supervisor)
    // may signal at once, and an unhandled SIGTERM or SIGHUP kills the
    // process instead of stopping it gracefully or reloading.
    let signals = Signals::install()?;
    // The one line serve writes to stdout: the bound address, so whoever
    // asked for port 0 (the test kit, a supervisor) learns the real one.
    println!("aragora listening on {addr}");
    spawn_periodic_tasks(&state, store);
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let Signals { shutdown, hup } = signals;
    match tls {
        None => {
            tokio::spawn(ignore_hangups(hup));
            tracing::info!(%addr, control = %socket.display(), "aragora listening (http)");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.wait())
                .await?;
        }
        Some((tls_config, files)) => {
            let live = axum_server::tls_rustls::RustlsConfig::from_config(tls_config);
            tokio::spawn(aragora::tls::reload_on_sighup(
                hup,
                live.clone(),
                files,
                state.metrics.clone(),
            ));
            let handle = axum_server::Handle::new();
            let stopping = handle.clone();
            tokio::spawn(async move {
                shutdown.wait().await;
                stopping.graceful_shutdown(Some(TLS_GRACE));
            });
            tracing::info!(%addr, control = %socket.display(), "aragora listening (https)");
            axum_server::from_tcp_rustls(listener.into_std()?, live)?
                .handle(handle)
                .serve(app)
                .await?;
        }
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("shutting down: flushing the store");
    Ok(())
}

/// The chain-head anchor log, the approvals tick and the notifier.
fn spawn_periodic_tasks(state: &Arc<AppState>, store: OpenStore) {
    // Other replicas and offline commands on a shared store change the key
    // ring too: every request catches up first (`aragora::cluster`).
    if let OpenStore::Embedded(store) = store {
        tokio::spawn(log_chain_head_periodically(store));
    }
    let approvals_state = state.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(aragora::approvals::service::EXPIRY_INTERVAL);
        loop {
            every.tick().await;
            let s = approvals_state.clone();
            let _ = tokio::task::spawn_blocking(move || {
                s.approvals.tick();
                // Approved requests a crash or a lost wake-up left behind.
                aragora::approvals::execute::run_due(&s);
            })
            .await;
        }
    });
    let keyring = state.keyring.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(aragora::encryption::DERIVATION_PROBE_INTERVAL);
        // The first tick is immediate and boot already took a sample.
        every.tick().await;
        loop {
            every.tick().await;
            let k = keyring.clone();
            let _ = tokio::task::spawn_blocking(move || k.sample_derivation_cost()).await;
        }
    });
    if let Some(n) = state.notifier.clone() {
        tokio::spawn(n.run());
    }
    if let Some(dir) = state.config.audit_export_dir.clone() {
        tokio::spawn(export_audit_periodically(state.clone(), dir));
    }
    start_backup_schedule(state);
}

/// The runbook's "periodically export audit table snapshots to immutable
/// storage": `aragora audit export --out ARAGORA_AUDIT_EXPORT_DIR` every
/// ARAGORA_AUDIT_EXPORT_INTERVAL. A failure is logged and retried next period
/// (the directory is append-only, so a retry cannot duplicate anything).
async fn export_audit_periodically(state: Arc<AppState>, dir: std::path::PathBuf) {
    let mut every = tokio::time::interval(state.config.audit_export_interval);
    loop {
        every.tick().await;
        let (s, d) = (state.clone(), dir.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let signer = aragora::audit::export::ExportSigner::from_key_ring(&s.keyring)?;
            let r = aragora::audit::export::export(&s.audit, &signer, &d, None)?;
            // Retention right after the export that makes entries removable;
            // it logs what it removed, or why it kept what is due.
            if let Some(period) = s.config.audit_retention {
                aragora::audit::retention::apply(&s.audit, &d, &signer, period)?;
            }
            Ok::<_, aragora::audit::export::ExportError>(r)
        })
        .await;
        match outcome {
            Ok(Ok(r)) => tracing::info!(
                dir = %dir.display(),
                segments = r.written.len(),
                "scheduled audit export"
            ),
            Ok(Err(e)) => {
                tracing::error!(dir = %dir.display(), error = %e, "scheduled audit export failed")
            }
            Err(e) => tracing::error!(error = %e, "scheduled audit export task failed"),
        }
    }
}

/// The backup schedule (ARAGORA_BACKUP_DIR): a thread of its own, since a
/// backup copies files for as long as the store is large. It holds the state
/// weakly, so shutdown still closes the store once serving stops.
fn start_backup_schedule(state: &Arc<AppState>) {
    let Some(schedule) = state.config.backup.clone() else {
        tracing::info!("scheduled backups: off (ARAGORA_BACKUP_DIR is not set)");
        return;
    };
    tracing::info!(
        dir = %schedule.dir.display(),
        incremental_every_s = schedule.incremental_interval.as_secs(),
        full_every_s = schedule.full_interval.as_secs(),
        retain_full = schedule.retain_full,
        "scheduled backups: on"
    );
    let weak = Arc::downgrade(state);
    let poll = aragora::backup::poll_interval(&schedule);
    let spawned = std::thread::Builder::new()
        .name("backup-schedule".into())
        .spawn(move || {
            let mut failures = 0u32;
            loop {
                let Some(state) = weak.upgrade() else { return };
                // Failures are logged, counted and audited by `run`; the
                // schedule keeps going, backing off while they repeat.
                match state.backups.scheduled(&schedule) {
                    Ok(_) => failures = 0,
                    Err(_) => failures = failures.saturating_add(1),
                }
                drop(state);
                std::thread::sleep(aragora::backup::retry_delay(poll, failures));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "scheduled backups: the thread could not start");
    }
}

/// Logs the store's chain head (LSN:hash) every `CHAIN_HEAD_LOG_INTERVAL`:
/// shipped off the machine with the logs, it is the anchor
/// `aedb check invariants --expect-head` compares a directory with, so a
/// stale but validly signed copy (a rollback) is caught.
async fn log_chain_head_periodically(store: Arc<EmbeddedStore>) {
    let mut every = tokio::time::interval(CHAIN_HEAD_LOG_INTERVAL);
    loop {
        every.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.engine().chain_head()).await {
            Ok(Ok(head)) => tracing::info!(chain_head = %head, "aedb chain head (anchor)"),
            Ok(Err(e)) => tracing::error!(error = %e, "aedb chain head could not be read"),
            Err(e) => tracing::error!(error = %e, "aedb chain head task failed"),
        }
    }
}

/// Without a handler SIGHUP (sent to reload certificates) would terminate a
/// plain-HTTP server.
async fn ignore_hangups(mut hup: Signal) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: no TLS certificate to reload (plain HTTP)");
    }
}

/// The signals serve handles, registered up front (a signal that arrives
/// after registration is kept until it is waited for).
struct Signals {
    shutdown: Shutdown,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        let handler = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Signals {
            shutdown: Shutdown {
                term: handler(SignalKind::terminate(), "SIGTERM")?,
                int: handler(SignalKind::interrupt(), "SIGINT")?,
            },
            hup: handler(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

/// SIGTERM or SIGINT (Ctrl-C): stop gracefully.
struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}
