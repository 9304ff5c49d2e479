//! Break-glass recovery (`aragora admin recover`) against the real server: when
//! no admin can act, the data dir's owner gets an admin back with fresh
//! credentials, through the control socket or with the server stopped; while an
//! admin can act it is refused unless forced with a reason; every recovery is
//! one critical audit entry; bootstrap stays refused.

use std::path::Path;
use std::process::Output;

use aragora_testkit::{Response, Server, Value, json};

const PASSWORD: &str = "correct horse battery staple";

fn start() -> Server {
    Server::start(
        Path::new(env!("CARGO_BIN_EXE_aragora")),
        &[("JWT_SECRET", "recovery-test-secret-0123456789abcdef0123")],
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn recover_raw(s: &Server, email: &str, extra: &[&str]) -> Output {
    let mut args = vec!["admin", "recover", "--email", email];
    args.extend_from_slice(extra);
    s.cli(&args)
}

/// `aragora admin recover --email EMAIL --json EXTRA...`, expected to succeed.
fn recover(s: &Server, email: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let out = recover_raw(s, email, &args);
    assert!(
        out.status.success(),
        "recover {email} {extra:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("recover JSON");
    assert_eq!(v["status"], "recovered", "{v}");
    v
}

fn token_of(v: &Value) -> String {
    v["token"].as_str().expect("token").to_string()
}

/// The key id inside an API key `ara_<id>_<secret>`.
fn key_id(token: &str) -> String {
    token
        .strip_prefix("ara_")
        .and_then(|r| r.split_once('_'))
        .map(|(id, _)| id.to_string())
        .expect("an API key")
}

/// `GET /api/auth/me` with `token`: (status, failure reason).
fn me(s: &Server, token: &str) -> (u16, Option<String>) {
    let r = s.get("/api/auth/me", token);
    if r.status == 200 {
        return (200, None);
    }
    (r.status, r.json()["reason"].as_str().map(str::to_string))
}

fn expect_ok(r: Response, what: &str) -> Value {
    assert!(r.status < 300, "{what}: {} {}", r.status, r.body);
    r.json()
}

/// An API key for `user_id`, created by `admin`.
fn create_key(s: &Server, admin: &str, user_id: &str) -> String {
    let r = s.post(
        &format!("/api/admin/users/{user_id}/api-keys"),
        admin,
        &json!({"name": "ops"}),
    );
    token_of(&expect_ok(r, "create API key"))
}

fn revoke_keys(s: &Server, actor: &str, user_id: &str) {
    expect_ok(
        s.post(
            &format!("/api/admin/users/{user_id}/revoke-keys"),
            actor,
            &json!({}),
        ),
        "revoke-keys",
    );
}

/// The one `admin_recovered` entry for `user_id`, searched with `token`.
fn recovered_entry(s: &Server, token: &str, user_id: &str) -> Value {
    let entries: Vec<Value> = s
        .audit(token, "admin_recovered")
        .into_iter()
        .filter(|e| e["details"]["user_id"] == user_id)
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries[0].clone()
}

fn assert_bootstrap_refused(s: &Server) {
    let out = s.cli(&["admin", "bootstrap", "--email", "late@recovery.test"]);
    assert!(!out.status.success(), "bootstrap after a recovery ran");
    let err = text(&out.stderr);
    assert!(err.contains("an admin already exists"), "{err}");
}

#[test]
fn through_the_socket_a_disabled_locked_admin_comes_back_with_only_a_new_key() {
    let s = start();
    let (root, root_key) = s.bootstrap_admin("root@recovery.test");
    // A second admin, API key only, disables and locks root, then revokes its
    // own key: no admin can act any more.
    let admin2 = expect_ok(
        s.post(
            "/api/admin/users",
            &root_key,
            &json!({"email": "admin2@recovery.test", "roles": ["admin"]}),
        ),
        "create admin2",
    )["id"]
        .as_str()
        .expect("id")
        .to_string();
    let admin2_key = create_key(&s, &root_key, &admin2);
    expect_ok(
        s.post(
            "/api/admin/users/bulk-lock",
            &admin2_key,
            &json!({"emails": ["root@recovery.test"], "duration": "1h"}),
        ),
        "bulk-lock root",
    );
    expect_ok(
        s.post(
            &format!("/api/admin/users/{root}/disable"),
            &admin2_key,
            &json!({"reason": "suspected compromise"}),
        ),
        "disable root",
    );
    revoke_keys(&s, &admin2_key, &admin2);
    assert_eq!(me(&s, &root_key), (401, Some("disabled".into())));
    assert_eq!(me(&s, &admin2_key), (401, Some("revoked".into())));

    let v = recover(&s, "Root@Recovery.test", &[]);
    assert_eq!(v["user_id"], root.as_str(), "{v}");
    assert_eq!(v["email"], "root@recovery.test", "{v}");
    assert_eq!(v["created"], false, "{v}");
    assert_eq!(v["forced"], false, "{v}");
    assert_eq!(v["revoked_key_ids"], json!([key_id(&root_key)]), "{v}");
    let new_key = token_of(&v);
    assert_eq!(me(&s, &new_key), (200, None));
    // The key root had before stays dead, even though root is enabled again.
    assert_eq!(me(&s, &root_key), (401, Some("revoked".into())));
    assert_eq!(me(&s, &admin2_key), (401, Some("revoked".into())));
    let user = expect_ok(
        s.get(&format!("/api/admin/users/{root}"), &new_key),
        "get root",
    );
    assert_eq!(user["disabled"], false, "{user}");
    assert_eq!(user["disabled_reason"], Value::Null, "{user}");
    assert_eq!(user["locked"], false, "{user}");
    assert_eq!(user["roles"], json!(["admin"]), "{user}");

    let e = recovered_entry(&s, &new_key, &root);
    // The operator as the kernel saw the CLI process (it inherits this test's
    // user and login session).
    assert_eq!(
        e["actor"],
        aragora::operator::Operator::of_this_process().actor(),
        "{e}"
    );
    assert!(e["actor"].as_str().is_some_and(|a| a.starts_with("cli:")));
    let d = &e["details"];
    assert_eq!(d["severity"], "critical", "{e}");
    assert_eq!(d["via"], "socket", "{e}");
    assert_eq!(d["email"], "root@recovery.test", "{e}");
    assert_eq!(d["created"], false, "{e}");
    assert_eq!(d["forced"], false, "{e}");
    assert_eq!(d["reason"], Value::Null, "{e}");
    assert_eq!(d["was_disabled"], true, "{e}");
    assert_eq!(d["was_locked"], true, "{e}");
    assert_eq!(d["revoked_key_ids"], json!([key_id(&root_key)]), "{e}");
    assert_eq!(d["key_id"], key_id(&new_key).as_str(), "{e}");
    let audit = expect_ok(s.get("/api/security/audit/verify", &new_key), "verify");
    assert_eq!(audit["ok"], true, "{audit}");
    assert_bootstrap_refused(&s);
}

#[test]
fn refused_while_an_admin_can_act_and_forced_only_with_a_reason() {
    let s = start();
    let (root, root_key) = s.bootstrap_admin("root@force.test");
    let admin2 = s.create_user(&root_key, "admin2@force.test", PASSWORD, &["admin"]);
    let admin2_key = create_key(&s, &root_key, &admin2);
    let admin2_jwt = s.login("admin2@force.test", PASSWORD);

    let out = recover_raw(&s, "admin2@force.test", &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    for name in ["root@force.test", "admin2@force.test", "--force"] {
        assert!(err.contains(name), "the refusal names {name}: {err}");
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("refusal JSON");
    assert_eq!(v["status"], "refused", "{v}");
    let mut able: Vec<&str> = v["able_admins"]
        .as_array()
        .expect("able_admins")
        .iter()
        .filter_map(|a| a["user_id"].as_str())
        .collect();
    able.sort();
    let mut expected = vec![root.as_str(), admin2.as_str()];
    expected.sort();
    assert_eq!(able, expected, "{v}");
    // Nothing changed: admin2's credentials all still work.
    assert_eq!(me(&s, &admin2_jwt), (200, None));
    assert_eq!(me(&s, &admin2_key), (200, None));
    assert!(s.audit(&root_key, "admin_recovered").is_empty());

    let out = recover_raw(&s, "admin2@force.test", &["--force"]);
    assert_eq!(out.status.code(), Some(2), "--force without --reason");
    assert!(
        text(&out.stderr).contains("--reason"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(me(&s, &admin2_key), (200, None));

    let reason = "admin2's laptop was stolen";
    let v = recover(&s, "admin2@force.test", &["--force", "--reason", reason]);
    assert_eq!(v["user_id"], admin2.as_str(), "{v}");
    assert_eq!(v["forced"], true, "{v}");
    assert_eq!(v["password_cleared"], true, "{v}");
    assert_eq!(v["revoked_key_ids"], json!([key_id(&admin2_key)]), "{v}");
    assert_eq!(
        v["revoked_session_ids"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    let new_key = token_of(&v);
    assert_eq!(me(&s, &new_key), (200, None));
    // Every credential admin2 had is dead: session, key and password.
    assert_eq!(me(&s, &admin2_jwt), (401, Some("revoked".into())));
    assert_eq!(me(&s, &admin2_key), (401, Some("revoked".into())));
    let r = s.send(
        aragora_testkit::Request::new("POST", "/api/auth/login")
            .json(&json!({"email": "admin2@force.test", "password": PASSWORD})),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    // Only the named account was touched.
    assert_eq!(me(&s, &root_key), (200, None));

    let e = recovered_entry(&s, &root_key, &admin2);
    let d = &e["details"];
    assert_eq!(d["severity"], "critical", "{e}");
    assert_eq!(d["forced"], true, "{e}");
    assert_eq!(d["reason"], reason, "{e}");
    assert_eq!(d["revoked_session_ids"], v["revoked_session_ids"], "{e}");
    assert_eq!(d["revoked_key_ids"], v["revoked_key_ids"], "{e}");
    assert_eq!(d["password_cleared"], true, "{e}");
    assert!(
        d["able_admins"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == root.as_str())),
        "the admins the force overrode are on record: {e}"
    );
}

#[test]
fn a_new_email_creates_a_working_admin_and_bootstrap_stays_refused() {
    let s = start();
    let (root, root_key) = s.bootstrap_admin("root@new.test");
    // The only admin revokes its only key: nobody can act.
    revoke_keys(&s, &root_key, &root);
    assert_eq!(me(&s, &root_key), (401, Some("revoked".into())));

    let out = recover_raw(&s, "oncall@new.test", &["--reason", "root key revoked"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("admin created: oncall@new.test"),
        "{stdout}"
    );
    let new_key = stdout
        .lines()
        .find(|l| l.starts_with("ara_"))
        .unwrap_or_else(|| panic!("no key printed: {stdout}"))
        .trim()
        .to_string();
    let me_v = expect_ok(s.get("/api/auth/me", &new_key), "me");
    assert_eq!(me_v["email"], "oncall@new.test", "{me_v}");
    assert_eq!(me_v["roles"], json!(["admin"]), "{me_v}");
    // It acts as an admin: lists users, and can give root a key again.
    expect_ok(s.get("/api/admin/users", &new_key), "list users");
    let root_again = create_key(&s, &new_key, &root);
    assert_eq!(me(&s, &root_again), (200, None));

    let user_id = me_v["id"].as_str().expect("id");
    let e = recovered_entry(&s, &new_key, user_id);
    let d = &e["details"];
    assert_eq!(d["created"], true, "{e}");
    assert_eq!(d["via"], "socket", "{e}");
    assert_eq!(d["reason"], "root key revoked", "{e}");
    assert_eq!(d["severity"], "critical", "{e}");
    assert_bootstrap_refused(&s);
}

#[test]
fn with_the_server_stopped_it_opens_the_data_dir() {
    let mut s = start();
    let (root, root_key) = s.bootstrap_admin("root@direct.test");
    revoke_keys(&s, &root_key, &root);
    s.stop();
    assert!(
        !s.data_dir.join("aragora.sock").exists(),
        "no server answers"
    );

    let v = recover(&s, "root@direct.test", &[]);
    assert_eq!(v["user_id"], root.as_str(), "{v}");
    let new_key = token_of(&v);
    assert_bootstrap_refused(&s);

    s.restart_with(&[]);
    assert_eq!(me(&s, &new_key), (200, None));
    assert_eq!(me(&s, &root_key), (401, Some("revoked".into())));
    let e = recovered_entry(&s, &new_key, &root);
    assert_eq!(e["details"]["via"], "direct", "{e}");
    assert_eq!(e["details"]["severity"], "critical", "{e}");
    assert_bootstrap_refused(&s);
}
