//! The runtime admission knob (issue #16, item 3: "reduce admission rate"),
//! against the real server: `aragora admission --max-commits-per-sec N`
//! through the control socket makes a burst of writes meet 503s naming the
//! rate (counted in `aedb_admission_rejections_total`, the rate shown in
//! `aedb_admission_max_commits_per_sec`), `--unlimited` restores writes, each
//! change is audited with the operator, and the API mirrors it.
//!
//! No timing is asserted: a burst is "writes until the first refusal", with a
//! bound that only stops a limiter that never refuses.

use std::path::Path;

use aragora_testkit::{Server, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");

fn put_secret(s: &Server, token: &str, id: &str) -> aragora_testkit::Response {
    s.put(
        &format!("/api/secrets/{id}"),
        token,
        &json!({"value": "v", "secret_type": "password"}),
    )
}

#[test]
fn a_low_rate_refuses_a_burst_with_a_clear_503_and_unlimited_restores_writes() {
    let s = Server::start(Path::new(BIN), &[]);
    let (_, admin) = s.bootstrap_admin("admin@example.com");

    assert_eq!(
        s.cli_json(&["admission", "--json"]),
        json!({"max_commits_per_sec": 0, "unlimited": true})
    );
    let shown = s.cli(&["admission"]);
    assert!(shown.status.success());
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout),
        "admission rate: unlimited\n"
    );
    assert_eq!(s.metric("aedb_admission_max_commits_per_sec"), 0.0);
    let rejections_before = s.metric("aedb_admission_rejections_total");

    let set = s.cli_json(&["admission", "--max-commits-per-sec", "1", "--json"]);
    assert_eq!(
        set,
        json!({"max_commits_per_sec": 1, "unlimited": false, "previous_max_commits_per_sec": 0})
    );
    assert_eq!(s.metric("aedb_admission_max_commits_per_sec"), 1.0);

    let mut refused = None;
    for i in 0..1000 {
        let r = put_secret(&s, &admin, &format!("app/burst-{i}"));
        if r.status == 503 {
            refused = Some(r);
            break;
        }
        assert!(
            r.status == 200 || r.status == 201,
            "{}: {}",
            r.status,
            r.body
        );
    }
    let refused = refused.expect("a burst of writes beyond 1 commit/s meets a refusal");
    assert!(
        refused.body.contains("overloaded") && refused.body.contains("1 commits/s"),
        "the 503 names the admission rate: {}",
        refused.body
    );
    assert!(refused.header("retry-after").is_some(), "{refused:?}");
    assert!(
        s.metric("aedb_admission_rejections_total") > rejections_before,
        "refusals are counted"
    );

    // Lifting it works even while the rate is exhausted.
    let lifted = s.cli_json(&["admission", "--unlimited", "--json"]);
    assert_eq!(
        lifted,
        json!({"max_commits_per_sec": 0, "unlimited": true, "previous_max_commits_per_sec": 1})
    );
    assert_eq!(s.metric("aedb_admission_max_commits_per_sec"), 0.0);
    for i in 0..20 {
        let r = put_secret(&s, &admin, &format!("app/after-{i}"));
        assert!(
            r.status == 200 || r.status == 201,
            "{}: {}",
            r.status,
            r.body
        );
    }

    // The API mirrors the CLI, with maintenance's permission.
    let bad = s.post("/api/admin/admission", &admin, &json!({}));
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("max_commits_per_sec"), "{}", bad.body);
    let api = s.post(
        "/api/admin/admission",
        &admin,
        &json!({"max_commits_per_sec": 500}),
    );
    assert_eq!(api.status, 200, "{}", api.body);
    assert_eq!(api.json()["previous_max_commits_per_sec"], 0);
    assert_eq!(s.metric("aedb_admission_max_commits_per_sec"), 500.0);
    let api = s.post("/api/admin/admission", &admin, &json!({"unlimited": true}));
    assert_eq!(api.status, 200, "{}", api.body);
    assert_eq!(api.json()["previous_max_commits_per_sec"], 500);

    let changes = s.audit(&admin, "admission_changed");
    assert_eq!(changes.len(), 4, "{changes:?}");
    let by_cli: Vec<_> = changes
        .iter()
        .filter(|e| e["actor"].as_str().unwrap_or_default().starts_with("cli:"))
        .collect();
    assert_eq!(by_cli.len(), 2, "the operator's OS identity: {changes:?}");
    assert!(
        changes
            .iter()
            .any(|e| e["details"]["max_commits_per_sec"] == 1
                && e["details"]["previous_max_commits_per_sec"] == 0),
        "{changes:?}"
    );
}

#[test]
fn without_a_running_server_admission_says_the_rate_is_runtime_only() {
    let s = Server::stopped(Path::new(BIN), &[]);
    let out = s.cli(&["admission", "--max-commits-per-sec", "5"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runtime only"), "{err}");
    let out = s.cli(&["admission", "--max-commits-per-sec", "0"]);
    assert!(!out.status.success(), "0 is refused: use --unlimited");
}
