//! Approval gates over HTTP against the real `aragora serve` binary: requests,
//! the pending list the runbook reads, decisions and every refusal with its
//! status, audit row and metric.

use std::path::Path;
use std::sync::OnceLock;

use aragora_testkit::{Server, Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// Held by every test that makes unauthorized attempts, so the one that counts
/// `aragora_approval_unauthorized_attempts_total` exactly sees only its own
/// (the tests share one server and run in parallel).
static UNAUTHORIZED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn unauthorized_lock() -> std::sync::MutexGuard<'static, ()> {
    UNAUTHORIZED.lock().unwrap_or_else(|e| e.into_inner())
}

struct World {
    server: Server,
    admin: String,
    operator: String,
    operator_id: String,
    approver: String,
    approver2: String,
    lead: String,
    viewer: String,
    viewer_id: String,
}

/// One server for the file: each test makes its own requests, so they do not
/// interfere.
fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let server = Server::start(Path::new(env!("CARGO_BIN_EXE_aragora")), &[]);
        let (_, admin) = server.bootstrap_admin("admin@example.com");
        let login = |email: &str, roles: &[&str]| {
            let id = server.create_user(&admin, email, PASSWORD, roles);
            (id, server.login(email, PASSWORD))
        };
        let (operator_id, operator) = login("op@example.com", &["operator"]);
        let (_, approver) = login("ap@example.com", &["approver"]);
        let (_, approver2) = login("ap2@example.com", &["approver"]);
        let (_, lead) = login("lead@example.com", &["security_lead"]);
        let (viewer_id, viewer) = login("viewer@example.com", &["viewer"]);
        World {
            server,
            admin,
            operator,
            operator_id,
            approver,
            approver2,
            lead,
            viewer,
            viewer_id,
        }
    })
}

fn request(w: &World, operation: &str, reason: &str) -> Value {
    // What each operation runs with (none of these is approved here but the
    // migration and the cleanup, which change nothing another test reads).
    let params = match operation {
        "migration_run" => json!({"store": "all"}),
        "user_delete" => json!({"user_id": w.viewer_id}),
        _ => json!({}),
    };
    let r = w.server.post(
        "/api/security/approvals",
        &w.operator,
        &json!({"operation": operation, "params": params, "reason": reason}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    r.json()
}

fn checklist(w: &World, id: &str) -> Value {
    let r = w
        .server
        .get(&format!("/api/security/approvals/{id}"), &w.admin);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["checklist"].clone()
}

fn approve(w: &World, token: &str, id: &str, body: &Value) -> (u16, Value) {
    let r = w.server.post(
        &format!("/api/security/approvals/{id}/approve"),
        token,
        body,
    );
    (r.status, r.json())
}

#[test]
fn a_request_answers_202_and_is_listed_pending_with_runbook_fields() {
    let w = world();
    let created = request(w, "key_rotation", "quarterly rotation");
    assert_eq!(created["status"], "pending");
    assert_eq!(created["operation"], "key_rotation");
    assert_eq!(created["risk_level"], "high");
    let id = created["approval_id"].as_str().expect("approval_id");
    assert!(created["expires_at"].as_str().is_some());

    let r = w.server.get("/api/security/approvals/pending", &w.approver);
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.json();
    let entry = list
        .as_array()
        .expect("a top-level array")
        .iter()
        .find(|e| e["id"] == id)
        .expect("listed")
        .clone();
    for field in [
        "id",
        "operation",
        "risk_level",
        "requested_at",
        "requester_id",
        "reason",
        "checklist",
        "approvals",
        "required_approvals",
        "expires_at",
    ] {
        assert!(entry.get(field).is_some(), "{field} in {entry}");
    }
    assert_eq!(entry["requester_id"], w.operator_id.as_str());
    let at = entry["requested_at"].as_str().expect("requested_at");
    assert_eq!(at.len(), 20, "YYYY-MM-DDTHH:MM:SSZ, no fraction: {at}");
    assert!(at.ends_with('Z') && !at.contains('.'), "{at}");

    let critical = w.server.get(
        "/api/security/approvals/pending?risk_level=critical",
        &w.approver,
    );
    assert!(
        !critical
            .json()
            .as_array()
            .expect("array")
            .iter()
            .any(|e| e["id"] == id),
        "a high-risk request is not listed as critical"
    );
    let bad = w.server.get(
        "/api/security/approvals/pending?risk_level=urgent",
        &w.approver,
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[test]
fn an_eligible_approver_with_the_checklist_approves_once() {
    let w = world();
    let created = request(w, "migration_run", "re-encrypt after rotation");
    let id = created["approval_id"].as_str().expect("id");
    let (status, body) = approve(w, &w.approver, id, &json!({"notes": "looks fine"}));
    assert_eq!(status, 400, "the checklist must be confirmed: {body}");
    assert!(body.to_string().contains("checklist"), "{body}");

    let items = checklist(w, id);
    let (status, body) = approve(
        w,
        &w.approver,
        id,
        &json!({"notes": "Approved per escalation procedure", "checklist_confirmed": items}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "approved");
    let (status, body) = approve(w, &w.approver2, id, &json!({"checklist_confirmed": items}));
    assert_eq!(status, 409, "decided already: {body}");

    let got = w
        .server
        .get(&format!("/api/security/approvals/{id}"), &w.viewer);
    assert_eq!(got.status, 403, "reading needs approvals.read");
    let got = w
        .server
        .get(&format!("/api/security/approvals/{id}"), &w.admin)
        .json();
    // Approved, then run (approval_gates.rs follows the execution).
    assert!(
        ["approved", "executing", "executed"].contains(&got["status"].as_str().unwrap_or("")),
        "{got}"
    );
    assert_eq!(
        got["decisions"][0]["notes"],
        "Approved per escalation procedure"
    );
    let rows = w.server.audit(&w.admin, "approval_approved");
    assert!(rows.iter().any(|e| e["details"]["approval_id"] == id));
}

#[test]
fn unauthorized_attempts_are_refused_audited_with_ip_and_counted() {
    let w = world();
    let created = request(w, "key_cleanup", "retire old keys");
    let id = created["approval_id"].as_str().expect("id");
    let _counting = unauthorized_lock();
    let before = w
        .server
        .metric("aragora_approval_unauthorized_attempts_total");
    let items = checklist(w, id);
    let (status, body) = approve(w, &w.operator, id, &json!({"checklist_confirmed": items}));
    assert_eq!(status, 403, "own request: {body}");
    assert!(body.to_string().contains("own request"), "{body}");
    let (status, body) = approve(w, &w.viewer, id, &json!({"checklist_confirmed": items}));
    assert_eq!(status, 403, "not an approver: {body}");
    let (status, body) = approve(w, &w.approver, id, &json!({"bypass_checklist": true}));
    assert_eq!(status, 403, "only an admin bypasses the checklist: {body}");
    assert_eq!(
        w.server
            .metric("aragora_approval_unauthorized_attempts_total"),
        before + 3.0
    );
    let rows: Vec<Value> = w
        .server
        .audit(&w.admin, "unauthorized_approval")
        .into_iter()
        .filter(|e| e["details"]["request_id"] == id)
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for e in &rows {
        assert!(e["ip_address"].as_str().is_some(), "{e}");
        assert_eq!(e["details"]["operation"], "key_cleanup");
        assert!(e["details"]["why"].as_str().is_some(), "{e}");
    }
    // An admin may bypass the checklist; it is recorded.
    let (status, body) = approve(
        w,
        &w.admin,
        id,
        &json!({"reason": "Emergency override per runbook", "bypass_checklist": true}),
    );
    assert_eq!(status, 200, "{body}");
    let got = w
        .server
        .get(&format!("/api/security/approvals/{id}"), &w.admin)
        .json();
    assert_eq!(got["decisions"][0]["bypass_checklist"], true);
}

#[test]
fn reject_and_emergency_bypass_need_their_fields() {
    let w = world();
    // Critical, and run offline by the owner once approved: the bypass below
    // changes nothing the other tests on this server depend on.
    let created = request(w, "master_key_rotation", "incident");
    let id = created["approval_id"].as_str().expect("id");
    assert_eq!(created["risk_level"], "critical");
    assert!(
        w.server.metric("aragora_pending_critical_approvals") >= 1.0,
        "the gauge counts it"
    );

    let r = w.server.post(
        &format!("/api/security/approvals/{id}/emergency-bypass"),
        &w.lead,
        &json!({"reason": "Emergency bypass - contacted via phone"}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("incident_id"), "{}", r.body);
    let r = {
        let _counting = unauthorized_lock();
        w.server.post(
            &format!("/api/security/approvals/{id}/emergency-bypass"),
            &w.approver,
            &json!({"reason": "x", "incident_id": "INC-1"}),
        )
    };
    assert_eq!(r.status, 403, "only a security lead: {}", r.body);
    let r = w.server.post(
        &format!("/api/security/approvals/{id}/emergency-bypass"),
        &w.lead,
        &json!({"reason": "Emergency bypass - contacted via phone", "incident_id": "INC-12345"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "approved");
    // A master-key rotation is the owner's offline step: the server never
    // runs it, the approval waits for it (checked after the other steps).
    let bypassed = id.to_string();
    let rows = w.server.audit(&w.admin, "approval_emergency_bypass");
    let row = rows
        .iter()
        .find(|e| e["details"]["approval_id"] == id)
        .expect("audited");
    assert_eq!(row["details"]["severity"], "critical");
    assert_eq!(row["details"]["incident_id"], "INC-12345");

    let other = request(w, "user_delete", "left the company");
    let oid = other["approval_id"].as_str().expect("id");
    let r = w.server.post(
        &format!("/api/security/approvals/{oid}/reject"),
        &w.approver,
        &json!({}),
    );
    assert_eq!(r.status, 400, "reason is required: {}", r.body);
    let r = w.server.post(
        &format!("/api/security/approvals/{oid}/reject"),
        &w.approver,
        &json!({"reason": "Operation timed out, user should retry"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "rejected");
    let items = checklist(w, oid);
    let (status, _) = approve(w, &w.approver2, oid, &json!({"checklist_confirmed": items}));
    assert_eq!(status, 409, "approval after rejection");
    let got = w
        .server
        .get(&format!("/api/security/approvals/{bypassed}"), &w.admin)
        .json();
    assert_eq!(got["status"], "approved", "not run by the server: {got}");
    assert_eq!(got["execution"], Value::Null, "{got}");
}

#[test]
fn eligible_approvers_exclude_the_requester_and_non_approvers() {
    let w = world();
    let created = request(w, "key_rotation", "who can approve");
    let id = created["approval_id"].as_str().expect("id");
    let r = w.server.get(
        &format!("/api/security/approvals/{id}/eligible-approvers"),
        &w.approver,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.json();
    let emails: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["email"].as_str().expect("email"))
        .collect();
    for expected in ["ap@example.com", "ap2@example.com", "lead@example.com"] {
        assert!(emails.contains(&expected), "{expected} in {emails:?}");
    }
    assert!(!emails.contains(&"op@example.com"), "{emails:?}");
    assert!(!emails.contains(&"viewer@example.com"), "{emails:?}");
    for e in list.as_array().expect("array") {
        assert!(
            e.get("last_active_at").is_some() && e.get("roles").is_some(),
            "{e}"
        );
    }
    let r = w.server.get(
        "/api/security/approvals/apr_0000000000000000_00000000/eligible-approvers",
        &w.approver,
    );
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn unknown_operations_and_oversized_input_are_refused_naming_them() {
    let w = world();
    let r = w.server.post(
        "/api/security/approvals",
        &w.operator,
        &json!({"operation": "rm_rf", "reason": "x"}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("key_rotation"),
        "lists the gated operations: {}",
        r.body
    );
    let r = w.server.post(
        "/api/security/approvals",
        &w.operator,
        &json!({"operation": "key_rotation", "reason": "x", "params": {"blob": "y".repeat(10_000)}}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("params"), "{}", r.body);
    let r = w.server.post(
        "/api/security/approvals",
        &w.viewer,
        &json!({"operation": "key_rotation", "reason": "x"}),
    );
    assert_eq!(r.status, 403, "needs approvals.request: {}", r.body);
}
