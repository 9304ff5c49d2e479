//! Recent permission denials, read from the audit log and grouped the way the
//! runbook's on-call engineer reads them (`/api/security/rbac/denials/recent`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit::{AuditError, AuditLog, MAX_SEARCH_LIMIT, SearchFilter};

/// Denials of one (user, permission, role) in the window.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DenialRow {
    pub user_id: String,
    pub permission: String,
    /// The user's roles, comma-separated.
    pub role: String,
    pub sensitive: Option<bool>,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub ip_addresses: Vec<String>,
}

/// Denial entries one call reads at most (10 pages of the audit search). The
/// rows' counts stay exact up to it; beyond it the oldest denials of the window
/// are left out and the runbook pages the audit search instead.
pub const MAX_DENIALS_READ: usize = 10 * MAX_SEARCH_LIMIT;

/// Distinct client addresses kept per row; a row denied from more shows the
/// first ones seen (newest pages first) and its count stays exact.
pub const MAX_ADDRESSES_PER_ROW: usize = 32;

/// Denials of the last `minutes`, one row per (user, permission, role) with
/// its count (denials, not rows), most frequent first. Pages are folded into
/// the rows as they are read, so memory is one page plus the rows, not every
/// entry of the window.
pub fn recent(audit: &AuditLog, minutes: u64) -> Result<Vec<DenialRow>, AuditError> {
    let mut groups: BTreeMap<(String, String, String), (DenialRow, i64, i64)> = BTreeMap::new();
    let mut read = 0usize;
    let mut before = None;
    loop {
        let page = audit.search(&SearchFilter {
            action: Some("permission_denied".into()),
            minutes: Some(minutes),
            limit: MAX_SEARCH_LIMIT,
            before: before.take(),
            ..SearchFilter::default()
        })?;
        read += page.entries.len();
        for e in page.entries {
            let text = |k: &str| e.details[k].as_str().unwrap_or_default().to_string();
            let (permission, role) = (text("permission"), text("role"));
            let (row, first_us, last_us) = groups
                .entry((e.actor.clone(), permission.clone(), role.clone()))
                .or_insert_with(|| {
                    (
                        DenialRow {
                            user_id: e.actor.clone(),
                            permission,
                            role,
                            sensitive: e.details["sensitive"].as_bool(),
                            count: 0,
                            first_seen: e.timestamp.clone(),
                            last_seen: e.timestamp.clone(),
                            ip_addresses: Vec::new(),
                        },
                        e.timestamp_us,
                        e.timestamp_us,
                    )
                });
            row.count += 1;
            if e.timestamp_us < *first_us {
                *first_us = e.timestamp_us;
                row.first_seen = e.timestamp.clone();
            }
            if e.timestamp_us > *last_us {
                *last_us = e.timestamp_us;
                row.last_seen = e.timestamp.clone();
            }
            if let Some(ip) = e.ip_address
                && row.ip_addresses.len() < MAX_ADDRESSES_PER_ROW
                && !row.ip_addresses.contains(&ip)
            {
                row.ip_addresses.push(ip);
            }
        }
        match page.next_before {
            Some(b) if read < MAX_DENIALS_READ => before = Some(b),
            _ => break,
        }
    }
    let mut rows: Vec<DenialRow> = groups.into_values().map(|(row, _, _)| row).collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.count));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::{AuditEvent, Outcome};
    use crate::store::{EmbeddedStore, Store};

    fn deny(audit: &AuditLog, user: &str, permission: &str, ip: &str) {
        audit
            .record(
                AuditEvent::new("permission_denied", user, Outcome::Denied)
                    .ip(Some(ip.to_string()))
                    .details(serde_json::json!({
                        "permission": permission,
                        "role": "viewer",
                        "sensitive": false,
                    })),
            )
            .expect("audit");
    }

    #[test]
    fn denials_are_grouped_with_exact_counts_first_and_last_seen_and_bounded_addresses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        let audit = AuditLog::new(store);
        for i in 0..(MAX_ADDRESSES_PER_ROW + 8) {
            deny(&audit, "u-1", "secrets.read", &format!("10.0.0.{i}"));
        }
        deny(&audit, "u-2", "audit.read", "10.9.9.9");
        let rows = recent(&audit, 60).expect("recent");
        assert_eq!(rows.len(), 2);
        let top = &rows[0];
        assert_eq!(
            (top.user_id.as_str(), top.count),
            ("u-1", (MAX_ADDRESSES_PER_ROW + 8) as u64)
        );
        assert_eq!(top.ip_addresses.len(), MAX_ADDRESSES_PER_ROW);
        assert!(top.first_seen <= top.last_seen);
        assert_eq!(rows[1].count, 1);
        assert_eq!(rows[1].first_seen, rows[1].last_seen);
    }
}
