//! The audit log's chain detects modification, removal and truncation, and
//! search filters and pages as documented.

use std::sync::Arc;

use aragora::audit::{AuditEvent, AuditLog, Outcome, SearchFilter};
use aragora::store::{Collection, Durability, EmbeddedStore, Expect, ListQuery, Store, WriteOp};
use serde_json::json;

fn log_with(n: usize) -> (tempfile::TempDir, Arc<EmbeddedStore>, AuditLog) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path(), [1; 32], [2; 32]).expect("open"));
    let log = AuditLog::new(store.clone());
    for i in 0..n {
        let action = if i % 3 == 0 {
            "auth_failure"
        } else {
            "login_success"
        };
        log.record(
            AuditEvent::new(action, format!("user{}", i % 2), Outcome::Success)
                .details(json!({"email": format!("u{i}@x"), "i": i})),
        )
        .expect("record");
    }
    (dir, store, log)
}

fn ids(store: &EmbeddedStore) -> Vec<(String, Vec<u8>)> {
    store
        .list(Collection::Audit, &ListQuery::all(10_000))
        .expect("list")
        .into_iter()
        .map(|(id, r)| (id, r.value.to_vec()))
        .collect()
}

#[test]
fn intact_chain_verifies_and_search_filters_and_pages() {
    let (_d, _s, log) = log_with(30);
    let r = log.verify().expect("verify");
    assert!(r.ok, "{:?}", r.problems);
    assert_eq!((r.entries_checked, r.head_seq), (30, 30));

    let all = log
        .search(&SearchFilter {
            action: Some("auth_failure".into()),
            minutes: Some(5),
            limit: 1000,
            ..Default::default()
        })
        .expect("search");
    assert_eq!(all.total, 10);
    assert!(all.entries.iter().all(|e| e.action == "auth_failure"));
    assert!(
        all.entries.windows(2).all(|w| w[0].seq < w[1].seq),
        "oldest first"
    );
    assert!(
        all.entries
            .iter()
            .all(|e| e.timestamp.len() == 20 && e.timestamp.ends_with('Z')),
        "YYYY-MM-DDTHH:MM:SSZ"
    );

    // Paging backwards: the newest 4, then the 4 before them.
    let p1 = log
        .search(&SearchFilter {
            limit: 4,
            ..Default::default()
        })
        .expect("page 1");
    assert_eq!(p1.total, 30);
    assert!(p1.truncated, "a page short of the total says so");
    assert_eq!(
        p1.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [27, 28, 29, 30]
    );
    let p2 = log
        .search(&SearchFilter {
            limit: 4,
            before: p1.next_before.clone(),
            ..Default::default()
        })
        .expect("page 2");
    assert_eq!(
        p2.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [23, 24, 25, 26]
    );
    let by_actor = log
        .search(&SearchFilter {
            actor: Some("user1".into()),
            limit: 100,
            ..Default::default()
        })
        .expect("actor");
    assert_eq!(by_actor.total, 15);
    assert!(!by_actor.truncated, "every match fits: not truncated");
}

#[test]
fn modification_removal_and_truncation_are_detected() {
    // Modified entry.
    let (_d, store, log) = log_with(10);
    let entries = ids(&store);
    let (id, value) = &entries[4];
    let tampered = String::from_utf8(value.clone())
        .expect("utf8")
        .replace("u4@x", "someone-else@x");
    store
        .write(
            vec![WriteOp::Put {
                collection: Collection::Audit,
                id: id.clone(),
                value: tampered.into_bytes(),
                expect: Expect::Any,
            }],
            Durability::Durable,
        )
        .expect("tamper");
    let r = log.verify().expect("verify");
    assert!(
        !r.ok && r.problems.iter().any(|p| p.contains("modified")),
        "{:?}",
        r.problems
    );

    // Removed entry from the middle.
    let (_d, store, log) = log_with(10);
    let (id, _) = &ids(&store)[3];
    store
        .write(
            vec![WriteOp::delete(Collection::Audit, id.clone(), Expect::Any)],
            Durability::Durable,
        )
        .expect("delete");
    let r = log.verify().expect("verify");
    assert!(
        !r.ok && r.problems.iter().any(|p| p.contains("missing")),
        "{:?}",
        r.problems
    );

    // Truncated end: the chain head still names the removed last entry.
    let (_d, store, log) = log_with(10);
    let (id, _) = ids(&store).last().cloned().expect("last");
    store
        .write(
            vec![WriteOp::delete(Collection::Audit, id, Expect::Any)],
            Durability::Durable,
        )
        .expect("delete");
    let r = log.verify().expect("verify");
    assert!(
        !r.ok && r.problems.iter().any(|p| p.contains("head")),
        "{:?}",
        r.problems
    );
}

#[test]
fn appends_continue_the_chain_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..2 {
        let store = Arc::new(EmbeddedStore::open(dir.path(), [1; 32], [2; 32]).expect("open"));
        let log = AuditLog::new(store.clone());
        for _ in 0..5 {
            log.record(AuditEvent::new("x", "a", Outcome::Success))
                .expect("record");
        }
        let r = log.verify().expect("verify");
        assert!(r.ok, "round {round}: {:?}", r.problems);
        assert_eq!(r.head_seq, 5 * (round + 1));
        drop(log);
        Arc::try_unwrap(store)
            .expect("sole owner")
            .close()
            .expect("close");
    }
}
