//! Application state: the services every handler reaches, assembled once at boot.

use std::sync::Arc;

use crate::approvals::execute::Executor;
use crate::approvals::notify::{Approver, ApproverResolver, NotifyError};
use crate::approvals::{ApprovalService, Notifier, Operation};
use crate::audit::AuditLog;
use crate::auth::AuthService;
use crate::config::Config;
use crate::crypto::MasterKey;
use crate::encryption::migration::{MigrationOptions, Migrator};
use crate::encryption::{KeyRing, KeyRingError};
use crate::jobs::{JobError, Jobs};
use crate::metrics::Metrics;
use crate::rbac::Rbac;
use crate::secrets::SecretsService;
use crate::store::{Store, StoreError};

pub use crate::api::router;

/// Shared by every request handler.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub metrics: Metrics,
    pub store: Arc<dyn Store>,
    pub audit: Arc<AuditLog>,
    pub rbac: Arc<Rbac>,
    pub auth: AuthService,
    /// Data keys (encryption issue #8).
    pub keyring: Arc<KeyRing>,
    pub secrets: Arc<SecretsService>,
    /// Re-encryption migration (rewraps records under the primary key).
    pub migration: Arc<Migrator>,
    /// Approval gates (issue #15).
    pub approvals: ApprovalService,
    /// Runs approved requests, once each.
    pub executor: Executor,
    /// Approval webhook notifications (APPROVAL_WEBHOOK_URL); its delivery
    /// task is spawned by `serve` (`Notifier::run`).
    pub notifier: Option<Arc<Notifier>>,
    /// Long operations (migration runs), one at a time.
    pub jobs: Arc<Jobs>,
    /// Password hashes computed at once (Argon2id: ~20 ms of CPU and 19 MiB
    /// each): without a bound, a flood of logins from many addresses would
    /// exhaust memory before any per-IP limit bites.
    pub password_slots: tokio::sync::Semaphore,
}

/// Why the services could not be assembled (boot is refused).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    KeyRing(#[from] KeyRingError),
    #[error("ARAGORA_ENCRYPTION_KEY is not set")]
    NoEncryptionKey,
    #[error("jobs: {0}")]
    Jobs(#[from] JobError),
    #[error(transparent)]
    Notify(#[from] NotifyError),
}

/// The eligible approvers of `operation` requested by `requester`, as
/// `GET .../eligible-approvers` lists them: enabled users holding one of the
/// operation's approver roles and `approvals.approve`, not the requester.
fn approver_resolver(store: Arc<dyn Store>, rbac: Arc<Rbac>) -> ApproverResolver {
    Arc::new(move |operation: Operation, requester: &str| {
        let roles = operation.policy().approver_roles;
        let mut out = Vec::new();
        let scan = crate::store::for_each_json::<crate::auth::model::User>(
            store.as_ref(),
            crate::store::Collection::Users,
            |_, _, u| {
                if u.id != requester
                    && !u.disabled
                    && u.roles.iter().any(|r| roles.contains(&r.as_str()))
                    && rbac.evaluate(&u.roles, "approvals.approve").is_some()
                {
                    out.push(Approver {
                        id: u.id,
                        email: u.email,
                    });
                }
                Ok(())
            },
        );
        if let Err(e) = scan {
            // The notification still goes out, naming no one: the receiver
            // can read eligible-approvers itself.
            tracing::warn!(error = %e, "listing eligible approvers for a notification failed");
        }
        out
    })
}

impl AppState {
    /// Wires the services over `store`. `jwt_secret` is the validated secret
    /// (from the environment or, in development, the generated key file).
    pub fn new(config: Config, store: Arc<dyn Store>, jwt_secret: &str) -> Result<Self, BootError> {
        let metrics = Metrics::new()
            .map_err(|e| StoreError::Backend(format!("metrics registry: {e}")))?
            .with_known_series();
        let audit = Arc::new(AuditLog::new(store.clone()));
        let rbac = Arc::new(Rbac::load(
            store.as_ref(),
            metrics.clone(),
            config.rbac_cache_ttl,
        )?);
        let auth = AuthService::new(
            &config,
            jwt_secret,
            store.clone(),
            audit.clone(),
            rbac.clone(),
            metrics.clone(),
        )?;
        let master = config
            .encryption_key
            .as_ref()
            .map(MasterKey::from_key32)
            .ok_or(BootError::NoEncryptionKey)?;
        let keyring = Arc::new(KeyRing::open(
            store.clone(),
            audit.clone(),
            metrics.clone(),
            master,
            &config.data_dir,
            config.environment,
            vec![crate::secrets::encrypted_collection()],
        )?);
        let secrets = Arc::new(SecretsService::new(
            store.clone(),
            audit.clone(),
            keyring.clone(),
            rbac.clone(),
        ));
        let migration = Arc::new(Migrator::new(
            store.clone(),
            audit.clone(),
            keyring.clone(),
            metrics.clone(),
            MigrationOptions::from_config(&config),
        ));
        let notifier = match &config.approval_webhook {
            Some(w) => {
                tracing::info!(url = ?w.url, "approval notifications: on");
                Some(Arc::new(
                    Notifier::new(w.clone(), metrics.clone())?
                        .with_resolver(approver_resolver(store.clone(), rbac.clone())),
                ))
            }
            None => {
                tracing::info!("approval notifications: off (APPROVAL_WEBHOOK_URL is not set)");
                None
            }
        };
        let mut approvals = ApprovalService::new(
            store.clone(),
            audit.clone(),
            metrics.clone(),
            config.approvals.clone(),
        );
        if let Some(n) = &notifier {
            approvals = approvals.with_notifier(n.clone());
        }
        let jobs = Arc::new(Jobs::open(
            store.clone(),
            migration.clone(),
            secrets.clone(),
            config.faults.clone(),
        )?);
        let config_slots = config.password_hash_concurrency;
        Ok(Self {
            config,
            metrics,
            store,
            audit,
            rbac,
            auth,
            keyring,
            secrets,
            migration,
            approvals,
            // The embedded store is opened by this process alone (its
            // directory lock); a shared store must say otherwise.
            executor: Executor::new(true),
            notifier,
            jobs,
            password_slots: tokio::sync::Semaphore::new(config_slots),
        })
    }
}
