//! Runs every `cargo run --bin aedb -- ...` command of our runbook edition
//! (docs/runbooks/aedb-security-operations.md) against a real, encrypted database.

use std::path::{Path, PathBuf};
use std::process::Command;

use aedb::{AedbConfig, AedbInstance, CallerContext, DdlOperation, Permission};

const MK: [u8; 32] = [0x61; 32];
const CK: [u8; 32] = [0x62; 32];

fn make_db(dir: &Path) {
    let cfg = AedbConfig::production(MK)
        .with_checkpoint_key(CK)
        .with_bootstrap_admin("root");
    let db = AedbInstance::open(cfg, dir).expect("open");
    let root = CallerContext::new("root").expect("caller id");
    db.create_project_as(&root, "payments").expect("project");
    db.create_scope_as(&root, "payments", "eu").expect("scope");
    db.commit_ddl_as(
        &root,
        vec![DdlOperation::GrantPermission {
            grantee: "svc".into(),
            permission: Permission::KvWrite {
                project: "payments".into(),
                scope: None,
                prefix: None,
            },
            delegable: false,
        }],
    )
    .expect("grant");
    let svc = CallerContext::new("svc").expect("caller id");
    for i in 0..200u32 {
        db.kv_set_as(
            &svc,
            "payments",
            "eu",
            format!("order-{i}").as_bytes(),
            b"{\"amount\":1}",
        )
        .expect("write");
    }
    assert!(
        db.kv_get(&svc, "payments", "eu", b"order-1").is_err(),
        "a denial for the audit table"
    );
    db.checkpoint().expect("checkpoint");
    db.kv_set_as(&svc, "payments", "eu", b"after-checkpoint", b"x")
        .expect("write");
    db.close().expect("close");
}

fn commands(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in doc.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = t == "```sh";
            continue;
        }
        if in_sh && let Some(rest) = t.strip_prefix("cargo run --bin aedb -- ") {
            out.push(rest.to_string());
        }
    }
    out
}

#[test]
fn runbook_edition_commands_work_against_a_real_database() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/runbooks/aedb-security-operations.md");
    let doc = std::fs::read_to_string(&doc_path).expect("runbook edition");
    let cmds = commands(&doc);
    assert!(
        cmds.len() >= 12,
        "expected the runbook's commands, found {cmds:?}"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let data: PathBuf = tmp.path().join("data");
    let backups = tmp.path().join("backups");
    make_db(&data);
    std::fs::create_dir_all(&backups).expect("mkdir");
    // `verify --backup $BACKUPS` appears before the backup steps: seed a chain.
    {
        let db = AedbInstance::open(AedbConfig::production(MK).with_checkpoint_key(CK), &data)
            .expect("open");
        db.backup_full(&backups.join("full-000"))
            .expect("seed backup");
        db.close().expect("close");
    }
    let vars = [
        ("$DATA_DIR", data.clone()),
        ("$BACKUPS", backups.clone()),
        ("$RESTORE_DIR", tmp.path().join("restore")),
        ("$CAPTURE_DIR", tmp.path().join("capture")),
        ("$AUDIT_FILE", tmp.path().join("audit.json")),
    ];
    for cmd in &cmds {
        let mut args = Vec::new();
        for word in cmd.split_whitespace() {
            let mut w = word.to_string();
            for (k, v) in &vars {
                w = w.replace(k, &v.to_string_lossy());
            }
            args.push(w);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_aedb"))
            .args(&args)
            .env("AEDB_MANIFEST_KEY", hex::encode(MK))
            .env("AEDB_CHECKPOINT_KEY", hex::encode(CK))
            .output()
            .expect("run aedb");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "`aedb {cmd}` failed ({:?}):\n{stdout}\n{stderr}",
            out.status.code()
        );
        assert!(
            !stdout.contains(&hex::encode(MK)) && !stderr.contains(&hex::encode(CK)),
            "keys leaked"
        );
    }
    assert!(tmp.path().join("capture/SHA256SUMS").exists());
    assert!(tmp.path().join("restore/MANIFEST").exists());
}
