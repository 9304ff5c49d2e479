//! Conformance: runs every ```bash block of our runbook edition
//! (docs/runbooks/aragora-security-operations.md) with bash, curl and jq against
//! the real server, after creating the situation each block investigates (failed
//! logins, denials, a suspicious user, approval requests waiting for decisions
//! and an unauthorized approval attempt). Every block must exit 0 and print
//! something; then the effects the resolution blocks promise are checked.

use std::path::Path;
use std::process::Command;

use aragora_testkit::{Request, Server, json};

const RUNBOOK: &str = "../../docs/runbooks/aragora-security-operations.md";
const PASSWORD: &str = "correct horse battery staple";
/// The master key the test deploys with (the blocks check it is set, and the
/// `aragora` CLI they run gets the server's environment).
const ENCRYPTION_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn bash_blocks(doc: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        let t = line.trim_start();
        if let Some(cur) = current.as_mut() {
            if t.starts_with("```") {
                blocks.push(current.take().unwrap_or_default());
            } else {
                cur.push_str(line);
                cur.push('\n');
            }
        } else if t == "```bash" {
            current = Some(String::new());
        }
    }
    blocks
}

/// A fresh server whose only admin revoked its only API key: nobody can act.
/// Returns it with the dead key.
fn no_admin_can_act(bin: &Path) -> (Server, String) {
    let s = Server::start(bin, &[]);
    let (id, key) = s.bootstrap_admin("admin@example.com");
    let r = s.post(
        &format!("/api/admin/users/{id}/revoke-keys"),
        &key,
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.get("/api/auth/me", &key).status, 401);
    (s, key)
}

fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "the runbook conformance test needs `{name}` on PATH");
}

#[test]
fn runbook_commands_work_against_the_real_server() {
    require_tool("curl");
    require_tool("jq");
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(RUNBOOK))
        .expect("runbook edition");
    let blocks = bash_blocks(&doc);
    assert!(
        blocks.len() >= 35,
        "found only {} bash blocks",
        blocks.len()
    );

    let mut server = Server::start(
        Path::new(env!("CARGO_BIN_EXE_aragora")),
        &[
            ("AUTH_RATE_LIMIT_PER_IP", "1000"),
            ("ARAGORA_ENCRYPTION_KEY", ENCRYPTION_KEY),
        ],
    );
    let (_, admin) = server.bootstrap_admin("admin@example.com");
    // An undecryptable secret (another record's ciphertext: AAD mismatch), for
    // the migration errors Section 6 investigates.
    for id in ["legacy-a", "legacy-b"] {
        let r = server.send(
            Request::new("PUT", &format!("/api/secrets/{id}"))
                .bearer(&admin)
                .json(&json!({"value": format!("value of {id}"), "secret_type": "token"})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    server.stop();
    aragora_testkit::store::copy_secret_envelope(&server, "legacy-b", "legacy-a");
    server.restart_with(&[]);

    // The situation: a viewer probing sensitive endpoints, failed logins against
    // two accounts from one address, a success after failures.
    let mallory = server.create_user(&admin, "mallory@example.com", PASSWORD, &["viewer"]);
    let alice = server.create_user(&admin, "alice@example.com", PASSWORD, &["member"]);
    server.create_user(&admin, "target1@example.com", PASSWORD, &["member"]);
    server.create_user(&admin, "target2@example.com", PASSWORD, &["member"]);
    let mallory_token = server.login("mallory@example.com", PASSWORD);
    let mallory_key = server.post(
        &format!("/api/admin/users/{mallory}/api-keys"),
        &admin,
        &json!({"name": "ci"}),
    );
    assert_eq!(mallory_key.status, 201, "{}", mallory_key.body);
    let mallory_key = mallory_key.json()["token"]
        .as_str()
        .expect("token")
        .to_string();
    for path in [
        "/api/security/audit/search",
        "/api/admin/users",
        "/api/security/rbac/cache/stats",
    ] {
        let r = server.send(
            Request::new("GET", path)
                .bearer(&mallory_token)
                .header("X-Forwarded-For", "198.51.100.7"),
        );
        assert_eq!(r.status, 403, "{path}: {}", r.body);
    }
    for (email, n) in [("target1@example.com", 3), ("target2@example.com", 2)] {
        for _ in 0..n {
            let r = server.send(
                Request::new("POST", "/api/auth/login")
                    .header("X-Forwarded-For", "203.0.113.9")
                    .json(&json!({"email": email, "password": "wrong password!!"})),
            );
            assert_eq!(r.status, 401, "{}", r.body);
        }
    }
    let alice_token = server.login("alice@example.com", PASSWORD);
    // Secrets, read by alice (the secret_access events Section 5 investigates).
    for (id, ty) in [
        ("stripe-live", "api_key"),
        ("orders-db", "database_password"),
    ] {
        // Alice owns what she writes (a member reads only its own secrets
        // unless a role grants a path).
        let r = server.send(
            Request::new("PUT", &format!("/api/secrets/{id}"))
                .bearer(&alice_token)
                .json(&json!({"value": format!("value of {id}"), "secret_type": ty})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        let r = server.get(&format!("/api/secrets/{id}"), &alice_token);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Section 3: an operator's approval requests waiting for decisions (one per
    // decision the runbook shows: they are alternatives), an approver and a
    // security lead to decide them (API keys: they outlive revoke-all), and
    // mallory trying to approve one she may not.
    let operator = server.create_user(&admin, "operator@example.com", PASSWORD, &["operator"]);
    let approver = server.create_user(&admin, "approver@example.com", PASSWORD, &["approver"]);
    let lead = server.create_user(&admin, "lead@example.com", PASSWORD, &["security_lead"]);
    let api_key = |user: &str| {
        let r = server.post(
            &format!("/api/admin/users/{user}/api-keys"),
            &admin,
            &json!({"name": "on-call"}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["token"].as_str().expect("token").to_string()
    };
    let (operator_key, approver_key, lead_key) =
        (api_key(&operator), api_key(&approver), api_key(&lead));
    // The approver has been active (the availability check reads it).
    assert_eq!(server.get("/api/auth/me", &approver_key).status, 200);
    let request_approval = |operation: &str, reason: &str| {
        let r = server.post(
            "/api/security/approvals",
            &operator_key,
            &json!({"operation": operation, "params": {}, "reason": reason}),
        );
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.json()["status"], "pending", "{}", r.body);
        r.json()["approval_id"]
            .as_str()
            .expect("approval_id")
            .to_string()
    };
    let by_admin = request_approval("sessions_revoke_all", "incident INC-12345: stolen sessions");
    let to_approve = request_approval("sessions_revoke_all", "incident INC-12346: stolen sessions");
    let to_reject = request_approval("sessions_revoke_all", "incident INC-12347: stolen sessions");
    let to_bypass = request_approval("master_key_rotation", "master key exposed in a log");
    for (token, why) in [
        (&mallory_token, "not_eligible"),
        (&operator_key, "own_request"),
    ] {
        let r = server.post(
            &format!("/api/security/approvals/{to_approve}/approve"),
            token,
            &json!({"notes": "lgtm"}),
        );
        assert_eq!(r.status, 403, "{why}: {}", r.body);
    }
    let approval_of = |block: &str| {
        if block.contains("bypass_checklist") {
            &by_admin
        } else if block.contains("/reject") {
            &to_reject
        } else if block.contains("/emergency-bypass") {
            &to_bypass
        } else {
            &to_approve
        }
    };

    // Section 3's investigation checks below, each of which must meet its block.
    let mut approval_checks = std::collections::BTreeSet::new();

    // `aragora ...` in a block runs the binary under test with the server's env.
    let bin_dir = server.bin.parent().expect("binary dir").to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    for (i, block) in blocks.iter().enumerate() {
        // Break-glass recovery is for when no admin can act: that block runs
        // against a second server in that state (the main one keeps its admin).
        let locked_out = block
            .contains("aragora admin recover")
            .then(|| no_admin_can_act(&server.bin));
        let (target, token) = match &locked_out {
            Some((s, dead_key)) => (s, dead_key.as_str()),
            None => (&server, admin.as_str()),
        };
        let script = block.replace("localhost:8080", &format!("127.0.0.1:{}", target.port));
        let out = Command::new("bash")
            .args(["-c", &format!("set -euo pipefail\n{script}")])
            .env("ADMIN_TOKEN", token)
            .env("USER_ID", &mallory)
            .env("ACTOR_ID", &mallory)
            .env("APPROVAL_ID", approval_of(block))
            .env("APPROVER_TOKEN", &approver_key)
            .env("SECURITY_LEAD_TOKEN", &lead_key)
            .env("PATH", &path)
            .env("ARAGORA_DATA_DIR", &target.data_dir)
            .envs(target.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("bash");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !stdout.trim().is_empty(),
            "runbook block {i} failed ({}):\n{block}\n--- stdout:\n{stdout}\n--- stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // What the investigation blocks must find in this situation.
        if block.contains("group_by(.user_id)") {
            assert!(
                stdout.contains(&mallory),
                "denials by user name mallory:\n{stdout}"
            );
        }
        if block.contains("group_by(.details.email)") {
            assert!(
                stdout.contains("target1@example.com"),
                "targeted accounts:\n{stdout}"
            );
        }
        if block.contains("action=login_success") {
            assert!(
                stdout.contains(&alice)
                    && stdout.contains("alice@example.com")
                    && stdout.contains("\"ip\": \"127."),
                "successful logins name alice by id and email, with the address:\n{stdout}"
            );
        }
        if block.contains("action=secret_access") {
            assert!(
                stdout.contains(&alice) && stdout.contains("database_password"),
                "secret readers name alice and the secret types:\n{stdout}"
            );
        }
        if block.contains("--skip-record") || block.contains(".failed_records | .[0:10]") {
            assert!(stdout.contains("legacy-a"), "the corrupt record:\n{stdout}");
        }
        if block.contains("migration --store=all --dry-run") {
            assert!(
                stdout.contains("would be rewrapped") && stdout.contains("1 failed"),
                "{stdout}"
            );
        }
        if block.contains("--secrets-accessed-by") {
            assert!(stdout.contains(&mallory), "{stdout}");
        }
        if block.contains("master-key rotate --dry-run") {
            assert!(
                stdout.contains("dry run") && stdout.contains("master key fingerprint"),
                "{stdout}"
            );
        }
        if block.contains("key-rotation --force") {
            assert!(stdout.contains("rotated"), "{stdout}");
        }
        if locked_out.is_some() {
            assert!(
                stdout.contains("oncall@example.com")
                    && stdout.contains("\"admin\"")
                    && stdout.contains("critical"),
                "the recovered admin acts and the recovery is audited:\n{stdout}"
            );
        }
        if block.contains("{id, operation, risk_level, requested_at, requester_id}") {
            approval_checks.insert("{id, operation, risk_level, requested_at, requester_id}");
            for id in [&by_admin, &to_approve, &to_reject, &to_bypass, &operator] {
                assert!(
                    stdout.contains(id.as_str()),
                    "pending lists {id}:\n{stdout}"
                );
            }
            // The queue age: numbers, not null (requested_at parsed by fromdateiso8601).
            assert!(
                stdout.contains("\"oldest_minutes\": ") && !stdout.contains("null"),
                "queue age and the approver's last activity:\n{stdout}"
            );
            // The approver availability check: the one approver, active.
            let active: Vec<&str> = stdout
                .lines()
                .filter(|l| l.starts_with("\"20") && l.ends_with("Z\""))
                .collect();
            assert_eq!(active.len(), 1, "approvers' last_active_at:\n{stdout}");
        }
        if block.contains("risk_level=critical") {
            approval_checks.insert("risk_level=critical");
            for id in [&to_approve, &to_reject, &to_bypass] {
                assert!(
                    stdout.contains(id.as_str()),
                    "critical pending lists {id}:\n{stdout}"
                );
            }
            assert!(
                !stdout.contains(by_admin.as_str()),
                "the request the admin approved is no longer pending:\n{stdout}"
            );
            assert!(
                stdout.contains("approver@example.com")
                    && stdout.contains("lead@example.com")
                    && !stdout.contains("operator@example.com"),
                "eligible approvers, never the requester:\n{stdout}"
            );
        }
        if block.contains("action=unauthorized_approval") {
            approval_checks.insert("action=unauthorized_approval");
            assert!(
                stdout.contains(&mallory)
                    && stdout.contains(&to_approve)
                    && stdout.contains("not_eligible")
                    && stdout.contains(&operator)
                    && stdout.contains("own_request")
                    && stdout.contains("\"ip\": \"")
                    && !stdout.contains("\"ip\": null"),
                "the refused attempts with their address and details:\n{stdout}"
            );
        }
        if block.contains("{permission, role, count}") {
            assert!(
                stdout.contains("audit.read") && stdout.contains("viewer"),
                "{stdout}"
            );
        }
    }

    assert_eq!(
        approval_checks.len(),
        3,
        "Section 3 blocks checked: {approval_checks:?}"
    );
    // Section 3's decisions took effect, each recorded as the runbook says.
    let approval = |id: &str| {
        let r = server.get(&format!("/api/security/approvals/{id}"), &admin);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    // Approved, or past approval (running or run) once execution picks it up.
    let approved = |v: &aragora_testkit::Value| {
        matches!(
            v["status"].as_str(),
            Some("approved" | "executing" | "executed" | "failed" | "refused")
        )
    };
    let r = approval(&by_admin);
    let d = &r["decisions"][0];
    assert!(approved(&r), "{r}");
    assert_eq!(
        (&d["kind"], &d["bypass_checklist"], &d["reason"]),
        (
            &json!("approve"),
            &json!(true),
            &json!("Emergency override per runbook")
        ),
        "{r}"
    );
    let r = approval(&to_approve);
    let d = &r["decisions"][0];
    assert!(approved(&r), "{r}");
    assert_eq!(d["approver_id"], approver.as_str(), "{r}");
    assert_eq!(d["notes"], "Approved per escalation procedure", "{r}");
    assert_eq!(d["checklist_confirmed"], r["checklist"], "{r}");
    let r = approval(&to_reject);
    assert_eq!(r["status"], "rejected", "{r}");
    assert_eq!(
        r["decisions"][0]["reason"], "Operation timed out, user should retry",
        "{r}"
    );
    let r = approval(&to_bypass);
    let d = &r["decisions"][0];
    assert!(approved(&r), "bypassed without the two approvals: {r}");
    assert_eq!(
        (&d["kind"], &d["approver_id"], &d["incident_id"]),
        (
            &json!("emergency_bypass"),
            &json!(lead),
            &json!("INC-12345")
        ),
        "{r}"
    );
    let bypasses = server.audit(&admin, "approval_emergency_bypass");
    assert!(
        bypasses
            .iter()
            .any(|e| e["details"]["approval_id"] == to_bypass.as_str()
                && e["details"]["severity"] == "critical"),
        "{bypasses:?}"
    );
    assert!(
        server.metric("aragora_approval_unauthorized_attempts_total") >= 2.0,
        "the refused attempts are counted"
    );

    // The resolutions took effect: mallory's keys were revoked and the account
    // disabled, the IPs are blocked, the targets are locked, every session revoked.
    let r = server.get("/api/auth/me", &mallory_key);
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (401, Some("revoked")),
        "{}",
        r.body
    );
    let user = server
        .get(&format!("/api/admin/users/{mallory}"), &admin)
        .json();
    assert_eq!(user["disabled"], true, "{user}");
    let blocked = server.get("/api/admin/ratelimit/blocks", &admin).json();
    for ip in ["1.2.3.4", "5.6.7.8"] {
        assert!(
            blocked["blocks"]
                .as_array()
                .is_some_and(|b| b.iter().any(|x| x["ip"] == ip)),
            "{blocked}"
        );
    }
    let r = server.send(
        Request::new("GET", "/api/auth/me")
            .bearer(&admin)
            .header("X-Forwarded-For", "1.2.3.4"),
    );
    assert_eq!(r.status, 403, "blocked IP: {}", r.body);
    let r = server.send(
        Request::new("POST", "/api/auth/login")
            .json(&json!({"email": "target1@example.com", "password": PASSWORD})),
    );
    assert_eq!(r.status, 401, "bulk-locked account: {}", r.body);
    let r = server.get("/api/auth/me", &alice_token);
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (401, Some("revoked")),
        "after revoke-all: {}",
        r.body
    );
    let r = server.get("/api/auth/me", &admin);
    assert_eq!(r.status, 200, "API keys survive revoke-all: {}", r.body);
    // The emergency rotation happened and every secret still decrypts.
    let keys = server.get("/api/security/encryption/keys", &admin).json();
    assert!(keys["active_count"].as_u64() >= Some(2), "{keys}");
    for id in ["stripe-live", "orders-db"] {
        let r = server.get(&format!("/api/secrets/{id}"), &admin);
        assert_eq!(r.json()["value"], format!("value of {id}"), "{}", r.body);
    }
    // Section 6 skipped the corrupt record; everything else was migrated.
    let status = server.get("/api/security/migration/status", &admin).json();
    assert_eq!(status["skipped_records"][0], "legacy-a", "{status}");
    assert_eq!(status["failed"], 0, "{status}");
    let audit = server.get("/api/security/audit/verify", &admin).json();
    assert_eq!(
        audit["ok"], true,
        "audit chain after the whole runbook: {audit}"
    );
}
