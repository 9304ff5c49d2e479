//! The behaviour every `Store` backend must have, one function per behaviour,
//! each given a fresh, empty store. A backend's tests get one `#[test]` per
//! behaviour from `store_suite!` with a factory for fresh stores, so the
//! embedded store (`tests/store.rs`) and the PostgreSQL store run the same
//! suite and a failure names the behaviour.
//!
//! `records` holds the builders those tests (and others) write records with.

use std::ops::Bound;

use aragora::store::{Collection, Durability, Expect, ListQuery, Store, StoreError, WriteOp};

/// The store of a stopped development server (keys from its
/// `dev-keys.env`): for tests that change what is on disk behind its back.
pub fn open_stopped(server: &crate::Server) -> aragora::store::EmbeddedStore {
    let keys = server.dev_keys();
    let key = |name: &str| {
        let mut k = [0u8; 32];
        hex::decode_to_slice(&keys[name], &mut k).expect("a 64-hex-digit key");
        k
    };
    aragora::store::EmbeddedStore::open(
        &server.data_dir.join("aedb"),
        key("AEDB_MANIFEST_KEY"),
        key("AEDB_CHECKPOINT_KEY"),
    )
    .expect("open the stopped server's store")
}

/// With the server stopped: gives secret `to` the envelope of secret `from`,
/// so decrypting `to` fails (the record id is the AAD).
pub fn copy_secret_envelope(server: &crate::Server, from: &str, to: &str) {
    use aragora::secrets::SecretRecord;
    use aragora::store::get_json;
    let store = open_stopped(server);
    let get = |id: &str| {
        get_json::<SecretRecord>(&store, Collection::Secrets, id)
            .expect("get")
            .expect("present")
    };
    let (version, mut rec) = get(to);
    rec.envelope = get(from).1.envelope;
    let op =
        WriteOp::put_json(Collection::Secrets, to, &rec, Expect::Version(version)).expect("op");
    store.write(vec![op], Durability::Durable).expect("write");
    store.close().expect("close");
}

/// Builders for store records and reads of them as text.
pub mod records {
    use aragora::store::{Collection, Expect, Store, WriteOp};

    /// A put of the text `v` at `c/id` with `expect`.
    pub fn put(c: Collection, id: &str, v: &str, expect: Expect) -> WriteOp {
        WriteOp::Put {
            collection: c,
            id: id.into(),
            value: v.as_bytes().to_vec(),
            expect,
        }
    }

    /// A put of `v` as JSON at `c/id` with `expect`.
    pub fn put_json<T: serde::Serialize>(
        c: Collection,
        id: &str,
        v: &T,
        expect: Expect,
    ) -> WriteOp {
        WriteOp::put_json(c, id, v, expect)
            .unwrap_or_else(|e| panic!("{}/{id} as JSON: {e}", c.name()))
    }

    /// The record at `c/id` as text, `None` when absent.
    pub fn value(store: &dyn Store, c: Collection, id: &str) -> Option<String> {
        store
            .get(c, id)
            .unwrap_or_else(|e| panic!("get {}/{id}: {e}", c.name()))
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
    }

    /// The version of the record at `c/id` (panics when absent).
    pub fn version(store: &dyn Store, c: Collection, id: &str) -> u64 {
        store
            .get(c, id)
            .unwrap_or_else(|e| panic!("get {}/{id}: {e}", c.name()))
            .unwrap_or_else(|| panic!("{}/{id} is absent", c.name()))
            .version
    }
}

use records::{put, value, version};

/// One behaviour of the suite: it panics when the store lacks it.
pub type Behaviour = fn(&dyn Store);

/// Every behaviour, by name (the order `run_all` runs them in).
pub const BEHAVIOURS: &[(&str, Behaviour)] = &[
    (
        "a_second_insert_of_an_id_conflicts",
        a_second_insert_of_an_id_conflicts,
    ),
    (
        "compare_and_set_refuses_a_stale_version_and_versions_grow",
        compare_and_set_refuses_a_stale_version_and_versions_grow,
    ),
    (
        "a_batch_with_one_failed_expectation_applies_nothing_and_names_the_record",
        a_batch_with_one_failed_expectation_applies_nothing_and_names_the_record,
    ),
    (
        "get_many_answers_in_the_order_asked_with_absent_as_none",
        get_many_answers_in_the_order_asked_with_absent_as_none,
    ),
    (
        "upsert_and_delete_without_expectation",
        upsert_and_delete_without_expectation,
    ),
    (
        "lists_are_ordered_bounded_reversible_and_carry_versions",
        lists_are_ordered_bounded_reversible_and_carry_versions,
    ),
    ("collections_are_separate", collections_are_separate),
    (
        "concurrent_compare_and_set_loses_no_increment",
        concurrent_compare_and_set_loses_no_increment,
    ),
    (
        "paging_visits_every_record_once",
        paging_visits_every_record_once,
    ),
];

/// Runs every behaviour, each on a store from `fresh` (`(guard, store)` as
/// for `store_suite!`); panics naming the first behaviour that does not hold.
pub fn run_all<G, S: Store>(mut fresh: impl FnMut() -> (G, S)) {
    for (name, behaviour) in BEHAVIOURS {
        let (_guard, store) = fresh();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| behaviour(&store)));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("store behaviour {name} failed: {msg}");
        }
    }
}

/// One `#[test]` per behaviour of the suite. `$fresh` is a closure returning
/// `(guard, store)`: a new, empty store and whatever must live as long as it
/// (its temp dir, say; `()` when nothing).
#[macro_export]
macro_rules! store_suite {
    ($fresh:expr) => {
        $crate::store_suite!(@tests $fresh;
            a_second_insert_of_an_id_conflicts,
            compare_and_set_refuses_a_stale_version_and_versions_grow,
            a_batch_with_one_failed_expectation_applies_nothing_and_names_the_record,
            get_many_answers_in_the_order_asked_with_absent_as_none,
            upsert_and_delete_without_expectation,
            lists_are_ordered_bounded_reversible_and_carry_versions,
            collections_are_separate,
            concurrent_compare_and_set_loses_no_increment,
            paging_visits_every_record_once,
        );
    };
    (@tests $fresh:expr; $($name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                #[allow(clippy::redundant_closure_call)]
                let (_guard, store) = ($fresh)();
                $crate::store::$name(&store);
            }
        )*
    };
    // A backend on a server the machine may lack (PostgreSQL): `$fresh`
    // returns `None` when a test is to be skipped (it says why; under CI it
    // panics instead).
    (@skippable $fresh:expr) => {
        $crate::store_suite!(@skippable_tests $fresh;
            a_second_insert_of_an_id_conflicts,
            compare_and_set_refuses_a_stale_version_and_versions_grow,
            a_batch_with_one_failed_expectation_applies_nothing_and_names_the_record,
            get_many_answers_in_the_order_asked_with_absent_as_none,
            upsert_and_delete_without_expectation,
            lists_are_ordered_bounded_reversible_and_carry_versions,
            collections_are_separate,
            concurrent_compare_and_set_loses_no_increment,
            paging_visits_every_record_once,
        );
    };
    (@skippable_tests $fresh:expr; $($name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                #[allow(clippy::redundant_closure_call)]
                let Some((_guard, store)) = ($fresh)() else {
                    return;
                };
                $crate::store::$name(&store);
            }
        )*
    };
}

/// Create-if-absent: the second insert of an id conflicts and changes nothing.
pub fn a_second_insert_of_an_id_conflicts(store: &dyn Store) {
    let users = Collection::Users;
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
}

/// Compare-and-set on the version: the current version wins, a stale one
/// conflicts, and versions grow.
pub fn compare_and_set_refuses_a_stale_version_and_versions_grow(store: &dyn Store) {
    let users = Collection::Users;
    store
        .write(
            vec![put(users, "u1", "a", Expect::Absent)],
            Durability::Durable,
        )
        .expect("insert");
    let v1 = version(store, users, "u1");
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
    let v2 = version(store, users, "u1");
    assert!(v2 > v1, "versions must grow ({v1} then {v2})");
}

/// Atomicity: one failing expectation applies nothing of the batch, and the
/// conflict names the record whose expectation failed.
pub fn a_batch_with_one_failed_expectation_applies_nothing_and_names_the_record(store: &dyn Store) {
    let users = Collection::Users;
    store
        .write(
            vec![put(users, "u1", "a", Expect::Absent)],
            Durability::Durable,
        )
        .expect("insert");
    let v1 = version(store, users, "u1");
    store
        .write(
            vec![put(users, "u1", "c", Expect::Version(v1))],
            Durability::Durable,
        )
        .expect("update");
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
    assert_eq!(value(store, users, "u1").as_deref(), Some("c"));
}

/// Several records at once, in the order asked, absent ones as `None`.
pub fn get_many_answers_in_the_order_asked_with_absent_as_none(store: &dyn Store) {
    let users = Collection::Users;
    store
        .write(
            vec![put(users, "u1", "a", Expect::Absent)],
            Durability::Durable,
        )
        .expect("insert");
    let v = version(store, users, "u1");
    let many = store
        .get_many(&[
            (users, "u1"),
            (users, "nobody"),
            (Collection::UserEmails, "e@x"),
        ])
        .expect("get_many");
    assert_eq!(many.len(), 3);
    assert_eq!(many[0].as_ref().map(|r| r.version), Some(v));
    assert!(many[1].is_none() && many[2].is_none());
}

/// `Expect::Any` creates (upsert) and deletes without a version.
pub fn upsert_and_delete_without_expectation(store: &dyn Store) {
    let users = Collection::Users;
    store
        .write(
            vec![put(users, "u3", "z", Expect::Any)],
            Durability::Durable,
        )
        .expect("upsert");
    assert_eq!(value(store, users, "u3").as_deref(), Some("z"));
    store
        .write(
            vec![WriteOp::delete(users, "u3", Expect::Any)],
            Durability::Durable,
        )
        .expect("delete");
    assert_eq!(value(store, users, "u3"), None);
}

/// Lists: ascending id order, pages after an id, reverse within bounds with
/// a limit, every row with its version.
pub fn lists_are_ordered_bounded_reversible_and_carry_versions(store: &dyn Store) {
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
}

/// Records in one collection never show in another's list.
pub fn collections_are_separate(store: &dyn Store) {
    store
        .write(
            vec![put(Collection::Audit, "0001", "1", Expect::Absent)],
            Durability::Durable,
        )
        .expect("insert");
    assert!(
        store
            .list(Collection::Sessions, &ListQuery::all(10))
            .expect("empty")
            .is_empty(),
        "collections are separate"
    );
}

/// Threads incrementing one counter with compare-and-set lose no increment: a
/// stale write is always refused.
pub fn concurrent_compare_and_set_loses_no_increment(store: &dyn Store) {
    const THREADS: usize = 4;
    const EACH: usize = 25;
    let counters = Collection::Jobs;
    store
        .write(
            vec![put(counters, "counter", "0", Expect::Absent)],
            Durability::Durable,
        )
        .expect("counter");
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                for _ in 0..EACH {
                    loop {
                        let r = store
                            .get(counters, "counter")
                            .expect("get")
                            .expect("present");
                        let n: u64 = String::from_utf8_lossy(&r.value).parse().expect("number");
                        match store.write(
                            vec![put(
                                counters,
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
        value(store, counters, "counter").as_deref(),
        Some((THREADS * EACH).to_string().as_str()),
        "every compare-and-set increment counted exactly once"
    );
}

/// `for_each_json` pages through more records than one page holds, each
/// once, in id order.
pub fn paging_visits_every_record_once(store: &dyn Store) {
    let roles = Collection::Roles;
    let n = 2_345;
    let ops: Vec<WriteOp> = (0..n)
        .map(|i| put(roles, &format!("r{i:05}"), "\"x\"", Expect::Absent))
        .collect();
    store.write(ops, Durability::Durable).expect("bulk insert");
    let mut seen = Vec::new();
    aragora::store::for_each_json::<String>(store, roles, |id, _, v| {
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
