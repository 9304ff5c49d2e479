//! The shared Store behaviour suite against the embedded aedb store, plus what
//! only the embedded store has to show: everything survives a reopen.

use aragora::store::{Collection, Durability, EmbeddedStore, Expect, Store, WriteOp, testsuite};

const MK: [u8; 32] = [7; 32];
const CK: [u8; 32] = [9; 32];

#[test]
fn embedded_store_passes_the_store_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), MK, CK).expect("open");
    testsuite::run(&store);
}

#[test]
fn embedded_store_keeps_records_and_versions_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let version = {
        let store = EmbeddedStore::open(dir.path(), MK, CK).expect("open");
        store
            .write(
                vec![WriteOp::Put {
                    collection: Collection::Users,
                    id: "u1".into(),
                    value: b"{}".to_vec(),
                    expect: Expect::Absent,
                }],
                Durability::Durable,
            )
            .expect("write");
        let v = store
            .get(Collection::Users, "u1")
            .expect("get")
            .expect("present")
            .version;
        store.close().expect("close");
        v
    };
    let store = EmbeddedStore::open(dir.path(), MK, CK).expect("reopen");
    let r = store
        .get(Collection::Users, "u1")
        .expect("get")
        .expect("kept");
    assert_eq!(
        r.version, version,
        "versions survive a reopen (CAS keeps working)"
    );
    // A wrong key is refused, never silently accepted.
    drop(store);
    let err = EmbeddedStore::open(dir.path(), [8; 32], CK).expect_err("wrong manifest key");
    assert!(err.to_string().contains("opening"), "{err}");
}
