//! The runbook's "periodically export audit table snapshots to immutable
//! storage", against the real server: `aragora audit export --out DIR` while the
//! server runs (through its socket), `aragora audit verify --export DIR` against
//! each other and the live chains, the scheduled export, and a tampered copy
//! that verification refuses.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aragora_testkit::{Server, Value};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.retain(|p| p.extension().is_some_and(|x| x == "json"));
    out.sort();
    out
}

fn written(report: &Value, source: &str) -> Vec<(u64, u64)> {
    report["written"]
        .as_array()
        .expect("written")
        .iter()
        .filter(|w| w["source"] == source)
        .map(|w| {
            (
                w["first"].as_u64().expect("first"),
                w["last"].as_u64().expect("last"),
            )
        })
        .collect()
}

#[test]
fn a_live_export_continues_where_it_ended_and_verifies_against_the_running_server() {
    let s = Server::start(Path::new(BIN), &[]);
    let (_, admin) = s.bootstrap_admin("admin@export.test");
    s.create_user(
        &admin,
        "alice@export.test",
        "correct horse battery",
        &["member"],
    );
    let out = tempfile::tempdir().expect("tempdir");
    let dir = out.path().join("exports");
    let dir_arg = format!("--out={}", dir.display());

    let first = s.cli_json(&["audit", "export", &dir_arg, "--json"]);
    let ours = written(&first, "aragora");
    assert_eq!(ours.len(), 1, "{first}");
    assert_eq!(
        ours[0].0, 1,
        "the first export starts at the chain's beginning"
    );
    assert!(
        !written(&first, "aedb.authz_audit").is_empty(),
        "the engine's authz_audit is exported too: {first}"
    );
    let public_key = first["public_key"]
        .as_str()
        .expect("public key")
        .to_string();

    // Nothing new: nothing written, and no file is ever rewritten.
    let files = segments(&dir);
    let again = s.cli_json(&["audit", "export", &dir_arg, "--json"]);
    assert!(written(&again, "aragora").is_empty(), "{again}");
    assert_eq!(segments(&dir), files);

    // New activity: the next segment starts right after the last one.
    s.login("alice@export.test", "correct horse battery");
    let next = s.cli_json(&["audit", "export", &dir_arg, "--json"]);
    let more = written(&next, "aragora");
    assert_eq!(more.len(), 1, "{next}");
    assert_eq!(more[0].0, ours[0].1 + 1, "{next}");

    let verify_arg = format!("--export={}", dir.display());
    let report = s.cli_json(&["audit", "verify", &verify_arg, "--json"]);
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["chains"]
            .as_array()
            .expect("chains")
            .iter()
            .all(|c| c["matches_live"] == true),
        "{report}"
    );

    // A copy with one entry edited fails, exit 1, naming the file.
    let copy = out.path().join("copy");
    std::fs::create_dir_all(&copy).expect("copy dir");
    for f in segments(&dir) {
        std::fs::copy(&f, copy.join(f.file_name().expect("name"))).expect("copy");
    }
    let victim = segments(&copy)
        .into_iter()
        .find(|p| p.to_string_lossy().contains("/aragora-"))
        .expect("an aragora segment");
    let mut perms = std::fs::metadata(&victim).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&victim, perms).expect("chmod");
    let text = std::fs::read_to_string(&victim).expect("read");
    std::fs::write(
        &victim,
        text.replacen("admin@export.test", "other@export.test", 1),
    )
    .expect("tamper");
    let out = s.cli(&[
        "audit",
        "verify",
        &format!("--export={}", copy.display()),
        &format!("--public-key={public_key}"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAILED") && stdout.contains(&victim.display().to_string()),
        "{stdout}"
    );
}

#[test]
fn the_scheduled_export_writes_segments_without_an_operator() {
    let out = tempfile::tempdir().expect("tempdir");
    let dir = out.path().join("scheduled");
    let dir_env = dir.display().to_string();
    let s = Server::start(
        Path::new(BIN),
        &[
            ("ARAGORA_AUDIT_EXPORT_DIR", dir_env.as_str()),
            ("ARAGORA_AUDIT_EXPORT_INTERVAL", "10"),
        ],
    );
    // The first export runs at boot; wait for it (generously: no speed assumed).
    let deadline = Instant::now() + Duration::from_secs(120);
    while segments(&dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no scheduled export segment appeared"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = s.cli_json(&[
        "audit",
        "verify",
        &format!("--export={}", dir.display()),
        "--json",
    ]);
    assert_eq!(report["ok"], true, "{report}");
}

#[test]
fn a_relative_export_directory_is_the_operators_not_the_servers() {
    let s = Server::start(Path::new(BIN), &[]);
    let cwd = tempfile::tempdir().expect("tempdir");
    let out = s
        .command()
        .current_dir(cwd.path())
        .args(["audit", "export", "--out", "rel", "--json"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!segments(&cwd.path().join("rel")).is_empty());
    // A bad --since names the flag.
    let out = s.cli(&["audit", "export", "--out", "/tmp/x", "--since", "soon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
}
