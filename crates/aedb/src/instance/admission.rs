//! Admission control: the bounded commit queue and the optional commit rate.
//! A commit holds a `QueueSlot` from admission to its result, so the queue
//! length is the number of commits in flight.
//!
//! The rate can change while the instance runs (an operator slowing writers
//! down during an incident): the limiter sits behind an `ArcSwapOption`, so
//! `admit` reads it with one atomic load and a change never blocks a commit.
//! A new rate starts with a full burst of its own (governor's quota).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwapOption;

use crate::config::Limits;
use crate::error::AedbError;

/// One rate and the limiter enforcing it.
struct Rate {
    per_sec: NonZeroU32,
    limiter: governor::DefaultDirectRateLimiter,
}

impl Rate {
    fn new(per_sec: NonZeroU32) -> Arc<Self> {
        Arc::new(Self {
            per_sec,
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(per_sec)),
        })
    }
}

pub(crate) struct Admission {
    queued: AtomicUsize,
    max_queued: usize,
    rate: ArcSwapOption<Rate>,
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
            rate: ArcSwapOption::new(
                limits
                    .max_commits_per_sec
                    .and_then(NonZeroU32::new)
                    .map(Rate::new),
            ),
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
        if let Some(rate) = &*self.rate.load()
            && rate.limiter.check().is_err()
        {
            return Err(AedbError::Overloaded {
                reason: format!("admission rate of {} commits/s exceeded", rate.per_sec),
            });
        }
        Ok(slot)
    }

    /// Commits admitted and not yet finished.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The commit rate in force (`None`: unlimited).
    pub(crate) fn max_per_sec(&self) -> Option<u32> {
        self.rate.load().as_ref().map(|r| r.per_sec.get())
    }

    /// Replaces the commit rate (`None` or 0: unlimited); returns the one it
    /// replaced. Commits in flight keep the answer they got.
    pub(crate) fn set_max_per_sec(&self, per_sec: Option<u32>) -> Option<u32> {
        let next = per_sec.and_then(NonZeroU32::new).map(Rate::new);
        self.rate.swap(next).map(|r| r.per_sec.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_commits_per_sec: Option<u32>) -> Admission {
        Admission::new(&Limits {
            max_commits_per_sec,
            ..Limits::default()
        })
    }

    /// Admits until the first refusal; the bound only stops a broken limiter.
    fn admitted_before_refusal(a: &Admission) -> (usize, Option<String>) {
        for n in 0..100_000 {
            if let Err(e) = a.admit() {
                return (n, Some(e.to_string()));
            }
        }
        (100_000, None)
    }

    #[test]
    fn a_rate_set_at_runtime_refuses_the_burst_beyond_it_and_unlimited_lifts_it() {
        let a = admission(None);
        assert_eq!(a.max_per_sec(), None);
        // Unlimited: nothing is refused.
        assert_eq!(admitted_before_refusal(&a).1, None);

        assert_eq!(a.set_max_per_sec(Some(3)), None);
        assert_eq!(a.max_per_sec(), Some(3));
        // A quota of 3/s allows a burst of 3 at most: with no wall-clock
        // assumption, between 1 and 3 go through before the first refusal
        // (more only if seconds pass between two calls).
        let (n, refusal) = admitted_before_refusal(&a);
        assert!((1..100_000).contains(&n), "admitted {n}");
        let refusal = refusal.expect("a refusal");
        assert!(
            refusal.contains("admission rate of 3 commits/s exceeded"),
            "{refusal}"
        );

        assert_eq!(a.set_max_per_sec(None), Some(3));
        assert_eq!(a.max_per_sec(), None);
        assert_eq!(admitted_before_refusal(&a).1, None);
    }

    #[test]
    fn zero_means_unlimited_like_the_limit_at_open() {
        let a = admission(Some(0));
        assert_eq!(a.max_per_sec(), None);
        a.set_max_per_sec(Some(5));
        assert_eq!(a.set_max_per_sec(Some(0)), Some(5));
        assert_eq!(a.max_per_sec(), None);
    }

    /// Through the instance: only GlobalAdmin changes the rate (a denial is
    /// audited and changes nothing), the metrics show the rate in force, a
    /// burst beyond it is refused as `Overloaded` and counted, and unlimited
    /// lifts it.
    #[test]
    fn the_runtime_rate_needs_global_admin_and_shows_in_the_metrics() {
        use crate::{
            AedbConfig, AedbInstance, CallerContext, CommitError, DdlOperation, Permission,
        };

        let dir = tempfile::tempdir().expect("tempdir");
        let db = AedbInstance::open(
            AedbConfig::development().with_bootstrap_admin("root"),
            dir.path(),
        )
        .expect("open");
        let root = CallerContext::new("root").expect("caller");
        let svc = CallerContext::new("svc").expect("caller");
        db.create_project("p").expect("project");
        db.create_scope("p", "s").expect("scope");
        db.commit_ddl_batch(vec![DdlOperation::GrantPermission {
            grantee: "svc".into(),
            permission: Permission::KvWrite {
                project: "p".into(),
                scope: None,
                prefix: None,
            },
            delegable: false,
        }])
        .expect("grant");
        assert_eq!(db.operational_metrics().max_commits_per_sec, None);

        let denied = db.set_max_commits_per_sec_as(&svc, Some(1));
        assert!(
            matches!(denied, Err(AedbError::PermissionDenied { .. })),
            "{denied:?}"
        );
        assert_eq!(db.operational_metrics().max_commits_per_sec, None);

        assert_eq!(
            db.set_max_commits_per_sec_as(&root, Some(2))
                .expect("GlobalAdmin sets it"),
            None
        );
        assert_eq!(db.operational_metrics().max_commits_per_sec, Some(2));
        let mut overloaded = None;
        for i in 0..10_000u32 {
            match db.kv_set_as(&svc, "p", "s", &i.to_be_bytes(), b"v") {
                Ok(_) => {}
                Err(e @ CommitError::Overloaded { .. }) => {
                    overloaded = Some(e.to_string());
                    break;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        let overloaded = overloaded.expect("a burst beyond 2/s is refused");
        assert!(overloaded.contains("2 commits/s"), "{overloaded}");
        assert!(db.operational_metrics().admission_rejections >= 1);

        assert_eq!(
            db.set_max_commits_per_sec_as(&root, None)
                .expect("GlobalAdmin lifts it"),
            Some(2)
        );
        assert_eq!(db.operational_metrics().max_commits_per_sec, None);
        for i in 0..50u32 {
            db.kv_set_as(&svc, "p", "s", &i.to_be_bytes(), b"w")
                .expect("unlimited again");
        }
        db.close().expect("close");
    }

    #[test]
    fn a_refused_commit_frees_its_queue_slot() {
        let a = admission(Some(1));
        let _ = admitted_before_refusal(&a);
        assert_eq!(a.queued(), 0);
    }
}
