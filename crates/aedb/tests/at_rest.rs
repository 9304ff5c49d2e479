//! Checkpoints, encryption at rest, the signed manifest, secure open and key rotation.

use std::path::{Path, PathBuf};

use aedb::{AedbConfig, AedbInstance, ConsistencyMode, DurabilityMode, OpenError, RecoveryMode};

const MK: [u8; 32] = [0x11; 32];
const CK: [u8; 32] = [0x22; 32];
const CK2: [u8; 32] = [0x33; 32];

fn prod() -> AedbConfig {
    AedbConfig::production(MK).with_checkpoint_key(CK)
}

fn fill(db: &AedbInstance, from: u32, to: u32) {
    for i in from..to {
        let mut tx = db.begin_write("p").expect("tx");
        tx.kv_set(
            "s",
            format!("key-{i:05}").as_bytes(),
            format!("SECRET-VALUE-{i}").as_bytes(),
        )
        .expect("set");
        db.commit(tx).expect("commit");
    }
}

fn create(dir: &Path, cfg: AedbConfig, n: u32) {
    let db = AedbInstance::open(cfg, dir).expect("open");
    db.create_project("p").expect("p");
    db.create_scope("p", "s").expect("s");
    fill(&db, 0, n);
    db.checkpoint().expect("checkpoint");
    fill(&db, n, n + 10);
    db.close().expect("close");
}

fn count(db: &AedbInstance) -> usize {
    db.snapshot()
        .expect("snapshot")
        .kv("p", "s")
        .expect("kv")
        .len()
}

fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, offset: usize) {
    let mut b = std::fs::read(path).expect("read");
    b[offset] ^= 0x40;
    std::fs::write(path, b).expect("write");
}

#[test]
fn checkpoint_round_trip_without_keys_replays_only_the_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = || {
        AedbConfig::development()
            .with_segment_bytes(128 * 1024)
            .with_limits(aedb::Limits {
                max_txn_bytes: 32 * 1024,
                max_value_bytes: 16 * 1024,
                ..Default::default()
            })
    };
    create(dir.path(), cfg(), 2000);
    assert_eq!(files(dir.path(), ".ckpt").len(), 1);
    let db = AedbInstance::open(cfg(), dir.path()).expect("reopen");
    assert_eq!(count(&db), 2010);
    assert_eq!(
        db.recovery_report().frames_replayed,
        10,
        "only the WAL after the checkpoint is replayed"
    );
    let loaded = db
        .begin_read(ConsistencyMode::AtCheckpoint)
        .expect("the loaded checkpoint is readable");
    assert_eq!(loaded.seq() + 10, db.snapshot().expect("snapshot").seq());
    assert_eq!(loaded.kv("p", "s").expect("kv").len(), 2000);
    assert!(db.operational_metrics().checkpoint_age_secs.is_some());
    let info = db.checkpoint().expect("second checkpoint");
    assert_eq!(info.lsn, db.snapshot().expect("snapshot").seq());
    assert_eq!(
        files(dir.path(), ".ckpt").len(),
        1,
        "the old checkpoint is removed"
    );
    let at = db
        .begin_read(ConsistencyMode::AtCheckpoint)
        .expect("at checkpoint");
    assert_eq!(at.seq(), info.lsn);
}

#[test]
fn encrypted_files_hide_values_and_reopen_with_the_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    create(dir.path(), prod(), 50);
    for f in files(dir.path(), ".seg")
        .into_iter()
        .chain(files(dir.path(), ".ckpt"))
    {
        let bytes = std::fs::read(&f).expect("read");
        assert!(
            !bytes.windows(12).any(|w| w == b"SECRET-VALUE"),
            "{} holds plaintext",
            f.display()
        );
    }
    AedbInstance::open_production(prod(), dir.path())
        .expect("production open accepts it")
        .close()
        .expect("close");
    let db = AedbInstance::open(prod(), dir.path()).expect("reopen");
    assert_eq!(count(&db), 60);
    assert_eq!(
        db.snapshot()
            .expect("snapshot")
            .kv("p", "s")
            .expect("kv")
            .get(b"key-00059")
            .expect("read")
            .as_deref(),
        Some(&b"SECRET-VALUE-59"[..])
    );
}

#[test]
fn wrong_keys_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    create(dir.path(), prod(), 20);
    let wrong_ckpt = AedbInstance::open(
        AedbConfig::production(MK).with_checkpoint_key(CK2),
        dir.path(),
    );
    match wrong_ckpt {
        Err(OpenError::KeyMismatch { file, reason }) => {
            assert!(
                file.to_string_lossy().ends_with(".ckpt"),
                "{}",
                file.display()
            );
            assert!(reason.contains("key id"), "{reason}");
        }
        other => panic!("expected KeyMismatch, got {other:?}"),
    }
    let wrong_manifest = AedbInstance::open(
        AedbConfig::production([9; 32]).with_checkpoint_key(CK),
        dir.path(),
    );
    match wrong_manifest {
        Err(OpenError::Corruption { file, reason, .. }) => {
            assert!(file.ends_with("MANIFEST"));
            assert!(reason.contains("wrong manifest key"), "{reason}");
        }
        other => panic!("expected manifest Corruption, got {other:?}"),
    }
    let no_key = AedbInstance::open(
        AedbConfig::development().with_checkpoint_key(CK),
        dir.path(),
    );
    assert!(
        matches!(no_key, Err(OpenError::Corruption { .. })),
        "{no_key:?}"
    );
    // Keys never show up in Debug output or errors.
    let dbg = format!("{:?}", prod());
    assert!(
        !dbg.contains("17, 17") && !dbg.contains("0x11") && !dbg.contains("[17"),
        "{dbg}"
    );
    AedbInstance::open(prod(), dir.path()).expect("the right keys still work");
}

#[test]
fn tampering_with_checkpoint_or_manifest_is_detected() {
    let base = tempfile::tempdir().expect("tempdir");
    create(base.path(), prod(), 200);
    let ckpt_len = std::fs::metadata(&files(base.path(), ".ckpt")[0])
        .expect("meta")
        .len() as usize;
    // Header field, first body chunk, the final tag byte, and a truncation.
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "checkpoint header",
            Box::new(|d: &Path| flip(&files(d, ".ckpt")[0], 20)),
        ),
        (
            "checkpoint body",
            Box::new(|d: &Path| flip(&files(d, ".ckpt")[0], 300)),
        ),
        (
            "checkpoint tag",
            Box::new(move |d: &Path| flip(&files(d, ".ckpt")[0], ckpt_len - 1)),
        ),
        (
            "checkpoint truncated",
            Box::new(move |d: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&files(d, ".ckpt")[0])
                    .expect("open");
                f.set_len(ckpt_len as u64 - 40).expect("truncate");
            }),
        ),
        (
            "manifest edited",
            Box::new(|d: &Path| {
                let p = d.join("MANIFEST");
                let t = std::fs::read_to_string(&p).expect("read");
                std::fs::write(&p, t.replacen("\"generation\":", "\"generation\":1", 1))
                    .expect("write");
            }),
        ),
        (
            "manifest signature flipped",
            Box::new(|d: &Path| {
                let p = d.join("MANIFEST");
                let len = std::fs::metadata(&p).expect("meta").len() as usize;
                flip(&p, len - 3);
            }),
        ),
    ];
    for (name, damage) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in std::fs::read_dir(base.path()).expect("ls") {
            let f = f.expect("entry").path();
            if f.is_file() && !f.ends_with("LOCK") {
                std::fs::copy(&f, dir.path().join(f.file_name().expect("name"))).expect("copy");
            }
        }
        damage(dir.path());
        match AedbInstance::open(prod(), dir.path()) {
            Err(OpenError::Corruption { file, .. }) => {
                let f = file.to_string_lossy();
                assert!(
                    f.ends_with(".ckpt") || f.ends_with("MANIFEST"),
                    "{name}: names {f}"
                );
            }
            other => panic!("{name}: expected Corruption, got {other:?}"),
        }
    }
}

#[test]
fn open_secure_lists_every_unsafe_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    match AedbInstance::open_secure(
        AedbConfig::development().with_recovery_mode(RecoveryMode::Permissive),
        dir.path(),
    ) {
        Err(OpenError::InvalidConfig { problems }) => {
            assert_eq!(problems.len(), 2, "{problems:?}");
            assert!(problems[0].contains("manifest key"));
            assert!(problems[1].contains("permissive"));
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    match AedbInstance::open_production(
        AedbConfig::production(MK).with_durability(DurabilityMode::OsBuffered),
        dir.path(),
    ) {
        Err(OpenError::InvalidConfig { problems }) => {
            assert!(
                problems.iter().any(|p| p.contains("checkpoint key")),
                "{problems:?}"
            );
            assert!(
                problems.iter().any(|p| p.contains("OsBuffered")),
                "{problems:?}"
            );
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    // Both named presets are accepted by open_secure.
    AedbInstance::open_secure(AedbConfig::low_latency(MK), dir.path().join("ll"))
        .expect("low_latency is a secure preset")
        .close()
        .expect("close");
    AedbInstance::open_secure(AedbConfig::production(MK), dir.path().join("prod"))
        .expect("production preset");
}

#[test]
fn checkpoint_key_rotation_rewrites_everything_under_the_new_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    create(dir.path(), prod(), 30);
    {
        let rotating = AedbConfig::production(MK)
            .with_checkpoint_key(CK2)
            .with_previous_checkpoint_key(CK);
        let db = AedbInstance::open(rotating, dir.path()).expect("open with old + new");
        assert_eq!(count(&db), 40);
        fill(&db, 40, 45);
        db.checkpoint().expect("rewrite under the new key");
        db.close().expect("close");
    }
    let new_only = AedbConfig::production(MK).with_checkpoint_key(CK2);
    let db = AedbInstance::open(new_only, dir.path()).expect("new key alone opens");
    assert_eq!(count(&db), 45);
    db.close().expect("close");
    assert!(
        matches!(
            AedbInstance::open(prod(), dir.path()),
            Err(OpenError::KeyMismatch { .. })
        ),
        "the old key alone no longer opens the database"
    );
}

#[test]
fn automatic_checkpoints_run_by_wal_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = AedbConfig::development().with_checkpoint_policy(Some(64 * 1024), None);
    let db = AedbInstance::open(cfg, dir.path()).expect("open");
    db.create_project("p").expect("p");
    db.create_scope("p", "s").expect("s");
    let mut tx = db.begin_write("p").expect("tx");
    for i in 0..2000u32 {
        tx.kv_set("s", &i.to_be_bytes(), &[1u8; 64]).expect("set");
    }
    db.commit(tx).expect("commit");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while files(dir.path(), ".ckpt").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic checkpoint"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
