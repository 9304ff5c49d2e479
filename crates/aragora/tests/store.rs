//! The shared Store behaviour suite (from the test kit, one test per
//! behaviour) against the embedded aedb store, plus what only the embedded
//! store has to show: everything survives a reopen, and a wrong key is refused.

use aragora::store::{Collection, Durability, EmbeddedStore, Expect, Store};
use aragora_testkit::store::records::{put, version};

const MK: [u8; 32] = [7; 32];
const CK: [u8; 32] = [9; 32];

fn fresh() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), MK, CK).expect("open");
    (dir, store)
}

aragora_testkit::store_suite!(fresh);

/// A store with one record written durably and closed: (dir, its version).
fn closed_with_one_record() -> (tempfile::TempDir, u64) {
    let (dir, store) = fresh();
    store
        .write(
            vec![put(Collection::Users, "u1", "{}", Expect::Absent)],
            Durability::Durable,
        )
        .expect("write");
    let v = version(&store, Collection::Users, "u1");
    store.close().expect("close");
    (dir, v)
}

#[test]
fn records_and_versions_survive_a_reopen() {
    let (dir, written) = closed_with_one_record();
    let store = EmbeddedStore::open(dir.path(), MK, CK).expect("reopen");
    assert_eq!(
        version(&store, Collection::Users, "u1"),
        written,
        "versions survive a reopen (CAS keeps working)"
    );
}

#[test]
fn a_wrong_manifest_key_is_refused_at_open() {
    let (dir, _) = closed_with_one_record();
    let err = EmbeddedStore::open(dir.path(), [8; 32], CK).expect_err("wrong manifest key");
    assert!(err.to_string().contains("opening"), "{err}");
}
