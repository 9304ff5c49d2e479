//! The link to Redis (`REDIS_URL`) that replicas share through:
//!
//! - the per-client login limit as one GCRA in a Lua script, so every replica
//!   counts against the same budget and a client cannot multiply its attempts
//!   by the replica count;
//! - the version tags that confirm a replica's cached per-request records are
//!   current (`crate::cluster::confirmed`): one `MGET` per request instead of a
//!   round trip to the shared store.
//!
//! Redis never decides anything on its own: a limit it cannot answer falls
//! back to the replica's own, and a tag it cannot answer sends the request to
//! the shared store. When Redis does not answer within [`IO_TIMEOUT`],
//! `aragora_redis_up` drops to 0, `aragora_redis_errors_total` counts the
//! failure and one warning is logged per outage (not per request); for
//! [`RETRY_AFTER_FAILURE`] afterwards the per-request path does not try it
//! again (so a Redis that hangs costs the requests nothing but a fallback).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::window::SampleWindow;
use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

/// Connect, read and write timeout: a login never waits longer than this on
/// Redis before falling back to the per-replica limit.
pub const IO_TIMEOUT: Duration = Duration::from_millis(250);
/// Round trips behind `latency_p50`.
const RECENT_ROUND_TRIPS: usize = 256;
/// Connections kept open for reuse (each request takes one for one command).
const MAX_IDLE_CONNECTIONS: usize = 8;
/// After a failed round trip, how long the per-request path skips Redis.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// GCRA (the generic cell rate algorithm, as `governor` runs locally) on the
/// theoretical arrival time kept under KEYS[1]; Redis's clock, so replicas'
/// clocks do not matter. ARGV: emission interval and burst, in microseconds
/// and cells. Returns {1, 0} when allowed, {0, microseconds to wait} when not.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if now < allow_at then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
"#;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("REDIS_URL: {0}")]
    Url(String),
    #[error("redis at {host}: {reason}")]
    Io { host: String, reason: String },
    #[error("redis at {host} answered unexpectedly: {reason}")]
    Protocol { host: String, reason: String },
}

/// The metrics of the link, registered once.
#[derive(Clone, Debug)]
pub struct RedisMetrics {
    up: IntGauge,
    errors: IntCounterVec,
    latency: Histogram,
}

impl RedisMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let up = IntGauge::new(
            "aragora_redis_up",
            "1 while the last Redis command succeeded, 0 while limits fall back to each replica",
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "aragora_redis_errors_total",
                "Redis commands that failed or timed out, by operation (login_limit: the replica's own limit applied; confirm: the request read the shared store; publish: the write waited out the cache lease)",
            ),
            &["operation"],
        )?;
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "aragora_redis_command_duration_seconds",
                "Round trip of one Redis command",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25,
            ]),
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        for operation in ["login_limit", "confirm", "publish"] {
            errors.with_label_values(&[operation]);
        }
        Ok(Self {
            up,
            errors,
            latency,
        })
    }
}

/// What `rbac/cache/stats` and health say about the link.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RedisStatus {
    /// Host and port only: the URL's password is never shown.
    pub host: String,
    pub up: bool,
    /// Median round trip of the recent commands, seconds.
    pub latency_p50: f64,
}

pub struct RedisLink {
    client: redis::Client,
    host: String,
    idle: Mutex<Vec<redis::Connection>>,
    /// The per-request path's connection: one multiplexed connection that
    /// every request task pipelines on; `None` until connected or after it
    /// failed.
    multiplexed: Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// One connect at a time (requests arriving meanwhile wait for it).
    connecting: tokio::sync::Mutex<()>,
    /// Until when the per-request path skips Redis after a failure.
    skip_until: Mutex<Option<Instant>>,
    script: redis::Script,
    metrics: RedisMetrics,
    /// Whether the last command failed, so an outage logs once.
    down: AtomicBool,
    /// The last round trips, for the p50 the stats endpoint shows.
    recent: Mutex<SampleWindow>,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: only the host is shown.
        f.debug_struct("RedisLink")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// `host:port` of a Redis URL, for messages (never the password).
pub fn redacted_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        "?".into()
    } else if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:6379")
    }
}

impl RedisLink {
    /// Checks the URL (no connection yet: Redis may come up after aragora,
    /// and a replica without it still serves with per-replica limits).
    pub fn new(url: &str, metrics: RedisMetrics) -> Result<Self, RedisError> {
        let host = redacted_host(url);
        let client = redis::Client::open(url).map_err(|e| {
            RedisError::Url(format!(
                "not a Redis URL (redis://host:port/db, or rediss:// for TLS): {:?}",
                e.kind()
            ))
        })?;
        metrics.up.set(1);
        Ok(Self {
            client,
            host,
            idle: Mutex::new(Vec::new()),
            multiplexed: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            skip_until: Mutex::new(None),
            script: redis::Script::new(GCRA),
            metrics,
            down: AtomicBool::new(false),
            recent: Mutex::new(SampleWindow::with_capacity(RECENT_ROUND_TRIPS)),
        })
    }

    fn connection(&self) -> Result<redis::Connection, RedisError> {
        if let Some(c) = self.idle.lock().pop() {
            return Ok(c);
        }
        let c = self
            .client
            .get_connection_with_timeout(IO_TIMEOUT)
            .map_err(|e| self.io(&e))?;
        c.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| self.io(&e))?;
        c.set_write_timeout(Some(IO_TIMEOUT))
            .map_err(|e| self.io(&e))?;
        Ok(c)
    }

    fn io(&self, e: &redis::RedisError) -> RedisError {
        RedisError::Io {
            host: self.host.clone(),
            reason: e.to_string(),
        }
    }

    /// Runs `f` on a pooled connection, with the metrics, the outage log
    /// and the connection returned to the pool only when it worked.
    fn run<T>(
        &self,
        operation: &str,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, RedisError> {
        let started = Instant::now();
        let result = self.connection().and_then(|mut c| match f(&mut c) {
            Ok(v) => {
                let mut idle = self.idle.lock();
                if idle.len() < MAX_IDLE_CONNECTIONS {
                    idle.push(c);
                }
                Ok(v)
            }
            Err(e) => Err(self.io(&e)),
        });
        self.account(operation, started, result)
    }

    /// The metrics, the outage log and the per-request backoff for one
    /// round trip's result.
    fn account<T>(
        &self,
        operation: &str,
        started: Instant,
        result: Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        match &result {
            Ok(_) => {
                let secs = started.elapsed().as_secs_f64();
                self.metrics.latency.observe(secs);
                self.recent.lock().push(secs);
                self.metrics.up.set(1);
                if self.down.swap(false, Ordering::AcqRel) {
                    tracing::warn!(
                        host = %self.host,
                        "redis is back: login limits are shared and cached request records confirmed through it again"
                    );
                }
            }
            Err(e) => {
                self.metrics.errors.with_label_values(&[operation]).inc();
                self.metrics.up.set(0);
                *self.skip_until.lock() = Some(Instant::now() + RETRY_AFTER_FAILURE);
                if !self.down.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        error = %e,
                        "redis unreachable: login limits fall back to each replica's own and every request reads the shared store until it answers"
                    );
                }
            }
        }
        result
    }

    /// The multiplexed connection, connecting once for all waiting requests.
    async fn multiplexed(&self) -> Result<redis::aio::MultiplexedConnection, RedisError> {
        if let Some(c) = self.multiplexed.lock().clone() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.multiplexed.lock().clone() {
            return Ok(c);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(IO_TIMEOUT))
            .set_response_timeout(Some(IO_TIMEOUT));
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.io(&e))?;
        *self.multiplexed.lock() = Some(c.clone());
        Ok(c)
    }

    /// Runs one command on the multiplexed connection, unless a failure
    /// within [`RETRY_AFTER_FAILURE`] says Redis is down (then at once an
    /// error, so the caller falls back without waiting).
    async fn run_async<T: redis::FromRedisValue>(
        &self,
        operation: &str,
        command: impl FnOnce() -> redis::Pipeline,
    ) -> Result<T, RedisError> {
        if let Some(until) = *self.skip_until.lock()
            && Instant::now() < until
        {
            return Err(RedisError::Io {
                host: self.host.clone(),
                reason: "failed within the last second; not retried yet".into(),
            });
        }
        let started = Instant::now();
        let result = async {
            let mut c = self.multiplexed().await?;
            let r = tokio::time::timeout(IO_TIMEOUT, command().query_async::<T>(&mut c)).await;
            match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(self.io(&e)),
                Err(_) => Err(RedisError::Io {
                    host: self.host.clone(),
                    reason: format!("no answer within {} ms", IO_TIMEOUT.as_millis()),
                }),
            }
        }
        .await;
        if result.is_err() {
            // Reconnect next time: the connection may be the broken part.
            *self.multiplexed.lock() = None;
        }
        self.account(operation, started, result)
    }

    /// The values of `keys` as numbers (`None`: absent), in one round trip.
    pub async fn get_tags(&self, keys: &[String]) -> Result<Vec<Option<u64>>, RedisError> {
        let (tags,): (Vec<Option<u64>>,) = self
            .run_async("confirm", || {
                let mut p = redis::pipe();
                p.cmd("MGET").arg(keys);
                p
            })
            .await?;
        if tags.len() != keys.len() {
            return Err(RedisError::Protocol {
                host: self.host.clone(),
                reason: format!(
                    "MGET answered {} values for {} keys",
                    tags.len(),
                    keys.len()
                ),
            });
        }
        Ok(tags)
    }

    /// Sets each of `keys` that is absent to a fresh tag, expiring after `ttl`.
    pub async fn claim_tags(&self, keys: &[String], ttl: Duration) -> Result<(), RedisError> {
        self.run_async::<()>("confirm", || {
            let mut p = redis::pipe();
            for k in keys {
                p.cmd("SET")
                    .arg(k)
                    .arg(rand::random::<u64>())
                    .arg("NX")
                    .arg("EX")
                    .arg(ttl.as_secs().max(1))
                    .ignore();
            }
            p
        })
        .await
    }

    /// Sets every one of `keys` to one fresh tag (a write changed their
    /// records), expiring after `ttl`; blocking, for the store's write path.
    pub fn publish_tags(&self, keys: &[String], ttl: Duration) -> Result<(), RedisError> {
        let tag = rand::random::<u64>();
        self.run("publish", |c| {
            let mut p = redis::pipe();
            for k in keys {
                p.cmd("SET")
                    .arg(k)
                    .arg(tag)
                    .arg("EX")
                    .arg(ttl.as_secs().max(1))
                    .ignore();
            }
            p.query::<()>(c)
        })
    }

    /// Takes one cell of the GCRA under `key` (`per_window` cells per
    /// `window`): `Ok(Ok(()))` allowed, `Ok(Err(seconds))` refused with the
    /// wait, `Err` when Redis did not answer.
    pub fn take(
        &self,
        key: &str,
        per_window: u32,
        window: Duration,
    ) -> Result<Result<(), u64>, RedisError> {
        let burst = per_window.max(1);
        let interval_us = (window.as_micros() / u128::from(burst)).max(1);
        let interval_us = u64::try_from(interval_us).unwrap_or(u64::MAX / 4);
        let (allowed, wait_us): (i64, i64) = self.run("login_limit", |c| {
            self.script.key(key).arg(interval_us).arg(burst).invoke(c)
        })?;
        match allowed {
            1 => Ok(Ok(())),
            0 => {
                let secs = u64::try_from(wait_us).unwrap_or(0).div_ceil(1_000_000);
                Ok(Err(secs.max(1)))
            }
            other => Err(RedisError::Protocol {
                host: self.host.clone(),
                reason: format!("the limit script returned {other}"),
            }),
        }
    }

    pub fn status(&self) -> RedisStatus {
        RedisStatus {
            host: self.host.clone(),
            up: !self.down.load(Ordering::Acquire),
            latency_p50: self.recent.lock().percentile(0.5),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Redis at 127.0.0.1:6379 (the machine's service); under CI a missing
    /// one fails the test.
    fn link() -> Option<RedisLink> {
        local_link(&Registry::new())
    }

    /// A link to the machine's Redis registered in `registry`, `None` (a
    /// skip) when it does not answer outside CI.
    pub(crate) fn local_link(registry: &Registry) -> Option<RedisLink> {
        let l = RedisLink::new(
            "redis://127.0.0.1:6379/0",
            RedisMetrics::register(registry).expect("metrics"),
        )
        .expect("url");
        match l.run("ping", |c| redis::cmd("PING").query::<String>(c)) {
            Ok(_) => Some(l),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "Redis is required under CI=true: {e}"
                );
                eprintln!("skipping: {e}");
                None
            }
        }
    }

    #[test]
    fn the_limit_is_one_budget_for_every_link_sharing_redis() {
        let Some(a) = link() else { return };
        let Some(b) = link() else { return };
        let key = format!("aragora:test:login:{}", rand::random::<u64>());
        // Five per hour across two "replicas" (an hour, so no cell refills
        // however slowly the machine runs the calls): the sixth is refused on
        // either, with a wait of about one emission interval (720 s).
        let hour = Duration::from_secs(3600);
        for i in 0..5 {
            let l = if i % 2 == 0 { &a } else { &b };
            assert_eq!(l.take(&key, 5, hour).expect("redis"), Ok(()));
        }
        let wait = b
            .take(&key, 5, hour)
            .expect("redis")
            .expect_err("sixth attempt");
        assert!((1..=721).contains(&wait), "wait {wait}");
        assert!(a.take(&key, 5, hour).expect("redis").is_err());
        // The state a client leaves behind expires within the window: an
        // outsider sending from many addresses cannot grow Redis for good.
        let ttl_ms: i64 = a
            .run("ttl", |c| redis::cmd("PTTL").arg(&key).query(c))
            .expect("redis");
        assert!(
            (1..=3_600_001).contains(&ttl_ms),
            "the key's time to live is {ttl_ms} ms"
        );
        // Another client has its own budget.
        assert_eq!(
            a.take(&format!("{key}:other"), 5, hour).expect("redis"),
            Ok(())
        );
    }

    #[test]
    fn an_unreachable_redis_is_an_error_and_reported_down() {
        let registry = Registry::new();
        // Nothing listens on port 1.
        let l = RedisLink::new(
            "redis://127.0.0.1:1/0",
            RedisMetrics::register(&registry).expect("metrics"),
        )
        .expect("url");
        assert!(l.take("k", 5, Duration::from_secs(60)).is_err());
        assert!(!l.status().up);
        assert_eq!(l.metrics.up.get(), 0);
        assert_eq!(
            l.metrics.errors.with_label_values(&["login_limit"]).get(),
            1
        );
        assert!(!format!("{l:?}").contains("redis://"));
    }

    #[test]
    fn a_url_with_a_password_is_shown_by_host_only() {
        assert_eq!(
            redacted_host("redis://:s3cret@cache.internal:6380/0"),
            "cache.internal:6380"
        );
        let registry = Registry::new();
        let err = RedisLink::new(
            "http://nope",
            RedisMetrics::register(&registry).expect("metrics"),
        )
        .expect_err("not redis");
        assert!(err.to_string().starts_with("REDIS_URL"), "{err}");
    }
}
