//! Two `aragora serve` replicas on one PostgreSQL database and one Redis
//! (issue #17): a change made through replica A is enforced by replica B on
//! its next request after A's response, not eventually, and the login limit
//! is one budget across both. A key rotated on one (API or CLI) is used by
//! the other, concurrent audited reads on both keep one chain, and an
//! approval requested on one and approved on the other runs once.
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
    // Three requests: the first creates the records' Redis tags, the second
    // caches B's read, the third is served from it (confirmed through Redis).
    for _ in 0..3 {
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
    for _ in 0..3 {
        assert_eq!(
            b.get("/api/security/audit/search?limit=1", &reader_token)
                .status,
            200
        );
    }
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
    for _ in 0..3 {
        assert_eq!(b.get("/api/auth/me", &victim_token).status, 200);
    }
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
    for _ in 0..3 {
        assert_eq!(b.get("/api/auth/me", &session_token).status, 200);
    }
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
    for _ in 0..3 {
        assert_eq!(from(&b), 200);
    }
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

    // B served requests from its cached reads (so the checks above held
    // with the cache in play, not only on store reads). A hit needs two of
    // B's requests within the 1 s lease: at least one pair of the dozens
    // above, however slow the machine.
    let hits = metric(&b, "aragora_cluster_confirmed_reads_total{outcome=\"hit\"}");
    assert!(hits >= 1.0, "B served {hits} requests from confirmed reads");
}

/// The value of one exported series (`name` with its labels) on `s`.
fn metric(s: &Server, name: &str) -> f64 {
    let body = s.send(Request::new("GET", "/metrics")).body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} is not exported: {body}"))
}

#[test]
fn the_login_limit_is_one_budget_across_replicas() {
    let db = test_database_or_skip!();
    if !redis_or_skip() {
        return;
    }
    // Five per hour: no attempt refills before the sixth, however slowly
    // the machine serves them.
    let (a, b) = replicas(
        &db,
        &[
            ("AUTH_RATE_LIMIT_PER_IP", "5"),
            ("AUTH_RATE_LIMIT_WINDOW", "3600"),
        ],
    );
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

fn put_secret(s: &Server, token: &str, id: &str, value: &str) -> String {
    let r = s.put(
        &format!("/api/secrets/{id}"),
        token,
        &json!({"value": value, "secret_type": "password"}),
    );
    assert_eq!(r.status, 201, "PUT {id}: {}", r.body);
    r.json()["key_id"].as_str().expect("key_id").to_string()
}

/// (value, key id) of a secret read through `s`.
fn read_secret(s: &Server, token: &str, id: &str) -> (String, String) {
    let r = s.get(&format!("/api/secrets/{id}"), token);
    assert_eq!(r.status, 200, "GET {id}: {}", r.body);
    let v = r.json();
    (
        v["value"].as_str().expect("value").to_string(),
        v["key_id"].as_str().expect("key_id").to_string(),
    )
}

fn primary(s: &Server, token: &str) -> String {
    let r = s.get("/api/security/encryption/health", token);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["active_key_id"]
        .as_str()
        .expect("active key id")
        .to_string()
}

fn key_count(s: &Server, token: &str) -> usize {
    let r = s.get("/api/security/encryption/keys", token);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["keys"].as_array().expect("keys").len()
}

#[test]
fn a_rotation_on_one_replica_is_used_by_the_other_and_every_key_reads_on_both() {
    let db = test_database_or_skip!();
    if !redis_or_skip() {
        return;
    }
    let (a, b) = replicas(&db, &[]);
    let (_, admin) = a.bootstrap_admin("root@rotation.test");
    let first = primary(&a, &admin);
    assert_eq!(put_secret(&a, &admin, "under-first", "one"), first);

    // Rotated through A's API: B's next write is under the new key.
    let r = a.post(
        "/api/security/encryption/rotate",
        &admin,
        &json!({"reason": "replica rotation (API)", "force": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let second = primary(&a, &admin);
    assert_ne!(second, first);
    assert_eq!(primary(&b, &admin), second);
    assert_eq!(put_secret(&b, &admin, "under-second", "two"), second);

    // Rotated with the CLI on A's configuration (it reaches A through the
    // control socket in A's data dir): B uses it on its next request.
    let out = a.cli(&[
        "key-rotation",
        "--reason",
        "replica rotation (CLI)",
        "--force",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "key-rotation: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rot: aragora_testkit::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let third = rot["primary_key_id"].as_str().expect("primary").to_string();
    assert!(third != second && third != first, "{rot}");
    assert_eq!(primary(&b, &admin), third);
    assert_eq!(put_secret(&b, &admin, "under-third", "three"), third);
    assert_eq!(primary(&a, &admin), third);

    // Every secret reads on either replica, each under the key it was
    // written with (nothing migrated it).
    for s in [&a, &b] {
        for (id, value, key) in [
            ("under-first", "one", &first),
            ("under-second", "two", &second),
            ("under-third", "three", &third),
        ] {
            assert_eq!(
                read_secret(s, &admin, id),
                (value.to_string(), key.clone()),
                "{id}"
            );
        }
    }
}

#[test]
fn concurrent_audited_reads_on_both_replicas_keep_one_chain() {
    let db = test_database_or_skip!();
    if !redis_or_skip() {
        return;
    }
    let (a, b) = replicas(&db, &[]);
    let (_, admin) = a.bootstrap_admin("root@chain.test");
    put_secret(&a, &admin, "chained", "read me");

    const THREADS_PER_REPLICA: usize = 4;
    const READS: usize = 15;
    let handles: Vec<_> = [a.client(), b.client()]
        .into_iter()
        .flat_map(|c| std::iter::repeat_n(c, THREADS_PER_REPLICA))
        .map(|client| {
            let token = admin.clone();
            std::thread::spawn(move || {
                for _ in 0..READS {
                    let r = client.send(Request::new("GET", "/api/secrets/chained").bearer(&token));
                    assert_eq!(r.status, 200, "{}", r.body);
                    assert_eq!(r.json()["value"], "read me");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("reader thread");
    }

    // Every read audited exactly once, whichever replica served it.
    let total = 2 * THREADS_PER_REPLICA * READS;
    for s in [&a, &b] {
        let reads: Vec<_> = s
            .audit(&admin, "secret_access")
            .into_iter()
            .filter(|e| e["details"]["secret_id"] == "chained")
            .collect();
        assert_eq!(
            reads.len(),
            total,
            "secret_access entries seen through a replica"
        );
        let mut seqs: Vec<u64> = reads.iter().filter_map(|e| e["seq"].as_u64()).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), total, "one chain position per read");
    }

    // One unbroken chain across both writers.
    let out = a.cli(&["audit", "verify", "--json"]);
    assert!(
        out.status.success(),
        "audit verify exited {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: aragora_testkit::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["entries_checked"].as_u64().unwrap_or(0) >= total as u64,
        "{report}"
    );
}

#[test]
fn a_request_made_on_one_replica_and_approved_on_the_other_runs_once() {
    let db = test_database_or_skip!();
    if !redis_or_skip() {
        return;
    }
    let (a, b) = replicas(&db, &[]);
    let (_, admin) = a.bootstrap_admin("root@approvals.test");
    // API keys, not logins: every test here shares Redis's per-address login
    // budget for 127.0.0.1.
    let user = |email: &str, role: &str| {
        let id = a.create_user(&admin, email, PASSWORD, &[role]);
        let r = b.post(
            &format!("/api/admin/users/{id}/api-keys"),
            &admin,
            &json!({"name": "replicas"}),
        );
        assert_eq!(r.status, 201, "API key for {email}: {}", r.body);
        r.json()["token"].as_str().expect("token").to_string()
    };
    let operator = user("op@approvals.test", "operator");
    let approver = user("ap@approvals.test", "approver");
    let approver2 = user("ap2@approvals.test", "approver");
    let before = key_count(&a, &admin);
    let first = primary(&a, &admin);

    // Requested on A: nothing runs yet.
    let r = a.post(
        "/api/security/encryption/rotate",
        &operator,
        &json!({"reason": "replica approval", "force": true}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["approval_id"]
        .as_str()
        .expect("approval_id")
        .to_string();
    assert_eq!(key_count(&b, &admin), before);

    // Approved on B by one approver while another approves on A: one wins.
    let detail = b.get(&format!("/api/security/approvals/{id}"), &admin);
    assert_eq!(detail.status, 200, "{}", detail.body);
    assert_eq!(detail.json()["status"], "pending", "B sees A's request");
    let body = json!({"notes": "reviewed", "checklist_confirmed": detail.json()["checklist"]});
    let path = format!("/api/security/approvals/{id}/approve");
    let handles: Vec<_> = [
        (b.client(), approver.clone()),
        (a.client(), approver2.clone()),
    ]
    .into_iter()
    .map(|(client, token)| {
        let (path, body) = (path.clone(), body.clone());
        std::thread::spawn(move || {
            client
                .send(Request::new("POST", &path).bearer(&token).json(&body))
                .status
        })
    })
    .collect();
    let statuses: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().expect("approver thread"))
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| [200, 409].contains(s)),
        "{statuses:?}"
    );

    // Executed once (generous wait: the machine may be loaded), visible on both.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let done = loop {
        let v = b
            .get(&format!("/api/security/approvals/{id}"), &admin)
            .json();
        let status = v["status"].as_str().unwrap_or("").to_string();
        if ["executed", "failed", "refused"].contains(&status.as_str()) {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "still {status}: {v}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(done["status"], "executed", "{done}");
    let rotated = done["execution"]["result"]["primary_key_id"]
        .as_str()
        .expect("result primary")
        .to_string();
    assert_ne!(rotated, first);
    for s in [&a, &b] {
        assert_eq!(key_count(s, &admin), before + 1, "rotated exactly once");
        assert_eq!(primary(s, &admin), rotated);
        let v = s
            .get(&format!("/api/security/approvals/{id}"), &admin)
            .json();
        assert_eq!(v["status"], "executed", "{v}");
        let runs = s
            .audit(&admin, "approval_executed")
            .into_iter()
            .filter(|e| e["details"]["approval_id"] == id.as_str())
            .count();
        assert_eq!(runs, 1, "one execution recorded");
    }
    // Decided: approving again on either replica is a conflict, and runs nothing.
    let r = a.post(&path, &approver2, &body);
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(key_count(&b, &admin), before + 1);
}

/// A command through a replica's control socket acts on what another replica
/// changed, as an HTTP request does: B's `aragora maintenance` reports the
/// mode A set as the one it replaces.
#[test]
fn a_cli_command_on_one_replica_sees_the_others_changes() {
    let db = test_database_or_skip!();
    if !redis_or_skip() {
        return;
    }
    let (a, b) = replicas(&db, &[]);
    let (_, admin) = a.bootstrap_admin("root@cli.test");
    let r = a.post(
        "/api/admin/maintenance",
        &admin,
        &json!({"mode": "read-only"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let out = b.cli_json(&["maintenance", "off", "--json"]);
    assert_eq!(out["previous"], "read-only", "{out}");
    assert_eq!(out["mode"], "off", "{out}");
    // And A follows B's switch on its next request.
    let r = a.put(
        "/api/secrets/after-cli",
        &admin,
        &json!({"value": "x", "secret_type": "password"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

/// A replica that cannot reach Redis still enforces every change at once:
/// its own requests read PostgreSQL, and its writes wait out the cache lease
/// before they answer, so a replica that can reach Redis (and holds a cached
/// read from before the change) no longer trusts it.
#[test]
fn a_replica_that_cannot_reach_redis_neither_serves_nor_causes_stale_reads() {
    let db = test_database_or_skip!();
    if !redis_or_skip() {
        return;
    }
    let env = |redis: &'static str| {
        vec![
            ("DATABASE_URL", db.url.as_str()),
            ("REDIS_URL", redis),
            ("ARAGORA_ENCRYPTION_KEY", MASTER),
            ("JWT_SECRET", JWT),
        ]
    };
    let healthy = Server::start(Path::new(BIN), &env("redis://127.0.0.1:6379/0"));
    // Nothing listens on port 1: every Redis call fails at once.
    let cut_off = Server::start(Path::new(BIN), &env("redis://127.0.0.1:1/0"));
    let (_, admin) = healthy.bootstrap_admin("root@cut-off.test");
    let victim = healthy.create_user(&admin, "victim@cut-off.test", PASSWORD, &["viewer"]);
    let token = healthy.login("victim@cut-off.test", PASSWORD);
    for _ in 0..3 {
        assert_eq!(healthy.get("/api/auth/me", &token).status, 200);
        assert_eq!(cut_off.get("/api/auth/me", &token).status, 200);
    }

    // Disabled through the replica without Redis: its tag is not set, so
    // the healthy replica's cached read still matches its tags, yet the next
    // request there is refused.
    let r = cut_off.post(
        &format!("/api/admin/users/{victim}/disable"),
        &admin,
        &json!({"reason": "redis cut off"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(healthy.get("/api/auth/me", &token).status, 401);
    assert_eq!(cut_off.get("/api/auth/me", &token).status, 401);

    let value = |name: &str| metric(&cut_off, name);
    assert_eq!(value("aragora_redis_up"), 0.0);
    assert!(value("aragora_cluster_confirmed_reads_total{outcome=\"unconfirmed\"}") >= 3.0);
    assert_eq!(
        value("aragora_cluster_confirmed_reads_total{outcome=\"hit\"}"),
        0.0
    );
    assert!(value("aragora_redis_errors_total{operation=\"publish\"}") >= 1.0);
}
