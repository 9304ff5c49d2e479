//! The Prometheus registry with every metric family of the runbook's Appendix A.
//! Families are registered at boot; each is recorded where its event happens (the
//! encryption, RBAC, auth and approval modules, as they land).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

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
                "Authentication failures by reason",
                &["reason"],
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
            registry: r,
        })
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
        for reason in [
            "expired",
            "bad_signature",
            "malformed",
            "revoked",
            "disabled",
            "bad_password",
            "locked",
            "rate_limited",
        ] {
            self.auth_failures.with_label_values(&[reason]);
        }
        for method in ["password", "jwt", "api_key"] {
            self.auth_attempts.with_label_values(&[method]);
        }
        for decision in ["allow", "deny"] {
            self.rbac_decisions.with_label_values(&["*", decision]);
        }
        self.rbac_denied.with_label_values(&["*", "*"]);
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
