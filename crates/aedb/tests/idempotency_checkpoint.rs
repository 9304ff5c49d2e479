//! Idempotency keys survive a checkpoint that removes the log they were committed
//! in (issue #13): a retry after the checkpoint and a reopen is recognized exactly
//! as before it, including the check that the retry carries the same writes.

use std::path::Path;

use aedb::{AedbConfig, AedbError, AedbInstance, CommitError, CommitResult, Limits, ReadAssertion};

/// Small segments, so a few commits seal segments that the checkpoint then covers
/// and removes; no automatic checkpoints, so the test decides when one happens.
fn config() -> AedbConfig {
    AedbConfig::development()
        .with_segment_bytes(64 * 1024)
        .with_checkpoint_policy(None, None)
        .with_limits(Limits {
            max_txn_bytes: 16 * 1024,
            max_value_bytes: 8 * 1024,
            ..Default::default()
        })
}

fn open(dir: &Path) -> AedbInstance {
    AedbInstance::open(config(), dir).expect("open")
}

fn segments(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wal-") && n.ends_with(".seg"))
        .collect();
    v.sort();
    v
}

/// The README's example: a guarded insert under an idempotency key.
fn attempt(db: &AedbInstance, value: &[u8]) -> Result<CommitResult, CommitError> {
    let mut tx = db.begin_write("payments")?;
    tx.assert(ReadAssertion::key_absent("eu", b"order-17".to_vec()));
    tx.kv_set("eu", b"order-17", value)?;
    tx.set_idempotency_key("req-8c1f");
    db.commit(tx)
}

/// Commits the keyed transaction, then enough filler that its segment is sealed,
/// checkpoints (removing that segment) and reopens.
fn commit_then_checkpoint_away(dir: &Path) -> CommitResult {
    let db = open(dir);
    db.create_project("payments").expect("project");
    db.create_scope("payments", "eu").expect("scope");
    let first = attempt(&db, b"v1").expect("first attempt");
    assert!(!first.idempotent_replay);
    let first_segment = segments(dir)[0].clone();
    let filler = vec![b'x'; 4096];
    for i in 0..64u32 {
        db.kv_set("payments", "eu", format!("filler-{i}").as_bytes(), &filler)
            .expect("filler");
    }
    db.checkpoint().expect("checkpoint");
    assert!(
        !segments(dir).contains(&first_segment),
        "the checkpoint removed the segment holding the keyed commit: {:?}",
        segments(dir)
    );
    db.close().expect("close");
    first
}

#[test]
fn idempotent_retry_after_a_checkpoint_and_reopen_replays() -> Result<(), AedbError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = commit_then_checkpoint_away(dir.path());
    let db = open(dir.path());
    let retry = attempt(&db, b"v1")?;
    assert!(retry.idempotent_replay, "{retry:?}");
    assert_eq!(retry.commit_seq, first.commit_seq);
    assert_eq!(db.operational_metrics().aborts_assertion, 0);
    Ok(())
}

/// The digest of what the first commit wrote comes back from the checkpoint too:
/// the same key with other writes is refused, not answered with the first result.
#[test]
fn idempotency_key_reused_with_other_writes_after_a_checkpoint_is_refused() -> Result<(), AedbError>
{
    let dir = tempfile::tempdir().expect("tempdir");
    let first = commit_then_checkpoint_away(dir.path());
    let db = open(dir.path());
    match attempt(&db, b"v2") {
        Err(CommitError::IdempotencyKeyReused { key, first_seq }) => {
            assert_eq!(key, "req-8c1f");
            assert_eq!(first_seq, first.commit_seq);
        }
        other => panic!("expected IdempotencyKeyReused, got {other:?}"),
    }
    // And again after a second checkpoint written by this (reopened) instance,
    // which only knows the key from the first checkpoint.
    db.kv_set("payments", "eu", b"another", b"1")?;
    db.checkpoint()?;
    db.close()?;
    let db = open(dir.path());
    assert!(matches!(
        attempt(&db, b"v2"),
        Err(CommitError::IdempotencyKeyReused { .. })
    ));
    let retry = attempt(&db, b"v1")?;
    assert!(retry.idempotent_replay);
    assert_eq!(retry.commit_seq, first.commit_seq);
    Ok(())
}

/// The bound on remembered keys keeps evicting oldest-first across a checkpoint.
#[test]
fn idempotency_keys_from_a_checkpoint_keep_their_eviction_order() -> Result<(), AedbError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = || {
        config().with_limits(Limits {
            max_txn_bytes: 16 * 1024,
            max_value_bytes: 8 * 1024,
            max_idempotency_records: 2,
            ..Default::default()
        })
    };
    let keyed = |db: &AedbInstance, key: &str| -> Result<CommitResult, CommitError> {
        let mut tx = db.begin_write("p")?;
        tx.kv_set("s", key.as_bytes(), b"v")?;
        tx.set_idempotency_key(key);
        db.commit(tx)
    };
    let db = AedbInstance::open(cfg(), dir.path())?;
    db.create_project("p")?;
    db.create_scope("p", "s")?;
    keyed(&db, "k1")?;
    keyed(&db, "k2")?;
    db.checkpoint()?;
    db.close()?;
    let db = AedbInstance::open(cfg(), dir.path())?;
    keyed(&db, "k3")?;
    assert!(
        keyed(&db, "k2")?.idempotent_replay,
        "k2 is still remembered"
    );
    assert!(
        !keyed(&db, "k1")?.idempotent_replay,
        "k1 was the oldest and was evicted"
    );
    Ok(())
}
