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
//!   `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use aragora_testkit::{Request, Response, Server, Value, json};
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
        })
        .collect()
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

#[test]
fn every_route_by_every_builtin_role() {
    let s = start(&[]);
    let (_, admin_key) = s.bootstrap_admin("root@matrix.test");

    // The route table the server serves is the one it is built from.
    let table = routes(&s);
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

    // Every permission a route names is catalogued.
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

    // The built-in roles as the API serves them (and as the catalogue defines them).
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
    let catalogue_roles: BTreeMap<String, Vec<String>> = aragora::rbac::catalogue::BUILTIN_ROLES
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

    // One user per role (created and logged in concurrently: argon2 dominates),
    // each with a JWT and an API key.
    let users: Vec<RoleUser> = std::thread::scope(|scope| {
        let handles: Vec<_> = served_roles
            .iter()
            .map(|(role, perms)| {
                let (s, admin_key) = (&s, &admin_key);
                scope.spawn(move || {
                    let (id, token, _) =
                        user_with_token(s, admin_key, &format!("{role}@matrix.test"), &[role]);
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
            .collect()
    });

    let mut problems = Vec::new();
    let mut calls = 0usize;
    let mut expected_denials: BTreeSet<(String, String)> = BTreeSet::new();
    let protected: Vec<&Route> = table.iter().filter(|r| r.permission.is_some()).collect();
    assert!(
        protected.len() >= 30,
        "only {} protected routes",
        protected.len()
    );

    // Anonymous routes answer without a credential; every protected one refuses.
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

    for route in protected.iter().filter(|r| !is_deferred(r)) {
        let permission = route.permission.as_deref().expect("protected");
        for u in &users {
            let allowed = u.holds(permission);
            let r = s.send(matrix_request(route, &u.token));
            if !allowed {
                expected_denials.insert((u.id.clone(), permission.to_string()));
            }
            calls += 1;
            problems.extend(check_call(&u.role, route, permission, allowed, &r));
        }
    }

    // Logout (every role holds self.read): the caller's own session ends.
    for route in protected.iter().filter(|r| r.path == "/api/auth/logout") {
        let permission = route.permission.as_deref().expect("protected");
        for u in &users {
            let allowed = u.holds(permission);
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

    // Revoke-all last, with API keys (which it leaves valid), denied roles first.
    for route in protected
        .iter()
        .filter(|r| r.path == "/api/admin/sessions/revoke-all")
    {
        let permission = route.permission.as_deref().expect("protected");
        let mut ordered: Vec<&RoleUser> = users.iter().collect();
        ordered.sort_by_key(|u| u.holds(permission));
        for u in ordered {
            let allowed = u.holds(permission);
            let r = s.send(matrix_request(route, &u.api_key));
            if !allowed {
                expected_denials.insert((u.id.clone(), permission.to_string()));
            }
            calls += 1;
            problems.extend(check_call(&u.role, route, permission, allowed, &r));
        }
    }
    assert_eq!(
        calls,
        protected.len() * users.len(),
        "every (route, role) pair called"
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );

    // Every denial is audited with the permission, and counted.
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
    assert!(
        denials.iter().all(|e| e["outcome"] == "denied"
            && e["details"]["path"].as_str().is_some()
            && e["details"]["method"].as_str().is_some()),
        "denial entries lack outcome/path/method"
    );
    let viewer = users.iter().find(|u| u.role == "viewer").expect("viewer");
    assert!(
        denials.iter().any(|e| e["actor"] == viewer.id.as_str()
            && e["details"]["permission"] == "audit.read"
            && e["details"]["role"] == "viewer"
            && e["details"]["sensitive"] == true
            && e["details"]["path"] == "/api/security/audit/search"),
        "viewer's audit.read denial not audited with role, sensitivity and path"
    );
    assert!(
        metric(
            &s,
            "aragora_security_rbac_denied_total{permission=\"audit.read\",role=\"viewer\"}"
        ) >= 1.0
    );
    let r = s.get("/api/security/audit/verify", &admin_key);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["ok"],
        true,
        "audit chain after the matrix: {}",
        r.body
    );
}

// ---------------------------------------------------------------------------
// Credential failures, maintenance, rotation, lockdown
// ---------------------------------------------------------------------------

const ME: &str = "/api/auth/me";
const AUDIT: &str = "/api/security/audit/search?minutes=5&limit=1";

#[test]
fn credential_failures_maintenance_rotation_and_lockdown() {
    let mut s = start(&[]);
    // Fetched now: in maintenance mode /api/routes is closed too.
    let route_table = routes(&s);
    let (admin_id, admin_key) = s.bootstrap_admin("root@creds.test");
    let roles = ["security_analyst"];
    let (ok_id, ok_token, ok_sid) = user_with_token(&s, &admin_key, "ok@creds.test", &roles);
    let (dis_id, dis_token, _) = user_with_token(&s, &admin_key, "disabled@creds.test", &roles);
    let (_, out_token, out_sid) = user_with_token(&s, &admin_key, "logout@creds.test", &roles);
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

    // Both representative routes work with each credential kind.
    for cred in [&ok_token, &user_key] {
        for path in [ME, AUDIT] {
            let r = s.get(path, cred);
            assert_eq!(r.status, 200, "{path}: {}", r.body);
        }
    }
    assert_eq!(s.get(ME, &ok_token).json()["id"], ok_id.as_str());

    // No credential / not a bearer credential.
    for path in [ME, AUDIT] {
        assert_401(&s.send(Request::new("GET", path)), "missing", "no token");
        let r = s.send(Request::new("GET", path).header("Authorization", "Basic dXNlcjpwYXNz"));
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

    // Logout revokes the caller's session.
    let r = s.send(Request::new("POST", "/api/auth/logout").bearer(&out_token));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_401(&s.get(ME, &out_token), "revoked", "after logout");
    assert_401(&s.get(AUDIT, &out_token), "revoked", "after logout");
    every_protected_route(&s, &out_token, None, 401, "revoked", "revoked session");
    // An API key has no session to log out of.
    let r = s.send(Request::new("POST", "/api/auth/logout").bearer(&user_key));
    assert_eq!(r.status, 400, "{}", r.body);

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

    // A permission denial.
    let r = s.get(AUDIT, &view_token);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["permission"], "audit.read");
    assert_eq!(s.get(ME, &view_token).status, 200);

    // A blocked address is refused everything but health and metrics; others are not.
    let r = s.post(
        "/api/admin/ratelimit/block",
        &admin_key,
        &json!({"ip": BLOCKED_IP, "duration": "1h", "reason": "credential stuffing"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let from = |ip: &str, req: Request| s.send(req.header("X-Forwarded-For", ip));
    every_protected_route(
        &s,
        &ok_token,
        Some(BLOCKED_IP),
        403,
        "ip_blocked",
        "blocked IP",
    );
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
        &|e| e["details"]["reason"] == "revoked" && e["details"]["session_id"] == out_sid.as_str(),
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
    let denials = audit(&s, &admin_key, "permission_denied");
    assert!(
        denials
            .iter()
            .any(|e| e["actor"] == view_id.as_str() && e["details"]["permission"] == "audit.read"),
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

    // Maintenance mode: security endpoints 503, health/metrics/admin served.
    s.restart_with(&[("MAINTENANCE_MODE", "true")]);
    let r = s.send(Request::new("GET", "/api/health"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["maintenance_mode"], true);
    assert_eq!(s.send(Request::new("GET", "/metrics")).status, 200);
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
    let r = s.send(
        Request::new("GET", "/api/admin/users")
            .bearer(&admin_key)
            .header("X-Forwarded-For", PERSISTED_BLOCK_IP),
    );
    assert_eq!(r.status, 403, "IP block after a restart: {}", r.body);

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
    let forged_old = sign(
        OLD_SECRET,
        Algorithm::HS256,
        &claims(&ok_id, &new_sid, now(), now() + 600),
    );
    assert_eq!(
        s.get(ME, &forged_old).status,
        200,
        "previous secret verifies"
    );

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
    assert!(!audit(&s, &admin_key, "sessions_revoked_all").is_empty());
    has_revoked_session(&s, &admin_key, &view_sid2);
    assert!(auth_failure_metric(&s, "revoked") >= 6.0);
    let r = s.get("/api/security/audit/verify", &admin_key);
    assert_eq!(r.json()["ok"], true, "audit chain: {}", r.body);
}

fn has_revoked_session(s: &Server, key: &str, sid: &str) {
    let entries = auth_failures(s, key, "revoked");
    assert!(
        entries.iter().any(|e| e["details"]["session_id"] == sid),
        "no auth_failure revoked for session {sid} after revoke-all"
    );
}
