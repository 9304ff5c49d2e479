//! Gated calls and the execution of approved requests, against the real
//! `aragora serve` binary: who gets 202 and who runs at once, each risk level
//! from request to result, exactly once under concurrent approvals and across
//! a crash before and after the operation ran, and a requester who lost the
//! authority meanwhile. Each test starts its own server: they count keys and
//! revoke sessions, which must not be raced by another test.
//!
//! Every actor uses an API key (they survive the revoke-all a test runs).

use std::path::Path;
use std::time::{Duration, Instant};

use aragora_testkit::{Request, Server, Value, json};

const PASSWORD: &str = "correct horse battery staple";

struct World {
    server: Server,
    admin: String,
    operator: String,
    operator_id: String,
    approver: String,
    approver2: String,
    lead: String,
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_aragora"))
}

/// A user with `roles` and an API key: (id, key).
fn user(server: &Server, admin: &str, email: &str, roles: &[&str]) -> (String, String) {
    let id = server.create_user(admin, email, PASSWORD, roles);
    let r = server.post(
        &format!("/api/admin/users/{id}/api-keys"),
        admin,
        &json!({"name": "test"}),
    );
    assert_eq!(r.status, 201, "api key for {email}: {}", r.body);
    (id, r.json()["token"].as_str().expect("token").to_string())
}

fn world_with(env: &[(&str, &str)]) -> World {
    let server = Server::start(bin(), env);
    let (_, admin) = server.bootstrap_admin("admin@example.com");
    let (operator_id, operator) = user(&server, &admin, "op@example.com", &["operator"]);
    let (_, approver) = user(&server, &admin, "ap@example.com", &["approver"]);
    let (_, approver2) = user(&server, &admin, "ap2@example.com", &["approver"]);
    let (_, lead) = user(&server, &admin, "lead@example.com", &["security_lead"]);
    World {
        server,
        admin,
        operator,
        operator_id,
        approver,
        approver2,
        lead,
    }
}

fn world() -> World {
    world_with(&[])
}

/// A user who manages users and may hand out the `approver` role (a custom
/// role: no built-in role but admin holds `users.manage`): its privileged
/// grants wait for approval. Returns its API key.
fn user_manager(w: &World) -> String {
    let r = w.server.post(
        "/api/admin/roles",
        &w.admin,
        &json!({"name": "user_admin", "description": "manages users", "permissions": [
            "self.read", "self.api_keys", "users.read", "users.manage",
            "approvals.read", "approvals.approve"]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    user(&w.server, &w.admin, "mgr@example.com", &["user_admin"]).1
}

/// A 202 body of a gated call: `{approval_id, status, operation, risk_level, expires_at}`.
fn accepted(r: &aragora_testkit::Response, operation: &str, risk: &str) -> String {
    assert_eq!(r.status, 202, "{operation} waits for approval: {}", r.body);
    let v = r.json();
    assert_eq!(v["operation"], operation, "{v}");
    assert_eq!(v["risk_level"], risk, "{v}");
    assert!(
        ["pending", "approved"].contains(&v["status"].as_str().unwrap_or("")),
        "{v}"
    );
    let expires = v["expires_at"].as_str().expect("expires_at");
    assert!(expires.len() == 20 && expires.ends_with('Z'), "{expires}");
    v["approval_id"].as_str().expect("approval_id").to_string()
}

fn get(w: &World, id: &str) -> Value {
    let r = w
        .server
        .get(&format!("/api/security/approvals/{id}"), &w.admin);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn approve_body(w: &World, id: &str) -> Value {
    json!({"notes": "reviewed", "checklist_confirmed": get(w, id)["checklist"]})
}

fn approve(w: &World, token: &str, id: &str) {
    let r = w.server.post(
        &format!("/api/security/approvals/{id}/approve"),
        token,
        &approve_body(w, id),
    );
    assert_eq!(r.status, 200, "approve: {}", r.body);
}

/// Waits (generously: the machine may be loaded) until the request reaches a
/// final status; returns it.
fn settled(w: &World, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = get(w, id);
        let status = r["status"].as_str().unwrap_or("").to_string();
        if ["executed", "failed", "refused"].contains(&status.as_str()) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "request {id} still {status}: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn key_count(w: &World) -> u64 {
    let keys = w
        .server
        .get("/api/security/encryption/keys", &w.admin)
        .json();
    keys["keys"].as_array().expect("keys").len() as u64
}

#[test]
fn gated_calls_answer_202_for_everyone_but_the_admin() {
    let w = world();
    let rotation = rotation_requested(&w, &w.operator, "quarterly");
    assert_eq!(get(&w, &rotation)["params"], json!({"force": true}));
    assert_eq!(get(&w, &rotation)["reason"], "quarterly");

    let r = w
        .server
        .post("/api/admin/sessions/revoke-all", &w.operator, &json!({}));
    accepted(&r, "sessions_revoke_all", "critical");
    let r = w.server.post(
        "/api/security/migration/run",
        &w.operator,
        &json!({"store": "all"}),
    );
    accepted(&r, "migration_run", "medium");
    let r = w.server.post(
        "/api/security/migration/run",
        &w.operator,
        &json!({"store": "all", "dry_run": true}),
    );
    assert_eq!(r.status, 200, "a dry run is not gated: {}", r.body);

    // Privileged grants wait; ordinary ones do not.
    let (target, _) = user(&w.server, &w.admin, "t@example.com", &["viewer"]);
    let manager = user_manager(&w);
    let r = w.server.post(
        &format!("/api/admin/users/{target}/roles"),
        &manager,
        &json!({"role": "approver", "reason": "on-call rota"}),
    );
    accepted(&r, "privileged_role_grant", "high");
    let roles = w
        .server
        .get(&format!("/api/admin/users/{target}"), &w.admin)
        .json()["roles"]
        .clone();
    assert_eq!(roles, json!(["viewer"]), "nothing granted yet");

    // The requester's authority is checked when asking: an operator cannot
    // ask to hand out approvals.approve, which it does not hold.
    let r = w.server.post(
        "/api/security/approvals",
        &w.operator,
        &json!({"operation": "privileged_role_grant", "params": {"user_id": target, "role": "approver"}, "reason": "x"}),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let r = w.server.post(
        "/api/security/approvals",
        &w.operator,
        &json!({"operation": "migration_run", "params": {}, "reason": "x"}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("store"),
        "names the missing field: {}",
        r.body
    );

    // The admin runs at once, audited as a skipped gate.
    let before = key_count(&w);
    let r = w.server.post(
        "/api/security/encryption/rotate",
        &w.admin,
        &json!({"reason": "admin rotation", "force": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["rotated"], true, "{}", r.body);
    assert_eq!(key_count(&w), before + 1);
    let rows = w.server.audit(&w.admin, "approval_gate_skipped");
    assert!(
        rows.iter()
            .any(|e| e["details"]["operation"] == "key_rotation"
                && e["details"]["severity"] == "critical"),
        "{rows:?}"
    );
    // A viewer has neither the permission nor approvals.request.
    let (_, viewer) = user(&w.server, &w.admin, "v@example.com", &["viewer"]);
    let r = w
        .server
        .post("/api/admin/sessions/revoke-all", &viewer, &json!({}));
    assert_eq!(r.status, 403, "{}", r.body);
}

#[test]
fn an_approved_rotation_runs_once_as_the_requester_with_its_result() {
    let w = world();
    let before = key_count(&w);
    let id = rotation_requested(&w, &w.operator, "quarterly");
    assert_eq!(key_count(&w), before, "nothing runs before approval");

    // Six approvals at once (three approvers, twice each): one wins.
    let body = approve_body(&w, &id);
    let handles: Vec<_> = [&w.approver, &w.approver2, &w.lead]
        .into_iter()
        .flat_map(|t| [t.clone(), t.clone()])
        .map(|token| {
            let client = w.server.client();
            let path = format!("/api/security/approvals/{id}/approve");
            let body = body.clone();
            std::thread::spawn(move || {
                client
                    .send(Request::new("POST", &path).bearer(&token).json(&body))
                    .status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
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

    let done = settled(&w, &id);
    assert_eq!(done["status"], "executed", "{done}");
    let result = &done["execution"]["result"];
    assert_eq!(result["rotated"], true, "{done}");
    assert_eq!(key_count(&w), before + 1, "rotated exactly once");
    let primary = w
        .server
        .get("/api/security/encryption/keys", &w.admin)
        .json()["primary_key_id"]
        .clone();
    assert_eq!(result["primary_key_id"], primary);

    // Through the jobs service, as the requester.
    let job_id = done["execution"]["job_id"].as_str().expect("job_id");
    let job = w
        .server
        .get(&format!("/api/security/jobs/{job_id}"), &w.admin)
        .json();
    assert_eq!(job["kind"], "approved_operation", "{job}");
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["approval_id"], id.as_str());
    assert_eq!(job["actor"], w.operator_id.as_str());
    let rows = w.server.audit(&w.admin, "key_rotated");
    assert!(
        rows.iter().any(|e| e["actor"] == w.operator_id.as_str()),
        "the rotation is the requester's: {rows:?}"
    );
    let rows = w.server.audit(&w.admin, "approval_executed");
    assert!(
        rows.iter()
            .any(|e| e["details"]["approval_id"] == id.as_str())
    );
    // A decided request cannot run again: approving it now is a conflict.
    let r = w.server.post(
        &format!("/api/security/approvals/{id}/approve"),
        &w.approver2,
        &body,
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(key_count(&w), before + 1);
    assert_eq!(
        w.server.metric(
            "aragora_approval_requests_total{operation=\"key_rotation\",outcome=\"executed\",risk_level=\"high\"}"
        ),
        1.0
    );
}

#[test]
fn a_requester_who_lost_the_authority_meanwhile_is_refused_at_execution() {
    let w = world();
    let (op2_id, op2) = user(&w.server, &w.admin, "op2@example.com", &["operator"]);
    let before = key_count(&w);
    let id = rotation_requested(&w, &op2, "rotation");
    let r = w.server.post(
        &format!("/api/admin/users/{op2_id}/disable"),
        &w.admin,
        &json!({"reason": "left the team"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    approve(&w, &w.approver, &id);
    let done = settled(&w, &id);
    assert_eq!(done["status"], "refused", "{done}");
    assert!(
        done["execution"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&op2_id)),
        "{done}"
    );
    assert_eq!(key_count(&w), before, "nothing ran");
    let rows = w.server.audit(&w.admin, "approval_execution_refused");
    assert!(
        rows.iter()
            .any(|e| e["details"]["approval_id"] == id.as_str())
    );

    // Stripped of the role instead of disabled: refused as well.
    let (op3_id, op3) = user(&w.server, &w.admin, "op3@example.com", &["operator"]);
    let id = rotation_requested(&w, &op3, "rotation");
    let r = w.server.send(
        Request::new(
            "DELETE",
            &format!("/api/admin/users/{op3_id}/roles/operator"),
        )
        .bearer(&w.admin),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    approve(&w, &w.approver, &id);
    assert_eq!(settled(&w, &id)["status"], "refused");
    assert_eq!(key_count(&w), before);
}

#[test]
fn each_risk_level_runs_from_request_to_result() {
    let w = world();
    // low: removing an IP block.
    let r = w.server.post(
        "/api/admin/ratelimit/block",
        &w.admin,
        &json!({"ip": "203.0.113.50", "duration": "1h", "reason": "test"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = w
        .server
        .delete("/api/admin/ratelimit/blocks/203.0.113.50", &w.lead);
    let low = accepted(&r, "ip_unblock", "low");
    assert_eq!(
        get(&w, &low)["status"],
        "pending",
        "no auto-approval by default"
    );
    approve(&w, &w.approver, &low);
    assert_eq!(settled(&w, &low)["status"], "executed");
    let blocks = w.server.get("/api/admin/ratelimit/blocks", &w.admin).json();
    assert!(
        !blocks["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .any(|b| b["ip"] == "203.0.113.50"),
        "{blocks}"
    );

    // medium: a migration, through the jobs service.
    let r = w.server.post(
        "/api/security/migration/run",
        &w.operator,
        &json!({"store": "all"}),
    );
    let medium = accepted(&r, "migration_run", "medium");
    approve(&w, &w.approver, &medium);
    let done = settled(&w, &medium);
    assert_eq!(done["status"], "executed", "{done}");
    assert_eq!(done["execution"]["result"]["state"], "completed", "{done}");

    // high: a privileged role grant asked by a user manager.
    let (target, _) = user(&w.server, &w.admin, "t@example.com", &["viewer"]);
    let manager = user_manager(&w);
    let r = w.server.post(
        &format!("/api/admin/users/{target}/roles"),
        &manager,
        &json!({"role": "approver"}),
    );
    let high = accepted(&r, "privileged_role_grant", "high");
    approve(&w, &w.approver, &high);
    assert_eq!(settled(&w, &high)["status"], "executed");
    let roles = w
        .server
        .get(&format!("/api/admin/users/{target}"), &w.admin)
        .json()["roles"]
        .clone();
    assert!(
        roles
            .as_array()
            .is_some_and(|r| r.contains(&json!("approver"))),
        "{roles}"
    );

    // critical: revoke every session; a session from before stops working.
    let jwt = w.server.login("t@example.com", PASSWORD);
    assert_eq!(w.server.get("/api/auth/me", &jwt).status, 200);
    let r = w.server.post(
        "/api/admin/sessions/revoke-all",
        &w.operator,
        &json!({"reason": "breach"}),
    );
    let critical = accepted(&r, "sessions_revoke_all", "critical");
    assert_eq!(w.server.get("/api/auth/me", &jwt).status, 200, "not yet");
    approve(&w, &w.approver, &critical);
    assert_eq!(settled(&w, &critical)["status"], "executed");
    let r = w.server.get("/api/auth/me", &jwt);
    assert_eq!(r.status, 401, "revoked: {}", r.body);

    // Rejected and expired requests never run (expiry: approvals.rs).
    let rejected = rotation_requested(&w, &w.operator, "not needed");
    let before = key_count(&w);
    let r = w.server.post(
        &format!("/api/security/approvals/{rejected}/reject"),
        &w.approver,
        &json!({"reason": "not needed"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(&w, &rejected)["execution"], Value::Null);
    assert_eq!(key_count(&w), before);
}

#[test]
fn low_risk_requests_auto_approve_when_configured() {
    let w = world_with(&[("APPROVAL_AUTO_APPROVE_LOW", "true")]);
    let r = w.server.post(
        "/api/admin/ratelimit/block",
        &w.admin,
        &json!({"ip": "203.0.113.51", "duration": "1h", "reason": "test"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = w
        .server
        .delete("/api/admin/ratelimit/blocks/203.0.113.51", &w.lead);
    let id = accepted(&r, "ip_unblock", "low");
    assert_eq!(r.json()["status"], "approved", "{}", r.body);
    assert_eq!(settled(&w, &id)["status"], "executed");
    // Higher risks still wait.
    let high = rotation_requested(&w, &w.operator, "quarterly");
    assert_eq!(get(&w, &high)["status"], "pending");
}

/// `POST .../encryption/rotate` by a non-admin: the approval request's id.
fn rotation_requested(w: &World, token: &str, reason: &str) -> String {
    let r = w.server.post(
        "/api/security/encryption/rotate",
        token,
        &json!({"reason": reason, "force": true}),
    );
    accepted(&r, "key_rotation", "high")
}

/// Approves `id` on a server that is about to abort: the response may not
/// come back.
fn approve_expecting_a_crash(w: &World, id: &str) {
    let _ = w.server.client().try_send(
        &Request::new("POST", &format!("/api/security/approvals/{id}/approve"))
            .bearer(&w.approver)
            .json(&approve_body(w, id)),
    );
}

/// An operator's rotation approved on a server that aborts at `point`
/// (`ARAGORA_TEST_APPROVAL_CRASH`), restarted without the fault; returns the
/// request once settled and the key count from before.
fn rotation_across_a_crash_at(point: &str) -> (World, Value, u64) {
    let mut w = world_with(&[("ARAGORA_TEST_APPROVAL_CRASH", point)]);
    let before = key_count(&w);
    let id = rotation_requested(&w, &w.operator, "quarterly");
    approve_expecting_a_crash(&w, &id);
    let status = w.server.wait();
    assert!(status.is_some_and(|s| !s.success()), "aborted: {status:?}");
    w.server
        .restart_with(&[("ARAGORA_TEST_APPROVAL_CRASH", "")]);
    let done = settled(&w, &id);
    (w, done, before)
}

#[test]
fn a_crash_between_approval_and_execution_runs_it_once_after_the_restart() {
    let (w, done, before) = rotation_across_a_crash_at("before_execution");
    assert_eq!(done["status"], "executed", "{done}");
    assert_eq!(key_count(&w), before + 1, "once");
}

#[test]
fn a_crash_after_the_operation_ran_records_it_without_running_it_again() {
    let (w, done, before) = rotation_across_a_crash_at("after_job");
    assert_eq!(done["status"], "executed", "{done}");
    assert_eq!(done["execution"]["takeovers"], 1, "{done}");
    assert_eq!(done["execution"]["result"]["rotated"], true, "{done}");
    assert_eq!(key_count(&w), before + 1, "not rotated a second time");
}

#[test]
fn an_approved_secret_export_is_downloaded_by_its_requester_only() {
    let w = world();
    let (_, member) = user(&w.server, &w.admin, "m@example.com", &["member"]);
    for id in ["exp-a", "exp-b"] {
        let r = w.server.put(
            &format!("/api/secrets/{id}"),
            &member,
            &json!({"value": format!("value of {id}"), "secret_type": "api_key"}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = w.server.post(
        "/api/security/secrets/export",
        &member,
        &json!({"ids": ["exp-a", "exp-b"], "reason": "move to the new vault"}),
    );
    let id = accepted(&r, "secret_export", "high");
    assert!(!r.body.contains("value of"), "no value before approval");
    let download = format!("/api/security/approvals/{id}/export");
    let r = w.server.get(&download, &member);
    assert_eq!(r.status, 409, "not yet approved: {}", r.body);
    approve(&w, &w.approver, &id);
    let done = settled(&w, &id);
    assert_eq!(done["status"], "executed", "{done}");
    assert!(
        !done.to_string().contains("value of"),
        "the request stores no value: {done}"
    );
    let r = w.server.get(&download, &w.approver);
    assert_eq!(r.status, 403, "only the requester: {}", r.body);
    let r = w.server.get(&download, &member);
    assert_eq!(r.status, 200, "{}", r.body);
    let got = r.json();
    assert_eq!(got["secrets"][0]["value"], "value of exp-a", "{got}");
    assert_eq!(got["secrets"][1]["value"], "value of exp-b", "{got}");
    let reads = w.server.audit(&w.admin, "secret_access");
    assert!(reads.len() >= 2, "each read audited: {reads:?}");
    let r = w.server.post(
        "/api/security/secrets/export",
        &member,
        &json!({"ids": [], "reason": "x"}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn timeouts_come_from_the_environment_and_bad_ones_stop_boot() {
    let w = world_with(&[("APPROVAL_TIMEOUT_KEY_ROTATION", "7200")]);
    let id = rotation_requested(&w, &w.operator, "quarterly");
    let rq = get(&w, &id);
    let secs = |field: &str| {
        let t = rq[field].as_str().expect(field);
        // YYYY-MM-DDTHH:MM:SSZ: same day in this test, so compare seconds of day.
        let hms: Vec<i64> = t[11..19]
            .split(':')
            .map(|x| x.parse().expect("number"))
            .collect();
        (t[..10].to_string(), hms[0] * 3600 + hms[1] * 60 + hms[2])
    };
    let (day_a, at) = secs("requested_at");
    let (day_b, until) = secs("expires_at");
    let span = if day_a == day_b {
        until - at
    } else {
        until + 86_400 - at
    };
    assert_eq!(span, 7200, "{rq}");
    let e =
        Server::try_start(bin(), &[("APPROVAL_TIMEOUT_KEY_ROTATION", "2h")]).expect_err("refused");
    assert!(
        e.to_string().contains("APPROVAL_TIMEOUT_KEY_ROTATION"),
        "{e}"
    );
}

/// An approved rotation left for a server that comes back sealed (no master
/// key) waits, still approved, instead of failing; `aragora unseal` lets the
/// next pass run it once.
#[test]
fn an_approved_rotation_waits_for_a_sealed_ring_and_runs_after_unseal() {
    const KEY: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
    let manifest = "2b".repeat(32);
    let checkpoint = "3c".repeat(32);
    let mut w = world_with(&[
        ("ARAGORA_ENV", "production"),
        ("AEDB_MANIFEST_KEY", manifest.as_str()),
        ("AEDB_CHECKPOINT_KEY", checkpoint.as_str()),
        (
            "JWT_SECRET",
            "a-production-jwt-secret-of-at-least-32-characters",
        ),
        ("ARAGORA_ENCRYPTION_KEY", KEY),
        ("ARAGORA_TEST_APPROVAL_CRASH", "before_execution"),
    ]);
    let before = key_count(&w);
    let id = rotation_requested(&w, &w.operator, "quarterly");
    approve_expecting_a_crash(&w, &id);
    let status = w.server.wait();
    assert!(status.is_some_and(|s| !s.success()), "aborted: {status:?}");
    w.server.restart_with(&[
        ("ARAGORA_TEST_APPROVAL_CRASH", ""),
        ("ARAGORA_ENCRYPTION_KEY", ""),
    ]);
    // Several executor passes (one at boot, then every 15 s) leave it waiting.
    let health = w.server.get("/api/health", &w.admin).json();
    assert_eq!(health["sealed"], true, "{health}");
    std::thread::sleep(Duration::from_secs(2));
    let waiting = get(&w, &id);
    assert!(
        ["approved", "executing"].contains(&waiting["status"].as_str().unwrap_or("")),
        "a sealed ring leaves the request waiting, not failed: {waiting}"
    );
    let out = w.server.cli_with_stdin(&["unseal"], &format!("{KEY}\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = settled(&w, &id);
    assert_eq!(done["status"], "executed", "{done}");
    assert_eq!(key_count(&w), before + 1, "rotated once");
}
