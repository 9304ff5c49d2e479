//! Regressions for the commit-path part of issue #13 ("aedb under faults"), one
//! test per bug. Failpoint-driven cases (a failing manifest write after rotation,
//! a panicking apply) are unit tests in `src/instance/fault_tests.rs`, where the
//! test-only hooks exist.

use aedb::{AedbConfig, AedbError, AedbInstance, CommitError, CommitFinality, ReadAssertion};

fn open(dir: &std::path::Path) -> AedbInstance {
    AedbInstance::open(AedbConfig::development(), dir).expect("open")
}

fn assertion_audit_rows(db: &AedbInstance) -> usize {
    db.snapshot()
        .expect("snapshot")
        .table("_system", "audit", "assertion_audit")
        .expect("assertion_audit")
        .len()
}

/// Bug 5: the README's own example, retried after the first attempt committed
/// (the caller saw a timeout), must replay the first result: the idempotency key
/// is looked up before the assertion that the first attempt made false.
#[test]
fn readme_idempotent_retry_replays_instead_of_failing_its_assertion() -> Result<(), AedbError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    db.create_project("payments")?;
    db.create_scope("payments", "eu")?;

    let attempt = |db: &AedbInstance| -> Result<_, CommitError> {
        let mut tx = db.begin_write("payments")?; // MVCC snapshot + buffered writes
        tx.assert(ReadAssertion::key_absent("eu", b"order-17".to_vec()));
        tx.kv_set("eu", b"order-17", b"{...}")?;
        tx.set_idempotency_key("req-8c1f"); // retry-safe after a timeout
        db.commit_with_finality(tx, CommitFinality::Durable) // returns after fsync
    };
    let first = attempt(&db)?;
    let audit_before = assertion_audit_rows(&db);
    let retry = attempt(&db)?;
    assert!(retry.idempotent_replay);
    assert_eq!(retry.commit_seq, first.commit_seq);
    assert_eq!(
        assertion_audit_rows(&db),
        audit_before,
        "a replay is not a failed assertion"
    );
    assert_eq!(db.operational_metrics().aborts_assertion, 0);
    assert_eq!(db.operational_metrics().idempotent_replays, 1);

    // The same after a reopen (the key comes back from the log).
    db.close()?;
    let db = open(dir.path());
    let again = attempt(&db)?;
    assert!(again.idempotent_replay);
    assert_eq!(again.commit_seq, first.commit_seq);
    Ok(())
}

/// Bug 5, second half: a key reused for different writes is a caller bug; it must
/// not be silently answered with another transaction's result.
#[test]
fn idempotency_key_reused_with_different_writes_is_refused() -> Result<(), AedbError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    db.create_project("payments")?;
    db.create_scope("payments", "eu")?;
    let attempt = |db: &AedbInstance, value: &[u8]| -> Result<_, CommitError> {
        let mut tx = db.begin_write("payments")?;
        tx.kv_set("eu", b"order-17", value)?;
        tx.set_idempotency_key("req-8c1f");
        db.commit(tx)
    };
    let first = attempt(&db, b"v1")?;
    match attempt(&db, b"v2") {
        Err(CommitError::IdempotencyKeyReused { key, first_seq }) => {
            assert_eq!(key, "req-8c1f");
            assert_eq!(first_seq, first.commit_seq);
        }
        other => panic!("expected IdempotencyKeyReused, got {other:?}"),
    }
    assert_eq!(
        db.snapshot()
            .expect("snapshot")
            .kv("payments", "eu")?
            .get(b"order-17")
            .expect("read")
            .as_deref(),
        Some(&b"v1"[..])
    );
    db.close()?;
    let db = open(dir.path());
    assert!(matches!(
        attempt(&db, b"v2"),
        Err(CommitError::IdempotencyKeyReused { .. })
    ));
    assert!(attempt(&db, b"v1")?.idempotent_replay);
    Ok(())
}

/// Runs `f` on another thread and fails the test if it has not returned after a
/// minute: only a detector for a hang, which the fixed code never comes near.
fn returns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what} never returned"))
}

/// Bug 10: `wait_durable` for a sequence number not issued yet looped on
/// `fdatasync` forever (each pass made the whole log durable, which never reached
/// it). A seq that was never handed out is a caller error.
#[test]
fn wait_durable_for_a_seq_never_issued_is_an_error() -> Result<(), AedbError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = std::sync::Arc::new(open(dir.path()));
    db.create_project("p")?;
    db.create_scope("p", "s")?;
    let head = db.kv_set("p", "s", b"k", b"v")?.commit_seq;
    db.wait_durable(head)?;
    let fsyncs = db.operational_metrics().fsyncs;
    let d = db.clone();
    let r = returns("wait_durable(head + 1000)", move || {
        d.wait_durable(head + 1000)
    });
    assert!(matches!(r, Err(AedbError::InvalidArgument(_))), "{r:?}");
    assert_eq!(db.operational_metrics().fsyncs, fsyncs);
    Ok(())
}

/// Bug 10: deleted keys stayed in memory as tombstones until a reopen, so a
/// delete-heavy workload grew without bound. They are purged as soon as no open
/// write transaction has a snapshot from before the delete (such a transaction
/// still needs them to see its write-write conflict).
#[test]
fn tombstones_are_purged_while_running() -> Result<(), AedbError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    db.create_project("p")?;
    db.create_scope("p", "s")?;
    let key = |i: u32| format!("key-{i:05}").into_bytes();
    let mut tx = db.begin_write("p")?;
    for i in 0..1_000 {
        tx.kv_set("s", &key(i), b"value")?;
    }
    db.commit(tx)?;
    // Open from before the deletes, writing one of the deleted keys.
    let mut old = db.begin_write("p")?;
    old.kv_set("s", &key(0), b"late")?;
    for batch in 0..10 {
        let mut tx = db.begin_write("p")?;
        for i in batch * 100..(batch + 1) * 100 {
            tx.kv_del("s", &key(i))?;
        }
        db.commit(tx)?;
    }
    assert_eq!(db.snapshot().expect("snapshot").kv("p", "s")?.len(), 0);
    assert_eq!(
        db.operational_metrics().tombstones,
        1_000,
        "pinned by `old`"
    );
    assert!(
        matches!(db.commit(old), Err(CommitError::Conflict { .. })),
        "the tombstone still detects the conflict"
    );
    // `old` is gone: the next commit to the project purges everything before it.
    db.kv_set("p", "s", b"other", b"1")?;
    assert_eq!(db.operational_metrics().tombstones, 0);

    // Replay at open does not bring them back either.
    let mut tx = db.begin_write("p")?;
    tx.kv_del("s", b"other")?;
    db.commit(tx)?;
    db.close()?;
    let db = open(dir.path());
    assert_eq!(db.operational_metrics().tombstones, 0);
    assert_eq!(db.snapshot().expect("snapshot").kv("p", "s")?.len(), 0);
    Ok(())
}
