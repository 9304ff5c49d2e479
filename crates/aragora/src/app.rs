//! Application state: the services every handler reaches, assembled once at boot.

use std::sync::Arc;

use crate::approvals::execute::Executor;
use crate::approvals::notify::{Approver, ApproverResolver, NotifyError};
use crate::approvals::{ApprovalService, Notifier, Operation};
use crate::audit::AuditLog;
use crate::auth::AuthService;
use crate::config::{Config, Environment};
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
    pub auth: Arc<AuthService>,
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
    /// Online backups (`aragora backup`, the schedule).
    pub backups: Arc<crate::backup::Backups>,
    /// The runtime maintenance mode (`aragora maintenance`, the API).
    pub maintenance: Arc<crate::maintenance::Maintenance>,
    /// On a shared store: what this replica has loaded of the state other
    /// replicas change (`crate::cluster`).
    pub cluster: crate::cluster::ClusterSync,
    /// On a shared store: sets the Redis tags of what this process writes
    /// (`crate::cluster::confirmed`).
    publisher: Option<Arc<crate::cluster::confirmed::Publisher>>,
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

/// The eligible approvers a notification names: the same list as
/// `GET .../eligible-approvers` (`AuthService::eligible_approvers`).
fn approver_resolver(auth: Arc<AuthService>) -> ApproverResolver {
    Arc::new(move |operation: Operation, requester: &str| {
        match auth.eligible_approvers(operation.policy().approver_roles, requester) {
            Ok(users) => users
                .into_iter()
                .map(|u| Approver {
                    id: u.id,
                    email: u.email,
                })
                .collect(),
            Err(e) => {
                // The notification still goes out, naming no one: the
                // receiver can read eligible-approvers itself.
                tracing::warn!(error = %e, "listing eligible approvers for a notification failed");
                Vec::new()
            }
        }
    })
}

impl AppState {
    /// Wires the services over `store`. `jwt_secret` is the validated secret
    /// (from the environment or, in development, the generated key file).
    /// Any store but the embedded one (opened by this process alone) is
    /// taken as shared with other replicas.
    pub fn new(config: Config, store: Arc<dyn Store>, jwt_secret: &str) -> Result<Self, BootError> {
        let shared = store.backend() != "aedb";
        Self::assemble(config, store, jwt_secret, shared)
    }

    /// [`Self::new`] as one of several replicas on `store`, whatever its
    /// backend (tests run replicas over one embedded store in one process).
    pub fn new_replica(
        config: Config,
        store: Arc<dyn Store>,
        jwt_secret: &str,
    ) -> Result<Self, BootError> {
        Self::assemble(config, store, jwt_secret, true)
    }

    fn assemble(
        config: Config,
        store: Arc<dyn Store>,
        jwt_secret: &str,
        shared: bool,
    ) -> Result<Self, BootError> {
        let metrics = Metrics::new()
            .map_err(|e| StoreError::Backend(format!("metrics registry: {e}")))?
            .with_known_series();
        let registry_error =
            |e: prometheus::Error| StoreError::Backend(format!("metrics registry: {e}"));
        let redis = match &config.redis_url {
            Some(url) => {
                let link_metrics = crate::redis_link::RedisMetrics::register(&metrics.registry)
                    .map_err(registry_error)?;
                let link = crate::redis_link::RedisLink::new(url.expose(), link_metrics)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                tracing::info!(host = %link.status().host, "login limits shared through redis");
                Some(Arc::new(link))
            }
            None => None,
        };
        let publisher =
            shared.then(|| Arc::new(crate::cluster::confirmed::Publisher::new(redis.clone())));
        let store: Arc<dyn Store> = Arc::new(match &publisher {
            Some(p) => crate::cluster::SyncedStore::publishing(store, p.clone()),
            None => crate::cluster::SyncedStore::new(store),
        });
        let mut cluster = crate::cluster::ClusterSync::new(shared);
        if let (true, Some(link)) = (shared, &redis) {
            cluster = cluster.with_confirmed_reads(
                crate::cluster::confirmed::ConfirmedReads::new(link.clone(), &metrics.registry)
                    .map_err(registry_error)?,
            );
            tracing::info!(
                "per-request reads of the shared store are cached and confirmed through redis"
            );
        }
        // Before anything is loaded: a change racing the loads below is then
        // newer than what this replica saw, and reloaded on a request.
        cluster.prime(store.as_ref())?;
        let engine = store.clone();
        metrics
            .register_aedb(Arc::new(move || engine.operational_metrics()))
            .map_err(|e| StoreError::Backend(format!("metrics registry: {e}")))?;
        let exclusive_store = store.backend() == "aedb";
        let audit = Arc::new(AuditLog::new(store.clone()));
        let rbac = Arc::new(Rbac::load(
            store.as_ref(),
            metrics.clone(),
            config.rbac_cache_ttl,
        )?);
        let auth = Arc::new(AuthService::new(
            &config,
            jwt_secret,
            store.clone(),
            audit.clone(),
            rbac.clone(),
            metrics.clone(),
            redis,
        )?);
        // Production starts sealed without a master key that opens the ring
        // (Vault's model: login, RBAC, audit and health keep serving, and
        // `aragora unseal` or a restart with the key opens it); development
        // always has its generated key, so a wrong one is a mistake to stop on.
        let sealed_start = config.environment == Environment::Production;
        let master = config.encryption_key.as_ref().map(MasterKey::from_key32);
        if master.is_none() && !sealed_start {
            return Err(BootError::NoEncryptionKey);
        }
        let keyring = Arc::new(KeyRing::open(
            store.clone(),
            audit.clone(),
            metrics.clone(),
            master,
            config
                .encryption_key_previous
                .as_ref()
                .map(MasterKey::from_key32),
            &config.data_dir,
            config.environment,
            sealed_start,
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
                        .with_resolver(approver_resolver(auth.clone())),
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
        let backups = Arc::new(crate::backup::Backups::new(
            store.clone(),
            audit.clone(),
            config.data_dir.clone(),
            crate::metrics::ops::BackupMetrics::register(&metrics.registry)
                .map_err(registry_error)?,
        ));
        let maintenance = Arc::new(crate::maintenance::Maintenance::new(
            config.maintenance_boot,
            crate::metrics::ops::maintenance_gauge(&metrics.registry).map_err(registry_error)?,
            audit.clone(),
        ));
        if shared {
            maintenance.follow(store.as_ref())?;
        }
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
            // directory lock); the shared PostgreSQL store is not.
            executor: Executor::new(exclusive_store),
            notifier,
            jobs,
            password_slots: tokio::sync::Semaphore::new(config_slots),
            backups,
            maintenance,
            cluster,
            publisher,
        })
    }

    /// Before an operator command exits: waits until no replica trusts a
    /// cached read from before this process's changes, when this process had
    /// no Redis to say so at once (`crate::cluster::confirmed`).
    pub fn settle_replicas(&self) {
        if let Some(p) = &self.publisher {
            p.settle();
        }
    }

    /// Brings this replica's in-memory state up to the shared store before a
    /// request is decided (`crate::cluster`); nothing on a single process.
    pub fn catch_up(&self) -> Result<(), crate::error::ServiceError> {
        self.catch_up_reading(None).map(|_| ())
    }

    /// `catch_up`, reading ahead (in the same round trip) what authenticating
    /// `authorization` will read when it is a session token.
    pub fn catch_up_reading(
        &self,
        authorization: Option<&str>,
    ) -> Result<Option<crate::auth::tokens::SessionPrefetch>, crate::error::ServiceError> {
        let prefetch = self.session_prefetch(authorization);
        let keys = prefetch.as_ref().map(|p| p.keys());
        let found = self.cluster.catch_up_reading(
            self.store.as_ref(),
            keys.as_ref().map_or(&[][..], |k| &k[..]),
            |c| self.reload_collection(c),
        )?;
        Ok(prefetch.map(|p| p.with_found(found)))
    }

    /// `catch_up_reading` from an async worker: the shared store's round trip
    /// is awaited, not waited out on a blocking thread; a reload (another
    /// replica changed something) runs on the blocking pool.
    pub async fn catch_up_reading_async(
        self: &Arc<Self>,
        authorization: Option<&str>,
    ) -> Result<Option<crate::auth::tokens::SessionPrefetch>, crate::error::ServiceError> {
        let prefetch = self.session_prefetch(authorization);
        let keys = prefetch.as_ref().map(|p| p.keys());
        let state = self.clone();
        let found = self
            .cluster
            .catch_up_reading_async(
                self.store.as_ref(),
                keys.as_ref().map_or(&[][..], |k| &k[..]),
                move |now| async move {
                    tokio::task::spawn_blocking(move || {
                        state
                            .cluster
                            .reload_stale(now, |c| state.reload_collection(c))
                    })
                    .await
                    .map_err(|e| {
                        crate::error::ServiceError::Internal(format!("reload task: {e}"))
                    })?
                },
            )
            .await?;
        Ok(prefetch.map(|p| p.with_found(found)))
    }

    fn session_prefetch(
        &self,
        authorization: Option<&str>,
    ) -> Option<crate::auth::tokens::SessionPrefetch> {
        if self.cluster.enabled() {
            self.auth.session_prefetch(authorization)
        } else {
            None
        }
    }

    /// Reloads one watched collection another replica changed.
    fn reload_collection(
        &self,
        c: crate::store::Collection,
    ) -> Result<(), crate::error::ServiceError> {
        use crate::store::Collection;
        let store = self.store.as_ref();
        match c {
            Collection::Roles => self.rbac.reload(store)?,
            Collection::IpBlocks => self.auth.reload_ip_blocks()?,
            Collection::KeyRing => self.keyring.refresh()?,
            Collection::MaintenanceMode => self.maintenance.follow(store)?,
            _ => {}
        }
        tracing::info!(
            collection = c.name(),
            "reloaded: changed by another replica"
        );
        Ok(())
    }
}
