//! The Prometheus registry with every metric family of the runbook's Appendix A.
//! Families are registered at boot; each is recorded where its event happens (the
//! encryption, RBAC, auth and approval modules). The embedded store's own
//! signals are read at scrape time (`aedb.rs`), as are the few gauges that
//! describe state rather than count events (`scrape.rs`).

pub mod aedb;
pub mod ops;
pub mod scrape;
pub mod window;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::rbac::catalogue::{self, WILDCARD};

/// Latency buckets in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub encryption_operations: IntCounterVec,
    pub encryption_latency: HistogramVec,
    pub encryption_errors: IntCounterVec,
    /// `type="master"`: 1 when the master key is loaded and opens the key
    /// ring, 0 while sealed; `type="data"`: usable active data keys.
    pub active_keys: IntGaugeVec,
    pub rbac_decisions: IntCounterVec,
    pub rbac_denied: IntCounterVec,
    pub rbac_evaluation_latency: Histogram,
    pub auth_attempts: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub auth_latency: Histogram,
    pub approval_requests: IntCounterVec,
    pub pending_critical_approvals: IntGauge,
    /// Age of the oldest pending critical request: `CriticalOperationPendingTooLong`
    /// pages when one request has waited an hour.
    pub oldest_pending_critical_approval_age: IntGauge,
    pub approval_unauthorized_attempts: IntCounter,
    pub approval_timeouts: IntCounter,
    /// Approval webhook notifications by outcome (delivered, failed after
    /// the last attempt, dropped because the queue was full).
    pub approval_notifications: IntCounterVec,
    pub approval_notification_retries: IntCounter,
    pub approval_notification_queue_depth: IntGauge,
    /// Records a re-encryption migration could not rewrap, by store.
    pub migration_errors: IntCounterVec,
    /// Records a re-encryption migration handled, by store and outcome.
    pub migration_records: IntCounterVec,
    /// SIGHUP reloads of the HTTPS certificate, by outcome (ok, failed).
    pub tls_certificate_reloads: IntCounterVec,
    /// Secret values read through the API, by outcome (success, failure):
    /// the migration's decrypts are not reads and are not counted here.
    pub secret_reads: IntCounterVec,
    /// The busiest actor's secret reads in the last minute (no actor label:
    /// one series however many actors there are). Set at scrape time.
    pub secret_reads_busiest_actor: IntGauge,
    /// When the primary data key was created (Unix seconds).
    pub primary_key_created: IntGauge,
    /// The rotation period of data keys (seconds): the rule compares.
    pub key_rotation_period: IntGauge,
    /// 1 while a re-encryption migration of the store runs in this process.
    /// Set at scrape time.
    pub migration_running: IntGaugeVec,
    /// Records the running migration has handled so far (0 when none runs).
    /// Set at scrape time.
    pub migration_processed: IntGaugeVec,
}

/// `aragora_security_auth_failures_total{method}`: how the credential came.
pub mod auth_method {
    /// `POST /api/auth/login`.
    pub const PASSWORD: &str = "password";
    /// A bearer JWT access token.
    pub const JWT: &str = "jwt";
    /// A bearer API key (`ara_...`).
    pub const API_KEY: &str = "api_key";
    /// No credential, or an `Authorization` header that is not `Bearer <token>`.
    pub const HEADER: &str = "header";
}

/// The `role` label of a denial: built-in role names as they are, any other
/// (custom) role as `custom`, several roles sorted and comma-joined. Custom
/// role names are chosen by users, so as labels they would make the series
/// unbounded; built-in ones are a fixed set (2^9 combinations at most).
pub fn role_label(roles: &[String]) -> String {
    let mut names: Vec<&str> = roles
        .iter()
        .map(|r| catalogue::builtin(r).map(|b| b.name).unwrap_or("custom"))
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

/// The `permission` label of a decision: a catalogue permission or `*` as it
/// is, a path-scoped grant (`secrets.read:team-a/`) as its permission, any
/// other string as `other` (bounded, whatever a caller sends).
pub fn permission_label(permission: &str) -> &'static str {
    if permission == WILDCARD {
        return WILDCARD;
    }
    let base = permission.split(':').next().unwrap_or(permission);
    catalogue::find(base).map(|d| d.name).unwrap_or("other")
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(r: &Registry, name: &str, help: &str) -> Result<Histogram, prometheus::Error> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, prometheus::Error> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let encryption_latency = HistogramVec::new(
            HistogramOpts::new(
                "aragora_security_encryption_latency_seconds",
                "Encrypt/decrypt latency",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["operation"],
        )?;
        r.register(Box::new(encryption_latency.clone()))?;
        let approval_unauthorized_attempts = IntCounter::new(
            "aragora_approval_unauthorized_attempts_total",
            "Approval actions by callers not allowed to approve",
        )?;
        r.register(Box::new(approval_unauthorized_attempts.clone()))?;
        Ok(Self {
            encryption_operations: counter_vec(
                &r,
                "aragora_security_encryption_operations_total",
                "Encrypt and decrypt operations",
                &["operation"],
            )?,
            encryption_latency,
            encryption_errors: counter_vec(
                &r,
                "aragora_security_encryption_errors_total",
                "Encryption and decryption errors",
                &["reason"],
            )?,
            active_keys: {
                let g = IntGaugeVec::new(
                    Opts::new("aragora_security_active_keys", "Active encryption keys"),
                    &["type"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            rbac_decisions: counter_vec(
                &r,
                "aragora_security_rbac_decisions_total",
                "RBAC decisions",
                &["permission", "decision"],
            )?,
            rbac_denied: counter_vec(
                &r,
                "aragora_security_rbac_denied_total",
                "RBAC denials",
                &["permission", "role"],
            )?,
            rbac_evaluation_latency: histogram(
                &r,
                "aragora_security_rbac_evaluation_latency_seconds",
                "RBAC evaluation latency",
            )?,
            auth_attempts: counter_vec(
                &r,
                "aragora_security_auth_attempts_total",
                "Authentication attempts",
                &["method"],
            )?,
            auth_failures: counter_vec(
                &r,
                "aragora_security_auth_failures_total",
                "Authentication failures by credential method (password, jwt, api_key, header) and reason",
                &["method", "reason"],
            )?,
            auth_latency: histogram(
                &r,
                "aragora_security_auth_latency_seconds",
                "Authentication latency",
            )?,
            approval_requests: counter_vec(
                &r,
                "aragora_approval_requests_total",
                "Approval requests by operation, risk level and outcome (requested, approved, rejected, bypassed, expired, executed, failed, refused)",
                &["operation", "risk_level", "outcome"],
            )?,
            pending_critical_approvals: gauge(
                &r,
                "aragora_pending_critical_approvals",
                "Critical approvals pending",
            )?,
            oldest_pending_critical_approval_age: gauge(
                &r,
                "aragora_oldest_pending_critical_approval_age_seconds",
                "Seconds the oldest pending critical approval request has waited (0 when none)",
            )?,
            approval_unauthorized_attempts,
            approval_timeouts: {
                let c = IntCounter::new(
                    "aragora_approval_timeouts_total",
                    "Approval requests that expired before enough approvals",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            approval_notifications: counter_vec(
                &r,
                "aragora_approval_notifications_total",
                "Approval webhook notifications by outcome (delivered, failed after the last attempt, dropped when the queue was full)",
                &["outcome"],
            )?,
            approval_notification_retries: {
                let c = IntCounter::new(
                    "aragora_approval_notification_retries_total",
                    "Approval webhook delivery attempts retried",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            approval_notification_queue_depth: gauge(
                &r,
                "aragora_approval_notification_queue_depth",
                "Approval webhook notifications waiting for delivery",
            )?,
            migration_errors: counter_vec(
                &r,
                "aragora_security_migration_errors_total",
                "Records the re-encryption migration could not rewrap",
                &["store"],
            )?,
            migration_records: counter_vec(
                &r,
                "aragora_security_migration_records_total",
                "Records the re-encryption migration rewrapped",
                &["store", "outcome"],
            )?,
            tls_certificate_reloads: counter_vec(
                &r,
                "aragora_tls_certificate_reloads_total",
                "Reloads of the HTTPS certificate on SIGHUP, by outcome",
                &["outcome"],
            )?,
            secret_reads: counter_vec(
                &r,
                "aragora_security_secret_reads_total",
                "Secret values read through the API, by outcome (migration decrypts are not reads)",
                &["outcome"],
            )?,
            secret_reads_busiest_actor: gauge(
                &r,
                "aragora_security_secret_reads_busiest_actor_last_minute",
                "Secret reads in the last minute by the actor who read the most",
            )?,
            primary_key_created: gauge(
                &r,
                "aragora_security_primary_key_created_timestamp_seconds",
                "When the primary data key was created (Unix seconds)",
            )?,
            key_rotation_period: gauge(
                &r,
                "aragora_security_key_rotation_period_seconds",
                "Age at which the primary data key is due for rotation",
            )?,
            migration_running: gauge_vec(
                &r,
                "aragora_security_migration_running",
                "1 while a re-encryption migration of the store runs",
                &["store"],
            )?,
            migration_processed: gauge_vec(
                &r,
                "aragora_security_migration_processed_records",
                "Records the running migration has handled (0 when none runs)",
                &["store"],
            )?,
            registry: r,
        })
    }

    /// Registers the embedded store's `aedb_*` families, read from `source`
    /// at every scrape.
    pub fn register_aedb(&self, source: aedb::Source) -> Result<(), prometheus::Error> {
        self.registry
            .register(Box::new(aedb::AedbCollector::new(source)?))
    }

    /// Creates the series whose label values are known up front, so their names
    /// are in `/metrics` (at zero) before the first event.
    pub fn with_known_series(self) -> Self {
        for op in ["encrypt", "decrypt"] {
            self.encryption_operations.with_label_values(&[op]);
            self.encryption_latency.with_label_values(&[op]);
        }
        // Set by the key ring at boot (master 0 while sealed).
        for t in ["master", "data"] {
            self.active_keys.with_label_values(&[t]);
        }
        self.encryption_errors
            .with_label_values(&["decryption_failed"]);
        // The reasons the key ring records (`CryptoError::reason`, rotation).
        for reason in [
            "aad_mismatch",
            "unknown_key",
            "malformed",
            "rotation_failed",
        ] {
            self.encryption_errors.with_label_values(&[reason]);
        }
        // Every (method, reason) the code records: a rule over a series
        // born at its first failure would miss that failure.
        use auth_method::{API_KEY, HEADER, JWT, PASSWORD};
        for (method, reason) in [
            (PASSWORD, "bad_password"),
            (PASSWORD, "locked"),
            (PASSWORD, "rate_limited"),
            (PASSWORD, "disabled"),
            (PASSWORD, "revoked"),
            (PASSWORD, "malformed"),
            (JWT, "expired"),
            (JWT, "bad_signature"),
            (JWT, "malformed"),
            (JWT, "invalid_claims"),
            (JWT, "revoked"),
            (JWT, "disabled"),
            (API_KEY, "bad_signature"),
            (API_KEY, "malformed"),
            (API_KEY, "revoked"),
            (API_KEY, "disabled"),
            (HEADER, "missing"),
            (HEADER, "malformed"),
        ] {
            self.auth_failures.with_label_values(&[method, reason]);
        }
        for method in [PASSWORD, JWT, API_KEY] {
            self.auth_attempts.with_label_values(&[method]);
        }
        for decision in ["allow", "deny"] {
            self.rbac_decisions.with_label_values(&["*", decision]);
        }
        // Listed from boot; a (permission, role) series is still born at 1
        // on its first denial, which SensitivePermissionDenied catches.
        self.rbac_denied.with_label_values(&["*", "*"]);
        for outcome in ["success", "failure"] {
            self.secret_reads.with_label_values(&[outcome]);
        }
        self.key_rotation_period
            .set(crate::encryption::KEY_ROTATION_PERIOD_US / 1_000_000);
        for op in crate::approvals::Operation::all() {
            self.approval_requests.with_label_values(&[
                op.as_str(),
                op.policy().risk_level.as_str(),
                "requested",
            ]);
        }
        // The migration's series are created by the migration
        // (`encryption::migration::register_metrics`): it owns the store names.
        for outcome in ["delivered", "failed", "dropped"] {
            self.approval_notifications.with_label_values(&[outcome]);
        }
        for outcome in ["ok", "failed"] {
            self.tls_certificate_reloads.with_label_values(&[outcome]);
        }
        self
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    /// Custom role names are the users' to choose: as labels they would
    /// grow the series without bound.
    #[test]
    fn role_labels_keep_builtin_names_and_fold_custom_ones() {
        assert_eq!(role_label(&[]), "none");
        assert_eq!(role_label(&roles(&["viewer"])), "viewer");
        assert_eq!(role_label(&roles(&["team-a-reader"])), "custom");
        assert_eq!(
            role_label(&roles(&["viewer", "team-b", "member", "team-a", "viewer"])),
            "custom,member,viewer"
        );
    }

    #[test]
    fn permission_labels_are_catalogue_names() {
        assert_eq!(permission_label("audit.read"), "audit.read");
        assert_eq!(permission_label("secrets.read:team-a/db"), "secrets.read");
        assert_eq!(permission_label("*"), "*");
        assert_eq!(permission_label("anything.else"), "other");
    }
}
