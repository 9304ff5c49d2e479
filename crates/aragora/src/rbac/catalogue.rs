//! The permission catalogue (`resource.action`) and the built-in roles.

use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize)]
pub struct PermissionDef {
    pub name: &'static str,
    pub description: &'static str,
    /// A denial of a sensitive permission raises `SensitivePermissionDenied`.
    pub sensitive: bool,
}

const fn p(name: &'static str, description: &'static str, sensitive: bool) -> PermissionDef {
    PermissionDef {
        name,
        description,
        sensitive,
    }
}

pub const PERMISSIONS: &[PermissionDef] = &[
    p(
        "self.read",
        "Read one's own account, sessions and API keys",
        false,
    ),
    p(
        "self.api_keys",
        "Create and revoke one's own API keys",
        false,
    ),
    p(
        "audit.read",
        "Search and verify the security audit log",
        true,
    ),
    p(
        "rbac.read",
        "Read the permission catalogue, roles, cache stats and recent denials",
        false,
    ),
    p(
        "rbac.manage",
        "Clear and warm the RBAC decision cache",
        false,
    ),
    p("roles.manage", "Create and delete custom roles", true),
    p(
        "users.read",
        "List users, their permissions and sessions",
        false,
    ),
    p(
        "users.manage",
        "Create users, assign and remove roles, set passwords",
        true,
    ),
    p("users.disable", "Disable and re-enable users", true),
    p("users.lock", "Lock and unlock accounts (bulk-lock)", true),
    p("users.revoke_keys", "Revoke a user's API keys", true),
    p(
        "sessions.revoke",
        "Revoke sessions, including all sessions at once",
        true,
    ),
    p("ratelimit.read", "List IP blocks", false),
    p("ratelimit.manage", "Block and unblock IP addresses", true),
    p(
        "encryption.read",
        "Read encryption stats and key metadata",
        false,
    ),
    p("encryption.rotate", "Rotate encryption keys", true),
    p(
        "migration.read",
        "Read re-encryption migration status",
        false,
    ),
    p("migration.run", "Run re-encryption migrations", true),
    p("secrets.list", "List secret metadata", false),
    p("secrets.read", "Decrypt and read secrets", true),
    p("secrets.write", "Create and update secrets", false),
    p("secrets.delete", "Delete secrets", true),
    p("approvals.read", "List approval requests", false),
    p(
        "approvals.request",
        "Request an approval for a gated operation",
        false,
    ),
    p(
        "approvals.approve",
        "Approve or reject approval requests",
        true,
    ),
    p(
        "approvals.bypass",
        "Emergency bypass of an approval gate",
        true,
    ),
];

pub fn find(name: &str) -> Option<&'static PermissionDef> {
    PERMISSIONS.iter().find(|d| d.name == name)
}

pub fn is_sensitive(name: &str) -> bool {
    find(name).is_some_and(|d| d.sensitive)
}

/// Grants every permission.
pub const WILDCARD: &str = "*";

#[derive(Debug)]
pub struct BuiltinRole {
    pub name: &'static str,
    pub description: &'static str,
    pub permissions: &'static [&'static str],
}

pub const BUILTIN_ROLES: &[BuiltinRole] = &[
    BuiltinRole {
        name: "admin",
        description: "Everything",
        permissions: &[WILDCARD],
    },
    BuiltinRole {
        name: "security_lead",
        description: "Incident response: users, sessions, IP blocks, keys, approvals incl. bypass",
        // Includes every grant of the built-in roles below it (secrets.* and
        // approvals.request unscoped: its own secrets only), so under the
        // privilege ceiling it can disable and revoke any account but an
        // admin's.
        permissions: &[
            "self.read",
            "self.api_keys",
            "secrets.read",
            "secrets.write",
            "approvals.request",
            "audit.read",
            "rbac.read",
            "rbac.manage",
            "users.read",
            "users.disable",
            "users.lock",
            "users.revoke_keys",
            "sessions.revoke",
            "ratelimit.read",
            "ratelimit.manage",
            "encryption.read",
            "encryption.rotate",
            "migration.read",
            "migration.run",
            "secrets.list",
            "approvals.read",
            "approvals.approve",
            "approvals.bypass",
        ],
    },
    BuiltinRole {
        name: "approver",
        description: "Approves or rejects gated operations",
        permissions: &[
            "self.read",
            "self.api_keys",
            "approvals.read",
            "approvals.approve",
        ],
    },
    BuiltinRole {
        name: "security_analyst",
        description: "Read-only investigation",
        permissions: &[
            "self.read",
            "self.api_keys",
            "audit.read",
            "rbac.read",
            "users.read",
            "ratelimit.read",
            "encryption.read",
            "migration.read",
            "secrets.list",
            "approvals.read",
        ],
    },
    BuiltinRole {
        name: "operator",
        description: "Runs key rotation and migrations, warms caches",
        permissions: &[
            "self.read",
            "self.api_keys",
            "rbac.read",
            "rbac.manage",
            "encryption.read",
            "migration.read",
            "migration.run",
            "approvals.read",
            "approvals.request",
            "ratelimit.read",
        ],
    },
    BuiltinRole {
        name: "member",
        description: "Uses secrets",
        permissions: &[
            "self.read",
            "self.api_keys",
            "secrets.list",
            "secrets.read",
            "secrets.write",
            "approvals.request",
        ],
    },
    BuiltinRole {
        name: "viewer",
        description: "Reads its own account only",
        permissions: &["self.read"],
    },
    BuiltinRole {
        name: "service",
        description: "Machine identity reading and writing secrets",
        permissions: &["self.read", "secrets.read", "secrets.write", "secrets.list"],
    },
];

pub fn builtin(name: &str) -> Option<&'static BuiltinRole> {
    BUILTIN_ROLES.iter().find(|r| r.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_lead_includes_every_builtin_role_but_admin() {
        use crate::rbac::grant::first_not_included;
        let lead = builtin("security_lead").expect("security_lead").permissions;
        for r in BUILTIN_ROLES.iter().filter(|r| r.name != "admin") {
            assert_eq!(
                first_not_included(lead, r.permissions.iter().copied()),
                None,
                "security_lead must include {}",
                r.name
            );
        }
    }

    #[test]
    fn builtin_roles_name_only_catalogued_permissions() {
        for r in BUILTIN_ROLES {
            for p in r.permissions {
                assert!(
                    *p == WILDCARD || find(p).is_some(),
                    "{}: {p} is not catalogued",
                    r.name
                );
            }
        }
        let mut names: Vec<_> = PERMISSIONS.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PERMISSIONS.len(), "duplicate permission");
    }
}
