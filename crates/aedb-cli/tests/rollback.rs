//! `aedb check invariants --expect-head LSN:HASH`: the exit codes and the report an
//! operator reads when a directory is behind the head anchored off the machine
//! (the detection itself is tested in aedb's `recovery_bugs.rs`).

use std::path::Path;
use std::process::Command;

use aedb::{AedbConfig, AedbInstance, ChainHead};

const MK: [u8; 32] = [0x5a; 32];

fn cfg() -> AedbConfig {
    AedbConfig::production(MK).with_checkpoint_policy(None, None)
}

fn check(dir: &Path, expect_head: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aedb"))
        .args(["check", "invariants", "--data-dir"])
        .arg(dir)
        .args(["--expect-head", expect_head])
        .env("AEDB_MANIFEST_KEY", hex::encode(MK))
        .env_remove("AEDB_CHECKPOINT_KEY")
        .env_remove("AEDB_PREVIOUS_CHECKPOINT_KEY")
        .output()
        .expect("run aedb");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn commit(dir: &Path, keys: std::ops::Range<u32>) -> ChainHead {
    let db = AedbInstance::open(cfg(), dir).expect("open");
    if keys.start == 0 {
        db.create_project("p").expect("p");
        db.create_scope("p", "s").expect("s");
    }
    for i in keys {
        db.kv_set("p", "s", &i.to_be_bytes(), b"v").expect("set");
    }
    let head = db.chain_head().expect("head");
    db.close().expect("close");
    head
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("ls") {
        let e = e.expect("entry");
        if e.file_name() != "LOCK" && e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn a_stale_copy_exits_1_naming_both_heads_and_the_live_directory_exits_0() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let live = tmp.path().join("live");
    let stale_head = commit(&live, 0..10);
    let stale = tmp.path().join("stale");
    copy_dir(&live, &stale);
    let anchor = commit(&live, 10..20);
    assert!(anchor.lsn > stale_head.lsn);

    let (code, out) = check(&stale, &anchor.to_string());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expected chain head"), "{out}");
    assert!(
        out.contains(&anchor.to_string()) && out.contains(&stale_head.to_string()),
        "the report names both heads: {out}"
    );
    assert!(out.contains("CHECK FAILED"), "{out}");

    let (code, out) = check(&live, &anchor.to_string());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("chain head {anchor}")), "{out}");
    // A directory that moved on past the anchor still passes.
    commit(&live, 20..25);
    let (code, out) = check(&live, &anchor.to_string());
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_malformed_expect_head_is_refused_naming_the_expected_form() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let live = tmp.path().join("live");
    commit(&live, 0..3);
    for bad in ["42", "x:00", "42:abab"] {
        let (code, out) = check(&live, bad);
        assert_eq!(code, 2, "{bad}: {out}");
        assert!(out.contains("LSN:HASH"), "{bad}: names the form: {out}");
    }
}
