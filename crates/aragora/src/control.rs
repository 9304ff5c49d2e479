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
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::app::AppState;
use crate::audit::VerifyReport;
use crate::audit::export::{self as audit_export, ExportReport, ExportSigner, ExportVerifyReport};
use crate::auth::recovery::{RecoveryOutcome, RecoveryRequest};
use crate::encryption::migration::{DryRunView, MigrationStore, MigrationView};
use crate::encryption::{
    CleanupOutcome, MasterRotation, MasterRotationOutcome, RestoreOutcome, RotationOutcome,
    UnsealOutcome,
};
use crate::error::ServiceError;
use crate::operator::Operator;
use crate::secrets::RotationMarks;

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
    /// `aragora audit export --out DIR [--since T]`: new signed segments.
    AuditExport {
        /// Absolute (the CLI resolves it before sending).
        out: String,
        #[serde(default)]
        since_us: Option<i64>,
    },
    /// `aragora audit verify --export DIR [--public-key HEX]...`.
    AuditVerifyExport {
        dir: String,
        #[serde(default)]
        public_keys: Vec<String>,
    },
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
    /// `aragora backup full|incremental --out DIR`: an online backup.
    Backup {
        kind: crate::backup::BackupKind,
        /// Absolute (the CLI resolves it before sending).
        out: String,
    },
    /// `aragora maintenance off|read-only|on`.
    Maintenance {
        mode: crate::maintenance::MaintenanceMode,
    },
    /// `aragora unseal`: open a sealed key ring with this master key (read
    /// by the CLI from stdin; only ever sent over the owner-only socket).
    Unseal {
        key: KeyHex,
    },
    /// `aragora master-key rotate`: rewrap the key ring under the server's
    /// ARAGORA_ENCRYPTION_KEY (the previous key opening what is not yet).
    MasterKeyRotate {
        #[serde(default)]
        dry_run: bool,
        /// The approved `master_key_rotation` request this run executes.
        #[serde(default)]
        approval: Option<String>,
    },
    /// `aragora admission [--max-commits-per-sec N | --unlimited]`: the
    /// store's commit rate, shown or (with `set`) changed.
    Admission {
        #[serde(default)]
        set: Option<crate::admission::Limit>,
    },
}

/// A master key in hex on its way to [`ControlRequest::Unseal`]: zeroized
/// when dropped, never shown by `Debug`.
#[derive(Clone)]
pub struct KeyHex(Zeroizing<String>);

impl KeyHex {
    pub fn new(hex: Zeroizing<String>) -> Self {
        Self(hex)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for KeyHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHex(<redacted>)")
    }
}

impl Serialize for KeyHex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyHex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| KeyHex(Zeroizing::new(s)))
    }
}

impl ControlRequest {
    /// How long the client waits for the answer: a migration of a large store
    /// runs for minutes.
    pub fn timeout(&self) -> Duration {
        match self {
            ControlRequest::Migration { .. } => Duration::from_secs(24 * 3600),
            ControlRequest::AuditExport { .. } | ControlRequest::AuditVerifyExport { .. } => {
                Duration::from_secs(3600)
            }
            ControlRequest::Backup { .. } => Duration::from_secs(24 * 3600),
            _ => Duration::from_secs(60),
        }
    }
}

/// The answer to each [`ControlRequest`], shared by the server and the CLI
/// (which renders it as text, or prints the inner view with `--json`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlResponse {
    Bootstrap(BootstrapView),
    AdminRecover(RecoveryOutcome),
    AuditVerify(VerifyReport),
    AuditExport(ExportReport),
    AuditVerifyExport(ExportVerifyReport),
    KeyRotation(RotationOutcome),
    KeyCleanup(CleanupOutcome),
    KeyRingRestore(RestoreOutcome),
    Migration(MigrationOutcome),
    MigrationStatus(MigrationView),
    SecretRotation(RotationMarks),
    Unseal(UnsealOutcome),
    MasterKeyRotate(MasterRotationOutcome),
    Backup(crate::backup::BackupOutcome),
    Maintenance(crate::maintenance::MaintenanceChange),
    Admission(crate::admission::AdmissionView),
}

/// The first admin and its API key (shown once).
#[derive(Clone, Serialize, Deserialize)]
pub struct BootstrapView {
    pub user_id: String,
    pub email: String,
    pub token: String,
}

// The token is a credential: Debug (logs, panics) never shows it.
impl std::fmt::Debug for BootstrapView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapView")
            .field("user_id", &self.user_id)
            .field("email", &self.email)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// One store's migration answer: a dry run's counts, or a run's state.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MigrationResult {
    NothingToRetry(NothingToRetry),
    DryRun(DryRunView),
    Run(MigrationView),
}

/// `--retry-failed` on a store with no failed record: nothing ran.
#[derive(Debug, Serialize, Deserialize)]
pub struct NothingToRetry {
    pub store: String,
    pub nothing_to_retry: bool,
}

/// `aragora migration`: the store's result, or with `--store=all`
/// `{"store": "all", "results": [...]}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MigrationOutcome {
    All {
        store: String,
        results: Vec<MigrationResult>,
    },
    One(MigrationResult),
}

impl MigrationOutcome {
    pub fn results(&self) -> Vec<&MigrationResult> {
        match self {
            MigrationOutcome::All { results, .. } => results.iter().collect(),
            MigrationOutcome::One(r) => vec![r],
        }
    }
}

/// One line on the socket, each way.
#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<ControlResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Reply {
    fn error(e: impl Into<String>) -> Self {
        Reply {
            ok: false,
            result: None,
            error: Some(e.into()),
        }
    }
}

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
pub fn execute(
    state: &AppState,
    req: ControlRequest,
    via: Via,
    operator: &Operator,
) -> Result<ControlResponse, ServiceError> {
    // A command through this replica's socket acts on what other replicas
    // changed too, as a request does (`crate::cluster`); nothing on a single
    // process.
    state.catch_up()?;
    let actor = operator.actor();
    let actor = actor.as_str();
    match req {
        ControlRequest::Bootstrap { email } => {
            let (user, token) = state.auth.bootstrap_admin(&email)?;
            Ok(ControlResponse::Bootstrap(BootstrapView {
                user_id: user.id,
                email: user.email,
                token,
            }))
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
                actor,
                via: via.as_str(),
            })?;
            Ok(ControlResponse::AdminRecover(outcome))
        }
        ControlRequest::AuditVerify => Ok(ControlResponse::AuditVerify(state.audit.verify()?)),
        ControlRequest::AuditExport { out, since_us } => {
            let signer = export_signer(state)?;
            Ok(ControlResponse::AuditExport(audit_export::export(
                &state.audit,
                &signer,
                Path::new(&out),
                since_us,
            )?))
        }
        ControlRequest::AuditVerifyExport { dir, public_keys } => {
            let signer = export_signer(state).ok();
            Ok(ControlResponse::AuditVerifyExport(
                audit_export::verify_dir(
                    Path::new(&dir),
                    signer.as_ref(),
                    &public_keys,
                    Some(&state.audit),
                )?,
            ))
        }
        ControlRequest::KeyRotation {
            cleanup_expired: true,
            ..
        } => Ok(ControlResponse::KeyCleanup(state.keyring.cleanup_expired(
            actor,
            None,
            state.config.key_destroy_grace,
        )?)),
        ControlRequest::KeyRotation { reason, force, .. } => {
            let reason = reason.ok_or_else(|| {
                ServiceError::BadRequest("--reason=TEXT is required to rotate".into())
            })?;
            let outcome = state.keyring.rotate(actor, None, &reason, force)?;
            Ok(ControlResponse::KeyRotation(outcome))
        }
        ControlRequest::KeyRingRestore { file } => Ok(ControlResponse::KeyRingRestore(
            state
                .keyring
                .restore(std::path::Path::new(&file), actor, None)?,
        )),
        ControlRequest::Migration {
            store,
            dry_run,
            retry_failed,
            skip_record,
        } => Ok(ControlResponse::Migration(run_migration(
            state,
            &store,
            dry_run,
            retry_failed,
            skip_record.as_deref(),
            actor,
        )?)),
        ControlRequest::MigrationStatus { store } => Ok(ControlResponse::MigrationStatus(
            state.migration.status(store.as_deref())?,
        )),
        ControlRequest::SecretRotation {
            user_id,
            dry_run: true,
        } => Ok(ControlResponse::SecretRotation(
            state
                .secrets
                .mark_accessed_by(&state.auth.resolve_user(&user_id)?, true, actor)?,
        )),
        ControlRequest::Unseal { key } => {
            if via == Via::Direct {
                return Err(ServiceError::BadRequest(
                    "aragora unseal opens the key ring of a running server, and none answers \
                     on its control socket: start it (without a usable key it starts sealed), \
                     or set ARAGORA_ENCRYPTION_KEY for commands run with the server stopped"
                        .into(),
                ));
            }
            // Named as what it is here: the variable is the server's, not
            // what the operator typed.
            let key = crate::config::parse_key("the unseal key", Some(key.expose()))
                .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
            let master = crate::crypto::MasterKey::from_key32(&key);
            Ok(ControlResponse::Unseal(
                state.keyring.unseal(master, actor)?,
            ))
        }
        ControlRequest::MasterKeyRotate { dry_run, approval } => {
            let opts = MasterRotation {
                dry_run,
                approval_id: approval,
                ..MasterRotation::default()
            };
            let progress = |done: usize, total: usize| {
                tracing::info!(done, total, "master-key rotation progress");
            };
            Ok(ControlResponse::MasterKeyRotate(
                crate::approvals::owner::master_key_rotate(
                    state,
                    opts,
                    actor,
                    via.as_str(),
                    &progress,
                )?,
            ))
        }
        ControlRequest::Backup { kind, out } => Ok(ControlResponse::Backup(state.backups.run(
            kind,
            Path::new(&out),
            actor,
        )?)),
        ControlRequest::Maintenance { mode } => {
            if via == Via::Direct {
                return Err(ServiceError::BadRequest(
                    "aragora maintenance switches a running server, and none answers on its \
                     control socket: set MAINTENANCE_MODE (off, read-only, on) for its next start"
                        .into(),
                ));
            }
            Ok(ControlResponse::Maintenance(
                state.maintenance.set(mode, actor, None)?,
            ))
        }
        ControlRequest::Admission { set } => {
            if via == Via::Direct {
                return Err(ServiceError::BadRequest(
                    "aragora admission changes the commit rate of a running server, and none \
                     answers on its control socket: the rate is runtime only (a server starts \
                     unlimited)"
                        .into(),
                ));
            }
            Ok(ControlResponse::Admission(match set {
                Some(limit) => {
                    crate::admission::set(state.store.as_ref(), &state.audit, limit, actor, None)?
                }
                None => crate::admission::current(state.store.as_ref())?,
            }))
        }
        // Marking is a job (one at a time, recorded like a migration run).
        ControlRequest::SecretRotation { user_id, .. } => {
            let user_id = state.auth.resolve_user(&user_id)?;
            let job = state.jobs.run_secret_rotation(&user_id, actor)?;
            let marks = job
                .marked
                .ok_or_else(|| ServiceError::Internal("the rotation job has no result".into()))?;
            Ok(ControlResponse::SecretRotation(marks))
        }
    }
}

/// The audit export signer, derived from the master key.
pub fn export_signer(state: &AppState) -> Result<ExportSigner, ServiceError> {
    Ok(ExportSigner::from_key_ring(&state.keyring)?)
}

/// `aragora migration`: one result per store (`{"results": [...]}` for
/// `--store=all`, the store's result otherwise).
fn run_migration(
    state: &AppState,
    store: &str,
    dry_run: bool,
    retry_failed: bool,
    skip_record: Option<&str>,
    actor: &str,
) -> Result<MigrationOutcome, ServiceError> {
    let stores = MigrationStore::parse(store)?;
    let mut results = Vec::new();
    for s in &stores {
        let v = if let Some(id) = skip_record {
            MigrationResult::Run(state.migration.skip_record(*s, id, actor)?.view())
        } else if dry_run {
            MigrationResult::DryRun(state.migration.dry_run(*s)?)
        } else if retry_failed {
            match state.migration.retry_failed(*s, actor)? {
                Some(st) => MigrationResult::Run(st.view()),
                None => MigrationResult::NothingToRetry(NothingToRetry {
                    store: s.name().into(),
                    nothing_to_retry: true,
                }),
            }
        } else {
            // One job for every store named (through the jobs service, like
            // `POST /api/security/migration/run`).
            let job = state.jobs.run_migration(store, actor)?;
            results = job.results.into_iter().map(MigrationResult::Run).collect();
            break;
        };
        results.push(v);
    }
    if store == "all" {
        Ok(MigrationOutcome::All {
            store: "all".into(),
            results,
        })
    } else {
        results
            .pop()
            .map(MigrationOutcome::One)
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
        let msg = Reply::error("the control socket accepts only the server's own user");
        write.write_all(&line_of(&msg)).await?;
        return Ok(());
    }
    // The line may carry a master key (`unseal`): zeroized when dropped, and
    // sized so a short line is never reallocated (leaving a copy behind).
    let mut line = Zeroizing::new(String::with_capacity(4096));
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST_BYTES as u64);
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(req) => {
            let operator = Operator::of_peer(peer.uid(), peer.pid());
            // Debug shows no key (`KeyHex` is redacted).
            tracing::info!(request = ?req, operator = %operator.describe(), "control command");
            match tokio::task::spawn_blocking(move || execute(&state, req, Via::Socket, &operator))
                .await
            {
                Ok(Ok(v)) => Reply {
                    ok: true,
                    result: Some(v),
                    error: None,
                },
                Ok(Err(e)) => Reply::error(e.to_string()),
                Err(e) => Reply::error(format!("worker failed: {e}")),
            }
        }
        Err(e) => Reply::error(format!("bad control request: {e}")),
    };
    write.write_all(&line_of(&response)).await?;
    write.shutdown().await
}

fn line_of(reply: &Reply) -> Vec<u8> {
    let mut line = serde_json::to_vec(reply).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"error\":\"response encoding failed: {e}\"}}").into_bytes()
    });
    line.push(b'\n');
    line
}

/// Client side: `Ok(None)` when no server listens (the caller then opens the
/// store itself).
pub fn call(
    data_dir: &Path,
    req: &ControlRequest,
) -> Result<Option<Result<ControlResponse, String>>, String> {
    let path = socket_path(data_dir);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    stream
        .set_read_timeout(Some(req.timeout()))
        .map_err(|e| e.to_string())?;
    // May carry a master key (`unseal`): zeroized, and written without a
    // formatted copy.
    let line = Zeroizing::new(serde_json::to_vec(req).map_err(|e| e.to_string())?);
    stream
        .write_all(&line)
        .and_then(|()| stream.write_all(b"\n"))
        .map_err(|e| format!("writing to {}: {e}", path.display()))?;
    let mut resp = String::new();
    BufReader::new(stream)
        .read_line(&mut resp)
        .map_err(|e| format!("reading from {}: {e}", path.display()))?;
    let reply: Reply =
        serde_json::from_str(&resp).map_err(|e| format!("bad response from the server: {e}"))?;
    match (reply.ok, reply.result) {
        (true, Some(r)) => Ok(Some(Ok(r))),
        (true, None) => Err("the server answered ok without a result".into()),
        (false, _) => Ok(Some(Err(reply
            .error
            .unwrap_or_else(|| "unknown error".into())))),
    }
}
