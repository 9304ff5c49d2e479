//! Issue #13: faults on the commit path that need test-only hooks (`failpoints`)
//! to inject. Each test failed before its fix.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::Duration;

use super::failpoints::{self, Failpoint};
use std::path::Path;
use std::sync::Arc;

use super::{AedbInstance, Dev};
use crate::authz::{CallerContext, Permission};
use crate::config::{AedbConfig, CommitFinality};
use crate::error::{AedbError, CommitError, ReadError};
use crate::record::DdlOperation;
use crate::txn::snapshot::ConsistencyMode;

fn dev(dir: &Path) -> AedbInstance<Dev> {
    let db = AedbInstance::open(AedbConfig::development(), dir).expect("open");
    db.create_project("p").expect("project");
    db.create_scope("p", "s").expect("scope");
    db
}

/// Runs `f` on another thread and fails the test if it has not returned after a
/// minute: only a detector for a hang, which the fixed code never comes near.
fn returns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what} never returned"))
}

/// Bug 6: the manifest write that records a sealed segment fails during a serial
/// commit (DDL, audit rows). The commit must fail without leaving its frame in the
/// WAL buffer, and the instance must refuse every later commit (before the fix the
/// next serial commit reused the LSN and panicked, and the failed commit became
/// durable at close and applied after the reopen).
#[test]
fn failed_rotation_record_in_a_serial_commit_poisons_and_leaves_no_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dev(dir.path());
    db.kv_set("p", "s", b"before", b"1").expect("commit");
    failpoints::arm(Failpoint::RecordRotation);
    let failed = db.create_scope("p", "failed");
    assert!(failed.is_err(), "{failed:?}");
    assert!(db.is_poisoned());
    let next = std::panic::catch_unwind(AssertUnwindSafe(|| db.create_scope("p", "next")));
    assert!(
        matches!(next, Ok(Err(CommitError::Poisoned(_)))),
        "the next serial commit is refused, not a reused LSN: {next:?}"
    );
    assert!(matches!(
        db.kv_set("p", "s", b"after", b"1"),
        Err(CommitError::Poisoned(_))
    ));
    drop(db);

    let db = AedbInstance::open(AedbConfig::development(), dir.path()).expect("reopen");
    let snap = db.snapshot().expect("snapshot");
    assert_eq!(snap.scopes("p").expect("scopes"), vec!["s".to_string()]);
    assert!(
        snap.kv("p", "s")
            .expect("kv")
            .get(b"before")
            .expect("get")
            .is_some()
    );
    db.create_scope("p", "next")
        .expect("commits after the reopen");
}

/// Bug 6, the group-commit path: the same failure during an ordinary commit.
#[test]
fn failed_rotation_record_in_a_commit_poisons_and_leaves_no_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dev(dir.path());
    failpoints::arm(Failpoint::RecordRotation);
    let failed = db.commit_with_finality(
        {
            let mut tx = db.begin_write("p").expect("tx");
            tx.kv_set("s", b"k", b"v").expect("set");
            tx
        },
        CommitFinality::Visible,
    );
    assert!(failed.is_err(), "{failed:?}");
    assert!(db.is_poisoned());
    assert!(matches!(db.snapshot(), Err(ReadError::Poisoned(_))));
    drop(db);
    let db = AedbInstance::open(AedbConfig::development(), dir.path()).expect("reopen");
    assert!(
        db.snapshot()
            .expect("snapshot")
            .kv("p", "s")
            .expect("kv")
            .get(b"k")
            .expect("get")
            .is_none()
    );
}

/// Bug 10: an apply that panics (a bug) must not leave its sequence number
/// unpublished: later commits, `drain` (checkpoints, DDL) would wait for it forever.
#[test]
fn panicking_apply_poisons_instead_of_hanging_later_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(dev(dir.path()));
    failpoints::arm(Failpoint::PanicInApply);
    let first = std::panic::catch_unwind(AssertUnwindSafe(|| db.kv_set("p", "s", b"a", b"1")));
    assert!(
        matches!(first, Ok(Err(_))),
        "the panic is contained and reported: {first:?}"
    );
    assert!(db.is_poisoned());
    let d = db.clone();
    let next = returns("a later commit", move || d.kv_set("p", "s", b"b", b"1"));
    assert!(matches!(next, Err(CommitError::Poisoned(_))), "{next:?}");
    let d = db.clone();
    let ddl = returns("a DDL commit (drains)", move || d.create_scope("p", "t"));
    assert!(matches!(ddl, Err(CommitError::Poisoned(_))), "{ddl:?}");
    let d = db.clone();
    let ckpt = returns("a checkpoint (drains)", move || d.checkpoint());
    assert!(ckpt.is_err(), "{ckpt:?}");
}

/// Bug 10: once poisoned, the published state holds commits that will never be
/// durable (the reopen replays only the durable log). Like PostgreSQL, which
/// PANICs on a failed fsync and ends every session, the instance stops serving it:
/// every fallible read entry point is `Poisoned`, also reads through a read
/// transaction opened before.
#[test]
fn poisoned_instance_refuses_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dev(dir.path());
    db.commit_ddl_batch(vec![DdlOperation::GrantPermission {
        grantee: "reader".into(),
        permission: Permission::KvRead {
            project: "p".into(),
            scope: None,
            prefix: None,
        },
        delegable: false,
    }])
    .expect("grant");
    db.kv_set("p", "s", b"k", b"v").expect("commit");
    let reader = CallerContext::new("reader").expect("caller id");
    let open_before = db
        .begin_read_tx_as(&reader, ConsistencyMode::AtLatest)
        .expect("read tx");
    assert!(open_before.kv_get("p", "s", b"k").expect("read").is_some());
    assert!(!db.operational_metrics().poisoned);

    failpoints::arm(Failpoint::RecordRotation);
    assert!(db.kv_set("p", "s", b"k2", b"v").is_err());
    assert!(db.is_poisoned());
    assert!(db.operational_metrics().poisoned);
    fn poisoned(r: Result<(), impl Into<AedbError>>) -> bool {
        matches!(r.map_err(Into::into), Err(AedbError::Poisoned(_)))
    }
    assert!(poisoned(
        db.begin_read(ConsistencyMode::AtLatest).map(|_| ())
    ));
    assert!(poisoned(db.begin_write("p").map(|_| ())));
    assert!(poisoned(db.kv_get(&reader, "p", "s", b"k").map(|_| ())));
    assert!(poisoned(open_before.kv_get("p", "s", b"k").map(|_| ())));
    assert!(poisoned(db.export_audit(0).map(|_| ())));
    assert!(poisoned(db.snapshot().map(|_| ())));
}

/// Bug 10, `snapshot()`: it served the published state after a poison, including
/// `Visible` commits that may never become durable; it is `Poisoned` like every
/// other read entry point. A snapshot taken before stays readable as a value.
#[test]
fn snapshot_of_a_poisoned_instance_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dev(dir.path());
    db.commit_with_finality(
        {
            let mut tx = db.begin_write("p").expect("tx");
            tx.kv_set("s", b"visible", b"v").expect("set");
            tx
        },
        CommitFinality::Visible,
    )
    .expect("visible commit");
    let before = db.snapshot().expect("snapshot before the poison");
    failpoints::arm(Failpoint::RecordRotation);
    assert!(db.kv_set("p", "s", b"k2", b"v").is_err());
    assert!(db.is_poisoned());
    let after = db.snapshot();
    assert!(
        matches!(after, Err(ReadError::Poisoned(_))),
        "a poisoned instance served a snapshot at seq {:?}",
        after.map(|s| s.seq())
    );
    assert!(
        before
            .kv("p", "s")
            .expect("kv")
            .get(b"visible")
            .expect("get")
            .is_some()
    );
}
