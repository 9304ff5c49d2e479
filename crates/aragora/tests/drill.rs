//! `aragora drill` (issue #16, item 3) against the real server's backups: a
//! full backup, a key rotation, more secrets and an incremental; the drill,
//! run while the server keeps serving, restores the chain into a temporary
//! dir, verifies it, opens its key ring with the paired key-ring backups and
//! decrypts the secrets (under both data keys). A wrong master key, a
//! corrupted backup file and an altered key-ring backup each fail it with
//! exit 1 naming what failed, and the temporary dir is kept for the
//! investigation.

use std::path::{Path, PathBuf};

use aragora_testkit::{Server, Value, env_refs, json, production_env};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const MASTER: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
const OTHER_MASTER: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `aragora drill ARGS` with the server's environment plus `env`.
fn drill(s: &Server, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut cmd = s.command();
    cmd.arg("drill").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run aragora drill")
}

fn report(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "drill printed no JSON ({e}): {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

/// A file of `dir` that aedb's backup lists as a member (not the descriptor).
fn a_member_of(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("backup dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "backup.json"))
        .collect();
    files.sort();
    files.pop().expect("a member file")
}

#[test]
fn the_drill_restores_the_newest_chain_and_decrypts_its_secrets_and_names_what_fails() {
    let env = production_env(MASTER);
    let s = Server::start(Path::new(BIN), &env_refs(&env));
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    let tmp = tempfile::tempdir().expect("tempdir");
    // The schedule's layout: the drill takes the newest chain-NNNN.
    let backups = tmp.path().join("backups");
    let root = backups.join("chain-0001");
    let root_s = root.to_str().expect("utf-8").to_string();
    for i in 0..10 {
        s.put_secret(&admin, &format!("app/before-{i}"), &format!("v{i}"));
    }
    s.cli_json(&["backup", "full", "--out", &root_s, "--json"]);
    // A rotation writes a key-ring backup file and a new primary: the later
    // secrets are under another data key.
    let rotated = s.cli(&["key-rotation", "--force", "--reason", "drill test"]);
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    for i in 0..5 {
        s.put_secret(&admin, &format!("app/after-{i}"), &format!("w{i}"));
    }
    let incr = s.cli_json(&["backup", "incremental", "--out", &root_s, "--json"]);
    let pairing = incr["keyring_pairing"].as_str().expect("pairing file");
    assert!(Path::new(pairing).is_file(), "{incr}");

    // Passes while the server runs, from ARAGORA_BACKUP_DIR by default.
    let backups_s = backups.to_str().expect("utf-8");
    let out = drill(
        &s,
        &[("ARAGORA_BACKUP_DIR", backups_s)],
        &["--sample", "100", "--json"],
    );
    let r = report(&out);
    assert!(out.status.success(), "{r}\n{}", text(&out.stderr));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["chain"]["backups"],
        json!(["0001-full", "0002-incremental"])
    );
    assert_eq!(r["chain"]["end_lsn"], incr["end_lsn"], "{r}");
    assert!(r["chain"]["files"].as_u64().unwrap_or(0) > 0, "{r}");
    assert_eq!(r["keyring"]["pairing_recorded"], true, "{r}");
    assert!(
        !r["keyring"]["keyring_files"]
            .as_array()
            .expect("files")
            .is_empty(),
        "the rotation's key-ring backup is paired: {r}"
    );
    assert_eq!(r["secrets"]["total"], 15, "{r}");
    assert_eq!(r["secrets"]["sampled"], 15, "{r}");
    assert_eq!(r["secrets"]["decrypted"], 15, "{r}");
    assert_eq!(r["secrets"]["failed"], 0, "{r}");
    assert_eq!(r["secrets"]["newest"], "app/after-4", "{r}");
    assert_eq!(r["temp_dir_kept"], false, "{r}");
    assert!(!Path::new(r["temp_dir"].as_str().expect("temp dir")).exists());
    assert!(
        text(&out.stderr).contains("drill: verifying"),
        "progress lines: {}",
        text(&out.stderr)
    );
    // The server kept serving.
    s.put_secret(&admin, "app/during", "x");

    // Text, a sample of 3 (plus the newest).
    let out = drill(&s, &[], &["--backup-dir", backups_s, "--sample", "3"]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}{}", text(&out.stderr));
    assert!(
        shown.contains("chain: 0001-full -> 0002-incremental"),
        "{shown}"
    );
    assert!(shown.contains("ok    invariants/"), "{shown}");
    assert!(
        shown.contains("secrets: 15 in the backup; 4 sampled (newest: app/after-4)")
            || shown.contains("secrets: 15 in the backup; 3 sampled (newest: app/after-4)"),
        "{shown}"
    );
    assert!(shown.contains("result: drill passed"), "{shown}");

    // A wrong master key: the key ring does not unwrap.
    let out = drill(
        &s,
        &[("ARAGORA_ENCRYPTION_KEY", OTHER_MASTER)],
        &["--backup-dir", backups_s, "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let r = report(&out);
    let failures = r["failures"].to_string();
    assert!(failures.contains("does not unwrap"), "{r}");
    assert_eq!(r["temp_dir_kept"], true, "{r}");
    let kept = PathBuf::from(r["temp_dir"].as_str().expect("temp dir"));
    assert!(kept.is_dir(), "kept for the investigation: {r}");
    assert!(
        text(&out.stderr).contains("does not unwrap"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&kept);

    // An altered key-ring backup file: named.
    let keyring_file = root
        .join("keyring-backups")
        .join(r["keyring"]["keyring_files"][0].as_str().expect("file"));
    let original = std::fs::read(&keyring_file).expect("read");
    std::fs::write(&keyring_file, b"{}").expect("write");
    let out = drill(&s, &[], &["--backup-dir", backups_s]);
    assert_eq!(out.status.code(), Some(1));
    let shown = text(&out.stdout);
    assert!(
        shown.contains(&keyring_file.display().to_string()) && shown.contains("altered"),
        "{shown}"
    );
    std::fs::write(&keyring_file, &original).expect("restore");

    // A corrupted backup file: named, exit 1, temp dir kept and printed.
    let member = a_member_of(&root.join("0002-incremental"));
    let mut bytes = std::fs::read(&member).expect("read member");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&member, &bytes).expect("write member");
    let out = drill(&s, &[], &["--backup-dir", backups_s]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let shown = text(&out.stdout);
    let name = member
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_string();
    assert!(shown.contains("FAIL  verify"), "{shown}");
    assert!(shown.contains(&name), "the file is named: {shown}");
    assert!(shown.contains("result: DRILL FAILED"), "{shown}");
    let kept_line = shown
        .lines()
        .find(|l| l.starts_with("temp dir ") && l.ends_with(": kept"))
        .unwrap_or_else(|| panic!("the kept temp dir is printed: {shown}"));
    let kept = kept_line
        .trim_start_matches("temp dir ")
        .trim_end_matches(": kept");
    assert!(Path::new(kept).is_dir(), "{shown}");
    let _ = std::fs::remove_dir_all(kept);
}

#[test]
fn without_a_backup_dir_the_drill_says_what_to_give() {
    let s = Server::stopped(Path::new(BIN), &[]);
    let out = drill(&s, &[], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--backup-dir DIR is required"),
        "{}",
        text(&out.stderr)
    );
    let empty = tempfile::tempdir().expect("tempdir");
    let out = drill(
        &s,
        &[],
        &["--backup-dir", empty.path().to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("no backup chain in"),
        "{}",
        text(&out.stdout)
    );
}
