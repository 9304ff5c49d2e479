//! Operations families: online backups (`crate::backup`) and the runtime
//! maintenance mode (`crate::maintenance`). Registered on the same registry
//! as the rest, held by the services that record them.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// The `kind` label of the backup families.
pub const BACKUP_KINDS: [&str; 2] = ["full", "incremental"];

#[derive(Clone, Debug)]
pub struct BackupMetrics {
    /// Backups that failed, by kind (scheduled and on demand alike).
    pub failures: IntCounterVec,
    /// When the newest backup of each kind completed (Unix seconds; 0: none
    /// since this process started).
    pub last_success: IntGaugeVec,
}

impl BackupMetrics {
    pub fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        let failures = IntCounterVec::new(
            Opts::new(
                "aragora_backup_failures_total",
                "Online backups that failed, by kind (full, incremental)",
            ),
            &["kind"],
        )?;
        r.register(Box::new(failures.clone()))?;
        let last_success = IntGaugeVec::new(
            Opts::new(
                "aragora_backup_last_success_timestamp_seconds",
                "When the newest online backup of each kind completed (Unix seconds, 0: none yet)",
            ),
            &["kind"],
        )?;
        r.register(Box::new(last_success.clone()))?;
        // Born at zero, so `increase()` sees the first failure and an alert
        // on a missing success has a series to read.
        for kind in BACKUP_KINDS {
            failures.with_label_values(&[kind]);
            last_success.with_label_values(&[kind]);
        }
        Ok(Self {
            failures,
            last_success,
        })
    }
}

/// `aragora_maintenance_mode{mode}`: 1 for the current mode, 0 for the others.
pub fn maintenance_gauge(r: &Registry) -> Result<IntGaugeVec, prometheus::Error> {
    let g = IntGaugeVec::new(
        Opts::new(
            "aragora_maintenance_mode",
            "The runtime maintenance mode: 1 for the current one (off, read-only, on)",
        ),
        &["mode"],
    )?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}
