//! The records every request reads on a shared store (the watched
//! collections' generations and a session's records), cached by each replica
//! and confirmed current with one Redis `MGET` instead of a round trip to the
//! shared store.
//!
//! Every record that can be cached has a version tag in Redis
//! (`aragora:tag:<collection>:<id>`), a random number:
//!
//! - a store write that touches such a record sets a fresh tag for it after
//!   the write committed and before its caller answers (`Publisher`, from
//!   `SyncedStore::write`);
//! - a request reads the tags of its records (M), and serves its cached read
//!   only if every tag is still the one read just before that read was fetched
//!   from the store (and the fetch is younger than [`LEASE`]); otherwise it
//!   reads the store and caches the answer with the tags it read at M.
//!
//! Why that is exact: take a change W answered before a request R arrived.
//! W's tag was set before W answered, so before R's `MGET`. If R serves a
//! cached read, its tags equal the ones read before that read's store fetch,
//! and a tag never repeats, so W's tag was set before that fetch's `MGET`,
//! W committed before the fetch, and the fetch saw W. A read is fetched in one
//! store snapshot and cached whole, so R never mixes records of two moments.
//!
//! What Redis cannot do is never trusted:
//! - a tag that is absent (never set, expired, evicted, Redis restarted) is not
//!   a confirmation: the request reads the store and the tag is created, so the
//!   next request can be confirmed;
//! - Redis not answering sends the request to the store (counted, logged once);
//! - a write whose tags could not be set waits out [`LEASE`] (plus a margin)
//!   before its caller answers: by then no replica trusts a read fetched before
//!   the write. A process without `REDIS_URL` writing to the shared store (an
//!   operator command) waits out the lease once before it exits
//!   ([`Publisher::settle`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::redis_link::RedisLink;
use crate::store::{Collection, Record, Store, StoreError, WriteOp};

/// The collections whose records a request reads before it is decided.
pub const CONFIRMED: [Collection; 4] = [
    Collection::Generations,
    Collection::Sessions,
    Collection::AuthState,
    Collection::Users,
];

/// How long a cached read may be served (while its tags hold) before it is
/// fetched again; also what a write whose tags were not set waits.
pub const LEASE: Duration = Duration::from_secs(1);
/// Added to the writer's wait: the two processes' clocks measure the lease.
const LEASE_MARGIN: Duration = Duration::from_millis(100);
/// Tags expire (an absent tag only costs a store read), so sessions that end
/// do not leave keys in Redis for good.
const TAG_TTL: Duration = Duration::from_secs(24 * 3600);
/// Cached reads per replica (one per active session: about 1 KiB each).
const MAX_CACHED_READS: usize = 16_384;

fn tag_key(collection: Collection, id: &str) -> String {
    format!("aragora:tag:{}:{id}", collection.name())
}

type ReadKeys = Vec<(Collection, String)>;

#[derive(Clone, Debug)]
struct CachedRead {
    /// The tags read before the fetch, one per key.
    tags: Vec<u64>,
    /// Taken before those tags were read.
    fetched: Instant,
    records: Vec<Option<Record>>,
}

/// A replica's confirmed cache of per-request reads.
pub struct ConfirmedReads {
    link: Arc<RedisLink>,
    /// [`LEASE`]; tests shorten or lengthen it so they do not depend on how
    /// fast the machine runs them.
    lease: Duration,
    cache: quick_cache::sync::Cache<ReadKeys, CachedRead>,
    /// `hit`: served from the cache; `miss`: read from the store and cached;
    /// `unconfirmed`: Redis did not answer, read from the store.
    outcomes: IntCounterVec,
}

impl std::fmt::Debug for ConfirmedReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfirmedReads")
            .field("link", &self.link)
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl ConfirmedReads {
    pub fn new(link: Arc<RedisLink>, registry: &Registry) -> Result<Self, prometheus::Error> {
        let outcomes = IntCounterVec::new(
            Opts::new(
                "aragora_cluster_confirmed_reads_total",
                "Per-request reads on a shared store, by outcome (hit: cached and confirmed \
                 current through Redis; miss: read from the store; unconfirmed: Redis did not \
                 answer, read from the store)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(outcomes.clone()))?;
        for o in ["hit", "miss", "unconfirmed"] {
            outcomes.with_label_values(&[o]);
        }
        Ok(Self {
            link,
            lease: LEASE,
            cache: quick_cache::sync::Cache::new(MAX_CACHED_READS),
            outcomes,
        })
    }

    /// `store.get_many_async(keys)`, served from the cache when Redis
    /// confirms every record is unchanged since it was fetched.
    pub async fn get_many(
        &self,
        store: &dyn Store,
        keys: ReadKeys,
    ) -> Result<Vec<Option<Record>>, StoreError> {
        if keys.iter().any(|(c, _)| !CONFIRMED.contains(c)) {
            // Writes to other collections set no tags: never cached.
            return store.get_many_async(keys).await;
        }
        let started = Instant::now();
        let tag_keys: Vec<String> = keys.iter().map(|(c, id)| tag_key(*c, id)).collect();
        let tags = match self.link.get_tags(&tag_keys).await {
            Ok(tags) => tags,
            Err(_) => {
                // RedisLink counts and logs the outage.
                self.outcomes.with_label_values(&["unconfirmed"]).inc();
                return store.get_many_async(keys).await;
            }
        };
        if let Some(cached) = self.cache.get(&keys)
            && cached.fetched.elapsed() < self.lease
            && cached.tags.len() == tags.len()
            && cached.tags.iter().zip(&tags).all(|(c, t)| Some(*c) == *t)
        {
            self.outcomes.with_label_values(&["hit"]).inc();
            return Ok(cached.records);
        }
        let records = store.get_many_async(keys.clone()).await?;
        self.outcomes.with_label_values(&["miss"]).inc();
        match tags.iter().copied().collect::<Option<Vec<u64>>>() {
            Some(tags) => self.cache.insert(
                keys,
                CachedRead {
                    tags,
                    fetched: started,
                    records: records.clone(),
                },
            ),
            None => {
                // Not cached this time: an absent tag confirms nothing. Create
                // it so the next request can be confirmed (best effort: a
                // failure only means another store read).
                let absent: Vec<String> = tag_keys
                    .into_iter()
                    .zip(&tags)
                    .filter(|(_, t)| t.is_none())
                    .map(|(k, _)| k)
                    .collect();
                let _ = self.link.claim_tags(&absent, TAG_TTL).await;
            }
        }
        Ok(records)
    }
}

/// Sets the tags of the records a store write touched (`SyncedStore`).
#[derive(Debug)]
pub struct Publisher {
    /// `None`: this process has no `REDIS_URL`.
    link: Option<Arc<RedisLink>>,
    /// When this process last wrote a taggable record without setting its
    /// tag (no `REDIS_URL`): `settle` waits out the lease from then.
    unpublished: Mutex<Option<Instant>>,
}

impl Publisher {
    pub fn new(link: Option<Arc<RedisLink>>) -> Self {
        Self {
            link,
            unpublished: Mutex::new(None),
        }
    }

    /// The tag keys of what `ops` write.
    pub fn tag_keys(ops: &[WriteOp]) -> Vec<String> {
        let mut keys: Vec<String> = ops
            .iter()
            .map(WriteOp::target)
            .filter(|(c, _)| CONFIRMED.contains(c))
            .map(|(c, id)| tag_key(c, id))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// After a write of `keys` (committed or not: a write that failed may
    /// still have committed), before its caller answers.
    pub fn published(&self, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let Some(link) = &self.link else {
            *self.unpublished.lock() = Some(Instant::now());
            return;
        };
        if link.publish_tags(keys, TAG_TTL).is_err() {
            // RedisLink counts and logs the outage. A replica that can still
            // reach Redis may hold a read from before this write: once the
            // lease has passed it no longer trusts it.
            std::thread::sleep(LEASE + LEASE_MARGIN);
        }
    }

    /// Waits until no replica trusts a read from before this process's
    /// unpublished writes (an operator command without `REDIS_URL` calls it
    /// before it exits, so its effects hold everywhere once it has).
    pub fn settle(&self) {
        let Some(at) = *self.unpublished.lock() else {
            return;
        };
        let until = at + LEASE + LEASE_MARGIN;
        let now = Instant::now();
        if until > now {
            tracing::info!(
                wait_ms = (until - now).as_millis() as u64,
                "waiting out the replicas' cache lease (no REDIS_URL to publish this command's changes)"
            );
            std::thread::sleep(until - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_link::RedisMetrics;
    use crate::store::{Durability, EmbeddedStore, Expect};

    fn redis(registry: &Registry) -> Option<Arc<RedisLink>> {
        crate::redis_link::tests::local_link(registry).map(Arc::new)
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        /// Writes that set tags, as every replica's writes do.
        publishing: crate::cluster::SyncedStore,
        /// Writes that set none (to see what the cache serves).
        silent: Arc<dyn Store>,
        reads: ConfirmedReads,
        keys: ReadKeys,
    }

    /// Long enough that no test machine is this slow between two reads.
    const NO_EXPIRY: Duration = Duration::from_secs(3600);

    fn fixture(lease: Duration) -> Option<Fixture> {
        let registry = Registry::new();
        let link = redis(&registry)?;
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        let publishing = crate::cluster::SyncedStore::publishing(
            inner.clone(),
            Arc::new(Publisher::new(Some(link.clone()))),
        );
        // Ids no other test run shares (one Redis for every run).
        let run = rand::random::<u64>();
        let keys = vec![
            (Collection::Users, format!("u-{run}")),
            (Collection::Sessions, format!("s-{run}")),
        ];
        Some(Fixture {
            _dir: dir,
            publishing,
            silent: inner,
            reads: ConfirmedReads {
                lease,
                ..ConfirmedReads::new(link, &registry).expect("metrics")
            },
            keys,
        })
    }

    fn put(c: Collection, id: &str, value: &str) -> WriteOp {
        WriteOp::Put {
            collection: c,
            id: id.into(),
            value: value.as_bytes().to_vec(),
            expect: Expect::Any,
        }
    }

    impl Fixture {
        async fn user(&self) -> Option<String> {
            let found = self
                .reads
                .get_many(&self.publishing, self.keys.clone())
                .await
                .expect("read");
            found[0]
                .as_ref()
                .map(|r| String::from_utf8_lossy(&r.value).to_string())
        }

        fn outcome(&self, o: &str) -> u64 {
            self.reads.outcomes.with_label_values(&[o]).get()
        }

        fn write(&self, store: &dyn Store, value: &str) {
            store
                .write(
                    vec![put(Collection::Users, &self.keys[0].1, value)],
                    Durability::Durable,
                )
                .expect("write");
        }
    }

    #[tokio::test]
    async fn a_cached_read_is_served_until_a_write_sets_a_new_tag() {
        let Some(f) = fixture(NO_EXPIRY) else { return };
        f.write(&f.publishing, "v1");
        // The session's tag was never set: not a confirmation, so read and
        // not cached; the tag is created for the next request.
        assert_eq!(f.user().await.as_deref(), Some("v1"));
        assert_eq!(f.outcome("miss"), 1);
        assert_eq!(f.user().await.as_deref(), Some("v1"));
        assert_eq!(f.outcome("miss"), 2);
        assert_eq!(f.user().await.as_deref(), Some("v1"));
        assert_eq!(f.outcome("hit"), 1, "confirmed and served from the cache");

        // A write that sets no tag is not seen while the cached read is
        // confirmed (this is what the cache saves: the store read)...
        f.write(f.silent.as_ref(), "unpublished");
        assert_eq!(f.user().await.as_deref(), Some("v1"));
        // ...and a write that does is seen on the very next read.
        f.write(&f.publishing, "v2");
        assert_eq!(f.user().await.as_deref(), Some("v2"));
        assert_eq!(f.user().await.as_deref(), Some("v2"));
        assert_eq!(f.outcome("hit"), 3);
    }

    #[tokio::test]
    async fn past_the_lease_a_cached_read_is_fetched_again_whatever_redis_says() {
        let lease = Duration::from_millis(100);
        let Some(f) = fixture(lease) else { return };
        f.write(&f.publishing, "v1");
        for _ in 0..3 {
            assert_eq!(f.user().await.as_deref(), Some("v1"));
        }
        f.write(f.silent.as_ref(), "v2");
        tokio::time::sleep(lease + Duration::from_millis(50)).await;
        assert_eq!(f.user().await.as_deref(), Some("v2"));
    }

    #[test]
    fn the_cache_holds_a_bounded_number_of_reads() {
        let registry = Registry::new();
        let link = RedisLink::new(
            "redis://127.0.0.1:1/0",
            RedisMetrics::register(&registry).expect("metrics"),
        )
        .expect("url");
        let reads = ConfirmedReads::new(Arc::new(link), &registry).expect("metrics");
        // One cached read per session: as many sessions as an outsider can
        // get tokens for must not grow the replica's memory without bound.
        for i in 0..MAX_CACHED_READS + 4_096 {
            reads.cache.insert(
                vec![(Collection::Sessions, format!("s{i}"))],
                CachedRead {
                    tags: vec![1],
                    fetched: Instant::now(),
                    records: vec![None],
                },
            );
        }
        assert!(
            reads.cache.len() <= MAX_CACHED_READS,
            "{} cached reads",
            reads.cache.len()
        );
    }

    #[tokio::test]
    async fn a_tag_that_disappears_confirms_nothing() {
        let Some(f) = fixture(NO_EXPIRY) else { return };
        f.write(&f.publishing, "v1");
        for _ in 0..3 {
            f.user().await;
        }
        assert_eq!(f.outcome("hit"), 1);
        // Redis restarted or evicted the tag, and a write then landed
        // without setting one: the cached read is not served.
        let tag = tag_key(Collection::Users, &f.keys[0].1);
        let mut c = redis::Client::open("redis://127.0.0.1:6379/0")
            .expect("url")
            .get_connection()
            .expect("connect");
        redis::cmd("DEL")
            .arg(&tag)
            .query::<()>(&mut c)
            .expect("del");
        f.write(f.silent.as_ref(), "v2");
        assert_eq!(f.user().await.as_deref(), Some("v2"));
        assert_eq!(f.outcome("hit"), 1);
    }

    #[tokio::test]
    async fn without_redis_every_read_goes_to_the_store_and_writes_wait_out_the_lease() {
        let registry = Registry::new();
        // Nothing listens on port 1.
        let link = Arc::new(
            RedisLink::new(
                "redis://127.0.0.1:1/0",
                RedisMetrics::register(&registry).expect("metrics"),
            )
            .expect("url"),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        let store = crate::cluster::SyncedStore::publishing(
            inner,
            Arc::new(Publisher::new(Some(link.clone()))),
        );
        let reads = ConfirmedReads::new(link, &registry).expect("metrics");
        let keys = vec![(Collection::Users, "u1".to_string())];

        let started = Instant::now();
        store
            .write(
                vec![put(Collection::Users, "u1", "v1")],
                Durability::Durable,
            )
            .expect("write");
        assert!(
            started.elapsed() >= LEASE,
            "a write whose tag could not be set answers only once no replica trusts an older read"
        );
        for value in ["v2", "v3"] {
            let found = reads.get_many(&store, keys.clone()).await.expect("read");
            assert!(found[0].is_some());
            // Writes that set no tag are still seen: nothing was cached.
            inner_write(&store, value);
            let found = reads.get_many(&store, keys.clone()).await.expect("read");
            assert_eq!(
                found[0].as_ref().map(|r| &r.value[..]),
                Some(value.as_bytes())
            );
        }
        assert_eq!(reads.outcomes.with_label_values(&["unconfirmed"]).get(), 4);
        assert_eq!(reads.outcomes.with_label_values(&["hit"]).get(), 0);
    }

    fn inner_write(store: &crate::cluster::SyncedStore, value: &str) {
        store
            .inner
            .write(
                vec![put(Collection::Users, "u1", value)],
                Durability::Durable,
            )
            .expect("write");
    }

    #[test]
    fn an_operator_command_without_redis_waits_out_the_lease_before_exiting() {
        let p = Publisher::new(None);
        let started = Instant::now();
        p.settle();
        assert!(started.elapsed() < LEASE, "nothing written: no wait");
        p.published(&["aragora:tag:users:u1".to_string()]);
        p.settle();
        assert!(started.elapsed() >= LEASE + LEASE_MARGIN);
    }

    #[test]
    fn only_the_per_request_collections_get_tags() {
        let ops = vec![
            put(Collection::Users, "u1", "x"),
            put(Collection::Audit, "a1", "x"),
            put(Collection::Sessions, "s1", "x"),
            put(Collection::Users, "u1", "y"),
        ];
        assert_eq!(
            Publisher::tag_keys(&ops),
            vec![
                "aragora:tag:sessions:s1".to_string(),
                "aragora:tag:users:u1".to_string()
            ]
        );
    }
}
