//! Rotating both keys the AEDB runbook names (issue #16, item 3b): the manifest
//! (HMAC) key, which also keys the WAL chain and signs backups, and the checkpoint
//! key. The procedure is the runbook's: a backup before, the rotation (open with
//! the new keys and the previous ones), a backup after, then both chains verify and
//! restore, and the data directory opens with the new keys alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aedb::{
    AedbConfig, AedbInstance, FaultPlan, FaultStorage, Limits, OpenError, RestoreError,
    restore_from_backup_chain, verify_backup_chain,
};

const MK_OLD: [u8; 32] = [0x61; 32];
const CK_OLD: [u8; 32] = [0x62; 32];
const MK_NEW: [u8; 32] = [0x63; 32];
const CK_NEW: [u8; 32] = [0x64; 32];
const MK_OTHER: [u8; 32] = [0x65; 32];
const CK_OTHER: [u8; 32] = [0x66; 32];

/// Small segments (several per test) and no automatic checkpoints: every
/// checkpoint in these tests is the one the test (or the rotation) asks for.
fn base(c: AedbConfig) -> AedbConfig {
    c.with_segment_bytes(64 * 1024)
        .with_checkpoint_policy(None, None)
        .with_limits(Limits {
            max_txn_bytes: 16 * 1024,
            max_value_bytes: 8 * 1024,
            ..Limits::default()
        })
}

fn old() -> AedbConfig {
    base(AedbConfig::production(MK_OLD).with_checkpoint_key(CK_OLD))
}

fn new_only() -> AedbConfig {
    base(AedbConfig::production(MK_NEW).with_checkpoint_key(CK_NEW))
}

fn rotating() -> AedbConfig {
    new_only()
        .with_previous_manifest_key(MK_OLD)
        .with_previous_checkpoint_key(CK_OLD)
}

fn key(i: u32) -> Vec<u8> {
    format!("k{i:05}").into_bytes()
}

fn value(i: u32) -> Vec<u8> {
    vec![(i % 251) as u8; 1500]
}

fn write(db: &AedbInstance, range: std::ops::Range<u32>) {
    for i in range {
        db.kv_set("p", "s", &key(i), &value(i)).expect("commit");
    }
}

/// Every key of `range` reads back with its value, and nothing else is there.
fn assert_exactly(db: &AedbInstance, range: std::ops::Range<u32>, what: &str) {
    let snap = db.snapshot().expect("snapshot");
    let kv = snap.kv("p", "s").expect("scope");
    for i in range.clone() {
        assert_eq!(
            kv.get(&key(i)).expect("read").map(|v| v.to_vec()),
            Some(value(i)),
            "{what}: key {i}"
        );
    }
    assert_eq!(kv.len(), range.len(), "{what}: number of keys");
}

fn create(dir: &Path, cfg: AedbConfig, range: std::ops::Range<u32>) -> AedbInstance {
    let db = AedbInstance::open(cfg, dir).expect("open");
    db.create_project("p").expect("project");
    db.create_scope("p", "s").expect("scope");
    write(&db, range);
    db
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

/// The manifest key id each segment header records (bytes 88..96).
fn chain_key_ids(dir: &Path) -> Vec<Vec<u8>> {
    segments(dir)
        .iter()
        .map(|p| std::fs::read(p).expect("read")[88..96].to_vec())
        .collect()
}

/// An error shown to an operator never carries key material.
fn assert_no_key_material(text: &str) {
    for k in [MK_OLD, CK_OLD, MK_NEW, CK_NEW, MK_OTHER, CK_OTHER] {
        assert!(!text.contains(&hex::encode(k)), "key material in {text}");
    }
}

/// The runbook's procedure end to end: backup, rotate both keys, backup, verify
/// and restore both chains; the directory then opens with the new keys alone.
#[test]
fn rotating_both_keys_keeps_every_backup_verifiable_and_restorable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let full_1 = tmp.path().join("full-1");
    let inc_1 = tmp.path().join("inc-1");
    let full_2 = tmp.path().join("full-2");

    // Before: a full backup under the old keys; later writes stay in the log for
    // the next incremental (the backup floor), in segments chained under MK_OLD.
    let db = create(&data, old(), 0..40);
    db.backup_full(&full_1).expect("full backup before");
    write(&db, 40..60);
    db.close().expect("close");

    // The rotation: new keys, the old ones as previous. Open re-signs the directory.
    let db = AedbInstance::open(rotating(), &data).expect("open with new + previous keys");
    assert_exactly(&db, 0..60, "after the rotating open");
    write(&db, 60..80);
    // After: the chain continues across the rotation.
    let inc = db
        .backup_incremental(&inc_1, &full_1)
        .expect("incremental after the rotation");
    assert_eq!(inc.kind, "incremental");
    db.close().expect("close");
    let ids = chain_key_ids(&data);
    assert!(
        ids.len() >= 2 && ids[0] != ids[ids.len() - 1],
        "segments chained under the old manifest key are kept for the backup floor: {ids:?}"
    );

    // The new keys alone open the directory, the old-key segments included
    // (authenticated by the digests the re-signed manifest records).
    let db = AedbInstance::open(new_only(), &data).expect("new keys alone open");
    assert_exactly(&db, 0..80, "new keys alone");
    write(&db, 80..90);
    db.backup_full(&full_2)
        .expect("full backup under the new keys");
    db.checkpoint().expect("checkpoint");
    db.close().expect("close");
    let ids = chain_key_ids(&data);
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "the next checkpoint after the floor moved removed the old-key segments: {ids:?}"
    );

    // Both chains verify with the new keys plus the previous ones...
    let chain_1 = vec![full_1.clone(), inc_1.clone()];
    let report = verify_backup_chain(&rotating(), &chain_1).expect("verify the chain across");
    assert_eq!(report.backups.len(), 2);
    assert!(report.frames_verified > 0);
    verify_backup_chain(&rotating(), std::slice::from_ref(&full_2)).expect("verify full-2");
    // ...the pre-rotation backup with the old keys as the current ones...
    verify_backup_chain(&old(), std::slice::from_ref(&full_1)).expect("old keys, old backup");
    // ...and the post-rotation full backup with the new keys alone.
    verify_backup_chain(&new_only(), std::slice::from_ref(&full_2)).expect("new keys, new backup");

    // Without the previous key, the pre-rotation descriptor does not verify, and
    // the error names the key ids (never a key).
    match verify_backup_chain(&new_only(), &chain_1) {
        Err(RestoreError::Corruption { file, reason, .. }) => {
            assert!(file.starts_with(&full_1), "{}", file.display());
            assert!(reason.contains("wrong manifest key"), "{reason}");
            assert!(
                reason.contains("previous manifest key is not set"),
                "{reason}"
            );
            assert_no_key_material(&reason);
        }
        other => panic!("expected a wrong-key refusal, got {other:?}"),
    }
    // The old keys alone do not verify the incremental signed after the rotation.
    assert!(matches!(
        verify_backup_chain(&old(), &chain_1),
        Err(RestoreError::Corruption { .. })
    ));

    // Restores: every key of each chain reads back, and each restored directory
    // opens with the new keys alone (the restore's open re-signed it).
    let r1 = tmp.path().join("restored-1");
    let rep = restore_from_backup_chain(&rotating(), &chain_1, &r1).expect("restore across");
    assert_eq!(rep.backups, 2);
    let db = AedbInstance::open(new_only(), &r1).expect("restored chain opens with new keys");
    assert_exactly(&db, 0..80, "restored full-1 + inc-1");
    db.close().expect("close");

    let r0 = tmp.path().join("restored-0");
    restore_from_backup_chain(&old(), std::slice::from_ref(&full_1), &r0)
        .expect("restore the old backup with the old keys");
    let db = AedbInstance::open(old(), &r0).expect("open");
    assert_exactly(&db, 0..40, "restored full-1 under the old keys");
    db.close().expect("close");

    let r2 = tmp.path().join("restored-2");
    restore_from_backup_chain(&new_only(), std::slice::from_ref(&full_2), &r2).expect("restore");
    let db = AedbInstance::open(new_only(), &r2).expect("open");
    assert_exactly(&db, 0..90, "restored full-2");
    db.close().expect("close");

    // The live directory no longer opens with the old manifest key.
    match AedbInstance::open(old(), &data) {
        Err(OpenError::Corruption { file, reason, .. }) => {
            assert!(file.ends_with("MANIFEST"), "{}", file.display());
            assert!(reason.contains("wrong manifest key"), "{reason}");
            assert_no_key_material(&reason);
        }
        other => panic!("expected the old manifest key refused, got {other:?}"),
    }
}

/// Keys that are neither the current nor the previous ones are refused, naming
/// which key does not match, never printing one.
#[test]
fn keys_that_are_neither_current_nor_previous_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let db = create(&data, old(), 0..10);
    db.checkpoint()
        .expect("checkpoint under the old checkpoint key");
    write(&db, 10..15);
    db.close().expect("close");

    // A wrong previous manifest key: the manifest (signed under MK_OLD) is refused.
    let wrong_manifest = new_only()
        .with_previous_manifest_key(MK_OTHER)
        .with_previous_checkpoint_key(CK_OLD);
    match AedbInstance::open(wrong_manifest, &data) {
        Err(OpenError::Corruption { file, reason, .. }) => {
            assert!(file.ends_with("MANIFEST"), "{}", file.display());
            assert!(reason.contains("wrong manifest key"), "{reason}");
            assert!(
                reason.contains("the configured manifest key has id")
                    && reason.contains("the previous manifest key has id"),
                "{reason}"
            );
            assert_no_key_material(&reason);
        }
        other => panic!("expected the manifest refused, got {other:?}"),
    }
    // A wrong previous checkpoint key: the checkpoint is refused as a key mismatch.
    let wrong_checkpoint = new_only()
        .with_previous_manifest_key(MK_OLD)
        .with_previous_checkpoint_key(CK_OTHER);
    match AedbInstance::open(wrong_checkpoint, &data) {
        Err(OpenError::KeyMismatch { file, reason }) => {
            assert!(
                file.to_string_lossy().ends_with(".ckpt"),
                "{}",
                file.display()
            );
            assert!(
                reason.contains("checkpoint is encrypted with key id"),
                "{reason}"
            );
            assert_no_key_material(&reason);
        }
        other => panic!("expected the checkpoint refused, got {other:?}"),
    }
    // Neither refusal changed anything: the right keys still rotate the directory.
    let db = AedbInstance::open(rotating(), &data).expect("rotate");
    assert_exactly(&db, 0..15, "after two refused opens");
    db.close().expect("close");
    let db = AedbInstance::open(new_only(), &data).expect("new keys alone");
    assert_exactly(&db, 0..15, "new keys alone");
    db.close().expect("close");
}

/// A segment kept under the old manifest key (for the backup floor) is
/// authenticated without that key by the digest the re-signed manifest records:
/// a frame altered there, even with a valid checksum, is refused.
#[test]
fn an_altered_old_key_segment_is_refused_without_the_old_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let db = create(&data, old(), 0..20);
    db.backup_full(&tmp.path().join("full")).expect("backup");
    write(&db, 20..60);
    db.close().expect("close");
    AedbInstance::open(rotating(), &data)
        .expect("rotate")
        .close()
        .expect("close");
    let old_id = chain_key_ids(&data)[0].clone();
    let victim = segments(&data)
        .into_iter()
        .find(|p| std::fs::read(p).expect("read")[88..96] == old_id[..])
        .expect("an old-key segment is kept");
    let mut bytes = std::fs::read(&victim).expect("read");
    // The first frame's payload changes, its CRC is made to match again.
    let len =
        (u32::from_le_bytes(bytes[128..132].try_into().expect("4 bytes")) & !(1 << 31)) as usize;
    bytes[128 + 48 + len / 2] ^= 0x40;
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&bytes[128 + 8..128 + 48]),
        &bytes[128 + 48..128 + 48 + len],
    );
    bytes[132..136].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&victim, &bytes).expect("write");

    match AedbInstance::open(new_only(), &data) {
        Err(OpenError::Corruption { file, reason, .. }) => {
            assert_eq!(file, victim);
            assert!(reason.contains("digest the manifest records"), "{reason}");
        }
        other => panic!("expected the altered segment refused, got {other:?}"),
    }
    // With the old key the chain itself shows it.
    match AedbInstance::open(rotating(), &data) {
        Err(OpenError::Corruption { reason, .. }) => {
            assert!(reason.contains("hash chain broken"), "{reason}");
        }
        other => panic!("expected the altered segment refused, got {other:?}"),
    }
}

/// Segments written before headers recorded the chain key's id (bytes 88..96
/// zero) are matched to the current or previous manifest key by their first frame.
#[test]
fn segments_without_a_recorded_chain_key_id_rotate_too() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let db = create(&data, old(), 0..50);
    db.close().expect("close");
    for p in segments(&data) {
        let mut b = std::fs::read(&p).expect("read");
        b[88..96].fill(0);
        let crc = crc32c::crc32c(&b[0..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, &b).expect("write");
    }
    // The old keys as current still read them (first frame verifies under MK_OLD).
    let db = AedbInstance::open(old(), &data).expect("old keys read id-less segments");
    assert_exactly(&db, 0..50, "old keys");
    db.close().expect("close");
    let db = AedbInstance::open(rotating(), &data).expect("rotate id-less segments");
    write(&db, 50..55);
    db.close().expect("close");
    let db = AedbInstance::open(new_only(), &data).expect("new keys alone");
    assert_exactly(&db, 0..55, "after rotating id-less segments");
    db.close().expect("close");
}

// ---------------------------------------------------------------------------------
// Power loss during the re-sign (the style of tests/power_loss.rs: a simulated
// disk keeps only what was fsynced, torn sectors at the tails).

const DB: &str = "/db";
const FULL: &str = "/full";

fn on(fs: &FaultStorage, cfg: AedbConfig) -> AedbConfig {
    cfg.with_storage(Arc::new(fs.clone()))
}

/// Old keys: data, a full backup (the floor), more data in the log.
fn before_rotation(fs: &FaultStorage) {
    let db = create(Path::new(DB), on(fs, old()), 0..30);
    db.checkpoint().expect("checkpoint");
    write(&db, 30..40);
    db.backup_full(Path::new(FULL)).expect("backup");
    write(&db, 40..70);
    db.close().expect("close");
}

/// A power loss at any storage call of the rotating open (the re-sign: new
/// segment, manifest, checkpoint, manifest, removals) leaves a directory that
/// opens with the new and previous keys, with every commit; once an open with
/// them completes, the new keys alone open it, and the backup taken before still
/// verifies.
#[test]
fn power_loss_at_any_point_of_the_resign_leaves_a_directory_that_opens() {
    let reference = FaultStorage::default();
    before_rotation(&reference);
    let from = reference.calls();
    AedbInstance::open(on(&reference, rotating()), DB)
        .expect("rotating open")
        .close()
        .expect("close");
    let to = reference.calls();
    assert!(
        to > from + 10,
        "the re-sign makes storage calls ({from}..{to})"
    );
    let mut crashed_inside = 0;
    for n in from..to {
        let fs = FaultStorage::new(FaultPlan {
            fault: None,
            crash_at: Some(n),
        });
        before_rotation(&fs);
        if let Ok(db) = AedbInstance::open(on(&fs, rotating()), DB) {
            let _ = db.close();
        }
        assert!(fs.crashed(), "power lost at call {n}");
        for torn in [None, Some(n)] {
            let disk = fs.power_loss(torn);
            let db = AedbInstance::open(on(&disk, rotating()), DB)
                .unwrap_or_else(|e| panic!("call {n} (torn {torn:?}): rotating open refused: {e}"));
            assert_exactly(&db, 0..70, &format!("power lost at call {n}"));
            db.close().expect("close");
            let db = AedbInstance::open(on(&disk, new_only()), DB).unwrap_or_else(|e| {
                panic!("call {n}: new keys alone refused after a completed rotation: {e}")
            });
            assert_exactly(&db, 0..70, &format!("new keys alone, call {n}"));
            db.close().expect("close");
            verify_backup_chain(&on(&disk, rotating()), &[PathBuf::from(FULL)])
                .unwrap_or_else(|e| panic!("call {n}: the backup before no longer verifies: {e}"));
        }
        crashed_inside += 1;
    }
    assert!(crashed_inside > 0);
}
