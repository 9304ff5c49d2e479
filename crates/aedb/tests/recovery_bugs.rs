//! Regression tests for issue #13 ("aedb under faults"), recovery part: one named
//! test per bug, each reproducing the file state a fault leaves behind, plus the
//! rollback checks (a stale copy of the directory, a cleanly truncated active
//! segment) through the recorded durable head and an anchored chain head.

use std::path::{Path, PathBuf};

use aedb::{AedbConfig, AedbError, AedbInstance, CommitFinality, Limits, RecoveryMode};

const SEGMENT_HEADER_LEN: usize = 128;
const FRAME_HEADER_LEN: usize = 48;

fn config(mode: RecoveryMode) -> AedbConfig {
    AedbConfig::development()
        .with_recovery_mode(mode)
        // Checkpoints only when a test asks for one.
        .with_checkpoint_policy(None, None)
}

/// Small segments, for tests that need several of them.
fn small_segments(mode: RecoveryMode) -> AedbConfig {
    config(mode)
        .with_segment_bytes(256 * 1024)
        .with_limits(Limits {
            max_txn_bytes: 64 * 1024,
            max_value_bytes: 64 * 1024,
            ..Limits::default()
        })
}

fn key(i: u64) -> Vec<u8> {
    format!("k{i:04}").into_bytes()
}

fn value(i: u64) -> Vec<u8> {
    format!("value-{i}").into_bytes()
}

/// About 8 KiB, so that a few dozen commits fill a 256 KiB segment.
fn big_value(i: u64) -> Vec<u8> {
    format!("big-{i}/")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(8_000)
        .collect()
}

/// Creates project `p` and scope `s` (LSNs 1 and 2).
fn schema(db: &AedbInstance) {
    db.create_project("p").expect("project");
    db.create_scope("p", "s").expect("scope");
}

/// Durable commits of `k{i}` for `range`; returns the LSN of the last one.
fn commit_range(db: &AedbInstance, range: std::ops::Range<u64>, big: bool) -> u64 {
    let mut last = 0;
    for i in range {
        let mut tx = db.begin_write("p").expect("tx");
        let v = if big { big_value(i) } else { value(i) };
        tx.kv_set("s", &key(i), &v).expect("set");
        last = db
            .commit_with_finality(tx, CommitFinality::Durable)
            .expect("durable commit")
            .commit_seq;
    }
    last
}

fn assert_keys(db: &AedbInstance, range: std::ops::Range<u64>, big: bool, ctx: &str) {
    let snap = db.snapshot();
    let kv = snap.kv("p", "s").expect("kv");
    for i in range {
        let want = if big { big_value(i) } else { value(i) };
        assert_eq!(
            kv.get(&key(i)).as_deref(),
            Some(&want[..]),
            "{ctx}: k{i} missing or wrong"
        );
    }
}

fn assert_no_keys(db: &AedbInstance, range: std::ops::Range<u64>, ctx: &str) {
    let snap = db.snapshot();
    let kv = snap.kv("p", "s").expect("kv");
    for i in range {
        assert!(kv.get(&key(i)).is_none(), "{ctx}: k{i} should be gone");
    }
}

/// Copies the regular files of `from` into `to` (created), skipping `skip` names.
fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().expect("type").is_file() && !skip.contains(&name.as_str()) {
            std::fs::copy(e.path(), to.join(&name)).expect("copy");
        }
    }
}

/// Segment files of `dir`, in index order.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("wal-") && n.ends_with(".seg"))
        })
        .collect();
    v.sort();
    v
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    offset: usize,
    end: usize,
    lsn: u64,
}

/// The frames of one segment file, following their lengths.
fn frames(path: &Path) -> Vec<Frame> {
    let buf = std::fs::read(path).expect("read segment");
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    while pos + FRAME_HEADER_LEN <= buf.len()
        && buf[pos..pos + FRAME_HEADER_LEN].iter().any(|&b| b != 0)
    {
        let word = u32::from_le_bytes(buf[pos..pos + 4].try_into().expect("4 bytes"));
        let len = (word & 0x7FFF_FFFF) as usize;
        let lsn = u64::from_le_bytes(buf[pos + 8..pos + 16].try_into().expect("8 bytes"));
        let end = pos + FRAME_HEADER_LEN + len;
        out.push(Frame {
            offset: pos,
            end,
            lsn,
        });
        pos = end;
    }
    out
}

fn write_at(p: &Path, at: usize, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open for damage");
    f.write_all_at(bytes, at as u64).expect("write damage");
}

/// Zeroes `[from, to)` of `p`: what a lost write or a clean truncation at a frame
/// boundary leaves in a preallocated segment.
fn zero(p: &Path, from: usize, to: usize) {
    write_at(p, from, &vec![0u8; to - from]);
}

fn flip(p: &Path, at: usize) {
    let b = std::fs::read(p).expect("read")[at];
    write_at(p, at, &[b ^ 0x5A]);
}

/// Expects a strict refusal (`Corruption`) naming `file`, and returns its offset
/// and reason.
fn strict_refusal(cfg: AedbConfig, dir: &Path, file: &Path, ctx: &str) -> (u64, String) {
    match AedbInstance::open(cfg, dir) {
        Err(AedbError::Corruption {
            file: f,
            offset,
            reason,
        }) => {
            assert_eq!(f, file, "{ctx}: strict names the wrong file ({reason})");
            (offset, reason)
        }
        Err(e) => panic!("{ctx}: expected Corruption, got {e}"),
        Ok(db) => panic!(
            "{ctx}: strict open accepted the directory: {:?}, head {}",
            db.recovery_report(),
            db.snapshot().seq()
        ),
    }
}

/// After a permissive repair: new commits work, and the directory reopens strictly
/// and clean with them.
fn assert_usable(dir: &Path, cfg: impl Fn(RecoveryMode) -> AedbConfig, ctx: &str) {
    let db = AedbInstance::open(cfg(RecoveryMode::Permissive), dir)
        .unwrap_or_else(|e| panic!("{ctx}: second permissive open: {e}"));
    assert!(
        db.recovery_report().dropped.is_none(),
        "{ctx}: a repaired log must reopen clean: {:?}",
        db.recovery_report()
    );
    let mut tx = db.begin_write("p").expect("tx");
    tx.kv_set("s", b"after-repair", b"ok").expect("set");
    db.commit_with_finality(tx, CommitFinality::Durable)
        .unwrap_or_else(|e| panic!("{ctx}: commit after repair: {e}"));
    db.close().expect("close");
    let db = AedbInstance::open(cfg(RecoveryMode::Strict), dir)
        .unwrap_or_else(|e| panic!("{ctx}: strict reopen after repair: {e}"));
    let r = db.recovery_report();
    assert!(
        r.dropped.is_none() && r.torn_tail.is_none(),
        "{ctx}: strict reopen reports {r:?}"
    );
    assert_eq!(
        db.snapshot()
            .kv("p", "s")
            .expect("kv")
            .get(b"after-repair")
            .as_deref(),
        Some(&b"ok"[..]),
        "{ctx}: the commit after the repair"
    );
    db.close().expect("close");
}

// ---------------------------------------------------------------------------------
// Bug 1: a checkpoint at an unchanged LSN replaced the live checkpoint file before
// the manifest named the new one.

#[test]
fn checkpoint_at_unchanged_lsn_survives_a_crash_before_the_manifest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let db = AedbInstance::open(config(RecoveryMode::Strict), &dir).expect("open");
    schema(&db);
    commit_range(&db, 0..20, false);
    let first = db.checkpoint().expect("first checkpoint");
    // The directory as it is between the two checkpoints.
    let crashed = tmp.path().join("crashed");
    copy_dir(&dir, &crashed, &[]);
    // An idle database: no commit between the two checkpoints.
    let second = db.checkpoint().expect("second checkpoint");
    assert_eq!(second.lsn, first.lsn);
    // A crash after the second checkpoint file is in place but before the manifest
    // names it: every file it wrote, with the manifest of before.
    copy_dir(&dir, &crashed, &["MANIFEST", "LOCK"]);
    db.close().expect("close");

    let db = AedbInstance::open(config(RecoveryMode::Strict), &crashed)
        .expect("strict open after a crash between checkpoint and manifest");
    assert_eq!(db.snapshot().seq(), first.lsn);
    assert_keys(&db, 0..20, false, "after the crash");
    // The leftover checkpoint was removed, the live one kept.
    let ckpts: Vec<_> = std::fs::read_dir(&crashed)
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ckpt"))
        .collect();
    assert_eq!(ckpts.len(), 1, "one live checkpoint");
    db.close().expect("close");

    // And the database that did not crash reopens with its second checkpoint.
    let db = AedbInstance::open(config(RecoveryMode::Strict), &dir).expect("reopen");
    assert_keys(&db, 0..20, false, "after two checkpoints");
    db.close().expect("close");
}

// ---------------------------------------------------------------------------------
// Bug 2: a log that ends before the checkpoint's LSN (frames lost: a zeroed or stale
// active segment) opened silently, and the first commit then panicked.

/// A database with a checkpoint at LSN `ckpt` whose active segment is then replaced
/// by a stale copy taken when the log ended at `stale_end` (< `ckpt`). Commits
/// 20..25 follow the checkpoint and are acknowledged durable.
struct StaleAfterCheckpoint {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    segment: PathBuf,
    stale_end: u64,
    ckpt: u64,
}

fn stale_after_checkpoint() -> StaleAfterCheckpoint {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let db = AedbInstance::open(config(RecoveryMode::Strict), &dir).expect("open");
    schema(&db);
    let stale_end = commit_range(&db, 0..10, false);
    let segs = segments(&dir);
    assert_eq!(segs.len(), 1, "one segment");
    let segment = segs[0].clone();
    let stale = std::fs::read(&segment).expect("read segment");
    commit_range(&db, 10..20, false);
    let ckpt = db.checkpoint().expect("checkpoint").lsn;
    commit_range(&db, 20..25, false);
    db.close().expect("close");
    assert_eq!(segments(&dir), vec![segment.clone()], "still one segment");
    std::fs::write(&segment, &stale).expect("put the stale copy back");
    StaleAfterCheckpoint {
        _tmp: tmp,
        dir,
        segment,
        stale_end,
        ckpt,
    }
}

#[test]
fn log_ending_before_the_checkpoint_is_refused_in_strict_mode() {
    let s = stale_after_checkpoint();
    let end = frames(&s.segment).last().expect("frames").end;
    let (offset, reason) = strict_refusal(
        config(RecoveryMode::Strict),
        &s.dir,
        &s.segment,
        "stale active segment",
    );
    assert_eq!(offset, end as u64, "names where the log ends ({reason})");
    assert!(
        reason.contains(&format!("LSN {}", s.stale_end))
            && reason.contains(&format!("LSN {}", s.ckpt)),
        "{reason}"
    );
    // Refusing changed nothing: it refuses again.
    strict_refusal(
        config(RecoveryMode::Strict),
        &s.dir,
        &s.segment,
        "second strict open",
    );
}

#[test]
fn log_ending_before_the_checkpoint_is_reported_in_permissive_mode_and_commits_work() {
    let s = stale_after_checkpoint();
    let db = AedbInstance::open(config(RecoveryMode::Permissive), &s.dir)
        .expect("permissive open of a log that ends before its checkpoint");
    let report = db.recovery_report().clone();
    let dropped = report
        .dropped
        .clone()
        .unwrap_or_else(|| panic!("the loss must be reported: {report:?}"));
    // Everything up to the checkpoint is in the checkpoint; what came after it is lost.
    assert_eq!(dropped.first_dropped_lsn, s.ckpt + 1, "{dropped:?}");
    assert_eq!(db.snapshot().seq(), s.ckpt);
    assert_eq!(report.last_lsn, s.ckpt, "{report:?}");
    assert_keys(&db, 0..20, false, "permissive");
    assert_no_keys(&db, 20..25, "permissive");
    // The writer continues after the checkpoint (it used to panic here).
    let r = db
        .kv_set("p", "s", b"next", b"1")
        .expect("commit after repair");
    assert_eq!(r.commit_seq, s.ckpt + 1);
    db.close().expect("close");
    assert_usable(&s.dir, config, "log before checkpoint");
}

// ---------------------------------------------------------------------------------
// Bug 3: permissive recovery of damage at or below the checkpoint LSN cut the log
// below the checkpoint, and every later commit panicked.

#[test]
fn permissive_damage_at_or_below_the_checkpoint_lsn_resumes_commits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let db = AedbInstance::open(config(RecoveryMode::Strict), &dir).expect("open");
    schema(&db);
    commit_range(&db, 0..20, false);
    let ckpt = db.checkpoint().expect("checkpoint").lsn;
    commit_range(&db, 20..25, false);
    db.close().expect("close");
    let segment = segments(&dir).pop().expect("segment");
    // A frame well below the checkpoint LSN (the segment is kept: it is the active one).
    let f = *frames(&segment)
        .iter()
        .find(|f| f.lsn == 8)
        .expect("frame 8");
    assert!(f.lsn <= ckpt);
    flip(&segment, f.offset + FRAME_HEADER_LEN + 2);

    let (offset, _) = strict_refusal(
        config(RecoveryMode::Strict),
        &dir,
        &segment,
        "damage below the checkpoint",
    );
    assert_eq!(offset, f.offset as u64);

    let db = AedbInstance::open(config(RecoveryMode::Permissive), &dir).expect("permissive");
    // The state is the checkpoint's; the commits after it were behind the damage.
    assert_eq!(db.snapshot().seq(), ckpt);
    assert_keys(&db, 0..20, false, "permissive");
    assert_no_keys(&db, 20..25, "permissive");
    // The writer continues after the checkpoint (it used to panic here).
    let r = db
        .kv_set("p", "s", b"next", b"1")
        .expect("commit after repair");
    assert_eq!(r.commit_seq, ckpt + 1);
    let report = db.recovery_report().clone();
    let dropped = report
        .dropped
        .clone()
        .unwrap_or_else(|| panic!("damage must be reported: {report:?}"));
    assert_eq!(dropped.file, segment);
    assert_eq!(dropped.offset, f.offset as u64);
    // The first commit the database lost (LSNs up to the checkpoint are in it).
    assert_eq!(dropped.first_dropped_lsn, ckpt + 1, "{dropped:?}");
    db.close().expect("close");
    assert_usable(&dir, config, "damage below the checkpoint");
}

// ---------------------------------------------------------------------------------
// Bug 8: acknowledged durable frames at the end of the log were indistinguishable
// from a torn, never-acknowledged write.

/// A closed database with commits 0..30 all acknowledged durable; returns the
/// active segment and its frames.
fn closed_db(dir: &Path) -> (PathBuf, Vec<Frame>) {
    let db = AedbInstance::open(config(RecoveryMode::Strict), dir).expect("open");
    schema(&db);
    commit_range(&db, 0..30, false);
    db.close().expect("close");
    let segment = segments(dir).pop().expect("segment");
    let fs = frames(&segment);
    assert_eq!(fs.last().expect("frames").lsn, 32);
    (segment, fs)
}

#[test]
fn damaged_final_frame_that_was_acknowledged_durable_is_refused_in_strict_mode() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let (segment, fs) = closed_db(&dir);
    let last = *fs.last().expect("frame");
    // The second half of the final frame is lost: it looks like a torn write, but
    // the commit was acknowledged durable (and the database closed cleanly).
    let half = last.offset + FRAME_HEADER_LEN + (last.end - last.offset - FRAME_HEADER_LEN) / 2;
    zero(&segment, half, last.end);
    let (offset, reason) = strict_refusal(
        config(RecoveryMode::Strict),
        &dir,
        &segment,
        "damaged final durable frame",
    );
    assert_eq!(offset, last.offset as u64, "{reason}");
    assert!(reason.contains("durable"), "{reason}");

    let db = AedbInstance::open(config(RecoveryMode::Permissive), &dir).expect("permissive");
    let report = db.recovery_report().clone();
    assert!(report.torn_tail.is_none(), "{report:?}");
    let dropped = report
        .dropped
        .clone()
        .unwrap_or_else(|| panic!("an acknowledged frame lost must be reported: {report:?}"));
    assert_eq!(dropped.first_dropped_lsn, last.lsn, "{dropped:?}");
    assert_eq!(dropped.offset, last.offset as u64, "{dropped:?}");
    assert_keys(&db, 0..29, false, "permissive");
    assert_no_keys(&db, 29..30, "permissive");
    db.close().expect("close");
    assert_usable(&dir, config, "damaged final durable frame");
}

#[test]
fn active_segment_truncated_at_a_frame_boundary_is_refused_in_strict_mode() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let (segment, fs) = closed_db(&dir);
    // The last three frames vanish cleanly: what remains is a well-formed log.
    let cut = fs[fs.len() - 3];
    let end = fs.last().expect("frame").end;
    zero(&segment, cut.offset, end);
    let (offset, reason) = strict_refusal(
        config(RecoveryMode::Strict),
        &dir,
        &segment,
        "active segment truncated at a frame boundary",
    );
    assert_eq!(offset, cut.offset as u64, "names where the log now ends");
    assert!(
        reason.contains(&format!("LSN {}", cut.lsn - 1)) && reason.contains("LSN 32"),
        "{reason}"
    );

    let db = AedbInstance::open(config(RecoveryMode::Permissive), &dir).expect("permissive");
    let report = db.recovery_report().clone();
    let dropped = report
        .dropped
        .clone()
        .unwrap_or_else(|| panic!("the truncation must be reported: {report:?}"));
    assert_eq!(dropped.first_dropped_lsn, cut.lsn, "{dropped:?}");
    assert_eq!(dropped.max_dropped_lsn, 32, "{dropped:?}");
    assert_eq!(dropped.frames_dropped, 3, "{dropped:?}");
    assert_keys(&db, 0..27, false, "permissive");
    assert_no_keys(&db, 27..30, "permissive");
    db.close().expect("close");
    assert_usable(&dir, config, "truncated active segment");
}

#[test]
fn unacknowledged_torn_write_after_the_durable_head_is_still_repaired_in_strict_mode() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let (segment, fs) = closed_db(&dir);
    let end = fs.last().expect("frame").end;
    // Half a frame header of LSN 33, which was never acknowledged.
    let partial: Vec<u8> = [0x40u8, 0x1F, 0, 0, 0xDE, 0xAD, 0xBE, 0xEF]
        .into_iter()
        .chain(33u64.to_le_bytes().into_iter().take(4))
        .collect();
    write_at(&segment, end, &partial);
    let db = AedbInstance::open(config(RecoveryMode::Strict), &dir).expect("strict open");
    let torn = db
        .recovery_report()
        .torn_tail
        .clone()
        .expect("torn tail reported");
    assert_eq!(torn.offset, end as u64);
    assert_keys(&db, 0..30, false, "torn tail");
    db.close().expect("close");
}

// ---------------------------------------------------------------------------------
// Bug 9: permissive recovery did not compare the log with the manifest, so deleted
// final segments went unreported.

/// A closed database whose log spans at least three segments.
fn multi_segment_db(dir: &Path) -> Vec<PathBuf> {
    let db = AedbInstance::open(small_segments(RecoveryMode::Strict), dir).expect("open");
    schema(&db);
    commit_range(&db, 0..90, true);
    db.close().expect("close");
    let segs = segments(dir);
    assert!(segs.len() >= 3, "{segs:?}");
    segs
}

#[test]
fn permissive_reports_a_deleted_active_segment() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let segs = multi_segment_db(&dir);
    let active = segs.last().expect("active").clone();
    let first_lost = frames(&active).first().expect("frames").lsn;
    std::fs::remove_file(&active).expect("delete the active segment");

    let (offset, reason) = strict_refusal(
        small_segments(RecoveryMode::Strict),
        &dir,
        &active,
        "deleted active segment",
    );
    assert_eq!(offset, 0);
    assert!(reason.contains("missing"), "{reason}");

    let db =
        AedbInstance::open(small_segments(RecoveryMode::Permissive), &dir).expect("permissive");
    let report = db.recovery_report().clone();
    let dropped = report
        .dropped
        .clone()
        .unwrap_or_else(|| panic!("a deleted segment must be reported: {report:?}"));
    assert_eq!(dropped.file, active, "{dropped:?}");
    assert!(dropped.reason.contains("missing"), "{dropped:?}");
    assert_eq!(dropped.first_dropped_lsn, first_lost, "{dropped:?}");
    assert_eq!(dropped.max_dropped_lsn, 92, "{dropped:?}");
    assert_eq!(db.snapshot().seq(), first_lost - 1);
    db.close().expect("close");
    assert_usable(&dir, small_segments, "deleted active segment");
}

#[test]
fn permissive_reports_deleted_last_segments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let segs = multi_segment_db(&dir);
    let n = segs.len();
    let first_deleted = segs[n - 2].clone();
    let first_lost = frames(&first_deleted).first().expect("frames").lsn;
    std::fs::remove_file(&segs[n - 2]).expect("delete");
    std::fs::remove_file(&segs[n - 1]).expect("delete");

    strict_refusal(
        small_segments(RecoveryMode::Strict),
        &dir,
        &first_deleted,
        "deleted last two segments",
    );
    let db =
        AedbInstance::open(small_segments(RecoveryMode::Permissive), &dir).expect("permissive");
    let report = db.recovery_report().clone();
    let dropped = report
        .dropped
        .clone()
        .unwrap_or_else(|| panic!("deleted segments must be reported: {report:?}"));
    assert_eq!(dropped.file, first_deleted, "{dropped:?}");
    assert_eq!(dropped.first_dropped_lsn, first_lost, "{dropped:?}");
    assert_eq!(db.snapshot().seq(), first_lost - 1);
    db.close().expect("close");
    assert_usable(&dir, small_segments, "deleted last segments");
}
