//! Tests of table files against in-memory models: round trips, damage of every kind,
//! crashes while writing, the cache bound, the merge. All deterministic (seeded
//! `Rng`, the simulated disk); the micro-benchmark is `#[ignore]`d and asserts no
//! timing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::SecretKey;
use crate::storage::{FaultKind, FaultPlan, FaultStorage, Rng, Storage};

use super::format::FOOTER_LEN;
use super::*;

const DIR: &str = "/db";

/// Versions of each user key, newest first: (seq, kind, value).
type Model = BTreeMap<Vec<u8>, Vec<(u64, EntryKind, Vec<u8>)>>;

fn key_a() -> SecretKey {
    SecretKey::new([0xA5; 32])
}

fn key_b() -> SecretKey {
    SecretKey::new([0x5B; 32])
}

fn disk() -> FaultStorage {
    let fs = FaultStorage::default();
    fs.create_dir_all(Path::new(DIR))
        .expect("mkdir on the simulated disk");
    fs
}

fn entries_of(model: &Model) -> Vec<Entry> {
    let mut out = Vec::new();
    for (k, versions) in model {
        for (seq, kind, value) in versions {
            out.push(Entry {
                key: k.clone(),
                seq: *seq,
                kind: *kind,
                value: value.clone(),
            });
        }
    }
    out
}

fn write(
    fs: &dyn Storage,
    id: u64,
    key: Option<&SecretKey>,
    options: TableWriterOptions,
    entries: &[Entry],
) -> Result<TableMeta, TableError> {
    let mut w = TableWriter::create(fs, Path::new(DIR), id, key, options)?;
    for e in entries {
        w.add(&e.key, e.seq, e.kind, &e.value)?;
    }
    w.finish()
}

fn path_of(id: u64) -> PathBuf {
    Path::new(DIR).join(file_name(id))
}

fn open(
    fs: &dyn Storage,
    id: u64,
    key: Option<&SecretKey>,
    cache_bytes: u64,
) -> Result<TableReader, TableError> {
    TableReader::open(
        fs,
        &path_of(id),
        id,
        key,
        Arc::new(BlockCache::new(cache_bytes)),
    )
}

fn model_get(model: &Model, key: &[u8], snapshot: u64) -> Lookup {
    let Some(versions) = model.get(key) else {
        return Lookup::Absent;
    };
    match versions.iter().find(|(seq, _, _)| *seq <= snapshot) {
        None => Lookup::Absent,
        Some((seq, EntryKind::Put, value)) => Lookup::Value {
            seq: *seq,
            value: value.clone(),
        },
        Some((seq, EntryKind::Delete, _)) => Lookup::Deleted { seq: *seq },
    }
}

/// The newest version <= snapshot of each key in `start..end`.
fn model_visible(
    model: &Model,
    start: &[u8],
    end: Option<&[u8]>,
    snapshot: u64,
    tombstones: Tombstones,
) -> Vec<Entry> {
    let mut out = Vec::new();
    for (k, versions) in model.range(start.to_vec()..) {
        if end.is_some_and(|e| k.as_slice() >= e) {
            break;
        }
        if let Some((seq, kind, value)) = versions.iter().find(|(s, _, _)| *s <= snapshot) {
            if *kind == EntryKind::Delete && tombstones == Tombstones::Hide {
                continue;
            }
            out.push(Entry {
                key: k.clone(),
                seq: *seq,
                kind: *kind,
                value: value.clone(),
            });
        }
    }
    out
}

fn scan(
    reader: &TableReader,
    start: &[u8],
    end: Option<&[u8]>,
    snapshot: u64,
    t: Tombstones,
) -> Vec<Entry> {
    let source: Source<'_> = Box::new(reader.iter_range(start, end, snapshot));
    MergeIter::new(vec![source], snapshot, t)
        .collect::<Result<Vec<_>, _>>()
        .expect("an intact table scans")
}

/// A random model: `keys` user keys drawn from a small alphabet (so keys share
/// prefixes and collide), each with 1..=max_versions versions, ~25 % tombstones.
fn random_model(
    rng: &mut Rng,
    keys: usize,
    max_versions: u64,
    max_value: u64,
    max_seq: u64,
) -> Model {
    let mut model = Model::new();
    while model.len() < keys {
        let len = 1 + rng.below(12) as usize;
        let k: Vec<u8> = (0..len).map(|_| b"abcd"[rng.below(4) as usize]).collect();
        let n = 1 + rng.below(max_versions);
        let mut seqs: Vec<u64> = (0..n).map(|_| 1 + rng.below(max_seq)).collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        seqs.dedup();
        let versions = seqs
            .into_iter()
            .map(|s| {
                if rng.below(4) == 0 {
                    (s, EntryKind::Delete, Vec::new())
                } else {
                    let v: Vec<u8> = (0..rng.below(max_value + 1))
                        .map(|_| rng.next() as u8)
                        .collect();
                    (s, EntryKind::Put, v)
                }
            })
            .collect();
        model.insert(k, versions);
    }
    model
}

#[test]
fn round_trip_of_100k_entries_with_versions_and_tombstones() {
    let fs = disk();
    let mut rng = Rng::new(18);
    // Keys in order, 1..=5 versions each, seqs shared across keys (one commit writes
    // many keys), a fifth of the versions tombstones.
    let mut model = Model::new();
    let mut total = 0usize;
    let mut i = 0u64;
    while total < 100_000 {
        let key = format!("user/{:08}", i * 7).into_bytes();
        i += 1;
        let mut seqs: Vec<u64> = (0..1 + rng.below(5))
            .map(|_| 1 + rng.below(1_000_000))
            .collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        seqs.dedup();
        let versions: Vec<_> = seqs
            .into_iter()
            .map(|s| {
                if rng.below(5) == 0 {
                    (s, EntryKind::Delete, Vec::new())
                } else {
                    (
                        s,
                        EntryKind::Put,
                        format!("value {s} {}", rng.below(1 << 20)).into_bytes(),
                    )
                }
            })
            .collect();
        total += versions.len();
        model.insert(key, versions);
    }
    let entries = entries_of(&model);
    let key = key_a();
    let meta = write(&fs, 1, Some(&key), TableWriterOptions::default(), &entries).expect("writes");
    assert_eq!(meta.entries, entries.len() as u64);
    assert_eq!(meta.first_key, entries[0].key);
    assert_eq!(meta.last_key, entries[entries.len() - 1].key);
    assert!(meta.data_blocks > 100, "{} blocks", meta.data_blocks);
    assert_eq!(meta.size, fs.peek(&meta.path).expect("file").len() as u64);

    let reader = open(&fs, 1, Some(&key), 8 << 20).expect("opens");
    assert_eq!(reader.entries(), meta.entries);
    let report = reader.verify_full(&meta.digest).expect("verifies");
    assert_eq!(report.entries, meta.entries);
    assert_eq!(reader.seq_range(), (meta.min_seq, meta.max_seq));

    // Every entry back, in order.
    let all: Vec<Entry> = reader.iter_all().collect::<Result<_, _>>().expect("scans");
    assert_eq!(all, entries);

    for snapshot in [0, 1, 250_000, 500_000, 999_999, u64::MAX] {
        // Every key at two snapshots, a sample at the others.
        let step = if snapshot == 500_000 || snapshot == u64::MAX {
            1
        } else {
            13
        };
        for k in model.keys().step_by(step) {
            assert_eq!(
                reader.get(k, snapshot).expect("get"),
                model_get(&model, k, snapshot)
            );
        }
        // Keys that are not there: between stored keys, before and after all.
        for j in (0..i).step_by(97) {
            let absent = format!("user/{:08}", j * 7 + 3).into_bytes();
            assert_eq!(reader.get(&absent, snapshot).expect("get"), Lookup::Absent);
        }
        for (start, end) in [
            (&b""[..], None),
            (b"user/00001000", Some(&b"user/00002000"[..])),
            (b"user/000123", Some(b"user/0002")),
            (b"zzz", None),
            (b"user/00005000", Some(b"user/00005000")),
        ] {
            for t in [Tombstones::Hide, Tombstones::Keep] {
                assert_eq!(
                    scan(&reader, start, end, snapshot, t),
                    model_visible(&model, start, end, snapshot, t),
                    "range {start:?}..{end:?} at {snapshot}"
                );
            }
        }
    }
}

#[test]
fn random_tables_equal_their_model() {
    for seed in 0..24u64 {
        let mut rng = Rng::new(seed);
        let fs = disk();
        let keys = 50 + rng.below(400) as usize;
        let model = random_model(&mut rng, keys, 6, 300, 60);
        let entries = entries_of(&model);
        let options = TableWriterOptions {
            block_bytes: 256 + rng.below(4096) as usize,
            ..TableWriterOptions::default()
        };
        let key = key_a();
        let key = (seed % 2 == 0).then_some(&key);
        let meta = write(&fs, seed + 1, key, options, &entries).expect("writes");
        let reader = open(&fs, seed + 1, key, rng.below(64 << 10)).expect("opens");
        reader.verify_full(&meta.digest).expect("verifies");
        for _ in 0..300 {
            let snapshot = rng.below(70);
            let probe: Vec<u8> = (0..1 + rng.below(12))
                .map(|_| b"abcde"[rng.below(5) as usize])
                .collect();
            assert_eq!(
                reader.get(&probe, snapshot).expect("get"),
                model_get(&model, &probe, snapshot),
                "seed {seed}"
            );
        }
        for _ in 0..40 {
            let snapshot = rng.below(70);
            let a: Vec<u8> = (0..rng.below(4))
                .map(|_| b"abcd"[rng.below(4) as usize])
                .collect();
            let b: Vec<u8> = (0..rng.below(4))
                .map(|_| b"abcd"[rng.below(4) as usize])
                .collect();
            let (start, end) = if a <= b { (a, b) } else { (b, a) };
            let end = (rng.below(4) != 0).then_some(end.as_slice());
            let t = if rng.below(2) == 0 {
                Tombstones::Hide
            } else {
                Tombstones::Keep
            };
            assert_eq!(
                scan(&reader, &start, end, snapshot, t),
                model_visible(&model, &start, end, snapshot, t),
                "seed {seed}"
            );
            // The raw scan is every version at or before the snapshot.
            let raw: Vec<Entry> = reader
                .iter_range(&start, end, snapshot)
                .collect::<Result<_, _>>()
                .expect("scans");
            let want: Vec<Entry> = entries
                .iter()
                .filter(|e| {
                    e.key >= start && end.is_none_or(|x| e.key.as_slice() < x) && e.seq <= snapshot
                })
                .cloned()
                .collect();
            assert_eq!(raw, want, "seed {seed}");
            // The reverse scan: each key's newest version (deletes included), in
            // descending key order.
            let rev: Vec<Entry> = reader
                .iter_range_rev(&start, end, snapshot)
                .collect::<Result<_, _>>()
                .expect("scans backwards");
            let mut newest = model_visible(&model, &start, end, snapshot, Tombstones::Keep);
            newest.reverse();
            assert_eq!(rev, newest, "seed {seed}: reverse");
        }
    }
}

/// A table of ~12 small blocks with fixed-size entries (so its data blocks have
/// equal lengths and can be swapped).
fn small_table(fs: &FaultStorage, id: u64, key: Option<&SecretKey>) -> (TableMeta, Vec<Entry>) {
    let entries: Vec<Entry> = (0..96u32)
        .map(|i| Entry {
            key: format!("k{i:05}").into_bytes(),
            seq: 1000 - u64::from(i),
            kind: if i % 7 == 3 {
                EntryKind::Delete
            } else {
                EntryKind::Put
            },
            value: if i % 7 == 3 {
                Vec::new()
            } else {
                format!("v{i:05}").into_bytes()
            },
        })
        .collect();
    let options = TableWriterOptions {
        block_bytes: 256,
        ..TableWriterOptions::default()
    };
    let meta = write(fs, id, key, options, &entries).expect("writes");
    (meta, entries)
}

/// Opens and reads everything; the first error, if any.
fn read_everything(
    fs: &dyn Storage,
    id: u64,
    key: Option<&SecretKey>,
    entries: &[Entry],
) -> Result<(), TableError> {
    let reader = open(fs, id, key, 1 << 20)?;
    let all: Vec<Entry> = reader.iter_all().collect::<Result<_, _>>()?;
    for e in entries {
        reader.get(&e.key, u64::MAX)?;
    }
    assert_eq!(
        all, entries,
        "a table that reads without error reads back what was written"
    );
    Ok(())
}

#[test]
fn every_single_byte_flip_is_detected_on_open_or_when_its_block_is_read() {
    for key in [Some(key_a()), None] {
        let key = key.as_ref();
        let fs = disk();
        let (meta, entries) = small_table(&fs, 7, key);
        let good = fs.peek(&meta.path).expect("file");
        let reader = open(&fs, 7, key, 0).expect("opens");
        assert!(reader.data_blocks() >= 8, "{} blocks", reader.data_blocks());
        let spans: Vec<(usize, usize)> = (0..reader.data_blocks())
            .map(|n| reader.block_span(n))
            .collect();
        drop(reader);
        for at in 0..good.len() {
            let in_block = spans.iter().position(|(a, b)| (*a..*b).contains(&at));
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut bad = good.clone();
                bad[at] ^= flip;
                fs.poke(&meta.path, &bad).expect("poke");
                let what = format!("byte {at} ^ {flip:#x} (encrypted: {})", key.is_some());
                match in_block {
                    // Open reads no data block: it succeeds, and reading finds the
                    // damaged block, by number.
                    Some(n) => {
                        open(&fs, 7, key, 0).unwrap_or_else(|e| panic!("{what}: {e}"));
                        let err = read_everything(&fs, 7, key, &entries).expect_err(&what);
                        assert_eq!(err.block(), Some(BlockId::Data(n as u64)), "{what}: {err}");
                    }
                    // Index, bloom block or footer: the open refuses.
                    None => {
                        let err = open(&fs, 7, key, 0).expect_err(&what);
                        assert!(
                            matches!(
                                err,
                                TableError::Corrupt { .. } | TableError::KeyMismatch { .. }
                            ),
                            "{what}: {err}"
                        );
                    }
                }
            }
        }
        fs.poke(&meta.path, &good).expect("poke");
        read_everything(&fs, 7, key, &entries).expect("restored file reads");
    }
}

#[test]
fn damage_in_a_data_block_names_that_block_and_spares_the_others() {
    let fs = disk();
    let key = key_a();
    let (meta, entries) = small_table(&fs, 3, Some(&key));
    let good = fs.peek(&meta.path).expect("file");
    // Block boundaries from a clean read: flip the middle byte of each block.
    let reader = open(&fs, 3, Some(&key), 0).expect("opens");
    let blocks = reader.data_blocks();
    let spans: Vec<(usize, usize)> = (0..blocks).map(|n| reader.block_span(n)).collect();
    drop(reader);
    for n in 0..blocks {
        let mut bad = good.clone();
        let at = (spans[n as usize].0 + spans[n as usize].1) / 2;
        bad[at] ^= 0x10;
        fs.poke(&meta.path, &bad).expect("poke");
        let reader = open(&fs, 3, Some(&key), 0).expect("open reads no data block");
        let mut found = None;
        for e in &entries {
            match reader.get(&e.key, u64::MAX) {
                Ok(_) => {}
                Err(err) => {
                    found = Some(err.block());
                    break;
                }
            }
        }
        assert_eq!(found, Some(Some(BlockId::Data(n))), "flip at {at}");
        let err = reader
            .verify_full(&meta.digest)
            .expect_err("digest differs");
        assert!(matches!(err, TableError::DigestMismatch { .. }), "{err}");
        assert_eq!(
            reader.verify_blocks().expect_err("damaged").block(),
            Some(BlockId::Data(n))
        );
    }
}

#[test]
fn swapping_two_blocks_is_detected() {
    for key in [Some(key_a()), None] {
        let key = key.as_ref();
        let fs = disk();
        let (meta, entries) = small_table(&fs, 4, key);
        let good = fs.peek(&meta.path).expect("file");
        let reader = open(&fs, 4, key, 0).expect("opens");
        // Two blocks of the same stored length: a swap keeps the index's layout.
        let spans: Vec<(usize, usize)> = (0..reader.data_blocks())
            .map(|n| reader.block_span(n))
            .collect();
        let (first, second) = (0..spans.len())
            .flat_map(|i| (i + 1..spans.len()).map(move |j| (i, j)))
            .find(|&(i, j)| spans[i].1 - spans[i].0 == spans[j].1 - spans[j].0)
            .expect("two blocks of equal length");
        let (b1, b2) = (spans[first], spans[second]);
        drop(reader);
        let mut bad = good.clone();
        let (one, two) = (good[b1.0..b1.1].to_vec(), good[b2.0..b2.1].to_vec());
        bad[b1.0..b1.1].copy_from_slice(&two);
        bad[b2.0..b2.1].copy_from_slice(&one);
        fs.poke(&meta.path, &bad).expect("poke");
        let reader = open(&fs, 4, key, 0).expect("the index still adds up");
        let err = reader
            .iter_all()
            .find_map(Result::err)
            .expect("swap detected");
        assert_eq!(err.block(), Some(BlockId::Data(first as u64)), "{err}");
        assert!(read_everything(&fs, 4, key, &entries).is_err());
        // Copying a block over another (a duplicate) is caught as well.
        let mut dup = good.clone();
        dup[b2.0..b2.1].copy_from_slice(&one);
        fs.poke(&meta.path, &dup).expect("poke");
        let reader = open(&fs, 4, key, 0).expect("opens");
        assert_eq!(
            reader.verify_blocks().expect_err("dup").block(),
            Some(BlockId::Data(second as u64))
        );
    }
}

#[test]
fn truncated_or_extended_files_are_refused_at_open() {
    let fs = disk();
    let key = key_a();
    let (meta, entries) = small_table(&fs, 5, Some(&key));
    let good = fs.peek(&meta.path).expect("file");
    let n = good.len();
    let mut cuts: Vec<usize> = vec![
        0,
        1,
        FOOTER_LEN - 1,
        FOOTER_LEN,
        n / 2,
        n - FOOTER_LEN,
        n - 1,
    ];
    cuts.extend((0..n).step_by(61));
    for cut in cuts {
        fs.poke(&meta.path, &good[..cut]).expect("poke");
        let err = open(&fs, 5, Some(&key), 0).expect_err(&format!("cut at {cut} of {n}"));
        assert!(matches!(err, TableError::Corrupt { .. }), "{err}");
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0u8; 16]);
    fs.poke(&meta.path, &longer).expect("poke");
    open(&fs, 5, Some(&key), 0).expect_err("extended");
    // A footer appended after garbage (a copy of the last bytes) does not add up.
    let mut shifted = good[..16].to_vec();
    shifted.extend_from_slice(&good);
    fs.poke(&meta.path, &shifted).expect("poke");
    open(&fs, 5, Some(&key), 0).expect_err("shifted");
    fs.poke(&meta.path, &good).expect("poke");
    read_everything(&fs, 5, Some(&key), &entries).expect("intact");
}

#[test]
fn wrong_key_missing_key_and_forged_footers_are_refused() {
    let fs = disk();
    let (a, b) = (key_a(), key_b());
    let (meta, _) = small_table(&fs, 9, Some(&a));
    for k in [Some(&b), None] {
        let err = open(&fs, 9, k, 0).expect_err("wrong key");
        assert!(matches!(err, TableError::KeyMismatch { .. }), "{err}");
        let text = err.to_string();
        assert!(
            !text.contains(&hex::encode([0xA5u8; 32])),
            "no key material in {text}"
        );
    }
    // A plaintext table is refused when a key is configured (no silent downgrade).
    let (_, _) = small_table(&fs, 10, None);
    let err = open(&fs, 10, Some(&a), 0).expect_err("plain under a key");
    assert!(matches!(err, TableError::KeyMismatch { .. }), "{err}");

    // The footer names key b (CRC fixed up): the key check passes, the index does not
    // authenticate.
    let good = fs.peek(&meta.path).expect("file");
    let footer_at = good.len() - FOOTER_LEN;
    let forge = |edit: &dyn Fn(&mut [u8])| {
        let mut bad = good.clone();
        let f = &mut bad[footer_at..];
        edit(f);
        let crc = crc32c::crc32c(&f[..FOOTER_LEN - 4]);
        f[FOOTER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        fs.poke(&meta.path, &bad).expect("poke");
    };
    forge(&|f| f[24..32].copy_from_slice(&crate::crypto::key_id(&b)));
    let err = open(&fs, 9, Some(&b), 0).expect_err("forged key id");
    assert_eq!(err.block(), Some(BlockId::Index), "{err}");
    // An edited entry count or sequence range fails the index's authentication too.
    forge(&|f| f[96..104].copy_from_slice(&1000u64.to_le_bytes()));
    assert_eq!(
        open(&fs, 9, Some(&a), 0).expect_err("count").block(),
        Some(BlockId::Index)
    );
    forge(&|f| f[112..120].copy_from_slice(&999_999u64.to_le_bytes()));
    assert_eq!(
        open(&fs, 9, Some(&a), 0).expect_err("max seq").block(),
        Some(BlockId::Index)
    );
    // Another table's id (a renamed copy).
    fs.poke(&meta.path, &good).expect("poke");
    fs.write(&path_of(11), &good).expect("copy");
    let err = open(&fs, 11, Some(&a), 0).expect_err("renamed");
    assert_eq!(err.block(), Some(BlockId::Footer), "{err}");
}

#[test]
fn writer_refuses_out_of_order_and_invalid_input() {
    let fs = disk();
    let mut w = TableWriter::create(&fs, Path::new(DIR), 12, None, TableWriterOptions::default())
        .expect("create");
    w.add(b"b", 5, EntryKind::Put, b"x").expect("first");
    for (k, s) in [(&b"a"[..], 9u64), (b"b", 5), (b"b", 6), (b"", 1)] {
        let err = w.add(k, s, EntryKind::Put, b"y").expect_err("out of order");
        assert!(
            matches!(err, TableError::OutOfOrder { entry: 1, .. }),
            "{err}"
        );
    }
    assert!(matches!(
        w.add(b"c", 1, EntryKind::Delete, b"v"),
        Err(TableError::Invalid { .. })
    ));
    assert!(matches!(
        w.add(b"c", u64::MAX, EntryKind::Put, b"v"),
        Err(TableError::Invalid { .. })
    ));
    let long = vec![0u8; super::format::MAX_KEY_BYTES + 1];
    assert!(matches!(
        w.add(&long, 1, EntryKind::Put, b"v"),
        Err(TableError::Invalid { .. })
    ));
    // Refused input leaves the writer as it was.
    w.add(b"b", 4, EntryKind::Delete, b"")
        .expect("older version");
    w.add(b"c", 9, EntryKind::Put, b"z").expect("next key");
    let meta = w.finish().expect("finishes");
    assert_eq!(meta.entries, 3);
    assert_eq!((meta.min_seq, meta.max_seq), (4, 9));
    let reader = open(&fs, 12, None, 0).expect("opens");
    assert_eq!(
        reader.get(b"b", 4).expect("get"),
        Lookup::Deleted { seq: 4 }
    );
    assert_eq!(reader.get(b"b", 3).expect("get"), Lookup::Absent);

    // An empty table is refused and leaves no file.
    let w = TableWriter::create(&fs, Path::new(DIR), 13, None, TableWriterOptions::default())
        .expect("create");
    assert!(w.finish().is_err());
    let names: Vec<String> = fs
        .list_dir(Path::new(DIR))
        .expect("ls")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![file_name(12)]);
    // A bounded table refuses one entry more.
    let options = TableWriterOptions {
        max_entries: 2,
        ..TableWriterOptions::default()
    };
    let mut w = TableWriter::create(&fs, Path::new(DIR), 14, None, options).expect("create");
    w.add(b"a", 1, EntryKind::Put, b"").expect("1");
    w.add(b"b", 1, EntryKind::Put, b"").expect("2");
    assert!(matches!(
        w.add(b"c", 1, EntryKind::Put, b""),
        Err(TableError::Invalid { .. })
    ));
}

/// Entries large enough for several 1 MiB write-outs.
fn crash_entries() -> Vec<Entry> {
    (0..700u32)
        .map(|i| Entry {
            key: format!("key-{i:06}").into_bytes(),
            seq: u64::from(i) + 1,
            kind: EntryKind::Put,
            value: vec![(i % 251) as u8; 4000],
        })
        .collect()
}

/// A disk holding a durable, empty `DIR`, whose calls from now on follow `plan`
/// (counted from the first call after the setup).
fn disk_with_plan(plan: FaultPlan) -> FaultStorage {
    let setup = |fs: &FaultStorage| {
        fs.create_dir_all(Path::new(DIR)).expect("mkdir");
        fs.sync_dir(Path::new("/")).expect("sync");
    };
    let probe = FaultStorage::default();
    setup(&probe);
    let shift = probe.calls();
    let fs = FaultStorage::new(FaultPlan {
        fault: plan.fault.map(|(n, k)| (n + shift, k)),
        crash_at: plan.crash_at.map(|n| n + shift),
    });
    setup(&fs);
    fs
}

#[test]
fn a_crash_while_writing_leaves_no_table_or_a_complete_one() {
    let key = key_a();
    let entries = crash_entries();
    let clean = disk_with_plan(FaultPlan::default());
    let before = clean.calls();
    write(
        &clean,
        1,
        Some(&key),
        TableWriterOptions::default(),
        &entries,
    )
    .expect("writes");
    let writer_calls = clean.calls() - before;
    // open, three 1 MiB write-outs, fsync, rename, directory fsync.
    assert!(writer_calls >= 7, "{writer_calls} calls");
    let (mut complete, mut absent) = (0, 0);
    for n in 0..=writer_calls {
        for fault in [
            None,
            Some(FaultKind::Eio),
            Some(FaultKind::ShortWrite),
            Some(FaultKind::SyncFail),
            Some(FaultKind::Enospc),
        ] {
            let plan = match fault {
                // Power lost at the writer's call n.
                None => FaultPlan {
                    fault: None,
                    crash_at: Some(n),
                },
                // A fault at call n, power lost three calls later.
                Some(kind) => FaultPlan {
                    fault: Some((n, kind)),
                    crash_at: Some(n + 3),
                },
            };
            let fs = disk_with_plan(plan);
            let result = write(&fs, 1, Some(&key), TableWriterOptions::default(), &entries);
            for torn in [None, Some(n * 31 + 7)] {
                let after = fs.power_loss(torn);
                let what = format!("call {n}, {fault:?}, torn {torn:?}");
                let exists = after.try_exists(&path_of(1)).expect("stat");
                if result.is_ok() {
                    assert!(
                        exists,
                        "{what}: finish returned Ok, so the table must survive"
                    );
                }
                if !exists {
                    absent += 1;
                    continue;
                }
                complete += 1;
                let reader =
                    open(&after, 1, Some(&key), 0).unwrap_or_else(|e| panic!("{what}: {e}"));
                reader
                    .verify_blocks()
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let all: Vec<Entry> = reader.iter_all().collect::<Result<_, _>>().expect("reads");
                assert_eq!(all, entries, "{what}");
                if let Ok(meta) = &result {
                    reader
                        .verify_full(&meta.digest)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                }
            }
        }
    }
    assert!(
        complete > 0 && absent > 0,
        "{complete} complete, {absent} absent"
    );
}

#[test]
fn the_cache_never_exceeds_its_byte_bound() {
    let fs = disk();
    let mut rng = Rng::new(3);
    let entries: Vec<Entry> = (0..4000u32)
        .map(|i| Entry {
            key: format!("k{i:06}").into_bytes(),
            seq: 1,
            kind: EntryKind::Put,
            value: vec![1; rng.below(900) as usize],
        })
        .collect();
    let options = TableWriterOptions {
        block_bytes: 4096,
        ..TableWriterOptions::default()
    };
    write(&fs, 20, None, options, &entries).expect("writes");
    write(&fs, 21, None, options, &entries).expect("writes");
    for capacity in [0u64, 1000, 5000, 64 << 10, 300 << 10, 4 << 20] {
        let cache = Arc::new(BlockCache::new(capacity));
        let r1 = TableReader::open(&fs, &path_of(20), 20, None, Arc::clone(&cache)).expect("opens");
        let r2 = TableReader::open(&fs, &path_of(21), 21, None, Arc::clone(&cache)).expect("opens");
        let mut lookups = 0u64;
        for _ in 0..3000 {
            let e = &entries[rng.below(entries.len() as u64) as usize];
            let r = if rng.below(2) == 0 { &r1 } else { &r2 };
            assert!(matches!(
                r.get(&e.key, 1).expect("get"),
                Lookup::Value { .. }
            ));
            lookups += 1;
            assert!(
                cache.weight() <= capacity,
                "{} > {capacity}",
                cache.weight()
            );
        }
        assert_eq!(cache.hits() + cache.misses(), lookups);
        if capacity >= 4 << 20 {
            // Both tables fit: after the first pass every lookup is a hit.
            let misses = cache.misses();
            for e in &entries {
                r1.get(&e.key, 1).expect("get");
            }
            let first_pass = cache.misses() - misses;
            let misses = cache.misses();
            for e in &entries {
                r1.get(&e.key, 1).expect("get");
            }
            assert_eq!(
                cache.misses(),
                misses,
                "warm: no misses (first pass had {first_pass})"
            );
        }
        if capacity == 0 {
            assert_eq!(cache.hits(), 0);
        }
    }
}

#[test]
fn merge_of_many_sources_equals_the_model() {
    for seed in 0..16u64 {
        let mut rng = Rng::new(1000 + seed);
        let model = random_model(&mut rng, 300, 8, 20, 200);
        // Each version goes to one of 4 tables or the "memtable" (a Vec source).
        let sources_n = 5usize;
        let mut parts: Vec<Vec<Entry>> = vec![Vec::new(); sources_n];
        for e in entries_of(&model) {
            parts[rng.below(sources_n as u64) as usize].push(e);
        }
        let fs = disk();
        let mut readers = Vec::new();
        for (i, part) in parts.iter().enumerate().skip(1) {
            if part.is_empty() {
                continue;
            }
            let options = TableWriterOptions {
                block_bytes: 512,
                ..TableWriterOptions::default()
            };
            write(&fs, i as u64, None, options, part).expect("writes");
            readers.push(open(&fs, i as u64, None, 1 << 20).expect("opens"));
        }
        for _ in 0..20 {
            let snapshot = rng.below(210);
            let t = if rng.below(2) == 0 {
                Tombstones::Hide
            } else {
                Tombstones::Keep
            };
            let start: Vec<u8> = (0..rng.below(3))
                .map(|_| b"abcd"[rng.below(4) as usize])
                .collect();
            let mut sources: Vec<Source<'_>> = vec![Box::new(
                parts[0]
                    .clone()
                    .into_iter()
                    .filter(|e| e.key >= start)
                    .map(Ok),
            )];
            for r in &readers {
                sources.push(Box::new(r.iter_range(&start, None, snapshot)));
            }
            let merged: Vec<Entry> = MergeIter::new(sources, snapshot, t)
                .collect::<Result<_, _>>()
                .expect("merges");
            assert_eq!(
                merged,
                model_visible(&model, &start, None, snapshot, t),
                "seed {seed}"
            );
        }
    }
    // A source out of order is an error, not a wrong answer.
    let unsorted = vec![
        Entry {
            key: b"b".to_vec(),
            seq: 1,
            kind: EntryKind::Put,
            value: Vec::new(),
        },
        Entry {
            key: b"a".to_vec(),
            seq: 1,
            kind: EntryKind::Put,
            value: Vec::new(),
        },
    ];
    let sources: Vec<Source<'_>> = vec![Box::new(unsorted.into_iter().map(Ok))];
    let out: Vec<_> = MergeIter::new(sources, 10, Tombstones::Hide).collect();
    assert!(
        matches!(
            out.last(),
            Some(Err(TableError::MergeOrder { source_index: 0 }))
        ),
        "{out:?}"
    );
}

#[test]
fn file_names_round_trip() {
    assert_eq!(file_name(42), "table-0000000000000042.tbl");
    assert_eq!(parse_file_name(&file_name(42)), Some(42));
    assert_eq!(parse_file_name("table-42.tbl"), None);
    assert_eq!(parse_file_name("table-0000000000000042.tbl.tmp"), None);
}

/// Micro-benchmark, not a test: `cargo test -p aedb --release --lib
/// table::tests::bench_1m_entries_of_1kib -- --ignored --nocapture`. Writes 1M x
/// 1 KiB entries to a real file (OsStorage), then times random gets with no cache
/// (every get reads and decrypts a block; the OS page cache is warm) and with a
/// cache that holds the whole table. Prints; asserts no timing.
#[test]
#[ignore = "micro-benchmark; run by hand with --release"]
fn bench_1m_entries_of_1kib() {
    use std::time::Instant;
    let n: u64 = std::env::var("AEDB_TABLE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = crate::storage::OsStorage;
    let key = key_a();
    let mut rng = Rng::new(7);
    let mut value = vec![0u8; 1024];
    let options = TableWriterOptions {
        max_entries: n,
        ..TableWriterOptions::default()
    };
    let t = Instant::now();
    let mut w = TableWriter::create(&fs, dir.path(), 1, Some(&key), options).expect("create");
    for i in 0..n {
        for b in value.iter_mut().step_by(8) {
            *b = rng.next() as u8;
        }
        w.add(
            format!("key-{i:012}").as_bytes(),
            i + 1,
            EntryKind::Put,
            &value,
        )
        .expect("add");
    }
    let meta = w.finish().expect("finish");
    let write_s = t.elapsed().as_secs_f64();
    let user_mb = (n * (1024 + 16)) as f64 / 1e6;
    println!(
        "write: {n} entries, {:.1} MB user data, file {:.1} MB, {} blocks, {write_s:.2} s, {:.1} MB/s",
        user_mb,
        meta.size as f64 / 1e6,
        meta.data_blocks,
        user_mb / write_s
    );
    let gets = 200_000u64;
    for (label, cache_bytes) in [
        ("cold (no cache)", 0u64),
        ("warm (cache holds all)", 2u64 << 30),
    ] {
        let cache = Arc::new(BlockCache::new(cache_bytes));
        let t = Instant::now();
        let reader =
            TableReader::open(&fs, &meta.path, 1, Some(&key), Arc::clone(&cache)).expect("open");
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        if cache_bytes > 0 {
            for i in 0..n {
                if i % 16 == 0 {
                    reader
                        .get(format!("key-{i:012}").as_bytes(), u64::MAX)
                        .expect("get");
                }
            }
        }
        let (h0, m0) = (cache.hits(), cache.misses());
        let t = Instant::now();
        for _ in 0..gets {
            let i = rng.below(n);
            let found = reader
                .get(format!("key-{i:012}").as_bytes(), u64::MAX)
                .expect("get");
            assert!(matches!(found, Lookup::Value { .. }));
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "get {label}: open {open_ms:.1} ms (index+bloom resident {:.1} MB), {gets} random gets in {s:.2} s = {:.0} gets/s, hits {} misses {}",
            reader.resident_bytes() as f64 / 1e6,
            gets as f64 / s,
            cache.hits() - h0,
            cache.misses() - m0
        );
    }
    let reader = TableReader::open(&fs, &meta.path, 1, Some(&key), Arc::new(BlockCache::new(0)))
        .expect("open");
    let t = Instant::now();
    let mut misses = 0u64;
    for i in 0..gets {
        if reader
            .get(format!("nokey-{i:012}").as_bytes(), u64::MAX)
            .expect("get")
            == Lookup::Absent
        {
            misses += 1;
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "get absent keys (bloom): {:.0} gets/s, {misses} absent",
        gets as f64 / s
    );
    let t = Instant::now();
    let scanned = reader.iter_all().count();
    let s = t.elapsed().as_secs_f64();
    println!(
        "full scan: {scanned} entries in {s:.2} s = {:.1} MB/s",
        user_mb / s
    );
    let t = Instant::now();
    reader.verify_full(&meta.digest).expect("verify");
    println!("verify_full: {:.2} s", t.elapsed().as_secs_f64());
}

#[test]
fn readers_are_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<TableReader>();
    shareable::<BlockCache>();
    let fs = disk();
    let key = key_a();
    let (meta, entries) = small_table(&fs, 30, Some(&key));
    let reader = open(&fs, 30, Some(&key), 1 << 20).expect("opens");
    std::thread::scope(|s| {
        for t in 0..2 {
            let (reader, entries) = (&reader, &entries);
            s.spawn(move || {
                for e in entries.iter().skip(t).step_by(2) {
                    let want = match e.kind {
                        EntryKind::Put => Lookup::Value {
                            seq: e.seq,
                            value: e.value.clone(),
                        },
                        EntryKind::Delete => Lookup::Deleted { seq: e.seq },
                    };
                    assert_eq!(reader.get(&e.key, u64::MAX).expect("get"), want);
                }
            });
        }
    });
    reader.verify_full(&meta.digest).expect("verifies");
}
