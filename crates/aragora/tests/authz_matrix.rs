//! The authorization matrix and every credential failure, against the real
//! `aragora serve` binary.
//!
//! * every route of `GET /api/routes` that names a permission, called by a user
//!   of every built-in role: 403 `{"permission": ...}` exactly when the role (as
//!   `GET /api/security/rbac/roles` defines it) lacks the permission, and never
//!   401/403 when it holds it; each denial is audited as `permission_denied`;
//! * every way a credential can fail (missing, expired, bad signature, `alg:
//!   none`, wrong audience/issuer, disabled user, revoked session, revoked API
//!   key, blocked IP), maintenance mode, JWT secret rotation and the global
//!   session revocation, each checked in the response, the audit log and
//!   `/metrics`;
//! * privilege ceilings: custom roles, new users and role assignments carry
//!   only grants the caller holds, and account changes (password, API keys,
//!   disable/enable, unlock, key and session revocation, bulk lock) reach only
//!   accounts whose grants the caller's include; refusals are 403 naming the
//!   missing grant, audited with `details.reason == "privilege_ceiling"`;
//! * the last enabled admin (holder of `*`) cannot be disabled, stripped of
//!   the role or locked (409 naming it);
//! * per-secret access: path ids, ownership, unscoped grants covering one's
//!   own secrets, path-scoped grants (`secrets.read:team-a/`), `*`; refusals
//!   are 403 naming `secrets.<action>:<id>`, audited with `details.reason ==
//!   "secret_path"`, and listing shows only what the caller may list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use aragora_testkit::{Request, Response, Scenario, Server, Value, json};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const OLD_SECRET: &str = "authz-matrix-old-secret-0123456789abcdef";
const NEW_SECRET: &str = "authz-matrix-new-secret-fedcba9876543210";
const WRONG_SECRET: &str = "authz-matrix-secret-the-server-never-saw";
const PASSWORD: &str = "correct horse battery staple";
/// An id no user has: a 404 for it proves authorization passed.
const NO_USER: &str = "usr_doesnotexist";
const BLOCKED_IP: &str = "203.0.113.7";
const OTHER_IP: &str = "203.0.113.8";
/// Blocked before the restarts, to check blocks survive them.
const PERSISTED_BLOCK_IP: &str = "203.0.113.9";

fn start(extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("JWT_SECRET", OLD_SECRET),
        ("AUTH_RATE_LIMIT_PER_IP", "100000"),
    ];
    env.extend_from_slice(extra);
    Server::start(Path::new(env!("CARGO_BIN_EXE_aragora")), &env)
}

/// Logs in; (access token, session id).
fn login(s: &Server, email: &str) -> (String, String) {
    let r = s.send(
        Request::new("POST", "/api/auth/login")
            .json(&json!({"email": email, "password": PASSWORD})),
    );
    assert_eq!(r.status, 200, "login {email}: {}", r.body);
    let v = r.json();
    (
        v["access_token"]
            .as_str()
            .expect("access_token")
            .to_string(),
        v["session_id"].as_str().expect("session_id").to_string(),
    )
}

/// Creates a user with `PASSWORD` and `roles` and logs it in: (id, token, session id).
fn user_with_token(
    s: &Server,
    admin: &str,
    email: &str,
    roles: &[&str],
) -> (String, String, String) {
    let id = s.create_user(admin, email, PASSWORD, roles);
    let (token, sid) = login(s, email);
    (id, token, sid)
}

fn audit(s: &Server, key: &str, action: &str) -> Vec<Value> {
    s.audit(key, action)
}

/// Auth failures of the last five minutes with `details.reason == reason`.
fn auth_failures(s: &Server, key: &str, reason: &str) -> Vec<Value> {
    audit(s, key, "auth_failure")
        .into_iter()
        .filter(|e| e["details"]["reason"] == reason)
        .collect()
}

fn metric(s: &Server, series: &str) -> f64 {
    s.metric(series)
}

fn auth_failure_metric(s: &Server, reason: &str) -> f64 {
    metric(
        s,
        &format!("aragora_security_auth_failures_total{{reason=\"{reason}\"}}"),
    )
}

#[track_caller]
fn assert_401(r: &Response, reason: &str, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.body);
    let v = r.json();
    assert_eq!(v["reason"], reason, "{what}: {}", r.body);
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: no error message: {}",
        r.body
    );
    assert!(
        r.header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer") && h.contains(reason)),
        "{what}: WWW-Authenticate {:?}",
        r.header("www-authenticate")
    );
}

fn now() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(d.as_secs()).expect("seconds fit")
}

fn claims(sub: &str, sid: &str, iat: i64, exp: i64) -> Value {
    json!({"sub": sub, "sid": sid, "iat": iat, "exp": exp, "iss": "aragora", "aud": "aragora-api"})
}

fn sign(secret: &str, alg: Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// `{"alg":"none"}` with the given claims and an empty signature.
fn alg_none(claims: &Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

// ---------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Route {
    method: String,
    path: String,
    permission: Option<String>,
    /// A gated route: holders of this permission may call it too (their
    /// call becomes an approval request).
    or_to_request: Option<String>,
}

fn routes(s: &Server) -> Vec<Route> {
    let r = s.send(Request::new("GET", "/api/routes"));
    assert_eq!(r.status, 200, "/api/routes: {}", r.body);
    r.json()["routes"]
        .as_array()
        .expect("routes array")
        .iter()
        .map(|v| Route {
            method: v["method"].as_str().expect("method").to_string(),
            path: v["path"].as_str().expect("path").to_string(),
            permission: v["permission"].as_str().map(str::to_string),
            or_to_request: v["or_to_request"].as_str().map(str::to_string),
        })
        .collect()
}

/// Whether `u` passes the route's guard: it holds the permission, or the route
/// is gated and it may ask for the operation.
fn may_call(u: &RoleUser, route: &Route, permission: &str) -> bool {
    u.holds(permission) || route.or_to_request.as_deref().is_some_and(|p| u.holds(p))
}

/// The concrete path: placeholders replaced by values that name nothing, so a
/// permitted call ends in 400/404 (authorization passed) without changing the
/// fixtures.
fn concrete_path(path: &str) -> String {
    path.replace("{id}", NO_USER)
        .replace("{role}", "viewer")
        .replace("{key_id}", "00000000deadbeef")
        .replace("{name}", "no_such_role")
        .replace("{ip}", "198.51.100.250")
}

/// A body that is either harmless or invalid for the route.
fn placeholder_body(method: &str, path: &str) -> Option<Value> {
    if method == "GET" || method == "DELETE" {
        return None;
    }
    Some(match path {
        "/api/auth/api-keys" => json!({"name": "matrix"}),
        "/api/admin/users" => json!({"email": "not-an-email", "roles": []}),
        "/api/admin/users/{id}/roles" => json!({"role": "viewer"}),
        "/api/admin/users/{id}/password" => json!({"password": "short"}),
        "/api/admin/users/{id}/disable" => json!({"reason": "authorization matrix"}),
        "/api/admin/users/{id}/api-keys" => json!({"name": "matrix"}),
        "/api/admin/users/bulk-lock" => {
            json!({"emails": ["nobody@matrix.test"], "duration": "1h"})
        }
        "/api/admin/ratelimit/block" => {
            json!({"ip": "not-an-ip", "duration": "1h", "reason": "matrix"})
        }
        "/api/admin/roles" => json!({"name": "Not A Valid Name!", "permissions": []}),
        "/api/security/encryption/rotate" => json!({"reason": "matrix", "force": false}),
        "/api/security/migration/run" => json!({"store": "no_such_store"}),
        "/api/security/secrets/export" => json!({"ids": [], "reason": "matrix"}),
        _ => json!({}),
    })
}

fn matrix_request(route: &Route, credential: &str) -> Request {
    let mut req = Request::new(&route.method, &concrete_path(&route.path)).bearer(credential);
    if let Some(b) = placeholder_body(&route.method, &route.path) {
        req = req.json(&b);
    }
    req
}

/// Sends `credential` (from `ip` when given) to every protected route and
/// checks that each answers `status` with `reason`: a credential failure is the
/// same on every route, whatever the route would do.
fn every_protected_route(
    s: &Server,
    credential: &str,
    ip: Option<&str>,
    status: u16,
    reason: &str,
    what: &str,
) {
    let mut problems = Vec::new();
    let all = routes(s);
    let protected: Vec<_> = all.iter().filter(|r| r.permission.is_some()).collect();
    assert!(
        protected.len() > 30,
        "route table too small: {}",
        protected.len()
    );
    for route in protected {
        let mut req = matrix_request(route, credential);
        if let Some(ip) = ip {
            req = req.header("X-Forwarded-For", ip);
        }
        let r = s.send(req);
        let got: Option<Value> = serde_json::from_str(&r.body).ok();
        let got_reason = got.as_ref().and_then(|b| b["reason"].as_str());
        if r.status != status || got_reason != Some(reason) {
            problems.push(format!(
                "{what}: {} {} -> {} {}",
                route.method, route.path, r.status, r.body
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Routes run after the matrix: they end the caller's session or every session.
fn is_deferred(r: &Route) -> bool {
    r.method == "POST"
        && (r.path == "/api/auth/logout" || r.path == "/api/admin/sessions/revoke-all")
}

/// Checks one call against the expectation; returns a problem, if any.
fn check_call(
    role: &str,
    route: &Route,
    permission: &str,
    allowed: bool,
    r: &Response,
) -> Option<String> {
    let what = format!("{role} {} {}", route.method, route.path);
    if allowed {
        let ok = (200..300).contains(&r.status) || [400, 404, 409].contains(&r.status);
        return (!ok).then(|| {
            format!(
                "{what}: holds {permission}, got {} (expected 2xx/400/404/409) {}",
                r.status, r.body
            )
        });
    }
    let body: Option<Value> = serde_json::from_str(&r.body).ok();
    let named = body
        .as_ref()
        .and_then(|b| b["permission"].as_str().map(str::to_string));
    (r.status != 403 || named.as_deref() != Some(permission)).then(|| {
        format!(
            "{what}: lacks {permission}, expected 403 naming it, got {} {}",
            r.status, r.body
        )
    })
}

struct RoleUser {
    role: String,
    id: String,
    token: String,
    api_key: String,
    permissions: Vec<String>,
}

impl RoleUser {
    fn holds(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == "*" || p == permission)
    }
}

/// The scenarios of this file are independent of one another: the first test
/// that needs one starts them all, each on its own thread, so a test thread
/// waiting for one scenario does not hold the others back.
fn start_every_scenario() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let all: [fn() -> &'static Scenario; 5] =
            [matrix, credentials, ceilings, last_admin, secret_access];
        for scenario in all {
            std::thread::spawn(move || {
                scenario();
            });
        }
    });
}

/// The matrix on one server, in order (logout and revoke-all end sessions, so
/// they run last); each step one behaviour, each with its test below.
fn matrix() -> &'static Scenario {
    start_every_scenario();
    static S: OnceLock<Scenario> = OnceLock::new();
    S.get_or_init(|| {
        let mut sc = Scenario::new();
        run_matrix(&mut sc);
        sc
    })
}

aragora_testkit::scenario_tests!(mod route_matrix = matrix;
    the_route_table_is_served_to_anyone,
    the_served_route_table_is_the_one_the_server_is_built_from,
    every_permission_a_route_names_is_catalogued,
    the_served_builtin_roles_are_the_catalogues_eight,
    a_user_of_every_builtin_role_gets_a_jwt_and_an_api_key,
    anonymous_gets_answer_and_protected_routes_refuse_a_missing_credential,
    each_role_is_refused_exactly_the_permissions_it_lacks_naming_them,
    logout_ends_the_callers_own_session,
    revoke_all_is_refused_to_roles_without_its_permission,
    every_route_and_role_pair_was_called,
    every_denial_is_audited_with_its_permission,
    denial_entries_carry_outcome_path_and_method,
    a_sensitive_denial_is_audited_with_role_sensitivity_and_path,
    denials_are_counted_per_permission_and_role,
    the_audit_chain_verifies_after_the_matrix,
);

fn run_matrix(sc: &mut Scenario) {
    let Some((s, admin_key, table)) = sc.step("the_route_table_is_served_to_anyone", || {
        let s = start(&[]);
        let (_, admin_key) = s.bootstrap_admin("root@matrix.test");
        let table = routes(&s);
        (s, admin_key, table)
    }) else {
        return;
    };

    sc.step(
        "the_served_route_table_is_the_one_the_server_is_built_from",
        || {
            let served: BTreeSet<(String, String, Option<String>)> = table
                .iter()
                .map(|r| (r.method.clone(), r.path.clone(), r.permission.clone()))
                .collect();
            let built: BTreeSet<(String, String, Option<String>)> = aragora::api::ROUTES
                .iter()
                .map(|r| {
                    (
                        r.method.to_string(),
                        r.path.to_string(),
                        r.permission.map(str::to_string),
                    )
                })
                .collect();
            assert_eq!(served, built, "/api/routes differs from api::ROUTES");
        },
    );

    sc.step("every_permission_a_route_names_is_catalogued", || {
        let r = s.get("/api/security/rbac/permissions", &admin_key);
        assert_eq!(r.status, 200, "{}", r.body);
        let catalogue: BTreeSet<String> = r
            .json()
            .as_array()
            .expect("permissions array")
            .iter()
            .map(|p| p["name"].as_str().expect("name").to_string())
            .collect();
        for route in &table {
            if let Some(p) = &route.permission {
                assert!(
                    catalogue.contains(p),
                    "{} {} names uncatalogued {p}",
                    route.method,
                    route.path
                );
            }
        }
    });

    let Some(served_roles) = sc.step("the_served_builtin_roles_are_the_catalogues_eight", || {
        let r = s.get("/api/security/rbac/roles", &admin_key);
        assert_eq!(r.status, 200, "{}", r.body);
        let served_roles: BTreeMap<String, Vec<String>> = r
            .json()
            .as_array()
            .expect("roles array")
            .iter()
            .filter(|r| r["builtin"] == true)
            .map(|r| {
                let perms = r["permissions"]
                    .as_array()
                    .expect("permissions")
                    .iter()
                    .map(|p| p.as_str().expect("permission").to_string())
                    .collect();
                (r["name"].as_str().expect("name").to_string(), perms)
            })
            .collect();
        let catalogue_roles: BTreeMap<String, Vec<String>> =
            aragora::rbac::catalogue::BUILTIN_ROLES
                .iter()
                .map(|r| {
                    (
                        r.name.to_string(),
                        r.permissions.iter().map(|p| p.to_string()).collect(),
                    )
                })
                .collect();
        assert_eq!(
            served_roles, catalogue_roles,
            "served built-in roles differ from the catalogue"
        );
        assert_eq!(served_roles.len(), 8, "eight built-in roles");
        served_roles
    }) else {
        return;
    };

    // One user per role (created and logged in concurrently: argon2 dominates),
    // each with a JWT and an API key.
    let Some(users) = sc.step(
        "a_user_of_every_builtin_role_gets_a_jwt_and_an_api_key",
        || {
            std::thread::scope(|scope| {
                let handles: Vec<_> = served_roles
                    .iter()
                    .map(|(role, perms)| {
                        let (s, admin_key) = (&s, &admin_key);
                        scope.spawn(move || {
                            let (id, token, _) = user_with_token(
                                s,
                                admin_key,
                                &format!("{role}@matrix.test"),
                                &[role],
                            );
                            let k = s.post(
                                &format!("/api/admin/users/{id}/api-keys"),
                                admin_key,
                                &json!({"name": "matrix"}),
                            );
                            assert_eq!(k.status, 201, "api key for {role}: {}", k.body);
                            RoleUser {
                                role: role.clone(),
                                id,
                                token,
                                api_key: k.json()["token"].as_str().expect("token").to_string(),
                                permissions: perms.clone(),
                            }
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("user setup"))
                    .collect::<Vec<RoleUser>>()
            })
        },
    ) else {
        return;
    };

    let mut calls = 0usize;
    let mut expected_denials: BTreeSet<(String, String)> = BTreeSet::new();
    let protected: Vec<&Route> = table.iter().filter(|r| r.permission.is_some()).collect();

    sc.step(
        "anonymous_gets_answer_and_protected_routes_refuse_a_missing_credential",
        || {
            let mut problems = Vec::new();
            for route in &table {
                let mut req = Request::new(&route.method, &concrete_path(&route.path));
                if let Some(b) = placeholder_body(&route.method, &route.path) {
                    req = req.json(&b);
                }
                let r = s.send(req);
                match &route.permission {
                    None if route.method == "GET" && r.status != 200 => {
                        problems.push(format!(
                            "anonymous {} {}: {} {}",
                            route.method, route.path, r.status, r.body
                        ));
                    }
                    Some(_) if r.status != 401 || !r.body.contains("\"missing\"") => {
                        problems.push(format!(
                            "no credential on {} {}: expected 401 missing, got {} {}",
                            route.method, route.path, r.status, r.body
                        ));
                    }
                    _ => {}
                }
            }
            assert!(problems.is_empty(), "{}", problems.join("\n"));
        },
    );

    sc.step(
        "each_role_is_refused_exactly_the_permissions_it_lacks_naming_them",
        || {
            assert!(
                protected.len() >= 30,
                "only {} protected routes",
                protected.len()
            );
            let mut problems = Vec::new();
            for route in protected.iter().filter(|r| !is_deferred(r)) {
                let permission = route.permission.as_deref().expect("protected");
                for u in &users {
                    let allowed = may_call(u, route, permission);
                    let r = s.send(matrix_request(route, &u.token));
                    if !allowed {
                        expected_denials.insert((u.id.clone(), permission.to_string()));
                    }
                    calls += 1;
                    problems.extend(check_call(&u.role, route, permission, allowed, &r));
                }
            }
            assert!(
                problems.is_empty(),
                "{} problems:\n{}",
                problems.len(),
                problems.join("\n")
            );
        },
    );

    // Logout (every role holds self.read): the caller's own session ends.
    sc.step("logout_ends_the_callers_own_session", || {
        let mut problems = Vec::new();
        for route in protected.iter().filter(|r| r.path == "/api/auth/logout") {
            let permission = route.permission.as_deref().expect("protected");
            for u in &users {
                let allowed = may_call(u, route, permission);
                let r = s.send(matrix_request(route, &u.token));
                if !allowed {
                    expected_denials.insert((u.id.clone(), permission.to_string()));
                }
                calls += 1;
                problems.extend(check_call(&u.role, route, permission, allowed, &r));
                if allowed && r.status == 204 {
                    let me = s.get("/api/auth/me", &u.token);
                    if me.status != 401 || !me.body.contains("\"revoked\"") {
                        problems.push(format!(
                            "{} after logout: {} {}",
                            u.role, me.status, me.body
                        ));
                    }
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    });

    // Revoke-all last, with API keys (which it leaves valid), denied roles first.
    sc.step(
        "revoke_all_is_refused_to_roles_without_its_permission",
        || {
            let mut problems = Vec::new();
            for route in protected
                .iter()
                .filter(|r| r.path == "/api/admin/sessions/revoke-all")
            {
                let permission = route.permission.as_deref().expect("protected");
                let mut ordered: Vec<&RoleUser> = users.iter().collect();
                ordered.sort_by_key(|u| u.holds(permission));
                for u in ordered {
                    let allowed = may_call(u, route, permission);
                    let r = s.send(matrix_request(route, &u.api_key));
                    if !allowed {
                        expected_denials.insert((u.id.clone(), permission.to_string()));
                    }
                    calls += 1;
                    problems.extend(check_call(&u.role, route, permission, allowed, &r));
                }
            }
            assert!(problems.is_empty(), "{}", problems.join("\n"));
        },
    );

    sc.step("every_route_and_role_pair_was_called", || {
        assert_eq!(
            calls,
            protected.len() * users.len(),
            "every (route, role) pair called"
        );
    });

    let Some(denials) = sc.step("every_denial_is_audited_with_its_permission", || {
        let denials = audit(&s, &admin_key, "permission_denied");
        let audited: BTreeSet<(String, String)> = denials
            .iter()
            .map(|e| {
                (
                    e["actor"].as_str().unwrap_or_default().to_string(),
                    e["details"]["permission"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        let missing: Vec<_> = expected_denials.difference(&audited).collect();
        assert!(missing.is_empty(), "denials not audited: {missing:?}");
        denials
    }) else {
        return;
    };

    sc.step("denial_entries_carry_outcome_path_and_method", || {
        assert!(
            denials.iter().all(|e| e["outcome"] == "denied"
                && e["details"]["path"].as_str().is_some()
                && e["details"]["method"].as_str().is_some()),
            "denial entries lack outcome/path/method"
        );
    });

    sc.step(
        "a_sensitive_denial_is_audited_with_role_sensitivity_and_path",
        || {
            let viewer = users.iter().find(|u| u.role == "viewer").expect("viewer");
            assert!(
                denials.iter().any(|e| e["actor"] == viewer.id.as_str()
                    && e["details"]["permission"] == "audit.read"
                    && e["details"]["role"] == "viewer"
                    && e["details"]["sensitive"] == true
                    && e["details"]["path"] == "/api/security/audit/search"),
                "viewer's audit.read denial not audited with role, sensitivity and path"
            );
        },
    );

    sc.step("denials_are_counted_per_permission_and_role", || {
        assert!(
            metric(
                &s,
                "aragora_security_rbac_denied_total{permission=\"audit.read\",role=\"viewer\"}"
            ) >= 1.0
        );
    });

    sc.step("the_audit_chain_verifies_after_the_matrix", || {
        let r = s.get("/api/security/audit/verify", &admin_key);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json()["ok"],
            true,
            "audit chain after the matrix: {}",
            r.body
        );
    });
}

// ---------------------------------------------------------------------------
// Credential failures, maintenance, rotation, lockdown
// ---------------------------------------------------------------------------

const ME: &str = "/api/auth/me";
const AUDIT: &str = "/api/security/audit/search?minutes=5&limit=1";

/// Credential failures, maintenance, JWT rotation and lockdown on one server,
/// in order (restarts and revocations change what later steps see).
fn credentials() -> &'static Scenario {
    start_every_scenario();
    static S: OnceLock<Scenario> = OnceLock::new();
    S.get_or_init(|| {
        let mut sc = Scenario::new();
        run_credentials(&mut sc);
        sc
    })
}

aragora_testkit::scenario_tests!(mod credential_failures = credentials;
    an_admin_creates_users_with_sessions_and_an_api_key,
    a_jwt_and_an_api_key_both_reach_protected_routes,
    a_missing_malformed_or_unknown_credential_is_refused_naming_why,
    an_api_key_with_a_wrong_secret_is_a_bad_signature,
    forged_jwts_are_refused_naming_why_on_every_protected_route,
    a_disabled_user_is_refused_on_the_next_request_and_at_login,
    enabling_restores_the_api_key_and_login_but_not_ended_sessions,
    logout_revokes_the_callers_session_everywhere,
    an_api_key_has_no_session_to_log_out_of,
    an_administrator_revokes_a_users_sessions,
    an_administrator_revokes_a_users_api_keys,
    a_permission_denial_is_403_naming_the_permission,
    a_blocked_address_is_refused_on_every_protected_route,
    a_blocked_address_is_refused_also_as_the_proxys_hop_and_other_addresses_are_not,
    a_blocked_address_cannot_log_in_but_gets_health_and_metrics,
    blocks_are_listed_and_unblocking_restores_access,
    every_credential_failure_is_audited_with_its_reason,
    the_denial_and_the_admin_actions_are_audited,
    failures_and_attempts_are_counted_by_reason_and_method,
    maintenance_mode_still_serves_health_and_metrics,
    maintenance_mode_closes_security_endpoints_with_503_and_retry_after,
    maintenance_mode_closes_every_route_outside_admin,
    in_maintenance_admin_routes_still_authenticate_and_authorize,
    ip_blocks_survive_a_restart,
    during_jwt_rotation_tokens_of_the_old_secret_still_work,
    during_jwt_rotation_new_tokens_are_signed_with_the_new_secret,
    the_previous_secret_verifies_only_tokens_issued_before_the_rotation,
    once_rotation_completes_old_secret_tokens_are_refused,
    revoke_all_ends_every_session_but_keeps_api_keys_and_new_logins,
    revoke_all_is_audited_and_counted,
    the_audit_chain_verifies_after_every_failure,
);

fn run_credentials(sc: &mut Scenario) {
    let Some((
        mut s,
        route_table,
        admin_id,
        admin_key,
        ok_id,
        ok_token,
        ok_sid,
        dis_id,
        dis_token,
        out_token,
        out_sid,
        rev_id,
        rev_token,
        rev_sid,
        view_id,
        view_token,
        key_id,
        user_key,
    )) = sc.step(
        "an_admin_creates_users_with_sessions_and_an_api_key",
        || {
            let s = start(&[]);
            // Fetched now: in maintenance mode /api/routes is closed too.
            let route_table = routes(&s);
            let (admin_id, admin_key) = s.bootstrap_admin("root@creds.test");
            let roles = ["security_analyst"];
            let (ok_id, ok_token, ok_sid) =
                user_with_token(&s, &admin_key, "ok@creds.test", &roles);
            let (dis_id, dis_token, _) =
                user_with_token(&s, &admin_key, "disabled@creds.test", &roles);
            let (_, out_token, out_sid) =
                user_with_token(&s, &admin_key, "logout@creds.test", &roles);
            let (rev_id, rev_token, rev_sid) =
                user_with_token(&s, &admin_key, "revoked@creds.test", &roles);
            let (view_id, view_token, _) =
                user_with_token(&s, &admin_key, "viewer@creds.test", &["viewer"]);
            let key_id = s.create_user(&admin_key, "apikey@creds.test", PASSWORD, &roles);
            let r = s.post(
                &format!("/api/admin/users/{key_id}/api-keys"),
                &admin_key,
                &json!({"name": "ci"}),
            );
            assert_eq!(r.status, 201, "{}", r.body);
            let user_key = r.json()["token"].as_str().expect("token").to_string();

            (
                s,
                route_table,
                admin_id,
                admin_key,
                ok_id,
                ok_token,
                ok_sid,
                dis_id,
                dis_token,
                out_token,
                out_sid,
                rev_id,
                rev_token,
                rev_sid,
                view_id,
                view_token,
                key_id,
                user_key,
            )
        },
    )
    else {
        return;
    };
    sc.step("a_jwt_and_an_api_key_both_reach_protected_routes", || {
        // Both representative routes work with each credential kind.
        for cred in [&ok_token, &user_key] {
            for path in [ME, AUDIT] {
                let r = s.get(path, cred);
                assert_eq!(r.status, 200, "{path}: {}", r.body);
            }
        }
        assert_eq!(s.get(ME, &ok_token).json()["id"], ok_id.as_str());
    });
    sc.step(
        "a_missing_malformed_or_unknown_credential_is_refused_naming_why",
        || {
            // No credential / not a bearer credential.
            for path in [ME, AUDIT] {
                assert_401(&s.send(Request::new("GET", path)), "missing", "no token");
                let r =
                    s.send(Request::new("GET", path).header("Authorization", "Basic dXNlcjpwYXNz"));
                assert_401(&r, "malformed", "Basic credential");
                assert_401(&s.get(path, "not.a.jwt"), "malformed", "garbage token");
                assert_401(
                    &s.get(path, "ara_nounderscore"),
                    "malformed",
                    "malformed API key",
                );
                assert_401(
                    &s.get(path, "ara_00000000deadbeef_00"),
                    "bad_signature",
                    "unknown API key",
                );
            }
        },
    );
    sc.step("an_api_key_with_a_wrong_secret_is_a_bad_signature", || {
        // The right key id with a wrong secret.
        let wrong_secret_key = format!(
            "{}_{}",
            user_key.rsplit_once('_').expect("key shape").0,
            "0".repeat(64)
        );
        assert_401(
            &s.get(ME, &wrong_secret_key),
            "bad_signature",
            "API key with a wrong secret",
        );
    });
    sc.step(
        "forged_jwts_are_refused_naming_why_on_every_protected_route",
        || {
            // Forged JWTs for a real session.
            let t = now();
            let expired = sign(
                OLD_SECRET,
                Algorithm::HS256,
                &claims(&ok_id, &ok_sid, t - 7200, t - 3600),
            );
            let bad_sig = sign(
                WRONG_SECRET,
                Algorithm::HS256,
                &claims(&ok_id, &ok_sid, t, t + 3600),
            );
            let none = alg_none(&claims(&ok_id, &ok_sid, t, t + 3600));
            let hs512 = sign(
                OLD_SECRET,
                Algorithm::HS512,
                &claims(&ok_id, &ok_sid, t, t + 3600),
            );
            let mut wrong_aud = claims(&ok_id, &ok_sid, t, t + 3600);
            wrong_aud["aud"] = json!("someone-else");
            let wrong_aud = sign(OLD_SECRET, Algorithm::HS256, &wrong_aud);
            let mut wrong_iss = claims(&ok_id, &ok_sid, t, t + 3600);
            wrong_iss["iss"] = json!("not-aragora");
            let wrong_iss = sign(OLD_SECRET, Algorithm::HS256, &wrong_iss);
            // Correctly signed, but binding someone else's session, or none at all.
            let other_sub = sign(
                OLD_SECRET,
                Algorithm::HS256,
                &claims(&admin_id, &ok_sid, t, t + 3600),
            );
            let no_session = sign(
                OLD_SECRET,
                Algorithm::HS256,
                &claims(&ok_id, "feedface", t, t + 3600),
            );
            // The real token with its signature cut off.
            let unsigned = format!("{}.", ok_token.rsplit_once('.').expect("jwt").0);
            for path in [ME, AUDIT] {
                assert_401(&s.get(path, &expired), "expired", "expired JWT");
                assert_401(
                    &s.get(path, &bad_sig),
                    "bad_signature",
                    "JWT signed with another secret",
                );
                assert_401(&s.get(path, &none), "malformed", "alg none");
                assert_401(&s.get(path, &hs512), "malformed", "HS512");
                assert_401(&s.get(path, &wrong_aud), "invalid_claims", "wrong audience");
                assert_401(&s.get(path, &wrong_iss), "invalid_claims", "wrong issuer");
                assert_401(
                    &s.get(path, &other_sub),
                    "revoked",
                    "session of another user",
                );
                assert_401(&s.get(path, &no_session), "revoked", "unknown session");
                assert_ne!(
                    s.get(path, &unsigned).status,
                    200,
                    "JWT without signature accepted"
                );
            }
            for (token, reason, what) in [
                (&expired, "expired", "expired JWT"),
                (&bad_sig, "bad_signature", "JWT signed with another secret"),
                (&none, "malformed", "alg none"),
                (&wrong_aud, "invalid_claims", "wrong audience"),
                (&no_session, "revoked", "unknown session"),
            ] {
                every_protected_route(&s, token, None, 401, reason, what);
            }
        },
    );
    let dis_key_opt = sc.step(
        "a_disabled_user_is_refused_on_the_next_request_and_at_login",
        || {
            // Disabled: refused on the very next request (JWT and API key), and at
            // login; re-enabled works.
            let r = s.post(
                &format!("/api/admin/users/{dis_id}/api-keys"),
                &admin_key,
                &json!({"name": "disabled-user-key"}),
            );
            assert_eq!(r.status, 201, "{}", r.body);
            let dis_key = r.json()["token"].as_str().expect("token").to_string();
            assert_eq!(s.get(ME, &dis_key).status, 200);
            let r = s.post(
                &format!("/api/admin/users/{dis_id}/disable"),
                &admin_key,
                &json!({"reason": "compromised laptop"}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.json()["disabled"], true);
            assert_401(&s.get(ME, &dis_token), "disabled", "disabled user, JWT");
            assert_401(&s.get(AUDIT, &dis_token), "disabled", "disabled user, JWT");
            every_protected_route(&s, &dis_token, None, 401, "disabled", "disabled user");
            assert_401(
                &s.get(AUDIT, &dis_key),
                "disabled",
                "disabled user, API key",
            );
            let r = s.send(
                Request::new("POST", "/api/auth/login")
                    .json(&json!({"email": "disabled@creds.test", "password": PASSWORD})),
            );
            // A disabled account's login answers like any failed login (no
            // enumeration); the audit log has the reason.
            assert_401(&r, "invalid_credentials", "disabled user, login");
            assert_eq!(r.json()["error"], "invalid email or password");
            let r = s.post(
                &format!("/api/admin/users/{dis_id}/enable"),
                &admin_key,
                &json!({}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            dis_key
        },
    );
    if let Some(dis_key) = dis_key_opt.clone() {
        sc.step(
            "enabling_restores_the_api_key_and_login_but_not_ended_sessions",
            || {
                // Enabling does not revive the sessions the disable ended; the API key
                // was only suspended, and a new login works.
                assert_401(
                    &s.get(ME, &dis_token),
                    "revoked",
                    "session from before the disable",
                );
                assert_eq!(s.get(ME, &dis_key).status, 200, "re-enabled user's API key");
                let r = s.send(
                    Request::new("POST", "/api/auth/login")
                        .json(&json!({"email": "disabled@creds.test", "password": PASSWORD})),
                );
                assert_eq!(r.status, 200, "re-enabled user logs in: {}", r.body);
            },
        );
    }
    sc.step("logout_revokes_the_callers_session_everywhere", || {
        // Logout revokes the caller's session.
        let r = s.send(Request::new("POST", "/api/auth/logout").bearer(&out_token));
        assert_eq!(r.status, 204, "{}", r.body);
        assert_401(&s.get(ME, &out_token), "revoked", "after logout");
        assert_401(&s.get(AUDIT, &out_token), "revoked", "after logout");
        every_protected_route(&s, &out_token, None, 401, "revoked", "revoked session");
    });
    sc.step("an_api_key_has_no_session_to_log_out_of", || {
        // An API key has no session to log out of.
        let r = s.send(Request::new("POST", "/api/auth/logout").bearer(&user_key));
        assert_eq!(r.status, 400, "{}", r.body);
    });
    sc.step("an_administrator_revokes_a_users_sessions", || {
        // An administrator revokes a user's sessions.
        let r = s.post(
            &format!("/api/admin/users/{rev_id}/sessions/revoke"),
            &admin_key,
            &json!({"reason": "incident 42"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["session_ids"], json!([rev_sid]));
        assert_401(
            &s.get(ME, &rev_token),
            "revoked",
            "revoked by an administrator",
        );
        assert_401(
            &s.get(AUDIT, &rev_token),
            "revoked",
            "revoked by an administrator",
        );
    });
    sc.step("an_administrator_revokes_a_users_api_keys", || {
        // An administrator revokes a user's API keys.
        let r = s.post(
            &format!("/api/admin/users/{key_id}/revoke-keys"),
            &admin_key,
            &json!({}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["revoked"], 1);
        assert_401(&s.get(ME, &user_key), "revoked", "revoked API key");
        assert_401(&s.get(AUDIT, &user_key), "revoked", "revoked API key");
        every_protected_route(&s, &user_key, None, 401, "revoked", "revoked API key");
    });
    sc.step("a_permission_denial_is_403_naming_the_permission", || {
        // A permission denial.
        let r = s.get(AUDIT, &view_token);
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.json()["permission"], "audit.read");
        assert_eq!(s.get(ME, &view_token).status, 200);
    });
    sc.step(
        "a_blocked_address_is_refused_on_every_protected_route",
        || {
            // A blocked address is refused everything but health and metrics; others are not.
            let r = s.post(
                "/api/admin/ratelimit/block",
                &admin_key,
                &json!({"ip": BLOCKED_IP, "duration": "1h", "reason": "credential stuffing"}),
            );
            assert_eq!(r.status, 201, "{}", r.body);
            every_protected_route(
                &s,
                &ok_token,
                Some(BLOCKED_IP),
                403,
                "ip_blocked",
                "blocked IP",
            );
        },
    );
    sc.step(
        "a_blocked_address_is_refused_also_as_the_proxys_hop_and_other_addresses_are_not",
        || {
            let from = |ip: &str, req: Request| s.send(req.header("X-Forwarded-For", ip));
            for cred in [&ok_token, &admin_key] {
                let r = from(BLOCKED_IP, Request::new("GET", ME).bearer(cred));
                assert_eq!(r.status, 403, "blocked IP: {}", r.body);
                assert_eq!(r.json()["reason"], "ip_blocked");
                assert!(
                    r.json()["error"]
                        .as_str()
                        .is_some_and(|e| e.contains(BLOCKED_IP))
                );
                // Behind a chain of proxies the client is the rightmost untrusted hop;
                // a spoofed first hop is not believed.
                let r = from(
                    &format!("10.0.0.1, {BLOCKED_IP}"),
                    Request::new("GET", AUDIT).bearer(cred),
                );
                assert_eq!(
                    r.status, 403,
                    "blocked IP as the hop our proxy appended: {}",
                    r.body
                );
                let r = from(OTHER_IP, Request::new("GET", AUDIT).bearer(cred));
                assert_eq!(r.status, 200, "another IP: {}", r.body);
            }
        },
    );
    sc.step(
        "a_blocked_address_cannot_log_in_but_gets_health_and_metrics",
        || {
            let from = |ip: &str, req: Request| s.send(req.header("X-Forwarded-For", ip));
            let r = from(
                BLOCKED_IP,
                Request::new("POST", "/api/auth/login")
                    .json(&json!({"email": "ok@creds.test", "password": PASSWORD})),
            );
            assert_eq!(r.status, 403, "login from a blocked IP: {}", r.body);
            assert_eq!(
                from(BLOCKED_IP, Request::new("GET", "/api/health")).status,
                200
            );
            assert_eq!(
                from(BLOCKED_IP, Request::new("GET", "/metrics")).status,
                200
            );
        },
    );
    sc.step("blocks_are_listed_and_unblocking_restores_access", || {
        let from = |ip: &str, req: Request| s.send(req.header("X-Forwarded-For", ip));
        let r = s.get("/api/admin/ratelimit/blocks", &admin_key);
        assert!(
            r.json()["blocks"]
                .as_array()
                .expect("blocks")
                .iter()
                .any(|b| b["ip"] == BLOCKED_IP),
            "{}",
            r.body
        );
        let r = s.send(
            Request::new(
                "DELETE",
                &format!("/api/admin/ratelimit/blocks/{BLOCKED_IP}"),
            )
            .bearer(&admin_key),
        );
        assert_eq!(r.status, 204, "{}", r.body);
        assert_eq!(
            from(BLOCKED_IP, Request::new("GET", ME).bearer(&ok_token)).status,
            200,
            "unblocked"
        );
        let r = s.post(
            "/api/admin/ratelimit/block",
            &admin_key,
            &json!({"ip": PERSISTED_BLOCK_IP, "duration": "1h", "reason": "kept across restarts"}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    });
    sc.step(
        "every_credential_failure_is_audited_with_its_reason",
        || {
            // The audit log holds every failure with its reason.
            let failures = audit(&s, &admin_key, "auth_failure");
            let has = |pred: &dyn Fn(&Value) -> bool, what: &str| {
                assert!(
                    failures.iter().any(pred),
                    "no auth_failure entry for {what}"
                );
            };
            for reason in [
                "expired",
                "bad_signature",
                "malformed",
                "invalid_claims",
                "disabled",
                "revoked",
            ] {
                has(&|e| e["details"]["reason"] == reason, reason);
            }
            has(
                &|e| e["details"]["reason"] == "expired" && e["details"]["credential"] == "jwt",
                "expired JWT",
            );
            has(
                &|e| {
                    e["details"]["reason"] == "disabled"
                        && e["actor"] == dis_id.as_str()
                        && e["details"]["email"] == "disabled@creds.test"
                },
                "disabled user with email",
            );
            has(
                &|e| {
                    e["details"]["reason"] == "revoked"
                        && e["details"]["session_id"] == out_sid.as_str()
                },
                "logged-out session",
            );
            has(
                &|e| {
                    e["details"]["reason"] == "revoked"
                        && e["details"]["session_id"] == rev_sid.as_str()
                        && e["actor"] == rev_id.as_str()
                },
                "admin-revoked session",
            );
            has(
                &|e| {
                    e["details"]["reason"] == "revoked"
                        && e["details"]["credential"] == "api_key"
                        && e["actor"] == key_id.as_str()
                },
                "revoked API key",
            );
            assert!(
                failures.iter().all(|e| e["outcome"] == "failure"),
                "auth_failure outcome"
            );
        },
    );
    sc.step("the_denial_and_the_admin_actions_are_audited", || {
        let denials = audit(&s, &admin_key, "permission_denied");
        assert!(
            denials
                .iter()
                .any(|e| e["actor"] == view_id.as_str()
                    && e["details"]["permission"] == "audit.read"),
            "permission_denied not audited: {denials:?}"
        );
        for action in [
            "user_disabled",
            "user_enabled",
            "sessions_revoked",
            "api_keys_revoked",
            "ip_blocked",
            "ip_unblocked",
        ] {
            assert!(
                !audit(&s, &admin_key, action).is_empty(),
                "no {action} entry"
            );
        }
    });
    sc.step(
        "failures_and_attempts_are_counted_by_reason_and_method",
        || {
            for reason in [
                "missing",
                "expired",
                "bad_signature",
                "malformed",
                "invalid_claims",
                "disabled",
                "revoked",
            ] {
                let v = auth_failure_metric(&s, reason);
                assert!(
                    v >= 1.0,
                    "aragora_security_auth_failures_total{{reason=\"{reason}\"}} = {v}"
                );
            }
            assert!(metric(&s, "aragora_security_auth_attempts_total{method=\"jwt\"}") >= 1.0);
            assert!(
                metric(
                    &s,
                    "aragora_security_auth_attempts_total{method=\"api_key\"}"
                ) >= 1.0
            );
        },
    );
    sc.step("maintenance_mode_still_serves_health_and_metrics", || {
        // Maintenance mode: security endpoints 503, health/metrics/admin served.
        s.restart_with(&[("MAINTENANCE_MODE", "true")]);
        let r = s.send(Request::new("GET", "/api/health"));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["maintenance_mode"], true);
        assert_eq!(s.send(Request::new("GET", "/metrics")).status, 200);
    });
    sc.step(
        "maintenance_mode_closes_security_endpoints_with_503_and_retry_after",
        || {
            for path in [
                AUDIT,
                "/api/security/rbac/roles",
                "/api/security/audit/verify",
            ] {
                let r = s.get(path, &admin_key);
                assert_eq!(r.status, 503, "{path} in maintenance: {}", r.body);
                assert!(r.header("retry-after").is_some(), "{path}: no Retry-After");
                assert!(
                    r.json()["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("maintenance"))
                );
            }
            let r = s.post("/api/security/rbac/cache/clear", &admin_key, &json!({}));
            assert_eq!(r.status, 503, "{}", r.body);
        },
    );
    sc.step("maintenance_mode_closes_every_route_outside_admin", || {
        // Every route outside /api/admin/ is closed in maintenance, with any
        // credential; the admin routes keep answering (routes that would end
        // sessions are left out: the test needs them later).
        let mut problems = Vec::new();
        for route in route_table
            .iter()
            .filter(|r| r.permission.is_some() && !is_deferred(r))
        {
            let r = s.send(matrix_request(route, &admin_key));
            let admin = route.path.starts_with("/api/admin/");
            if admin == (r.status == 503) {
                problems.push(format!(
                    "maintenance: {} {} -> {} {}",
                    route.method, route.path, r.status, r.body
                ));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    });
    sc.step(
        "in_maintenance_admin_routes_still_authenticate_and_authorize",
        || {
            let r = s.get("/api/admin/users", &admin_key);
            assert_eq!(r.status, 200, "admin in maintenance: {}", r.body);
            let r = s.get("/api/admin/users", &ok_token);
            assert_eq!(
                r.status, 200,
                "JWT issued before the restart, admin route: {}",
                r.body
            );
            assert_401(
                &s.send(Request::new("GET", "/api/admin/users")),
                "missing",
                "admin without token in maintenance",
            );
            let r = s.get("/api/admin/roles", &view_token);
            assert_eq!(
                r.status, 403,
                "viewer on admin route in maintenance: {}",
                r.body
            );
        },
    );
    sc.step("ip_blocks_survive_a_restart", || {
        let r = s.send(
            Request::new("GET", "/api/admin/users")
                .bearer(&admin_key)
                .header("X-Forwarded-For", PERSISTED_BLOCK_IP),
        );
        assert_eq!(r.status, 403, "IP block after a restart: {}", r.body);
    });
    sc.step(
        "during_jwt_rotation_tokens_of_the_old_secret_still_work",
        || {
            // Rotation: new secret with the old as previous; old tokens still work.
            s.restart_with(&[
                ("MAINTENANCE_MODE", "false"),
                ("JWT_SECRET", NEW_SECRET),
                ("JWT_SECRET_PREVIOUS", OLD_SECRET),
            ]);
            for path in [ME, AUDIT] {
                let r = s.get(path, &ok_token);
                assert_eq!(
                    r.status, 200,
                    "old-secret token during rotation: {}",
                    r.body
                );
            }
        },
    );
    let new_token_opt = sc.step(
        "during_jwt_rotation_new_tokens_are_signed_with_the_new_secret",
        || {
            let (new_token, new_sid) = login(&s, "ok@creds.test");
            let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
            v.set_audience(&["aragora-api"]);
            v.set_issuer(&["aragora"]);
            let decoded = jsonwebtoken::decode::<Value>(
                &new_token,
                &jsonwebtoken::DecodingKey::from_secret(NEW_SECRET.as_bytes()),
                &v,
            )
            .expect("new tokens are signed with the new secret");
            assert_eq!(decoded.claims["sid"], new_sid.as_str());
            assert_eq!(decoded.claims["sub"], ok_id.as_str());
            (new_token, new_sid)
        },
    );
    if let Some((_, new_sid)) = new_token_opt.clone() {
        sc.step(
            "the_previous_secret_verifies_only_tokens_issued_before_the_rotation",
            || {
                let forged_old = sign(
                    OLD_SECRET,
                    Algorithm::HS256,
                    &claims(&ok_id, &new_sid, now() - 60, now() + 600),
                );
                assert_eq!(
                    s.get(ME, &forged_old).status,
                    200,
                    "previous secret verifies a token issued before the rotation"
                );
                // A token signed with the previous secret but issued after the server
                // loaded it (someone holding the old secret minting tokens) is refused.
                let minted_after = sign(
                    OLD_SECRET,
                    Algorithm::HS256,
                    &claims(&ok_id, &new_sid, now() + 5, now() + 600),
                );
                assert_401(
                    &s.get(ME, &minted_after),
                    "bad_signature",
                    "previous-secret token issued after the rotation",
                );
            },
        );
    }
    if let Some((new_token, _)) = new_token_opt.clone() {
        sc.step(
            "once_rotation_completes_old_secret_tokens_are_refused",
            || {
                // Rotation complete: the previous secret is gone, old tokens are not valid.
                s.restart_with(&[("JWT_SECRET_PREVIOUS", "")]);
                for path in [ME, AUDIT] {
                    assert_401(
                        &s.get(path, &ok_token),
                        "bad_signature",
                        "old-secret token after rotation",
                    );
                    assert_eq!(
                        s.get(path, &new_token).status,
                        200,
                        "new-secret token after rotation"
                    );
                }
                assert!(auth_failure_metric(&s, "bad_signature") >= 2.0);
            },
        );
    }
    let view_sid2_opt = if let Some((new_token, _)) = new_token_opt.clone() {
        sc.step(
            "revoke_all_ends_every_session_but_keeps_api_keys_and_new_logins",
            || {
                // Lockdown: every JWT issued before is revoked; API keys stay valid; new
                // logins work.
                let (view_token2, view_sid2) = login(&s, "viewer@creds.test");
                let (dis_token2, _) = login(&s, "disabled@creds.test");
                for t in [&new_token, &view_token2, &dis_token2] {
                    assert_eq!(s.get(ME, t).status, 200);
                }
                let r = s.post("/api/admin/sessions/revoke-all", &admin_key, &json!({}));
                assert_eq!(r.status, 200, "{}", r.body);
                assert!(
                    r.json()["sessions_revoked"]
                        .as_u64()
                        .is_some_and(|n| n >= 4),
                    "{}",
                    r.body
                );
                for t in [&new_token, &view_token2, &dis_token2] {
                    assert_401(&s.get(ME, t), "revoked", "JWT after revoke-all");
                    assert_401(&s.get(AUDIT, t), "revoked", "JWT after revoke-all");
                }
                assert_eq!(
                    s.get(ME, &admin_key).status,
                    200,
                    "API keys survive revoke-all"
                );
                let (fresh, _) = login(&s, "viewer@creds.test");
                assert_eq!(s.get(ME, &fresh).status, 200, "a login after revoke-all");
                view_sid2
            },
        )
    } else {
        None
    };
    if let Some(view_sid2) = view_sid2_opt.clone() {
        sc.step("revoke_all_is_audited_and_counted", || {
            assert!(!audit(&s, &admin_key, "sessions_revoked_all").is_empty());
            has_revoked_session(&s, &admin_key, &view_sid2);
            assert!(auth_failure_metric(&s, "revoked") >= 6.0);
        });
    }
    sc.step("the_audit_chain_verifies_after_every_failure", || {
        let r = s.get("/api/security/audit/verify", &admin_key);
        assert_eq!(r.json()["ok"], true, "audit chain: {}", r.body);
    });
}

fn has_revoked_session(s: &Server, key: &str, sid: &str) {
    let entries = auth_failures(s, key, "revoked");
    assert!(
        entries.iter().any(|e| e["details"]["session_id"] == sid),
        "no auth_failure revoked for session {sid} after revoke-all"
    );
}

// ---------------------------------------------------------------------------
// Privilege ceilings, the last enabled admin, per-secret access
// ---------------------------------------------------------------------------

/// Creates a user without a password (nothing to hash) with `roles` as `admin`
/// and mints it an API key: (id, key).
fn user_with_key(s: &Server, admin: &str, email: &str, roles: &[&str]) -> (String, String) {
    let r = s.post(
        "/api/admin/users",
        admin,
        &json!({"email": email, "roles": roles}),
    );
    assert_eq!(r.status, 201, "create {email}: {}", r.body);
    let id = r.json()["id"].as_str().expect("id").to_string();
    let r = s.post(
        &format!("/api/admin/users/{id}/api-keys"),
        admin,
        &json!({"name": "ceilings"}),
    );
    assert_eq!(r.status, 201, "API key for {email}: {}", r.body);
    (id, r.json()["token"].as_str().expect("token").to_string())
}

/// `POST /api/admin/roles` as `token`.
fn put_role(s: &Server, token: &str, name: &str, permissions: &[&str]) -> Response {
    s.post(
        "/api/admin/roles",
        token,
        &json!({"name": name, "permissions": permissions, "description": "authz matrix"}),
    )
}

fn delete(s: &Server, path: &str, token: &str) -> Response {
    s.send(Request::new("DELETE", path).bearer(token))
}

/// A privileged change within the caller's ceiling is gated: 202, then the
/// admin approves it (bypassing the checklist) and it runs as the caller.
/// Returns the request once executed.
fn approved_by_admin(s: &Server, admin: &str, r: &Response, what: &str) -> Value {
    assert_eq!(r.status, 202, "{what} waits for approval: {}", r.body);
    let id = r.json()["approval_id"]
        .as_str()
        .expect("approval_id")
        .to_string();
    let a = s.post(
        &format!("/api/security/approvals/{id}/approve"),
        admin,
        &json!({"reason": "authz matrix", "bypass_checklist": true}),
    );
    assert_eq!(a.status, 200, "{what}: approve: {}", a.body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let v = s
            .get(&format!("/api/security/approvals/{id}"), admin)
            .json();
        match v["status"].as_str() {
            Some("executed") => return v,
            Some("failed" | "refused") => panic!("{what}: {v}"),
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline, "{what}: still {v}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A refusal: 403 with the error message and the grant that is missing.
#[track_caller]
fn assert_denied(r: &Response, permission: &str, what: &str) {
    assert_eq!(
        r.status, 403,
        "{what}: expected 403 {permission}: {}",
        r.body
    );
    let v = r.json();
    assert_eq!(v["permission"], permission, "{what}: {}", r.body);
    assert_eq!(
        v["error"],
        format!("permission denied: {permission} is required"),
        "{what}: {}",
        r.body
    );
}

/// A refusal to remove the last enabled admin: 409 naming it.
#[track_caller]
fn assert_last_admin(r: &Response, email: &str, what: &str) {
    assert_eq!(r.status, 409, "{what}: expected 409: {}", r.body);
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains(email) && error.contains("last enabled admin"),
        "{what}: the 409 does not name {email} as the last enabled admin: {error}"
    );
}

/// The custom role's grants as `GET /api/admin/roles` serves them (`None`: no
/// such role).
fn role_grants(s: &Server, token: &str, name: &str) -> Option<Vec<String>> {
    let r = s.get("/api/admin/roles", token);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()
        .expect("roles array")
        .iter()
        .find(|r| r["name"] == name)
        .map(|r| {
            r["permissions"]
                .as_array()
                .expect("permissions")
                .iter()
                .map(|p| p.as_str().expect("permission").to_string())
                .collect()
        })
}

fn user_view(s: &Server, admin: &str, id: &str) -> Value {
    let r = s.get(&format!("/api/admin/users/{id}"), admin);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// One expected `permission_denied` entry of a privilege ceiling: who, which
/// grant, which action, and one target field.
struct CeilingDenial<'a> {
    actor: &'a str,
    permission: &'a str,
    action: &'a str,
    target: (&'a str, Value),
}

/// Checks that every expected ceiling refusal is in the audit log with
/// `details.reason == "privilege_ceiling"`, its action and its target.
fn assert_ceiling_denials_audited(s: &Server, admin: &str, expected: &[CeilingDenial<'_>]) {
    let entries: Vec<Value> = audit(s, admin, "permission_denied")
        .into_iter()
        .filter(|e| e["details"]["reason"] == "privilege_ceiling")
        .collect();
    let mut missing = Vec::new();
    for d in expected {
        let found = entries.iter().any(|e| {
            e["actor"] == d.actor
                && e["outcome"] == "denied"
                && e["details"]["permission"] == d.permission
                && e["details"]["action"] == d.action
                && e["details"][d.target.0] == d.target.1
        });
        if !found {
            missing.push(format!(
                "{} {} {} {}={}",
                d.actor, d.permission, d.action, d.target.0, d.target.1
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "privilege_ceiling denials not audited:\n{}\naudited: {entries:#?}",
        missing.join("\n")
    );
}

/// Privilege ceilings: a caller hands out only grants it holds (custom roles,
/// new users, role assignments) and acts only on accounts whose grants its own
/// include (password resets, API keys, disable/enable, unlock, key and session
/// revocation, bulk lock), itself excepted; every refusal is a 403 naming the
/// missing grant, audited as `permission_denied` with `details.reason ==
/// "privilege_ceiling"`, the action and the target.
/// Privilege ceilings on one server, in order (roles and users made by one
/// step are the subjects of the next); each step one behaviour.
fn ceilings() -> &'static Scenario {
    start_every_scenario();
    static S: OnceLock<Scenario> = OnceLock::new();
    S.get_or_init(|| {
        let mut sc = Scenario::new();
        run_ceilings(&mut sc);
        sc
    })
}

aragora_testkit::scenario_tests!(mod privilege_ceilings = ceilings;
    an_admin_holding_star_defines_any_role,
    a_role_author_grants_only_what_it_holds,
    a_path_scope_includes_only_narrower_paths_under_it,
    redefining_or_deleting_a_role_needs_its_current_grants,
    an_author_narrows_its_own_role_within_its_grants,
    a_user_administrator_cannot_give_itself_roles_beyond_its_grants,
    a_user_administrator_has_no_way_into_the_admins_account,
    users_are_created_only_with_roles_within_the_callers_grants,
    a_role_is_assigned_only_within_the_callers_and_the_targets_grants,
    acting_on_oneself_is_not_limited_by_the_ceiling,
    a_security_lead_cannot_act_on_the_admin,
    a_security_lead_cannot_act_on_a_user_administrator,
    a_security_lead_acts_on_accounts_within_its_grants,
    every_ceiling_refusal_is_audited_with_reason_action_and_target,
    the_audit_chain_verifies_after_the_ceiling_refusals,
);

fn run_ceilings(sc: &mut Scenario) {
    let Some((
        s,
        root_email,
        admin_id,
        admin_key,
        role_admin,
        r_id,
        r_key,
        u_id,
        u_key,
        l_id,
        l_key,
        m_id,
        v_id,
        a_id,
    )) = sc.step("an_admin_holding_star_defines_any_role", || {
        let s = start(&[]);
        let root_email = "root@ceiling.test";
        let (admin_id, admin_key) = s.bootstrap_admin(root_email);

        // The admin (which holds `*`) defines any role.
        let role_admin = [
            "rbac.read",
            "roles.manage",
            "secrets.read:team-a/",
            "self.read",
        ];
        for (name, perms) in [
            ("role_admin", &role_admin[..]),
            (
                "user_admin",
                &["users.manage", "users.read", "self.read"][..],
            ),
            ("auditor", &["audit.read", "self.read"][..]),
        ] {
            let r = put_role(&s, &admin_key, name, perms);
            assert_eq!(r.status, 201, "admin creates {name}: {}", r.body);
        }
        let (r_id, r_key) = user_with_key(&s, &admin_key, "roles@ceiling.test", &["role_admin"]);
        let (u_id, u_key) = user_with_key(&s, &admin_key, "users@ceiling.test", &["user_admin"]);
        let (l_id, l_key) = user_with_key(&s, &admin_key, "lead@ceiling.test", &["security_lead"]);
        let (m_id, _) = user_with_key(&s, &admin_key, "member@ceiling.test", &["member"]);
        let (v_id, _) = user_with_key(&s, &admin_key, "viewer@ceiling.test", &["viewer"]);
        let (a_id, _) = user_with_key(
            &s,
            &admin_key,
            "analyst@ceiling.test",
            &["security_analyst"],
        );

        (
            s, root_email, admin_id, admin_key, role_admin, r_id, r_key, u_id, u_key, l_id, l_key,
            m_id, v_id, a_id,
        )
    })
    else {
        return;
    };
    sc.step("a_role_author_grants_only_what_it_holds", || {
        // --- roles.manage: a role holds only what its author holds. ---
        let r = put_role(&s, &r_key, "role_admin", &["*"]);
        assert_denied(&r, "*", "roles.manage widening its own role to *");
        let mut held: Vec<String> = role_admin.iter().map(|p| p.to_string()).collect();
        held.sort();
        assert_eq!(
            role_grants(&s, &r_key, "role_admin"),
            Some(held),
            "the refused update changed the role"
        );
        let mut widened = role_admin.to_vec();
        widened.push("users.manage");
        let r = put_role(&s, &r_key, "role_admin", &widened);
        assert_denied(
            &r,
            "users.manage",
            "roles.manage adding users.manage to its own role",
        );
        let r = put_role(&s, &r_key, "rotator", &["self.read", "encryption.rotate"]);
        assert_denied(
            &r,
            "encryption.rotate",
            "role with a grant the author lacks",
        );
        assert_eq!(
            role_grants(&s, &r_key, "rotator"),
            None,
            "refused role exists"
        );
    });
    sc.step("a_path_scope_includes_only_narrower_paths_under_it", || {
        // Path scopes: `P:a/` includes `P:a/b/` and nothing wider or elsewhere.
        for (grant, missing) in [
            ("secrets.read:team-b/", "secrets.read:team-b/"),
            ("secrets.read:team", "secrets.read:team"),
            ("secrets.read:*", "secrets.read:*"),
            ("secrets.read", "secrets.read"),
            ("secrets.list:team-a/", "secrets.list:team-a/"),
        ] {
            let r = put_role(&s, &r_key, "scoped", &["rbac.read", grant]);
            assert_denied(&r, missing, &format!("role with {grant}"));
        }
        let r = put_role(
            &s,
            &r_key,
            "team_a_db",
            &["rbac.read", "secrets.read:team-a/db/", "self.read"],
        );
        // A sensitive permission: the role waits for approval, then exists.
        let done = approved_by_admin(&s, &admin_key, &r, "role within the author's grants");
        assert_eq!(
            done["execution"]["result"]["permissions"],
            json!(["rbac.read", "secrets.read:team-a/db/", "self.read"])
        );
    });
    sc.step(
        "redefining_or_deleting_a_role_needs_its_current_grants",
        || {
            // Redefining or deleting a role needs its current grants too.
            let r = put_role(&s, &r_key, "auditor", &["self.read"]);
            assert_denied(
                &r,
                "audit.read",
                "narrowing a role beyond the author's reach",
            );
            assert_eq!(
                role_grants(&s, &r_key, "auditor"),
                Some(vec!["audit.read".to_string(), "self.read".to_string()])
            );
            let r = delete(&s, "/api/admin/roles/auditor", &r_key);
            assert_denied(
                &r,
                "audit.read",
                "deleting a role beyond the author's reach",
            );
            assert!(role_grants(&s, &r_key, "auditor").is_some());
            let r = delete(&s, "/api/admin/roles/team_a_db", &r_key);
            assert_eq!(r.status, 204, "deleting a role within reach: {}", r.body);
        },
    );
    sc.step("an_author_narrows_its_own_role_within_its_grants", || {
        // The author narrows its own role (within its grants).
        let r = put_role(
            &s,
            &r_key,
            "role_admin",
            &["rbac.read", "roles.manage", "self.read"],
        );
        approved_by_admin(&s, &admin_key, &r, "narrowing its own role");
        let r = put_role(&s, &r_key, "team_a_db", &["secrets.read:team-a/db/"]);
        assert_denied(
            &r,
            "secrets.read:team-a/db/",
            "a grant given up by narrowing",
        );
    });
    sc.step(
        "a_user_administrator_cannot_give_itself_roles_beyond_its_grants",
        || {
            // --- users.manage: the user administrator. ---
            let r = s.post(
                &format!("/api/admin/users/{u_id}/roles"),
                &u_key,
                &json!({"role": "admin"}),
            );
            assert_denied(&r, "*", "users.manage adding admin to itself");
            let r = s.post(
                &format!("/api/admin/users/{u_id}/roles"),
                &u_key,
                &json!({"role": "auditor"}),
            );
            assert_denied(&r, "audit.read", "users.manage adding auditor to itself");
            assert_eq!(
                user_view(&s, &admin_key, &u_id)["roles"],
                json!(["user_admin"]),
                "refused role assignments changed the roles"
            );
        },
    );
    sc.step(
        "a_user_administrator_has_no_way_into_the_admins_account",
        || {
            // No way into the admin's account.
            let r = s.post(
                &format!("/api/admin/users/{admin_id}/api-keys"),
                &u_key,
                &json!({"name": "backdoor"}),
            );
            assert_denied(&r, "*", "users.manage minting a key for the admin");
            let r = s.post(
                &format!("/api/admin/users/{admin_id}/password"),
                &u_key,
                &json!({"password": PASSWORD}),
            );
            assert_denied(&r, "*", "users.manage resetting the admin's password");
            assert_eq!(
                user_view(&s, &admin_key, &admin_id)["has_password"],
                false,
                "the refused reset set a password"
            );
            let r = delete(
                &s,
                &format!("/api/admin/users/{admin_id}/roles/admin"),
                &u_key,
            );
            assert_denied(&r, "*", "users.manage removing the admin's role");
            let keys = s.get(&format!("/api/admin/users/{admin_id}/sessions"), &u_key);
            assert_eq!(keys.status, 200, "{}", keys.body);
            assert_eq!(
                keys.json()["api_keys"].as_array().map(Vec::len),
                Some(1),
                "only the bootstrap key: {}",
                keys.body
            );
        },
    );
    let made_id_opt = sc.step(
        "users_are_created_only_with_roles_within_the_callers_grants",
        || {
            // Creating users: only with roles within the caller's grants.
            let r = s.post(
        "/api/admin/users",
        &u_key,
        &json!({"email": "made-admin@ceiling.test", "password": PASSWORD, "roles": ["admin"]}),
    );
            assert_denied(&r, "*", "users.manage creating an admin");
            let r = s.post(
                "/api/admin/users",
                &u_key,
                &json!({"email": "made-member@ceiling.test", "roles": ["viewer", "member"]}),
            );
            assert_denied(&r, "self.api_keys", "users.manage creating a member");
            let listed = s.get("/api/admin/users?limit=1000", &admin_key);
            for email in ["made-admin@ceiling.test", "made-member@ceiling.test"] {
                assert!(
                    !listed.body.contains(email),
                    "refused user {email} was created"
                );
            }
            let r = s.post(
        "/api/admin/users",
        &u_key,
        &json!({"email": "made-viewer@ceiling.test", "password": PASSWORD, "roles": ["viewer"]}),
    );
            assert_eq!(
                r.status, 201,
                "a user within the caller's grants: {}",
                r.body
            );
            let made_id = r.json()["id"].as_str().expect("id").to_string();
            let r = s.post(
                "/api/admin/users",
                &u_key,
                &json!({"email": "made-peer@ceiling.test", "roles": ["user_admin"]}),
            );
            assert_eq!(
                r.status, 201,
                "a peer with the caller's own role: {}",
                r.body
            );
            made_id
        },
    );
    if let Some(made_id) = made_id_opt.clone() {
        sc.step(
            "a_role_is_assigned_only_within_the_callers_and_the_targets_grants",
            || {
                // Assigning a role: the role within the caller's grants, and the target's
                // current grants too.
                let r = s.post(
                    &format!("/api/admin/users/{m_id}/roles"),
                    &u_key,
                    &json!({"role": "viewer"}),
                );
                assert_denied(&r, "approvals.request", "assigning a role to a member");
                let r = s.post(
                    &format!("/api/admin/users/{made_id}/roles"),
                    &u_key,
                    &json!({"role": "user_admin"}),
                );
                approved_by_admin(&s, &admin_key, &r, "assigning within the ceiling");
                assert_eq!(
                    user_view(&s, &admin_key, &made_id)["roles"],
                    json!(["user_admin", "viewer"])
                );
                let r = delete(
                    &s,
                    &format!("/api/admin/users/{made_id}/roles/user_admin"),
                    &u_key,
                );
                assert_eq!(r.status, 200, "removing within the ceiling: {}", r.body);
                let r = s.post(
                    &format!("/api/admin/users/{made_id}/password"),
                    &u_key,
                    &json!({"password": "another long enough password"}),
                );
                assert_eq!(r.status, 204, "resetting a viewer's password: {}", r.body);
                let r = s.post(
                    &format!("/api/admin/users/{v_id}/api-keys"),
                    &u_key,
                    &json!({"name": "for a viewer"}),
                );
                assert_eq!(r.status, 201, "a key for a viewer: {}", r.body);
            },
        );
    }
    sc.step("acting_on_oneself_is_not_limited_by_the_ceiling", || {
        // Acting on oneself is not limited by the ceiling.
        let r = s.post(
            &format!("/api/admin/users/{u_id}/api-keys"),
            &u_key,
            &json!({"name": "my own"}),
        );
        assert_eq!(r.status, 201, "a key for oneself: {}", r.body);
    });
    sc.step("a_security_lead_cannot_act_on_the_admin", || {
        // --- security_lead: holds users.disable & co., not `*`. ---
        for (method, path, body) in [
            ("POST", "disable", Some(json!({"reason": "ceiling test"}))),
            ("POST", "enable", Some(json!({}))),
            ("POST", "unlock", Some(json!({}))),
            ("POST", "revoke-keys", Some(json!({}))),
            ("POST", "sessions/revoke", Some(json!({}))),
        ] {
            let mut req =
                Request::new(method, &format!("/api/admin/users/{admin_id}/{path}")).bearer(&l_key);
            if let Some(b) = &body {
                req = req.json(b);
            }
            assert_denied(
                &s.send(req),
                "*",
                &format!("security_lead: {path} the admin"),
            );
        }
        let r = s.post(
            "/api/admin/users/bulk-lock",
            &l_key,
            &json!({"emails": [root_email], "duration": "1h"}),
        );
        assert_denied(&r, "*", "security_lead bulk-locking the admin");
        let admin_now = user_view(&s, &admin_key, &admin_id);
        assert_eq!(admin_now["disabled"], false, "{admin_now}");
        assert_eq!(admin_now["locked"], false, "{admin_now}");
        assert_eq!(
            s.get(ME, &admin_key).status,
            200,
            "the admin's key survived"
        );
    });
    sc.step("a_security_lead_cannot_act_on_a_user_administrator", || {
        // Nor a user administrator (users.manage is beyond security_lead).
        let r = s.post(
            &format!("/api/admin/users/{u_id}/disable"),
            &l_key,
            &json!({"reason": "ceiling test"}),
        );
        assert_denied(&r, "users.manage", "security_lead disabling a user admin");
    });
    sc.step("a_security_lead_acts_on_accounts_within_its_grants", || {
        // Accounts within its grants: every built-in role but admin (viewer,
        // security_analyst, member).
        for id in [&v_id, &a_id, &m_id] {
            let r = s.post(
                &format!("/api/admin/users/{id}/disable"),
                &l_key,
                &json!({"reason": "ceiling test"}),
            );
            assert_eq!(r.status, 200, "security_lead disabling {id}: {}", r.body);
            assert_eq!(r.json()["disabled"], true);
            let r = s.post(&format!("/api/admin/users/{id}/enable"), &l_key, &json!({}));
            assert_eq!(r.status, 200, "security_lead enabling {id}: {}", r.body);
            for path in ["unlock", "revoke-keys", "sessions/revoke"] {
                let r = s.post(&format!("/api/admin/users/{id}/{path}"), &l_key, &json!({}));
                assert_eq!(r.status, 200, "security_lead: {path} {id}: {}", r.body);
            }
        }
        let r = s.post(
            "/api/admin/users/bulk-lock",
            &l_key,
            &json!({"emails": ["analyst@ceiling.test"], "duration": "1h"}),
        );
        assert_eq!(
            r.status, 200,
            "security_lead bulk-locking an analyst: {}",
            r.body
        );
    });
    sc.step(
        "every_ceiling_refusal_is_audited_with_reason_action_and_target",
        || {
            let admin_email = json!(root_email);
            // Every refusal is audited with its reason, action and target.
            let expected = [
                CeilingDenial {
                    actor: &r_id,
                    permission: "*",
                    action: "role_updated",
                    target: ("target_role", json!("role_admin")),
                },
                CeilingDenial {
                    actor: &r_id,
                    permission: "encryption.rotate",
                    action: "role_updated",
                    target: ("target_role", json!("rotator")),
                },
                CeilingDenial {
                    actor: &r_id,
                    permission: "audit.read",
                    action: "role_updated",
                    target: ("target_role", json!("auditor")),
                },
                CeilingDenial {
                    actor: &r_id,
                    permission: "audit.read",
                    action: "role_deleted",
                    target: ("target_role", json!("auditor")),
                },
                CeilingDenial {
                    actor: &u_id,
                    permission: "*",
                    action: "role_assigned",
                    target: ("target_role", json!("admin")),
                },
                CeilingDenial {
                    actor: &u_id,
                    permission: "*",
                    action: "role_assigned",
                    target: ("target_user_id", json!(u_id)),
                },
                CeilingDenial {
                    actor: &u_id,
                    permission: "*",
                    action: "api_key_create",
                    target: ("target_user_id", json!(admin_id)),
                },
                CeilingDenial {
                    actor: &u_id,
                    permission: "*",
                    action: "api_key_create",
                    target: ("target_email", admin_email.clone()),
                },
                CeilingDenial {
                    actor: &u_id,
                    permission: "*",
                    action: "password_set",
                    target: ("target_user_id", json!(admin_id)),
                },
                CeilingDenial {
                    actor: &u_id,
                    permission: "*",
                    action: "role_removed",
                    target: ("target_user_id", json!(admin_id)),
                },
                CeilingDenial {
                    actor: &u_id,
                    permission: "*",
                    action: "user_created",
                    target: ("target_email", json!("made-admin@ceiling.test")),
                },
                CeilingDenial {
                    actor: &u_id,
                    permission: "approvals.request",
                    action: "role_assigned",
                    target: ("target_user_id", json!(m_id)),
                },
                CeilingDenial {
                    actor: &l_id,
                    permission: "*",
                    action: "user_disabled",
                    target: ("target_user_id", json!(admin_id)),
                },
                CeilingDenial {
                    actor: &l_id,
                    permission: "*",
                    action: "user_enabled",
                    target: ("target_user_id", json!(admin_id)),
                },
                CeilingDenial {
                    actor: &l_id,
                    permission: "*",
                    action: "account_unlocked",
                    target: ("target_user_id", json!(admin_id)),
                },
                CeilingDenial {
                    actor: &l_id,
                    permission: "*",
                    action: "api_keys_revoke",
                    target: ("target_user_id", json!(admin_id)),
                },
                CeilingDenial {
                    actor: &l_id,
                    permission: "*",
                    action: "sessions_revoke",
                    target: ("target_user_id", json!(admin_id)),
                },
                CeilingDenial {
                    actor: &l_id,
                    permission: "*",
                    action: "account_locked",
                    target: ("target_email", admin_email.clone()),
                },
                CeilingDenial {
                    actor: &l_id,
                    permission: "users.manage",
                    action: "user_disabled",
                    target: ("target_user_id", json!(u_id)),
                },
            ];
            assert_ceiling_denials_audited(&s, &admin_key, &expected);
        },
    );
    sc.step(
        "the_audit_chain_verifies_after_the_ceiling_refusals",
        || {
            let r = s.get("/api/security/audit/verify", &admin_key);
            assert_eq!(r.json()["ok"], true, "audit chain: {}", r.body);
        },
    );
}

/// The last enabled admin (a holder of `*`, by the built-in role or a custom
/// one) stays: with another admin able to act, one admin can be disabled,
/// stripped of the role or locked; once no other enabled, unlocked admin is
/// left, each of those is a 409 naming the last one. Disabling oneself or
/// removing one's own admin role is always a 409.
/// The last enabled admin, on one server, in order (each step changes which
/// admins can act); each step one behaviour.
fn last_admin() -> &'static Scenario {
    start_every_scenario();
    static S: OnceLock<Scenario> = OnceLock::new();
    S.get_or_init(|| {
        let mut sc = Scenario::new();
        run_last_admin(&mut sc);
        sc
    })
}

aragora_testkit::scenario_tests!(mod last_enabled_admin = last_admin;
    admins_by_the_builtin_role_and_by_a_custom_star_role_are_set_up,
    an_admin_never_disables_or_demotes_itself,
    a_locked_admins_api_key_still_works,
    of_two_able_admins_one_can_be_disabled,
    the_last_able_admin_cannot_be_disabled_demoted_or_locked,
    locking_oneself_as_the_last_admin_is_refused,
    with_another_admin_back_the_same_changes_go_through_until_one_is_left,
    the_refusals_changed_nothing_and_left_no_success_entry,
    the_audit_chain_verifies_after_the_last_admin_checks,
);

fn run_last_admin(sc: &mut Scenario) {
    let Some((s, root, second, third, a1_id, a1_key, a2_id, a2_key, a3_id, a3_key)) = sc.step(
        "admins_by_the_builtin_role_and_by_a_custom_star_role_are_set_up",
        || {
            let s = start(&[]);
            let root = "root@lastadmin.test";
            let second = "second@lastadmin.test";
            let third = "third@lastadmin.test";
            let (a1_id, a1_key) = s.bootstrap_admin(root);
            let r = put_role(&s, &a1_key, "superuser", &["*"]);
            assert_eq!(r.status, 201, "{}", r.body);
            let (a2_id, a2_key) = user_with_key(&s, &a1_key, second, &["admin"]);
            // An admin by a custom `*` role.
            let (a3_id, a3_key) = user_with_key(&s, &a1_key, third, &["superuser"]);

            (
                s, root, second, third, a1_id, a1_key, a2_id, a2_key, a3_id, a3_key,
            )
        },
    ) else {
        return;
    };
    sc.step("an_admin_never_disables_or_demotes_itself", || {
        // Never oneself.
        let r = s.post(
            &format!("/api/admin/users/{a1_id}/disable"),
            &a1_key,
            &json!({"reason": "self"}),
        );
        assert_eq!(r.status, 409, "disabling oneself: {}", r.body);
        let r = delete(
            &s,
            &format!("/api/admin/users/{a1_id}/roles/admin"),
            &a1_key,
        );
        assert_eq!(r.status, 409, "removing one's own admin role: {}", r.body);
    });
    sc.step("a_locked_admins_api_key_still_works", || {
        // A locked admin's API key still works: the third admin is locked and acts
        // from now on; only the first two can count as the admin that stays.
        let r = s.post(
            "/api/admin/users/bulk-lock",
            &a1_key,
            &json!({"emails": [third], "duration": "1h"}),
        );
        assert_eq!(
            r.status, 200,
            "locking an admin while others remain: {}",
            r.body
        );
        assert_eq!(user_view(&s, &a1_key, &a3_id)["locked"], true);
        assert_eq!(s.get(ME, &a3_key).status, 200);
    });
    sc.step("of_two_able_admins_one_can_be_disabled", || {
        // Two enabled, unlocked admins: one can be disabled...
        let r = s.post(
            &format!("/api/admin/users/{a2_id}/disable"),
            &a3_key,
            &json!({"reason": "one of two"}),
        );
        assert_eq!(r.status, 200, "disabling one of two admins: {}", r.body);
        assert_401(&s.get(ME, &a2_key), "disabled", "disabled admin");
    });
    sc.step(
        "the_last_able_admin_cannot_be_disabled_demoted_or_locked",
        || {
            // ...then the other cannot, nor lose the role, nor be locked.
            let r = s.post(
                &format!("/api/admin/users/{a1_id}/disable"),
                &a3_key,
                &json!({"reason": "the last one"}),
            );
            assert_last_admin(&r, root, "disabling the last enabled admin");
            let r = delete(
                &s,
                &format!("/api/admin/users/{a1_id}/roles/admin"),
                &a3_key,
            );
            assert_last_admin(&r, root, "removing the last admin's role");
            let r = s.post(
                "/api/admin/users/bulk-lock",
                &a3_key,
                &json!({"emails": [root], "duration": "1h"}),
            );
            assert_last_admin(&r, root, "bulk-locking the last unlocked admin");
        },
    );
    sc.step("locking_oneself_as_the_last_admin_is_refused", || {
        // Locking oneself is refused the same way.
        let r = s.post(
            "/api/admin/users/bulk-lock",
            &a1_key,
            &json!({"emails": [root], "duration": "1h"}),
        );
        assert_last_admin(&r, root, "the last admin locking itself");
        let v = user_view(&s, &a1_key, &a1_id);
        assert_eq!(v["disabled"], false, "{v}");
        assert_eq!(v["locked"], false, "{v}");
        assert_eq!(v["roles"], json!(["admin"]), "{v}");
        assert_eq!(s.get(ME, &a1_key).status, 200);
    });
    sc.step(
        "with_another_admin_back_the_same_changes_go_through_until_one_is_left",
        || {
            // Another admin back: the same changes go through, until again only one
            // is left.
            let r = s.post(
                &format!("/api/admin/users/{a2_id}/enable"),
                &a1_key,
                &json!({}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            let r = delete(
                &s,
                &format!("/api/admin/users/{a1_id}/roles/admin"),
                &a3_key,
            );
            assert_eq!(
                r.status, 200,
                "removing an admin role while another admin remains: {}",
                r.body
            );
            assert_eq!(r.json()["roles"], json!([]));
            let r = s.post(
                &format!("/api/admin/users/{a2_id}/disable"),
                &a3_key,
                &json!({"reason": "the last one"}),
            );
            assert_last_admin(&r, second, "disabling the last enabled admin (second)");
            let r = s.post(
                &format!("/api/admin/users/{a1_id}/roles"),
                &a2_key,
                &json!({"role": "admin"}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            let r = s.post(
                &format!("/api/admin/users/{a3_id}/unlock"),
                &a1_key,
                &json!({}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(user_view(&s, &a1_key, &a3_id)["locked"], false);
        },
    );
    sc.step(
        "the_refusals_changed_nothing_and_left_no_success_entry",
        || {
            // The refusals changed nothing and left no success entry.
            let disabled: Vec<Value> = audit(&s, &a1_key, "user_disabled");
            assert_eq!(
                disabled
                    .iter()
                    .map(|e| e["details"]["user_id"].clone())
                    .collect::<Vec<_>>(),
                vec![json!(a2_id)],
                "user_disabled entries: {disabled:?}"
            );
        },
    );
    sc.step(
        "the_audit_chain_verifies_after_the_last_admin_checks",
        || {
            let r = s.get("/api/security/audit/verify", &a1_key);
            assert_eq!(r.json()["ok"], true, "audit chain: {}", r.body);
        },
    );
}

fn secret_path(id: &str) -> String {
    format!("/api/secrets/{id}")
}

fn put_secret(s: &Server, token: &str, id: &str, body: &Value) -> Response {
    s.send(
        Request::new("PUT", &secret_path(id))
            .bearer(token)
            .json(body),
    )
}

/// The ids `GET /api/secrets` lists for `token`.
fn listed_secrets(s: &Server, token: &str) -> BTreeSet<String> {
    let r = s.get("/api/secrets?limit=1000", token);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .map(|v| v["id"].as_str().expect("id").to_string())
        .collect()
}

/// Per-secret access: ids are paths, the creator owns a secret, unscoped
/// secret grants cover only the caller's own secrets, path grants
/// (`secrets.read:team-a/`) any owner's under the prefix, `*` everything.
/// A secret not covered is a 403 naming `secrets.<action>:<id>` (also when it
/// does not exist), audited with `details.reason == "secret_path"`; listing
/// shows only what the caller may list; overwriting keeps the owner; handing a
/// secret to someone else needs a path grant; bad paths and bad path scopes
/// are 400.
/// The secret whose access the steps below follow.
const DB: &str = "team-a/db/password";

/// Per-secret access on one server, in order (grants and secrets made by one
/// step are what the next checks); each step one behaviour.
fn secret_access() -> &'static Scenario {
    start_every_scenario();
    static S: OnceLock<Scenario> = OnceLock::new();
    S.get_or_init(|| {
        let mut sc = Scenario::new();
        run_secret_access(&mut sc);
        sc
    })
}

aragora_testkit::scenario_tests!(mod secret_paths = secret_access;
    members_are_set_up_to_own_secrets,
    the_creator_owns_a_secret,
    another_member_neither_reads_overwrites_deletes_nor_lists_it,
    members_hold_no_secrets_delete,
    existence_is_not_revealed_without_a_covering_grant,
    handing_a_secret_to_someone_else_needs_a_path_grant,
    a_path_grant_to_read_and_list_reaches_another_owners_secret,
    a_covered_absent_secret_is_404,
    a_prefix_covers_nothing_else_and_reading_is_not_writing,
    unscoped_secrets_delete_covers_only_ones_own,
    an_absent_secret_is_404_when_covered_and_403_when_not,
    a_path_grant_to_write_keeps_the_owner_and_may_hand_secrets_over,
    star_covers_everything_and_an_admin_overwrite_keeps_the_owner,
    secret_ids_are_paths,
    path_scopes_exist_only_on_secret_permissions_and_are_paths,
    denials_are_audited_with_the_secret_and_its_owner_and_reads_with_the_type,
    the_audit_chain_verifies_after_the_secret_checks,
);

fn run_secret_access(sc: &mut Scenario) {
    let Some((s, admin_key, a_id, a_key, b_id, b_key)) =
        sc.step("members_are_set_up_to_own_secrets", || {
            let s = start(&[]);
            let (_, admin_key) = s.bootstrap_admin("root@secrets.test");
            let (a_id, a_key) = user_with_key(&s, &admin_key, "alice@secrets.test", &["member"]);
            let (b_id, b_key) = user_with_key(&s, &admin_key, "bob@secrets.test", &["member"]);

            (s, admin_key, a_id, a_key, b_id, b_key)
        })
    else {
        return;
    };
    sc.step("the_creator_owns_a_secret", || {
        // Alice creates a secret: she owns it.
        let r = put_secret(
            &s,
            &a_key,
            DB,
            &json!({"value": "alice-db-1", "secret_type": "password"}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(r.json()["id"], DB);
        assert_eq!(r.json()["owner"], a_id.as_str());
        let r = s.get(&secret_path(DB), &a_key);
        assert_eq!(r.status, 200, "owner reads: {}", r.body);
        assert_eq!(r.json()["value"], "alice-db-1");
        let r = put_secret(
            &s,
            &a_key,
            "team-b/x",
            &json!({"value": "alice-b", "secret_type": "token"}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(
            listed_secrets(&s, &a_key),
            BTreeSet::from([DB.to_string(), "team-b/x".to_string()])
        );
    });
    sc.step(
        "another_member_neither_reads_overwrites_deletes_nor_lists_it",
        || {
            // Bob (also a member) neither reads, overwrites, deletes nor lists it.
            assert_denied(
                &s.get(&secret_path(DB), &b_key),
                &format!("secrets.read:{DB}"),
                "member reading another's secret",
            );
            let r = put_secret(
                &s,
                &b_key,
                DB,
                &json!({"value": "bob-was-here", "secret_type": "password"}),
            );
            assert_denied(
                &r,
                &format!("secrets.write:{DB}"),
                "member overwriting another's secret",
            );
        },
    );
    sc.step("members_hold_no_secrets_delete", || {
        // Members hold no secrets.delete at all: the route refuses.
        assert_denied(
            &delete(&s, &secret_path(DB), &b_key),
            "secrets.delete",
            "member deleting",
        );
    });
    sc.step("existence_is_not_revealed_without_a_covering_grant", || {
        // Existence is not revealed without a covering grant.
        assert_denied(
            &s.get(&secret_path("team-a/nope"), &b_key),
            "secrets.read:team-a/nope",
            "member reading a secret that does not exist",
        );
        let r = put_secret(
            &s,
            &b_key,
            "team-b/bob",
            &json!({"value": "bob-b", "secret_type": "token"}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(r.json()["owner"], b_id.as_str());
        assert_eq!(
            listed_secrets(&s, &b_key),
            BTreeSet::from(["team-b/bob".to_string()])
        );
    });
    sc.step(
        "handing_a_secret_to_someone_else_needs_a_path_grant",
        || {
            // Handing a secret to someone else needs a path grant.
            let r = put_secret(
                &s,
                &a_key,
                "team-a/handoff",
                &json!({"value": "for bob", "secret_type": "token", "owner": b_id}),
            );
            assert_denied(
                &r,
                "secrets.write:team-a/handoff",
                "member creating a secret owned by another",
            );
            assert_eq!(
                s.get(&secret_path("team-a/handoff"), &admin_key).status,
                404,
                "the refused handoff was stored"
            );
            let r = put_secret(
                &s,
                &a_key,
                DB,
                &json!({"value": "alice-db-2", "secret_type": "password", "owner": b_id}),
            );
            assert_denied(
                &r,
                &format!("secrets.write:{DB}"),
                "owner giving its secret away without a path grant",
            );
            let r = s.get(&secret_path(DB), &a_key);
            assert_eq!(r.json()["value"], "alice-db-1", "{}", r.body);
            assert_eq!(r.json()["owner"], a_id.as_str());
        },
    );
    sc.step(
        "a_path_grant_to_read_and_list_reaches_another_owners_secret",
        || {
            // A path grant to read and list team-a/: Bob reads Alice's secret.
            let r = put_role(
                &s,
                &admin_key,
                "team_a_reader",
                &["secrets.read:team-a/", "secrets.list:team-a/"],
            );
            assert_eq!(
                r.status, 201,
                "admin creates a path-scoped role: {}",
                r.body
            );
            let r = s.post(
                &format!("/api/admin/users/{b_id}/roles"),
                &admin_key,
                &json!({"role": "team_a_reader"}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            let r = s.get(&secret_path(DB), &b_key);
            assert_eq!(r.status, 200, "path grant reads: {}", r.body);
            assert_eq!(r.json()["value"], "alice-db-1");
            assert_eq!(r.json()["owner"], a_id.as_str());
            assert_eq!(
                listed_secrets(&s, &b_key),
                BTreeSet::from([DB.to_string(), "team-b/bob".to_string()])
            );
        },
    );
    sc.step("a_covered_absent_secret_is_404", || {
        // Covered and absent: a 404.
        let r = s.get(&secret_path("team-a/nope"), &b_key);
        assert_eq!(r.status, 404, "covered, nonexistent: {}", r.body);
    });
    sc.step(
        "a_prefix_covers_nothing_else_and_reading_is_not_writing",
        || {
            // The prefix covers nothing else, and reading is not writing.
            assert_denied(
                &s.get(&secret_path("team-b/x"), &b_key),
                "secrets.read:team-b/x",
                "secrets.read:team-a/ on team-b/x",
            );
            let r = put_secret(
                &s,
                &b_key,
                DB,
                &json!({"value": "bob-was-here", "secret_type": "password"}),
            );
            assert_denied(
                &r,
                &format!("secrets.write:{DB}"),
                "read path grant overwriting",
            );
            assert_eq!(s.get(&secret_path("team-b/bob"), &b_key).status, 200);
        },
    );
    sc.step("unscoped_secrets_delete_covers_only_ones_own", || {
        // Unscoped secrets.delete: only one's own.
        let r = put_role(&s, &admin_key, "own_deleter", &["secrets.delete"]);
        assert_eq!(r.status, 201, "{}", r.body);
        let r = s.post(
            &format!("/api/admin/users/{b_id}/roles"),
            &admin_key,
            &json!({"role": "own_deleter"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_denied(
            &delete(&s, &secret_path(DB), &b_key),
            &format!("secrets.delete:{DB}"),
            "unscoped delete on another's secret",
        );
    });
    sc.step(
        "an_absent_secret_is_404_when_covered_and_403_when_not",
        || {
            // Absent: 404 when covered, 403 when not.
            assert_denied(
                &delete(&s, &secret_path("team-b/none"), &b_key),
                "secrets.delete:team-b/none",
                "unscoped delete of a secret that does not exist",
            );
            assert_eq!(
                delete(&s, &secret_path("team-b/none"), &admin_key).status,
                404
            );
            assert_eq!(delete(&s, &secret_path("team-b/bob"), &b_key).status, 204);
        },
    );
    let c_id_opt = sc.step(
        "a_path_grant_to_write_keeps_the_owner_and_may_hand_secrets_over",
        || {
            // A path grant to write and delete: overwriting keeps the owner, and it
            // may hand secrets over.
            let r = put_role(
                &s,
                &admin_key,
                "team_a_writer",
                &["secrets.write:team-a/", "secrets.delete:team-a/"],
            );
            assert_eq!(r.status, 201, "{}", r.body);
            let (c_id, c_key) =
                user_with_key(&s, &admin_key, "carol@secrets.test", &["team_a_writer"]);
            let r = put_secret(
                &s,
                &c_key,
                DB,
                &json!({"value": "alice-db-rotated", "secret_type": "password"}),
            );
            assert_eq!(r.status, 200, "path grant overwrites: {}", r.body);
            assert_eq!(r.json()["owner"], a_id.as_str(), "overwrite kept the owner");
            let r = s.get(&secret_path(DB), &a_key);
            assert_eq!(r.json()["value"], "alice-db-rotated", "{}", r.body);
            let r = put_secret(
                &s,
                &c_key,
                "team-a/handoff",
                &json!({"value": "for bob", "secret_type": "token", "owner": b_id}),
            );
            assert_eq!(r.status, 201, "path grant hands over: {}", r.body);
            assert_eq!(r.json()["owner"], b_id.as_str());
            assert_denied(
                &delete(&s, &secret_path("team-b/x"), &c_key),
                "secrets.delete:team-b/x",
                "secrets.delete:team-a/ on team-b/x",
            );
            assert_eq!(
                delete(&s, &secret_path("team-a/handoff"), &c_key).status,
                204
            );

            c_id
        },
    );
    sc.step(
        "star_covers_everything_and_an_admin_overwrite_keeps_the_owner",
        || {
            // `*` covers everything; the admin's overwrite keeps the owner too.
            for id in [DB, "team-b/x"] {
                assert_eq!(s.get(&secret_path(id), &admin_key).status, 200, "{id}");
            }
            assert_eq!(
                listed_secrets(&s, &admin_key),
                BTreeSet::from([DB.to_string(), "team-b/x".to_string()])
            );
            let r = put_secret(
                &s,
                &admin_key,
                "team-b/x",
                &json!({"value": "admin-set", "secret_type": "token"}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.json()["owner"], a_id.as_str());
            assert_eq!(s.get(&secret_path("ops/nothing"), &admin_key).status, 404);
        },
    );
    sc.step("secret_ids_are_paths", || {
        // Ids are paths.
        for bad in ["a//b", "a/../b", "a/./b", "team-a/", "../etc", "a/b%20c"] {
            let body = json!({"value": "x", "secret_type": "token"});
            for r in [
                put_secret(&s, &admin_key, bad, &body),
                s.get(&secret_path(bad), &admin_key),
                delete(&s, &secret_path(bad), &admin_key),
            ] {
                assert_eq!(r.status, 400, "secret id {bad:?}: {}", r.body);
            }
        }
    });
    sc.step(
        "path_scopes_exist_only_on_secret_permissions_and_are_paths",
        || {
            // Path scopes exist only on secret permissions, and are paths.
            for grant in [
                "audit.read:x/",
                "secrets.read:../",
                "secrets.read:",
                "secrets.read:a//",
            ] {
                let r = put_role(&s, &admin_key, "bad_scope", &[grant]);
                assert_eq!(r.status, 400, "role with {grant}: {}", r.body);
                assert!(
                    r.json()["error"]
                        .as_str()
                        .is_some_and(|e| e.contains(grant)),
                    "the 400 does not name {grant}: {}",
                    r.body
                );
            }
        },
    );
    if let Some(c_id) = c_id_opt.clone() {
        sc.step("denials_are_audited_with_the_secret_and_its_owner_and_reads_with_the_type", || {
    // Audited: denials with the secret and its owner, reads with the type.
    let denials: Vec<Value> = audit(&s, &admin_key, "permission_denied")
        .into_iter()
        .filter(|e| e["details"]["reason"] == "secret_path")
        .collect();
    let denied = |actor: &str, permission: &str, owner: Value| {
        let id = permission.split_once(':').expect("scoped").1;
        assert!(
            denials.iter().any(|e| e["actor"] == actor
                && e["outcome"] == "denied"
                && e["details"]["permission"] == permission
                && e["details"]["secret_id"] == id
                && e["details"]["secret_owner"] == owner),
            "no secret_path denial for {actor} {permission} (owner {owner}): {denials:#?}"
        );
    };
    denied(&b_id, &format!("secrets.read:{DB}"), json!(a_id));
    denied(&b_id, &format!("secrets.write:{DB}"), json!(a_id));
    denied(&b_id, &format!("secrets.delete:{DB}"), json!(a_id));
    denied(&b_id, "secrets.read:team-a/nope", Value::Null);
    denied(&b_id, "secrets.delete:team-b/none", Value::Null);
    denied(&b_id, "secrets.read:team-b/x", json!(a_id));
    denied(&c_id, "secrets.delete:team-b/x", json!(a_id));
    denied(&a_id, "secrets.write:team-a/handoff", Value::Null);
    let reads = audit(&s, &admin_key, "secret_access");
    assert!(
        reads.iter().any(|e| e["actor"] == b_id.as_str()
            && e["outcome"] == "success"
            && e["details"]["secret_id"] == DB
            && e["details"]["secret_type"] == "password"),
        "Bob's read through the path grant not audited: {reads:#?}"
    );
    assert!(
        !reads
            .iter()
            .any(|e| e["actor"] == b_id.as_str() && e["details"]["secret_id"] == "team-b/x"),
        "a refused read audited as secret_access"
    );
    });
    }
    sc.step("the_audit_chain_verifies_after_the_secret_checks", || {
        let r = s.get("/api/security/audit/verify", &admin_key);
        assert_eq!(r.json()["ok"], true, "audit chain: {}", r.body);
    });
}

/// A refused change changes nothing: a bulk lock naming one account beyond
/// the caller's reach locks none of them, and taking `*` out of the custom
/// role the last admin holds it through is refused like demoting that admin.
#[test]
fn refused_changes_change_nothing() {
    let s = start(&[]);
    let (root_id, root) = s.bootstrap_admin("root@refused.test");
    let (_, lead) = user_with_key(&s, &root, "lead@refused.test", &["security_lead"]);
    let (v_id, _) = user_with_key(&s, &root, "viewer@refused.test", &["viewer"]);
    let r = s.post(
        "/api/admin/users/bulk-lock",
        &lead,
        &json!({"emails": ["viewer@refused.test", "root@refused.test"], "duration": "1h"}),
    );
    assert_denied(&r, "*", "security_lead bulk-locking the admin");
    assert_eq!(
        user_view(&s, &root, &v_id)["locked"],
        false,
        "nobody was locked"
    );
    assert_eq!(user_view(&s, &root, &root_id)["locked"], false);

    // The only other admin holds `*` through a custom role.
    assert_eq!(put_role(&s, &root, "superuser", &["*"]).status, 201);
    let (su_id, su) = user_with_key(&s, &root, "su@refused.test", &["superuser"]);
    let r = delete(&s, &format!("/api/admin/users/{root_id}/roles/admin"), &su);
    assert_eq!(r.status, 200, "another admin remains: {}", r.body);
    let r = put_role(&s, &su, "superuser", &["self.read", "roles.manage"]);
    assert_last_admin(&r, "", "taking * out of the last admin's role");
    assert_eq!(
        role_grants(&s, &su, "superuser"),
        Some(vec!["*".to_string()]),
        "the role is unchanged"
    );
    // With another admin, the role can be narrowed.
    let r = s.post(
        &format!("/api/admin/users/{root_id}/roles"),
        &su,
        &json!({"role": "admin"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = put_role(&s, &su, "superuser", &["self.read", "roles.manage"]);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(user_view(&s, &root, &su_id)["roles"], json!(["superuser"]));
}
