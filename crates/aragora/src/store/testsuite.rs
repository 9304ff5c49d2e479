//! The behaviour every `Store` backend must have, as one function a backend's
//! tests call with a fresh, empty store (the embedded store's tests run it in
//! `tests/store.rs`; the PostgreSQL store runs the same).

use std::ops::Bound;

use super::{Collection, Durability, Expect, ListQuery, Store, StoreError, WriteOp};

fn put(c: Collection, id: &str, v: &str, expect: Expect) -> WriteOp {
    WriteOp::Put {
        collection: c,
        id: id.into(),
        value: v.as_bytes().to_vec(),
        expect,
    }
}

fn value(store: &dyn Store, c: Collection, id: &str) -> Option<String> {
    store
        .get(c, id)
        .expect("get")
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
}

/// Panics with a description of the first behaviour that does not hold.
pub fn run(store: &dyn Store) {
    basics(store);
    concurrent_compare_and_set(store);
    paging_visits_every_record_once(store);
}

/// Threads incrementing one counter with compare-and-set lose no increment: a
/// stale write is always refused.
fn concurrent_compare_and_set(store: &dyn Store) {
    const THREADS: usize = 4;
    const EACH: usize = 25;
    let meta = Collection::Meta;
    store
        .write(
            vec![put(meta, "counter", "0", Expect::Absent)],
            Durability::Durable,
        )
        .expect("counter");
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                for _ in 0..EACH {
                    loop {
                        let r = store.get(meta, "counter").expect("get").expect("present");
                        let n: u64 = String::from_utf8_lossy(&r.value).parse().expect("number");
                        match store.write(
                            vec![put(
                                meta,
                                "counter",
                                &(n + 1).to_string(),
                                Expect::Version(r.version),
                            )],
                            Durability::Visible,
                        ) {
                            Ok(_) => break,
                            Err(e) if e.is_conflict() => continue,
                            Err(e) => panic!("increment: {e}"),
                        }
                    }
                }
            });
        }
    });
    assert_eq!(
        value(store, meta, "counter").as_deref(),
        Some((THREADS * EACH).to_string().as_str()),
        "every compare-and-set increment counted exactly once"
    );
}

/// `for_each_json` pages through more records than one page holds.
fn paging_visits_every_record_once(store: &dyn Store) {
    let roles = Collection::Roles;
    let n = 2_345;
    let ops: Vec<WriteOp> = (0..n)
        .map(|i| put(roles, &format!("r{i:05}"), "\"x\"", Expect::Absent))
        .collect();
    store.write(ops, Durability::Durable).expect("bulk insert");
    let mut seen = Vec::new();
    super::for_each_json::<String>(store, roles, |id, _, v| {
        assert_eq!(v, "x");
        seen.push(id);
        Ok(())
    })
    .expect("for_each_json");
    assert_eq!(seen.len(), n, "every record once");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "in id order, no repeats"
    );
}

fn basics(store: &dyn Store) {
    let users = Collection::Users;
    // Create-if-absent and its conflict.
    store
        .write(
            vec![put(users, "u1", "a", Expect::Absent)],
            Durability::Durable,
        )
        .expect("first insert");
    let err = store
        .write(
            vec![put(users, "u1", "b", Expect::Absent)],
            Durability::Durable,
        )
        .expect_err("second insert of the same id must conflict");
    assert!(err.is_conflict(), "expected Conflict, got {err}");
    assert_eq!(value(store, users, "u1").as_deref(), Some("a"));

    // Compare-and-set on the version.
    let v1 = store
        .get(users, "u1")
        .expect("get")
        .expect("present")
        .version;
    store
        .write(
            vec![put(users, "u1", "c", Expect::Version(v1))],
            Durability::Durable,
        )
        .expect("CAS at the current version");
    let err = store
        .write(
            vec![put(users, "u1", "d", Expect::Version(v1))],
            Durability::Durable,
        )
        .expect_err("CAS at a stale version must conflict");
    assert!(err.is_conflict(), "expected Conflict, got {err}");
    assert_eq!(value(store, users, "u1").as_deref(), Some("c"));
    let v2 = store
        .get(users, "u1")
        .expect("get")
        .expect("present")
        .version;
    assert!(v2 > v1, "versions must grow ({v1} then {v2})");

    // Atomicity: one failing expectation applies nothing of the batch.
    let err = store
        .write(
            vec![
                put(users, "u2", "x", Expect::Absent),
                put(Collection::UserEmails, "e@x", "u2", Expect::Absent),
                put(users, "u1", "lost", Expect::Version(v1)),
            ],
            Durability::Durable,
        )
        .expect_err("batch with a stale expectation");
    match &err {
        StoreError::Conflict { collection, id, .. } => {
            assert_eq!(
                (*collection, id.as_str()),
                ("users", "u1"),
                "conflict names the record"
            );
        }
        other => panic!("expected Conflict, got {other}"),
    }
    assert_eq!(
        value(store, users, "u2"),
        None,
        "nothing of a failed batch applies"
    );
    assert_eq!(value(store, Collection::UserEmails, "e@x"), None);

    // Several records at once, in the order asked, absent ones as None.
    let many = store
        .get_many(&[
            (users, "u1"),
            (users, "nobody"),
            (Collection::UserEmails, "e@x"),
        ])
        .expect("get_many");
    assert_eq!(many.len(), 3);
    assert_eq!(many[0].as_ref().map(|r| r.version), Some(v2));
    assert!(many[1].is_none() && many[2].is_none());

    // Delete with and without expectation.
    store
        .write(
            vec![put(users, "u3", "z", Expect::Any)],
            Durability::Durable,
        )
        .expect("upsert");
    store
        .write(
            vec![WriteOp::delete(users, "u3", Expect::Any)],
            Durability::Durable,
        )
        .expect("delete");
    assert_eq!(value(store, users, "u3"), None);

    // Lists: order, bounds, reverse, limit, paging.
    let audit = Collection::Audit;
    for i in 0..25 {
        store
            .write(
                vec![put(
                    audit,
                    &format!("{i:04}"),
                    &i.to_string(),
                    Expect::Absent,
                )],
                Durability::Visible,
            )
            .map(|r| store.wait_durable(r).expect("durable"))
            .expect("append");
    }
    let all = store.list(audit, &ListQuery::all(100)).expect("list");
    let ids: Vec<_> = all.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 25);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ascending id order");
    let page = store
        .list(audit, &ListQuery::after(Some("0009"), 5))
        .expect("page");
    let ids: Vec<_> = page.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["0010", "0011", "0012", "0013", "0014"]);
    let newest = store
        .list(
            audit,
            &ListQuery {
                start: Bound::Included("0005"),
                end: Bound::Excluded("0020"),
                reverse: true,
                limit: 3,
            },
        )
        .expect("reverse");
    let ids: Vec<_> = newest.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["0019", "0018", "0017"]);
    assert!(
        newest.iter().all(|(_, r)| r.version > 0),
        "lists carry versions"
    );
    assert!(
        store
            .list(Collection::Sessions, &ListQuery::all(10))
            .expect("empty")
            .is_empty(),
        "collections are separate"
    );
}
