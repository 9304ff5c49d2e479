//! Inputs that once made a decoder of on-disk bytes panic (found by the fuzzers in
//! `fuzz/`, see the README's "Fuzzing and fault tests"): each must now be refused
//! with a typed error. The raw inputs are also replayed from `fuzz/regressions/`.

use std::path::Path;

use aedb::{AedbConfig, AedbInstance, RecoveryMode};

fn crc32c(b: &[u8]) -> u32 {
    // Castagnoli, bitwise (tests only).
    let mut crc = !0u32;
    for &x in b {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rewrites the header of segment `path`: first LSN `first_lsn`, valid CRC; and
/// zeroes every frame after it.
fn rewrite_first_lsn(path: &Path, first_lsn: u64) {
    let mut b = std::fs::read(path).expect("read segment");
    b[24..32].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32c(&b[0..124]);
    b[124..128].copy_from_slice(&crc.to_le_bytes());
    for x in &mut b[128..] {
        *x = 0;
    }
    std::fs::write(path, b).expect("write segment");
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

/// A segment header claiming LSN 0 (LSNs start at 1) after a checkpoint: the scan
/// used to compute `0 - 1` for its last LSN.
#[test]
fn a_segment_starting_at_lsn_zero_is_refused_not_a_panic() {
    for mode in [RecoveryMode::Strict, RecoveryMode::Permissive] {
        for first_lsn in [0, u64::MAX] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let cfg = AedbConfig::development()
                .with_recovery_mode(mode)
                .with_checkpoint_policy(None, None);
            let db = AedbInstance::open(cfg.clone(), tmp.path()).expect("open");
            db.create_project("p").expect("p");
            db.create_scope("p", "s").expect("s");
            db.kv_set("p", "s", b"k", b"v").expect("set");
            db.checkpoint().expect("checkpoint");
            db.close().expect("close");
            let segs = segments(tmp.path());
            let first = segs.first().expect("a segment");
            rewrite_first_lsn(first, first_lsn);
            for extra in &segs[1..] {
                std::fs::remove_file(extra).expect("rm");
            }
            let r = std::panic::catch_unwind(|| AedbInstance::open(cfg.clone(), tmp.path()));
            match r {
                Err(_) => panic!("{mode:?} open panicked on a segment starting at LSN {first_lsn}"),
                Ok(Ok(db)) => {
                    // Permissive recovery may drop the segment and open.
                    assert_eq!(mode, RecoveryMode::Permissive, "strict open accepted it");
                    db.close().expect("close");
                }
                Ok(Err(_)) => {}
            }
        }
    }
}

fn regression(target: &str, name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target)
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Found by `wal_record`: a logged audit row with fewer values than its table has
/// columns made replay index out of bounds computing its key. Replay now checks
/// the row against the table and refuses the record.
#[test]
fn an_audit_row_that_does_not_fit_its_table_is_refused_at_replay() {
    let payload = regression("wal_record", "audit-row-wrong-arity");
    aedb::fuzzing::wal_record(&payload);
    // The same record in a segment on disk: recovery refuses it (strict), or
    // keeps what precedes it (permissive); it never panics.
    let mut input = vec![0u8];
    input.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    input.extend_from_slice(&payload);
    aedb::fuzzing::wal_open(&input);
}
