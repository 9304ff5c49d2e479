//! The runtime admission knob: `aragora admission --max-commits-per-sec N`,
//! `--unlimited` and `POST /api/admin/admission` change the embedded store's
//! commit rate without a restart (the aedb runbook's "reduce the admission
//! rate"). Commits beyond it are refused at once (503 naming the rate) and
//! counted in `aedb_admission_rejections_total`; the rate in force is
//! `aedb_admission_max_commits_per_sec` (0: unlimited).
//!
//! Runtime only, like `aragora maintenance`: a restart starts unlimited. A
//! rate that outlived the incident that called for it would throttle a healthy
//! server with nobody remembering why.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditError, AuditEvent, AuditLog, Outcome};
use crate::error::ServiceError;
use crate::store::{Store, StoreError};

/// How long a change keeps retrying its audit entry while the store refuses
/// commits for admission (the entry must be written: a change is never made
/// unaudited).
const AUDIT_PATIENCE: Duration = Duration::from_secs(15);
const AUDIT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// One change at a time: the audited `previous` is the one replaced.
static CHANGING: Mutex<()> = parking_lot::const_mutex(());

/// The rate to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Unlimited,
    PerSec(NonZeroU32),
}

impl Limit {
    fn rate(self) -> Option<u32> {
        match self {
            Limit::Unlimited => None,
            Limit::PerSec(n) => Some(n.get()),
        }
    }
}

/// The rate in force (`aragora admission`, the API), and what it replaced
/// when it was just changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdmissionView {
    /// Commits admitted per second (0: unlimited).
    pub max_commits_per_sec: u32,
    pub unlimited: bool,
    /// The rate before this change (0: unlimited); absent when only shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_max_commits_per_sec: Option<u32>,
}

impl AdmissionView {
    fn of(rate: Option<u32>, previous: Option<Option<u32>>) -> Self {
        Self {
            max_commits_per_sec: rate.unwrap_or(0),
            unlimited: rate.is_none(),
            previous_max_commits_per_sec: previous.map(|p| p.unwrap_or(0)),
        }
    }
}

/// `admission_changed` details (0: unlimited).
#[derive(Serialize)]
struct Changed {
    previous_max_commits_per_sec: u32,
    max_commits_per_sec: u32,
}

fn unsupported(store: &dyn Store) -> ServiceError {
    ServiceError::BadRequest(format!(
        "the {} store has no admission control in this process: throttle it on its own server",
        store.backend()
    ))
}

/// The rate in force.
pub fn current(store: &dyn Store) -> Result<AdmissionView, ServiceError> {
    let m = store
        .operational_metrics()
        .ok_or_else(|| unsupported(store))?;
    Ok(AdmissionView::of(m.max_commits_per_sec, None))
}

/// Sets the rate, audited as `admission_changed` by `actor`. Fail closed: a
/// lower rate applies only once its entry is written; a higher one (or
/// unlimited) applies first, so its own entry is not refused by the rate it
/// lifts, and is undone when the entry cannot be written.
pub fn set(
    store: &dyn Store,
    audit: &AuditLog,
    limit: Limit,
    actor: &str,
    ip: Option<String>,
) -> Result<AdmissionView, ServiceError> {
    let _one = CHANGING.lock();
    let before = current(store)?;
    let previous = (!before.unlimited).then_some(before.max_commits_per_sec);
    let next = limit.rate();
    let event = AuditEvent::new("admission_changed", actor, Outcome::Success)
        .ip(ip)
        .details(Changed {
            previous_max_commits_per_sec: previous.unwrap_or(0),
            max_commits_per_sec: next.unwrap_or(0),
        });
    let lowers = match (previous, next) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(p), Some(n)) => n <= p,
    };
    let replaced = if lowers {
        record_patiently(audit, &event)?;
        store.set_admission_rate(next)?
    } else {
        let replaced = store.set_admission_rate(next)?;
        if let Err(e) = record_patiently(audit, &event) {
            if let Err(undo) = store.set_admission_rate(replaced) {
                tracing::error!(error = %undo, "undoing an unaudited admission change failed");
            }
            return Err(e);
        }
        replaced
    };
    tracing::warn!(
        previous = replaced.unwrap_or(0),
        max_commits_per_sec = next.unwrap_or(0),
        actor,
        "admission rate changed (0: unlimited)"
    );
    Ok(AdmissionView::of(next, Some(replaced)))
}

/// Writes `event`, retrying while the store turns commits away for admission
/// (a rate is being lowered under load).
fn record_patiently(audit: &AuditLog, event: &AuditEvent) -> Result<(), ServiceError> {
    let deadline = Instant::now() + AUDIT_PATIENCE;
    loop {
        match audit.record(event.clone()) {
            Ok(_) => return Ok(()),
            Err(AuditError::Write(StoreError::Unavailable(_))) if Instant::now() < deadline => {
                std::thread::sleep(AUDIT_RETRY_PAUSE);
            }
            Err(e) => return Err(e.into()),
        }
    }
}
