//! The runtime maintenance mode, switched without a restart (`aragora
//! maintenance`, `POST /api/admin/maintenance`); MAINTENANCE_MODE sets the
//! boot value. `on` is the lockdown (only health, metrics and `/api/admin/*`
//! are served); `read-only` freezes writes: every request that is not a read
//! answers 503 naming the mode, except the admin incident actions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use prometheus::IntGaugeVec;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::error::ServiceError;
use crate::store::{Collection, Expect, Store, StoreError, WriteOp, get_json};

/// The record of `Collection::MaintenanceMode` holding the mode.
const MODE_ID: &str = "mode";

/// The stored mode, written with every switch: replicas on a shared store
/// follow it (`crate::cluster`).
#[derive(Debug, Serialize, Deserialize)]
struct StoredMode {
    mode: MaintenanceMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum MaintenanceMode {
    #[serde(rename = "off")]
    Off,
    #[serde(rename = "read-only")]
    ReadOnly,
    #[serde(rename = "on")]
    On,
}

impl MaintenanceMode {
    pub const ALL: [MaintenanceMode; 3] = [
        MaintenanceMode::Off,
        MaintenanceMode::ReadOnly,
        MaintenanceMode::On,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MaintenanceMode::Off => "off",
            MaintenanceMode::ReadOnly => "read-only",
            MaintenanceMode::On => "on",
        }
    }

    pub fn parse(s: &str) -> Result<Self, ServiceError> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s.trim())
            .ok_or_else(|| {
                ServiceError::BadRequest(format!(
                    "maintenance mode must be off, read-only or on, got {s:?}"
                ))
            })
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => MaintenanceMode::ReadOnly,
            2 => MaintenanceMode::On,
            _ => MaintenanceMode::Off,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            MaintenanceMode::Off => 0,
            MaintenanceMode::ReadOnly => 1,
            MaintenanceMode::On => 2,
        }
    }
}

/// What a switch did (`aragora maintenance`, the API).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MaintenanceChange {
    pub previous: MaintenanceMode,
    pub mode: MaintenanceMode,
}

#[derive(Debug)]
pub struct Maintenance {
    mode: AtomicU8,
    gauge: IntGaugeVec,
    audit: Arc<AuditLog>,
}

impl Maintenance {
    pub fn new(boot: MaintenanceMode, gauge: IntGaugeVec, audit: Arc<AuditLog>) -> Self {
        let m = Self {
            mode: AtomicU8::new(boot.as_u8()),
            gauge,
            audit,
        };
        m.show(boot);
        m
    }

    pub fn mode(&self) -> MaintenanceMode {
        MaintenanceMode::from_u8(self.mode.load(Ordering::Acquire))
    }

    /// Switches to `mode`, audited as `maintenance_mode_changed` (the
    /// switch happens only once the entry is written: fail closed).
    pub fn set(
        &self,
        mode: MaintenanceMode,
        actor: &str,
        ip: Option<String>,
    ) -> Result<MaintenanceChange, ServiceError> {
        let previous = self.mode();
        self.audit.record_with(
            AuditEvent::new("maintenance_mode_changed", actor, Outcome::Success)
                .ip(ip)
                .details(MaintenanceChange { previous, mode }),
            vec![WriteOp::put_json(
                Collection::MaintenanceMode,
                MODE_ID,
                &StoredMode { mode },
                Expect::Any,
            )?],
        )?;
        let previous = MaintenanceMode::from_u8(self.mode.swap(mode.as_u8(), Ordering::AcqRel));
        self.show(mode);
        tracing::warn!(
            previous = previous.name(),
            mode = mode.name(),
            actor,
            "maintenance mode changed"
        );
        Ok(MaintenanceChange { previous, mode })
    }

    /// Takes the mode last switched through any replica (a shared store:
    /// `crate::cluster`), without an audit entry: the switch was audited
    /// where it was made. No stored switch leaves the mode as it is.
    pub fn follow(&self, store: &dyn Store) -> Result<(), StoreError> {
        if let Some((_, stored)) =
            get_json::<StoredMode>(store, Collection::MaintenanceMode, MODE_ID)?
        {
            let previous =
                MaintenanceMode::from_u8(self.mode.swap(stored.mode.as_u8(), Ordering::AcqRel));
            self.show(stored.mode);
            if previous != stored.mode {
                tracing::warn!(
                    previous = previous.name(),
                    mode = stored.mode.name(),
                    "maintenance mode changed by another replica"
                );
            }
        }
        Ok(())
    }

    fn show(&self, mode: MaintenanceMode) {
        for m in MaintenanceMode::ALL {
            self.gauge
                .with_label_values(&[m.name()])
                .set(i64::from(m == mode));
        }
    }
}
