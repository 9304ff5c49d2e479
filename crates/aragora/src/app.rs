//! Application state: the services every handler reaches, assembled once at boot.

use std::sync::Arc;

use crate::audit::AuditLog;
use crate::auth::AuthService;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::rbac::Rbac;
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
}

impl AppState {
    /// Wires the services over `store`. `jwt_secret` is the validated secret
    /// (from the environment or, in development, the generated key file).
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        jwt_secret: &str,
    ) -> Result<Self, StoreError> {
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
        Ok(Self {
            config,
            metrics,
            store,
            audit,
            rbac,
            auth,
        })
    }
}
