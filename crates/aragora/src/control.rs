//! The operator channel to a running server: a Unix socket in the data dir
//! (`aragora.sock`, mode 0600, and the peer must run as the server's user).
//! Embedded aedb allows one process, so while `aragora serve` runs, operator
//! commands (`aragora admin bootstrap`, ...) go through here instead of opening
//! the store. One JSON request line, one JSON response line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::app::AppState;
use crate::auth::recovery::RecoveryRequest;
use crate::encryption::migration::MigrationStore;
use crate::error::ServiceError;

pub const SOCKET_FILE: &str = "aragora.sock";
/// A request line longer than this is refused.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ControlRequest {
    Bootstrap {
        email: String,
    },
    /// `aragora admin recover`: break-glass, when no admin can act.
    AdminRecover {
        email: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        force: bool,
    },
    AuditVerify,
    /// `aragora key-rotation`: rotate (reason required) or retire unused keys.
    KeyRotation {
        reason: Option<String>,
        force: bool,
        cleanup_expired: bool,
    },
    /// `aragora key-ring restore --file F`: bring back keys missing from the store.
    KeyRingRestore {
        file: String,
    },
    /// `aragora migration`: rewrap a store's records under the primary key.
    Migration {
        store: String,
        #[serde(default)]
        dry_run: bool,
        #[serde(default)]
        retry_failed: bool,
        #[serde(default)]
        skip_record: Option<String>,
    },
    /// The migration's progress (what the CLI polls for its progress line).
    MigrationStatus {
        #[serde(default)]
        store: Option<String>,
    },
    /// `aragora rotation --secrets-accessed-by=USER_ID`.
    SecretRotation {
        user_id: String,
        #[serde(default)]
        dry_run: bool,
    },
}

impl ControlRequest {
    /// How long the client waits for the answer: a migration of a large store
    /// runs for minutes.
    pub fn timeout(&self) -> Duration {
        match self {
            ControlRequest::Migration { .. } => Duration::from_secs(24 * 3600),
            _ => Duration::from_secs(60),
        }
    }
}

/// The audit actor of operator commands.
pub const CLI_ACTOR: &str = "cli";

/// How a command reached the services (recorded where it matters: a
/// break-glass recovery says which).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Through the running server's socket.
    Socket,
    /// The CLI opened the store itself (server stopped).
    Direct,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Socket => "socket",
            Via::Direct => "direct",
        }
    }
}

/// Runs one control command against the services (shared by the socket and the
/// direct, server-stopped path).
pub fn execute(state: &AppState, req: ControlRequest, via: Via) -> Result<Value, ServiceError> {
    match req {
        ControlRequest::Bootstrap { email } => {
            let (user, token) = state.auth.bootstrap_admin(&email)?;
            Ok(json!({"user_id": user.id, "email": user.email, "token": token}))
        }
        ControlRequest::AdminRecover {
            email,
            reason,
            force,
        } => {
            let outcome = state.auth.recover_admin(RecoveryRequest {
                email: &email,
                reason: reason.as_deref(),
                force,
                actor: CLI_ACTOR,
                via: via.as_str(),
            })?;
            serde_json::to_value(outcome).map_err(|e| ServiceError::Internal(e.to_string()))
        }
        ControlRequest::AuditVerify => Ok(serde_json::to_value(state.audit.verify()?)
            .map_err(|e| ServiceError::Internal(e.to_string()))?),
        ControlRequest::KeyRotation {
            cleanup_expired: true,
            ..
        } => Ok(state.keyring.cleanup_expired(CLI_ACTOR, None)?),
        ControlRequest::KeyRotation { reason, force, .. } => {
            let reason = reason.ok_or_else(|| {
                ServiceError::BadRequest("--reason=TEXT is required to rotate".into())
            })?;
            let outcome = state.keyring.rotate(CLI_ACTOR, None, &reason, force)?;
            serde_json::to_value(outcome).map_err(|e| ServiceError::Internal(e.to_string()))
        }
        ControlRequest::KeyRingRestore { file } => {
            Ok(state
                .keyring
                .restore(std::path::Path::new(&file), CLI_ACTOR, None)?)
        }
        ControlRequest::Migration {
            store,
            dry_run,
            retry_failed,
            skip_record,
        } => run_migration(state, &store, dry_run, retry_failed, skip_record.as_deref()),
        ControlRequest::MigrationStatus { store } => {
            Ok(state.migration.status(store.as_deref())?)
        }
        ControlRequest::SecretRotation { user_id, dry_run } => {
            state.secrets.mark_accessed_by(&user_id, dry_run, CLI_ACTOR)
        }
    }
}

/// `aragora migration`: one result per store (`{"results": [...]}` for
/// `--store=all`, the store's result otherwise).
fn run_migration(
    state: &AppState,
    store: &str,
    dry_run: bool,
    retry_failed: bool,
    skip_record: Option<&str>,
) -> Result<Value, ServiceError> {
    let stores = MigrationStore::parse(store)?;
    let mut results = Vec::new();
    for s in &stores {
        let v = if let Some(id) = skip_record {
            state.migration.skip_record(*s, id, CLI_ACTOR)?.view()
        } else if dry_run {
            state.migration.dry_run(*s)?
        } else if retry_failed {
            state.migration.retry_failed(*s, CLI_ACTOR)?.view()
        } else {
            state.migration.run(*s, CLI_ACTOR, &|_| {})?.view()
        };
        results.push(v);
    }
    if store == "all" {
        Ok(json!({"store": "all", "results": results}))
    } else {
        results
            .pop()
            .ok_or_else(|| ServiceError::Internal("no migration result".into()))
    }
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Binds the socket (replacing a stale one: the store lock already proves no
/// other server uses this data dir) and serves it until the runtime stops.
pub async fn serve(state: Arc<AppState>, path: PathBuf) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::metadata(&path)?.uid();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(state, stream, owner).await {
                    tracing::warn!(error = %e, "control socket request failed");
                }
            });
        }
    });
    Ok(())
}

async fn handle(
    state: Arc<AppState>,
    stream: tokio::net::UnixStream,
    owner: u32,
) -> std::io::Result<()> {
    let peer = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    if peer.uid() != owner {
        let msg =
            json!({"ok": false, "error": "the control socket accepts only the server's own user"});
        write.write_all(format!("{msg}\n").as_bytes()).await?;
        return Ok(());
    }
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST_BYTES as u64);
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(req) => {
            tracing::info!(command = ?std::mem::discriminant(&req), "control command");
            match tokio::task::spawn_blocking(move || execute(&state, req, Via::Socket)).await {
                Ok(Ok(v)) => json!({"ok": true, "result": v}),
                Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
                Err(e) => json!({"ok": false, "error": format!("worker failed: {e}")}),
            }
        }
        Err(e) => json!({"ok": false, "error": format!("bad control request: {e}")}),
    };
    write.write_all(format!("{response}\n").as_bytes()).await?;
    write.shutdown().await
}

/// Client side: `Ok(None)` when no server listens (the caller then opens the
/// store itself).
pub fn call(
    data_dir: &Path,
    req: &ControlRequest,
) -> Result<Option<Result<Value, String>>, String> {
    let path = socket_path(data_dir);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    stream
        .set_read_timeout(Some(req.timeout()))
        .map_err(|e| e.to_string())?;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("writing to {}: {e}", path.display()))?;
    let mut resp = String::new();
    BufReader::new(stream)
        .read_line(&mut resp)
        .map_err(|e| format!("reading from {}: {e}", path.display()))?;
    let v: Value =
        serde_json::from_str(&resp).map_err(|e| format!("bad response from the server: {e}"))?;
    if v["ok"] == true {
        Ok(Some(Ok(v["result"].clone())))
    } else {
        Ok(Some(Err(v["error"]
            .as_str()
            .unwrap_or("unknown error")
            .to_string())))
    }
}
