//! Grants: the entries of a role's permission list, and the ceiling rule that
//! says whether one set of grants includes another.
//!
//! A grant is `*` (everything), `resource.action` (a catalogue permission), or,
//! for the path-scoped secret permissions, `resource.action:PREFIX`: the action
//! on every secret under the path `PREFIX` (`secrets.read:team-a/`; without the
//! slash, `team-a` covers the secret `team-a` and `team-a/...`, never
//! `team-a-evil/...`), or on every secret (`secrets.read:*`). An unscoped secret permission
//! (`secrets.read`) covers only the secrets the caller owns.

use super::catalogue::{WILDCARD, find};

/// Permissions that may carry a path scope.
pub const SCOPED_PERMISSIONS: &[&str] = &[
    "secrets.list",
    "secrets.read",
    "secrets.write",
    "secrets.delete",
];

/// The scope that covers every path.
pub const ALL_PATHS: &str = "*";

/// A grant string taken apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant<'a> {
    All,
    Permission {
        name: &'a str,
        /// `None`: unscoped (for a secret permission: the caller's own secrets).
        scope: Option<&'a str>,
    },
}

impl<'a> Grant<'a> {
    /// Parses without validating against the catalogue (stored roles are
    /// trusted to have been validated when written).
    pub fn parse(s: &'a str) -> Self {
        if s == WILDCARD {
            return Grant::All;
        }
        match s.split_once(':') {
            Some((name, scope)) => Grant::Permission {
                name,
                scope: Some(scope),
            },
            None => Grant::Permission {
                name: s,
                scope: None,
            },
        }
    }

    /// Whether this grant lets its holder call routes that require `permission`.
    pub fn allows_route(self, permission: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Permission { name, .. } => name == permission,
        }
    }

    /// Whether this grant covers `permission` on the secret `path`; `owned`: the
    /// caller owns it.
    pub fn covers_path(self, permission: &str, path: &str, owned: bool) -> bool {
        match self {
            Grant::All => true,
            Grant::Permission { name, scope } if name == permission => match scope {
                None => owned,
                Some(ALL_PATHS) => true,
                Some(prefix) => within(prefix, path),
            },
            Grant::Permission { .. } => false,
        }
    }

    /// Whether holding this grant includes holding `other` (the ceiling rule:
    /// a caller may only hand out what it holds).
    pub fn includes(self, other: Grant<'_>) -> bool {
        match (self, other) {
            (Grant::All, _) => true,
            (Grant::Permission { .. }, Grant::All) => false,
            (
                Grant::Permission { name: a, scope: sa },
                Grant::Permission { name: b, scope: sb },
            ) => {
                a == b
                    && match (sa, sb) {
                        (None, None) => true,
                        // Own secrets only never includes someone else's paths,
                        // and a path grant does not include "whatever you own".
                        (None, Some(_)) | (Some(_), None) => false,
                        (Some(ALL_PATHS), Some(_)) => true,
                        (Some(_), Some(ALL_PATHS)) => false,
                        // Every path `pb` covers starts with `pb`.
                        (Some(pa), Some(pb)) => within(pa, pb),
                    }
            }
        }
    }
}

/// Whether `path` is under the scope `prefix`, at a segment boundary:
/// `team-a/` covers `team-a/db`, and `team-a` covers `team-a` and `team-a/db`
/// but not `team-a-evil/db`.
fn within(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The first of `wanted` that `held` does not include, or `None` when every
/// one is included.
pub fn first_not_included<'w>(
    held: &[impl AsRef<str>],
    wanted: impl IntoIterator<Item = &'w str>,
) -> Option<&'w str> {
    wanted.into_iter().find(|w| {
        let w = Grant::parse(w);
        !held.iter().any(|h| Grant::parse(h.as_ref()).includes(w))
    })
}

/// Checks a grant string a custom role may hold; the error names the rule.
pub fn validate(s: &str) -> Result<(), String> {
    match Grant::parse(s) {
        Grant::All => Ok(()),
        Grant::Permission { name, scope } => {
            if find(name).is_none() {
                return Err(format!(
                    "{s:?} is not in the catalogue (GET /api/security/rbac/permissions)"
                ));
            }
            let Some(scope) = scope else { return Ok(()) };
            if !SCOPED_PERMISSIONS.contains(&name) {
                return Err(format!(
                    "{s:?}: only {} take a path scope",
                    SCOPED_PERMISSIONS.join(", ")
                ));
            }
            if scope == ALL_PATHS {
                return Ok(());
            }
            crate::secrets::validate_prefix(scope)
                .map_err(|why| format!("{s:?}: the path scope {why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn includes(a: &str, b: &str) -> bool {
        Grant::parse(a).includes(Grant::parse(b))
    }

    #[test]
    fn ceiling_rule() {
        assert!(includes("*", "*"));
        assert!(includes("*", "secrets.read:team-a/"));
        assert!(!includes("roles.manage", "*"));
        assert!(includes("audit.read", "audit.read"));
        assert!(!includes("audit.read", "audit.write"));
        assert!(includes("secrets.read:team-a/", "secrets.read:team-a/db/"));
        assert!(!includes("secrets.read:team-a/db/", "secrets.read:team-a/"));
        assert!(!includes("secrets.read:team-a/", "secrets.read:team-b/"));
        assert!(includes("secrets.read:*", "secrets.read:team-b/"));
        assert!(!includes("secrets.read:team-a/", "secrets.read:*"));
        assert!(!includes("secrets.read", "secrets.read:team-a/"));
        assert!(!includes("secrets.read:*", "secrets.read"));
        assert!(!includes("secrets.write:*", "secrets.read:*"));
        assert!(includes("secrets.read:team-a", "secrets.read:team-a/db"));
        assert!(!includes("secrets.read:team-a", "secrets.read:team-ab"));
        assert_eq!(
            first_not_included(
                &["audit.read", "secrets.read:a/"],
                ["audit.read", "secrets.read:b/"]
            ),
            Some("secrets.read:b/")
        );
        assert_eq!(first_not_included(&["*"], ["*", "users.manage"]), None);
    }

    #[test]
    fn paths_and_routes() {
        let g = Grant::parse("secrets.read:team-a/");
        assert!(g.allows_route("secrets.read"));
        assert!(!g.allows_route("secrets.write"));
        assert!(g.covers_path("secrets.read", "team-a/db/password", false));
        assert!(!g.covers_path("secrets.read", "team-b/db/password", true));
        let own = Grant::parse("secrets.read");
        assert!(own.covers_path("secrets.read", "x/y", true));
        assert!(!own.covers_path("secrets.read", "x/y", false));
        assert!(Grant::parse("secrets.read:*").covers_path("secrets.read", "x", false));
        let no_slash = Grant::parse("secrets.read:team-a");
        assert!(no_slash.covers_path("secrets.read", "team-a", false));
        assert!(no_slash.covers_path("secrets.read", "team-a/db", false));
        assert!(
            !no_slash.covers_path("secrets.read", "team-a-evil/db", false),
            "a scope ends at a segment boundary"
        );
        assert!(Grant::All.covers_path("secrets.delete", "x", false));
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(validate("*").is_ok());
        assert!(validate("secrets.read:team-a/").is_ok());
        assert!(validate("secrets.read:*").is_ok());
        assert!(validate("audit.read").is_ok());
        assert!(
            validate("nope.read")
                .expect_err("not catalogued")
                .contains("catalogue")
        );
        assert!(
            validate("audit.read:x/")
                .expect_err("not scopable")
                .contains("path scope")
        );
        assert!(validate("secrets.read:../").is_err());
        assert!(validate("secrets.read:").is_err());
    }
}
