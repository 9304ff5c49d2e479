//! The `aedb` CLI's contract: exit codes, the directory lock, read-only inspection,
//! keys only from the environment or a key file, and the JSON output.

use std::path::Path;
use std::process::{Command, Output};

use aedb::{AedbConfig, AedbInstance};

const MK: [u8; 32] = [0x71; 32];
const CK: [u8; 32] = [0x72; 32];

fn cfg() -> AedbConfig {
    AedbConfig::production(MK).with_checkpoint_key(CK)
}

fn aedb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aedb"))
        .args(args)
        .env("AEDB_MANIFEST_KEY", hex::encode(MK))
        .env("AEDB_CHECKPOINT_KEY", hex::encode(CK))
        .output()
        .expect("run aedb")
}

fn make(dir: &Path) {
    let db = AedbInstance::open(cfg(), dir).expect("open");
    db.create_project("p").expect("p");
    db.create_scope("p", "s").expect("s");
    for i in 0..50u32 {
        db.kv_set("p", "s", &i.to_be_bytes(), b"value")
            .expect("set");
    }
    db.close().expect("close");
}

fn snapshot_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn check_invariants_passes_reads_encrypted_data_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    make(&data);
    let before = snapshot_of(&data);
    let out = aedb(&[
        "check",
        "invariants",
        "--data-dir",
        data.to_str().expect("utf8"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("all invariants hold"), "{text}");
    let json = aedb(&[
        "--json",
        "check",
        "invariants",
        "--data-dir",
        data.to_str().expect("utf8"),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(v["ok"], true);
    assert!(
        v["report"]["checks"]
            .as_array()
            .is_some_and(|c| c.len() >= 5)
    );
    assert_eq!(
        before,
        snapshot_of(&data),
        "inspection must not write into the directory"
    );
}

#[test]
fn exit_codes_distinguish_failed_checks_from_could_not_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    make(&data);
    let d = data.to_str().expect("utf8");
    // Locked by a running instance: could not run, and the pid is named.
    {
        let _db = AedbInstance::open(cfg(), &data).expect("open");
        let out = aedb(&["check", "invariants", "--data-dir", d]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("locked by pid {}", std::process::id())),
            "{err}"
        );
        // An audit export says how to export through the process that has it open.
        let out = aedb(&[
            "audit",
            "export",
            "--data-dir",
            d,
            "--out",
            tmp.path().join("audit.json").to_str().expect("utf8"),
        ]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("open in process {}", std::process::id()))
                && err.contains("aragora audit export"),
            "{err}"
        );
    }
    // Missing key: could not run, naming the variable.
    let out = Command::new(env!("CARGO_BIN_EXE_aedb"))
        .args(["check", "invariants", "--data-dir", d])
        .env("AEDB_MANIFEST_KEY", "abc")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AEDB_MANIFEST_KEY must be 64 hex"));
    // No way to pass a key on the command line.
    assert_eq!(
        aedb(&[
            "check",
            "invariants",
            "--data-dir",
            d,
            "--manifest-key",
            "00"
        ])
        .status
        .code(),
        Some(2)
    );
    // Damage: check failed (1), naming the file.
    let seg = std::fs::read_dir(&data)
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("segment");
    let mut b = std::fs::read(&seg).expect("read");
    b[200] ^= 1;
    std::fs::write(&seg, b).expect("write");
    let out = aedb(&["check", "invariants", "--data-dir", d]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("wal-0000000000000001.seg"));
}

#[test]
fn backup_restore_drill_and_parity_through_the_cli() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    make(&data);
    let p = |x: &Path| x.to_str().expect("utf8").to_string();
    let backups = tmp.path().join("backups");
    std::fs::create_dir_all(&backups).expect("mkdir");
    let full = backups.join("full");
    assert!(
        aedb(&[
            "backup",
            "full",
            "--data-dir",
            &p(&data),
            "--out",
            &p(&full)
        ])
        .status
        .success()
    );
    {
        let db = AedbInstance::open(cfg(), &data).expect("open");
        db.kv_set("p", "s", b"later", b"v").expect("set");
        db.close().expect("close");
    }
    let inc = backups.join("inc");
    let out = aedb(&[
        "backup",
        "incremental",
        "--data-dir",
        &p(&data),
        "--parent",
        &p(&full),
        "--out",
        &p(&inc),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(aedb(&["verify", "--backup", &p(&backups)]).status.success());
    let drill = aedb(&["--json", "drill", "--backup", &p(&backups)]);
    let v: serde_json::Value = serde_json::from_slice(&drill.stdout).expect("json");
    assert_eq!(v["ok"], true, "{v}");
    let restore = tmp.path().join("restore");
    assert!(
        aedb(&["restore", "--from", &p(&backups), "--to", &p(&restore)])
            .status
            .success()
    );
    assert!(
        aedb(&[
            "check",
            "parity",
            "--data-dir",
            &p(&restore),
            "--backup",
            &p(&backups)
        ])
        .status
        .success()
    );
    // Parity against the older (full) backup fails: the restored state has more.
    let out = aedb(&[
        "check",
        "parity",
        "--data-dir",
        &p(&restore),
        "--backup",
        &p(&full),
    ]);
    assert_eq!(out.status.code(), Some(1));
    // A non-empty target is refused and left untouched.
    let out = aedb(&["restore", "--from", &p(&backups), "--to", &p(&data)]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn audit_export_verify_and_capture() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    {
        let db = AedbInstance::open(cfg().with_bootstrap_admin("root"), &data).expect("open");
        db.create_project_as(&aedb::CallerContext::new("root").expect("caller id"), "p")
            .expect("p");
        db.close().expect("close");
    }
    let p = |x: &Path| x.to_str().expect("utf8").to_string();
    let file = tmp.path().join("audit.json");
    assert!(
        aedb(&[
            "audit",
            "export",
            "--data-dir",
            &p(&data),
            "--out",
            &p(&file)
        ])
        .status
        .success()
    );
    assert!(aedb(&["audit", "verify", &p(&file)]).status.success());
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
    doc["exports"][0]["rows"][0][3] = serde_json::json!({"Text": "mallory"});
    std::fs::write(&file, serde_json::to_vec(&doc).expect("json")).expect("write");
    assert_eq!(aedb(&["audit", "verify", &p(&file)]).status.code(), Some(1));

    let cap = tmp.path().join("capture");
    let before = snapshot_of(&data);
    assert!(
        aedb(&["capture", "--data-dir", &p(&data), "--out", &p(&cap)])
            .status
            .success()
    );
    assert_eq!(before, snapshot_of(&data));
    let sums = std::fs::read_to_string(cap.join("SHA256SUMS")).expect("sums");
    assert!(sums.contains("MANIFEST") && sums.contains(".seg"));
    let m = aedb(&["--json", "metrics", "--data-dir", &p(&data)]);
    let v: serde_json::Value = serde_json::from_slice(&m.stdout).expect("json");
    assert_eq!(v["metrics"]["authz_events"]["bootstrap"], 1);
}

/// After a manifest and checkpoint key rotation, a backup taken under the old
/// keys verifies and restores when the previous keys come from the key file (or
/// the environment), and is refused without them (exit 1, no key printed).
#[test]
fn previous_keys_from_a_key_file_verify_and_restore_a_pre_rotation_backup() {
    const NEW_MK: [u8; 32] = [0x73; 32];
    const NEW_CK: [u8; 32] = [0x74; 32];
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let backup = tmp.path().join("before");
    make(&data);
    let db = AedbInstance::open(cfg(), &data).expect("open");
    db.backup_full(&backup).expect("backup under the old keys");
    db.close().expect("close");

    let write_keys = |name: &str, lines: &[(&str, [u8; 32])]| {
        let path = tmp.path().join(name);
        let text: String = lines
            .iter()
            .map(|(k, v)| format!("{k}={}\n", hex::encode(v)))
            .collect();
        std::fs::write(&path, text).expect("key file");
        path
    };
    let rotating = write_keys(
        "rotating.env",
        &[
            ("AEDB_MANIFEST_KEY", NEW_MK),
            ("AEDB_CHECKPOINT_KEY", NEW_CK),
            ("AEDB_PREVIOUS_MANIFEST_KEY", MK),
            ("AEDB_PREVIOUS_CHECKPOINT_KEY", CK),
        ],
    );
    let new_only = write_keys(
        "new.env",
        &[
            ("AEDB_MANIFEST_KEY", NEW_MK),
            ("AEDB_CHECKPOINT_KEY", NEW_CK),
        ],
    );
    let run = |keys: &Path, args: &[&str]| {
        let mut full = vec!["--key-file", keys.to_str().expect("utf-8")];
        full.extend_from_slice(args);
        Command::new(env!("CARGO_BIN_EXE_aedb"))
            .args(&full)
            .env_remove("AEDB_MANIFEST_KEY")
            .env_remove("AEDB_CHECKPOINT_KEY")
            .env_remove("AEDB_PREVIOUS_MANIFEST_KEY")
            .env_remove("AEDB_PREVIOUS_CHECKPOINT_KEY")
            .output()
            .expect("run aedb")
    };
    let b = backup.to_str().expect("utf-8");
    let out = run(&rotating, &["verify", "--backup", b]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run(&new_only, &["verify", "--backup", b]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("wrong manifest key"), "{shown}");
    for k in [MK, CK, NEW_MK, NEW_CK] {
        assert!(!shown.contains(&hex::encode(k)), "{shown}");
    }
    let target = tmp.path().join("restored");
    let out = run(
        &rotating,
        &[
            "restore",
            "--from",
            b,
            "--to",
            target.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // The restore was re-signed: the new keys alone check it.
    let out = run(
        &new_only,
        &[
            "check",
            "invariants",
            "--data-dir",
            target.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A previous manifest key without a current one cannot run.
    let lonely = write_keys("lonely.env", &[("AEDB_PREVIOUS_MANIFEST_KEY", MK)]);
    let out = run(&lonely, &["verify", "--backup", b]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AEDB_PREVIOUS_MANIFEST_KEY"), "{err}");
}

/// Issue #18: the data lives in table files after a checkpoint; `check invariants`
/// reads every block of every listed table, and a damaged one fails the check
/// (exit 1), naming the file.
#[test]
fn check_invariants_verifies_every_table_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    make(&data);
    {
        let db = AedbInstance::open(cfg(), &data).expect("open");
        db.checkpoint().expect("checkpoint");
        db.close().expect("close");
    }
    let d = data.to_str().expect("utf8");
    let out = aedb(&["--json", "check", "invariants", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let checks = v["report"]["checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        checks
            .iter()
            .any(|c| c["name"] == "table files" && c["ok"] == true),
        "{checks:?}"
    );
    let table = std::fs::read_dir(&data)
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "tbl"))
        .expect("a table file");
    let mut b = std::fs::read(&table).expect("read");
    b[40] ^= 1;
    std::fs::write(&table, b).expect("write");
    let out = aedb(&["check", "invariants", "--data-dir", d]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let name = table
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(text.contains(&name), "{text}");
}
