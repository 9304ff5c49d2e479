use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::auth::RequestMeta;
use crate::clock::format_us;
use crate::crypto;
use crate::secrets::SecretRecord;
use crate::store::{Collection, Durability, Expect, ListQuery, WriteOp, get_json};

use crate::encryption::tests::{Fixture, open as open_ring, principal};

fn open(dir: &Path) -> Fixture {
    open_ring(dir, [1; 32]).expect("key ring")
}

fn migrator(f: &Fixture, batch_size: usize, stop_after_batches: Option<u64>) -> Migrator {
    Migrator::new(
        f.store.clone(),
        f.audit.clone(),
        f.ring.clone(),
        f.metrics.clone(),
        MigrationOptions {
            batch_size,
            stop_after_batches,
            faults: Default::default(),
        },
    )
}

fn value(i: usize) -> String {
    format!("secret value number {i}")
}

/// `n` secrets `s-00000`.. under the current primary, written straight to
/// the store in batches (no audit: fixtures only).
fn seed(f: &Fixture, n: usize) {
    let ids: Vec<String> = (0..n).map(|i| format!("s-{i:05}")).collect();
    for chunk in ids.chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|id| value(id[2..].parse().expect("n")))
            .collect();
        let items: Vec<(&str, &[u8])> = chunk
            .iter()
            .zip(&values)
            .map(|(id, v)| (id.as_str(), v.as_bytes()))
            .collect();
        f.ring
            .seal_many_and_write(&items, |envs, key_id, key_version| {
                let ops = chunk
                    .iter()
                    .zip(envs)
                    .map(|(id, env)| {
                        let rec = SecretRecord {
                            id: id.clone(),
                            secret_type: "token".into(),
                            owner: "u-1".into(),
                            envelope: hex::encode(env),
                            key_id: key_id.into(),
                            key_version,
                            created_at: format_us(0),
                            created_at_us: 0,
                            updated_at: format_us(0),
                            updated_at_us: 0,
                            rotation_required: false,
                            rotation_reason: None,
                        };
                        WriteOp::put_json(Collection::Secrets, id.clone(), &rec, Expect::Absent)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let r = f.store.write(ops, Durability::Durable)?;
                Ok::<_, MigrationError>(r)
            })
            .expect("seed");
    }
}

/// Every secret's header names `key` and it decrypts to its value.
fn assert_all_under(f: &Fixture, n: usize, key: &str) {
    let mut seen = 0;
    crate::store::for_each_json::<SecretRecord>(
        f.store.as_ref(),
        Collection::Secrets,
        |id, _, r| {
            let env = hex::decode(&r.envelope).expect("hex");
            assert_eq!(
                crypto::parse_header(&env).expect("header").key_id,
                key,
                "{id}"
            );
            assert_eq!(r.key_id, key, "{id}");
            let plain = f.ring.decrypt(&id, &env, None).expect("decrypts");
            if let Some(i) = id.strip_prefix("s-") {
                assert_eq!(plain, value(i.parse().expect("n")).as_bytes(), "{id}");
            }
            seen += 1;
            Ok(())
        },
    )
    .expect("scan");
    assert_eq!(seen, n);
}

fn actions(f: &Fixture, action: &str) -> Vec<crate::audit::AuditEntry> {
    f.audit
        .search(&crate::audit::SearchFilter {
            action: Some(action.into()),
            limit: 100,
            ..Default::default()
        })
        .expect("search")
        .entries
}

#[test]
fn rotate_then_migrate_rewraps_everything_and_cleanup_retires_the_old_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = open(dir.path());
    seed(&f, 450);
    let old = f.ring.primary_key_id().expect("open ring");
    f.ring.rotate("t", None, "test", true).expect("rotate");
    let new = f.ring.primary_key_id().expect("open ring");
    let m = migrator(&f, 100, None);

    // Dry run: counts by key, writes nothing.
    let before = f
        .store
        .list(Collection::Secrets, &ListQuery::all(1000))
        .expect("list");
    let dry = j(m.dry_run(MigrationStore::Secrets).expect("dry run"));
    assert_eq!(
        (dry["total"].as_u64(), dry["would_change"].as_u64()),
        (Some(450), Some(450)),
        "{dry}"
    );
    assert_eq!(dry["by_key"][0]["key_id"], old.as_str(), "{dry}");
    assert_eq!(
        f.store
            .list(Collection::Secrets, &ListQuery::all(1000))
            .expect("list"),
        before
    );
    assert_eq!(j(m.status(None).expect("status"))["state"], "idle");

    let seen = std::sync::Mutex::new(0);
    let st = m
        .run(MigrationStore::Secrets, "t", &|_| {
            *seen.lock().expect("lock") += 1;
        })
        .expect("run");
    assert_eq!(st.state, RunState::Completed);
    assert_eq!(
        (st.total, st.migrated, st.failed, st.already_current),
        (450, 450, 0, 0)
    );
    assert!(*seen.lock().expect("lock") >= 5, "progress per batch");
    assert_all_under(&f, 450, &new);
    let status = j(m.status(Some("secrets")).expect("status"));
    assert_eq!(status["state"], "completed", "{status}");
    assert!(
        status["finished_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{status}"
    );
    assert_eq!(actions(&f, "migration_started").len(), 1);
    let fin = actions(&f, "migration_finished");
    assert_eq!(fin[0].details["migrated"], 450);

    // A second run has nothing to do.
    let st = m.run(MigrationStore::Secrets, "t", &|_| {}).expect("rerun");
    assert_eq!((st.migrated, st.already_current), (0, 450));

    // The old key is no longer used: cleanup retires it.
    let out = j(f
        .ring
        .cleanup_expired("t", None, std::time::Duration::ZERO)
        .expect("cleanup"));
    assert_eq!(out["retired"][0]["key_id"], old.as_str(), "{out}");
}

#[test]
fn undecryptable_records_are_reported_and_the_rest_migrated_then_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = open(dir.path());
    seed(&f, 120);
    f.ring.rotate("t", None, "test", true).expect("rotate");
    let new = f.ring.primary_key_id().expect("open ring");
    // s-00007: ciphertext of another record (AAD mismatch); s-00050: not an envelope.
    let get = |id: &str| {
        get_json::<SecretRecord>(f.store.as_ref(), Collection::Secrets, id)
            .expect("get")
            .expect("present")
    };
    let (v7, mut r7) = get("s-00007");
    r7.envelope = get("s-00008").1.envelope;
    let (v50, mut r50) = get("s-00050");
    r50.envelope = "41524731ffff".into();
    f.store
        .write(
            vec![
                WriteOp::put_json(Collection::Secrets, "s-00007", &r7, Expect::Version(v7))
                    .expect("op"),
                WriteOp::put_json(Collection::Secrets, "s-00050", &r50, Expect::Version(v50))
                    .expect("op"),
            ],
            Durability::Durable,
        )
        .expect("corrupt");
    let m = migrator(&f, 50, None);
    let st = m.run(MigrationStore::Secrets, "t", &|_| {}).expect("run");
    assert_eq!(st.state, RunState::CompletedWithErrors);
    assert_eq!((st.migrated, st.failed), (118, 2));
    let ids: Vec<_> = st
        .failed_records
        .iter()
        .map(|r| r.record_id.as_str())
        .collect();
    assert_eq!(ids, ["s-00007", "s-00050"]);
    assert!(
        st.failed_records[0].error.contains("AAD mismatch"),
        "{:?}",
        st.failed_records
    );
    assert_eq!(st.failed_records[0].store, "secrets");
    assert_eq!(
        f.metrics
            .migration_errors
            .with_label_values(&["secrets"])
            .get(),
        2
    );
    for i in (0..120).filter(|i| *i != 7 && *i != 50) {
        let id = format!("s-{i:05}");
        let (_, r) = get(&id);
        assert_eq!(r.key_id, new, "{id}");
        let plain = f
            .ring
            .decrypt(&id, &hex::decode(&r.envelope).expect("hex"), None)
            .expect("decrypt");
        assert_eq!(plain, value(i).as_bytes());
    }

    // Retrying fails the same way; fixing one record then retrying recovers it.
    let st = m
        .retry_failed(MigrationStore::Secrets, "t")
        .expect("retry")
        .expect("two failed");
    assert_eq!((st.migrated, st.failed), (118, 2));
    let p = principal();
    f.secrets
        .put(
            &p,
            "s-00007",
            &value(7),
            "token",
            None,
            &RequestMeta::default(),
        )
        .expect("fix");
    let st = m
        .retry_failed(MigrationStore::Secrets, "t")
        .expect("retry")
        .expect("two failed");
    assert_eq!((st.failed, st.failed_records.len()), (1, 1));
    assert_eq!(
        st.already_current, 1,
        "the fixed record is under the primary"
    );

    // Skip the corrupt one: recorded, audited, and left alone by later runs.
    let st = m
        .skip_record(MigrationStore::Secrets, "s-00050", "t")
        .expect("skip");
    assert_eq!(
        (st.failed, st.skipped, st.state),
        (0, 1, RunState::Completed)
    );
    assert_eq!(st.skipped_records, ["s-00050"]);
    // Nothing failed is left: a retry does nothing and says so.
    let started = actions(&f, "migration_started").len();
    assert!(
        m.retry_failed(MigrationStore::Secrets, "t")
            .expect("retry")
            .is_none()
    );
    assert_eq!(actions(&f, "migration_started").len(), started);
    assert_eq!(
        actions(&f, "migration_record_skipped")[0].details["record_id"],
        "s-00050"
    );
    let st = m
        .run(MigrationStore::Secrets, "t", &|_| {})
        .expect("run again");
    assert_eq!(
        (st.failed, st.skipped, st.already_current, st.total),
        (0, 1, 119, 120)
    );
}

#[test]
fn a_stopped_migration_resumes_from_its_cursor_and_counts_add_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = open(dir.path());
    seed(&f, 1000);
    f.ring.rotate("t", None, "test", true).expect("rotate");
    let new = f.ring.primary_key_id().expect("open ring");
    let e = migrator(&f, 100, Some(3))
        .run(MigrationStore::Secrets, "t", &|_| {})
        .expect_err("stops");
    assert!(matches!(e, MigrationError::Stopped(3)), "{e}");
    let m = migrator(&f, 100, None);
    let status = j(m.status(None).expect("status"));
    assert_eq!(status["state"], "interrupted", "{status}");
    assert_eq!(status["migrated"], 300, "{status}");
    assert_eq!(status["cursor"], "s-00299", "{status}");
    let st = m
        .run(MigrationStore::Secrets, "t", &|_| {})
        .expect("resume");
    assert_eq!(
        (st.migrated, st.total, st.resumed, st.already_current),
        (1000, 1000, 1, 0)
    );
    assert_all_under(&f, 1000, &new);
}

#[test]
fn concurrent_writes_during_a_migration_are_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = Arc::new(open(dir.path()));
    seed(&f, 3000);
    f.ring.rotate("t", None, "test", true).expect("rotate");
    let new = f.ring.primary_key_id().expect("open ring");
    let m = migrator(&f, 200, None);
    let writer = {
        let f = f.clone();
        std::thread::spawn(move || {
            let p = principal();
            let mut n = 0;
            for round in 0..4 {
                for i in (0..3000).step_by(37) {
                    let id = format!("s-{i:05}");
                    let v = format!("rewritten {round} {i}");
                    f.secrets
                        .put(&p, &id, &v, "token", None, &RequestMeta::default())
                        .expect("put");
                    n += 1;
                }
            }
            n
        })
    };
    let st = m.run(MigrationStore::Secrets, "t", &|_| {}).expect("run");
    let writes = writer.join().expect("writer");
    assert!(writes > 0);
    assert_eq!(st.failed, 0);
    assert_eq!(st.total, 3000);
    let p = principal();
    for i in 0..3000 {
        let id = format!("s-{i:05}");
        let (view, v) = f
            .secrets
            .get(&p, &id, &RequestMeta::default())
            .expect("get");
        assert_eq!(view.key_id, new.as_str(), "{id}");
        if i % 37 == 0 {
            assert_eq!(v, format!("rewritten 3 {i}"), "{id}");
        } else {
            assert_eq!(v, value(i), "{id}");
        }
    }
}

#[test]
fn rotation_by_accessor_marks_exactly_the_secrets_that_user_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = open(dir.path());
    let meta = RequestMeta::default();
    let admin = principal();
    let mut alice = principal();
    alice.user_id = "alice".into();
    for id in ["a", "b", "c"] {
        f.secrets
            .put(&admin, id, "v", "api_key", None, &meta)
            .expect("put");
    }
    f.secrets.get(&alice, "a", &meta).expect("read");
    f.secrets.get(&alice, "a", &meta).expect("read");
    f.secrets.get(&alice, "c", &meta).expect("read");
    f.secrets.get(&admin, "b", &meta).expect("read");
    let dry = j(f
        .secrets
        .mark_accessed_by("alice", true, "cli")
        .expect("dry run"));
    assert_eq!(
        dry["secrets"][0]["action"], "would_mark_for_rotation",
        "{dry}"
    );
    let (items, _) = f.secrets.list(&principal(), None, 10).expect("list");
    assert!(items.iter().all(|i| !i.rotation_required));

    let out = j(f
        .secrets
        .mark_accessed_by("alice", false, "cli")
        .expect("mark"));
    let ids: Vec<_> = out["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [Some("a"), Some("c")], "{out}");
    assert_eq!(out["secrets"][0]["action"], "marked_for_rotation");
    assert_eq!(out["secrets"][0]["secret_type"], "api_key");
    let (items, _) = f.secrets.list(&principal(), None, 10).expect("list");
    let marked: Vec<_> = items
        .iter()
        .filter(|i| i.rotation_required)
        .map(|i| Some(i.id.as_str()))
        .collect();
    assert_eq!(marked, [Some("a"), Some("c")]);
    assert_eq!(actions(&f, "secret_rotation_marked").len(), 2);
    // Marked secrets still decrypt; a new value clears the mark.
    assert_eq!(f.secrets.get(&admin, "a", &meta).expect("get").1, "v");
    f.secrets
        .put(&admin, "a", "v2", "api_key", None, &meta)
        .expect("rotate value");
    let (items, _) = f.secrets.list(&principal(), None, 10).expect("list");
    assert!(!items[0].rotation_required);
    let again = j(f
        .secrets
        .mark_accessed_by("alice", false, "cli")
        .expect("again"));
    assert_eq!(again["secrets"][1]["action"], "already_marked", "{again}");
}

#[test]
fn a_stopped_migration_starts_over_after_another_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = open(dir.path());
    seed(&f, 300);
    f.ring.rotate("t", None, "first", true).expect("rotate");
    let e = migrator(&f, 100, Some(1))
        .run(MigrationStore::Secrets, "t", &|_| {})
        .expect_err("stops");
    assert!(matches!(e, MigrationError::Stopped(1)), "{e}");
    f.ring.rotate("t", None, "second", true).expect("rotate");
    let newest = f.ring.primary_key_id().expect("open ring");
    let st = migrator(&f, 100, None)
        .run(MigrationStore::Secrets, "t", &|_| {})
        .expect("run");
    assert_eq!((st.resumed, st.migrated, st.total), (0, 300, 300));
    assert_all_under(&f, 300, &newest);
}

#[test]
fn the_stored_state_stays_one_flat_record_that_reads_back_as_written() {
    // A progress record as stored before the state embedded its view: one
    // flat object, `started_at_us` among the view's fields.
    let stored = serde_json::json!({
        "state": "running", "store": "secrets", "target_key_id": "dk-v2-00000000",
        "cursor": "s-00099", "total": 300, "migrated": 90, "already_current": 5,
        "failed": 1, "skipped": 4,
        "failed_records": [{"record_id": "s-00007", "store": "secrets", "error": "bad"}],
        "skipped_records": ["s-00001"], "started_at": "2026-01-01T00:00:00Z",
        "started_at_us": 1_767_225_600_000_000_i64, "finished_at": null,
        "updated_at": "2026-01-01T00:00:01Z", "resumed": 2
    });
    let st: MigrationState = serde_json::from_value(stored.clone()).expect("reads");
    assert_eq!((st.migrated, st.resumed), (90, 2));
    assert_eq!(st.started_at_us, Some(1_767_225_600_000_000));
    assert_eq!(st.failed_records[0].record_id, "s-00007");
    assert_eq!(j(&st), stored);
    // The view is the state without what only the runner needs.
    let mut view = stored;
    view.as_object_mut().map(|o| o.remove("started_at_us"));
    assert_eq!(j(st.view()), view);
}

/// A view as the JSON it is served as.
fn j<T: serde::Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).expect("view serializes")
}
