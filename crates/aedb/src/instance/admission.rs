//! Admission control: the bounded commit queue and the optional commit rate.
//! A commit holds a `QueueSlot` from admission to its result, so the queue
//! length is the number of commits in flight.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Limits;
use crate::error::AedbError;

pub(crate) struct Admission {
    queued: AtomicUsize,
    max_queued: usize,
    rate: Option<governor::DefaultDirectRateLimiter>,
    max_per_sec: Option<u32>,
}

/// One slot of the bounded commit queue, freed on drop.
pub(crate) struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub(crate) fn new(limits: &Limits) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            max_queued: limits.max_queued_commits,
            rate: limits
                .max_commits_per_sec
                .and_then(NonZeroU32::new)
                .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n))),
            max_per_sec: limits.max_commits_per_sec,
        }
    }

    /// A slot, or `Overloaded` at once (fail fast: a caller retries with backoff
    /// rather than queueing without bound).
    pub(crate) fn admit(&self) -> Result<QueueSlot<'_>, AedbError> {
        let limit = self.max_queued;
        // Take a slot only if one is free, so the counter (and the
        // `queued_commits` metric) never exceeds the limit, even briefly.
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < limit).then_some(queued + 1)
            })
            .map_err(|queued| AedbError::Overloaded {
                reason: format!("{queued} commits queued (limit {limit})"),
            })?;
        let slot = QueueSlot(&self.queued);
        if let Some(rl) = &self.rate
            && rl.check().is_err()
        {
            return Err(AedbError::Overloaded {
                reason: format!(
                    "admission rate of {} commits/s exceeded",
                    self.max_per_sec.unwrap_or(0)
                ),
            });
        }
        Ok(slot)
    }

    /// Commits admitted and not yet finished.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}
