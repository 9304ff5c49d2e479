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
        self.audit.record(
            AuditEvent::new("maintenance_mode_changed", actor, Outcome::Success)
                .ip(ip)
                .details(MaintenanceChange { previous, mode }),
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

    fn show(&self, mode: MaintenanceMode) {
        for m in MaintenanceMode::ALL {
            self.gauge
                .with_label_values(&[m.name()])
                .set(i64::from(m == mode));
        }
    }
}
