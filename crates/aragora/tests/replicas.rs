//! Two `aragora serve` replicas on one PostgreSQL database and one Redis
//! (issue #17): a change made through replica A is enforced by replica B on
//! its next request after A's response, not eventually, and the login limit
//! is one budget across both.
//!
//! Needs PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379); under
//! `CI=true` a missing one fails the test.

use std::path::Path;

use aragora_testkit::postgres::TestDatabase;
use aragora_testkit::{Request, Server, json, test_database_or_skip};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const MASTER: &str = "b1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
const JWT: &str = "replicas-test-jwt-secret-0123456789abcdef0123";
const PASSWORD: &str = "Correct-Horse-9-Battery";

fn redis_or_skip() -> bool {
    let up = std::net::TcpStream::connect("127.0.0.1:6379").is_ok();
    if !up {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "Redis at 127.0.0.1:6379 is required under CI=true"
        );
        eprintln!("skipping: no Redis at 127.0.0.1:6379");
    }
    up
}

/// Two replicas on `db`, sharing Redis database 0 under a prefix of their
/// own (the login limit's keys are per client address, unique per test run
/// through the addresses used).
fn replicas(db: &TestDatabase, extra: &[(&str, &str)]) -> (Server, Server) {
    let mut env = vec![
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("ARAGORA_ENCRYPTION_KEY", MASTER),
        ("JWT_SECRET", JWT),
        ("RBAC_CACHE_TTL", "300"),
    ];
    env.extend_from_slice(extra);
    let a = Server::start(Path::new(BIN), &env);
    let b = Server::start(Path::new(BIN), &env);
    (a, b)
}

#[test]
fn a_change_on_one_replica_is_enforced_on_the_others_next_request() {
    let db = test_database_or_skip!();
    if !redis_or_skip() {
        return;
    }
    let (a, b) = replicas(&db, &[]);
    let (_, root) = a.bootstrap_admin("root@replicas.test");
    let admin = {
        a.create_user(&root, "ops@replicas.test", PASSWORD, &["admin"]);
        b.login("ops@replicas.test", PASSWORD)
    };

    // A custom role, used on B (its decision cache holds the allow).
    let r = a.post(
        "/api/admin/roles",
        &admin,
        &json!({"name": "audit-reader", "permissions": ["audit.read"], "description": "reads audit"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let reader = a.create_user(&admin, "reader@replicas.test", PASSWORD, &["audit-reader"]);
    let reader_token = b.login("reader@replicas.test", PASSWORD);
    for _ in 0..2 {
        let r = b.get("/api/security/audit/search?limit=1", &reader_token);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let stats = b.get("/api/security/rbac/cache/stats", &admin).json();
    assert_eq!(stats["invalidation"], "store-generation", "{stats}");
    assert_eq!(stats["redis"]["up"], true, "{stats}");
    assert_eq!(stats["redis"]["host"], "127.0.0.1:6379", "{stats}");

    // The role's grant narrowed on A: B's next request is denied although
    // B cached the allow a moment ago.
    let r = a.post(
        "/api/admin/roles",
        &admin,
        &json!({"name": "audit-reader", "permissions": ["secrets.list"], "description": "narrowed"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = b.get("/api/security/audit/search?limit=1", &reader_token);
    assert_eq!(r.status, 403, "B decided from a stale role: {}", r.body);

    // The role removed from the user on A: denied on B (read per request).
    let r = a.post(
        "/api/admin/roles",
        &admin,
        &json!({"name": "audit-reader", "permissions": ["audit.read"], "description": "back"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        b.get("/api/security/audit/search?limit=1", &reader_token)
            .status,
        200
    );
    let r = a.delete(
        &format!("/api/admin/users/{reader}/roles/audit-reader"),
        &admin,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        b.get("/api/security/audit/search?limit=1", &reader_token)
            .status,
        403
    );

    // A user disabled on A: B refuses its session at once.
    let victim = a.create_user(&admin, "victim@replicas.test", PASSWORD, &["viewer"]);
    let victim_token = b.login("victim@replicas.test", PASSWORD);
    assert_eq!(b.get("/api/auth/me", &victim_token).status, 200);
    let r = a.post(
        &format!("/api/admin/users/{victim}/disable"),
        &admin,
        &json!({"reason": "replica test"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(b.get("/api/auth/me", &victim_token).status, 401);

    // A session revoked on A is dead on B.
    let session_user = a.create_user(&admin, "s@replicas.test", PASSWORD, &["viewer"]);
    let session_token = b.login("s@replicas.test", PASSWORD);
    assert_eq!(b.get("/api/auth/me", &session_token).status, 200);
    let r = a.post(
        &format!("/api/admin/users/{session_user}/sessions/revoke"),
        &admin,
        &json!({"reason": "replica test"}),
    );
    assert!(r.status == 200 || r.status == 204, "{}", r.body);
    assert_eq!(b.get("/api/auth/me", &session_token).status, 401);

    // An address blocked on A is refused by B.
    let blocked = "203.0.113.77";
    let from = |s: &Server| {
        s.send(
            Request::new("GET", "/api/auth/me")
                .bearer(&admin)
                .header("X-Forwarded-For", blocked),
        )
        .status
    };
    assert_eq!(from(&b), 200);
    let r = a.post(
        "/api/admin/ratelimit/block",
        &admin,
        &json!({"ip": blocked, "duration": "1h", "reason": "replica test"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(from(&b), 403);

    // A key rotated on A is B's primary on its next request: B encrypts a
    // new secret under it, and A reads it back.
    let primary = |s: &Server| {
        s.get("/api/security/encryption/health", &admin).json()["active_key_id"]
            .as_str()
            .expect("active key id")
            .to_string()
    };
    let before = primary(&b);
    let r = a.post(
        "/api/security/encryption/rotate",
        &admin,
        &json!({"reason": "replica test", "force": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let rotated = primary(&a);
    assert_ne!(before, rotated);
    assert_eq!(primary(&b), rotated);
    let r = b.put(
        "/api/secrets/after-rotation",
        &admin,
        &json!({"value": "written on B", "secret_type": "password"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = a.get("/api/secrets/after-rotation", &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["value"], "written on B");

    // Lockdown switched on A holds on B's next write.
    let r = a.post(
        "/api/admin/maintenance",
        &admin,
        &json!({"mode": "read-only"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = b.put(
        "/api/secrets/frozen",
        &admin,
        &json!({"value": "x", "secret_type": "password"}),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    let r = b.post("/api/admin/maintenance", &admin, &json!({"mode": "off"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = a.put(
        "/api/secrets/thawed",
        &admin,
        &json!({"value": "x", "secret_type": "password"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn the_login_limit_is_one_budget_across_replicas() {
    let db = test_database_or_skip!();
    if !redis_or_skip() {
        return;
    }
    let (a, b) = replicas(&db, &[("AUTH_RATE_LIMIT_PER_IP", "5")]);
    // An address of this run only, so another run's budget does not count.
    let ip = format!(
        "198.18.{}.{}",
        rand_octet(std::process::id()),
        rand_octet(std::process::id() >> 8)
    );
    let attempt = |s: &Server| {
        s.send(
            Request::new("POST", "/api/auth/login")
                .header("X-Forwarded-For", &ip)
                .json(&json!({"email": "nobody@replicas.test", "password": "wrong-password"})),
        )
        .status
    };
    for i in 0..5 {
        let s = if i % 2 == 0 { &a } else { &b };
        assert_eq!(attempt(s), 401, "attempt {}", i + 1);
    }
    // The sixth, on either replica, is over the shared budget.
    assert_eq!(attempt(&b), 429);
    assert_eq!(attempt(&a), 429);
}

fn rand_octet(seed: u32) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (seed ^ nanos) % 250 + 1
}
