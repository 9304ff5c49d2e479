//! LSNs read from disk near `u64::MAX` (issue #13): a checkpoint or a frame whose
//! LSN leaves no room for the next one is refused as damage with a named reason,
//! in both recovery modes; nothing adds 1 to it (a panic in debug builds, a wrap
//! to LSN 0 in release builds).

use std::path::Path;

use aedb::fuzzing::{CraftedCheckpoint, craft_checkpoint, craft_segment};
use aedb::{AedbConfig, AedbInstance, OpenError, RecoveryMode};

/// LSNs (and sequence numbers) are at most `i64::MAX`, as FORMAT.md states.
const MAX_LSN: u64 = i64::MAX as u64;

fn config(mode: RecoveryMode) -> AedbConfig {
    AedbConfig::development()
        .with_recovery_mode(mode)
        .with_checkpoint_policy(None, None)
}

/// The payload of a real frame: the `create_project("p")` DDL record.
fn create_project_payload() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = AedbInstance::open(config(RecoveryMode::Strict), dir.path()).expect("open");
    db.create_project("p").expect("project");
    db.close().expect("close");
    let seg = std::fs::read(dir.path().join("wal-0000000000000001.seg")).expect("segment");
    let (at, header) = (128, 48);
    let word = u32::from_le_bytes(seg[at..at + 4].try_into().expect("4 bytes"));
    let len = (word & !(1 << 31)) as usize;
    seg[at + header..at + header + len].to_vec()
}

/// Segment 1 from `first_lsn` with `frames` copies of a valid record, and a
/// checkpoint at `ckpt_lsn` whose chain head is the one the segment starts from.
fn crafted_dir(dir: &Path, ckpt_lsn: u64, first_lsn: u64, frames: usize) {
    let payload = create_project_payload();
    let prev = [0x11; 32];
    let seg = craft_segment(1, first_lsn, prev, &vec![&payload[..]; frames], 64 * 1024);
    std::fs::write(dir.join("wal-0000000000000001.seg"), &seg.bytes).expect("write segment");
    craft_checkpoint(
        dir,
        &CraftedCheckpoint {
            lsn: ckpt_lsn,
            chain_head: prev,
            tables: false,
            manifest: true,
            segment_first_lsn: first_lsn,
            durable_head: None,
        },
    )
    .expect("write checkpoint");
}

fn open(dir: &Path, mode: RecoveryMode) -> Result<AedbInstance, OpenError> {
    // A panic (an overflow in a debug build) fails the test with its message.
    AedbInstance::open(config(mode), dir)
}

fn assert_refused_past_the_end(r: Result<AedbInstance, OpenError>, what: &str) {
    match r {
        Err(OpenError::Corruption { reason, .. }) => assert!(
            reason.contains("past the largest LSN"),
            "{what}: refused for another reason: {reason}"
        ),
        Err(e) => panic!("{what}: expected Corruption, got {e}"),
        Ok(db) => panic!(
            "{what}: opened at seq {}",
            db.snapshot().map(|s| s.seq()).unwrap_or_default()
        ),
    }
}

/// A checkpoint at the very end of the LSN space (`u64::MAX`, or one below it
/// with the log continuing) is refused; before the fix recovery computed
/// `checkpoint LSN + 1` and overflowed.
#[test]
fn checkpoint_at_the_end_of_the_lsn_space_is_refused() {
    for (ckpt, first_lsn) in [
        (u64::MAX, u64::MAX),
        (u64::MAX - 1, u64::MAX),
        (MAX_LSN + 1, MAX_LSN + 2),
    ] {
        for mode in [RecoveryMode::Strict, RecoveryMode::Permissive] {
            let dir = tempfile::tempdir().expect("tempdir");
            crafted_dir(dir.path(), ckpt, first_lsn, 1);
            assert_refused_past_the_end(
                open(dir.path(), mode),
                &format!("checkpoint at {ckpt} ({mode:?})"),
            );
        }
    }
}

/// The log reaches the largest LSN: the frame at `MAX_LSN` replays, the one after
/// it is damage (strict: refused; permissive: dropped and reported), and the
/// instance keeps working at the largest LSN.
#[test]
fn frame_past_the_largest_lsn_is_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    crafted_dir(dir.path(), MAX_LSN - 1, MAX_LSN, 2);
    assert_refused_past_the_end(open(dir.path(), RecoveryMode::Strict), "strict open");
    let db = open(dir.path(), RecoveryMode::Permissive).expect("permissive open");
    assert_eq!(db.snapshot().expect("snapshot").seq(), MAX_LSN);
    let dropped = db.recovery_report().dropped.clone().expect("dropped");
    assert!(
        dropped.reason.contains("past the largest LSN"),
        "{}",
        dropped.reason
    );
    assert_eq!(dropped.first_dropped_lsn, MAX_LSN + 1);
}

/// A checkpoint at the largest LSN is fine; a segment continuing the log after it
/// starts past the end of the LSN space and is damage.
#[test]
fn segment_starting_past_the_largest_lsn_is_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    crafted_dir(dir.path(), MAX_LSN, MAX_LSN + 1, 1);
    assert_refused_past_the_end(open(dir.path(), RecoveryMode::Strict), "strict open");
    let db = open(dir.path(), RecoveryMode::Permissive).expect("permissive open");
    assert_eq!(db.snapshot().expect("snapshot").seq(), MAX_LSN);
    let dropped = db.recovery_report().dropped.clone().expect("dropped");
    assert!(
        dropped.reason.contains("past the largest LSN"),
        "{}",
        dropped.reason
    );
}

/// The frame scanner alone (as the `wal_frames` fuzz target runs it, on a header
/// it decoded): a frame at `u64::MAX` is damage, not an overflow of the next LSN.
#[test]
fn frame_scanner_refuses_a_frame_at_u64_max() {
    let payload = create_project_payload();
    let seg = craft_segment(1, u64::MAX, [0; 32], &[&payload[..]], 0);
    assert_eq!(seg.frames.len(), 1);
    let mut input = vec![0u8];
    input.extend_from_slice(&seg.bytes);
    aedb::fuzzing::wal_frames(&input);
}
