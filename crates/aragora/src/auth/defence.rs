//! Brute-force defences: escalating per-account lockout, a per-client limiter
//! on authentication attempts (governor), and operator-set IP blocks. Clients
//! are addresses for IPv4 and networks for IPv6 (`crate::net::ClientNets`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use parking_lot::RwLock;

use super::model::{IpBlock, User};
use crate::net::{ClientNets, net_key, normalize};

/// Distinct clients tracked by the limiter before idle ones are dropped.
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
/// client network (an IPv4 address, an IPv6 /64 by default: see `crate::net`),
/// refilled continuously (GCRA).
#[derive(Debug)]
pub struct IpLimiter {
    limiter: DefaultKeyedRateLimiter<IpNet>,
    nets: ClientNets,
    per_window: u32,
    window: Duration,
    /// With REDIS_URL: one budget per client across every replica; the
    /// local limiter is the fallback while Redis does not answer.
    shared: Option<std::sync::Arc<crate::redis_link::RedisLink>>,
}

impl IpLimiter {
    pub fn new(per_window: u32, window: Duration, nets: ClientNets) -> Self {
        let burst = NonZeroU32::new(per_window.max(1)).unwrap_or(NonZeroU32::MIN);
        let period = (window / burst.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            nets,
            per_window,
            window,
            shared: None,
        }
    }

    /// Shares the limit with every replica on the same Redis.
    pub fn shared(mut self, link: std::sync::Arc<crate::redis_link::RedisLink>) -> Self {
        self.shared = Some(link);
        self
    }

    /// Takes one attempt for the client at `ip`; `Err(seconds until the next
    /// is allowed)`.
    pub fn attempt(&self, ip: IpAddr) -> Result<(), u64> {
        if let Some(link) = &self.shared {
            let key = format!("aragora:login:{}", net_key(&self.nets.of(ip)));
            // An error is counted and logged by the link; the local limit
            // below then holds this replica to the budget on its own.
            if let Ok(decision) = link.take(&key, self.per_window, self.window) {
                return decision;
            }
        }
        if self.limiter.len() > MAX_TRACKED_IPS {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&self.nets.of(ip))
            .map_err(|not_until| {
                not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs()
                    .max(1)
            })
    }
}

/// Active blocks kept at once; past this a new block is refused (400) rather
/// than letting the list (checked on every request) grow without bound.
pub const MAX_IP_BLOCKS: usize = 10_000;

/// One block in memory: what it covers, and every store key that holds it (a
/// block written before networks were normalized may sit under another key).
#[derive(Debug, Clone)]
struct Entry {
    block: IpBlock,
    store_keys: Vec<String>,
}

#[derive(Debug, Default)]
struct Index {
    by_net: HashMap<IpNet, Entry>,
    /// How many blocks of each (family, prefix length) exist, so a lookup is
    /// one hash probe per length in use rather than a scan of every block.
    lens: BTreeMap<(bool, u8), usize>,
}

impl Index {
    fn insert(&mut self, net: IpNet, entry: Entry) {
        if self.by_net.insert(net, entry).is_none() {
            *self.lens.entry(len_key(&net)).or_default() += 1;
        }
    }

    fn remove(&mut self, net: &IpNet) -> Option<Entry> {
        let e = self.by_net.remove(net)?;
        if let Some(n) = self.lens.get_mut(&len_key(net)) {
            *n -= 1;
            if *n == 0 {
                self.lens.remove(&len_key(net));
            }
        }
        Some(e)
    }
}

fn len_key(net: &IpNet) -> (bool, u8) {
    (matches!(net, IpNet::V6(_)), net.prefix_len())
}

/// The index of the active blocks among `blocks` (store records, keyed by
/// `ip`; several keys may hold one network's block).
fn build_index(blocks: Vec<IpBlock>, nets: ClientNets, now_us: i64) -> Index {
    let mut index = Index::default();
    for mut b in blocks {
        if b.expires_at <= now_us {
            continue;
        }
        let Ok(net) = nets.block_target(&b.ip) else {
            tracing::warn!(ip = %b.ip, "stored IP block is not an address or network; ignored");
            continue;
        };
        let key = b.ip.clone();
        b.ip = net_key(&net);
        let mut store_keys = vec![key];
        if let Some(old) = index.by_net.get(&net) {
            store_keys.extend(old.store_keys.iter().cloned());
            if old.block.expires_at > b.expires_at {
                b = old.block.clone();
            }
        }
        index.insert(
            net,
            Entry {
                block: b,
                store_keys,
            },
        );
    }
    index
}

/// Blocked networks, kept in memory (every request checks them) and in the
/// store (they survive restarts). An address is blocked when any active block
/// contains it.
#[derive(Debug, Default)]
pub struct IpBlocks {
    nets: ClientNets,
    index: RwLock<Index>,
}

impl IpBlocks {
    /// The active blocks among `blocks` (store records, keyed by `ip`).
    pub fn load(blocks: Vec<IpBlock>, nets: ClientNets, now_us: i64) -> Self {
        Self {
            nets,
            index: RwLock::new(build_index(blocks, nets, now_us)),
        }
    }

    /// Replaces every block with the active ones among `blocks` (another
    /// replica changed them: `crate::cluster`).
    pub fn replace_all(&self, blocks: Vec<IpBlock>, now_us: i64) {
        let index = build_index(blocks, self.nets, now_us);
        *self.index.write() = index;
    }

    /// What a block of `ip` (an address or CIDR network) covers.
    pub fn target(&self, ip: &str) -> Result<IpNet, String> {
        self.nets.block_target(ip)
    }

    /// The most specific active block containing `ip`.
    pub fn active(&self, ip: IpAddr, now_us: i64) -> Option<IpBlock> {
        let ip = normalize(ip);
        let index = self.index.read();
        let v6 = ip.is_ipv6();
        index
            .lens
            .keys()
            .rev()
            .filter(|(is_v6, _)| *is_v6 == v6)
            .filter_map(|(_, len)| IpNet::new(ip, *len).ok())
            .find_map(|net| {
                index
                    .by_net
                    .get(&net.trunc())
                    .filter(|e| e.block.expires_at > now_us)
            })
            .map(|e| e.block.clone())
    }

    /// Refuses a new block when `MAX_IP_BLOCKS` are active (replacing the
    /// block of the same network is always allowed); drops expired ones.
    /// Concurrent calls may overshoot by their number, which keeps the bound.
    pub fn check_room(&self, net: &IpNet, now_us: i64) -> Result<(), String> {
        let mut index = self.index.write();
        let expired: Vec<IpNet> = index
            .by_net
            .iter()
            .filter(|(_, e)| e.block.expires_at <= now_us)
            .map(|(n, _)| *n)
            .collect();
        for n in expired {
            index.remove(&n);
        }
        if index.by_net.len() >= MAX_IP_BLOCKS && !index.by_net.contains_key(net) {
            return Err(format!(
                "ip: {MAX_IP_BLOCKS} blocks are active, the most kept at once; remove some or block a wider network"
            ));
        }
        Ok(())
    }

    /// Store keys holding the block of exactly `net` (active or not).
    pub fn store_keys(&self, net: &IpNet) -> Vec<String> {
        self.index
            .read()
            .by_net
            .get(net)
            .map(|e| e.store_keys.clone())
            .unwrap_or_default()
    }

    /// Whether an active block of exactly `net` exists.
    pub fn is_active(&self, net: &IpNet, now_us: i64) -> bool {
        self.index
            .read()
            .by_net
            .get(net)
            .is_some_and(|e| e.block.expires_at > now_us)
    }

    /// Records `block` (stored under `block.ip`) as the block of `net`.
    pub fn insert(&self, net: IpNet, block: IpBlock) {
        let key = block.ip.clone();
        let mut index = self.index.write();
        index.remove(&net);
        index.insert(
            net,
            Entry {
                block,
                store_keys: vec![key],
            },
        );
    }

    pub fn remove(&self, net: &IpNet) {
        self.index.write().remove(net);
    }

    pub fn list(&self, now_us: i64) -> Vec<IpBlock> {
        let mut v: Vec<_> = self
            .index
            .read()
            .by_net
            .values()
            .filter(|e| e.block.expires_at > now_us)
            .map(|e| e.block.clone())
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
        let l = IpLimiter::new(5, Duration::from_secs(60), ClientNets::default());
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

    #[test]
    fn limiter_counts_an_ipv6_network_as_one_client() {
        let l = IpLimiter::new(3, Duration::from_secs(60), ClientNets::default());
        for i in 1..=3 {
            assert!(
                l.attempt(format!("2001:db8:0:1::{i:x}").parse().expect("ip"))
                    .is_ok()
            );
        }
        assert!(
            l.attempt("2001:db8:0:1:ffff::9".parse().expect("ip"))
                .is_err(),
            "another address of the same /64"
        );
        assert!(
            l.attempt("2001:db8:0:2::1".parse().expect("ip")).is_ok(),
            "another /64"
        );
        // The mapped form of an IPv4 client is the same client.
        for _ in 0..3 {
            assert!(l.attempt("192.0.2.9".parse().expect("ip")).is_ok());
        }
        assert!(l.attempt("::ffff:192.0.2.9".parse().expect("ip")).is_err());
    }

    fn block(ip: &str, expires_at: i64) -> IpBlock {
        IpBlock {
            ip: ip.into(),
            reason: String::new(),
            created_at: 0,
            expires_at,
            created_by: "admin".into(),
        }
    }

    #[test]
    fn blocks_apply_to_every_address_they_contain() {
        let nets = ClientNets::default();
        let b = IpBlocks::load(
            vec![
                block("10.0.0.0/24", 100),
                block("2001:db8:0:5::1", 100),
                block("198.51.100.7", 100),
                block("203.0.113.0/24", 10),
            ],
            nets,
            50,
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let blocked = |s: &str| b.active(ip(s), 60).map(|b| b.ip);
        assert_eq!(blocked("10.0.0.200"), Some("10.0.0.0/24".into()));
        assert_eq!(blocked("::ffff:10.0.0.9"), Some("10.0.0.0/24".into()));
        assert_eq!(blocked("10.0.1.1"), None);
        assert_eq!(
            blocked("2001:db8:0:5:abcd::1"),
            Some("2001:db8:0:5::/64".into())
        );
        assert_eq!(blocked("2001:db8:0:6::1"), None);
        assert_eq!(blocked("198.51.100.7"), Some("198.51.100.7".into()));
        assert_eq!(blocked("198.51.100.8"), None);
        assert_eq!(blocked("203.0.113.1"), None, "expired at load");
        assert_eq!(b.active(ip("10.0.0.1"), 100), None, "expired now");
        // A legacy record keyed by a single IPv6 address is found by its
        // network and deleted under its own key.
        let net = b.target("2001:db8:0:5::77").expect("net");
        assert_eq!(b.store_keys(&net), vec!["2001:db8:0:5::1".to_string()]);
        b.remove(&net);
        assert_eq!(blocked("2001:db8:0:5::1"), None);
        // The most specific block answers.
        let host = b.target("10.0.0.5").expect("net");
        b.insert(host, block("10.0.0.5", 100));
        assert_eq!(blocked("10.0.0.5"), Some("10.0.0.5".into()));
        assert_eq!(blocked("10.0.0.6"), Some("10.0.0.0/24".into()));
    }

    #[test]
    fn the_number_of_blocks_is_bounded() {
        let b = IpBlocks::load(Vec::new(), ClientNets::default(), 0);
        for i in 0..MAX_IP_BLOCKS {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32).to_string();
            let net = b.target(&ip).expect("net");
            b.check_room(&net, 0).expect("room");
            b.insert(net, block(&ip, 100));
        }
        let full = b.target("192.0.2.1").expect("net");
        let e = b.check_room(&full, 0).expect_err("full");
        assert!(e.contains("10000"), "{e}");
        let again = b.target("10.0.0.1").expect("net");
        assert!(b.check_room(&again, 0).is_ok(), "replacing is allowed");
        assert!(b.check_room(&full, 100).is_ok(), "expired blocks make room");
    }
}
