//! Encryption over HTTP against the real server: secrets round trip, the key
//! ring survives restarts, rotation keeps old secrets readable, cleanup spares
//! keys in use, a wrong master key refuses boot, and kill -9 during a burst of
//! rotations leaves every secret decryptable.
//!
//! Tests that never rotate share one server; each test that rotates or
//! restarts has its own.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use aragora_testkit::{Request, Response, Server, Shared, Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const KEY_A: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
const KEY_B: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    Shared::get(
        &S,
        Path::new(BIN),
        &[("ARAGORA_ENCRYPTION_KEY", KEY_A)],
        "admin@example.com",
    )
}

/// A server of its own (for tests that rotate or restart) and its admin key.
fn own_server() -> (Server, String) {
    let s = Server::start(Path::new(BIN), &[("ARAGORA_ENCRYPTION_KEY", KEY_A)]);
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    (s, admin)
}

fn put_secret(s: &Server, token: &str, id: &str, value: &str, ty: &str) -> Response {
    s.put(
        &format!("/api/secrets/{id}"),
        token,
        &json!({"value": value, "secret_type": ty}),
    )
}

fn secret_value(s: &Server, token: &str, id: &str) -> Value {
    let r = s.get(&format!("/api/secrets/{id}"), token);
    assert_eq!(r.status, 200, "GET {id}: {}", r.body);
    r.json()["value"].clone()
}

fn health(s: &Server) -> Value {
    let h = s.send(Request::new("GET", "/api/security/encryption/health"));
    assert_eq!(h.status, 200, "{}", h.body);
    h.json()
}

fn primary_key(s: &Server) -> String {
    health(s)["active_key_id"]
        .as_str()
        .expect("key id")
        .to_string()
}

fn rotate_over_http(s: &Server, admin: &str) -> String {
    let r = s.post(
        "/api/security/encryption/rotate",
        admin,
        &json!({"reason": "test", "force": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["primary_key_id"]
        .as_str()
        .expect("primary")
        .to_string()
}

#[test]
fn health_is_anonymous_and_names_the_one_primary_key() {
    let h = health(shared());
    assert_eq!(
        (h["master_key_loaded"].as_bool(), h["active_keys"].as_u64()),
        (Some(true), Some(1)),
        "{h}"
    );
    assert!(h["active_key_id"].as_str().is_some(), "{h}");
}

#[test]
fn a_secret_round_trips_sealed_with_the_primary_key() {
    let s = shared();
    let r = put_secret(s, &s.admin, "github-token", "ghp_secret_value", "api_key");
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["key_id"], primary_key(s).as_str());
    assert_eq!(
        secret_value(s, &s.admin, "github-token"),
        "ghp_secret_value"
    );
}

#[test]
fn listing_shows_metadata_never_values_or_envelopes() {
    let s = shared();
    let r = put_secret(
        s,
        &s.admin,
        "listed-token",
        "listed_secret_value",
        "api_key",
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let list = s.get("/api/secrets", &s.admin);
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(
        list.body.contains("listed-token") && !list.body.contains("listed_secret_value"),
        "{}",
        list.body
    );
    assert!(!list.body.contains("envelope"), "{}", list.body);
}

#[test]
fn a_viewer_may_not_read_a_secret() {
    let s = shared();
    assert_eq!(
        put_secret(s, &s.admin, "viewer-probe", "v", "api_key").status,
        201
    );
    s.create_user(
        &s.admin,
        "viewer@example.com",
        "viewer password 123",
        &["viewer"],
    );
    let viewer = s.login("viewer@example.com", "viewer password 123");
    let r = s.get("/api/secrets/viewer-probe", &viewer);
    assert_eq!(r.status, 403, "{}", r.body);
}

#[test]
fn a_missing_secret_is_404() {
    let s = shared();
    let r = s.get("/api/secrets/missing", &s.admin);
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn reads_are_audited_with_the_secret_type() {
    let s = shared();
    assert_eq!(
        put_secret(s, &s.admin, "audited-read", "v", "api_key").status,
        201
    );
    secret_value(s, &s.admin, "audited-read");
    let entries = s.audit(&s.admin, "secret_access");
    let entry = entries
        .iter()
        .find(|e| e["details"]["secret_id"] == "audited-read")
        .unwrap_or_else(|| panic!("no secret_access entry for audited-read: {entries:?}"));
    assert_eq!(
        (
            entry["actor"].as_str(),
            entry["details"]["secret_type"].as_str()
        ),
        (Some(s.admin_id.as_str()), Some("api_key")),
        "{entry}"
    );
}

#[test]
fn stats_count_encrypts_and_decrypts_per_actor() {
    let s = shared();
    assert_eq!(
        put_secret(s, &s.admin, "stats-probe", "v", "api_key").status,
        201
    );
    secret_value(s, &s.admin, "stats-probe");
    let st = s.get("/api/security/encryption/stats", &s.admin).json();
    // Only the admin decrypts on this server (the viewer is refused first).
    assert_eq!(
        st["decrypts_per_actor"][0]["actor"],
        s.admin_id.as_str(),
        "{st}"
    );
    assert!(st["encrypt_ops"].as_u64() >= Some(1), "{st}");
    assert!(st["derivation_latency_p95"].as_f64().is_some(), "{st}");
}

#[test]
fn a_deleted_secret_is_gone() {
    let s = shared();
    assert_eq!(
        put_secret(s, &s.admin, "to-delete", "v", "api_key").status,
        201
    );
    let r = s.delete("/api/secrets/to-delete", &s.admin);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(s.get("/api/secrets/to-delete", &s.admin).status, 404);
}

#[test]
fn rotation_over_http_keeps_old_secrets_readable_and_seals_new_ones_with_the_new_key() {
    let (s, admin) = own_server();
    let first = primary_key(&s);
    assert_eq!(
        put_secret(&s, &admin, "github-token", "ghp_secret_value", "api_key").status,
        201
    );
    let second = rotate_over_http(&s, &admin);
    assert_ne!(second, first);
    assert_eq!(secret_value(&s, &admin, "github-token"), "ghp_secret_value");
    let r = put_secret(&s, &admin, "db-password", "hunter2", "database_password");
    assert_eq!(r.json()["key_id"], second.as_str(), "{}", r.body);
    let keys = s.get("/api/security/encryption/keys", &admin).json();
    assert_eq!(keys["active_count"], 2, "{keys}");
    assert!(!keys.to_string().contains("ciphertext"), "{keys}");
}

#[test]
fn cleanup_through_the_socket_never_retires_a_key_in_use() {
    let (s, admin) = own_server();
    let first = primary_key(&s);
    assert_eq!(
        put_secret(&s, &admin, "github-token", "ghp_secret_value", "api_key").status,
        201
    );
    rotate_over_http(&s, &admin);
    let c = s.cli_json(&["key-rotation", "--cleanup-expired", "--json"]);
    assert_eq!(c["retired"], json!([]), "{c}");
    assert_eq!(c["kept_in_use"][0]["key_id"], first.as_str(), "{c}");
}

#[test]
fn the_key_ring_and_every_secret_survive_a_restart_after_http_and_cli_rotations() {
    let (mut s, admin) = own_server();
    assert_eq!(
        put_secret(&s, &admin, "github-token", "ghp_secret_value", "api_key").status,
        201
    );
    rotate_over_http(&s, &admin);
    assert_eq!(
        put_secret(&s, &admin, "db-password", "hunter2", "database_password").status,
        201
    );
    // CLI rotation writes a backup into the data dir first.
    let out = s.cli_json(&["key-rotation", "--force", "--reason=cli test", "--json"]);
    assert_eq!(out["rotated"], true, "{out}");
    let backup = out["backup"].as_str().expect("backup");
    assert!(
        backup.starts_with(&s.data_dir.display().to_string()),
        "{backup}"
    );
    let third = out["primary_key_id"].as_str().expect("key").to_string();

    s.restart_with(&[]);
    let keys = s.get("/api/security/encryption/keys", &admin).json();
    assert_eq!(
        (
            keys["active_count"].as_u64(),
            keys["primary_key_id"].as_str()
        ),
        (Some(3), Some(third.as_str())),
        "{keys}"
    );
    assert_eq!(secret_value(&s, &admin, "github-token"), "ghp_secret_value");
    assert_eq!(secret_value(&s, &admin, "db-password"), "hunter2");
}

#[test]
fn a_wrong_master_key_refuses_boot_naming_the_key_id_never_the_key() {
    let mut s = Server::start(Path::new(BIN), &[("ARAGORA_ENCRYPTION_KEY", KEY_A)]);
    let primary = primary_key(&s);
    s.stop();
    let err = s
        .start_once(&[("ARAGORA_ENCRYPTION_KEY", KEY_B)])
        .expect_err("a wrong master key must refuse boot");
    assert!(
        err.stderr.contains(&primary) && err.stderr.contains("ARAGORA_ENCRYPTION_KEY"),
        "{err}"
    );
    assert!(
        !err.stderr.contains(KEY_A) && !err.stderr.contains(KEY_B),
        "{err}"
    );
}

#[test]
fn with_the_server_stopped_the_cli_rotates_on_the_store_and_the_right_key_opens_it() {
    let mut s = Server::start(Path::new(BIN), &[("ARAGORA_ENCRYPTION_KEY", KEY_A)]);
    let primary = primary_key(&s);
    s.stop();
    let out = s.cli_json(&["key-rotation", "--force", "--reason=offline", "--json"]);
    assert_eq!(out["rotated"], true, "{out}");
    let rotated = out["primary_key_id"].as_str().expect("key").to_string();
    assert_ne!(rotated, primary);
    s.restart_with(&[]);
    let h = health(&s);
    assert_eq!(
        (h["active_key_id"].as_str(), h["active_keys"].as_u64()),
        (Some(rotated.as_str()), Some(2)),
        "{h}"
    );
}

#[test]
fn kill_during_a_burst_of_rotations_leaves_every_secret_decryptable() {
    let (mut s, admin) = own_server();
    let written: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for i in 0..10 {
        let (id, v) = (format!("seed-{i}"), format!("seed value {i}"));
        assert_eq!(put_secret(&s, &admin, &id, &v, "token").status, 201);
        written.lock().expect("lock").push((id, v));
    }
    s.stop();
    for round in 0..3 {
        s.start_once(&[]).unwrap_or_else(|e| panic!("{e}"));
        let client = s.client();
        // The kill lands after this many rotations of the round, a different
        // point each round, whatever the machine's speed.
        let kill_after = 3 + 4 * round;
        let rotations = Arc::new(AtomicUsize::new(0));
        let burst = {
            let (admin, written, rotations) = (admin.clone(), written.clone(), rotations.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    let r = client.try_send(
                        &Request::new("POST", "/api/security/encryption/rotate")
                            .bearer(&admin)
                            .json(&json!({"reason": "burst", "force": true})),
                    );
                    match r {
                        Ok(r) if r.status == 200 => {
                            rotations.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                    let (id, v) = (format!("r{round}-{i}"), format!("value {round} {i}"));
                    let r = client.try_send(
                        &Request::new("PUT", &format!("/api/secrets/{id}"))
                            .bearer(&admin)
                            .json(&json!({"value": v, "secret_type": "token"})),
                    );
                    match r {
                        Ok(r) if r.status == 201 => written.lock().expect("lock").push((id, v)),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
        };
        while rotations.load(Ordering::SeqCst) < kill_after && !burst.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        s.kill();
        burst.join().expect("burst thread");
    }
    s.restart_with(&[]);
    let keys = s.get("/api/security/encryption/keys", &admin).json();
    assert!(keys["active_count"].as_u64() >= Some(1), "{keys}");
    let primaries = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["primary"] == true)
        .count();
    assert_eq!(primaries, 1, "{keys}");
    let written = written.lock().expect("lock").clone();
    assert!(written.len() > 10, "the burst wrote secrets");
    for (id, v) in &written {
        assert_eq!(secret_value(&s, &admin, id), v.as_str(), "{id}");
    }
    let audit = s.get("/api/security/audit/verify", &admin).json();
    assert_eq!(audit["ok"], true, "{audit}");
}
