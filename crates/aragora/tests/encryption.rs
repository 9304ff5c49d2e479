//! Encryption over HTTP against the real server: secrets round trip, the key
//! ring survives restarts, rotation keeps old secrets readable, cleanup spares
//! keys in use, a wrong master key refuses boot, and kill -9 during a burst of
//! rotations leaves every secret decryptable.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aragora_testkit::{Request, Response, Server, Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const KEY_A: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
const KEY_B: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";

fn put_secret(s: &Server, token: &str, id: &str, value: &str, ty: &str) -> Response {
    s.send(
        Request::new("PUT", &format!("/api/secrets/{id}"))
            .bearer(token)
            .json(&json!({"value": value, "secret_type": ty})),
    )
}

fn secret_value(s: &Server, token: &str, id: &str) -> Value {
    let r = s.get(&format!("/api/secrets/{id}"), token);
    assert_eq!(r.status, 200, "GET {id}: {}", r.body);
    r.json()["value"].clone()
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

/// `aragora ARGS` with the server's environment plus `overrides`, as a child.
fn spawn(s: &Server, args: &[&str], overrides: &[(&str, &str)]) -> Child {
    let mut cmd = s.command();
    for (k, v) in overrides {
        cmd.env(k, v);
    }
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn aragora")
}

fn wait_healthy(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Request::new("GET", "/api/health").send(port).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("server exited at start: {st}");
        }
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn secrets_round_trip_rotation_cleanup_and_restart() {
    let mut s = Server::start(Path::new(BIN), &[("ARAGORA_ENCRYPTION_KEY", KEY_A)]);
    let (admin_id, admin) = s.bootstrap_admin("admin@example.com");
    s.create_user(
        &admin,
        "viewer@example.com",
        "viewer password 123",
        &["viewer"],
    );
    let viewer = s.login("viewer@example.com", "viewer password 123");

    // Health is anonymous and names the primary key.
    let h = s.send(Request::new("GET", "/api/security/encryption/health"));
    assert_eq!(h.status, 200, "{}", h.body);
    let h = h.json();
    assert_eq!(
        (h["master_key_loaded"].as_bool(), h["active_keys"].as_u64()),
        (Some(true), Some(1)),
        "{h}"
    );
    let first_key = h["active_key_id"].as_str().expect("key id").to_string();

    // Round trip; list is metadata only; RBAC applies.
    let r = put_secret(&s, &admin, "github-token", "ghp_secret_value", "api_key");
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["key_id"], first_key.as_str());
    assert_eq!(secret_value(&s, &admin, "github-token"), "ghp_secret_value");
    let list = s.get("/api/secrets", &admin);
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(list.body.contains("github-token") && !list.body.contains("ghp_secret_value"));
    assert!(!list.body.contains("envelope"), "{}", list.body);
    let r = s.get("/api/secrets/github-token", &viewer);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = s.get("/api/secrets/missing", &admin);
    assert_eq!(r.status, 404, "{}", r.body);

    // Reads are audited with the secret type; stats count decrypts per actor.
    let a = s
        .get(
            "/api/security/audit/search?action=secret_access&minutes=5",
            &admin,
        )
        .json();
    let entry = &a["entries"][0];
    assert_eq!(
        (
            entry["actor"].as_str(),
            entry["details"]["secret_type"].as_str()
        ),
        (Some(admin_id.as_str()), Some("api_key")),
        "{a}"
    );
    let st = s.get("/api/security/encryption/stats", &admin).json();
    assert_eq!(
        st["decrypts_per_actor"][0]["actor"],
        admin_id.as_str(),
        "{st}"
    );
    assert!(st["encrypt_ops"].as_u64() >= Some(1), "{st}");
    assert!(st["derivation_latency_p95"].as_f64().is_some(), "{st}");

    // Rotation over HTTP: old secrets still decrypt, new ones use the new key.
    let r = s.post(
        "/api/security/encryption/rotate",
        &admin,
        &json!({"reason": "test", "force": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let second_key = r.json()["primary_key_id"]
        .as_str()
        .expect("primary")
        .to_string();
    assert_ne!(second_key, first_key);
    assert_eq!(secret_value(&s, &admin, "github-token"), "ghp_secret_value");
    let r = put_secret(&s, &admin, "db-password", "hunter2", "database_password");
    assert_eq!(r.json()["key_id"], second_key.as_str(), "{}", r.body);
    let keys = s.get("/api/security/encryption/keys", &admin).json();
    assert_eq!(keys["active_count"], 2, "{keys}");
    assert!(!keys.to_string().contains("ciphertext"), "{keys}");

    // Cleanup through the running server's socket never retires a key in use.
    let c = cli_json(&s, &["key-rotation", "--cleanup-expired", "--json"]);
    assert_eq!(c["retired"], json!([]), "{c}");
    assert_eq!(c["kept_in_use"][0]["key_id"], first_key.as_str(), "{c}");

    // CLI rotation writes an owner-only backup first.
    let out = cli_json(
        &s,
        &["key-rotation", "--force", "--reason=cli test", "--json"],
    );
    assert_eq!(out["rotated"], true, "{out}");
    let backup = out["backup"].as_str().expect("backup");
    assert!(
        backup.starts_with(&s.data_dir.display().to_string()),
        "{backup}"
    );
    let third_key = out["primary_key_id"].as_str().expect("key").to_string();

    // Restart: the ring (three keys) and every secret survive.
    s.restart_with(&[]);
    let keys = s.get("/api/security/encryption/keys", &admin).json();
    assert_eq!(
        (
            keys["active_count"].as_u64(),
            keys["primary_key_id"].as_str()
        ),
        (Some(3), Some(third_key.as_str())),
        "{keys}"
    );
    assert_eq!(secret_value(&s, &admin, "github-token"), "ghp_secret_value");
    assert_eq!(secret_value(&s, &admin, "db-password"), "hunter2");

    // Delete.
    let r = s.send(Request::new("DELETE", "/api/secrets/github-token").bearer(&admin));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(s.get("/api/secrets/github-token", &admin).status, 404);
}

#[test]
fn wrong_master_key_at_restart_refuses_boot_without_printing_it() {
    let mut s = Server::start(Path::new(BIN), &[("ARAGORA_ENCRYPTION_KEY", KEY_A)]);
    let primary = s
        .send(Request::new("GET", "/api/security/encryption/health"))
        .json()["active_key_id"]
        .as_str()
        .expect("key id")
        .to_string();
    s.stop();
    let child = spawn(&s, &["serve"], &[("ARAGORA_ENCRYPTION_KEY", KEY_B)]);
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong master key must refuse boot");
    assert!(
        stderr.contains(&primary) && stderr.contains("ARAGORA_ENCRYPTION_KEY"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(KEY_A) && !stderr.contains(KEY_B),
        "{stderr}"
    );
    // With the server stopped, the CLI rotates on the store directly.
    let out = cli_json(
        &s,
        &["key-rotation", "--force", "--reason=offline", "--json"],
    );
    assert_eq!(out["rotated"], true, "{out}");
    let rotated = out["primary_key_id"].as_str().expect("key").to_string();
    assert_ne!(rotated, primary);
    // The right key still opens everything.
    s.restart_with(&[]);
    let h = s.send(Request::new("GET", "/api/security/encryption/health"));
    let h = h.json();
    assert_eq!(
        (h["active_key_id"].as_str(), h["active_keys"].as_u64()),
        (Some(rotated.as_str()), Some(2)),
        "{h}"
    );
}

#[test]
fn kill_during_a_burst_of_rotations_leaves_every_secret_decryptable() {
    let mut s = Server::start(Path::new(BIN), &[("ARAGORA_ENCRYPTION_KEY", KEY_A)]);
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    let written: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for i in 0..10 {
        let (id, v) = (format!("seed-{i}"), format!("seed value {i}"));
        assert_eq!(put_secret(&s, &admin, &id, &v, "token").status, 201);
        written.lock().expect("lock").push((id, v));
    }
    s.stop();
    for round in 0..3 {
        let mut child = spawn(&s, &["serve"], &[]);
        wait_healthy(s.port, &mut child);
        let port = s.port;
        let burst = {
            let (admin, written) = (admin.clone(), written.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    let r = Request::new("POST", "/api/security/encryption/rotate")
                        .bearer(&admin)
                        .json(&json!({"reason": "burst", "force": true}))
                        .send(port);
                    if r.is_err() {
                        return;
                    }
                    let (id, v) = (format!("r{round}-{i}"), format!("value {round} {i}"));
                    let r = Request::new("PUT", &format!("/api/secrets/{id}"))
                        .bearer(&admin)
                        .json(&json!({"value": v, "secret_type": "token"}))
                        .send(port);
                    match r {
                        Ok(r) if r.status == 201 => written.lock().expect("lock").push((id, v)),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(400 + 150 * round));
        let _ = Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status();
        let _ = child.wait();
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
