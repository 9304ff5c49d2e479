//! Backups of a running aragora and the runtime maintenance mode (issue #16,
//! item 3), against the real server: `aragora backup full` then
//! `incremental` through the control socket while a writer keeps writing
//! secrets, the chain restored with aedb's restore into a fresh data dir, a
//! server started there with the same keys reading the secrets back; and
//! `aragora maintenance read-only|on|off` (and the API) switching without a
//! restart.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aragora_testkit::{Request, Server, Value, env_refs, json, production_env};
use parking_lot::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const MASTER: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";

fn secret_value(s: &Server, token: &str, id: &str) -> Option<String> {
    let r = s.get(&format!("/api/secrets/{id}"), token);
    (r.status == 200).then(|| r.json()["value"].as_str().unwrap_or_default().to_string())
}

fn backup(s: &Server, kind: &str, out: &Path) -> Value {
    s.cli_json(&[
        "backup",
        kind,
        "--out",
        out.to_str().expect("utf-8 path"),
        "--json",
    ])
}

#[test]
fn backups_taken_while_writing_restore_into_a_server_that_reads_the_secrets() {
    let env = production_env(MASTER);
    let mut s = Server::start(Path::new(BIN), &env_refs(&env));
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    for i in 0..20 {
        s.put_secret(&admin, &format!("app/before-{i}"), &format!("value-{i}"));
    }
    // A writer that keeps going while the backups run: the online backup
    // must not stop it, and whatever it wrote before a backup started is in
    // that backup.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (client, token, stop, written) =
            (s.client(), admin.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("app/live-{i}");
                let r = client.send(
                    Request::new("PUT", &format!("/api/secrets/{id}"))
                        .bearer(&token)
                        .json(&json!({"value": format!("live-{i}"), "secret_type": "password"})),
                );
                assert!(r.status == 200 || r.status == 201, "PUT {id}: {}", r.body);
                written.lock().push(id);
                i += 1;
            }
        })
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("backups");
    let full = backup(&s, "full", &root);
    assert_eq!(full["kind"], "full", "{full}");
    assert!(full["files"].as_u64().unwrap_or(0) > 0, "{full}");
    assert!(full["bytes"].as_u64().unwrap_or(0) > 0, "{full}");
    let head = full["chain_head"].as_str().unwrap_or_default();
    assert!(head.contains(':'), "chain head is LSN:HASH: {full}");

    for i in 0..10 {
        s.put_secret(&admin, &format!("app/after-full-{i}"), &format!("late-{i}"));
    }
    let live_before_incremental: Vec<String> = written.lock().clone();
    let incr = backup(&s, "incremental", &root);
    assert_eq!(incr["kind"], "incremental", "{incr}");
    assert_eq!(
        incr["chain"],
        json!(["0001-full", "0002-incremental"]),
        "{incr}"
    );
    assert!(
        incr["end_lsn"].as_u64() > full["end_lsn"].as_u64(),
        "the incremental carries the writes after the full: {full} {incr}"
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(
        !written.lock().is_empty(),
        "the writer wrote while the backups ran"
    );

    // Audited with the operator (the CLI's OS user), not a bare `cli`.
    let audited = s.audit(&admin, "backup_created");
    assert_eq!(audited.len(), 2, "{audited:?}");
    for e in &audited {
        let actor = e["actor"].as_str().unwrap_or_default();
        assert!(actor.starts_with("cli:"), "{e}");
    }
    // The key-ring backups travel with the store backup.
    assert!(root.join("keyring-backups").is_dir());
    let metrics = s.send(Request::new("GET", "/metrics")).body;
    assert!(
        aragora_testkit::metric_value(
            &metrics,
            "aragora_backup_last_success_timestamp_seconds{kind=\"incremental\"}"
        ) > 0.0,
        "{metrics}"
    );
    s.stop();

    // Restore: the chain with aedb's restore (what `aedb restore --from DIR
    // --to NEW/aedb` runs) into a fresh data dir, the key-ring backups next
    // to it, then a server there with the same keys.
    let mut restored = Server::stopped(Path::new(BIN), &env_refs(&env));
    let cfg = aedb::AedbConfig::production([0x2b; 32]).with_checkpoint_key([0x3c; 32]);
    let chain = aedb::discover_chain(&root, &cfg).expect("chain");
    assert_eq!(chain.len(), 2, "{chain:?}");
    aedb::restore_from_backup_chain(&cfg, &chain, &restored.data_dir.join("aedb"))
        .expect("restore");
    restored
        .start_once(&[])
        .expect("server on the restored store");
    for i in 0..20 {
        assert_eq!(
            secret_value(&restored, &admin, &format!("app/before-{i}")).as_deref(),
            Some(format!("value-{i}").as_str())
        );
    }
    for i in 0..10 {
        assert_eq!(
            secret_value(&restored, &admin, &format!("app/after-full-{i}")).as_deref(),
            Some(format!("late-{i}").as_str())
        );
    }
    for id in &live_before_incremental {
        let n = id.trim_start_matches("app/live-");
        assert_eq!(
            secret_value(&restored, &admin, id).as_deref(),
            Some(format!("live-{n}").as_str()),
            "{id} was written before the incremental started"
        );
    }
}

#[test]
fn an_incremental_without_a_full_backup_says_what_to_run() {
    let s = Server::start(Path::new(BIN), &[]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = s.cli(&[
        "backup",
        "incremental",
        "--out",
        tmp.path().join("none").to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("aragora backup full --out"), "{err}");
}

#[test]
fn read_only_refuses_writes_serves_reads_and_off_restores_writes() {
    let s = Server::start(Path::new(BIN), &[]);
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    s.put_secret(&admin, "app/db", "v1");

    let out = s.cli_json(&["maintenance", "read-only", "--json"]);
    assert_eq!(out, json!({"previous": "off", "mode": "read-only"}));
    let health = s.send(Request::new("GET", "/api/health")).json();
    assert_eq!(health["maintenance"], "read-only", "{health}");
    assert_eq!(health["maintenance_mode"], true, "{health}");
    assert_eq!(
        s.metric("aragora_maintenance_mode{mode=\"read-only\"}"),
        1.0
    );
    assert_eq!(s.metric("aragora_maintenance_mode{mode=\"off\"}"), 0.0);

    let refused = s.put(
        "/api/secrets/app/db",
        &admin,
        &json!({"value": "v2", "secret_type": "password"}),
    );
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.body.contains("read-only"), "{}", refused.body);
    assert_eq!(secret_value(&s, &admin, "app/db").as_deref(), Some("v1"));

    // Through the API as well (an admin incident action: exempt itself).
    let off = s.post("/api/admin/maintenance", &admin, &json!({"mode": "off"}));
    assert_eq!(off.status, 200, "{}", off.body);
    assert_eq!(off.json()["previous"], "read-only");
    s.put_secret(&admin, "app/db", "v2");
    assert_eq!(secret_value(&s, &admin, "app/db").as_deref(), Some("v2"));

    // `on` is the lockdown: reads refused too, admin still served.
    s.cli_json(&["maintenance", "on", "--json"]);
    assert_eq!(s.get("/api/secrets/app/db", &admin).status, 503);
    assert_eq!(s.get("/api/admin/users", &admin).status, 200);
    s.cli_json(&["maintenance", "off", "--json"]);
    assert_eq!(secret_value(&s, &admin, "app/db").as_deref(), Some("v2"));

    let changes = s.audit(&admin, "maintenance_mode_changed");
    assert_eq!(changes.len(), 4, "{changes:?}");
}

/// Polls `f` until it holds; the deadline only stops a hung test (the
/// schedule's pace is the server's, and no duration is asserted).
fn eventually(what: &str, s: &Server, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never happened; stderr:\n{}",
            s.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn chains(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("chain-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn the_schedule_writes_chains_with_incrementals_and_keeps_the_newest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("scheduled");
    let dir_s = dir.to_str().expect("utf-8").to_string();
    let s = Server::start(
        Path::new(BIN),
        &[
            ("ARAGORA_BACKUP_DIR", dir_s.as_str()),
            ("ARAGORA_BACKUP_INCREMENTAL_INTERVAL", "1"),
            ("ARAGORA_BACKUP_FULL_INTERVAL", "3"),
            ("ARAGORA_BACKUP_RETAIN_FULL", "2"),
        ],
    );
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    s.put_secret(&admin, "app/db", "v1");
    eventually("an incremental in the first chain", &s, || {
        dir.join("chain-0001/0002-incremental/backup.json")
            .is_file()
    });
    eventually("a third chain, and the first one pruned", &s, || {
        let c = chains(&dir);
        c.iter().any(|n| n == "chain-0003") && !c.iter().any(|n| n == "chain-0001")
    });
    assert!(chains(&dir).len() <= 2, "{:?}", chains(&dir));
    let audited = s.audit(&admin, "backup_created");
    assert!(
        audited
            .iter()
            .all(|e| e["actor"] == "system:backup-schedule"),
        "{audited:?}"
    );
    assert!(s.metric("aragora_backup_last_success_timestamp_seconds{kind=\"full\"}") > 0.0);
    assert_eq!(s.metric("aragora_backup_failures_total"), 0.0);
}

#[test]
fn a_failing_scheduled_backup_is_counted_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A file where the backup directory should be: every backup fails.
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").expect("write");
    let s = Server::start(
        Path::new(BIN),
        &[
            ("ARAGORA_BACKUP_DIR", blocker.to_str().expect("utf-8")),
            ("ARAGORA_BACKUP_INCREMENTAL_INTERVAL", "1"),
        ],
    );
    eventually("a counted backup failure", &s, || {
        s.metric("aragora_backup_failures_total{kind=\"full\"}") >= 1.0
    });
    assert_eq!(s.send(Request::new("GET", "/api/health")).status, 200);
    // The counter moves before the line is logged: wait for the line too.
    eventually("the logged backup failure", &s, || {
        s.stderr().contains("backup failed")
    });
}
