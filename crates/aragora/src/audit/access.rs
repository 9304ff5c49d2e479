//! Which secrets a user read: one record per (user, secret) in
//! `Collection::AuditAccess`, written in the same batch as each successful
//! `secret_access` entry, so rotation-by-accessor reads one user's records
//! instead of scanning the whole log.
//!
//! Ids are `{hex(user id)}/{secret id}`: the hex keeps any user id clear of
//! the separator and of what a store allows in an id, and one user's records
//! are one id range. The index outlives retention: an entry removed after
//! its export still counts as a read here (the export holds the entry).

use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{Deserialize, Serialize};

use super::{AuditEntry, AuditError, Outcome};
use crate::store::{Collection, Expect, ListQuery, Record, Store, StoreError, WriteOp, decode};

/// The action whose successful entries the index follows.
pub const SECRET_ACCESS: &str = "secret_access";
/// Records one lookup reads per page.
const PAGE: usize = 1_000;

/// One user's reads of one secret.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct AccessRecord {
    pub reads: u64,
    pub first_read_us: i64,
    pub last_read_us: i64,
}

fn user_prefix(user_id: &str) -> String {
    format!("{}/", hex::encode(user_id.as_bytes()))
}

pub(crate) fn access_id(user_id: &str, secret_id: &str) -> String {
    format!("{}{secret_id}", user_prefix(user_id))
}

/// The (user, secret) an entry records a read of, if it is a successful read.
pub(crate) fn read_of(e: &AuditEntry) -> Option<(&str, &str)> {
    if e.action != SECRET_ACCESS || e.outcome != Outcome::Success {
        return None;
    }
    Some((e.actor.as_str(), e.details.get("secret_id")?.as_str()?))
}

/// The reads in `entries`, per index record id: (count, first, last time).
pub(crate) fn deltas<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
) -> BTreeMap<String, AccessRecord> {
    let mut out: BTreeMap<String, AccessRecord> = BTreeMap::new();
    for e in entries {
        if let Some((user, secret)) = read_of(e) {
            let r = out.entry(access_id(user, secret)).or_insert(AccessRecord {
                reads: 0,
                first_read_us: e.timestamp_us,
                last_read_us: e.timestamp_us,
            });
            r.reads += 1;
            r.first_read_us = r.first_read_us.min(e.timestamp_us);
            r.last_read_us = r.last_read_us.max(e.timestamp_us);
        }
    }
    out
}

/// The ops adding `deltas` to the stored records `current` (in the order of
/// `deltas`' keys), compare-and-set on the versions read.
pub(crate) fn apply_ops(
    deltas: &BTreeMap<String, AccessRecord>,
    current: &[Option<Record>],
) -> Result<Vec<WriteOp>, StoreError> {
    debug_assert_eq!(deltas.len(), current.len());
    let mut ops = Vec::with_capacity(deltas.len());
    for ((id, delta), found) in deltas.iter().zip(current) {
        let (rec, expect) = match found {
            Some(r) => {
                let mut rec: AccessRecord = decode(Collection::AuditAccess, id, r)?;
                rec.reads = rec.reads.saturating_add(delta.reads);
                rec.first_read_us = rec.first_read_us.min(delta.first_read_us);
                rec.last_read_us = rec.last_read_us.max(delta.last_read_us);
                (rec, Expect::Version(r.version))
            }
            None => (delta.clone(), Expect::Absent),
        };
        ops.push(WriteOp::put_json(
            Collection::AuditAccess,
            id.clone(),
            &rec,
            expect,
        )?);
    }
    Ok(ops)
}

/// Every secret `user_id` read (per the index) and how many times.
pub(crate) fn read_by(
    store: &dyn Store,
    user_id: &str,
) -> Result<BTreeMap<String, u64>, AuditError> {
    let prefix = user_prefix(user_id);
    // '0' follows '/': the end of this user's range.
    let end = format!("{}0", hex::encode(user_id.as_bytes()));
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let q = ListQuery {
            start: after
                .as_deref()
                .map_or(Bound::Included(prefix.as_str()), Bound::Excluded),
            end: Bound::Excluded(end.as_str()),
            reverse: false,
            limit: PAGE,
        };
        let page = store
            .list(Collection::AuditAccess, &q)
            .map_err(AuditError::Read)?;
        let n = page.len();
        for (id, record) in page {
            let r: AccessRecord =
                decode(Collection::AuditAccess, &id, &record).map_err(AuditError::Read)?;
            if let Some(secret) = id.strip_prefix(&prefix) {
                out.insert(secret.to_string(), r.reads);
            }
            after = Some(id);
        }
        if n < PAGE {
            return Ok(out);
        }
    }
}
