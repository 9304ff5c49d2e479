//! Master-key rotation (issue #16 item 5) against the real server in
//! production mode, as the runbook's Emergency Key Recovery does it: secrets
//! written under master key A; the server restarted with
//! ARAGORA_ENCRYPTION_KEY=B and ARAGORA_ENCRYPTION_KEY_PREVIOUS=A still
//! serves them; `aragora master-key rotate` rewraps the key ring (through the
//! control socket, audited, executing an approved master_key_rotation request;
//! rerun with the server stopped as the owner path); restarted with B alone,
//! every secret reads back.

use std::path::Path;

use aragora_testkit::{Server, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const KEY_A: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
const KEY_B: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";
const JWT: &str = "a-production-jwt-secret-of-at-least-32-characters";

fn start(key: &str) -> Server {
    let env = [
        ("ARAGORA_ENV", "production".to_string()),
        ("AEDB_MANIFEST_KEY", "2b".repeat(32)),
        ("AEDB_CHECKPOINT_KEY", "3c".repeat(32)),
        ("JWT_SECRET", JWT.to_string()),
        ("ARAGORA_ENCRYPTION_KEY", key.to_string()),
    ];
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start(Path::new(BIN), &extra)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn read_back(s: &Server, token: &str, written: &[(&str, &str)]) {
    for (id, value) in written {
        let r = s.get(&format!("/api/secrets/{id}"), token);
        assert_eq!(r.status, 200, "{id}: {}", r.body);
        assert_eq!(r.json()["value"], *value, "{id}");
    }
}

fn health(s: &Server) -> aragora_testkit::Value {
    let r = s.send(aragora_testkit::Request::new(
        "GET",
        "/api/security/encryption/health",
    ));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn a_new_master_key_with_the_previous_one_rewraps_the_ring_and_then_stands_alone() {
    let mut s = start(KEY_A);
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    let written = [("db/password", "hunter2"), ("team-a/token", "ghp_x")];
    let put = |s: &Server, (id, value): (&str, &str)| {
        let r = s.put(
            &format!("/api/secrets/{id}"),
            &admin,
            &json!({"value": value, "secret_type": "password"}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    };
    put(&s, written[0]);
    // Two data keys in the ring: both must be rewrapped.
    let r = s.post(
        "/api/security/encryption/rotate",
        &admin,
        &json!({"reason": "two data keys", "force": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    put(&s, written[1]);

    // The new key, with the old one as the previous: the ring opens.
    s.restart_with(&[
        ("ARAGORA_ENCRYPTION_KEY", KEY_B),
        ("ARAGORA_ENCRYPTION_KEY_PREVIOUS", KEY_A),
    ]);
    assert_eq!(health(&s)["master_key_loaded"], true);
    read_back(&s, &admin, &written);

    // A pending approval is not one to execute.
    let r = s.post(
        "/api/security/approvals",
        &admin,
        &json!({"operation": "master_key_rotation", "params": {}, "reason": "new master key"}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let pending = r.json()["approval_id"]
        .as_str()
        .expect("approval_id")
        .to_string();
    let out = s.cli(&["master-key", "rotate", "--approval", &pending]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("not approved"),
        "{}",
        text(&out.stderr)
    );

    let dry = s.cli_json(&["master-key", "rotate", "--dry-run", "--json"]);
    assert_eq!(
        (dry["dry_run"].as_bool(), dry["rewrapped"].as_u64()),
        (Some(true), Some(2)),
        "{dry}"
    );
    assert!(s.audit(&admin, "master_key_rotated").is_empty());

    // Approved (a security lead's emergency bypass): the run executes it.
    s.create_user(
        &admin,
        "lead@example.com",
        "a long passphrase",
        &["security_lead"],
    );
    let lead = s.login("lead@example.com", "a long passphrase");
    let r = s.post(
        &format!("/api/security/approvals/{pending}/emergency-bypass"),
        &lead,
        &json!({"reason": "master key exposed", "incident_id": "INC-7"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let out = s.cli(&["master-key", "rotate", "--approval", &pending]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("2 key record(s) rewrapped"), "{shown}");
    assert!(shown.contains("key-ring backup:"), "{shown}");
    assert!(shown.contains(&pending), "{shown}");
    assert!(!shown.contains(KEY_B) && !s.stderr().contains(KEY_B));
    let r = s.get(&format!("/api/security/approvals/{pending}"), &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "executed", "{}", r.body);
    // Executed once.
    let out = s.cli(&["master-key", "rotate", "--approval", &pending]);
    assert!(!out.status.success(), "{}", text(&out.stdout));

    let done = s.audit(&admin, "master_key_rotated");
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0]["details"]["rewrapped"], 2, "{done:?}");
    assert_eq!(
        done[0]["details"]["approval_id"],
        pending.as_str(),
        "{done:?}"
    );
    read_back(&s, &admin, &written);

    // Rerun with the server stopped (the CLI opens the store): nothing left.
    s.stop();
    let out = s.cli(&["master-key", "rotate", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again: aragora_testkit::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (
            again["rewrapped"].as_u64(),
            again["already_current"].as_u64()
        ),
        (Some(0), Some(2)),
        "{again}"
    );

    // B alone from now on.
    s.restart_with(&[("ARAGORA_ENCRYPTION_KEY_PREVIOUS", "")]);
    // The stopped-server rerun had no approval: the owner path, on record.
    let skipped = s.audit(&admin, "approval_gate_skipped");
    assert!(
        skipped
            .iter()
            .any(|e| e["details"]["operation"] == "master_key_rotation"
                && e["details"]["severity"] == "critical"
                && e["details"]["via"] == "direct"),
        "{skipped:?}"
    );
    assert_eq!(s.audit(&admin, "master_key_rotated").len(), 2);
    let h = health(&s);
    assert_eq!(
        (h["master_key_loaded"].as_bool(), h["sealed"].as_bool()),
        (Some(true), Some(false)),
        "{h}"
    );
    read_back(&s, &admin, &written);
}
