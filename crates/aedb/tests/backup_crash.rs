//! SIGKILL during backups and during restores: a child process (this test binary
//! re-executed, see `crash_support`) takes incremental backups, or restores a chain,
//! in a loop, reporting each completed one; the parent kills it after a random number
//! of completed ones plus a random delay (never on a timer started at spawn), and
//! checks that nothing left behind can be
//! mistaken for a complete backup or restore, that every complete one verifies,
//! and that rerunning works. `AEDB_CRASH_SEED` replays a run.

mod crash_support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crash_support::say;

use aedb::{
    AedbConfig, AedbInstance, discover_chain, inspect, restore_from_backup_chain,
    verify_backup_chain,
};
use rand::{Rng, SeedableRng};

const MK: [u8; 32] = [0x51; 32];
const CK: [u8; 32] = [0x52; 32];

fn cfg() -> AedbConfig {
    AedbConfig::production(MK)
        .with_checkpoint_key(CK)
        .with_segment_bytes(256 * 1024)
        .with_limits(aedb::Limits {
            max_txn_bytes: 64 * 1024,
            max_value_bytes: 16 * 1024,
            ..Default::default()
        })
}

fn newest_backup(root: &Path) -> PathBuf {
    let chain = discover_chain(root, &cfg()).expect("discover");
    chain.last().expect("a backup").clone()
}

const PARENT: &str = "sigkill_during_backups_and_restores_leaves_nothing_half_done";

/// Child: runs only when re-executed by the parent test (AEDB_BACKUP_CRASH_MODE set).
#[test]
#[ignore = "SIGKILL child of sigkill_during_backups_and_restores_leaves_nothing_half_done; runs only when re-executed by it"]
fn backup_crash_child() {
    let Some(mode) = crash_support::child_env("AEDB_BACKUP_CRASH_MODE", PARENT) else {
        return;
    };
    let root = PathBuf::from(std::env::var("AEDB_BACKUP_CRASH_ROOT").expect("root"));
    if mode == "backup" {
        let db = AedbInstance::open(cfg(), root.join("data")).expect("open");
        say("ready");
        for i in 0u32.. {
            let mut tx = db.begin_write("p").expect("tx");
            for j in 0..50u32 {
                tx.kv_set(
                    "s",
                    format!("c{}-{i}-{j}", std::process::id()).as_bytes(),
                    &[7; 200],
                )
                .expect("set");
            }
            db.commit(tx).expect("commit");
            let parent = newest_backup(&root.join("backups"));
            let dest = root
                .join("backups")
                .join(format!("inc-{}-{i:04}", std::process::id()));
            db.backup_incremental(&dest, &parent).expect("incremental");
            say(&format!("backup {}", dest.display()));
        }
    } else {
        let chain = discover_chain(&root.join("backups"), &cfg()).expect("chain");
        say("ready");
        for i in 0u32.. {
            let target = root.join(format!("restore-{}-{i:04}", std::process::id()));
            restore_from_backup_chain(&cfg(), &chain, &target).expect("restore");
            say(&format!("restored {}", target.display()));
        }
    }
}

/// Runs a child in `mode`, kills it `delay` after it reported `completed` finished
/// backups (or restores), and returns the directories it reported complete. The
/// child must die by that SIGKILL.
fn run_child(
    root: &Path,
    mode: &str,
    completed: usize,
    delay: Duration,
    ctx: &str,
) -> Vec<PathBuf> {
    let mut child = crash_support::spawn(
        "backup_crash_child",
        &[
            ("AEDB_BACKUP_CRASH_MODE", OsString::from(mode)),
            ("AEDB_BACKUP_CRASH_ROOT", OsString::from(root)),
        ],
    );
    let prefix = if mode == "backup" {
        "backup "
    } else {
        "restored "
    };
    let reached = child.wait_for("ready", 1) && child.wait_for(prefix, completed);
    let done = child.kill_after(delay);
    let ctx = format!("{ctx} ({mode}, killed {delay:?} after {completed} completed)");
    done.assert_killed(&ctx);
    assert!(reached, "{ctx}: the child exited before it was killed");
    done.lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(PathBuf::from)
        .collect()
}

#[test]
fn sigkill_during_backups_and_restores_leaves_nothing_half_done() {
    let seed: u64 = std::env::var("AEDB_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("backup crash test: AEDB_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    {
        let db = AedbInstance::open(cfg(), root.join("data")).expect("open");
        db.create_project("p").expect("p");
        db.create_scope("p", "s").expect("s");
        for i in 0..500u32 {
            db.kv_set("p", "s", format!("base{i}").as_bytes(), &[1; 200])
                .expect("set");
        }
        std::fs::create_dir_all(root.join("backups")).expect("mkdir");
        db.backup_full(&root.join("backups").join("full-0000"))
            .expect("full");
        db.close().expect("close");
    }
    let mut acknowledged = 0;
    for i in 0..12 {
        let ctx = format!("seed {seed} backup kill {i}");
        // Killed after 0..=2 completed backups, somewhere in the next commit or
        // backup (a backup of this database takes a few milliseconds or more).
        let completed = rng.random_range(usize::from(i == 0)..=2);
        let delay = Duration::from_micros(rng.random_range(0..=30_000));
        acknowledged += run_child(root, "backup", completed, delay, &ctx).len();
        // Every directory with a descriptor is complete and verifies as a chain;
        // interrupted ones exist only as `.partial` and are ignored.
        let chain = discover_chain(&root.join("backups"), &cfg()).expect("discover after a kill");
        verify_backup_chain(&cfg(), &chain).expect("the newest chain verifies");
        for e in std::fs::read_dir(root.join("backups")).expect("ls") {
            let p = e.expect("entry").path();
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            assert!(
                p.join("backup.json").exists() || name.ends_with(".partial"),
                "{name}: neither complete nor marked partial"
            );
        }
    }
    assert!(acknowledged > 0, "no backup completed before the kills");
    let chain = discover_chain(&root.join("backups"), &cfg()).expect("discover");
    let mut restored = 0;
    for i in 0..6 {
        let ctx = format!("seed {seed} restore kill {i}");
        let completed = rng.random_range(0..=1);
        let delay = Duration::from_micros(rng.random_range(0..=150_000));
        for target in run_child(root, "restore", completed, delay, &ctx) {
            let r = inspect(&target, &cfg()).expect("inspect a completed restore");
            assert!(r.ok(), "{:#?}", r.checks);
            restored += 1;
        }
        // A killed restore left at most a `.restoring` directory; its target either
        // does not exist or is complete. Rerunning into it works.
        for e in std::fs::read_dir(root).expect("ls") {
            let p = e.expect("entry").path();
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            if let Some(target) = name.strip_suffix(".restoring") {
                let target = root.join(target);
                assert!(!target.exists() || inspect(&target, &cfg()).expect("inspect").ok());
                if !target.exists() {
                    restore_from_backup_chain(&cfg(), &chain, &target)
                        .expect("rerun the interrupted restore");
                    assert!(!p.exists(), "the rerun cleans up the leftover");
                    assert!(inspect(&target, &cfg()).expect("inspect").ok());
                }
            }
        }
    }
    eprintln!(
        "backup crash test: {acknowledged} backups and {restored} restores completed before kills"
    );
}
