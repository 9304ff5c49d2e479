//! The key ring's own counters for `GET /api/security/encryption/stats`:
//! operation counts, latency percentiles over a bounded window, decrypts per
//! actor over the last minute, and the key-derivation cost sampled every
//! [`DERIVATION_PROBE_INTERVAL`] over the last hour.
//! Prometheus gets the same events through `Metrics`; these exist because the
//! endpoint reports percentiles and per-actor rates a scrape cannot give.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::views::{ActorDecrypts, EncryptionStats, KeyCacheView};
use crate::clock::now_us;
use crate::config::Environment;
use crate::crypto::kdf;
use crate::metrics::window::SampleWindow;

/// Latency samples kept per operation for the percentiles of `stats`.
const SAMPLES: usize = 4096;
/// Actors tracked for the decrypt rate before idle ones are dropped.
const MAX_TRACKED_ACTORS: usize = 10_000;
/// How often the server times one derivation for `derivation_latency_p95`.
/// The runbook reads the figure as a sign of CPU contention *now*, so it is
/// sampled while the server runs, not once at boot; at the production cost
/// (600 000 PBKDF2 iterations, ~0.2 s of one core) every 30 s is under 1% of
/// a core.
pub const DERIVATION_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// Derivation samples kept: one hour at the probe interval.
const DERIVATION_SAMPLES: usize = 120;

/// Decrypts per actor in the last 60 one-second buckets.
#[derive(Debug)]
struct Window {
    buckets: [(i64, u64); 60],
}

impl Default for Window {
    fn default() -> Self {
        Self {
            buckets: [(i64::MIN, 0); 60],
        }
    }
}

impl Window {
    fn add(&mut self, sec: i64) {
        let slot = &mut self.buckets[sec.rem_euclid(60) as usize];
        if slot.0 == sec {
            slot.1 += 1;
        } else {
            *slot = (sec, 1);
        }
    }

    fn last_minute(&self, now_sec: i64) -> u64 {
        self.buckets
            .iter()
            .filter(|(s, _)| *s > now_sec - 60 && *s <= now_sec)
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Debug)]
pub(super) struct Stats {
    encrypt_ops: AtomicU64,
    decrypt_ops: AtomicU64,
    errors: AtomicU64,
    encrypt_latency: Mutex<SampleWindow>,
    decrypt_latency: Mutex<SampleWindow>,
    derivation: Mutex<SampleWindow>,
    derivation_iterations: u32,
    environment: Environment,
    per_actor: Mutex<HashMap<String, Window>>,
}

impl Stats {
    /// Empty counters plus the derivation cost measured now.
    pub(super) fn measure(environment: Environment) -> Self {
        let stats = Self {
            encrypt_ops: AtomicU64::new(0),
            decrypt_ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            encrypt_latency: Mutex::new(SampleWindow::with_capacity(SAMPLES)),
            decrypt_latency: Mutex::new(SampleWindow::with_capacity(SAMPLES)),
            derivation: Mutex::new(SampleWindow::with_capacity(DERIVATION_SAMPLES)),
            derivation_iterations: kdf::pbkdf2_iterations(environment).get(),
            environment,
            per_actor: Mutex::new(HashMap::new()),
        };
        stats.sample_derivation();
        stats
    }

    /// Times one PBKDF2 derivation at the configured cost (what a
    /// password-derived key costs on this machine right now) and adds it to
    /// the window. Blocking: run it off the async executor.
    pub(super) fn sample_derivation(&self) {
        let secs = time_derivation(self.environment);
        self.derivation.lock().push(secs);
    }

    /// A successful encryption that took `secs`.
    pub(super) fn encrypted(&self, secs: f64) {
        self.encrypt_ops.fetch_add(1, Ordering::Relaxed);
        self.encrypt_latency.lock().push(secs);
    }

    /// A successful decryption that took `secs`, on behalf of `actor` when
    /// one is named.
    pub(super) fn decrypted(&self, secs: f64, actor: Option<&str>) {
        self.decrypt_ops.fetch_add(1, Ordering::Relaxed);
        self.decrypt_latency.lock().push(secs);
        if let Some(actor) = actor {
            let sec = now_us().div_euclid(1_000_000);
            let mut per_actor = self.per_actor.lock();
            // Bounded memory: drop idle actors before tracking a new one.
            if per_actor.len() >= MAX_TRACKED_ACTORS && !per_actor.contains_key(actor) {
                per_actor.retain(|_, w| w.last_minute(sec) > 0);
            }
            per_actor.entry(actor.to_string()).or_default().add(sec);
        }
    }

    /// A failed encryption or decryption.
    pub(super) fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as the stats endpoint shows them, with the ring's `cache`.
    pub(super) fn view(&self, cache: KeyCacheView) -> EncryptionStats {
        let now_sec = now_us().div_euclid(1_000_000);
        let mut per_actor: Vec<(String, u64)> = {
            let mut map = self.per_actor.lock();
            map.retain(|_, w| w.last_minute(now_sec) > 0);
            map.iter()
                .map(|(a, w)| (a.clone(), w.last_minute(now_sec)))
                .collect()
        };
        per_actor.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let total: u64 = per_actor.iter().map(|(_, n)| n).sum();
        let (e50, e95) = {
            let s = self.encrypt_latency.lock();
            (s.percentile(0.5), s.percentile(0.95))
        };
        let (d50, d95) = {
            let s = self.decrypt_latency.lock();
            (s.percentile(0.5), s.percentile(0.95))
        };
        let (derivation_latency_p95, derivation_samples) = {
            let s = self.derivation.lock();
            (s.percentile(0.95), s.len())
        };
        EncryptionStats {
            encrypt_ops: self.encrypt_ops.load(Ordering::Relaxed),
            decrypt_ops: self.decrypt_ops.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            encryption_latency_p50: e50,
            encryption_latency_p95: e95,
            decryption_latency_p50: d50,
            decryption_latency_p95: d95,
            derivation_latency_p95,
            derivation_samples,
            derivation_iterations: self.derivation_iterations,
            decrypts_last_minute: total,
            decrypts_per_actor: per_actor
                .into_iter()
                .map(|(actor, n)| ActorDecrypts {
                    actor,
                    last_minute: n,
                    per_second: n as f64 / 60.0,
                })
                .collect(),
            cache,
        }
    }
}

/// Seconds one PBKDF2 derivation at the environment's cost takes now.
fn time_derivation(environment: Environment) -> f64 {
    let iterations = kdf::pbkdf2_iterations(environment);
    let t = Instant::now();
    let _ = kdf::derive_key(b"aragora derivation probe", b"probe-salt-16byt", iterations);
    t.elapsed().as_secs_f64()
}
