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

/// Denials of the last `minutes`, one row per (user, permission, role) with
/// its count (denials, not rows), most frequent first.
pub fn recent(audit: &AuditLog, minutes: u64) -> Result<Vec<DenialRow>, AuditError> {
    let mut entries = Vec::new();
    let mut before = None;
    loop {
        let page = audit.search(&SearchFilter {
            action: Some("permission_denied".into()),
            minutes: Some(minutes),
            limit: MAX_SEARCH_LIMIT,
            before: before.take(),
            ..SearchFilter::default()
        })?;
        // Each page is oldest first; pages go back in time.
        let mut page_entries = page.entries;
        page_entries.append(&mut entries);
        entries = page_entries;
        match page.next_before {
            Some(b) if entries.len() < MAX_DENIALS_READ => before = Some(b),
            _ => break,
        }
    }
    let mut groups: BTreeMap<(String, String, String), DenialRow> = BTreeMap::new();
    for e in entries {
        let text = |k: &str| e.details[k].as_str().unwrap_or_default().to_string();
        let (permission, role) = (text("permission"), text("role"));
        let row = groups
            .entry((e.actor.clone(), permission.clone(), role.clone()))
            .or_insert_with(|| DenialRow {
                user_id: e.actor.clone(),
                permission,
                role,
                sensitive: e.details["sensitive"].as_bool(),
                count: 0,
                first_seen: e.timestamp.clone(),
                last_seen: e.timestamp.clone(),
                ip_addresses: Vec::new(),
            });
        row.count += 1;
        row.last_seen = e.timestamp.clone();
        if let Some(ip) = e.ip_address
            && !row.ip_addresses.contains(&ip)
        {
            row.ip_addresses.push(ip);
        }
    }
    let mut rows: Vec<DenialRow> = groups.into_values().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.count));
    Ok(rows)
}
