//! The one module that reads and writes `Collection::Approvals`.
//!
//! Ids are `apr_` + the request time in microseconds (16 hex digits) + 8 random
//! hex digits, so id order is time order: "every request that can still be
//! pending" is a range scan from `now - longest timeout`, bounded by how many
//! requests fit in that window (the service caps open requests), not by the
//! whole history.

use std::ops::Bound;
use std::sync::Arc;

use super::request::ApprovalRequest;
use crate::store::{
    Collection, Durability, Expect, ListQuery, Store, StoreError, WriteOp, for_each_json, get_json,
    list_json,
};

const C: Collection = Collection::Approvals;
/// Compare-and-set attempts before an update gives up (concurrent deciders).
const UPDATE_RETRIES: usize = 32;
/// Page size of window scans.
const PAGE: usize = 500;

/// `apr_<16 hex µs>_<random>`.
pub fn request_id(requested_at_us: i64, random_hex: &str) -> String {
    format!(
        "apr_{:016x}_{random_hex}",
        u64::try_from(requested_at_us).unwrap_or(0)
    )
}

/// The smallest id a request made at `us` or later can have.
fn id_floor(us: i64) -> String {
    format!("apr_{:016x}", u64::try_from(us).unwrap_or(0))
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError<E> {
    #[error("approval request {0} not found")]
    NotFound(String),
    /// The change was refused by the caller's rule; nothing was written.
    #[error(transparent)]
    Refused(E),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Debug)]
pub struct ApprovalStore {
    store: Arc<dyn Store>,
}

impl ApprovalStore {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub(super) fn inner(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn insert(&self, r: &ApprovalRequest) -> Result<(), StoreError> {
        self.store.write(
            vec![WriteOp::put_json(C, r.id.clone(), r, Expect::Absent)?],
            Durability::Durable,
        )?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        Ok(get_json::<ApprovalRequest>(self.store.as_ref(), C, id)?.map(|(_, r)| r))
    }

    /// Read, change, compare-and-set; retried when another writer changed the
    /// request in between, so concurrent decisions serialize on the record. The
    /// rule sees the latest version every time; what it returns is the result
    /// of the attempt that was stored.
    pub fn update<T, E>(
        &self,
        id: &str,
        mut rule: impl FnMut(&mut ApprovalRequest) -> Result<T, E>,
    ) -> Result<(T, ApprovalRequest), UpdateError<E>> {
        for _ in 0..UPDATE_RETRIES {
            let Some((version, mut r)) = get_json::<ApprovalRequest>(self.store.as_ref(), C, id)?
            else {
                return Err(UpdateError::NotFound(id.to_owned()));
            };
            let out = rule(&mut r).map_err(UpdateError::Refused)?;
            let op = WriteOp::put_json(C, id, &r, Expect::Version(version))?;
            match self.store.write(vec![op], Durability::Durable) {
                Ok(_) => return Ok((out, r)),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(UpdateError::Store(StoreError::Unavailable(format!(
            "approval request {id} kept changing under {UPDATE_RETRIES} attempts"
        ))))
    }

    /// Requests made at `since_us` or later, oldest first, at most `limit`.
    pub fn since(&self, since_us: i64, limit: usize) -> Result<Vec<ApprovalRequest>, StoreError> {
        let floor = id_floor(since_us);
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        while out.len() < limit {
            let q = ListQuery {
                start: match &after {
                    Some(a) => Bound::Excluded(a.as_str()),
                    None => Bound::Included(floor.as_str()),
                },
                end: Bound::Unbounded,
                reverse: false,
                limit: PAGE.min(limit - out.len()),
            };
            let want = q.limit;
            let page = list_json::<ApprovalRequest>(self.store.as_ref(), C, &q)?;
            let n = page.len();
            let last = page.last().map(|(id, _, _)| id.clone());
            out.extend(page.into_iter().map(|(_, _, r)| r));
            if n < want {
                break;
            }
            after = last;
        }
        Ok(out)
    }

    /// Newest first, for history: at most `limit`, before the id `before`.
    pub fn history(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ApprovalRequest>, StoreError> {
        let q = ListQuery {
            start: Bound::Unbounded,
            end: before.map_or(Bound::Unbounded, Bound::Excluded),
            reverse: true,
            limit,
        };
        Ok(list_json::<ApprovalRequest>(self.store.as_ref(), C, &q)?
            .into_iter()
            .map(|(_, _, r)| r)
            .collect())
    }

    /// Every request (once, at boot: approved requests whose execution a
    /// restart interrupted, and exact counts for the gauges).
    pub fn for_each(
        &self,
        mut f: impl FnMut(ApprovalRequest) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for_each_json::<ApprovalRequest>(self.store.as_ref(), C, |_, _, r| f(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::Operation;
    use crate::approvals::request::Status;
    use crate::store::EmbeddedStore;

    fn store() -> (tempfile::TempDir, ApprovalStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open");
        (dir, ApprovalStore::new(Arc::new(s)))
    }

    fn req(at: i64, n: u32) -> ApprovalRequest {
        ApprovalRequest {
            id: request_id(at, &format!("{n:08x}")),
            operation: Operation::KeyRotation,
            risk_level: Operation::KeyRotation.policy().risk_level,
            params: serde_json::json!({}),
            reason: "r".into(),
            requester_id: "u".into(),
            requested_at: at,
            expires_at: at + 1_000,
            required_approvals: 1,
            checklist: vec![],
            status: Status::Pending,
            decisions: vec![],
            execution: None,
        }
    }

    #[test]
    fn ids_sort_by_time_and_windows_scan_only_what_is_recent() {
        let (_d, s) = store();
        for (i, at) in [5_i64, 1_000_000, 70_000_000_000, 70_000_000_001]
            .into_iter()
            .enumerate()
        {
            s.insert(&req(at, i as u32)).expect("insert");
        }
        let recent = s.since(1_000_000, 100).expect("since");
        let times: Vec<i64> = recent.iter().map(|r| r.requested_at).collect();
        assert_eq!(times, vec![1_000_000, 70_000_000_000, 70_000_000_001]);
        assert_eq!(s.since(0, 2).expect("since").len(), 2, "limit holds");
        let newest = s.history(None, 2).expect("history");
        assert_eq!(newest[0].requested_at, 70_000_000_001);
        let older = s.history(Some(&newest[1].id), 10).expect("history");
        assert_eq!(older.len(), 2);
        assert!(s.insert(&req(5, 0)).is_err(), "ids are unique");
    }

    #[test]
    fn concurrent_updates_serialize_and_refusals_write_nothing() {
        let (_d, s) = store();
        let r = req(1, 1);
        s.insert(&r).expect("insert");
        let s = Arc::new(s);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (s, id) = (s.clone(), r.id.clone());
                std::thread::spawn(move || {
                    s.update::<(), String>(&id, |r| {
                        r.reason.push_str(&t.to_string());
                        Ok(())
                    })
                    .expect("update");
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let stored = s.get(&r.id).expect("get").expect("present");
        assert_eq!(stored.reason.len(), 1 + 8, "every update applied once");
        let refused = s.update::<(), &str>(&r.id, |r| {
            r.reason.clear();
            Err("no")
        });
        assert!(matches!(refused, Err(UpdateError::Refused("no"))));
        assert_eq!(
            s.get(&r.id).expect("get").expect("present").reason,
            stored.reason
        );
        assert!(matches!(
            s.update::<(), String>("apr_missing", |_| Ok(())),
            Err(UpdateError::NotFound(_))
        ));
    }
}
