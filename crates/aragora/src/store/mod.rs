//! Persistence behind one small trait, so the embedded store (aedb, the default)
//! and a shared PostgreSQL store (scale-out) run the same domain code and pass the
//! same test suite (`aragora_testkit::store`).
//!
//! The model is a set of collections of versioned records. A write is a batch of
//! puts and deletes applied atomically, each with an expectation (absent, at a
//! version, anything): that one primitive gives transactions and compare-and-set
//! on both backends. Lists are range scans over record ids in byte order, forward
//! or backward, bounded by a limit: pagination without offsets.

pub mod embedded;
mod legacy_meta;
pub mod postgres;
pub mod postgres_tls;

use std::fmt;
use std::ops::Bound;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use embedded::EmbeddedStore;
pub use postgres::PostgresStore;

/// The collections aragora keeps. Adding one is adding a variant: both backends
/// create what they need for it at open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Collection {
    Users,
    /// email (lowercased) -> user id; the uniqueness constraint on emails.
    UserEmails,
    Roles,
    Sessions,
    ApiKeys,
    IpBlocks,
    /// Hash-chained audit entries, ids ordered by time.
    Audit,
    /// The audit chain's head and retention anchor (owned by `audit`).
    AuditChain,
    /// Audit entries per action and time bucket (owned by `audit::counts`).
    AuditCounts,
    /// (user, secret) -> reads, from `secret_access` entries (owned by
    /// `audit::access`).
    AuditAccess,
    /// Singletons of `auth`: the session revocation epoch, the bootstrap marker.
    AuthState,
    /// Re-encryption progress, one record per encrypted store (owned by
    /// `encryption::migration`).
    Migrations,
    /// Data keys, wrapped by the master key (key id -> `encryption::KeyRecord`).
    KeyRing,
    /// Encrypted secrets (id -> `secrets::SecretRecord`).
    Secrets,
    /// Approval requests (time-ordered id -> `approvals::ApprovalRequest`).
    Approvals,
    /// Long operations (id -> `jobs::JobRecord`) and the `active` marker.
    Jobs,
    /// One record per collection replicas hold in memory, bumped by every
    /// write to it (owned by `cluster`).
    Generations,
    /// The runtime maintenance mode, `mode` (owned by `maintenance`).
    MaintenanceMode,
}

impl Collection {
    pub const ALL: [Collection; 18] = [
        Collection::Users,
        Collection::UserEmails,
        Collection::Roles,
        Collection::Sessions,
        Collection::ApiKeys,
        Collection::IpBlocks,
        Collection::Audit,
        Collection::AuditChain,
        Collection::AuditCounts,
        Collection::AuditAccess,
        Collection::AuthState,
        Collection::Migrations,
        Collection::KeyRing,
        Collection::Secrets,
        Collection::Approvals,
        Collection::Jobs,
        Collection::Generations,
        Collection::MaintenanceMode,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Collection::Users => "users",
            Collection::UserEmails => "user_emails",
            Collection::Roles => "roles",
            Collection::Sessions => "sessions",
            Collection::ApiKeys => "api_keys",
            Collection::IpBlocks => "ip_blocks",
            Collection::Audit => "audit",
            Collection::AuditChain => "audit_chain",
            Collection::AuditCounts => "audit_counts",
            Collection::AuditAccess => "audit_access",
            Collection::AuthState => "auth_state",
            Collection::Migrations => "migrations",
            Collection::KeyRing => "key_ring",
            Collection::Secrets => "secrets",
            Collection::Approvals => "approvals",
            Collection::Jobs => "jobs",
            Collection::Generations => "generations",
            Collection::MaintenanceMode => "maintenance_mode",
        }
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A stored record: its bytes and the version a compare-and-set names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub version: u64,
    pub value: Arc<[u8]>,
}

/// What must hold for a write to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Any,
    Absent,
    Version(u64),
}

#[derive(Clone, Debug)]
pub enum WriteOp {
    Put {
        collection: Collection,
        id: String,
        value: Vec<u8>,
        expect: Expect,
    },
    Delete {
        collection: Collection,
        id: String,
        expect: Expect,
    },
}

impl WriteOp {
    pub fn put_json<T: Serialize>(
        collection: Collection,
        id: impl Into<String>,
        value: &T,
        expect: Expect,
    ) -> Result<Self, StoreError> {
        let id = id.into();
        let value = serde_json::to_vec(value).map_err(|e| StoreError::Encode {
            collection: collection.name(),
            id: id.clone(),
            reason: e.to_string(),
        })?;
        Ok(WriteOp::Put {
            collection,
            id,
            value,
            expect,
        })
    }

    pub fn delete(collection: Collection, id: impl Into<String>, expect: Expect) -> Self {
        WriteOp::Delete {
            collection,
            id: id.into(),
            expect,
        }
    }

    pub fn target(&self) -> (Collection, &str) {
        match self {
            WriteOp::Put { collection, id, .. } | WriteOp::Delete { collection, id, .. } => {
                (*collection, id)
            }
        }
    }
}

/// When a write call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// On stable storage.
    Durable,
    /// Visible to readers; `wait_durable` later. Lets a caller that must order
    /// writes (the audit chain) hold its lock only for the in-memory part.
    Visible,
}

/// Names a completed write, for `wait_durable`. Every record the write put has
/// version `seq` afterwards (both backends number writes from one sequence), so a
/// writer can compare-and-set again without re-reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
}

/// A range of record ids, a direction and a bound on the result size.
#[derive(Clone, Debug)]
pub struct ListQuery<'a> {
    pub start: Bound<&'a str>,
    pub end: Bound<&'a str>,
    pub reverse: bool,
    pub limit: usize,
}

impl<'a> ListQuery<'a> {
    pub fn all(limit: usize) -> Self {
        Self {
            start: Bound::Unbounded,
            end: Bound::Unbounded,
            reverse: false,
            limit,
        }
    }

    pub fn after(after: Option<&'a str>, limit: usize) -> Self {
        Self {
            start: after.map_or(Bound::Unbounded, Bound::Excluded),
            end: Bound::Unbounded,
            reverse: false,
            limit,
        }
    }
}

/// The pause before retry `attempt` of a write that lost to a concurrent
/// writer: random in [0, `unit_us` x 2^min(attempt, `max_doublings`)), so
/// writers of one hot record stop colliding in step.
pub(crate) fn conflict_pause(
    attempt: usize,
    unit_us: u64,
    max_doublings: usize,
) -> std::time::Duration {
    let cap_us = unit_us << attempt.min(max_doublings);
    std::time::Duration::from_micros(rand::random::<u64>() % cap_us)
}

/// What `Store::get_many_async` returns: owned, so it outlives the call.
pub type ManyFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<Option<Record>>, StoreError>> + Send>,
>;

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// An expectation did not hold (or a concurrent writer got there first).
    #[error("conflict on {collection}/{id}: {reason}")]
    Conflict {
        collection: &'static str,
        id: String,
        reason: String,
    },
    /// The backend refused for now (admission control, overload); retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("record {collection}/{id} cannot be encoded: {reason}")]
    Encode {
        collection: &'static str,
        id: String,
        reason: String,
    },
    /// A stored record does not decode: corruption or an incompatible writer.
    #[error("record {collection}/{id} is unreadable: {reason}")]
    Corrupt {
        collection: &'static str,
        id: String,
        reason: String,
    },
    #[error("store error: {0}")]
    Backend(String),
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

pub trait Store: Send + Sync + fmt::Debug {
    /// "aedb" or "postgres".
    fn backend(&self) -> &'static str;

    fn get(&self, collection: Collection, id: &str) -> Result<Option<Record>, StoreError>;

    /// Several records, in the order asked, read at one point in time where the
    /// backend can (one snapshot on the embedded store): the request path reads
    /// session, revocation epoch and user together.
    fn get_many(&self, keys: &[(Collection, &str)]) -> Result<Vec<Option<Record>>, StoreError> {
        keys.iter().map(|(c, id)| self.get(*c, id)).collect()
    }

    /// `get_many` as a future, for a caller on an async worker. The default
    /// answers at once (the embedded store reads memory); a shared store
    /// answers without parking a blocking-pool thread on the round trip.
    fn get_many_async(&self, keys: Vec<(Collection, String)>) -> ManyFuture {
        let borrowed: Vec<(Collection, &str)> =
            keys.iter().map(|(c, id)| (*c, id.as_str())).collect();
        Box::pin(std::future::ready(self.get_many(&borrowed)))
    }

    fn list(
        &self,
        collection: Collection,
        query: &ListQuery<'_>,
    ) -> Result<Vec<(String, Record)>, StoreError>;

    /// Applies every op or none; the first expectation that does not hold is
    /// reported as `Conflict` naming its record.
    fn write(&self, ops: Vec<WriteOp>, durability: Durability) -> Result<Receipt, StoreError>;

    fn wait_durable(&self, receipt: Receipt) -> Result<(), StoreError>;

    /// The storage engine's own audit tables (aedb's `authz_audit` and
    /// `assertion_audit`), rows with id >= `since_id`, each with its chain
    /// head. A backend without such tables has none to export.
    fn engine_audit(&self, since_id: i64) -> Result<Vec<aedb::AuditExport>, StoreError> {
        let _ = since_id;
        Ok(Vec::new())
    }

    /// The embedded engine's health counters (`aedb_*` on `/metrics`);
    /// `None` for a store without one.
    fn operational_metrics(&self) -> Option<aedb::OperationalMetrics> {
        None
    }

    /// An online backup of the engine into `dest` (absent or empty) while
    /// writers keep going: a full one, or with `parent` (the newest backup of
    /// a chain) the log since it. A store run by a server of its own (the
    /// shared PostgreSQL store) is backed up with that server's tools.
    fn engine_backup(
        &self,
        dest: &std::path::Path,
        parent: Option<&std::path::Path>,
    ) -> Result<aedb::BackupReport, StoreError> {
        let _ = (dest, parent);
        Err(StoreError::Backend(format!(
            "the {} store has no engine backup: back it up with its own tools",
            self.backend()
        )))
    }

    /// Changes the engine's commit admission rate while it runs (`None`:
    /// unlimited) and returns the rate it replaced; the rate in force is
    /// `operational_metrics().max_commits_per_sec`. Runtime only: a restart
    /// starts unlimited. A store run by a server of its own (PostgreSQL) is
    /// throttled there (connection limits, `max_connections`).
    fn set_admission_rate(
        &self,
        max_commits_per_sec: Option<u32>,
    ) -> Result<Option<u32>, StoreError> {
        let _ = max_commits_per_sec;
        Err(StoreError::Backend(format!(
            "the {} store has no admission control in this process: throttle it on its own server",
            self.backend()
        )))
    }
}

/// Decodes a JSON record, naming it when it does not decode.
pub fn decode<T: DeserializeOwned>(
    collection: Collection,
    id: &str,
    record: &Record,
) -> Result<T, StoreError> {
    serde_json::from_slice(&record.value).map_err(|e| StoreError::Corrupt {
        collection: collection.name(),
        id: id.to_string(),
        reason: e.to_string(),
    })
}

/// Decodes an optional record from `get_many`.
pub fn decode_opt<T: DeserializeOwned>(
    collection: Collection,
    id: &str,
    record: Option<&Record>,
) -> Result<Option<(u64, T)>, StoreError> {
    record
        .map(|r| Ok((r.version, decode(collection, id, r)?)))
        .transpose()
}

/// `get` + `decode`: the value and its version.
pub fn get_json<T: DeserializeOwned>(
    store: &dyn Store,
    collection: Collection,
    id: &str,
) -> Result<Option<(u64, T)>, StoreError> {
    match store.get(collection, id)? {
        Some(r) => Ok(Some((r.version, decode(collection, id, &r)?))),
        None => Ok(None),
    }
}

/// `list` + `decode`.
pub fn list_json<T: DeserializeOwned>(
    store: &dyn Store,
    collection: Collection,
    query: &ListQuery<'_>,
) -> Result<Vec<(String, u64, T)>, StoreError> {
    store
        .list(collection, query)?
        .into_iter()
        .map(|(id, r)| {
            let v = decode(collection, &id, &r)?;
            Ok((id, r.version, v))
        })
        .collect()
}

/// Every record of a collection, page by page (for scans that must see all).
pub fn for_each_json<T: DeserializeOwned>(
    store: &dyn Store,
    collection: Collection,
    mut f: impl FnMut(String, u64, T) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    const PAGE: usize = 1000;
    let mut after: Option<String> = None;
    loop {
        let page = list_json::<T>(store, collection, &ListQuery::after(after.as_deref(), PAGE))?;
        let n = page.len();
        for (id, version, value) in page {
            after = Some(id.clone());
            f(id, version, value)?;
        }
        if n < PAGE {
            return Ok(());
        }
    }
}
