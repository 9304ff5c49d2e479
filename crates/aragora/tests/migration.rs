//! Re-encryption migration and secret rotation by accessor against the real
//! server: rotate then migrate (through the owner-only socket) rewraps every
//! secret under the new primary, an undecryptable record is reported and the
//! rest migrated, cleanup then retires the old key; a migration killed
//! mid-run (the server aborts after N batches, `ARAGORA_MIGRATION_STOP_AFTER_BATCHES`)
//! resumes from its cursor; PUTs during an online migration are not lost;
//! `aragora rotation --secrets-accessed-by` marks exactly what the user read.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use aragora::secrets::SecretRecord;
use aragora::store::{Collection, Durability, EmbeddedStore, Expect, WriteOp, get_json};
use aragora_testkit::{Request, Response, Server, Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const KEY: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";

fn put_secret(s: &Server, token: &str, id: &str, value: &str) -> Response {
    s.send(
        Request::new("PUT", &format!("/api/secrets/{id}"))
            .bearer(token)
            .json(&json!({"value": value, "secret_type": "api_key"})),
    )
}

fn secret(s: &Server, token: &str, id: &str) -> Value {
    let r = s.get(&format!("/api/secrets/{id}"), token);
    assert_eq!(r.status, 200, "GET {id}: {}", r.body);
    r.json()
}

fn cli_json(s: &Server, args: &[&str]) -> Value {
    let out = s.cli(args);
    assert!(
        out.status.success(),
        "aragora {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("CLI JSON")
}

fn rotate(s: &Server) -> String {
    let out = cli_json(s, &["key-rotation", "--force", "--reason=test", "--json"]);
    assert_eq!(out["rotated"], true, "{out}");
    out["primary_key_id"].as_str().expect("key").to_string()
}

/// Opens the stopped server's store (keys from its dev key file).
fn open_store(s: &Server) -> EmbeddedStore {
    let keys = s.dev_keys();
    let key = |name: &str| -> [u8; 32] {
        hex::decode(&keys[name])
            .expect("hex")
            .try_into()
            .expect("32 bytes")
    };
    EmbeddedStore::open(
        &s.data_dir.join("aedb"),
        key("AEDB_MANIFEST_KEY"),
        key("AEDB_CHECKPOINT_KEY"),
    )
    .expect("open store")
}

/// `aragora serve` with the server's environment plus `overrides`, as a child.
fn spawn_server(s: &Server, overrides: &[(&str, &str)]) -> Child {
    let mut cmd = s.command();
    for (k, v) in overrides {
        cmd.env(k, v);
    }
    let mut child = cmd
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn aragora");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Request::new("GET", "/api/health").send(s.port).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("server exited at start: {st}");
        }
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(25));
    }
    child
}

#[test]
fn rotate_migrate_report_failures_skip_and_cleanup_over_the_socket() {
    let mut s = Server::start(Path::new(BIN), &[("ARAGORA_ENCRYPTION_KEY", KEY)]);
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    for i in 0..60 {
        let r = put_secret(&s, &admin, &format!("sec-{i:03}"), &format!("value {i}"));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let old = secret(&s, &admin, "sec-000")["key_id"]
        .as_str()
        .expect("key id")
        .to_string();
    // Make sec-013 undecryptable: sec-014's ciphertext (AAD mismatch).
    s.stop();
    {
        let store = open_store(&s);
        let (v13, mut r13) = get_json::<SecretRecord>(&store, Collection::Secrets, "sec-013")
            .expect("get")
            .expect("sec-013");
        let (_, r14) = get_json::<SecretRecord>(&store, Collection::Secrets, "sec-014")
            .expect("get")
            .expect("sec-014");
        r13.envelope = r14.envelope;
        aragora::store::Store::write(
            &store,
            vec![
                WriteOp::put_json(Collection::Secrets, "sec-013", &r13, Expect::Version(v13))
                    .expect("op"),
            ],
            Durability::Durable,
        )
        .expect("corrupt");
        store.close().expect("close");
    }
    s.restart_with(&[]);
    let status = s.get("/api/security/migration/status", &admin);
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(status.json()["state"], "idle", "{}", status.body);

    let new = rotate(&s);
    // Dry run: counts by key, changes nothing.
    let dry = cli_json(&s, &["migration", "--store=secrets", "--dry-run", "--json"]);
    assert_eq!(dry["total"], 60, "{dry}");
    assert_eq!(dry["would_change"], 60, "{dry}");
    assert_eq!(dry["by_key"][0]["key_id"], old.as_str(), "{dry}");
    assert_eq!(secret(&s, &admin, "sec-001")["key_id"], old.as_str());
    let status = s.get("/api/security/migration/status", &admin).json();
    assert_eq!(status["state"], "idle", "{status}");

    // The run, through the socket while the server serves.
    let out = cli_json(&s, &["migration", "--store=all", "--json"]);
    let r = &out["results"][0];
    assert_eq!(
        (
            r["migrated"].as_u64(),
            r["failed"].as_u64(),
            r["total"].as_u64()
        ),
        (Some(59), Some(1), Some(60)),
        "{out}"
    );
    let status = s.get("/api/security/migration/status", &admin).json();
    assert_eq!(status["state"], "completed_with_errors", "{status}");
    assert_eq!(status["store"], "secrets", "{status}");
    assert_eq!(
        status["failed_records"][0]["record_id"], "sec-013",
        "{status}"
    );
    assert_eq!(status["failed_records"][0]["store"], "secrets", "{status}");
    assert!(
        status["failed_records"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("AAD mismatch")),
        "{status}"
    );
    for t in ["started_at", "finished_at"] {
        let ts = status[t].as_str().expect("timestamp");
        assert!(ts.len() == 20 && ts.ends_with('Z'), "{t}: {ts}");
    }
    let metrics = s.send(Request::new("GET", "/metrics")).body;
    assert!(
        metrics.contains("aragora_security_migration_errors_total{store=\"secrets\"} 1"),
        "{metrics}"
    );
    for i in (0..60).filter(|i| *i != 13) {
        let v = secret(&s, &admin, &format!("sec-{i:03}"));
        assert_eq!(
            (v["key_id"].as_str(), v["value"].as_str()),
            (Some(new.as_str()), Some(format!("value {i}").as_str())),
            "{v}"
        );
    }
    // The old key still encrypts sec-013: cleanup keeps it.
    let out = cli_json(&s, &["key-rotation", "--cleanup-expired", "--json"]);
    assert_eq!(out["kept_in_use"][0]["key_id"], old.as_str(), "{out}");
    // Retrying fails again; skipping is recorded and audited.
    let out = cli_json(
        &s,
        &["migration", "--retry-failed", "--store=secrets", "--json"],
    );
    assert_eq!(out["failed"], 1, "{out}");
    let out = cli_json(&s, &["migration", "--skip-record=sec-013", "--json"]);
    assert_eq!(
        (
            out["failed"].as_u64(),
            out["skipped"].as_u64(),
            out["state"].as_str()
        ),
        (Some(0), Some(1), Some("completed")),
        "{out}"
    );
    let status = s.get("/api/security/migration/status", &admin).json();
    assert_eq!(status["skipped_records"][0], "sec-013", "{status}");
    // Once the corrupt record is gone, cleanup retires the old key.
    let r = s.send(Request::new("DELETE", "/api/secrets/sec-013").bearer(&admin));
    assert_eq!(r.status, 204, "{}", r.body);
    let out = cli_json(&s, &["key-rotation", "--cleanup-expired", "--json"]);
    assert_eq!(out["retired"][0]["key_id"], old.as_str(), "{out}");
    for action in [
        "migration_started",
        "migration_finished",
        "migration_record_skipped",
    ] {
        let a = s
            .get(
                &format!("/api/security/audit/search?action={action}"),
                &admin,
            )
            .json();
        assert!(a["total"].as_u64() >= Some(1), "{action}: {a}");
    }
    let audit = s.get("/api/security/audit/verify", &admin).json();
    assert_eq!(audit["ok"], true, "{audit}");
}

#[test]
fn a_migration_killed_mid_run_resumes_and_every_record_decrypts() {
    let mut s = Server::start(
        Path::new(BIN),
        &[
            ("ARAGORA_ENCRYPTION_KEY", KEY),
            ("ARAGORA_MIGRATION_BATCH_SIZE", "25"),
        ],
    );
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    for i in 0..150 {
        let r = put_secret(&s, &admin, &format!("k-{i:03}"), &format!("value {i}"));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let new = rotate(&s);
    s.stop();
    // This server dies (abort, like kill -9) after 2 durable batches.
    let mut child = spawn_server(&s, &[("ARAGORA_MIGRATION_STOP_AFTER_BATCHES", "2")]);
    let out = s.cli(&["migration", "--store=secrets", "--json"]);
    assert!(!out.status.success(), "the server died mid-migration");
    let st = child.wait().expect("wait");
    assert!(!st.success(), "{st}");
    let _ = std::fs::remove_file(s.data_dir.join("aragora.sock"));
    // With the server stopped the CLI opens the store itself: the dry run
    // sees the first two batches done.
    let dry = cli_json(&s, &["migration", "--store=secrets", "--dry-run", "--json"]);
    assert_eq!(
        (
            dry["would_change"].as_u64(),
            dry["already_current"].as_u64()
        ),
        (Some(100), Some(50)),
        "{dry}"
    );

    s.restart_with(&[]);
    let status = s.get("/api/security/migration/status", &admin).json();
    assert_eq!(status["state"], "interrupted", "{status}");
    assert_eq!(status["migrated"], 50, "{status}");
    assert_eq!(status["cursor"], "k-049", "{status}");
    let out = cli_json(&s, &["migration", "--store=secrets", "--json"]);
    assert_eq!(
        (
            out["state"].as_str(),
            out["migrated"].as_u64(),
            out["total"].as_u64(),
            out["resumed"].as_u64()
        ),
        (Some("completed"), Some(150), Some(150), Some(1)),
        "{out}"
    );
    for i in 0..150 {
        let v = secret(&s, &admin, &format!("k-{i:03}"));
        assert_eq!(v["key_id"], new.as_str(), "{v}");
        assert_eq!(v["value"], format!("value {i}"), "{v}");
    }
}

#[test]
fn puts_during_an_online_migration_are_not_lost() {
    let s = Server::start(
        Path::new(BIN),
        &[
            ("ARAGORA_ENCRYPTION_KEY", KEY),
            ("ARAGORA_MIGRATION_BATCH_SIZE", "2"),
        ],
    );
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    for i in 0..400 {
        let r = put_secret(&s, &admin, &format!("o-{i:03}"), &format!("first {i}"));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let new = rotate(&s);
    let r = s.post(
        "/api/security/migration/run",
        &admin,
        &json!({"store": "secrets"}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    // Overwrite secrets while it runs (from the end: the migration starts at
    // the beginning, so many of these land in records not yet migrated).
    let mut rewritten = Vec::new();
    let mut during = 0;
    for i in (0..400).rev().step_by(3) {
        let id = format!("o-{i:03}");
        let r = put_secret(&s, &admin, &id, &format!("second {i}"));
        assert_eq!(r.status, 200, "{}", r.body);
        rewritten.push(i);
        if s.get("/api/security/migration/status", &admin).json()["state"] == "running" {
            during += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let st = s.get("/api/security/migration/status", &admin).json();
        if st["state"] == "completed" {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        during > 0,
        "no PUT landed while the migration ran: {status}"
    );
    assert_eq!(status["failed"], 0, "{status}");
    assert_eq!(status["total"], 400, "{status}");
    for i in 0..400 {
        let v = secret(&s, &admin, &format!("o-{i:03}"));
        let want = if rewritten.contains(&i) {
            format!("second {i}")
        } else {
            format!("first {i}")
        };
        assert_eq!(
            (v["value"].as_str(), v["key_id"].as_str()),
            (Some(want.as_str()), Some(new.as_str())),
            "{v}"
        );
    }
}

#[test]
fn rotation_by_accessor_marks_exactly_the_secrets_that_user_read() {
    let s = Server::start(Path::new(BIN), &[("ARAGORA_ENCRYPTION_KEY", KEY)]);
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    let password = "correct horse battery staple";
    // Alice reads secrets she does not own through a path grant.
    let r = s.post(
        "/api/admin/roles",
        &admin,
        &json!({"name": "secret-reader", "permissions": ["secrets.read:*"], "description": "reads every secret"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let alice = s.create_user(
        &admin,
        "alice@example.com",
        password,
        &["member", "secret-reader"],
    );
    let alice_token = s.login("alice@example.com", password);
    for id in ["stripe", "orders-db", "github"] {
        assert_eq!(put_secret(&s, &admin, id, "v").status, 201);
    }
    for id in ["stripe", "github", "stripe"] {
        assert_eq!(
            s.get(&format!("/api/secrets/{id}"), &alice_token).status,
            200
        );
    }
    secret(&s, &admin, "orders-db");

    let dry = cli_json(
        &s,
        &[
            "rotation",
            &format!("--secrets-accessed-by={alice}"),
            "--dry-run",
            "--json",
        ],
    );
    assert_eq!(dry["user_id"], alice.as_str(), "{dry}");
    let actions: Vec<_> = dry["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .map(|x| (x["id"].as_str(), x["action"].as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            (Some("github"), Some("would_mark_for_rotation")),
            (Some("stripe"), Some("would_mark_for_rotation"))
        ]
    );
    let list = s.get("/api/secrets", &admin).json();
    assert!(
        list["secrets"]
            .as_array()
            .expect("list")
            .iter()
            .all(|x| x["rotation_required"] == false),
        "{list}"
    );

    let out = cli_json(
        &s,
        &[
            "rotation",
            &format!("--secrets-accessed-by={alice}"),
            "--json",
        ],
    );
    assert_eq!(out["secrets"][0]["action"], "marked_for_rotation", "{out}");
    assert_eq!(out["secrets"][0]["secret_type"], "api_key", "{out}");
    let list = s.get("/api/secrets", &admin).json();
    let marked: Vec<_> = list["secrets"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|x| x["rotation_required"] == true)
        .map(|x| x["id"].as_str())
        .collect();
    assert_eq!(marked, [Some("github"), Some("stripe")], "{list}");
    let a = s
        .get(
            "/api/security/audit/search?action=secret_rotation_marked",
            &admin,
        )
        .json();
    assert_eq!(a["total"], 2, "{a}");
}
