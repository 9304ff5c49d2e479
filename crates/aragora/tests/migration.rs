//! Re-encryption migration and secret rotation by accessor against the real
//! server: rotate then migrate (through the owner-only socket) rewraps every
//! secret under the new primary, an undecryptable record is reported and the
//! rest migrated, cleanup then retires the old key; a migration killed
//! mid-run (the server aborts after N batches, `ARAGORA_MIGRATION_STOP_AFTER_BATCHES`)
//! resumes from its cursor; PUTs during an online migration are not lost;
//! `aragora rotation --secrets-accessed-by` marks exactly what the user read.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aragora::secrets::SecretRecord;
use aragora::store::{Collection, Durability, Expect, get_json};
use aragora_testkit::store::records;
use aragora_testkit::{Request, Response, Server, Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const KEY: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";

fn put_secret(s: &Server, token: &str, id: &str, value: &str) -> Response {
    s.put(
        &format!("/api/secrets/{id}"),
        token,
        &json!({"value": value, "secret_type": "api_key"}),
    )
}

fn secret(s: &Server, token: &str, id: &str) -> Value {
    let r = s.get(&format!("/api/secrets/{id}"), token);
    assert_eq!(r.status, 200, "GET {id}: {}", r.body);
    r.json()
}

fn rotate(s: &Server) -> String {
    let out = s.cli_json(&["key-rotation", "--force", "--reason=test", "--json"]);
    assert_eq!(out["rotated"], true, "{out}");
    out["primary_key_id"].as_str().expect("key").to_string()
}

/// What one server showed along the way through a migration with an
/// undecryptable record: 60 secrets, `sec-013` given `sec-014`'s ciphertext
/// while stopped, a rotation, a dry run, the run through the socket, cleanup,
/// a retry, a skip, the record deleted and cleanup again. The scenario runs
/// once; each test checks one thing it showed.
struct Migrated {
    old: String,
    new: String,
    status_before: Value,
    dry: Value,
    key_after_dry: Value,
    status_after_dry: Value,
    run: Value,
    status_after_run: Value,
    metrics_after_run: String,
    secrets_after_run: Vec<(usize, Value)>,
    cleanup_while_failed: Value,
    retry: Value,
    skip: Value,
    status_after_skip: Value,
    delete_status: u16,
    cleanup_after_delete: Value,
    audit_totals: Vec<(&'static str, Value)>,
    audit_verify: Value,
}

/// Gives `sec-013` the ciphertext of `sec-014` (an AAD mismatch) in the
/// stopped server's store.
fn corrupt_sec_013(s: &Server) {
    let store = aragora_testkit::store::open_stopped(s);
    let (v13, mut r13) = get_json::<SecretRecord>(&store, Collection::Secrets, "sec-013")
        .expect("get")
        .expect("sec-013");
    let (_, r14) = get_json::<SecretRecord>(&store, Collection::Secrets, "sec-014")
        .expect("get")
        .expect("sec-014");
    r13.envelope = r14.envelope;
    aragora::store::Store::write(
        &store,
        vec![records::put_json(
            Collection::Secrets,
            "sec-013",
            &r13,
            Expect::Version(v13),
        )],
        Durability::Durable,
    )
    .expect("corrupt");
    store.close().expect("close");
}

fn migrated() -> &'static Migrated {
    static M: OnceLock<Migrated> = OnceLock::new();
    M.get_or_init(|| {
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
        s.stop();
        corrupt_sec_013(&s);
        s.restart_with(&[]);
        let status = |s: &Server| {
            let r = s.get("/api/security/migration/status", &admin);
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()
        };
        let status_before = status(&s);
        let new = rotate(&s);
        let dry = s.cli_json(&["migration", "--store=secrets", "--dry-run", "--json"]);
        let key_after_dry = secret(&s, &admin, "sec-001")["key_id"].clone();
        let status_after_dry = status(&s);
        let run = s.cli_json(&["migration", "--store=all", "--json"]);
        let status_after_run = status(&s);
        let metrics_after_run = s.send(Request::new("GET", "/metrics")).body;
        let secrets_after_run = (0..60)
            .filter(|i| *i != 13)
            .map(|i| (i, secret(&s, &admin, &format!("sec-{i:03}"))))
            .collect();
        let cleanup_while_failed = s.cli_json(&["key-rotation", "--cleanup-expired", "--json"]);
        let retry = s.cli_json(&["migration", "--retry-failed", "--store=secrets", "--json"]);
        let skip = s.cli_json(&["migration", "--skip-record=sec-013", "--json"]);
        let status_after_skip = status(&s);
        let delete_status = s.delete("/api/secrets/sec-013", &admin).status;
        let cleanup_after_delete = s.cli_json(&["key-rotation", "--cleanup-expired", "--json"]);
        let audit_totals = [
            "migration_started",
            "migration_finished",
            "migration_record_skipped",
        ]
        .into_iter()
        .map(|action| {
            let a = s
                .get(
                    &format!("/api/security/audit/search?action={action}"),
                    &admin,
                )
                .json();
            (action, a["total"].clone())
        })
        .collect();
        let audit_verify = s.get("/api/security/audit/verify", &admin).json();
        Migrated {
            old,
            new,
            status_before,
            dry,
            key_after_dry,
            status_after_dry,
            run,
            status_after_run,
            metrics_after_run,
            secrets_after_run,
            cleanup_while_failed,
            retry,
            skip,
            status_after_skip,
            delete_status,
            cleanup_after_delete,
            audit_totals,
            audit_verify,
        }
    })
}

#[test]
fn before_any_run_the_migration_status_is_idle() {
    let m = migrated();
    assert_eq!(m.status_before["state"], "idle", "{}", m.status_before);
}

#[test]
fn a_dry_run_counts_records_by_key_and_changes_nothing() {
    let m = migrated();
    assert_eq!(m.dry["total"], 60, "{}", m.dry);
    assert_eq!(m.dry["would_change"], 60, "{}", m.dry);
    assert_eq!(m.dry["by_key"][0]["key_id"], m.old.as_str(), "{}", m.dry);
    assert_eq!(m.key_after_dry, m.old.as_str());
    assert_eq!(
        m.status_after_dry["state"], "idle",
        "{}",
        m.status_after_dry
    );
}

#[test]
fn a_run_through_the_socket_migrates_the_rest_and_counts_the_undecryptable_record() {
    let m = migrated();
    let r = &m.run["results"][0];
    assert_eq!(
        (
            r["migrated"].as_u64(),
            r["failed"].as_u64(),
            r["total"].as_u64()
        ),
        (Some(59), Some(1), Some(60)),
        "{}",
        m.run
    );
}

#[test]
fn the_status_after_a_run_names_the_failed_record_its_store_and_error() {
    let m = migrated();
    let st = &m.status_after_run;
    assert_eq!(st["state"], "completed_with_errors", "{st}");
    assert_eq!(st["store"], "secrets", "{st}");
    assert_eq!(st["failed_records"][0]["record_id"], "sec-013", "{st}");
    assert_eq!(st["failed_records"][0]["store"], "secrets", "{st}");
    assert!(
        st["failed_records"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("AAD mismatch")),
        "{st}"
    );
}

#[test]
fn the_status_timestamps_are_utc_to_the_second() {
    let m = migrated();
    for t in ["started_at", "finished_at"] {
        let ts = m.status_after_run[t].as_str().expect("timestamp");
        assert!(ts.len() == 20 && ts.ends_with('Z'), "{t}: {ts}");
    }
}

#[test]
fn a_failed_record_is_counted_in_the_migration_errors_metric() {
    let m = migrated();
    assert!(
        m.metrics_after_run
            .contains("aragora_security_migration_errors_total{store=\"secrets\"} 1"),
        "{}",
        m.metrics_after_run
    );
}

#[test]
fn every_migrated_secret_decrypts_to_its_value_under_the_new_key() {
    let m = migrated();
    assert_eq!(m.secrets_after_run.len(), 59);
    for (i, v) in &m.secrets_after_run {
        assert_eq!(
            (v["key_id"].as_str(), v["value"].as_str()),
            (Some(m.new.as_str()), Some(format!("value {i}").as_str())),
            "{v}"
        );
    }
}

#[test]
fn cleanup_keeps_the_old_key_while_a_failed_record_still_uses_it() {
    let m = migrated();
    assert_eq!(
        m.cleanup_while_failed["kept_in_use"][0]["key_id"],
        m.old.as_str(),
        "{}",
        m.cleanup_while_failed
    );
}

#[test]
fn retrying_an_undecryptable_record_fails_again() {
    let m = migrated();
    assert_eq!(m.retry["failed"], 1, "{}", m.retry);
}

#[test]
fn skipping_a_failed_record_completes_the_migration_and_lists_it_as_skipped() {
    let m = migrated();
    assert_eq!(
        (
            m.skip["failed"].as_u64(),
            m.skip["skipped"].as_u64(),
            m.skip["state"].as_str()
        ),
        (Some(0), Some(1), Some("completed")),
        "{}",
        m.skip
    );
    assert_eq!(
        m.status_after_skip["skipped_records"][0], "sec-013",
        "{}",
        m.status_after_skip
    );
}

#[test]
fn once_the_failed_record_is_deleted_cleanup_retires_the_old_key() {
    let m = migrated();
    assert_eq!(m.delete_status, 204);
    assert_eq!(
        m.cleanup_after_delete["retired"][0]["key_id"],
        m.old.as_str(),
        "{}",
        m.cleanup_after_delete
    );
}

#[test]
fn start_finish_and_skip_are_audited_and_the_chain_verifies() {
    let m = migrated();
    for (action, total) in &m.audit_totals {
        assert!(total.as_u64() >= Some(1), "{action}: {total}");
    }
    assert_eq!(m.audit_verify["ok"], true, "{}", m.audit_verify);
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
    s.start_once(&[("ARAGORA_MIGRATION_STOP_AFTER_BATCHES", "2")])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = s.cli(&["migration", "--store=secrets", "--json"]);
    assert!(!out.status.success(), "the server died mid-migration");
    let st = s.wait().expect("exit status");
    assert!(!st.success(), "{st}");
    let _ = std::fs::remove_file(s.data_dir.join("aragora.sock"));
    // With the server stopped the CLI opens the store itself: the dry run
    // sees the first two batches done.
    let dry = s.cli_json(&["migration", "--store=secrets", "--dry-run", "--json"]);
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
    let out = s.cli_json(&["migration", "--store=secrets", "--json"]);
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

    // A user nobody knows is refused, not reported as "nothing to mark".
    for unknown in ["usr_nobody", "nobody@example.com"] {
        let out = s.cli(&[
            "rotation",
            &format!("--secrets-accessed-by={unknown}"),
            "--dry-run",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(unknown),
            "{unknown}: {err}"
        );
    }
    // The email names the same account as the id.
    let by_email = s.cli_json(&[
        "rotation",
        "--secrets-accessed-by=Alice@Example.com",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(by_email["user_id"], alice.as_str(), "{by_email}");
    let dry = s.cli_json(&[
        "rotation",
        &format!("--secrets-accessed-by={alice}"),
        "--dry-run",
        "--json",
    ]);
    assert_eq!(dry["user_id"], alice.as_str(), "{dry}");
    assert_eq!(dry["secrets"], by_email["secrets"], "{dry}");
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

    let out = s.cli_json(&[
        "rotation",
        &format!("--secrets-accessed-by={alice}"),
        "--json",
    ]);
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
