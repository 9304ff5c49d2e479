//! Crash test for the at-rest machinery (checkpoints, manifest swaps, segment
//! rotation, encryption) with real SIGKILL: a child process (this test binary re-executed,
//! see `crash_support`) commits durably and reports each acknowledged commit; the parent
//! kills it after a random number of acknowledged commits plus a small random delay
//! (never on a timer started at spawn: a loaded machine changes what is interrupted,
//! not whether anything was committed), reopens in strict mode, and checks that every acknowledged
//! commit is there, nothing else is, and the invariants hold. Checkpoints (with
//! their manifest swaps) and segment rotations run constantly in the child, so
//! kills land inside them too. Crashes accumulate on one directory, so the hash
//! chain is checked across many reopenings.
//!
//! `AEDB_CRASH_ITERATIONS` (default 100) and `AEDB_CRASH_SEED` tune it.

mod crash_support;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use aedb::{AedbConfig, AedbInstance, CommitFinality, DurabilityMode, Limits};
use crash_support::say;
use rand::{Rng, SeedableRng};

const DIR_ENV: &str = "AEDB_CRASH_AT_REST_DIR";
const PARENT: &str = "sigkill_during_checkpoints_and_rotations_loses_no_acknowledged_commit";

const MK: [u8; 32] = [0x13; 32];
const CK: [u8; 32] = [0x14; 32];

fn config(encrypted: bool) -> AedbConfig {
    let base = if encrypted {
        AedbConfig::production(MK).with_checkpoint_key(CK)
    } else {
        AedbConfig::development()
    };
    base.with_durability(DurabilityMode::Full)
        .with_segment_bytes(256 * 1024)
        .with_checkpoint_policy(Some(64 * 1024), None)
        .with_limits(Limits {
            max_txn_bytes: 64 * 1024,
            max_value_bytes: 16 * 1024,
            ..Limits::default()
        })
}

fn value(n: u64) -> Vec<u8> {
    format!("value-{n}-{}", "x".repeat((n % 200) as usize)).into_bytes()
}

fn key(n: u64) -> Vec<u8> {
    format!("k{n:08}").into_bytes()
}

/// The child: runs only when re-executed by the parent test (which sets
/// AEDB_CRASH_AT_REST_DIR).
#[test]
#[ignore = "SIGKILL child of sigkill_during_checkpoints_and_rotations_loses_no_acknowledged_commit; runs only when re-executed by it"]
fn crash_at_rest_child() {
    let Some(dir) = crash_support::child_env(DIR_ENV, PARENT) else {
        return;
    };
    let encrypted = std::env::var("AEDB_CRASH_ENCRYPTED").is_ok();
    say("opening");
    let db = AedbInstance::open(config(encrypted), &dir).expect("child open");
    // Each step on its own: an earlier child may have been killed between them.
    if db
        .snapshot()
        .expect("snapshot")
        .projects()
        .iter()
        .all(|p| p != "p")
    {
        db.create_project("p").expect("project");
    }
    if db.snapshot().expect("snapshot").kv("p", "s").is_err() {
        db.create_scope("p", "s").expect("scope");
    }
    let mut n = db
        .snapshot()
        .expect("snapshot")
        .kv("p", "s")
        .expect("kv")
        .scan_prefix(b"k", usize::MAX)
        .expect("scan")
        .len() as u64;
    say(&format!("opened {n}"));
    loop {
        let mut tx = db.begin_write("p").expect("tx");
        tx.kv_set("s", &key(n), &value(n)).expect("set");
        // Every fifth commit also carries a second key, so multi-key atomicity is
        // checked: both or neither.
        if n.is_multiple_of(5) {
            tx.kv_set("s", format!("pair{n:08}").as_bytes(), b"p")
                .expect("pair");
        }
        db.commit_with_finality(tx, CommitFinality::Durable)
            .expect("durable commit");
        say(&format!("durable {n}"));
        n += 1;
        if n.is_multiple_of(40) {
            db.checkpoint().expect("checkpoint");
        }
    }
}

fn check(dir: &Path, encrypted: bool, acknowledged: Option<u64>) -> u64 {
    let db = AedbInstance::open(config(encrypted), dir).expect("strict reopen after SIGKILL");
    let snap = db.snapshot().expect("snapshot");
    let Ok(kv) = snap.kv("p", "s") else {
        assert!(acknowledged.is_none(), "acknowledged commits but no scope");
        return 0;
    };
    let pairs = kv.scan_prefix(b"pair", usize::MAX).expect("scan").len() as u64;
    if std::env::var("AEDB_CRASH_DEBUG").is_ok() {
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| {
                format!(
                    "{}:{}",
                    e.file_name().to_string_lossy(),
                    e.metadata().map(|m| m.len()).unwrap_or(0)
                )
            })
            .collect();
        files.sort();
        eprintln!(
            "ack {acknowledged:?} present {} report {:?} files {files:?} manifest {}",
            kv.scan_prefix(b"k", usize::MAX).expect("scan").len(),
            db.recovery_report(),
            std::fs::read_to_string(dir.join("MANIFEST")).unwrap_or_default()
        );
    }
    let present = kv.scan_prefix(b"k", usize::MAX).expect("scan").len() as u64;
    assert_eq!(pairs, present.div_ceil(5), "one pair key per fifth commit");
    if let Some(a) = acknowledged {
        assert!(
            present > a,
            "acknowledged commit {a} lost (only {present} keys)"
        );
    }
    for n in 0..present {
        assert_eq!(
            kv.get(&key(n)).expect("read").as_deref(),
            Some(value(n).as_slice()),
            "key {n} wrong or missing"
        );
        assert_eq!(
            kv.get(format!("pair{n:08}").as_bytes())
                .expect("read")
                .is_some(),
            n.is_multiple_of(5),
            "atomicity of commit {n}"
        );
    }
    assert!(
        kv.get(&key(present)).expect("read").is_none(),
        "keys must form a prefix"
    );
    let report =
        aedb::inspect(dir, &config(encrypted)).expect_err("inspect needs the lock held by us");
    let _ = report;
    db.close().expect("close");
    let report = aedb::inspect(dir, &config(encrypted)).expect("inspect");
    assert!(report.ok(), "invariants after crash: {:#?}", report.checks);
    present
}

#[test]
fn sigkill_during_checkpoints_and_rotations_loses_no_acknowledged_commit() {
    let iterations: u32 = std::env::var("AEDB_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("AEDB_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("crash test: {iterations} iterations, AEDB_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (encrypted, dir) in [
        (false, tempfile::tempdir().expect("tempdir")),
        (true, tempfile::tempdir().expect("tempdir")),
    ] {
        let mut total = 0;
        for i in 0..iterations / 2 {
            let mut child = crash_support::spawn(
                "crash_at_rest_child",
                &[(DIR_ENV, OsString::from(dir.path()))]
                    .into_iter()
                    .chain(encrypted.then(|| ("AEDB_CRASH_ENCRYPTED", OsString::from("1"))))
                    .collect::<Vec<_>>(),
            );
            // Some iterations kill during open (the first ones during the first
            // open of a fresh directory, before anything is committed); the others
            // after a random number of acknowledged commits.
            let (reached, delay) = if i % 17 == 0 {
                (
                    child.wait_for("opening", 1),
                    Duration::from_micros(rng.random_range(0..4_000)),
                )
            } else {
                let acks = rng.random_range(1..=60);
                (
                    child.wait_for("opened ", 1) && child.wait_for("durable ", acks),
                    Duration::from_micros(rng.random_range(0..=2_000)),
                )
            };
            let done = child.kill_after(delay);
            let ctx = format!("seed {seed} encrypted={encrypted} iteration {i}");
            done.assert_killed(&ctx);
            assert!(reached, "{ctx}: the child exited before it was killed");
            if std::env::var("AEDB_CRASH_DEBUG").is_ok() {
                eprintln!("{}", done.stderr);
            }
            let acknowledged = done
                .lines
                .iter()
                .filter_map(|l| l.strip_prefix("durable "))
                .map(|n| n.parse::<u64>().expect("number"))
                .max();
            total = check(dir.path(), encrypted, acknowledged);
        }
        eprintln!(
            "crash test (encrypted={encrypted}): {total} commits survived {} kills",
            iterations / 2
        );
        assert!(
            total > 0,
            "no commit survived, although kills wait for acknowledged commits"
        );
    }
}
