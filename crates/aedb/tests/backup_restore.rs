//! Full + incremental hash-chained backups and strict restore. The first two test
//! names are the runbook's, verbatim.

use std::path::{Path, PathBuf};

use aedb::{
    AedbConfig, AedbInstance, Column, ColumnType, RestoreError, TableSchema, Value, inspect,
    restore_from_backup_chain, verify_backup_chain,
};

const MK: [u8; 32] = [0x41; 32];
const CK: [u8; 32] = [0x42; 32];

fn cfg() -> AedbConfig {
    AedbConfig::production(MK)
        .with_checkpoint_key(CK)
        .with_segment_bytes(256 * 1024)
        .with_limits(aedb::Limits {
            max_txn_bytes: 64 * 1024,
            max_value_bytes: 16 * 1024,
            ..Default::default()
        })
}

fn write(db: &AedbInstance, from: u32, to: u32) {
    for i in from..to {
        let mut tx = db.begin_write("p").expect("tx");
        tx.kv_set(
            "s",
            format!("k{i:06}").as_bytes(),
            &vec![(i % 251) as u8; 300],
        )
        .expect("set");
        tx.put_row(
            "s",
            "t",
            vec![Value::Int(i64::from(i)), Value::Text(format!("row {i}"))],
        )
        .expect("row");
        db.commit(tx).expect("commit");
    }
}

/// A database with a full backup and `incrementals` incremental backups, each after
/// more writes (spanning several WAL segments and a checkpoint). Returns the chain.
fn build_chain(root: &Path, incrementals: usize) -> (Vec<PathBuf>, u32) {
    let data = root.join("data");
    let db = AedbInstance::open(cfg(), &data).expect("open");
    db.create_project("p").expect("p");
    db.create_scope("p", "s").expect("s");
    db.create_table(
        "p",
        "s",
        "t",
        TableSchema::new(
            vec![
                Column::new("id", ColumnType::Int),
                Column::new("v", ColumnType::Text),
            ],
            vec!["id".into()],
        ),
    )
    .expect("table");
    write(&db, 0, 300);
    // The full backup copies the live checkpoint and the WAL written after it.
    db.checkpoint().expect("checkpoint");
    write(&db, 300, 350);
    let mut chain = vec![root.join("b00-full")];
    db.backup_full(&chain[0]).expect("full backup");
    let mut n = 350;
    for i in 1..=incrementals {
        write(&db, n, n + 200);
        n += 200;
        if i == 2 {
            db.checkpoint()
                .expect("a checkpoint between incrementals must keep the WAL they need");
        }
        let dest = root.join(format!("b{i:02}-inc"));
        db.backup_incremental(&dest, chain.last().expect("parent"))
            .expect("incremental");
        chain.push(dest);
    }
    db.close().expect("close");
    (chain, n)
}

fn assert_restored(target: &Path, n: u32) {
    let report = inspect(target, &cfg()).expect("inspect");
    assert!(report.ok(), "{:#?}", report.checks);
    let db = AedbInstance::open(cfg(), target).expect("strict open of the restore");
    let snap = db.snapshot().expect("snapshot");
    assert_eq!(snap.kv("p", "s").expect("kv").len(), n as usize);
    assert_eq!(snap.table("p", "s", "t").expect("t").len(), n as usize);
    let last = format!("k{:06}", n - 1);
    assert_eq!(
        snap.kv("p", "s")
            .expect("kv")
            .get(last.as_bytes())
            .expect("read")
            .map(|v| v.len()),
        Some(300)
    );
}

#[test]
fn strict_backup_chain_restore_succeeds_with_hash_chain_enforcement() {
    let root = tempfile::tempdir().expect("tempdir");
    let (chain, n) = build_chain(root.path(), 3);
    let report = verify_backup_chain(&cfg(), &chain).expect("chain verifies");
    assert_eq!(report.backups.len(), 4);
    assert!(report.frames_verified >= 600);
    let target = root.path().join("restore");
    let r = restore_from_backup_chain(&cfg(), &chain, &target).expect("restore");
    assert_eq!(r.end_lsn, report.end_lsn);
    assert_restored(&target, n);
    // The restored database continues the hash chain: it accepts new commits and
    // reopens strictly.
    let db = AedbInstance::open(cfg(), &target).expect("open");
    write(&db, n, n + 5);
    db.close().expect("close");
    assert_restored(&target, n + 5);
}

#[test]
fn strict_backup_chain_restore_rejects_tampered_incremental_segment() {
    let root = tempfile::tempdir().expect("tempdir");
    let (chain, _) = build_chain(root.path(), 2);
    let seg = std::fs::read_dir(&chain[2])
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("an incremental segment");
    let mut bytes = std::fs::read(&seg).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&seg, bytes).expect("write");
    let target = root.path().join("restore");
    match restore_from_backup_chain(&cfg(), &chain, &target) {
        Err(RestoreError::Corruption { file, .. }) => {
            assert_eq!(file, seg, "the error names the member")
        }
        other => panic!(
            "expected Corruption naming {}, got {other:?}",
            seg.display()
        ),
    }
    assert!(!target.exists(), "nothing is left half-restored");
    assert!(!root.path().join("restore.restoring").exists());
}

#[test]
fn restore_after_many_incrementals() {
    let root = tempfile::tempdir().expect("tempdir");
    let (chain, n) = build_chain(root.path(), 8);
    let target = root.path().join("restore");
    restore_from_backup_chain(&cfg(), &chain, &target).expect("restore");
    assert_restored(&target, n);
    // The chain can also be found from the directory holding the backups.
    let found = aedb::discover_chain(root.path(), &cfg()).expect("discover");
    assert_eq!(found, chain);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("ls") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, to.join(p.file_name().expect("name"))).expect("copy");
    }
}

#[test]
fn every_member_tampered_in_turn_is_rejected_by_name() {
    let root = tempfile::tempdir().expect("tempdir");
    let (chain, _) = build_chain(root.path(), 2);
    let other_root = tempfile::tempdir().expect("tempdir");
    let (other_chain, _) = build_chain(other_root.path(), 2);
    let members: Vec<(usize, PathBuf)> = chain
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            std::fs::read_dir(d)
                .expect("ls")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .map(move |p| (i, p))
        })
        .collect();
    assert!(members.len() >= 5);
    for (i, member) in &members {
        let name = member
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        for how in ["flip", "truncate", "delete", "swap"] {
            let work = tempfile::tempdir().expect("tempdir");
            let copies: Vec<PathBuf> = chain
                .iter()
                .map(|d| {
                    let c = work.path().join(d.file_name().expect("name"));
                    copy_dir(d, &c);
                    c
                })
                .collect();
            let victim = copies[*i].join(&name);
            match how {
                "flip" => {
                    let mut b = std::fs::read(&victim).expect("read");
                    let at = b.len() / 3;
                    b[at] ^= 0x20;
                    std::fs::write(&victim, b).expect("write");
                }
                "truncate" => {
                    let b = std::fs::read(&victim).expect("read");
                    std::fs::write(&victim, &b[..b.len() / 2]).expect("write");
                }
                "delete" => std::fs::remove_file(&victim).expect("rm"),
                _ => {
                    let foreign = other_chain[*i].join(&name);
                    if !foreign.exists() {
                        continue;
                    }
                    std::fs::copy(&foreign, &victim).expect("swap");
                }
            }
            let target = work.path().join("restore");
            let err = restore_from_backup_chain(&cfg(), &copies, &target)
                .expect_err(&format!("{how} of {name} in backup {i} must be rejected"));
            let msg = err.to_string();
            assert!(
                msg.contains(&name) || msg.contains(copies[*i].to_string_lossy().as_ref()),
                "{how} {name}: error must name the member or its backup: {msg}"
            );
            assert!(!target.exists());
        }
    }
}

#[test]
fn wrong_key_reordered_chain_and_nonempty_target_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let (chain, _) = build_chain(root.path(), 2);
    let target = root.path().join("restore");
    let foreign = AedbConfig::production([9; 32]).with_checkpoint_key(CK);
    assert!(matches!(
        restore_from_backup_chain(&foreign, &chain, &target),
        Err(RestoreError::Corruption { .. })
    ));
    let reordered = vec![chain[0].clone(), chain[2].clone(), chain[1].clone()];
    assert!(matches!(
        restore_from_backup_chain(&cfg(), &reordered, &target),
        Err(RestoreError::Corruption { .. })
    ));
    let missing = vec![chain[0].clone(), chain[2].clone()];
    assert!(restore_from_backup_chain(&cfg(), &missing, &target).is_err());
    std::fs::create_dir_all(&target).expect("mkdir");
    std::fs::write(target.join("precious"), b"keep me").expect("write");
    assert!(matches!(
        restore_from_backup_chain(&cfg(), &chain, &target),
        Err(RestoreError::InvalidArgument(_))
    ));
    assert_eq!(
        std::fs::read(target.join("precious")).expect("read"),
        b"keep me"
    );
}

#[test]
fn interrupted_backup_and_restore_leave_nothing_that_looks_complete() {
    let root = tempfile::tempdir().expect("tempdir");
    let (chain, n) = build_chain(root.path(), 1);
    // A crash mid-backup leaves only `<dest>.partial` (no descriptor is ever written
    // into the final name before it is complete); a crash mid-restore leaves only
    // `<target>.restoring`. Simulate both leftovers and rerun.
    let partial = root.path().join("b02-inc.partial");
    std::fs::create_dir_all(&partial).expect("mkdir");
    std::fs::write(partial.join("wal-0000000000000009.seg"), b"half").expect("write");
    let found = aedb::discover_chain(root.path(), &cfg()).expect("discover ignores partial dirs");
    assert_eq!(found, chain);
    let target = root.path().join("restore");
    let restoring = root.path().join("restore.restoring");
    std::fs::create_dir_all(&restoring).expect("mkdir");
    std::fs::write(
        restoring.join("checkpoint-00000000000000000001.ckpt"),
        b"junk",
    )
    .expect("write");
    restore_from_backup_chain(&cfg(), &chain, &target).expect("rerun after an interrupted restore");
    assert!(!restoring.exists());
    assert_restored(&target, n);
}
