//! The engine with its data in table files: flushes write what changed, rewrites
//! drop tombstones and old files, open verifies what the manifest lists, and a
//! version 1 directory (the data in its checkpoint) migrates.

use std::path::Path;

use crate::checkpoint;
use crate::config::AedbConfig;
use crate::instance::{AedbInstance, Dev};
use crate::lsm::COMPACT_AT_TABLES;
use crate::manifest::{self, ManifestBody};
use crate::model::value::{Column, ColumnType, TableSchema, Value};
use crate::storage::OsStorage;
use std::ops::Bound;

fn manifest_of(dir: &Path) -> ManifestBody {
    manifest::read(&OsStorage, dir, None)
        .expect("manifest reads")
        .expect("a manifest exists")
}

fn table_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| crate::table::parse_file_name(n).is_some())
        .collect();
    names.sort();
    names
}

fn open(dir: &Path) -> AedbInstance<Dev> {
    // No automatic checkpoints: each test decides when a flush happens.
    let config = AedbConfig::development().with_checkpoint_policy(None, None);
    AedbInstance::open(config, dir).expect("open")
}

fn get(db: &AedbInstance<Dev>, key: &[u8]) -> Option<Vec<u8>> {
    let snap = db.snapshot().expect("snapshot");
    let v = snap.kv("p", "s").expect("kv").get(key).expect("get");
    v.map(|v| v.to_vec())
}

fn setup(dir: &Path) -> AedbInstance<Dev> {
    let db = open(dir);
    db.create_project("p").expect("project");
    db.create_scope("p", "s").expect("scope");
    db
}

#[test]
fn a_flush_writes_only_what_changed_and_reopen_reads_it_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    for i in 0..200u32 {
        db.kv_set("p", "s", format!("k{i:04}").as_bytes(), &i.to_le_bytes())
            .expect("set");
    }
    db.checkpoint().expect("first checkpoint");
    let m = manifest_of(dir.path());
    assert_eq!(m.format_version, manifest::FORMAT_VERSION);
    assert_eq!(m.tables.len(), 1, "no base yet: one rewrite");
    assert_eq!((m.tables[0].level, m.tables[0].entries), (1, 200));

    db.kv_set("p", "s", b"k0001", b"new").expect("update");
    db.kv_set("p", "s", b"new-key", b"v").expect("insert");
    db.kv_del("p", "s", b"k0002").expect("delete");
    db.checkpoint().expect("second checkpoint");
    let m = manifest_of(dir.path());
    assert_eq!(m.tables.len(), 2);
    let metrics = db.operational_metrics();
    assert_eq!(metrics.table_files, 2);
    assert_eq!(
        metrics.table_bytes,
        m.tables.iter().map(|t| t.bytes).sum::<u64>()
    );
    let delta = &m.tables[1];
    assert_eq!(
        (delta.level, delta.entries),
        (0, 3),
        "the flush holds the update, the insert and the tombstone only"
    );
    // A checkpoint with nothing changed writes no table.
    db.checkpoint().expect("third checkpoint");
    assert_eq!(manifest_of(dir.path()).tables.len(), 2);
    db.close().expect("close");

    let db = open(dir.path());
    assert_eq!(get(&db, b"k0001").as_deref(), Some(&b"new"[..]));
    assert_eq!(get(&db, b"new-key").as_deref(), Some(&b"v"[..]));
    assert_eq!(
        get(&db, b"k0002"),
        None,
        "the tombstone hides the older put"
    );
    assert_eq!(
        get(&db, b"k0199").as_deref(),
        Some(&199u32.to_le_bytes()[..])
    );
    assert_eq!(
        db.snapshot().expect("snap").kv("p", "s").expect("kv").len(),
        200
    );
    db.close().expect("close");
    let report = crate::check::inspect(dir.path(), &AedbConfig::development()).expect("inspect");
    assert!(report.ok(), "{:?}", report.checks);
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name == "table files" && c.ok),
        "{:?}",
        report.checks
    );
}

#[test]
fn level_zero_tables_are_rewritten_into_one_level_without_tombstones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    db.kv_set("p", "s", b"keep", b"1").expect("set");
    db.kv_set("p", "s", b"gone", b"1").expect("set");
    db.checkpoint().expect("base");
    let first_files = table_files(dir.path());
    db.kv_del("p", "s", b"gone").expect("delete");
    db.checkpoint().expect("the tombstone's flush");
    for i in 1..COMPACT_AT_TABLES {
        db.kv_set("p", "s", format!("x{i}").as_bytes(), b"v")
            .expect("set");
        db.checkpoint().expect("flush");
    }
    let m = manifest_of(dir.path());
    assert_eq!(m.tables.len(), 1 + COMPACT_AT_TABLES);
    db.kv_set("p", "s", b"last", b"v").expect("set");
    db.checkpoint().expect("rewrite");
    let m = manifest_of(dir.path());
    assert_eq!(m.tables.len(), 1, "{:?}", m.tables);
    assert_eq!(m.tables[0].level, 1);
    // keep, x1..x7, last: no tombstone survives the rewrite.
    assert_eq!(m.tables[0].entries, 1 + (COMPACT_AT_TABLES as u64 - 1) + 1);
    assert!(
        !first_files.contains(&m.tables[0].file),
        "ids are not reused"
    );
    db.close().expect("close");
    // Kept states (snapshot history) read the replaced tables until they drop.
    assert_eq!(
        table_files(dir.path()),
        vec![m.tables[0].file.clone()],
        "replaced tables removed once nothing reads them"
    );
    let db = open(dir.path());
    assert_eq!(get(&db, b"gone"), None);
    assert_eq!(get(&db, b"keep").as_deref(), Some(&b"1"[..]));
    db.close().expect("close");
}

#[test]
fn rows_of_a_dropped_table_stay_gone_when_it_is_created_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    let schema = || {
        TableSchema::new(
            vec![
                Column::new("id", ColumnType::Int),
                Column::new("v", ColumnType::Text),
            ],
            vec!["id".into()],
        )
    };
    let put = |db: &AedbInstance<Dev>, id: i64, v: &str| {
        let mut tx = db.begin_write("p").expect("tx");
        tx.put_row("s", "t", vec![Value::Int(id), Value::Text(v.into())])
            .expect("put");
        db.commit(tx).expect("commit");
    };
    db.create_table("p", "s", "t", schema()).expect("table");
    put(&db, 1, "old");
    put(&db, 2, "old");
    db.checkpoint().expect("checkpoint");
    db.drop_table("p", "s", "t").expect("drop");
    db.create_table("p", "s", "t", schema()).expect("again");
    put(&db, 2, "new");
    db.checkpoint().expect("checkpoint");
    db.close().expect("close");
    let db = open(dir.path());
    let snap = db.snapshot().expect("snap");
    let t = snap.table("p", "s", "t").expect("table");
    assert_eq!(t.len(), 1);
    assert!(t.get(&[Value::Int(1)]).expect("get").is_none());
    let row = t.get(&[Value::Int(2)]).expect("get").expect("row 2");
    assert_eq!(row[1], Value::Text("new".into()));
    drop(snap);
    db.close().expect("close");
}

#[test]
fn open_refuses_a_missing_or_altered_table_and_removes_unlisted_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    db.kv_set("p", "s", b"k", b"v").expect("set");
    db.checkpoint().expect("checkpoint");
    db.close().expect("close");
    let m = manifest_of(dir.path());
    let live = dir.path().join(&m.tables[0].file);
    let bytes = std::fs::read(&live).expect("read table");

    // A table no manifest lists (a flush whose manifest switch never happened).
    let stray = dir
        .path()
        .join(crate::table::file_name(m.next_table_id + 5));
    std::fs::write(&stray, &bytes).expect("write stray");
    open(dir.path()).close().expect("open and close");
    assert!(!stray.exists(), "the unlisted table is removed at open");

    // Without a manifest key nothing shows a deliberate edit: open reads no
    // data, and the damaged block fails its CRC when a read needs it.
    let mut altered = bytes.clone();
    altered[10] ^= 1;
    std::fs::write(&live, &altered).expect("alter");
    let db = open(dir.path());
    let snap = db.snapshot().expect("snapshot");
    match snap.kv("p", "s").expect("kv").get(b"k") {
        Err(crate::ReadError::Corruption { file, .. }) => assert_eq!(file, live),
        other => panic!("expected a corruption error, got {other:?}"),
    }
    drop(snap);
    db.close().expect("close");
    let report = crate::check::inspect(dir.path(), &AedbConfig::development()).expect("inspect");
    assert!(!report.ok(), "check invariants fails on it");
    // A table of another length than the manifest records is refused at open.
    std::fs::write(&live, &bytes[..bytes.len() - 1]).expect("truncate");
    assert!(AedbInstance::<Dev>::open(AedbConfig::development(), dir.path()).is_err());

    std::fs::remove_file(&live).expect("remove");
    let e = AedbInstance::<Dev>::open(AedbConfig::development(), dir.path())
        .expect_err("a missing table is refused");
    assert!(e.to_string().contains(&m.tables[0].file), "{e}");

    std::fs::write(&live, &bytes).expect("restore");
    let db = open(dir.path());
    assert_eq!(get(&db, b"k").as_deref(), Some(&b"v"[..]));
    db.close().expect("close");
}

/// A directory written before tables existed: manifest version 1 and the data in
/// the checkpoint. It opens as it is; its first checkpoint moves the data into
/// tables and writes a version 2 manifest.
#[test]
fn a_version_1_directory_opens_and_its_next_checkpoint_migrates_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    for i in 0..50u32 {
        db.kv_set("p", "s", format!("k{i}").as_bytes(), b"v")
            .expect("set");
    }
    // The state with every entry in memory (a checkpoint evicts them).
    let state = db.snapshot().expect("snap").state;
    db.checkpoint().expect("checkpoint");
    db.close().expect("close");

    // Rewrite it the way version 1 stored it.
    let mut m = manifest_of(dir.path());
    let old = m.checkpoint.clone().expect("checkpoint ref");
    let old_meta = checkpoint::read(&OsStorage, &dir.path().join(&old.file), &[])
        .expect("read checkpoint")
        .1;
    std::fs::remove_file(dir.path().join(&old.file)).expect("remove");
    let name = checkpoint::file_name(state.seq, None, 0);
    let meta = checkpoint::write(
        &OsStorage,
        dir.path(),
        &name,
        &state,
        &[],
        old_meta.chain_head,
        None,
        &mut |_| {},
    )
    .expect("write a checkpoint with the data");
    for t in &m.tables {
        std::fs::remove_file(dir.path().join(&t.file)).expect("remove table");
    }
    m.format_version = 1;
    m.tables.clear();
    m.next_table_id = 0;
    m.checkpoint = Some(manifest::CheckpointRef {
        file: meta.file.clone(),
        lsn: meta.lsn,
        chain_head: hex::encode(meta.chain_head),
        digest: hex::encode(meta.digest),
        bytes: meta.bytes,
    });
    manifest::write(&OsStorage, dir.path(), &m, None).expect("manifest v1");

    let db = open(dir.path());
    assert_eq!(get(&db, b"k7").as_deref(), Some(&b"v"[..]));
    db.kv_set("p", "s", b"after", b"v").expect("set");
    db.checkpoint().expect("migrating checkpoint");
    let m = manifest_of(dir.path());
    assert_eq!(m.format_version, 2);
    assert_eq!(m.tables.len(), 1);
    assert_eq!(m.tables[0].entries, 51, "every key moved into the table");
    db.close().expect("close");
    let db = open(dir.path());
    assert_eq!(
        db.snapshot().expect("snap").kv("p", "s").expect("kv").len(),
        51
    );
    db.close().expect("close");
}

#[test]
fn encrypted_tables_follow_a_checkpoint_key_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old_key = [7u8; 32];
    let new_key = [9u8; 32];
    let config = |c: AedbConfig| c.with_checkpoint_policy(None, None);
    let db = AedbInstance::open(
        config(AedbConfig::development().with_checkpoint_key(old_key)),
        dir.path(),
    )
    .expect("open");
    db.create_project("p").expect("project");
    db.create_scope("p", "s").expect("scope");
    db.kv_set("p", "s", b"k", b"secret-value").expect("set");
    db.checkpoint().expect("checkpoint");
    db.close().expect("close");
    let m = manifest_of(dir.path());
    let raw = std::fs::read(dir.path().join(&m.tables[0].file)).expect("read");
    assert!(
        !raw.windows(12).any(|w| w == b"secret-value"),
        "values are encrypted at rest"
    );

    let rotated = config(
        AedbConfig::development()
            .with_checkpoint_key(new_key)
            .with_previous_checkpoint_key(old_key),
    );
    let db = AedbInstance::open(rotated, dir.path()).expect("open with both keys");
    db.kv_set("p", "s", b"k2", b"v").expect("set");
    db.checkpoint().expect("checkpoint under the new key");
    db.close().expect("close");
    let m2 = manifest_of(dir.path());
    // The open re-signed the directory: a rewrite under the new key.
    let new_id = hex::encode(crate::crypto::key_id(&crate::config::SecretKey::new(
        new_key,
    )));
    assert!(
        m2.tables
            .iter()
            .all(|t| t.key_id.as_deref() == Some(new_id.as_str())),
        "{:?}",
        m2.tables
    );
    assert!(
        !dir.path().join(&m.tables[0].file).exists(),
        "the old table is gone"
    );
    let only_new = config(AedbConfig::development().with_checkpoint_key(new_key));
    let db = AedbInstance::open(only_new, dir.path()).expect("opens with the new key alone");
    assert_eq!(get(&db, b"k").as_deref(), Some(&b"secret-value"[..]));
    db.close().expect("close");
}

/// Permissive recovery without a usable manifest keeps the data in the tables
/// (the newest checkpoint holds only the catalog): every table file that
/// verifies is merged, then the WAL after the checkpoint replays.
#[test]
fn permissive_recovery_without_a_manifest_uses_the_tables_present() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    for i in 0..30u32 {
        db.kv_set("p", "s", format!("k{i}").as_bytes(), b"v")
            .expect("set");
    }
    db.checkpoint().expect("checkpoint");
    db.kv_del("p", "s", b"k3").expect("delete");
    db.checkpoint().expect("flush");
    db.kv_set("p", "s", b"after", b"v")
        .expect("set after the checkpoint");
    db.close().expect("close");
    std::fs::write(dir.path().join("MANIFEST"), b"garbage\n").expect("damage the manifest");
    assert!(
        AedbInstance::<Dev>::open(AedbConfig::development(), dir.path()).is_err(),
        "strict refuses"
    );
    let permissive = AedbConfig::development()
        .with_checkpoint_policy(None, None)
        .with_recovery_mode(crate::config::RecoveryMode::Permissive);
    let db = AedbInstance::open(permissive, dir.path()).expect("permissive open");
    assert_eq!(get(&db, b"k7").as_deref(), Some(&b"v"[..]));
    assert_eq!(
        get(&db, b"k3"),
        None,
        "the flushed tombstone still hides k3"
    );
    assert_eq!(get(&db, b"after").as_deref(), Some(&b"v"[..]));
    assert_eq!(
        db.snapshot().expect("snap").kv("p", "s").expect("kv").len(),
        30
    );
    db.close().expect("close");
    let db = open(dir.path());
    assert_eq!(
        db.snapshot().expect("snap").kv("p", "s").expect("kv").len(),
        30
    );
    db.close().expect("close");
}

/// The memtable entries (tombstones aside) of every keyspace of `db`'s latest
/// state written at or before `seq`.
fn memtable_entries_at_or_before(db: &AedbInstance<Dev>, seq: u64) -> usize {
    let state = db.snapshot().expect("snapshot").state;
    state
        .projects
        .values()
        .flat_map(|p| p.scopes.values())
        .map(|s| {
            s.kv.values()
                .filter(|e| e.version <= seq && e.value.is_some())
                .count()
                + s.tables
                    .values()
                    .map(|t| {
                        t.rows
                            .values()
                            .filter(|e| e.version <= seq && e.value.is_some())
                            .count()
                    })
                    .sum::<usize>()
        })
        .sum()
}

fn memtable_len(db: &AedbInstance<Dev>) -> usize {
    let state = db.snapshot().expect("snapshot").state;
    state
        .projects
        .values()
        .flat_map(|p| p.scopes.values())
        .map(|s| s.kv.len() + s.tables.values().map(|t| t.rows.len()).sum::<usize>())
        .sum()
}

#[test]
fn after_a_flush_values_are_read_from_the_tables_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    for i in 0..300u32 {
        db.kv_set("p", "s", format!("k{i:04}").as_bytes(), &i.to_le_bytes())
            .expect("set");
    }
    db.kv_del("p", "s", b"k0007").expect("delete");
    let flushed = db.checkpoint().expect("checkpoint").lsn;
    assert_eq!(
        memtable_entries_at_or_before(&db, flushed),
        0,
        "the memtable holds nothing the flush wrote"
    );
    // Written after the flush: in the memtable, over the tables.
    db.kv_set("p", "s", b"k0001", b"new").expect("update");
    db.kv_del("p", "s", b"k0002").expect("delete");
    assert_eq!(
        get(&db, b"k0100").as_deref(),
        Some(&100u32.to_le_bytes()[..])
    );
    assert_eq!(get(&db, b"k0001").as_deref(), Some(&b"new"[..]));
    assert_eq!(get(&db, b"k0002"), None);
    assert_eq!(get(&db, b"k0007"), None);
    let snap = db.snapshot().expect("snap");
    let kv = snap.kv("p", "s").expect("kv");
    assert_eq!(kv.len(), 298);
    let v = kv.version(b"k0100").expect("version");
    assert!(v > 0 && v < flushed, "{v}: the version the table records");
    let all = kv.scan_prefix(b"k", usize::MAX).expect("scan");
    assert_eq!(all.len(), 298);
    assert_eq!(all[0].0.as_slice(), b"k0000");
    assert_eq!(all[1].0.as_slice(), b"k0001");
    assert_eq!(&*all[1].1, b"new");
    assert_eq!(all[2].0.as_slice(), b"k0003");
    let rev = kv
        .scan_range_rev(Bound::Unbounded, Bound::Excluded(b"k0004"), 3)
        .expect("reverse scan");
    let keys: Vec<&[u8]> = rev.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, vec![&b"k0003"[..], b"k0001", b"k0000"]);
    let page = kv
        .scan_range(Bound::Excluded(b"k0005"), Bound::Included(b"k0009"), 10)
        .expect("range");
    let keys: Vec<&[u8]> = page.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, vec![&b"k0006"[..], b"k0008", b"k0009"]);
    drop(snap);

    // A write transaction conflicts on a key only the tables hold.
    let mut tx = db.begin_write("p").expect("tx");
    tx.kv_set("s", b"k0200", b"mine").expect("set");
    db.kv_set("p", "s", b"k0200", b"theirs").expect("set");
    db.checkpoint().expect("flush k0200 away from the memtable");
    assert!(
        db.commit(tx).is_err(),
        "the write after the snapshot conflicts"
    );

    db.checkpoint().expect("checkpoint");
    db.close().expect("close");
    let db = open(dir.path());
    assert_eq!(memtable_len(&db), 0, "open loads no data");
    assert_eq!(
        db.snapshot().expect("snap").kv("p", "s").expect("kv").len(),
        298
    );
    assert_eq!(get(&db, b"k0001").as_deref(), Some(&b"new"[..]));
    assert_eq!(get(&db, b"k0200").as_deref(), Some(&b"theirs"[..]));
    db.close().expect("close");
    let report = crate::check::inspect(dir.path(), &AedbConfig::development()).expect("inspect");
    assert!(report.ok(), "{:?}", report.checks);
}

#[test]
fn a_snapshot_taken_before_a_rewrite_reads_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    for i in 0..50u32 {
        db.kv_set("p", "s", format!("k{i:02}").as_bytes(), b"old")
            .expect("set");
    }
    db.checkpoint().expect("base");
    for i in 0..COMPACT_AT_TABLES {
        db.kv_set("p", "s", format!("k{i:02}").as_bytes(), b"mid")
            .expect("set");
        db.checkpoint().expect("flush");
    }
    let before = db.snapshot().expect("snapshot");
    let old_files = table_files(dir.path());
    db.kv_set("p", "s", b"k00", b"new").expect("set");
    db.kv_del("p", "s", b"k49").expect("delete");
    db.checkpoint().expect("rewrite");
    let m = manifest_of(dir.path());
    assert_eq!(m.tables.len(), 1);
    assert!(old_files.iter().all(|f| *f != m.tables[0].file));
    // The manifest lists none of the tables `before` reads; they are still there.
    let kv = before.kv("p", "s").expect("kv");
    assert_eq!(kv.get(b"k00").expect("get").as_deref(), Some(&b"mid"[..]));
    assert_eq!(kv.get(b"k49").expect("get").as_deref(), Some(&b"old"[..]));
    assert_eq!(kv.scan_prefix(b"k", 100).expect("scan").len(), 50);
    let now = db.snapshot().expect("snapshot");
    let kv = now.kv("p", "s").expect("kv");
    assert_eq!(kv.get(b"k00").expect("get").as_deref(), Some(&b"new"[..]));
    assert_eq!(kv.get(b"k49").expect("get"), None);
    assert_eq!(kv.scan_prefix(b"k", 100).expect("scan").len(), 49);
    drop((before, now));
    db.close().expect("close");
    assert_eq!(table_files(dir.path()), vec![m.tables[0].file.clone()]);
}

/// Rows, queries and the audit chain read through the tables too.
#[test]
fn rows_and_audit_rows_are_read_from_the_tables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    let schema = TableSchema::new(
        vec![
            Column::new("id", ColumnType::Int),
            Column::new("v", ColumnType::Text),
        ],
        vec!["id".into()],
    );
    db.create_table("p", "s", "t", schema).expect("table");
    for id in 0..40i64 {
        let mut tx = db.begin_write("p").expect("tx");
        tx.put_row(
            "s",
            "t",
            vec![Value::Int(id), Value::Text(format!("v{id}"))],
        )
        .expect("put");
        db.commit(tx).expect("commit");
    }
    let flushed = db.checkpoint().expect("checkpoint").lsn;
    assert_eq!(memtable_entries_at_or_before(&db, flushed), 0);
    let mut tx = db.begin_write("p").expect("tx");
    tx.delete_row("s", "t", &[Value::Int(3)]).expect("delete");
    db.commit(tx).expect("commit");
    let snap = db.snapshot().expect("snap");
    let t = snap.table("p", "s", "t").expect("table");
    assert_eq!(t.len(), 39);
    assert_eq!(
        t.get(&[Value::Int(5)]).expect("get").expect("row")[1],
        Value::Text("v5".into())
    );
    let page = t.query(&crate::txn::query::Query::all(5)).expect("query");
    let ids: Vec<&Value> = page.rows.iter().map(|r| &r[0]).collect();
    assert_eq!(
        ids,
        vec![
            &Value::Int(0),
            &Value::Int(1),
            &Value::Int(2),
            &Value::Int(4),
            &Value::Int(5)
        ]
    );
    drop(snap);
    db.verify_audit_chains().expect("audit chains verify");
    db.close().expect("close");
}

/// An encrypted table's data is not read at open (its footer, index and bloom
/// filter are authenticated): a damaged data block shows when a read needs it,
/// as a corruption error naming the file, never as other data.
#[test]
fn a_damaged_block_read_through_a_get_is_a_corruption_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || {
        AedbConfig::development()
            .with_checkpoint_key([5u8; 32])
            .with_checkpoint_policy(None, None)
    };
    let db = AedbInstance::<Dev>::open(config(), dir.path()).expect("open");
    db.create_project("p").expect("project");
    db.create_scope("p", "s").expect("scope");
    db.kv_set("p", "s", b"k", b"v").expect("set");
    db.checkpoint().expect("checkpoint");
    db.close().expect("close");
    let m = manifest_of(dir.path());
    let live = dir.path().join(&m.tables[0].file);
    let mut bytes = std::fs::read(&live).expect("read table");
    // The first data block starts the file.
    bytes[10] ^= 1;
    std::fs::write(&live, &bytes).expect("alter");

    let db = AedbInstance::<Dev>::open(config(), dir.path()).expect("open reads no data block");
    let snap = db.snapshot().expect("snapshot");
    match snap.kv("p", "s").expect("kv").get(b"k") {
        Err(crate::ReadError::Corruption { file, .. }) => assert_eq!(file, live),
        other => panic!("expected a corruption error, got {other:?}"),
    }
    assert!(
        snap.kv("p", "s").expect("kv").scan_prefix(b"", 10).is_err(),
        "a scan fails the same way"
    );
    drop(snap);
    db.close().expect("close");
    let report = crate::check::inspect(dir.path(), &config()).expect("inspect");
    assert!(!report.ok(), "check invariants fails on it");
}

/// With a signed manifest, a plaintext table's whole-file digest is checked at
/// open: its blocks carry only a CRC, which an edit can recompute.
#[test]
fn a_signed_manifest_refuses_an_edited_plaintext_table_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || {
        AedbConfig::development()
            .with_hmac_key([3u8; 32])
            .with_checkpoint_policy(None, None)
    };
    let db = AedbInstance::<Dev>::open(config(), dir.path()).expect("open");
    db.create_project("p").expect("project");
    db.create_scope("p", "s").expect("scope");
    db.kv_set("p", "s", b"k", b"v").expect("set");
    db.checkpoint().expect("checkpoint");
    db.close().expect("close");
    let m = manifest::read(
        &OsStorage,
        dir.path(),
        Some(&crate::config::SecretKey::new([3u8; 32])),
    )
    .expect("manifest reads")
    .expect("a manifest exists");
    let live = dir.path().join(&m.tables[0].file);
    let mut bytes = std::fs::read(&live).expect("read table");
    bytes[10] ^= 1;
    std::fs::write(&live, &bytes).expect("alter");
    let e = AedbInstance::<Dev>::open(config(), dir.path())
        .expect_err("an edited plaintext table is refused");
    assert!(e.to_string().contains("digest"), "{e}");
}

/// Random writes, deletes, flushes and rewrites against a model: every get,
/// forward and reverse scan of the latest state and of snapshots held across
/// flushes equals the model's, before and after a reopen.
#[test]
fn random_writes_and_flushes_read_like_the_model() {
    use std::collections::BTreeMap;
    type Model = BTreeMap<Vec<u8>, Vec<u8>>;
    fn check(snap: &crate::Snapshot, model: &Model, ctx: &str) {
        let kv = snap.kv("p", "s").expect("kv");
        assert_eq!(kv.len(), model.len(), "{ctx}: len");
        let all: Vec<(Vec<u8>, Vec<u8>)> = kv
            .scan_prefix(b"", usize::MAX)
            .expect("scan")
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> =
            model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(all, want, "{ctx}: forward scan");
        let rev: Vec<Vec<u8>> = kv
            .scan_range_rev(Bound::Included(b"b"), Bound::Excluded(b"d"), usize::MAX)
            .expect("reverse scan")
            .into_iter()
            .map(|(k, _)| k.to_vec())
            .collect();
        let want: Vec<Vec<u8>> = model
            .range(b"b".to_vec()..b"d".to_vec())
            .rev()
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(rev, want, "{ctx}: reverse scan");
        for k in ["a", "b1", "c22", "d", "zz"] {
            assert_eq!(
                kv.get(k.as_bytes()).expect("get").map(|v| v.to_vec()),
                model.get(k.as_bytes()).cloned(),
                "{ctx}: get {k}"
            );
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    let mut model = Model::new();
    let mut held: Vec<(crate::Snapshot, Model)> = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for step in 0..400u32 {
        let key = format!("{}{}", ["a", "b", "c", "d"][next(4) as usize], next(30)).into_bytes();
        if next(3) == 0 {
            db.kv_del("p", "s", &key).expect("delete");
            model.remove(&key);
        } else {
            let v = format!("v{step}").into_bytes();
            db.kv_set("p", "s", &key, &v).expect("set");
            model.insert(key, v);
        }
        if next(20) == 0 {
            db.checkpoint().expect("flush");
        }
        if next(40) == 0 {
            held.push((db.snapshot().expect("snapshot"), model.clone()));
            if held.len() > 4 {
                held.remove(0);
            }
        }
        if step % 50 == 0 {
            check(
                &db.snapshot().expect("snapshot"),
                &model,
                &format!("step {step}"),
            );
            for (i, (s, m)) in held.iter().enumerate() {
                check(s, m, &format!("step {step}, held snapshot {i}"));
            }
        }
    }
    check(&db.snapshot().expect("snapshot"), &model, "end");
    drop(held);
    db.checkpoint().expect("flush");
    db.close().expect("close");
    let db = open(dir.path());
    check(&db.snapshot().expect("snapshot"), &model, "reopen");
    db.close().expect("close");
    let report = crate::check::inspect(dir.path(), &AedbConfig::development()).expect("inspect");
    assert!(report.ok(), "{:?}", report.checks);
}

/// A commit applies its writes to a copy of its project taken before a flush may
/// publish its eviction; the copy must not bring the evicted entries back. The
/// invariant after any interleaving: the published memtable holds no value
/// written at or before its tables' `flushed_seq`.
#[test]
fn commits_racing_flushes_leave_nothing_flushed_in_the_memtable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = setup(dir.path());
    /// Stops the flushing thread however the writes end (a failed assertion
    /// included: the scope joins it before the panic propagates).
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop = Stop(&stop);
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                db.checkpoint().expect("flush");
            }
        });
        for b in 0..150u32 {
            let mut tx = db.begin_write("p").expect("tx");
            for i in 0..50u32 {
                tx.kv_set(
                    "s",
                    format!("k{:05}", (b * 50 + i) * 7919 % 7500).as_bytes(),
                    b"v",
                )
                .expect("set");
            }
            db.commit(tx).expect("commit");
            let state = db.snapshot().expect("snapshot").state;
            let flushed = state.tables.flushed_seq;
            let stale = state
                .projects
                .values()
                .flat_map(|p| p.scopes.values())
                .flat_map(|s| s.kv.values())
                .filter(|e| e.version <= flushed && e.value.is_some())
                .count();
            assert_eq!(stale, 0, "batch {b}: flushed entries back in the memtable");
        }
    });
    assert!(
        db.snapshot().expect("snapshot").state.tables.flushed_seq > 0,
        "some flush ran"
    );
    db.close().expect("close");
}
