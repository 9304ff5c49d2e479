//! Rotating the AEDB keys of a running aragora (issue #16, item 3b), the
//! runbook's "rotate keys by controlled deployment with backup snapshots before
//! and after rotation" as our edition of it spells it out
//! (docs/runbooks/aedb-security-operations.md, "Key management"): a full backup,
//! a restart with new AEDB_MANIFEST_KEY / AEDB_CHECKPOINT_KEY and the old ones as
//! AEDB_PREVIOUS_*, secrets still decrypting, an incremental backup continuing the
//! chain, a restart without the previous keys; then the `aedb` CLI verifies and
//! restores both chains and a server on the restored store reads the secrets.
//!
//! The `aedb` binary is the workspace's (`target/<profile>/aedb`, next to the
//! aragora binary): `cargo test --workspace` builds it; a targeted run builds it
//! first when it is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use aragora_testkit::{Server, env_refs, json};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");
const MASTER: &str = "c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0";
const JWT: &str = "a-production-jwt-secret-of-at-least-32-characters";

fn old_mk() -> String {
    "4a".repeat(32)
}
fn old_ck() -> String {
    "4b".repeat(32)
}
fn new_mk() -> String {
    "5a".repeat(32)
}
fn new_ck() -> String {
    "5b".repeat(32)
}

fn production(mk: String, ck: String) -> Vec<(&'static str, String)> {
    vec![
        ("ARAGORA_ENV", "production".to_string()),
        ("AEDB_MANIFEST_KEY", mk),
        ("AEDB_CHECKPOINT_KEY", ck),
        ("JWT_SECRET", JWT.to_string()),
        ("ARAGORA_ENCRYPTION_KEY", MASTER.to_string()),
    ]
}

fn put_secret(s: &Server, token: &str, i: usize) {
    let r = s.put(
        &format!("/api/secrets/app/s-{i}"),
        token,
        &json!({"value": format!("value-{i}"), "secret_type": "password"}),
    );
    assert!(r.status == 200 || r.status == 201, "PUT s-{i}: {}", r.body);
}

fn assert_secrets(s: &Server, token: &str, n: usize, when: &str) {
    for i in 0..n {
        let r = s.get(&format!("/api/secrets/app/s-{i}"), token);
        assert_eq!(r.status, 200, "{when}: GET s-{i}: {}", r.body);
        assert_eq!(
            r.json()["value"].as_str(),
            Some(format!("value-{i}").as_str()),
            "{when}: s-{i}"
        );
    }
}

/// The workspace's `aedb` binary, built if a targeted run did not build it.
fn aedb_bin() -> PathBuf {
    let bin = Path::new(BIN).with_file_name("aedb");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "aedb-cli", "--bin", "aedb"])
            .status()
            .expect("run cargo build -p aedb-cli");
        assert!(status.success(), "cargo build -p aedb-cli failed");
    }
    assert!(bin.exists(), "no aedb binary at {}", bin.display());
    bin
}

/// `aedb ARGS` with exactly `keys` in its environment (keys never in argv).
fn aedb(args: &[&str], keys: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(aedb_bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args);
    for (k, v) in keys {
        cmd.env(k, v);
    }
    cmd.output().expect("run aedb")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn aedb_keys_rotate_with_backups_before_and_after_and_both_chains_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("backups");
    let old_env = production(old_mk(), old_ck());
    let mut s = Server::start(Path::new(BIN), &env_refs(&old_env));
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    for i in 0..10 {
        put_secret(&s, &admin, i);
    }

    // 1. The backup before the rotation.
    let full = s.cli_json(&["backup", "full", "--out", path(&root), "--json"]);
    assert_eq!(full["kind"], "full", "{full}");
    for i in 10..15 {
        put_secret(&s, &admin, i);
    }

    // 2. The rotation: new keys, the old ones as AEDB_PREVIOUS_*.
    let (omk, ock, nmk, nck) = (old_mk(), old_ck(), new_mk(), new_ck());
    s.restart_with(&[
        ("AEDB_MANIFEST_KEY", nmk.as_str()),
        ("AEDB_CHECKPOINT_KEY", nck.as_str()),
        ("AEDB_PREVIOUS_MANIFEST_KEY", omk.as_str()),
        ("AEDB_PREVIOUS_CHECKPOINT_KEY", ock.as_str()),
    ]);
    assert_secrets(&s, &admin, 15, "after the rotating restart");
    for i in 15..20 {
        put_secret(&s, &admin, i);
    }

    // 3. The backup after: the chain continues across the rotation.
    let incr = s.cli_json(&["backup", "incremental", "--out", path(&root), "--json"]);
    assert_eq!(incr["kind"], "incremental", "{incr}");
    assert_eq!(
        incr["chain"],
        json!(["0001-full", "0002-incremental"]),
        "{incr}"
    );

    // 4. The previous keys are no longer needed by the server.
    s.restart_with(&[
        ("AEDB_PREVIOUS_MANIFEST_KEY", ""),
        ("AEDB_PREVIOUS_CHECKPOINT_KEY", ""),
    ]);
    assert_secrets(&s, &admin, 20, "restarted without the previous keys");
    s.stop();

    // 5. The aedb CLI verifies and restores both chains.
    let rotating = vec![
        ("AEDB_MANIFEST_KEY", new_mk()),
        ("AEDB_CHECKPOINT_KEY", new_ck()),
        ("AEDB_PREVIOUS_MANIFEST_KEY", old_mk()),
        ("AEDB_PREVIOUS_CHECKPOINT_KEY", old_ck()),
    ];
    let new_only = &rotating[..2];
    let old_only = vec![
        ("AEDB_MANIFEST_KEY", old_mk()),
        ("AEDB_CHECKPOINT_KEY", old_ck()),
    ];
    let v = aedb(&["verify", "--backup", path(&root), "--json"], &rotating);
    assert!(v.status.success(), "verify the chain across: {}", text(&v));
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).expect("json");
    assert_eq!(
        report["chain"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    let full_dir = root.join("0001-full");
    let v = aedb(&["verify", "--backup", path(&full_dir)], &old_only);
    assert!(
        v.status.success(),
        "the old backup under the old keys: {}",
        text(&v)
    );

    // Without the previous manifest key the pre-rotation backup is refused,
    // naming the manifest key, never printing one.
    let v = aedb(&["verify", "--backup", path(&root)], new_only);
    assert!(!v.status.success(), "{}", text(&v));
    let out = text(&v);
    assert!(out.contains("wrong manifest key"), "{out}");
    for k in [old_mk(), old_ck(), new_mk(), new_ck()] {
        assert!(!out.contains(&k), "key material in {out}");
    }

    let d = aedb(&["drill", "--backup", path(&root), "--json"], &rotating);
    assert!(
        d.status.success(),
        "drill across the rotation: {}",
        text(&d)
    );

    // The chain across the rotation, restored into a new data dir, serves the
    // secrets with the new keys alone.
    let new_env = production(new_mk(), new_ck());
    let mut restored = Server::stopped(Path::new(BIN), &env_refs(&new_env));
    let target = restored.data_dir.join("aedb");
    let r = aedb(
        &["restore", "--from", path(&root), "--to", path(&target)],
        &rotating,
    );
    assert!(r.status.success(), "restore across: {}", text(&r));
    restored
        .start_once(&[])
        .expect("a server on the restored chain, new keys only");
    assert_secrets(&restored, &admin, 20, "restored chain");
    restored.stop();

    // The backup before the rotation restores with the old keys.
    let mut before = Server::stopped(Path::new(BIN), &env_refs(&old_env));
    let target = before.data_dir.join("aedb");
    let r = aedb(
        &["restore", "--from", path(&full_dir), "--to", path(&target)],
        &old_only,
    );
    assert!(r.status.success(), "restore the old backup: {}", text(&r));
    before
        .start_once(&[])
        .expect("a server on the pre-rotation backup, old keys");
    assert_secrets(&before, &admin, 10, "pre-rotation backup");
}
