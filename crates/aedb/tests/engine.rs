//! Transactions, limits, idempotency and reopen behaviour of the engine core.

use aedb::OpenError;
use std::ops::Bound;

use aedb::{
    AedbConfig, AedbError, AedbInstance, Column, ColumnType, CommitError, CommitFinality,
    ConsistencyMode, DurabilityMode, Filter, Limits, NotFoundKind, Query, ReadAssertion, ReadError,
    TableSchema, Value,
};

fn open(dir: &std::path::Path) -> AedbInstance {
    AedbInstance::open(AedbConfig::development(), dir).expect("open")
}

fn get(db: &AedbInstance, key: &[u8]) -> Result<Option<std::sync::Arc<[u8]>>, AedbError> {
    Ok(db.snapshot().expect("snapshot").kv("p", "s")?.get(key)?)
}

fn setup(dir: &std::path::Path) -> AedbInstance {
    let db = open(dir);
    db.create_project("p").expect("project");
    db.create_scope("p", "s").expect("scope");
    db
}

fn users_schema() -> TableSchema {
    TableSchema::new(
        vec![
            Column::new("id", ColumnType::Int),
            Column::new("email", ColumnType::Text),
            Column::new("score", ColumnType::Float).nullable(),
        ],
        vec!["id".into()],
    )
}

#[test]
fn kv_round_trip_scans_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = setup(dir.path());
        let mut tx = db.begin_write("p").expect("tx");
        for i in 0..100u32 {
            tx.kv_set("s", format!("k{i:03}").as_bytes(), &i.to_le_bytes())
                .expect("set");
        }
        tx.kv_del("s", b"k050").expect("del");
        let r = db.commit(tx).expect("commit");
        assert!(r.durable_head_seq >= r.commit_seq);
        let snap = db.snapshot().expect("snapshot");
        let kv = snap.kv("p", "s").expect("kv");
        assert_eq!(kv.len(), 99);
        assert_eq!(
            kv.get(b"k007").expect("read").as_deref(),
            Some(&7u32.to_le_bytes()[..])
        );
        assert!(kv.get(b"k050").expect("read").is_none());
        assert_eq!(kv.scan_prefix(b"k01", 100).expect("scan").len(), 10);
        let range = kv
            .scan_range(
                Bound::Included(&b"k040"[..]),
                Bound::Excluded(&b"k060"[..]),
                100,
            )
            .expect("scan");
        assert_eq!(range.len(), 19);
        assert_eq!(kv.scan_prefix(b"k", 5).expect("scan").len(), 5);
        db.close().expect("close");
    }
    let db = open(dir.path());
    let snap = db.snapshot().expect("snapshot");
    let kv = snap.kv("p", "s").expect("kv after reopen");
    assert_eq!(kv.len(), 99);
    assert_eq!(
        kv.get(b"k099").expect("read").as_deref(),
        Some(&99u32.to_le_bytes()[..])
    );
    assert_eq!(db.recovery_report().frames_replayed, 3);
}

#[test]
fn first_committer_wins_and_loser_gets_conflict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    db.kv_set("p", "s", b"x", b"0").expect("seed");
    let mut a = db.begin_write("p").expect("a");
    let mut b = db.begin_write("p").expect("b");
    a.kv_set("s", b"x", b"a").expect("a set");
    b.kv_set("s", b"x", b"b").expect("b set");
    db.commit(a).expect("a commits");
    match db.commit(b) {
        Err(CommitError::Conflict { .. }) => {}
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(get(&db, b"x").expect("get").as_deref(), Some(&b"a"[..]));
    // A delete after the snapshot conflicts too (tombstones keep their version).
    let mut c = db.begin_write("p").expect("c");
    db.kv_del("p", "s", b"x").expect("del");
    c.kv_set("s", b"x", b"c").expect("c set");
    assert!(matches!(db.commit(c), Err(CommitError::Conflict { .. })));
    assert_eq!(db.operational_metrics().aborts_conflict, 2);
}

#[test]
fn snapshots_stay_stable_while_writers_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    db.kv_set("p", "s", b"x", b"1").expect("v1");
    let old = db.snapshot().expect("snapshot");
    let seq = old.seq();
    db.kv_set("p", "s", b"x", b"2").expect("v2");
    assert_eq!(
        old.kv("p", "s")
            .expect("kv")
            .get(b"x")
            .expect("read")
            .as_deref(),
        Some(&b"1"[..])
    );
    let at = db.begin_read(ConsistencyMode::AtSeq(seq)).expect("at seq");
    assert_eq!(
        at.kv("p", "s")
            .expect("kv")
            .get(b"x")
            .expect("read")
            .as_deref(),
        Some(&b"1"[..])
    );
    assert!(matches!(
        db.begin_read(ConsistencyMode::AtSeq(seq + 100)),
        Err(ReadError::SnapshotUnavailable { .. })
    ));
}

#[test]
fn assertions_fail_the_commit_and_name_the_failed_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    let r = db.kv_set("p", "s", b"balance", b"10").expect("seed");
    let mut tx = db.begin_write("p").expect("tx");
    tx.assert(ReadAssertion::KeyExists {
        scope: "s".into(),
        key: b"balance".to_vec(),
    });
    tx.assert(ReadAssertion::KeyVersion {
        scope: "s".into(),
        key: b"balance".to_vec(),
        version: r.commit_seq + 1,
    });
    tx.kv_set("s", b"balance", b"20").expect("set");
    match db.commit(tx) {
        Err(CommitError::AssertionFailed { index, description }) => {
            assert_eq!(index, 1);
            assert!(description.contains("KeyVersion"), "{description}");
            assert!(
                !description.contains("10"),
                "values must be redacted: {description}"
            );
        }
        other => panic!("expected AssertionFailed, got {other:?}"),
    }
    assert_eq!(
        get(&db, b"balance").expect("get").as_deref(),
        Some(&b"10"[..])
    );
    let mut ok = db.begin_write("p").expect("tx");
    ok.assert(ReadAssertion::All(vec![
        ReadAssertion::KeyEquals {
            scope: "s".into(),
            key: b"balance".to_vec(),
            value: b"10".to_vec(),
        },
        ReadAssertion::key_absent("s", b"other".to_vec()),
    ]));
    ok.kv_set("s", b"balance", b"30").expect("set");
    db.commit(ok).expect("assertions hold");
    // Asserting on an unknown scope is an error, not "absent".
    let mut bad = db.begin_write("p").expect("tx");
    bad.assert(ReadAssertion::key_absent("nope", b"k".to_vec()));
    assert!(matches!(
        db.commit(bad),
        Err(CommitError::NotFound {
            kind: NotFoundKind::Scope,
            ..
        })
    ));
}

#[test]
fn idempotency_key_applies_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    let mk = |v: &[u8]| {
        let mut tx = db.begin_write("p").expect("tx");
        tx.kv_set("s", b"k", v).expect("set");
        tx.set_idempotency_key("req-1");
        tx
    };
    let first = db.commit(mk(b"first")).expect("first");
    let retry = db.commit(mk(b"first")).expect("retry");
    assert!(retry.idempotent_replay);
    assert_eq!(retry.commit_seq, first.commit_seq);
    // The same key for other writes is a caller bug, not a retry.
    assert!(matches!(
        db.commit(mk(b"second")),
        Err(CommitError::IdempotencyKeyReused { .. })
    ));
    assert_eq!(get(&db, b"k").expect("get").as_deref(), Some(&b"first"[..]));
    db.close().expect("close");
    // Survives reopen: the key is in the log.
    let db = open(dir.path());
    let mut tx = db.begin_write("p").expect("tx");
    tx.kv_set("s", b"k", b"first").expect("set");
    tx.set_idempotency_key("req-1");
    assert!(db.commit(tx).expect("retry after reopen").idempotent_replay);
}

#[test]
fn tables_check_schema_and_query() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    db.create_table("p", "s", "users", users_schema())
        .expect("table");
    let mut tx = db.begin_write("p").expect("tx");
    for i in 0..10 {
        tx.put_row(
            "s",
            "users",
            vec![Value::Int(i), Value::Text(format!("u{i}@x")), Value::Null],
        )
        .expect("row");
    }
    // Wrong type, wrong arity, null in a non-nullable column.
    for bad in [
        vec![
            Value::Text("1".into()),
            Value::Text("a".into()),
            Value::Null,
        ],
        vec![Value::Int(1)],
        vec![Value::Int(1), Value::Null, Value::Null],
    ] {
        assert!(matches!(
            tx.put_row("s", "users", bad),
            Err(CommitError::Schema { .. })
        ));
    }
    assert!(matches!(
        tx.put_row("s", "nosuch", vec![Value::Int(1)]),
        Err(CommitError::NotFound {
            kind: NotFoundKind::Table,
            ..
        })
    ));
    db.commit(tx).expect("commit");
    let snap = db.snapshot().expect("snapshot");
    let t = snap.table("p", "s", "users").expect("table");
    assert_eq!(t.len(), 10);
    let row = t.get(&[Value::Int(3)]).expect("get").expect("row 3");
    assert_eq!(row[1], Value::Text("u3@x".into()));
    let page = t
        .query(&Query::all(4).filter(Filter::Ge("id".into(), Value::Int(5))))
        .expect("query");
    assert_eq!(page.rows.len(), 4);
    let rest = t
        .query(&Query {
            cursor: page.next_cursor.clone(),
            ..Query::all(4).filter(Filter::Ge("id".into(), Value::Int(5)))
        })
        .expect("page 2");
    assert_eq!(rest.rows.len(), 1);
    assert!(rest.next_cursor.is_none());
    assert!(matches!(
        t.query(&Query::all(1).filter(Filter::Eq("nope".into(), Value::Int(1)))),
        Err(ReadError::Schema { .. })
    ));
}

#[test]
fn limits_give_typed_errors_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        max_key_bytes: 8,
        max_value_bytes: 16,
        max_txn_bytes: 256,
        max_txn_ops: 4,
        ..Limits::default()
    };
    let db = AedbInstance::open(AedbConfig::development().with_limits(limits), dir.path())
        .expect("open");
    db.create_project("p").expect("p");
    db.create_scope("p", "s").expect("s");
    db.kv_set("p", "s", b"keep", b"v").expect("seed");
    let mut tx = db.begin_write("p").expect("tx");
    assert!(matches!(
        tx.kv_set("s", b"123456789", b"v"),
        Err(CommitError::LimitExceeded { .. })
    ));
    assert!(matches!(
        tx.kv_set("s", b"k", &[0; 17]),
        Err(CommitError::LimitExceeded { .. })
    ));
    assert!(matches!(
        tx.kv_set("s", b"", b"v"),
        Err(CommitError::InvalidArgument(_))
    ));
    for i in 0..4u8 {
        tx.kv_set("s", &[b'k', i], b"v").expect("within limits");
    }
    assert!(matches!(
        tx.kv_set("s", b"k9", b"v"),
        Err(CommitError::LimitExceeded { .. })
    ));
    assert!(matches!(
        db.begin_write("nope"),
        Err(CommitError::NotFound {
            kind: NotFoundKind::Project,
            ..
        })
    ));
    assert!(!db.project_exists("nope").expect("project_exists"));
    assert!(db.project_exists("p").expect("project_exists"));
    assert!(matches!(
        db.create_project("bad name"),
        Err(CommitError::InvalidArgument(_))
    ));
    assert!(matches!(
        db.create_project("p"),
        Err(CommitError::AlreadyExists { .. })
    ));
    db.commit(tx).expect("commit the valid part");
    assert_eq!(get(&db, b"keep").expect("get").as_deref(), Some(&b"v"[..]));
    let bad = AedbInstance::open(
        AedbConfig::development().with_segment_bytes(1024),
        dir.path().join("other"),
    );
    assert!(matches!(bad, Err(OpenError::InvalidConfig { .. })));
}

#[test]
fn second_open_is_refused_with_the_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _db = open(dir.path());
    match AedbInstance::open(AedbConfig::development(), dir.path()) {
        Err(OpenError::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn chain_continues_across_rotation_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        max_txn_bytes: 64 * 1024,
        max_value_bytes: 64 * 1024,
        ..Limits::default()
    };
    let cfg = || {
        AedbConfig::development()
            .with_segment_bytes(256 * 1024)
            .with_limits(limits)
    };
    let mut expected = 0;
    for round in 0..3 {
        let db = AedbInstance::open(cfg(), dir.path()).expect("open");
        if round == 0 {
            db.create_project("p").expect("p");
            db.create_scope("p", "s").expect("s");
        }
        for i in 0..40u32 {
            let mut tx = db.begin_write("p").expect("tx");
            tx.kv_set("s", format!("r{round}-{i}").as_bytes(), &[7u8; 20_000])
                .expect("set");
            db.commit_with_finality(tx, CommitFinality::Durable)
                .expect("commit");
            expected += 1;
        }
        assert_eq!(
            db.snapshot()
                .expect("snapshot")
                .kv("p", "s")
                .expect("kv")
                .len(),
            expected
        );
        db.close().expect("close");
    }
    let segments = std::fs::read_dir(dir.path())
        .expect("ls")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        })
        .count();
    assert!(
        segments >= 4,
        "expected rotation, found {segments} segments"
    );
    let db = AedbInstance::open(cfg(), dir.path()).expect("strict reopen");
    assert_eq!(
        db.snapshot()
            .expect("snapshot")
            .kv("p", "s")
            .expect("kv")
            .len(),
        expected
    );
}

#[test]
fn batch_mode_visible_commits_become_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = AedbInstance::open(
            AedbConfig::development().with_durability(DurabilityMode::Batch),
            dir.path(),
        )
        .expect("open");
        db.create_project("p").expect("p");
        db.create_scope("p", "s").expect("s");
        let mut last = 0;
        for i in 0..200u32 {
            last = db
                .kv_set("p", "s", &i.to_be_bytes(), b"v")
                .expect("set")
                .commit_seq;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while db.durable_head_seq() < last {
            assert!(std::time::Instant::now() < deadline, "flusher never synced");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    let db = open(dir.path());
    assert_eq!(
        db.snapshot()
            .expect("snapshot")
            .kv("p", "s")
            .expect("kv")
            .len(),
        200
    );
}

#[test]
fn concurrent_commits_to_different_projects_publish_as_a_prefix_of_the_log() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(
        AedbInstance::open(
            AedbConfig::development().with_durability(DurabilityMode::Batch),
            dir.path(),
        )
        .expect("open"),
    );
    for p in ["a", "b", "c"] {
        db.create_project(p).expect("project");
        db.create_scope(p, "s").expect("scope");
    }
    type CommitLog = Vec<(u64, &'static str, Vec<u8>)>;
    let log: Arc<Mutex<CommitLog>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut snaps = Vec::new();
            let mut last = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = db.snapshot().expect("snapshot");
                assert!(s.seq() >= last, "published sequence went backwards");
                last = s.seq();
                if snaps.len() < 200 {
                    snaps.push(s);
                }
                std::thread::yield_now();
            }
            snaps
        })
    };
    let writers: Vec<_> = ["a", "b", "c", "a"]
        .into_iter()
        .enumerate()
        .map(|(t, p)| {
            let (db, log) = (db.clone(), log.clone());
            std::thread::spawn(move || {
                for i in 0..300u32 {
                    let key = format!("t{t}-{i}").into_bytes();
                    let mut tx = db.begin_write(p).expect("tx");
                    tx.kv_set("s", &key, b"v").expect("set");
                    // A bigger transaction now and then keeps the apply phase busy.
                    if i % 50 == 0 {
                        for j in 0..2000u32 {
                            tx.kv_set("s", format!("bulk{t}-{i}-{j}").as_bytes(), b"b")
                                .expect("bulk");
                        }
                    }
                    let r = db.commit(tx).expect("commit");
                    log.lock().expect("log").push((r.commit_seq, p, key));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let snaps = reader.join().expect("reader");
    let log = log.lock().expect("log");
    let mut seqs: Vec<u64> = log.iter().map(|(s, _, _)| *s).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        log.len(),
        "every commit got its own sequence number"
    );
    // Every snapshot holds exactly the commits with a sequence number up to its own.
    for s in snaps
        .iter()
        .chain(std::iter::once(&db.snapshot().expect("snapshot")))
    {
        for (seq, p, key) in log.iter() {
            let present = s.kv(p, "s").expect("kv").get(key).expect("read").is_some();
            assert_eq!(
                present,
                *seq <= s.seq(),
                "commit {seq} vs snapshot {}",
                s.seq()
            );
        }
    }
}

#[test]
fn versioned_scans_carry_the_seq_of_the_commit_that_last_wrote_each_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    let a1 = db.kv_set("p", "s", b"a/1", b"x").expect("a/1").commit_seq;
    let a2 = db.kv_set("p", "s", b"a/2", b"y").expect("a/2").commit_seq;
    db.kv_set("p", "s", b"b/1", b"z").expect("b/1");
    let a1b = db
        .kv_set("p", "s", b"a/1", b"x2")
        .expect("a/1 again")
        .commit_seq;
    assert!(a1b > a2 && a2 > a1);
    db.kv_del("p", "s", b"a/2").expect("del a/2");
    let snap = db.snapshot().expect("snapshot");
    let kv = snap.kv("p", "s").expect("kv");
    let simple = |v: Vec<aedb::VersionedKvPair>| -> Vec<(Vec<u8>, u64, Vec<u8>)> {
        v.into_iter()
            .map(|(k, (ver, val))| (k.as_slice().to_vec(), ver, val.to_vec()))
            .collect()
    };
    let expect_a = vec![(b"a/1".to_vec(), a1b, b"x2".to_vec())];
    assert_eq!(
        simple(kv.scan_prefix_versioned(b"a/", 10).expect("scan")),
        expect_a
    );
    assert_eq!(
        simple(
            kv.scan_range_versioned(Bound::Unbounded, Bound::Excluded(b"b/"), 10)
                .expect("scan")
        ),
        expect_a
    );
    let all = simple(
        kv.scan_range_rev_versioned(Bound::Unbounded, Bound::Unbounded, 10)
            .expect("scan"),
    );
    assert_eq!(all.len(), 2, "the deleted key is not listed");
    assert_eq!(all[0].0, b"b/1".to_vec());
    for (k, ver, val) in &all {
        assert_eq!(
            kv.get_versioned(k)
                .expect("read")
                .map(|(v, x)| (v, x.to_vec())),
            Some((*ver, val.clone())),
            "a scan agrees with a point read"
        );
    }
    // Unversioned scans list the same entries.
    assert_eq!(
        kv.scan_range_rev(Bound::Unbounded, Bound::Unbounded, 1)
            .expect("scan")
            .len(),
        1
    );
    assert!(
        kv.scan_range_versioned(Bound::Included(b"z"), Bound::Excluded(b"a"), 10)
            .expect("scan")
            .is_empty(),
        "an inverted range is empty"
    );
}
