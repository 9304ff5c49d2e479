//! The real server with DATABASE_URL: all state in PostgreSQL (a fresh
//! database per test). A server keeps users and secrets across a restart
//! without an embedded store; the operator commands work directly on the
//! database without a server, and a running replica picks up what they did
//! (an admin bootstrapped, a key rotated, a migration, a recovery).

use std::path::Path;
use std::time::{Duration, Instant};

use aragora_testkit::postgres::TestDatabase;
use aragora_testkit::{Request, Server, Value, json, test_database_or_skip};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const MASTER: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
const JWT: &str = "postgres-mode-test-jwt-secret-0123456789abcdef";

fn env(db: &TestDatabase) -> Vec<(&str, &str)> {
    vec![
        ("DATABASE_URL", db.url.as_str()),
        ("ARAGORA_ENCRYPTION_KEY", MASTER),
        ("JWT_SECRET", JWT),
    ]
}

fn put_secret(s: &Server, token: &str, id: &str, value: &str) -> Value {
    let r = s.put(
        &format!("/api/secrets/{id}"),
        token,
        &json!({"value": value, "secret_type": "password"}),
    );
    assert_eq!(r.status, 201, "PUT {id}: {}", r.body);
    r.json()
}

fn secret(s: &Server, token: &str, id: &str) -> Value {
    let r = s.get(&format!("/api/secrets/{id}"), token);
    assert_eq!(r.status, 200, "GET {id}: {}", r.body);
    r.json()
}

fn primary_key(s: &Server) -> String {
    let h = s.send(Request::new("GET", "/api/security/encryption/health"));
    assert_eq!(h.status, 200, "{}", h.body);
    h.json()["active_key_id"]
        .as_str()
        .expect("active key id")
        .to_string()
}

#[test]
fn a_server_on_database_url_keeps_users_and_secrets_across_a_restart() {
    let db = test_database_or_skip!();
    let mut s = Server::start(Path::new(BIN), &env(&db));
    let health = s.send(Request::new("GET", "/api/health"));
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(
        health.json()["store"]["backend"],
        "postgres",
        "{}",
        health.body
    );
    assert!(
        !s.data_dir.join("aedb").exists(),
        "no embedded store is opened with DATABASE_URL"
    );

    let (_, admin) = s.bootstrap_admin("root@pg.test");
    s.create_user(&admin, "ops@pg.test", "Correct-Horse-9-Battery", &["admin"]);
    let token = s.login("ops@pg.test", "Correct-Horse-9-Battery");
    put_secret(&s, &token, "db-password", "hunter2-plaintext-value");
    assert_eq!(
        secret(&s, &token, "db-password")["value"],
        "hunter2-plaintext-value"
    );
    // Envelope-encrypted by aragora: PostgreSQL never holds the plaintext.
    let stored = db.stored_values("secrets");
    assert_eq!(stored.len(), 1);
    let needle = b"hunter2-plaintext-value";
    assert!(
        !stored[0].windows(needle.len()).any(|w| w == needle),
        "the secret is stored encrypted"
    );

    s.restart_with(&[]);
    let token = s.login("ops@pg.test", "Correct-Horse-9-Battery");
    assert_eq!(
        secret(&s, &token, "db-password")["value"],
        "hunter2-plaintext-value",
        "state lives in PostgreSQL across a restart"
    );
    // Mode-specific answers: the engine backup names PostgreSQL's tools.
    let out = s.cli(&[
        "backup",
        "full",
        "--out",
        "/tmp/aragora-pg-mode-backup-unused",
    ]);
    assert!(!out.status.success(), "no engine backup in PostgreSQL mode");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pg_dump"), "{err}");
}

/// Waits (generously: the machine may be loaded) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 120 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn offline_commands_on_database_url_reach_a_running_replica() {
    let db = test_database_or_skip!();
    let server = Server::start(Path::new(BIN), &env(&db));
    // Another data dir and no server there: the CLI opens PostgreSQL itself
    // (as an operator's pod or a Job would).
    let offline = Server::stopped(Path::new(BIN), &env(&db));

    let v = offline.cli_json(&["admin", "bootstrap", "--email", "root@pg.test", "--json"]);
    let admin = v["token"].as_str().expect("token").to_string();
    let r = server.get("/api/secrets", &admin);
    assert_eq!(
        r.status, 200,
        "the replica knows the admin made offline: {}",
        r.body
    );

    let first = primary_key(&server);
    let put = put_secret(&server, &admin, "db-password", "before-rotation");
    assert_eq!(put["key_id"], first.as_str(), "{put}");

    let rot = offline.cli_json(&[
        "key-rotation",
        "--reason",
        "scheduled rotation",
        "--force",
        "--json",
    ]);
    let second = rot["primary_key_id"]
        .as_str()
        .expect("new primary")
        .to_string();
    assert_ne!(second, first, "{rot}");
    eventually("the running replica encrypts under the new primary", || {
        primary_key(&server) == second
    });
    let put = put_secret(&server, &admin, "api-token", "after-rotation");
    assert_eq!(put["key_id"], second.as_str(), "{put}");
    assert_eq!(
        secret(&server, &admin, "db-password")["value"],
        "before-rotation"
    );
    assert_eq!(
        secret(&server, &admin, "api-token")["value"],
        "after-rotation"
    );

    // The migration rewraps offline; the replica reads the rewrapped record.
    let out = offline.cli(&["migration", "--store", "secrets", "--json"]);
    assert!(
        out.status.success(),
        "migration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = secret(&server, &admin, "db-password");
    assert_eq!(read["value"], "before-rotation");
    assert_eq!(read["key_id"], second.as_str(), "rewrapped: {read}");

    // The replica's audited reads are what the offline rotation scan sees.
    let marks = offline.cli_json(&[
        "rotation",
        "--secrets-accessed-by",
        "root@pg.test",
        "--json",
    ]);
    let ids: Vec<&str> = marks["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"db-password") && ids.contains(&"api-token"),
        "{marks}"
    );

    // One chain, written by the replica and the offline commands alike.
    let report = offline.cli_json(&["audit", "verify", "--json"]);
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["entries_checked"].as_u64().unwrap_or(0) >= 8,
        "{report}"
    );

    // Break-glass offline: the new key works on the replica, the old one no
    // longer does.
    let rec = offline.cli_json(&[
        "admin",
        "recover",
        "--email",
        "root@pg.test",
        "--force",
        "--reason",
        "lost the admin key",
        "--json",
    ]);
    assert_eq!(rec["status"], "recovered", "{rec}");
    let new_admin = rec["token"].as_str().expect("token");
    assert_eq!(server.get("/api/secrets", new_admin).status, 200);
    eventually("the revoked key is refused by the replica", || {
        server.get("/api/secrets", &admin).status == 401
    });
}

/// A DATABASE_URL that is not a connection string stops boot, naming the
/// variable and never echoing the value.
#[test]
fn a_malformed_database_url_stops_boot_naming_the_variable() {
    let failure = Server::try_start(
        Path::new(BIN),
        &[
            ("DATABASE_URL", "postgres://user:pw-sekrit@host:notaport/db"),
            ("ARAGORA_ENCRYPTION_KEY", MASTER),
        ],
    )
    .expect_err("a malformed DATABASE_URL must stop boot");
    assert!(
        failure.stderr.contains("DATABASE_URL"),
        "{}",
        failure.stderr
    );
    assert!(!failure.stderr.contains("pw-sekrit"), "{}", failure.stderr);
}

const NEW_MASTER: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";

fn run_tool(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (PostgreSQL's client tools): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The runbook's "Emergency Key Recovery" on PostgreSQL: dump with
/// `pg_dump`, lose the database, `pg_restore` into a new one, boot with a new
/// master key and the dump's as the previous, rewrap, read every secret; a
/// data key lost afterwards comes back from the key-ring backup.
#[test]
fn emergency_key_recovery_with_pg_dump_and_pg_restore() {
    let original = test_database_or_skip!();
    let work = tempfile::tempdir().expect("tempdir");
    let dump = work.path().join("backup_before_key_loss.dump");
    let (admin, first_key, ring_backup) = {
        let s = Server::start(Path::new(BIN), &env(&original));
        let (_, admin) = s.bootstrap_admin("root@pg.test");
        let first_key = primary_key(&s);
        put_secret(&s, &admin, "db-password", "under-the-first-key");
        let rot = s.cli_json(&[
            "key-rotation",
            "--reason",
            "before the dump",
            "--force",
            "--json",
        ]);
        let backup = rot["backup"]
            .as_str()
            .expect("key-ring backup path")
            .to_string();
        let kept = work.path().join("keyring-backup.json");
        std::fs::copy(&backup, &kept).expect("keep the key-ring backup");
        put_secret(&s, &admin, "api-token", "under-the-second-key");
        run_tool(
            "pg_dump",
            &[
                "-Fc",
                "--dbname",
                &original.url,
                "--file",
                &dump.display().to_string(),
            ],
        );
        (admin, first_key, kept)
    };
    // Lose the database.
    drop(original);

    let restored = TestDatabase::create().expect("a second database");
    run_tool(
        "pg_restore",
        &[
            "--no-owner",
            "--dbname",
            &restored.url,
            &dump.display().to_string(),
        ],
    );
    let s = Server::start(
        Path::new(BIN),
        &[
            ("DATABASE_URL", restored.url.as_str()),
            ("ARAGORA_ENCRYPTION_KEY", NEW_MASTER),
            ("ARAGORA_ENCRYPTION_KEY_PREVIOUS", MASTER),
            ("JWT_SECRET", JWT),
        ],
    );
    let out = s.cli_json(&["master-key", "rotate", "--json"]);
    assert!(out["rewrapped"].as_u64().unwrap_or(0) >= 2, "{out}");
    assert_eq!(
        secret(&s, &admin, "db-password")["value"],
        "under-the-first-key"
    );
    assert_eq!(
        secret(&s, &admin, "api-token")["value"],
        "under-the-second-key"
    );

    // A data key lost from the restored database: the secret under it no
    // longer reads, and the key-ring backup brings it back. The row is
    // deleted with SQL behind aragora's back, which bumps no generation
    // (`aragora::cluster`): a replica sees such an edit when it restarts.
    restored.execute(&format!(
        "DELETE FROM aragora_records WHERE collection = 'key_ring' AND id = '{first_key}'"
    ));
    let mut s = s;
    s.restart_with(&[]);
    assert_ne!(s.get("/api/secrets/db-password", &admin).status, 200);
    let out = s.cli_json(&[
        "key-ring",
        "restore",
        "--file",
        &ring_backup.display().to_string(),
        "--json",
    ]);
    assert!(out.to_string().contains(&first_key), "{out}");
    assert_eq!(
        secret(&s, &admin, "db-password")["value"],
        "under-the-first-key"
    );
}
