//! Role-based access control: the permission catalogue, built-in and custom
//! roles, and a decision cache.
//!
//! A decision depends on the user, their roles, the role definitions and the
//! permission. A cache entry stores all of them and is used only when they are
//! all equal to the request's (role definitions by an epoch bumped on every
//! change), so a stale entry cannot grant anything; changes also remove entries
//! eagerly, before the call that made the change returns.

pub mod catalogue;
pub mod denials;
pub mod grant;

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::metrics::Metrics;
use crate::store::{Collection, Store, StoreError, for_each_json};
use catalogue::{BUILTIN_ROLES, PERMISSIONS, builtin};
use grant::Grant;

/// Entries kept at most; beyond it expired entries go, then everything.
pub const MAX_CACHE_ENTRIES: usize = 100_000;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CustomRole {
    pub name: String,
    pub description: String,
    pub permissions: Vec<String>,
    pub created_at: i64,
    pub created_by: String,
}

/// A role with what it grants.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RoleView {
    pub name: String,
    pub description: String,
    pub builtin: bool,
    pub permissions: Vec<String>,
}

/// A catalogue entry (`GET /api/security/rbac/permissions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PermissionView {
    pub name: String,
    pub description: String,
    pub sensitive: bool,
}

/// The permission catalogue.
pub fn permission_catalogue() -> Vec<PermissionView> {
    PERMISSIONS
        .iter()
        .map(|p| PermissionView {
            name: p.name.to_string(),
            description: p.description.to_string(),
            sensitive: p.sensitive,
        })
        .collect()
}

/// `GET /api/security/rbac/cache/stats`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CacheStats {
    /// `memory`: decisions are cached in each process (evaluating a decision
    /// costs microseconds, less than a network round trip to share it).
    pub backend: String,
    /// How a change made through another replica reaches this cache:
    /// `single-process` (the embedded store: there is no other replica) or
    /// `store-generation` (a shared store: checked before every request,
    /// `crate::cluster`).
    pub invalidation: String,
    /// REDIS_URL's link (the shared login limit): host, up, round-trip p50
    /// in seconds. Absent without REDIS_URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<crate::redis_link::RedisStatus>,
    pub enabled: bool,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub size: usize,
    pub max_size: usize,
    /// Seconds.
    pub ttl: u64,
    pub invalidations: u64,
    pub evictions: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The role that grants the permission, when allowed.
    pub granted_by: Option<String>,
    pub cached: bool,
}

#[derive(Debug)]
struct CacheEntry {
    user_id: Box<str>,
    permission: Box<str>,
    roles: Box<str>,
    epoch: u64,
    granted_by: Option<Arc<str>>,
    expires: Instant,
}

#[derive(Debug, Default)]
struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Debug)]
pub struct Rbac {
    custom: RwLock<HashMap<String, CustomRole>>,
    epoch: AtomicU64,
    cache: RwLock<HashMap<u64, CacheEntry>>,
    counters: CacheCounters,
    ttl: Duration,
    metrics: Metrics,
}

fn cache_key(user_id: &str, permission: &str) -> u64 {
    let mut h = DefaultHasher::new();
    user_id.hash(&mut h);
    permission.hash(&mut h);
    h.finish()
}

/// Roles as one canonical string (sorted, deduplicated), the form stored in a
/// cache entry and shown as the `role` of a denial. One role, the common case,
/// is borrowed: no allocation on the decision path.
pub fn roles_label(roles: &[String]) -> Cow<'_, str> {
    match roles {
        [] => Cow::Borrowed("none"),
        [one] => Cow::Borrowed(one.as_str()),
        many => {
            let set: BTreeSet<&str> = many.iter().map(String::as_str).collect();
            Cow::Owned(set.into_iter().collect::<Vec<_>>().join(","))
        }
    }
}

impl Rbac {
    pub fn load(store: &dyn Store, metrics: Metrics, ttl: Duration) -> Result<Self, StoreError> {
        let mut custom = HashMap::new();
        for_each_json::<CustomRole>(store, Collection::Roles, |name, _, role| {
            custom.insert(name, role);
            Ok(())
        })?;
        Ok(Self {
            custom: RwLock::new(custom),
            epoch: AtomicU64::new(1),
            cache: RwLock::new(HashMap::new()),
            counters: CacheCounters::default(),
            ttl,
            metrics,
        })
    }

    /// The role among `roles` that grants `permission`, evaluated without cache.
    pub fn evaluate(&self, roles: &[String], permission: &str) -> Option<String> {
        let custom = self.custom.read();
        roles
            .iter()
            .find(|r| {
                if let Some(b) = builtin(r) {
                    b.permissions
                        .iter()
                        .any(|p| Grant::parse(p).allows_route(permission))
                } else if let Some(c) = custom.get(r.as_str()) {
                    c.permissions
                        .iter()
                        .any(|p| Grant::parse(p).allows_route(permission))
                } else {
                    false
                }
            })
            .cloned()
    }

    /// Every grant the roles hold (`*`, `resource.action`, path-scoped secret
    /// grants), sorted and deduplicated: what the ceiling rule compares.
    pub fn grants_of(&self, roles: &[String]) -> Vec<String> {
        let custom = self.custom.read();
        let mut out: Vec<String> = Vec::new();
        for r in roles {
            if let Some(b) = builtin(r) {
                out.extend(b.permissions.iter().map(|p| p.to_string()));
            } else if let Some(c) = custom.get(r.as_str()) {
                out.extend(c.permissions.iter().cloned());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The grants of one role (`None`: no such role).
    pub fn role_grants(&self, role: &str) -> Option<Vec<String>> {
        if let Some(b) = builtin(role) {
            return Some(b.permissions.iter().map(|p| p.to_string()).collect());
        }
        self.custom.read().get(role).map(|c| c.permissions.clone())
    }

    /// Whether the roles cover `permission` on the secret `path` (`owned`: the
    /// caller owns that secret).
    pub fn covers_path(&self, roles: &[String], permission: &str, path: &str, owned: bool) -> bool {
        self.grants_of(roles)
            .iter()
            .any(|g| Grant::parse(g).covers_path(permission, path, owned))
    }

    /// Decides, through the cache, and records the decision's metrics.
    pub fn check(&self, user_id: &str, roles: &[String], permission: &str) -> Decision {
        let started = Instant::now();
        let roles_key = roles_label(roles);
        let d = self.decide(user_id, &roles_key, roles, permission);
        self.metrics
            .rbac_evaluation_latency
            .observe(started.elapsed().as_secs_f64());
        let label = crate::metrics::permission_label(permission);
        self.metrics
            .rbac_decisions
            .with_label_values(&[label, if d.allowed { "allow" } else { "deny" }])
            .inc();
        if !d.allowed {
            self.metrics
                .rbac_denied
                .with_label_values(&[label, &crate::metrics::role_label(roles)])
                .inc();
        }
        d
    }

    fn decide(
        &self,
        user_id: &str,
        roles_key: &str,
        roles: &[String],
        permission: &str,
    ) -> Decision {
        let epoch = self.epoch.load(Ordering::Acquire);
        let key = cache_key(user_id, permission);
        if !self.ttl.is_zero() {
            let cache = self.cache.read();
            if let Some(e) = cache.get(&key)
                && &*e.user_id == user_id
                && &*e.permission == permission
                && &*e.roles == roles_key
                && e.epoch == epoch
                && e.expires > Instant::now()
            {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Decision {
                    allowed: e.granted_by.is_some(),
                    granted_by: e.granted_by.as_deref().map(str::to_string),
                    cached: true,
                };
            }
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let granted_by = self.evaluate(roles, permission);
        if !self.ttl.is_zero() {
            self.insert(
                key,
                user_id,
                permission,
                roles_key,
                epoch,
                granted_by.as_deref(),
            );
        }
        Decision {
            allowed: granted_by.is_some(),
            granted_by,
            cached: false,
        }
    }

    fn insert(
        &self,
        key: u64,
        user_id: &str,
        permission: &str,
        roles_key: &str,
        epoch: u64,
        granted_by: Option<&str>,
    ) {
        let mut cache = self.cache.write();
        // A change between evaluation and insertion bumped the epoch: the entry
        // would be stale, keep it out.
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if cache.len() >= MAX_CACHE_ENTRIES {
            let now = Instant::now();
            let before = cache.len();
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.clear();
            }
            self.counters
                .evictions
                .fetch_add((before - cache.len()) as u64, Ordering::Relaxed);
        }
        cache.insert(
            key,
            CacheEntry {
                user_id: user_id.into(),
                permission: permission.into(),
                roles: roles_key.into(),
                epoch,
                granted_by: granted_by.map(Arc::from),
                expires: Instant::now() + self.ttl,
            },
        );
    }

    /// Drops every cached decision of one user (role change, disable, ...).
    pub fn invalidate_user(&self, user_id: &str) {
        let mut cache = self.cache.write();
        cache.retain(|_, e| &*e.user_id != user_id);
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops everything and makes any decision in flight stale. Returns the
    /// number of entries removed.
    pub fn clear(&self) -> usize {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut cache = self.cache.write();
        let n = cache.len();
        cache.clear();
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        n
    }

    /// Precomputes every catalogue permission for the given users.
    pub fn warmup<'a>(&self, users: impl IntoIterator<Item = (&'a str, &'a [String])>) -> usize {
        if self.ttl.is_zero() {
            return 0;
        }
        let mut n = 0;
        for (user_id, roles) in users {
            let roles_key = roles_label(roles);
            for p in PERMISSIONS {
                let epoch = self.epoch.load(Ordering::Acquire);
                let granted = self.evaluate(roles, p.name);
                self.insert(
                    cache_key(user_id, p.name),
                    user_id,
                    p.name,
                    &roles_key,
                    epoch,
                    granted.as_deref(),
                );
                n += 1;
            }
        }
        n
    }

    pub fn stats(&self) -> CacheStats {
        let hits = self.counters.hits.load(Ordering::Relaxed);
        let misses = self.counters.misses.load(Ordering::Relaxed);
        let total = hits + misses;
        CacheStats {
            backend: "memory".into(),
            invalidation: "single-process".into(),
            redis: None,
            enabled: !self.ttl.is_zero(),
            hits,
            misses,
            hit_rate: if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            },
            size: self.cache.read().len(),
            max_size: MAX_CACHE_ENTRIES,
            ttl: self.ttl.as_secs(),
            invalidations: self.counters.invalidations.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
        }
    }

    /// Every permission the roles grant, sorted.
    pub fn permissions_of(&self, roles: &[String]) -> Vec<&'static str> {
        PERMISSIONS
            .iter()
            .filter(|p| self.evaluate(roles, p.name).is_some())
            .map(|p| p.name)
            .collect()
    }

    pub fn role_exists(&self, name: &str) -> bool {
        builtin(name).is_some() || self.custom.read().contains_key(name)
    }

    /// Built-in and custom roles with their permissions.
    pub fn roles(&self) -> Vec<RoleView> {
        let mut out: Vec<RoleView> = BUILTIN_ROLES
            .iter()
            .map(|r| RoleView {
                name: r.name.to_string(),
                description: r.description.to_string(),
                builtin: true,
                permissions: r.permissions.iter().map(|p| p.to_string()).collect(),
            })
            .collect();
        let custom = self.custom.read();
        let mut names: Vec<_> = custom.keys().collect();
        names.sort();
        for n in names {
            let r = &custom[n];
            out.push(RoleView {
                name: r.name.clone(),
                description: r.description.clone(),
                builtin: false,
                permissions: r.permissions.clone(),
            });
        }
        out
    }

    /// Reloads every custom role from the store (another replica changed
    /// one: `crate::cluster`) and drops every cached decision.
    pub fn reload(&self, store: &dyn Store) -> Result<(), StoreError> {
        let mut custom = HashMap::new();
        for_each_json::<CustomRole>(store, Collection::Roles, |name, _, role| {
            custom.insert(name, role);
            Ok(())
        })?;
        *self.custom.write() = custom;
        self.clear();
        Ok(())
    }

    /// Applies a custom role change the store has committed (or its removal),
    /// invalidating every cached decision.
    pub fn apply_role(&self, name: &str, role: Option<CustomRole>) {
        {
            let mut custom = self.custom.write();
            match role {
                Some(r) => custom.insert(name.to_string(), r),
                None => custom.remove(name),
            };
        }
        self.clear();
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rbac(ttl: u64) -> Rbac {
        Rbac {
            custom: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(1),
            cache: RwLock::new(HashMap::new()),
            counters: CacheCounters::default(),
            ttl: Duration::from_secs(ttl),
            metrics: Metrics::new().expect("metrics"),
        }
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn decisions_cache_and_invalidation() {
        let r = rbac(300);
        let viewer = roles(&["viewer"]);
        let d = r.check("u1", &viewer, "audit.read");
        assert!(!d.allowed && !d.cached);
        assert!(
            r.check("u1", &viewer, "audit.read").cached,
            "second lookup is a hit"
        );
        // Same user, new roles: the cached denial is not used.
        let analyst = roles(&["security_analyst"]);
        let d = r.check("u1", &analyst, "audit.read");
        assert!(d.allowed && !d.cached);
        assert_eq!(d.granted_by.as_deref(), Some("security_analyst"));
        // A custom role change makes every entry stale.
        r.apply_role(
            "auditor",
            Some(CustomRole {
                name: "auditor".into(),
                description: String::new(),
                permissions: vec!["audit.read".into()],
                created_at: 0,
                created_by: "t".into(),
            }),
        );
        assert!(!r.check("u1", &analyst, "audit.read").cached);
        assert!(r.check("u2", &roles(&["auditor"]), "audit.read").allowed);
        r.apply_role("auditor", None);
        assert!(!r.check("u2", &roles(&["auditor"]), "audit.read").allowed);
        r.invalidate_user("u1");
        assert!(!r.check("u1", &analyst, "audit.read").cached);
        assert!(
            r.check("admin", &roles(&["admin"]), "secrets.delete")
                .allowed
        );
        assert!(!r.check("n", &[], "self.read").allowed);
    }

    #[test]
    fn zero_ttl_disables_the_cache() {
        let r = rbac(0);
        r.check("u", &roles(&["viewer"]), "self.read");
        assert!(!r.check("u", &roles(&["viewer"]), "self.read").cached);
        assert_eq!(r.warmup([("u", &roles(&["viewer"])[..])]), 0);
    }
}
