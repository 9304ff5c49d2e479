//! Damage to the write-ahead log, one case per test, each on a fresh copy of a
//! database whose log spans at least three segments.
//!
//! Strict recovery must refuse with `Corruption` naming the damaged file and offset
//! (and leave the files as they were); permissive recovery must keep exactly the
//! commits before the damage, report what it dropped, and leave a database that
//! accepts new commits and reopens strictly. A torn final write opens in both modes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aedb::{AedbConfig, AedbInstance, CommitFinality, Limits, OpenError, RecoveryMode};

const SEGMENT_HEADER_LEN: usize = 128;
const FRAME_HEADER_LEN: usize = 48;
const SEGMENT_BYTES: u64 = 256 * 1024;
/// Commits in the base database (LSNs 3..; 1 and 2 are the project and the scope).
const BASE_COMMITS: u64 = 90;

fn config(mode: RecoveryMode) -> AedbConfig {
    AedbConfig::development()
        .with_segment_bytes(SEGMENT_BYTES)
        .with_recovery_mode(mode)
        .with_limits(Limits {
            max_txn_bytes: 64 * 1024,
            max_value_bytes: 64 * 1024,
            ..Limits::default()
        })
}

fn key(i: u64) -> Vec<u8> {
    format!("k{i:04}").into_bytes()
}

/// About 8 KiB, different for every commit.
fn value(i: u64) -> Vec<u8> {
    let len = 7_000 + (i * 211 % 2_000) as usize;
    format!("value-{i}/")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(len)
        .collect()
}

// ---------------------------------------------------------------------------------
// CRC32C (Castagnoli), table-driven: enough to re-seal a frame after editing it.

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

const CRC32C_TABLE: [u32; 256] = crc32c_table();

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[test]
fn local_crc32c_matches_the_standard_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
}

// ---------------------------------------------------------------------------------
// A test-side reading of the log layout.

#[derive(Clone, Debug)]
struct Frame {
    offset: usize,
    len: usize,
    lsn: u64,
}

impl Frame {
    fn end(&self) -> usize {
        self.offset + FRAME_HEADER_LEN + self.len
    }
}

#[derive(Clone, Debug)]
struct Segment {
    index: u64,
    name: String,
    first_lsn: u64,
    frames: Vec<Frame>,
    /// Offset just past the last frame (where the end marker is).
    end: usize,
    file_len: usize,
}

impl Segment {
    fn last_lsn(&self) -> u64 {
        self.frames.last().map_or(self.first_lsn - 1, |f| f.lsn)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn segment_name(index: u64) -> String {
    format!("wal-{index:016}.seg")
}

/// Reads the frame layout of every segment in `dir`, checking each frame's CRC with
/// the local CRC32C (which also proves the local CRC matches the engine's).
fn read_layout(dir: &Path) -> Vec<Segment> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("wal-") && n.ends_with(".seg"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let buf = std::fs::read(dir.join(&name)).expect("read segment");
            assert_eq!(&buf[0..8], b"AEDBWAL\0", "{name}: magic");
            assert_eq!(
                u32_at(&buf, 124),
                crc32c(&buf[0..124]),
                "{name}: header crc"
            );
            let mut frames = Vec::new();
            let mut pos = SEGMENT_HEADER_LEN;
            while pos + FRAME_HEADER_LEN <= buf.len()
                && buf[pos..pos + FRAME_HEADER_LEN].iter().any(|&b| b != 0)
            {
                // Bit 31 of the length word marks the first frame of a write batch.
                let len = (u32_at(&buf, pos) & 0x7FFF_FFFF) as usize;
                let crc = u32_at(&buf, pos + 4);
                let end = pos + FRAME_HEADER_LEN + len;
                assert_eq!(
                    crc,
                    crc32c(&buf[pos + 8..end]),
                    "{name}: frame crc at {pos}"
                );
                frames.push(Frame {
                    offset: pos,
                    len,
                    lsn: u64_at(&buf, pos + 8),
                });
                pos = end;
            }
            let index = u64_at(&buf, 16);
            assert_eq!(
                name,
                segment_name(index),
                "header index matches the file name"
            );
            Segment {
                index,
                first_lsn: u64_at(&buf, 24),
                name,
                frames,
                end: pos,
                file_len: buf.len(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// The base database and its copies.

struct Base {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    segments: Vec<Segment>,
    /// LSN of each commit `i` (key `k{i}`), in order.
    commits: Vec<(u64, u64)>,
    last_lsn: u64,
    /// The manifest as it was before the last commit: it does not record the last
    /// frame as durable (what a crash before the manifest caught up leaves).
    manifest_before_last: Vec<u8>,
}

impl Base {
    fn build() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("base");
        let db = AedbInstance::open(config(RecoveryMode::Strict), &dir).expect("open");
        db.create_project("p").expect("project");
        db.create_scope("p", "s").expect("scope");
        let mut commits = Vec::new();
        let mut manifest_before_last = Vec::new();
        for i in 0..BASE_COMMITS {
            if i + 1 == BASE_COMMITS {
                manifest_before_last = read_file(&dir.join("MANIFEST"));
            }
            let mut tx = db.begin_write("p").expect("tx");
            tx.kv_set("s", &key(i), &value(i)).expect("set");
            let r = db
                .commit_with_finality(tx, CommitFinality::Durable)
                .expect("durable commit");
            commits.push((i, r.commit_seq));
        }
        db.close().expect("close");
        let segments = read_layout(&dir);
        assert!(
            segments.len() >= 3,
            "base log must span at least 3 segments, has {}",
            segments.len()
        );
        for (i, s) in segments.iter().enumerate() {
            assert_eq!(s.index, i as u64 + 1, "segments are numbered from 1");
            assert!(s.frames.len() >= 4, "{}: too few frames to damage", s.name);
        }
        let last_lsn = segments.last().expect("segments").last_lsn();
        assert_eq!(last_lsn, BASE_COMMITS + 2);
        Self {
            _tmp: tmp,
            dir,
            segments,
            commits,
            last_lsn,
            manifest_before_last,
        }
    }

    /// A fresh copy of the base directory.
    fn copy(&self) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("db");
        std::fs::create_dir(&dir).expect("mkdir");
        for e in std::fs::read_dir(&self.dir).expect("read base") {
            let e = e.expect("entry");
            if e.file_type().expect("type").is_file() {
                std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
            }
        }
        (tmp, dir)
    }

    fn seg(&self, n: usize) -> &Segment {
        &self.segments[n]
    }

    fn last_seg(&self) -> &Segment {
        self.segments.last().expect("segments")
    }

    /// Number of frames with an LSN at or above `lsn`.
    fn frames_from(&self, lsn: u64) -> u64 {
        (self.last_lsn + 1).saturating_sub(lsn)
    }
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn write_at(p: &Path, at: usize, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open for damage");
    f.write_all_at(bytes, at as u64).expect("write damage");
}

fn flip(p: &Path, at: usize) {
    let b = read_file(p)[at];
    write_at(p, at, &[b ^ 0x5A]);
}

/// The log files of `dir` (segments, not `dropped/`, the lock or the preallocated
/// next segment, which recovery may clean up) and their bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_type().ok()?.is_file().then(|| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    read_file(&e.path()),
                )
            })
        })
        .filter(|(n, _)| n.ends_with(".seg"))
        .collect()
}

// ---------------------------------------------------------------------------------
// Checks.

/// Keys of the base commits with an LSN below `first_lost`, with their values, and
/// that nothing else is there.
fn assert_base_prefix(db: &AedbInstance, base: &Base, first_lost: u64, ctx: &str) {
    let snap = db.snapshot().expect("snapshot");
    if first_lost <= 2 {
        // The scope (LSN 2) or even the project (LSN 1) was dropped.
        if first_lost == 1 {
            assert!(
                !snap.projects().iter().any(|p| p == "p"),
                "{ctx}: project should be gone"
            );
        } else {
            assert!(
                snap.scopes("p").expect("scopes").is_empty(),
                "{ctx}: scope should be gone"
            );
        }
        return;
    }
    let kv = snap.kv("p", "s").expect("kv");
    let mut kept = 0;
    for &(i, lsn) in &base.commits {
        let got = kv.get_versioned(&key(i)).expect("read");
        if lsn < first_lost {
            let (version, v) = got.unwrap_or_else(|| {
                panic!("{ctx}: k{i} (LSN {lsn}) is before the damage and must be kept")
            });
            assert_eq!(version, lsn, "{ctx}: k{i} version");
            assert_eq!(&*v, &value(i)[..], "{ctx}: k{i} value");
            kept += 1;
        } else {
            assert!(
                got.is_none(),
                "{ctx}: k{i} (LSN {lsn}) is at or after the damage and must be gone"
            );
        }
    }
    assert_eq!(kv.len(), kept, "{ctx}: unexpected extra keys");
    assert_eq!(snap.seq(), first_lost - 1, "{ctx}: head seq");
}

/// Writes enough to rotate into a new segment, closes, reopens strictly and checks
/// both the kept prefix and the new writes.
fn assert_usable_after(dir: &Path, base: &Base, first_lost: u64, ctx: &str) {
    let db = AedbInstance::open(config(RecoveryMode::Permissive), dir)
        .unwrap_or_else(|e| panic!("{ctx}: second permissive open: {e}"));
    assert!(
        db.recovery_report().dropped.is_none() && db.recovery_report().torn_tail.is_none(),
        "{ctx}: a repaired log must reopen clean: {:?}",
        db.recovery_report()
    );
    if !db
        .snapshot()
        .expect("snapshot")
        .projects()
        .iter()
        .any(|p| p == "p")
    {
        db.create_project("p").expect("recreate project");
    }
    if db
        .snapshot()
        .expect("snapshot")
        .scopes("p")
        .expect("scopes")
        .is_empty()
    {
        db.create_scope("p", "s").expect("recreate scope");
    }
    // 40 x ~8 KiB > one 256 KiB segment: the writer continues the repaired segment
    // and then rotates into indices that recovery moved away.
    for i in 0..40u64 {
        let mut tx = db.begin_write("p").expect("tx");
        tx.kv_set("s", format!("new{i:03}").as_bytes(), &value(1000 + i))
            .expect("set");
        db.commit_with_finality(tx, CommitFinality::Durable)
            .unwrap_or_else(|e| panic!("{ctx}: commit after repair: {e}"));
    }
    db.close().expect("close");

    let db = AedbInstance::open(config(RecoveryMode::Strict), dir)
        .unwrap_or_else(|e| panic!("{ctx}: strict reopen after repair and new commits: {e}"));
    let report = db.recovery_report();
    assert!(
        report.dropped.is_none() && report.torn_tail.is_none(),
        "{ctx}: {report:?}"
    );
    let snap = db.snapshot().expect("snapshot");
    let kv = snap.kv("p", "s").expect("kv");
    for i in 0..40u64 {
        assert_eq!(
            kv.get(format!("new{i:03}").as_bytes())
                .expect("read")
                .as_deref(),
            Some(&value(1000 + i)[..]),
            "{ctx}: new{i:03}"
        );
    }
    let kept = base
        .commits
        .iter()
        .filter(|&&(_, lsn)| lsn < first_lost)
        .count();
    for &(i, lsn) in &base.commits {
        assert_eq!(
            kv.get(&key(i)).expect("read").is_some(),
            lsn < first_lost,
            "{ctx}: k{i}"
        );
    }
    assert_eq!(kv.len(), kept + 40, "{ctx}: key count after reopen");
    db.close().expect("close");
}

/// What a damage case must produce.
struct Expect {
    /// File name (in the damaged directory) that both modes must name.
    file: String,
    offset: u64,
    first_dropped_lsn: u64,
    /// Whether `DroppedTail::first_dropped_lsn` is checked (see the ignored
    /// `permissive_reports_lsn_1_when_the_first_header_is_damaged`).
    check_reported_lsn: bool,
    /// A word the corruption reason must contain.
    reason_has: &'static str,
}

/// Strict refuses without touching the files; permissive keeps the prefix, reports
/// the drop, and the result is usable.
fn check_damage(base: &Base, ctx: &str, damage: impl FnOnce(&Path), expect: Expect) {
    let (_tmp, dir) = base.copy();
    damage(&dir);
    let before = files(&dir);

    match AedbInstance::open(config(RecoveryMode::Strict), &dir) {
        Err(OpenError::Corruption {
            file,
            offset,
            reason,
        }) => {
            assert_eq!(
                file,
                dir.join(&expect.file),
                "{ctx}: strict names the wrong file ({reason})"
            );
            assert_eq!(
                offset, expect.offset,
                "{ctx}: strict names the wrong offset ({reason})"
            );
            assert!(
                reason.contains(expect.reason_has),
                "{ctx}: reason {reason:?} should mention {:?}",
                expect.reason_has
            );
        }
        Err(e) => panic!("{ctx}: strict open: expected Corruption, got {e}"),
        Ok(db) => panic!(
            "{ctx}: strict open accepted a damaged log: {:?}",
            db.recovery_report()
        ),
    }
    assert!(
        files(&dir) == before,
        "{ctx}: a refused strict open must not modify the log"
    );
    // Refusing is stable: a second strict open fails the same way.
    assert!(matches!(
        AedbInstance::open(config(RecoveryMode::Strict), &dir),
        Err(OpenError::Corruption { .. })
    ));

    let db = AedbInstance::open(config(RecoveryMode::Permissive), &dir)
        .unwrap_or_else(|e| panic!("{ctx}: permissive open: {e}"));
    let report = db.recovery_report().clone();
    assert!(report.torn_tail.is_none(), "{ctx}: {report:?}");
    let dropped = report
        .dropped
        .as_ref()
        .unwrap_or_else(|| panic!("{ctx}: permissive must report the drop: {report:?}"));
    assert_eq!(dropped.file, dir.join(&expect.file), "{ctx}: dropped.file");
    assert_eq!(dropped.offset, expect.offset, "{ctx}: dropped.offset");
    if expect.check_reported_lsn {
        assert_eq!(
            dropped.first_dropped_lsn, expect.first_dropped_lsn,
            "{ctx}: dropped.first_dropped_lsn"
        );
    }
    assert!(
        dropped.reason.contains(expect.reason_has),
        "{ctx}: {dropped:?}"
    );
    assert_eq!(report.last_lsn, expect.first_dropped_lsn - 1, "{ctx}");
    assert!(
        dropped.frames_dropped <= base.frames_from(expect.first_dropped_lsn),
        "{ctx}: more frames reported dropped than exist: {dropped:?}"
    );
    assert!(
        dropped.max_dropped_lsn <= base.last_lsn,
        "{ctx}: {dropped:?}"
    );
    assert!(!dropped.preserved.is_empty(), "{ctx}: nothing preserved");
    for p in &dropped.preserved {
        assert!(p.is_file(), "{ctx}: preserved copy {} missing", p.display());
        assert!(
            p.starts_with(dir.join("dropped")),
            "{ctx}: preserved outside dropped/: {}",
            p.display()
        );
    }
    assert_base_prefix(&db, base, expect.first_dropped_lsn, ctx);
    db.close().expect("close");
    assert_usable_after(&dir, base, expect.first_dropped_lsn, ctx);
}

// ---------------------------------------------------------------------------------
// Damage in the middle of the log.

#[test]
fn flipped_byte_in_a_frame_of_the_first_segment() {
    let base = Base::build();
    let seg = base.seg(0).clone();
    let f = seg.frames[seg.frames.len() / 2].clone();
    check_damage(
        &base,
        "payload flip in segment 1",
        |dir| {
            flip(
                &dir.join(&seg.name),
                f.offset + FRAME_HEADER_LEN + f.len / 2,
            )
        },
        Expect {
            file: seg.name.clone(),
            offset: f.offset as u64,
            first_dropped_lsn: f.lsn,
            check_reported_lsn: true,
            reason_has: "checksum",
        },
    );
}

#[test]
fn flipped_byte_in_the_header_of_a_middle_segment() {
    let base = Base::build();
    let seg = base.seg(1).clone();
    check_damage(
        &base,
        "header flip in segment 2",
        // Byte 20 is inside the segment-index field.
        |dir| flip(&dir.join(&seg.name), 20),
        Expect {
            file: seg.name.clone(),
            offset: 0,
            first_dropped_lsn: seg.first_lsn,
            check_reported_lsn: true,
            reason_has: "checksum",
        },
    );
}

#[test]
fn flipped_byte_in_the_header_of_the_first_segment() {
    let base = Base::build();
    let seg = base.seg(0).clone();
    check_damage(
        &base,
        "header flip in segment 1",
        // First-LSN field: nothing before it survives, not even the schema.
        |dir| flip(&dir.join(&seg.name), 25),
        Expect {
            file: seg.name.clone(),
            offset: 0,
            first_dropped_lsn: 1,
            check_reported_lsn: false,
            reason_has: "checksum",
        },
    );
}

#[test]
fn first_segment_truncated_in_the_middle_of_a_frame() {
    let base = Base::build();
    let seg = base.seg(0).clone();
    let f = seg.frames[seg.frames.len() / 2].clone();
    check_damage(
        &base,
        "segment 1 truncated",
        |dir| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(&seg.name))
                .expect("open");
            file.set_len((f.offset + FRAME_HEADER_LEN + f.len / 2) as u64)
                .expect("truncate");
        },
        Expect {
            file: seg.name.clone(),
            offset: f.offset as u64,
            first_dropped_lsn: f.lsn,
            check_reported_lsn: true,
            reason_has: "past the end",
        },
    );
}

#[test]
fn middle_segment_deleted() {
    let base = Base::build();
    let seg = base.seg(1).clone();
    check_damage(
        &base,
        "segment 2 deleted",
        |dir| std::fs::remove_file(dir.join(&seg.name)).expect("delete"),
        Expect {
            file: seg.name.clone(),
            offset: 0,
            first_dropped_lsn: seg.first_lsn,
            check_reported_lsn: true,
            reason_has: "missing",
        },
    );
}

#[test]
fn two_segments_swapped_by_renaming() {
    let base = Base::build();
    let (a, b) = (base.seg(1).clone(), base.seg(2).clone());
    check_damage(
        &base,
        "segments 2 and 3 swapped",
        |dir| {
            let tmp = dir.join("swap.tmp-name");
            std::fs::rename(dir.join(&a.name), &tmp).expect("rename a");
            std::fs::rename(dir.join(&b.name), dir.join(&a.name)).expect("rename b");
            std::fs::rename(&tmp, dir.join(&b.name)).expect("rename tmp");
        },
        Expect {
            file: a.name.clone(),
            offset: 0,
            first_dropped_lsn: a.first_lsn,
            check_reported_lsn: true,
            reason_has: "index",
        },
    );
}

#[test]
fn garbage_after_the_end_marker_of_a_non_last_segment() {
    let base = Base::build();
    let seg = base.seg(0).clone();
    assert!(seg.file_len > seg.end);
    check_damage(
        &base,
        "garbage after segment 1's end marker",
        // Appended past the preallocated size: zeros, then garbage.
        |dir| write_at(&dir.join(&seg.name), seg.file_len, &[0xA5; 32]),
        Expect {
            file: seg.name.clone(),
            offset: seg.end as u64,
            first_dropped_lsn: seg.last_lsn() + 1,
            check_reported_lsn: true,
            reason_has: "non-zero",
        },
    );
}

/// Replaces a byte of the frame's chain hash and re-seals its CRC, so that only the
/// hash chain can notice.
fn break_chain_keep_crc(path: &Path, f: &Frame) {
    let mut buf = read_file(path);
    buf[f.offset + 16 + 7] ^= 0x01;
    let crc = crc32c(&buf[f.offset + 8..f.end()]);
    buf[f.offset + 4..f.offset + 8].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, &buf).expect("write");
}

#[test]
fn chain_hash_corrupted_with_a_valid_crc_in_a_middle_frame() {
    let base = Base::build();
    let seg = base.seg(1).clone();
    let f = seg.frames[seg.frames.len() / 2].clone();
    check_damage(
        &base,
        "chain hash of a frame in segment 2",
        |dir| break_chain_keep_crc(&dir.join(&seg.name), &f),
        Expect {
            file: seg.name.clone(),
            offset: f.offset as u64,
            first_dropped_lsn: f.lsn,
            check_reported_lsn: true,
            reason_has: "hash chain",
        },
    );
}

#[test]
fn flipped_byte_in_the_last_segment_followed_by_a_valid_frame_is_not_a_torn_tail() {
    let base = Base::build();
    let seg = base.last_seg().clone();
    let f = seg.frames[seg.frames.len() - 2].clone();
    check_damage(
        &base,
        "payload flip in the next-to-last frame",
        |dir| flip(&dir.join(&seg.name), f.offset + FRAME_HEADER_LEN + 3),
        Expect {
            file: seg.name.clone(),
            offset: f.offset as u64,
            first_dropped_lsn: f.lsn,
            check_reported_lsn: true,
            reason_has: "checksum",
        },
    );
}

// ---------------------------------------------------------------------------------
// Torn final writes: repaired in both modes.

/// Opens in `mode`, expects exactly a torn tail at `file`/`offset` and all commits
/// below `first_lost`, then checks the database is usable and reopens strictly.
fn check_torn(
    base: &Base,
    ctx: &str,
    mode: RecoveryMode,
    damage: impl FnOnce(&Path),
    file: &str,
    offset: usize,
    first_lost: u64,
) {
    let ctx = format!("{ctx} ({mode:?})");
    let (_tmp, dir) = base.copy();
    damage(&dir);
    let db = AedbInstance::open(config(mode), &dir)
        .unwrap_or_else(|e| panic!("{ctx}: a torn tail must open: {e}"));
    let report = db.recovery_report().clone();
    assert!(report.dropped.is_none(), "{ctx}: {report:?}");
    let torn = report
        .torn_tail
        .as_ref()
        .unwrap_or_else(|| panic!("{ctx}: torn tail not reported: {report:?}"));
    assert_eq!(torn.file, dir.join(file), "{ctx}: torn_tail.file");
    assert_eq!(torn.offset, offset as u64, "{ctx}: torn_tail.offset");
    assert_eq!(report.last_lsn, first_lost - 1, "{ctx}");
    assert_base_prefix(&db, base, first_lost, &ctx);
    db.close().expect("close");
    // The repair is on disk: the log now ends cleanly.
    let tail = read_file(&dir.join(file));
    assert!(
        tail[offset..].iter().all(|&b| b == 0),
        "{ctx}: torn bytes left behind"
    );
    assert_usable_after(&dir, base, first_lost, &ctx);
}

/// Zeroes the second half of frame `f` of `seg` in `dir`.
fn cut_in_half(dir: &Path, seg: &Segment, f: &Frame) {
    let half = FRAME_HEADER_LEN + f.len / 2;
    write_at(
        &dir.join(&seg.name),
        f.offset + half,
        &vec![0; f.end() - f.offset - half],
    );
}

#[test]
fn last_frame_cut_in_half_is_a_torn_tail_in_both_modes() {
    let base = Base::build();
    let seg = base.last_seg().clone();
    let f = seg.frames.last().expect("frame").clone();
    for mode in [RecoveryMode::Strict, RecoveryMode::Permissive] {
        check_torn(
            &base,
            "second half of the last frame zeroed",
            mode,
            |dir| {
                // Only a frame after the durable head the manifest records can be
                // a torn write: the manifest is the one from before the last commit
                // (a crash before it recorded that frame as durable).
                std::fs::write(dir.join("MANIFEST"), &base.manifest_before_last)
                    .expect("older manifest");
                cut_in_half(dir, &seg, &f);
            },
            &seg.name,
            f.offset,
            f.lsn,
        );
    }
}

/// Changed for issue #13 (bug 8): this case used to be accepted as a torn tail in
/// both modes, silently dropping a commit acknowledged as durable. The base database
/// was closed cleanly, so its manifest records the last frame as durable: an
/// incomplete frame there is lost data. Strict refuses; permissive drops and reports it.
#[test]
fn last_frame_cut_in_half_after_it_was_recorded_durable_is_not_a_torn_tail() {
    let base = Base::build();
    let seg = base.last_seg().clone();
    let f = seg.frames.last().expect("frame").clone();
    check_damage(
        &base,
        "second half of a durable last frame zeroed",
        |dir| cut_in_half(dir, &seg, &f),
        Expect {
            file: seg.name.clone(),
            offset: f.offset as u64,
            first_dropped_lsn: f.lsn,
            check_reported_lsn: true,
            reason_has: "durable",
        },
    );
}

#[test]
fn partial_frame_header_after_the_last_frame_is_a_torn_tail_in_both_modes() {
    let base = Base::build();
    let seg = base.last_seg().clone();
    // Length, CRC and half an LSN of a frame that never finished.
    let partial: Vec<u8> = [0x40u8, 0x1F, 0, 0, 0xDE, 0xAD, 0xBE, 0xEF]
        .into_iter()
        .chain((base.last_lsn + 1).to_le_bytes().into_iter().take(4))
        .collect();
    for mode in [RecoveryMode::Strict, RecoveryMode::Permissive] {
        check_torn(
            &base,
            "partial header after the last frame",
            mode,
            |dir| write_at(&dir.join(&seg.name), seg.end, &partial),
            &seg.name,
            seg.end,
            base.last_lsn + 1,
        );
    }
}

// ---------------------------------------------------------------------------------
// Engine bugs: kept failing, ignored until fixed.

/// Expects a strict refusal naming `file`/`offset` for damage in the last segment.
fn assert_strict_refuses(dir: &Path, file: &str, offset: usize, ctx: &str) {
    match AedbInstance::open(config(RecoveryMode::Strict), dir) {
        Err(OpenError::Corruption {
            file: f, offset: o, ..
        }) => {
            assert_eq!(f, dir.join(file), "{ctx}");
            assert_eq!(o, offset as u64, "{ctx}");
        }
        Err(e) => panic!("{ctx}: expected Corruption, got {e}"),
        Ok(db) => {
            let r = db.recovery_report().clone();
            let kept = db
                .snapshot()
                .expect("snapshot")
                .kv("p", "s")
                .map(|kv| kv.len())
                .unwrap_or(0);
            panic!(
                "{ctx}: strict open accepted the log and silently cut acknowledged durable \
                 commits (now {kept} of {BASE_COMMITS} keys): {r:?}"
            )
        }
    }
}

#[test]
fn strict_refuses_a_damaged_length_field_followed_by_valid_frames() {
    let base = Base::build();
    let seg = base.last_seg().clone();
    assert!(seg.frames.len() >= 4);
    let f = seg.frames[1].clone();
    let (_tmp, dir) = base.copy();
    // One bit in the length: the CRC fails and the next frame is looked for at the
    // wrong place, so it "is not followed by a valid frame".
    flip(&dir.join(&seg.name), f.offset + 1);
    assert_strict_refuses(
        &dir,
        &seg.name,
        f.offset,
        "length flip in segment N, frame 2",
    );
}

#[test]
fn strict_refuses_a_zeroed_frame_header_followed_by_valid_frames() {
    let base = Base::build();
    let seg = base.last_seg().clone();
    let f = seg.frames[1].clone();
    let (_tmp, dir) = base.copy();
    // A lost sector write: the header reads as the end marker, non-zero bytes follow.
    write_at(&dir.join(&seg.name), f.offset, &[0; FRAME_HEADER_LEN]);
    assert_strict_refuses(
        &dir,
        &seg.name,
        f.offset,
        "zeroed header in segment N, frame 2",
    );
}

#[test]
fn strict_refuses_a_broken_chain_in_the_final_frame() {
    let base = Base::build();
    let seg = base.last_seg().clone();
    let f = seg.frames.last().expect("frame").clone();
    let (_tmp, dir) = base.copy();
    // The CRC is valid, so this frame was written completely: not a torn write.
    break_chain_keep_crc(&dir.join(&seg.name), &f);
    assert_strict_refuses(&dir, &seg.name, f.offset, "chain break in the final frame");
}

#[test]
fn permissive_reports_every_valid_frame_it_drops() {
    let base = Base::build();
    // Damage in the next-to-last frame of the log: the last frame is valid and lost.
    let seg = base.last_seg().clone();
    let f = seg.frames[seg.frames.len() - 2].clone();
    let (_tmp, dir) = base.copy();
    flip(&dir.join(&seg.name), f.offset + FRAME_HEADER_LEN + 3);
    let db = AedbInstance::open(config(RecoveryMode::Permissive), &dir).expect("permissive");
    let dropped = db
        .recovery_report()
        .dropped
        .clone()
        .expect("dropped reported");
    assert_eq!(dropped.first_dropped_lsn, f.lsn);
    // Every frame after the damaged one has a valid checksum (and the damaged one's
    // length is intact, so they can be found).
    assert_eq!(
        dropped.frames_dropped,
        base.frames_from(f.lsn) - 1,
        "{dropped:?}"
    );
    assert_eq!(dropped.max_dropped_lsn, base.last_lsn, "{dropped:?}");
}

#[test]
fn permissive_reports_lsn_1_when_the_first_header_is_damaged() {
    let base = Base::build();
    let seg = base.seg(0).clone();
    let (_tmp, dir) = base.copy();
    flip(&dir.join(&seg.name), 25);
    let db = AedbInstance::open(config(RecoveryMode::Permissive), &dir).expect("permissive");
    let dropped = db
        .recovery_report()
        .dropped
        .clone()
        .expect("dropped reported");
    // Nothing was kept, so the first LSN no longer in the log is the first one.
    assert_eq!(dropped.first_dropped_lsn, 1, "{dropped:?}");
}
