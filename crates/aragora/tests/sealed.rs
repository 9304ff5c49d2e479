//! Sealed start (Vault's model, issue #16 item 4) against the real server in
//! production mode: without ARAGORA_ENCRYPTION_KEY, or with one that does not
//! open the key ring, the server starts sealed (health says so, the master-key
//! gauge is 0, everything needing a data key answers 503 naming the variable,
//! login and admin keep working); `aragora unseal` with the key on stdin
//! refuses a wrong key (the ring stays sealed) and opens it with the right
//! one; a malformed key still stops boot naming the variable.

use std::path::Path;

use aragora_testkit::{BootFailure, Request, Response, Server, Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const KEY_A: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
const KEY_B: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";
const JWT: &str = "a-production-jwt-secret-of-at-least-32-characters";

/// Production keys for the store and JWTs; the master key is the test's.
fn production(encryption_key: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("ARAGORA_ENV", "production".to_string()),
        ("AEDB_MANIFEST_KEY", "2b".repeat(32)),
        ("AEDB_CHECKPOINT_KEY", "3c".repeat(32)),
        ("JWT_SECRET", JWT.to_string()),
    ];
    if let Some(k) = encryption_key {
        env.push(("ARAGORA_ENCRYPTION_KEY", k.to_string()));
    }
    env
}

fn start(encryption_key: Option<&str>) -> Server {
    let env = production(encryption_key);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start(Path::new(BIN), &extra)
}

fn encryption_health(s: &Server) -> Value {
    let h = s.send(Request::new("GET", "/api/security/encryption/health"));
    assert_eq!(h.status, 200, "{}", h.body);
    h.json()
}

/// The master-key series of the active-keys gauge, which must be exported.
fn master_gauge(s: &Server) -> f64 {
    let r = s.send(Request::new("GET", "/metrics"));
    assert_eq!(r.status, 200, "{}", r.body);
    let series = "aragora_security_active_keys{type=\"master\"}";
    assert!(
        r.body.lines().any(|l| l.starts_with(series)),
        "/metrics lacks {series}:\n{}",
        r.body
    );
    aragora_testkit::metric_value(&r.body, series)
}

fn put_secret(s: &Server, token: &str, id: &str, value: &str) -> Response {
    s.put(
        &format!("/api/secrets/{id}"),
        token,
        &json!({"value": value, "secret_type": "password"}),
    )
}

/// A 503 that says the ring is sealed and names the variable to set.
fn assert_sealed_503(r: &Response, what: &str) {
    assert_eq!(r.status, 503, "{what}: {}", r.body);
    let v = r.json();
    assert_eq!(v["reason"], "sealed", "{what}: {v}");
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("ARAGORA_ENCRYPTION_KEY") && msg.contains("aragora unseal"),
        "{what}: the error must name the variable and the way out: {v}"
    );
}

fn assert_sealed(s: &Server, reason: &str) -> Value {
    let h = encryption_health(s);
    assert_eq!(
        (
            h["master_key_loaded"].as_bool(),
            h["sealed"].as_bool(),
            h["sealed_reason"].as_str(),
            h["status"].as_str(),
            h["active_keys"].as_u64(),
        ),
        (
            Some(false),
            Some(true),
            Some(reason),
            Some("sealed"),
            Some(0)
        ),
        "{h}"
    );
    assert!(h["active_key_id"].is_null(), "{h}");
    assert!(
        h["message"]
            .as_str()
            .is_some_and(|m| m.contains("ARAGORA_ENCRYPTION_KEY")),
        "{h}"
    );
    assert_eq!(master_gauge(s), 0.0, "NoActiveEncryptionKeys must fire");
    let live = s.send(Request::new("GET", "/api/health"));
    assert_eq!(live.status, 200, "{}", live.body);
    assert_eq!(live.json()["sealed"], true, "{}", live.body);
    h
}

fn assert_unsealed(s: &Server) -> Value {
    let h = encryption_health(s);
    assert_eq!(
        (
            h["master_key_loaded"].as_bool(),
            h["sealed"].as_bool(),
            h["status"].as_str()
        ),
        (Some(true), Some(false), Some("healthy")),
        "{h}"
    );
    assert_eq!(master_gauge(s), 1.0);
    h
}

/// `aragora unseal` with `key` on stdin.
fn unseal(s: &Server, key: &str) -> std::process::Output {
    s.cli_with_stdin(&["unseal"], &format!("{key}\n"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn without_the_key_production_starts_sealed_serves_the_rest_and_unseals_from_stdin() {
    let s = start(None);
    let h = assert_sealed(&s, "missing_key");
    assert!(
        h["message"]
            .as_str()
            .is_some_and(|m| m.contains("is not set")),
        "{h}"
    );
    assert!(
        s.stderr().contains("key ring sealed"),
        "the boot log says it: {}",
        s.stderr()
    );

    // What needs no data key keeps working: the admin, login, RBAC, audit.
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    assert_eq!(s.get("/api/auth/me", &admin).status, 200);
    s.create_user(&admin, "ana@example.com", "a long passphrase", &["viewer"]);
    let ana = s.login("ana@example.com", "a long passphrase");
    assert_eq!(s.get("/api/auth/me", &ana).status, 200);
    assert_eq!(s.get("/api/security/rbac/permissions", &admin).status, 200);
    assert_eq!(
        s.get("/api/security/audit/search?minutes=5", &ana).status,
        403,
        "RBAC decides as usual"
    );
    assert_eq!(
        s.get("/api/security/audit/search?minutes=5", &admin).status,
        200
    );
    assert_eq!(
        s.get("/api/secrets", &admin).status,
        200,
        "listing is metadata"
    );
    let stats = s.get("/api/security/encryption/stats", &admin);
    assert_eq!(stats.status, 200, "{}", stats.body);

    // Everything needing a data key: 503 naming the problem.
    assert_sealed_503(&put_secret(&s, &admin, "db/password", "hunter2"), "PUT");
    // Nothing stored there: nothing to decrypt (a stored one is 503, below).
    assert_eq!(s.get("/api/secrets/db/password", &admin).status, 404);
    assert_sealed_503(&s.get("/api/security/encryption/keys", &admin), "keys");
    assert_sealed_503(
        &s.post(
            "/api/security/encryption/rotate",
            &admin,
            &json!({"reason": "sealed", "force": true}),
        ),
        "rotate",
    );
    assert_sealed_503(
        &s.post(
            "/api/security/migration/run",
            &admin,
            &json!({"store": "secrets"}),
        ),
        "migration",
    );

    // The key on stdin opens it (an empty ring: its first primary is made).
    let out = unseal(&s, KEY_A);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("unsealed"),
        "{}",
        text(&out.stdout)
    );
    let h = assert_unsealed(&s);
    assert_eq!(h["active_keys"], 1, "{h}");
    let r = put_secret(&s, &admin, "db/password", "hunter2");
    assert_eq!(r.status, 201, "{}", r.body);
    let r = s.get("/api/secrets/db/password", &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["value"], "hunter2");
    let unsealed = s.audit(&admin, "key_ring_unsealed");
    assert_eq!(unsealed.len(), 1, "{unsealed:?}");
    assert_eq!(unsealed[0]["details"]["was_sealed"], "missing_key");

    // Unsealing again with the same key changes nothing.
    let again = unseal(&s, KEY_A);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("already unsealed"));
    assert!(
        !s.stderr().contains(KEY_A),
        "the key must never be logged: {}",
        s.stderr()
    );
}

#[test]
fn a_wrong_key_starts_sealed_and_unseal_refuses_it_then_opens_with_the_right_one() {
    let mut s = start(Some(KEY_A));
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    let r = put_secret(&s, &admin, "team-a/token", "ghp_secret_value");
    assert_eq!(r.status, 201, "{}", r.body);
    let primary = encryption_health(&s)["active_key_id"]
        .as_str()
        .expect("primary")
        .to_string();

    s.restart_with(&[("ARAGORA_ENCRYPTION_KEY", KEY_B)]);
    let h = assert_sealed(&s, "wrong_key");
    assert!(
        h["message"].as_str().is_some_and(|m| m.contains(&primary)),
        "names the data key that did not open: {h}"
    );
    assert_sealed_503(&s.get("/api/secrets/team-a/token", &admin), "GET");

    // A wrong key: refused (exit 1), audited, still sealed.
    let out = unseal(&s, KEY_B);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("refused") && err.contains(&primary) && err.contains("stays sealed"),
        "{err}"
    );
    assert_sealed(&s, "wrong_key");
    let failed = s.audit(&admin, "key_ring_unseal_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["details"]["key_id"], primary.as_str());

    // A malformed one: refused naming the problem, still sealed.
    let out = unseal(&s, "abc");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("64 hex characters"),
        "{}",
        text(&out.stderr)
    );
    let out = s.cli_with_stdin(&["unseal"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("stdin"), "{}", text(&out.stderr));
    assert_sealed(&s, "wrong_key");

    // The right key: the secrets written before decrypt again.
    let out = unseal(&s, KEY_A);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_unsealed(&s);
    let r = s.get("/api/secrets/team-a/token", &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["value"], "ghp_secret_value");
    assert_eq!(s.audit(&admin, "key_ring_unsealed").len(), 1);
    // Once open, another key cannot take over.
    let out = unseal(&s, KEY_B);
    assert_eq!(out.status.code(), Some(1));
    assert_unsealed(&s);

    // Or restart with the right key: open at boot.
    s.restart_with(&[("ARAGORA_ENCRYPTION_KEY", KEY_A)]);
    assert_unsealed(&s);
    let log = s.stderr();
    assert!(
        !log.contains(KEY_A) && !log.contains(KEY_B),
        "keys must never be logged: {log}"
    );
}

#[test]
fn a_malformed_key_stops_boot_naming_the_variable() {
    for (bad, named) in [
        (
            "xyz",
            "ARAGORA_ENCRYPTION_KEY must be 64 hex characters (32 bytes), got 3",
        ),
        (&*"g".repeat(64), "ARAGORA_ENCRYPTION_KEY is not valid hex"),
    ] {
        let env = production(Some(bad));
        let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match Server::try_start(Path::new(BIN), &extra) {
            Ok(s) => panic!("{bad:?}: the server started at {}", s.addr),
            Err(BootFailure { status, stderr }) => {
                assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
                assert!(stderr.contains(named), "{named} not in: {stderr}");
                assert!(!stderr.contains(bad), "the value is never echoed: {stderr}");
            }
        }
    }
}

#[test]
fn unseal_without_a_running_server_says_so() {
    let env = production(None);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::stopped(Path::new(BIN), &extra);
    let out = unseal(&s, KEY_A);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("no server answers") && err.contains("aragora.sock"),
        "{err}"
    );
}
