//! The shared Store behaviour suite against the PostgreSQL store (one fresh
//! database per test on the machine's server), plus what only a shared store
//! has to show: migrations (once, under a lock, refusing a newer schema),
//! connection failures named without credentials, byte-order ids, calls from
//! async code, and one unbroken audit chain under writers on two replicas.

use std::collections::BTreeSet;
use std::sync::Arc;

use aragora::audit::{AuditEvent, AuditLog, Outcome};
use aragora::store::postgres::SCHEMA_VERSION;
use aragora::store::{
    Collection, Durability, Expect, ListQuery, PostgresStore, Store, StoreError, WriteOp,
};
use aragora_testkit::postgres::TestDatabase;
use aragora_testkit::store::records::{put, value, version};

fn fresh() -> Option<(TestDatabase, PostgresStore)> {
    let db = TestDatabase::create()?;
    let store = PostgresStore::connect(&db.url, 4).expect("connect to the test database");
    Some((db, store))
}

aragora_testkit::store_suite!(@skippable fresh);

#[test]
fn records_and_versions_survive_a_reconnect() {
    let Some((db, store)) = fresh() else { return };
    store
        .write(
            vec![put(Collection::Users, "u1", "{}", Expect::Absent)],
            Durability::Durable,
        )
        .expect("write");
    let written = version(&store, Collection::Users, "u1");
    drop(store);
    let store = PostgresStore::connect(&db.url, 2).expect("reconnect");
    assert_eq!(
        version(&store, Collection::Users, "u1"),
        written,
        "versions survive a reconnect (CAS keeps working)"
    );
    // The sequence goes on past what is stored: a new write's version is
    // higher, never reused.
    store
        .write(
            vec![put(Collection::Users, "u1", "{}", Expect::Version(written))],
            Durability::Durable,
        )
        .expect("CAS after reconnect");
    assert!(version(&store, Collection::Users, "u1") > written);
}

/// Several replicas booting at once on an empty database: every one starts,
/// and each migration is applied once.
#[test]
fn replicas_booting_together_migrate_once() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| PostgresStore::connect(&db.url, 1).map(drop)))
            .collect();
        for h in handles {
            h.join().expect("thread").expect("every replica boots");
        }
    });
    let store = PostgresStore::connect(&db.url, 1).expect("connect");
    store
        .write(
            vec![put(Collection::Users, "u", "x", Expect::Absent)],
            Durability::Durable,
        )
        .expect("the schema works");
    let rows = db.query_i64("SELECT count(*) FROM aragora_schema_migrations");
    assert_eq!(
        rows, SCHEMA_VERSION,
        "one row per migration, each applied once"
    );
}

/// A database migrated by a newer aragora is refused, naming both versions.
#[test]
fn a_newer_schema_is_refused_naming_both_versions() {
    let Some((db, store)) = fresh() else { return };
    drop(store);
    let newer = SCHEMA_VERSION + 41;
    db.execute(&format!(
        "INSERT INTO aragora_schema_migrations (version, description) \
         VALUES ({newer}, 'from the future')"
    ));
    let err = PostgresStore::connect(&db.url, 1).expect_err("a newer schema must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&newer.to_string()) && msg.contains(&format!("({SCHEMA_VERSION})")),
        "names both versions: {msg}"
    );
}

/// A server that does not answer: `Unavailable`, naming host and port, never
/// the password.
#[test]
fn an_unreachable_server_is_unavailable_naming_the_host_not_the_password() {
    let err = PostgresStore::connect("postgres://aragora:s3cr3t-pw@127.0.0.1:1/aragora", 1)
        .expect_err("nothing listens on port 1");
    let msg = err.to_string();
    assert!(
        matches!(err, StoreError::Unavailable(_)),
        "expected Unavailable, got {msg}"
    );
    assert!(
        msg.contains("127.0.0.1:1/aragora"),
        "names the server: {msg}"
    );
    assert!(!msg.contains("s3cr3t"), "never the password: {msg}");
    let dbg = format!("{err:?}");
    assert!(!dbg.contains("s3cr3t"), "never the password: {dbg}");
}

/// Ids are ordered by their bytes, as in the embedded store, whatever the
/// database's collation.
#[test]
fn ids_are_listed_in_byte_order() {
    let Some((_db, store)) = fresh() else { return };
    let ids = ["b", "B", "a-1", "a_1", "a1", "é", "~", "Z"];
    let ops = ids
        .iter()
        .map(|id| put(Collection::Roles, id, "x", Expect::Absent))
        .collect();
    store.write(ops, Durability::Durable).expect("insert");
    let listed: Vec<String> = store
        .list(Collection::Roles, &ListQuery::all(100))
        .expect("list")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut expected: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    expected.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(listed, expected, "byte order");
}

/// The store is called from async code too (a handler that forgot
/// `spawn_blocking`): it must answer, not panic about nested runtimes.
#[test]
fn calls_from_inside_an_async_runtime_do_not_panic() {
    let Some((_db, store)) = fresh() else { return };
    let store: Arc<dyn Store> = Arc::new(store);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let s = store.clone();
    rt.block_on(async move {
        s.write(
            vec![put(Collection::Users, "async", "v", Expect::Absent)],
            Durability::Durable,
        )
        .expect("write from async code");
        assert_eq!(
            value(s.as_ref(), Collection::Users, "async").as_deref(),
            Some("v")
        );
    });
    // And the last reference dropped inside a runtime does not panic either.
    let rt2 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt2.block_on(async move { tokio::spawn(async move { drop(store) }).await })
        .expect("drop inside a runtime");
}

/// Two replicas (two stores on one database, each with its own audit log, as
/// two processes have) append concurrently from several threads each: one
/// chain, every entry once, verified from a third.
#[test]
fn concurrent_writers_on_two_replicas_keep_one_audit_chain() {
    const THREADS: usize = 3;
    const EACH: usize = 20;
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let replicas: Vec<Arc<AuditLog>> = (0..2)
        .map(|_| {
            let store: Arc<dyn Store> =
                Arc::new(PostgresStore::connect(&db.url, 4).expect("connect a replica"));
            Arc::new(AuditLog::new(store))
        })
        .collect();
    std::thread::scope(|s| {
        for (r, log) in replicas.iter().enumerate() {
            for t in 0..THREADS {
                let log = log.clone();
                s.spawn(move || {
                    for i in 0..EACH {
                        log.record(
                            AuditEvent::new("test_append", format!("r{r}-t{t}"), Outcome::Success)
                                .details(serde_json::json!({ "n": i })),
                        )
                        .unwrap_or_else(|e| panic!("replica {r} thread {t} append {i}: {e}"));
                    }
                });
            }
        }
    });
    let verifier = AuditLog::new(Arc::new(
        PostgresStore::connect(&db.url, 1).expect("connect the verifier"),
    ));
    let report = verifier.verify().expect("verify");
    let total = (2 * THREADS * EACH) as u64;
    assert!(report.ok, "one unbroken chain: {:?}", report.problems);
    assert_eq!(
        report.entries_checked, total,
        "every append is in the chain"
    );
    assert_eq!(report.head_seq, total);
    let found = verifier
        .search(&aragora::audit::SearchFilter {
            action: Some("test_append".into()),
            limit: 10_000,
            ..Default::default()
        })
        .expect("search");
    let distinct: BTreeSet<(String, String)> = found
        .entries
        .iter()
        .map(|e| (e.actor.clone(), e.details["n"].to_string()))
        .collect();
    assert_eq!(distinct.len() as u64, total, "every entry exactly once");
}

/// A key ring on one replica, opened on its own store (as another process).
fn replica_ring(db: &TestDatabase, dir: &std::path::Path) -> aragora::encryption::KeyRing {
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&db.url, 2).expect("connect"));
    let audit = Arc::new(AuditLog::new(store.clone()));
    aragora::encryption::KeyRing::open(
        store,
        audit,
        aragora::metrics::Metrics::new().expect("metrics"),
        Some(aragora::crypto::MasterKey::from_bytes(
            zeroize::Zeroizing::new([5; 32]),
        )),
        None,
        dir,
        aragora::config::Environment::Development,
        false,
        vec![aragora::secrets::encrypted_collection()],
    )
    .expect("open the key ring")
}

/// A key rotated on one replica decrypts on another at once: a decrypt
/// that names a key the ring does not hold re-reads the ring first.
#[test]
fn a_key_rotated_on_one_replica_decrypts_on_another_at_once() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let dirs = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = replica_ring(&db, dirs.0.path());
    let b = replica_ring(&db, dirs.1.path());
    let first = a.primary_key_id().expect("primary");
    assert_eq!(b.primary_key_id().expect("primary"), first, "one ring");
    let rotated = a
        .rotate("test", None, "replica test", true)
        .expect("rotate on A");
    assert_ne!(rotated.primary_key_id, first);
    let envelope = a.encrypt("secret-1", b"plaintext").expect("encrypt on A");
    let plain = b
        .decrypt("secret-1", &envelope, None)
        .expect("B decrypts under the key A just made");
    assert_eq!(plain, b"plaintext");
}

/// The machine's PostgreSQL (Debian's default configuration) serves TLS with
/// a self-signed certificate for `localhost`: the tests' private CA.
const SERVER_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// `db.url` asking for TLS by `host` (which the certificate must name).
fn tls_url(db: &TestDatabase, host: &str, mode: &str) -> String {
    let url = db.url.replace("127.0.0.1", host);
    assert_ne!(url, db.url, "the test database URL names 127.0.0.1");
    format!("{url}?sslmode={mode}&application_name=aragora-tls-{mode}")
}

/// Whether PostgreSQL sees this store's connections as encrypted.
fn connections_encrypted(db: &TestDatabase, application: &str) -> Vec<bool> {
    let application = application.to_string();
    db.with_client(move |client| async move {
        client
            .query(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = $1",
                &[&application],
            )
            .await
            .expect("pg_stat_ssl")
            .iter()
            .map(|r| r.get::<_, bool>(0))
            .collect()
    })
}

#[test]
fn sslmode_verify_full_encrypts_and_verifies_the_server() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let ca = std::path::PathBuf::from(SERVER_CERT);
    assert!(
        ca.exists(),
        "{SERVER_CERT} (Debian's PostgreSQL certificate) is missing"
    );
    let store =
        PostgresStore::connect_with(&tls_url(&db, "localhost", "verify-full"), 2, Some(&ca))
            .expect("TLS to the server whose certificate the CA file holds");
    store
        .write(
            vec![WriteOp::Put {
                collection: Collection::Users,
                id: "over-tls".into(),
                value: b"{}".to_vec(),
                expect: Expect::Absent,
            }],
            Durability::Durable,
        )
        .expect("write over TLS");
    let seen = connections_encrypted(&db, "aragora-tls-verify-full");
    assert!(
        !seen.is_empty() && seen.iter().all(|ssl| *ssl),
        "every connection of the store is encrypted: {seen:?}"
    );

    // Unknown issuer: the default (Mozilla) roots do not hold the server's
    // certificate, so no connection is made, and the message says why.
    let err = PostgresStore::connect_with(&tls_url(&db, "localhost", "require"), 1, None)
        .expect_err("an unverifiable certificate is refused, even with require");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "the refusal names the certificate: {err}"
    );
    // The certificate does not name 127.0.0.1: refused, not just encrypted.
    let err = PostgresStore::connect_with(&format!("{}?sslmode=verify-full", db.url), 1, Some(&ca))
        .expect_err("a certificate for another name is refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "the refusal names the certificate: {err}"
    );
}

#[test]
fn without_sslmode_connections_are_plain() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let url = format!("{}?application_name=aragora-plain", db.url);
    let _store = PostgresStore::connect(&url, 1).expect("connect");
    let seen = connections_encrypted(&db, "aragora-plain");
    assert_eq!(seen, vec![false], "no sslmode: plain TCP, as before");
}
