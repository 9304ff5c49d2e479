//! The logs the runbook greps (issue #16 item 7): the real server, its
//! stderr captured through a pipe as under `kubectl logs` (so no colour), the
//! events each runbook step looks for caused over HTTP and the CLI, and then
//! every `kubectl ... logs` pipeline of our runbook edition run as written
//! (the real `grep`, `awk`, `sort` through `bash -c`), with `kubectl logs
//! --tail=N` replaced by `tail -n N` of the captured log. Each must find its
//! event with the client address and the actor.

use std::path::Path;
use std::process::Command;

use aragora_testkit::{Request, Server, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const RUNBOOK: &str = include_str!("../../../docs/runbooks/aragora-security-operations.md");

/// Every `kubectl ... logs ...` pipeline in the runbook, continuation lines
/// joined.
fn runbook_log_pipelines() -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in RUNBOOK.lines() {
        let t = line.trim();
        match current.as_mut() {
            Some(cmd) => cmd.push_str(t.trim_end_matches('\\')),
            None if t.starts_with("kubectl") && t.contains(" logs ") => {
                current = Some(t.trim_end_matches('\\').to_string());
            }
            None => continue,
        }
        if !t.ends_with('\\')
            && let Some(cmd) = current.take()
        {
            out.push(cmd);
        }
    }
    out
}

/// The runbook pipeline whose text contains `needle`, run over `log`.
fn run_runbook_grep(pipelines: &[String], needle: &str, log: &Path) -> String {
    let pipeline = pipelines
        .iter()
        .find(|p| p.contains(needle))
        .unwrap_or_else(|| panic!("no `kubectl logs` step greps {needle:?} in the runbook"));
    let (kubectl, rest) = pipeline.split_once('|').expect("a pipeline");
    let tail = kubectl
        .split_whitespace()
        .find_map(|w| w.strip_prefix("--tail="))
        .unwrap_or("10000");
    let script = format!("tail -n {tail} \"$LOG\" |{rest}");
    let out = Command::new("bash")
        .args(["-c", &script])
        .env("LOG", log)
        .output()
        .expect("bash");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A request from `ip` (the test kit's server believes X-Forwarded-For from
/// loopback).
fn from(ip: &str, r: Request) -> Request {
    r.header("x-forwarded-for", ip)
}

#[test]
fn every_runbook_log_grep_finds_its_event_with_address_and_actor() {
    for tool in ["bash", "grep", "awk", "sort", "uniq", "head", "tail"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "{tool} is required on PATH");
    }
    // The default text format at the default level, as deployed.
    let mut s = Server::start(Path::new(BIN), &[("ARAGORA_LOG_LEVEL", "info")]);
    let (admin_id, admin) = s.bootstrap_admin("admin@example.com");
    let viewer_id = s.create_user(
        &admin,
        "viewer@example.com",
        "a viewer passphrase",
        &["viewer"],
    );
    let viewer = s.login("viewer@example.com", "a viewer passphrase");

    // auth_failure: a token that is no JWT, and a wrong password.
    let r = s.send(from(
        "203.0.113.7",
        Request::new("GET", "/api/auth/me").bearer("not-a-jwt"),
    ));
    assert_eq!(r.status, 401, "{}", r.body);
    let r = s.send(from(
        "198.51.100.23",
        Request::new("POST", "/api/auth/login")
            .json(&json!({"email": "viewer@example.com", "password": "wrong password"})),
    ));
    assert_eq!(r.status, 401, "{}", r.body);
    // permission_denied: the viewer may not search the audit log.
    let r = s.send(from(
        "192.0.2.44",
        Request::new("GET", "/api/security/audit/search?minutes=5").bearer(&viewer),
    ));
    assert_eq!(r.status, 403, "{}", r.body);
    // A key rotation, then a migration (through the CLI: actor `cli`).
    for id in ["logs/a", "logs/b"] {
        let r = s.put(
            &format!("/api/secrets/{id}"),
            &admin,
            &json!({"value": format!("value of {id}"), "secret_type": "token"}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = s.send(from(
        "192.0.2.10",
        Request::new("POST", "/api/security/encryption/rotate")
            .bearer(&admin)
            .json(&json!({"reason": "log drill", "force": true})),
    ));
    assert_eq!(r.status, 200, "{}", r.body);
    let out = s.cli(&["migration", "--store=secrets", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI logs at ARAGORA_LOG_LEVEL too (its own steps: socket or store).
    let out = s
        .command()
        .env("ARAGORA_LOG_LEVEL", "debug")
        .args(["audit", "verify"])
        .output()
        .expect("run aragora");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("DEBUG") && err.contains("control socket") && !err.contains('\u{1b}'),
        "ARAGORA_LOG_LEVEL=debug must show the CLI's debug lines, uncoloured: {err}"
    );
    // A decryption error: logs/b now holds logs/a's envelope.
    s.stop();
    aragora_testkit::store::copy_secret_envelope(&s, "logs/a", "logs/b");
    s.restart_with(&[]);
    let r = s.send(from(
        "192.0.2.99",
        Request::new("GET", "/api/secrets/logs/b").bearer(&admin),
    ));
    assert_eq!(r.status, 500, "{}", r.body);
    s.stop();

    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("aragora.log");
    let text = s.stderr();
    std::fs::write(&log, &text).expect("write the log");
    assert!(
        !text.contains('\u{1b}'),
        "no ANSI colour when stderr is not a terminal:\n{text}"
    );
    assert!(
        !text.contains("=Some("),
        "log fields print plain values:\n{text}"
    );

    let pipelines = runbook_log_pipelines();
    let check = |needle: &str, must: &[&str]| {
        let found = run_runbook_grep(&pipelines, needle, &log);
        for m in must {
            assert!(
                found.contains(m),
                "the runbook's grep for {needle:?} does not find {m:?}; it found:\n{found}\nin the log:\n{text}"
            );
        }
    };
    // BruteForceAttemptDetected: the source addresses.
    check(
        r#"grep "auth_failure\|401""#,
        &["203.0.113.7", "198.51.100.23"],
    );
    // SensitivePermissionDenied / HighRBACDenialRate: the last field is the actor.
    check(
        r#"grep "permission_denied\|403""#,
        &[&format!("actor={viewer_id}")],
    );
    // JWTValidationErrors: the refused token, with its client.
    check(
        r#"grep "invalid.*token\|jwt.*error""#,
        &["auth_failure", "credential=jwt", "203.0.113.7"],
    );
    // KeyRotationFailed: rotations, who and from where.
    check(
        r#"grep -i "rotation""#,
        &["key rotation", &format!("actor={admin_id}"), "192.0.2.10"],
    );
    // MigrationErrorsDetected: runs and who started them.
    check(
        r#"grep -i "migration""#,
        &["migration started", "migration finished", "actor=cli"],
    );
    // EncryptionErrorsIncreasing: the failed decryption, record, client, actor.
    check(
        r#"grep -i "encrypt\|decrypt" | grep -i "error\|fail""#,
        &[
            "encryption error",
            "aad_mismatch",
            "record_id=logs/b",
            "192.0.2.99",
            &format!("actor={admin_id}"),
        ],
    );
}
