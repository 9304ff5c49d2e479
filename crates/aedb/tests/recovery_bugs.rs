//! Regression tests for issue #13 ("aedb under faults"), recovery part: one named
//! test per bug, each reproducing the file state a fault leaves behind, plus the
//! rollback checks (a stale copy of the directory, a cleanly truncated active
//! segment) through the recorded durable head and an anchored chain head.

use aedb::OpenError;
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
    let snap = db.snapshot().expect("snapshot");
    let kv = snap.kv("p", "s").expect("kv");
    for i in range {
        let want = if big { big_value(i) } else { value(i) };
        assert_eq!(
            kv.get(&key(i)).expect("read").as_deref(),
            Some(&want[..]),
            "{ctx}: k{i} missing or wrong"
        );
    }
}

fn assert_no_keys(db: &AedbInstance, range: std::ops::Range<u64>, ctx: &str) {
    let snap = db.snapshot().expect("snapshot");
    let kv = snap.kv("p", "s").expect("kv");
    for i in range {
        assert!(
            kv.get(&key(i)).expect("read").is_none(),
            "{ctx}: k{i} should be gone"
        );
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
        Err(OpenError::Corruption {
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
            db.snapshot().expect("snapshot").seq()
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
            .expect("snapshot")
            .kv("p", "s")
            .expect("kv")
            .get(b"after-repair")
            .expect("read")
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
    assert_eq!(db.snapshot().expect("snapshot").seq(), first.lsn);
    assert_keys(&db, 0..20, false, "after the crash");
    // The leftover checkpoint was removed, the live one kept.
    let ckpts: Vec<_> = std::fs::read_dir(&crashed)
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ckpt"))
        .collect();
    assert_eq!(ckpts.len(), 1, "one live checkpoint");
    db.close().expect("close");

    // And the database that did not crash reopens with its second checkpoint, whose
    // file has the second name form; backups copy it under that name and restore it.
    let db = AedbInstance::open(config(RecoveryMode::Strict), &dir).expect("reopen");
    assert_keys(&db, 0..20, false, "after two checkpoints");
    assert!(
        second.file.to_string_lossy().ends_with(".ckpt") && second.file != first.file,
        "{second:?}"
    );
    let backup = tmp.path().join("full");
    db.backup_full(&backup).expect("full backup");
    db.close().expect("close");
    let restored = tmp.path().join("restored");
    aedb::restore_from_backup_chain(&config(RecoveryMode::Strict), &[backup], &restored)
        .expect("restore");
    let db = AedbInstance::open(config(RecoveryMode::Strict), &restored).expect("open restored");
    assert_keys(&db, 0..20, false, "restored");
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
    assert_eq!(db.snapshot().expect("snapshot").seq(), s.ckpt);
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
    assert_eq!(db.snapshot().expect("snapshot").seq(), ckpt);
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
    assert_eq!(db.snapshot().expect("snapshot").seq(), first_lost - 1);
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
    assert_eq!(db.snapshot().expect("snapshot").seq(), first_lost - 1);
    db.close().expect("close");
    assert_usable(&dir, small_segments, "deleted last segments");
}

// ---------------------------------------------------------------------------------
// Bug 8 (continued): the durable head is recorded while the database stays open,
// not only at close, so a crash image is protected too.

/// The durable head LSN the manifest of `dir` records (None when it records none).
fn manifest_durable_lsn(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("MANIFEST")).ok()?;
    let body: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
    body.get("durable_head")?.get("lsn")?.as_u64()
}

#[test]
fn durable_head_is_recorded_while_the_database_stays_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let cfg = || {
        config(RecoveryMode::Strict)
            .with_durable_head_interval(Some(std::time::Duration::from_millis(10)))
    };
    let db = AedbInstance::open(cfg(), &dir).expect("open");
    schema(&db);
    let last = commit_range(&db, 0..30, false);
    // Bounded by the interval, not by machine speed: the deadline only turns a
    // hang into a failure.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while manifest_durable_lsn(&dir).is_none_or(|l| l < last) {
        assert!(
            std::time::Instant::now() < deadline,
            "the manifest never recorded LSN {last} as durable ({:?})",
            manifest_durable_lsn(&dir)
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // A crash now: the files as they are, with the instance still open.
    let crashed = tmp.path().join("crashed");
    copy_dir(&dir, &crashed, &["LOCK"]);
    db.close().expect("close");
    let segment = segments(&crashed).pop().expect("segment");
    let fs = frames(&segment);
    let cut = fs[fs.len() - 2];
    zero(&segment, cut.offset, fs.last().expect("frame").end);
    let (offset, reason) = strict_refusal(cfg(), &crashed, &segment, "crash image truncated");
    assert_eq!(offset, cut.offset as u64, "{reason}");
    assert!(reason.contains("durable"), "{reason}");
}

// ---------------------------------------------------------------------------------
// Bug 10: the recovered tail was counted durable without an fsync; segments kept
// under a rotated-away key for the backup floor blocked key rotation step 4.

#[test]
fn recovered_tail_is_fsynced_at_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    // OsBuffered: frames reach the file without an fsync (the flusher writes them
    // out), which is what a crash image of an unsynced tail looks like.
    let cfg = config(RecoveryMode::Strict)
        .with_durability(aedb::DurabilityMode::OsBuffered)
        .with_durable_head_interval(None);
    let db = AedbInstance::open(cfg.clone(), &dir).expect("open");
    db.create_project("p").expect("project");
    db.create_scope("p", "s").expect("scope");
    let mut last = 0;
    for i in 0..10 {
        let mut tx = db.begin_write("p").expect("tx");
        tx.kv_set("s", &key(i), &value(i)).expect("set");
        last = db
            .commit_with_finality(tx, CommitFinality::Visible)
            .expect("visible commit")
            .commit_seq;
    }
    let segment = segments(&dir).pop().expect("segment");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while frames(&segment).last().is_none_or(|f| f.lsn < last) {
        assert!(
            std::time::Instant::now() < deadline,
            "the flusher never wrote the frames out"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let crashed = tmp.path().join("crashed");
    copy_dir(&dir, &crashed, &["LOCK"]);
    db.close().expect("close");

    let db = AedbInstance::open(config(RecoveryMode::Strict), &crashed).expect("open the image");
    assert_eq!(db.snapshot().expect("snapshot").seq(), last);
    let report = db.recovery_report();
    assert_eq!(
        report.synced_tail.as_deref(),
        Some(crashed.join(segment.file_name().expect("name")).as_path()),
        "the recovered frames must be fsynced before they count as durable: {report:?}"
    );
    assert_eq!(db.durable_head_seq(), last);
    assert_eq!(manifest_durable_lsn(&crashed), Some(last));
    db.close().expect("close");
}

const MK: [u8; 32] = [0x51; 32];
const OLD_CK: [u8; 32] = [0x52; 32];
const NEW_CK: [u8; 32] = [0x53; 32];

/// Key id bytes (80..88) of each segment header in `dir`.
fn segment_key_ids(dir: &Path) -> Vec<Vec<u8>> {
    segments(dir)
        .iter()
        .map(|p| std::fs::read(p).expect("read")[80..88].to_vec())
        .collect()
}

#[test]
fn key_rotation_step_4_opens_with_old_key_segments_kept_for_the_backup_floor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let old = || {
        AedbConfig::production(MK)
            .with_checkpoint_key(OLD_CK)
            .with_checkpoint_policy(None, None)
    };
    let rotating = || {
        old()
            .with_checkpoint_key(NEW_CK)
            .with_previous_checkpoint_key(OLD_CK)
    };
    let new_only = || old().with_checkpoint_key(NEW_CK);

    // Step 1: a full backup; commits after it stay in the log for the next
    // incremental (the backup floor).
    let db = AedbInstance::open(old(), &dir).expect("open");
    schema(&db);
    commit_range(&db, 0..10, false);
    db.backup_full(&tmp.path().join("full-1"))
        .expect("full backup");
    commit_range(&db, 10..20, false);
    db.close().expect("close");
    // Step 2: deploy with the new key and the old one for reading.
    let db = AedbInstance::open(rotating(), &dir).expect("open rotating");
    commit_range(&db, 20..25, false);
    // Step 3: the checkpoint rewrites the state under the new key.
    db.checkpoint().expect("checkpoint");
    db.close().expect("close");
    let ids = segment_key_ids(&dir);
    assert!(
        ids.len() >= 2 && ids[0] != ids[ids.len() - 1],
        "a segment under the old key is kept for the backup floor: {ids:?}"
    );
    // Step 4: a full backup again, then the new key alone.
    let db = AedbInstance::open(rotating(), &dir).expect("open rotating");
    db.backup_full(&tmp.path().join("full-2"))
        .expect("second full backup");
    db.close().expect("close");
    let db = AedbInstance::open(new_only(), &dir).expect("the new key alone opens");
    assert_keys(&db, 0..25, false, "new key alone");
    commit_range(&db, 25..26, false);
    // The next checkpoint drops the old-key segments (the floor has moved past them).
    db.checkpoint().expect("checkpoint");
    db.close().expect("close");
    let ids = segment_key_ids(&dir);
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "old-key segments removed: {ids:?}"
    );
    assert!(
        matches!(
            AedbInstance::open(old(), &dir),
            Err(OpenError::KeyMismatch { .. })
        ),
        "the old key alone no longer opens the database"
    );
    let db = AedbInstance::open(new_only(), &dir).expect("reopen");
    assert_keys(&db, 0..26, false, "after the last checkpoint");
    db.close().expect("close");
}

// ---------------------------------------------------------------------------------
// Rollback: a stale but validly signed copy of the directory, or a truncated log
// with an older manifest, is detected against a head anchored off the machine.

fn signed() -> AedbConfig {
    AedbConfig::production(MK).with_checkpoint_policy(None, None)
}

/// What `aedb check invariants --expect-head` reports (the CLI's exit code and
/// output are tested in the aedb-cli crate): 0 when every invariant holds, 1 when
/// one fails, with every check's detail.
fn check_with_anchor(dir: &Path, anchor: &aedb::ChainHead) -> (i32, String) {
    let report = aedb::inspect(dir, &signed().with_expected_head(*anchor)).expect("inspect");
    let details: Vec<String> = report
        .checks
        .iter()
        .map(|c| {
            format!(
                "{} {}: {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            )
        })
        .collect();
    (
        if report.ok() { 0 } else { 1 },
        format!(
            "{}\nchain head {}:{}",
            details.join("\n"),
            report.last_lsn,
            report.chain_head
        ),
    )
}

#[test]
fn chain_head_round_trips_as_lsn_colon_hash() {
    let h = aedb::ChainHead {
        lsn: 42,
        hash: [0xAB; 32],
    };
    let text = h.to_string();
    assert_eq!(text, format!("42:{}", "ab".repeat(32)));
    assert_eq!(text.parse::<aedb::ChainHead>().expect("parse"), h);
    for bad in ["42", "x:00", "42:zz", "42:abab"] {
        assert!(
            matches!(
                bad.parse::<aedb::ChainHead>(),
                Err(AedbError::InvalidArgument(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn stale_copy_of_the_directory_is_detected_with_expect_head() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let db = AedbInstance::open(signed(), &dir).expect("open");
    schema(&db);
    commit_range(&db, 0..10, false);
    let stale_head = db.chain_head().expect("head");
    db.close().expect("close");
    let stale = tmp.path().join("stale");
    copy_dir(&dir, &stale, &["LOCK"]);

    let db = AedbInstance::open(signed(), &dir).expect("reopen");
    commit_range(&db, 10..20, false);
    let anchor = db.chain_head().expect("head");
    assert_eq!(anchor.lsn, 22);
    db.close().expect("close");

    // The stale copy is validly signed and consistent: alone, it opens.
    let db = AedbInstance::open(signed(), &stale).expect("a stale copy opens without an anchor");
    assert_eq!(db.snapshot().expect("snapshot").seq(), stale_head.lsn);
    db.close().expect("close");
    // Against the anchor it is refused, naming both heads.
    match AedbInstance::open(signed().with_expected_head(anchor), &stale) {
        Err(OpenError::RolledBack {
            dir: d,
            expected,
            found,
            reason,
        }) => {
            assert_eq!(d, stale);
            assert_eq!(*expected, anchor);
            assert_eq!(*found, stale_head, "{reason}");
        }
        Err(e) => panic!("expected RolledBack, got {e}"),
        Ok(_) => panic!("a stale copy opened against a later anchor"),
    }
    // Permissive recovery cannot repair a rollback either.
    assert!(matches!(
        AedbInstance::open(
            signed()
                .with_recovery_mode(RecoveryMode::Permissive)
                .with_expected_head(anchor),
            &stale
        ),
        Err(OpenError::RolledBack { .. })
    ));
    let (code, out) = check_with_anchor(&stale, &anchor);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&anchor.to_string()) && out.contains(&stale_head.to_string()),
        "the report names both heads: {out}"
    );

    // The real directory reaches the anchor, and keeps passing as it moves on.
    let (code, out) = check_with_anchor(&dir, &anchor);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("chain head {anchor}")), "{out}");
    let db = AedbInstance::open(signed().with_expected_head(anchor), &dir).expect("anchored open");
    commit_range(&db, 20..25, false);
    db.close().expect("close");
    let db = AedbInstance::open(signed().with_expected_head(anchor), &dir)
        .expect("a directory ahead of the anchor opens");
    db.close().expect("close");
    let (code, out) = check_with_anchor(&dir, &anchor);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn another_history_of_the_same_length_is_detected_with_expect_head() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let build = |name: &str, v: &[u8]| {
        let dir = tmp.path().join(name);
        let db = AedbInstance::open(signed(), &dir).expect("open");
        schema(&db);
        db.kv_set("p", "s", b"k", v).expect("set");
        let head = db.chain_head().expect("head");
        db.close().expect("close");
        (dir, head)
    };
    let (_, anchor) = build("real", b"real");
    let (forged, forged_head) = build("forged", b"forged");
    assert_eq!(anchor.lsn, forged_head.lsn);
    match AedbInstance::open(signed().with_expected_head(anchor), &forged) {
        Err(OpenError::RolledBack { reason, .. }) => {
            assert!(reason.contains("different history"), "{reason}")
        }
        Err(e) => panic!("expected RolledBack, got {e}"),
        Ok(_) => panic!("another history opened against the anchor"),
    }
    let (code, out) = check_with_anchor(&forged, &anchor);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn truncated_active_segment_with_an_older_manifest_is_detected_with_expect_head() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let db = AedbInstance::open(signed(), &dir).expect("open");
    schema(&db);
    commit_range(&db, 0..10, false);
    db.close().expect("close");
    // The manifest (validly signed) as it was then.
    let old_manifest = std::fs::read(dir.join("MANIFEST")).expect("manifest");
    let segment = segments(&dir).pop().expect("segment");
    let old_end = frames(&segment).last().expect("frames").end;

    let db = AedbInstance::open(signed(), &dir).expect("reopen");
    commit_range(&db, 10..20, false);
    let anchor = db.chain_head().expect("head");
    db.close().expect("close");
    assert_eq!(segments(&dir), vec![segment.clone()], "still one segment");

    // With the current manifest, the truncation is refused by the durable head.
    zero(
        &segment,
        old_end,
        frames(&segment).last().expect("frames").end,
    );
    let (_, reason) = strict_refusal(signed(), &dir, &segment, "truncated active segment");
    assert!(reason.contains("durable"), "{reason}");
    // With the older manifest put back, the directory is consistent and validly
    // signed: only the anchor tells.
    std::fs::write(dir.join("MANIFEST"), &old_manifest).expect("older manifest");
    let (code, out) = check_with_anchor(&dir, &anchor);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expected chain head"), "{out}");
    assert!(matches!(
        AedbInstance::open(signed().with_expected_head(anchor), &dir),
        Err(OpenError::RolledBack { .. })
    ));
    let db = AedbInstance::open(signed(), &dir).expect("without the anchor it opens");
    assert_eq!(db.snapshot().expect("snapshot").seq(), 12);
    db.close().expect("close");
}
