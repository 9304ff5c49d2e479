//! Brute-force defences: escalating per-account lockout, a per-IP limiter on
//! authentication attempts (governor), and operator-set IP blocks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::RwLock;

use super::model::{IpBlock, User};

/// Distinct addresses tracked by the limiter before idle ones are dropped.
const MAX_TRACKED_IPS: usize = 100_000;

#[derive(Clone, Copy, Debug)]
pub struct LockoutPolicy {
    pub threshold: u32,
    pub base: Duration,
    pub max: Duration,
}

impl LockoutPolicy {
    /// Records a failed password on `user`; returns the lock end when this failure
    /// locks the account. Each lockout since the last success doubles the next.
    pub fn on_failure(&self, user: &mut User, now_us: i64) -> Option<i64> {
        user.failed_logins += 1;
        if user.failed_logins < self.threshold {
            return None;
        }
        user.failed_logins = 0;
        let factor = 1u64 << user.lockouts.min(20);
        user.lockouts = user.lockouts.saturating_add(1);
        let secs = self
            .base
            .as_secs()
            .saturating_mul(factor)
            .min(self.max.as_secs());
        let until =
            now_us.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX / 2_000_000) * 1_000_000);
        user.locked_until = Some(until);
        Some(until)
    }

    pub fn on_success(&self, user: &mut User) {
        user.failed_logins = 0;
        user.lockouts = 0;
        user.locked_until = None;
    }
}

/// At most AUTH_RATE_LIMIT_PER_IP attempts per AUTH_RATE_LIMIT_WINDOW per
/// address, refilled continuously (GCRA).
#[derive(Debug)]
pub struct IpLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl IpLimiter {
    pub fn new(per_window: u32, window: Duration) -> Self {
        let burst = NonZeroU32::new(per_window.max(1)).unwrap_or(NonZeroU32::MIN);
        let period = (window / burst.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
        }
    }

    /// Takes one attempt for `ip`; `Err(seconds until the next is allowed)`.
    pub fn attempt(&self, ip: IpAddr) -> Result<(), u64> {
        if self.limiter.len() > MAX_TRACKED_IPS {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&ip).map_err(|not_until| {
            not_until
                .wait_time_from(DefaultClock::default().now())
                .as_secs()
                .max(1)
        })
    }
}

/// Blocked addresses, kept in memory (every request checks them) and in the
/// store (they survive restarts).
#[derive(Debug, Default)]
pub struct IpBlocks {
    blocks: RwLock<HashMap<IpAddr, IpBlock>>,
}

impl IpBlocks {
    pub fn load(blocks: Vec<IpBlock>) -> Self {
        let map = blocks
            .into_iter()
            .filter_map(|b| b.ip.parse().ok().map(|ip| (ip, b)))
            .collect();
        Self {
            blocks: RwLock::new(map),
        }
    }

    pub fn active(&self, ip: IpAddr, now_us: i64) -> Option<IpBlock> {
        let blocks = self.blocks.read();
        blocks.get(&ip).filter(|b| b.expires_at > now_us).cloned()
    }

    pub fn set(&self, ip: IpAddr, block: Option<IpBlock>) {
        let mut blocks = self.blocks.write();
        match block {
            Some(b) => blocks.insert(ip, b),
            None => blocks.remove(&ip),
        };
    }

    pub fn list(&self, now_us: i64) -> Vec<IpBlock> {
        let mut v: Vec<_> = self
            .blocks
            .read()
            .values()
            .filter(|b| b.expires_at > now_us)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.ip.cmp(&b.ip));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            id: "u".into(),
            email: "u@x".into(),
            password_hash: None,
            roles: vec![],
            disabled: false,
            disabled_reason: None,
            created_at: 0,
            failed_logins: 0,
            lockouts: 0,
            locked_until: None,
            last_active_at: None,
            session_generation: 0,
        }
    }

    #[test]
    fn lockout_escalates_and_caps() {
        let p = LockoutPolicy {
            threshold: 3,
            base: Duration::from_secs(60),
            max: Duration::from_secs(200),
        };
        let mut u = user();
        assert_eq!(p.on_failure(&mut u, 0), None);
        assert_eq!(p.on_failure(&mut u, 0), None);
        assert_eq!(p.on_failure(&mut u, 0), Some(60_000_000));
        for _ in 0..2 {
            p.on_failure(&mut u, 0);
        }
        assert_eq!(
            p.on_failure(&mut u, 0),
            Some(120_000_000),
            "second lockout doubles"
        );
        for _ in 0..2 {
            p.on_failure(&mut u, 0);
        }
        assert_eq!(
            p.on_failure(&mut u, 0),
            Some(200_000_000),
            "capped at the maximum"
        );
        p.on_success(&mut u);
        assert_eq!((u.failed_logins, u.lockouts, u.locked_until), (0, 0, None));
    }

    #[test]
    fn limiter_allows_the_quota_then_refuses() {
        let l = IpLimiter::new(5, Duration::from_secs(60));
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        for _ in 0..5 {
            assert!(l.attempt(ip).is_ok());
        }
        let wait = l.attempt(ip).expect_err("sixth attempt in the window");
        assert!((1..=12).contains(&wait), "retry after {wait}");
        assert!(
            l.attempt("10.0.0.2".parse().expect("ip")).is_ok(),
            "per address"
        );
    }
}
