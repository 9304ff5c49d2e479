//! `aragora`: the security control plane (`serve`) and its operator commands.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use aedb::{AedbConfig, AedbInstance};
use anyhow::{Context, Result};
use aragora::app::{AppState, router};
use aragora::config::{Config, Environment, parse_key};
use aragora::keys::load_or_generate_dev_keys;
use aragora::metrics::Metrics;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "aragora", version, about = "Aragora security control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (ARAGORA_BIND, default 127.0.0.1:8080) on the embedded store
    /// in ARAGORA_DATA_DIR (default ./data).
    Serve,
    /// Validate ARAGORA_ENCRYPTION_KEY without starting the server (never prints it).
    CheckKey,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckKey => match parse_key(
            "ARAGORA_ENCRYPTION_KEY",
            std::env::var("ARAGORA_ENCRYPTION_KEY").ok().as_deref(),
        ) {
            Ok(_) => {
                println!("ARAGORA_ENCRYPTION_KEY: ok (64 hex characters, 32 bytes)");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("aragora: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve => match serve() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("aragora: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

fn serve() -> Result<()> {
    let mut vars: BTreeMap<String, String> = std::env::vars().collect();
    // Parse once to learn the environment and data dir; development fills missing
    // keys from the owner-only key file before the final parse.
    let first = Config::from_vars(&vars);
    if let Ok(c) = &first
        && c.environment == Environment::Development
    {
        init_logging(&c.log_level, c.log_json);
        load_or_generate_dev_keys(&c.data_dir, &mut vars)?;
    }
    let config = Config::from_vars(&vars)?;
    if first.is_err() || config.environment == Environment::Production {
        init_logging(&config.log_level, config.log_json);
    }
    let (Some(mk), Some(ck)) = (&config.aedb_manifest_key, &config.aedb_checkpoint_key) else {
        anyhow::bail!("AEDB_MANIFEST_KEY and AEDB_CHECKPOINT_KEY are required");
    };
    let store_dir = config.data_dir.join("aedb");
    let store = AedbInstance::open_production(
        AedbConfig::production(mk.bytes())
            .with_checkpoint_key(ck.bytes())
            .with_bootstrap_admin("aragora-system"),
        &store_dir,
    )
    .with_context(|| format!("opening the store in {}", store_dir.display()))?;
    let metrics = Metrics::new()?.with_known_series();
    let bind = config.bind;
    let state = Arc::new(AppState {
        config,
        metrics,
        store,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding {bind} (ARAGORA_BIND)"))?;
        tracing::info!(addr = %listener.local_addr()?, "aragora listening");
        axum::serve(listener, router(state.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        tracing::info!("shutting down: flushing the store");
        anyhow::Ok(())
    })?;
    Ok(())
}

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::new(level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
