//! Many replicas on one shared store: a change made through one replica is
//! enforced by every replica on its next request after the change's response.
//!
//! Most request state is read from the store on every request already
//! (session, revocation epoch, user with its roles and `disabled` flag), so a
//! shared store enforces it everywhere at once. What a replica keeps in memory
//! for speed is the exception: custom role definitions (and the decision cache
//! built on them), IP blocks, the key ring and the maintenance mode. For those:
//!
//! - every store write that touches one of their collections also puts that
//!   collection's record in [`Collection::Generations`], in the same atomic
//!   batch ([`SyncedStore`] adds it, so no write path can forget). The record's
//!   version is the write's sequence number, so it only grows;
//! - before each request a replica reads those few records in one
//!   `get_many` ([`ClusterSync::stale`]) and reloads from the store each
//!   collection whose generation moved past the one it last loaded.
//!
//! The change's response is sent after its batch committed, so the next
//! request on any replica reads a generation at least as new and reloads
//! before it is decided: enforcement is exact, not eventual. A store that
//! cannot be read fails the request (503), never serves from stale memory.
//!
//! The embedded store is opened by one process (its directory lock), whose
//! memory is always current: the per-request read is skipped there.
//!
//! With `REDIS_URL` the per-request read is usually not a store round trip:
//! each replica caches it and confirms it current through Redis
//! ([`confirmed`], which explains why that stays exact).

pub mod confirmed;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::store::{
    Collection, Durability, ListQuery, Receipt, Record, Store, StoreError, WriteOp,
};

/// The collections a replica holds in memory, whose changes other replicas
/// must see on their next request.
pub const WATCHED: [Collection; 4] = [
    Collection::Roles,
    Collection::IpBlocks,
    Collection::KeyRing,
    Collection::MaintenanceMode,
];

fn watched_index(c: Collection) -> Option<usize> {
    WATCHED.iter().position(|w| *w == c)
}

/// A store whose writes also bump the generation of every watched collection
/// they touch, in the same batch. Every other method forwards (a trait
/// method with a default must be forwarded here too, or the wrapper hides it:
/// `a_synced_store_forwards_every_engine_method` checks the ones that exist).
#[derive(Debug)]
pub struct SyncedStore {
    inner: Arc<dyn Store>,
    /// On a shared store: sets the Redis tags of the per-request records a
    /// write touched ([`confirmed`]).
    publisher: Option<Arc<confirmed::Publisher>>,
}

impl SyncedStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            publisher: None,
        }
    }

    /// A store shared with replicas that cache their per-request reads.
    pub fn publishing(inner: Arc<dyn Store>, publisher: Arc<confirmed::Publisher>) -> Self {
        Self {
            inner,
            publisher: Some(publisher),
        }
    }
}

impl Store for SyncedStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn get(&self, collection: Collection, id: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(collection, id)
    }

    fn get_many(&self, keys: &[(Collection, &str)]) -> Result<Vec<Option<Record>>, StoreError> {
        self.inner.get_many(keys)
    }

    fn get_many_async(&self, keys: Vec<(Collection, String)>) -> crate::store::ManyFuture {
        self.inner.get_many_async(keys)
    }

    fn list(
        &self,
        collection: Collection,
        query: &ListQuery<'_>,
    ) -> Result<Vec<(String, Record)>, StoreError> {
        self.inner.list(collection, query)
    }

    fn write(&self, mut ops: Vec<WriteOp>, durability: Durability) -> Result<Receipt, StoreError> {
        let mut touched = [false; WATCHED.len()];
        for op in &ops {
            if let Some(i) = watched_index(op.target().0) {
                touched[i] = true;
            }
        }
        for (i, t) in touched.iter().enumerate() {
            if *t {
                ops.push(WriteOp::Put {
                    collection: Collection::Generations,
                    id: WATCHED[i].name().to_string(),
                    value: b"{}".to_vec(),
                    expect: crate::store::Expect::Any,
                });
            }
        }
        let Some(publisher) = &self.publisher else {
            return self.inner.write(ops, durability);
        };
        let tags = confirmed::Publisher::tag_keys(&ops);
        let result = self.inner.write(ops, durability);
        publisher.published(&tags);
        result
    }

    fn wait_durable(&self, receipt: Receipt) -> Result<(), StoreError> {
        self.inner.wait_durable(receipt)
    }

    fn engine_audit(&self, since_id: i64) -> Result<Vec<aedb::AuditExport>, StoreError> {
        self.inner.engine_audit(since_id)
    }

    fn operational_metrics(&self) -> Option<aedb::OperationalMetrics> {
        self.inner.operational_metrics()
    }

    fn engine_backup(
        &self,
        dest: &std::path::Path,
        parent: Option<&std::path::Path>,
    ) -> Result<aedb::BackupReport, StoreError> {
        self.inner.engine_backup(dest, parent)
    }

    fn set_admission_rate(
        &self,
        max_commits_per_sec: Option<u32>,
    ) -> Result<Option<u32>, StoreError> {
        self.inner.set_admission_rate(max_commits_per_sec)
    }
}

/// The generations this replica has loaded, and the per-request check.
#[derive(Debug)]
pub struct ClusterSync {
    enabled: bool,
    /// With `REDIS_URL`: the per-request read, cached and confirmed.
    confirmed: Option<confirmed::ConfirmedReads>,
    seen: [AtomicU64; WATCHED.len()],
    /// One reload at a time: concurrent requests that find the same change
    /// wait for one reload instead of each doing it.
    reloading: Mutex<()>,
}

impl ClusterSync {
    /// `enabled`: the store is shared with other processes.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            confirmed: None,
            seen: Default::default(),
            reloading: Mutex::new(()),
        }
    }

    /// Serves the per-request read from `reads` (shared stores only).
    pub fn with_confirmed_reads(mut self, reads: confirmed::ConfirmedReads) -> Self {
        if self.enabled {
            self.confirmed = Some(reads);
        }
        self
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The keys of one freshness read: the generation records, then `extra`.
    fn keys(extra: &[(Collection, &str)]) -> Vec<(Collection, String)> {
        WATCHED
            .iter()
            .map(|c| (Collection::Generations, c.name()))
            .chain(extra.iter().copied())
            .map(|(c, id)| (c, id.to_string()))
            .collect()
    }

    /// The current generation of every watched collection (0: never written),
    /// and `extra`'s records, in one snapshot.
    fn read(
        store: &dyn Store,
        extra: &[(Collection, &str)],
    ) -> Result<([u64; WATCHED.len()], Vec<Option<Record>>), StoreError> {
        let keys = Self::keys(extra);
        let borrowed: Vec<(Collection, &str)> =
            keys.iter().map(|(c, id)| (*c, id.as_str())).collect();
        Self::split(store.get_many(&borrowed)?, keys.len())
    }

    /// `read` as a future (a shared store's round trip without a blocking
    /// thread, or a confirmed cached read).
    async fn read_async(
        &self,
        store: &dyn Store,
        extra: &[(Collection, &str)],
    ) -> Result<([u64; WATCHED.len()], Vec<Option<Record>>), StoreError> {
        let keys = Self::keys(extra);
        let n = keys.len();
        let found = match &self.confirmed {
            Some(reads) => reads.get_many(store, keys).await?,
            None => store.get_many_async(keys).await?,
        };
        Self::split(found, n)
    }

    fn split(
        mut found: Vec<Option<Record>>,
        asked: usize,
    ) -> Result<([u64; WATCHED.len()], Vec<Option<Record>>), StoreError> {
        if found.len() != asked {
            return Err(StoreError::Backend(format!(
                "get_many answered {} records for {asked} keys",
                found.len()
            )));
        }
        let extra_found = found.split_off(WATCHED.len());
        let mut out = [0u64; WATCHED.len()];
        for (slot, rec) in out.iter_mut().zip(found) {
            *slot = rec.map_or(0, |r| r.version);
        }
        Ok((out, extra_found))
    }

    /// Records the generations as loaded. Call before loading the state they
    /// cover at boot: a change racing the load is then seen as newer later.
    pub fn prime(&self, store: &dyn Store) -> Result<(), StoreError> {
        if !self.enabled {
            return Ok(());
        }
        let (now, _) = Self::read(store, &[])?;
        for (seen, v) in self.seen.iter().zip(now) {
            seen.fetch_max(v, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Brings this replica's memory up to the store: calls `reload` for each
    /// watched collection another writer changed since it was last loaded.
    /// The generation is read before the reload, so a change committed during
    /// the reload is reloaded again on a later request.
    pub fn catch_up<E: From<StoreError>>(
        &self,
        store: &dyn Store,
        reload: impl FnMut(Collection) -> Result<(), E>,
    ) -> Result<(), E> {
        self.catch_up_reading(store, &[], reload).map(|_| ())
    }

    /// `catch_up`, also reading `extra` in the same snapshot as the
    /// generations (what the request will need next: one round trip for
    /// both). On a single process nothing is read and the answer is empty.
    pub fn catch_up_reading<E: From<StoreError>>(
        &self,
        store: &dyn Store,
        extra: &[(Collection, &str)],
        reload: impl FnMut(Collection) -> Result<(), E>,
    ) -> Result<Vec<Option<Record>>, E> {
        if !self.enabled {
            return Ok(Vec::new());
        }
        let (now, found) = Self::read(store, extra)?;
        self.reload_stale(now, reload)?;
        Ok(found)
    }

    /// `catch_up_reading` for a caller on an async worker: the read is
    /// awaited; when another replica changed something (rare), `reload_blocking`
    /// gets the generations read and is expected to call `reload_stale` with
    /// them off the async workers (reloads read the store synchronously).
    pub async fn catch_up_reading_async<E, R, B>(
        &self,
        store: &dyn Store,
        extra: &[(Collection, &str)],
        reload_blocking: B,
    ) -> Result<Vec<Option<Record>>, E>
    where
        E: From<StoreError>,
        B: FnOnce([u64; WATCHED.len()]) -> R,
        R: std::future::Future<Output = Result<(), E>>,
    {
        if !self.enabled {
            return Ok(Vec::new());
        }
        let (now, found) = self.read_async(store, extra).await?;
        if !self.is_current(&now) {
            reload_blocking(now).await?;
        }
        Ok(found)
    }

    fn is_current(&self, now: &[u64; WATCHED.len()]) -> bool {
        self.seen
            .iter()
            .zip(now)
            .all(|(seen, v)| seen.load(Ordering::Acquire) >= *v)
    }

    /// Reloads, once for concurrent callers, each collection whose generation
    /// moved past what this replica loaded (`now`: generations just read).
    pub fn reload_stale<E>(
        &self,
        now: [u64; WATCHED.len()],
        mut reload: impl FnMut(Collection) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.is_current(&now) {
            return Ok(());
        }
        let _one = self.reloading.lock();
        for (i, v) in now.into_iter().enumerate() {
            // Another request may have reloaded while this one waited.
            if self.seen[i].load(Ordering::Acquire) >= v {
                continue;
            }
            reload(WATCHED[i])?;
            self.seen[i].fetch_max(v, Ordering::AcqRel);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedStore, Expect};

    fn put(c: Collection, id: &str) -> WriteOp {
        WriteOp::Put {
            collection: c,
            id: id.into(),
            value: b"{}".to_vec(),
            expect: Expect::Any,
        }
    }

    #[test]
    fn a_write_to_a_watched_collection_is_seen_once_by_every_other_replica() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        let a = SyncedStore::new(inner.clone());
        let b = SyncedStore::new(inner);
        let sync_b = ClusterSync::new(true);
        sync_b.prime(&b).expect("prime");
        let mut reloaded = Vec::new();
        sync_b
            .catch_up(&b, |c| -> Result<(), StoreError> {
                reloaded.push(c);
                Ok(())
            })
            .expect("catch up");
        assert!(reloaded.is_empty(), "nothing changed since boot");

        // A write elsewhere does not make b reload; a role change does, once.
        a.write(vec![put(Collection::Users, "u1")], Durability::Durable)
            .expect("write");
        a.write(vec![put(Collection::Roles, "r1")], Durability::Durable)
            .expect("write");
        for _ in 0..2 {
            sync_b
                .catch_up(&b, |c| -> Result<(), StoreError> {
                    reloaded.push(c);
                    Ok(())
                })
                .expect("catch up");
        }
        assert_eq!(reloaded, vec![Collection::Roles]);

        // A batch touching two watched collections reloads both.
        a.write(
            vec![
                put(Collection::IpBlocks, "10.0.0.1"),
                put(Collection::KeyRing, "k1"),
            ],
            Durability::Durable,
        )
        .expect("write");
        reloaded.clear();
        sync_b
            .catch_up(&b, |c| -> Result<(), StoreError> {
                reloaded.push(c);
                Ok(())
            })
            .expect("catch up");
        assert_eq!(reloaded, vec![Collection::IpBlocks, Collection::KeyRing]);
    }

    #[test]
    fn a_failed_reload_is_retried_on_the_next_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        let store = SyncedStore::new(inner);
        let sync = ClusterSync::new(true);
        sync.prime(&store).expect("prime");
        store
            .write(vec![put(Collection::Roles, "r1")], Durability::Durable)
            .expect("write");
        let err = sync.catch_up(&store, |_| -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down".into()))
        });
        assert!(
            err.is_err(),
            "the request fails rather than serve stale state"
        );
        let mut reloaded = Vec::new();
        sync.catch_up(&store, |c| -> Result<(), StoreError> {
            reloaded.push(c);
            Ok(())
        })
        .expect("catch up");
        assert_eq!(reloaded, vec![Collection::Roles]);
    }

    #[test]
    fn a_synced_store_forwards_every_engine_method() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        let store = SyncedStore::new(inner);
        assert_eq!(store.backend(), "aedb");
        assert!(store.operational_metrics().is_some());
        assert!(store.engine_audit(0).is_ok());
        assert_eq!(store.set_admission_rate(Some(50)).expect("rate"), None);
        assert_eq!(store.set_admission_rate(None).expect("rate"), Some(50));
        let backup = dir.path().join("backup");
        assert!(store.engine_backup(&backup, None).is_ok());
    }

    #[test]
    fn disabled_sync_reads_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        let store = SyncedStore::new(inner);
        let sync = ClusterSync::new(false);
        store
            .write(vec![put(Collection::Roles, "r1")], Durability::Durable)
            .expect("write");
        sync.catch_up(&store, |_| -> Result<(), StoreError> {
            panic!("no reload on a single process")
        })
        .expect("catch up");
    }

    /// Two replicas (two `AppState`s) over one store: what one changes, the
    /// other enforces once it catches up, as its request middleware does
    /// before every request.
    #[test]
    fn replicas_enforce_each_others_changes_after_catching_up() {
        use crate::app::AppState;
        use crate::auth::{Credential, Principal, RequestMeta};
        use crate::config::Config;
        use crate::maintenance::MaintenanceMode;

        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        let replica = |name: &str| {
            let data = dir.path().join(name);
            let vars: std::collections::BTreeMap<String, String> = [
                ("ARAGORA_DATA_DIR", data.to_string_lossy().to_string()),
                ("ARAGORA_ENCRYPTION_KEY", "ab".repeat(32)),
                ("RBAC_CACHE_TTL", "300".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let config = Config::from_vars(&vars).expect("config");
            AppState::new_replica(
                config,
                inner.clone(),
                "test-jwt-secret-0123456789abcdef0123456789abcdef",
            )
            .expect("replica")
        };
        let a = replica("a");
        let b = replica("b");
        let admin = Principal {
            user_id: "u-admin".into(),
            email: "admin@example.com".into(),
            roles: vec!["admin".into()],
            credential: Credential::ApiKey {
                key_id: "test".into(),
            },
        };
        let meta = RequestMeta {
            ip: Some("127.0.0.1".parse().expect("ip")),
            user_agent: None,
        };
        let user_roles = vec!["auditor-plus".to_string()];

        // A custom role created on A: B decides with it (and its cached deny
        // from before is dropped).
        assert!(!b.rbac.check("u-1", &user_roles, "audit.read").allowed);
        a.auth
            .put_role(&admin, "auditor-plus", "", vec!["audit.read".into()], &meta)
            .expect("put role");
        b.catch_up().expect("catch up");
        assert!(b.rbac.check("u-1", &user_roles, "audit.read").allowed);

        // An IP blocked on A is refused by B.
        let ip: std::net::IpAddr = "203.0.113.9".parse().expect("ip");
        assert!(b.auth.blocked(ip).is_none());
        a.auth
            .block_ip(&admin, "203.0.113.9", "1h", "test", &meta)
            .expect("block");
        b.catch_up().expect("catch up");
        assert!(b.auth.blocked(ip).is_some());

        // A key rotated on A is B's primary, so B encrypts under it.
        let before = b.keyring.primary_key_id().expect("primary");
        a.keyring
            .rotate("u-admin", None, "test rotation", true)
            .expect("rotate");
        let rotated = a.keyring.primary_key_id().expect("primary");
        assert_ne!(before, rotated);
        b.catch_up().expect("catch up");
        assert_eq!(b.keyring.primary_key_id().expect("primary"), rotated);

        // Lockdown switched on A holds on B.
        a.maintenance
            .set(MaintenanceMode::ReadOnly, "u-admin", None)
            .expect("maintenance");
        assert_eq!(b.maintenance.mode(), MaintenanceMode::Off);
        b.catch_up().expect("catch up");
        assert_eq!(b.maintenance.mode(), MaintenanceMode::ReadOnly);

        // A third replica booting now starts in the cluster's mode.
        let c = replica("c");
        assert_eq!(c.maintenance.mode(), MaintenanceMode::ReadOnly);
    }
}
