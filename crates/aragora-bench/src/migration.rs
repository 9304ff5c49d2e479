//! Re-encryption migration throughput: N secrets (64-byte values) under one
//! key, a rotation, then `Migrator::run` rewrapping every record under the new
//! primary, in batches of 1000, each one atomic store write waited durable,
//! on the embedded store in a temp dir. The figure the issue targets: 1M
//! records in at most 60 s (quick mode migrates 20k and extrapolates).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, anyhow};
use aragora::audit::AuditLog;
use aragora::clock::format_us;
use aragora::config::Environment;
use aragora::crypto::MasterKey;
use aragora::encryption::KeyRing;
use aragora::encryption::migration::{MigrationOptions, MigrationStore, Migrator};
use aragora::metrics::Metrics;
use aragora::secrets::SecretRecord;
use aragora::store::{Collection, Durability, EmbeddedStore, Expect, Store, WriteOp};
use zeroize::Zeroizing;

use crate::Options;
use crate::report::{Report, thousands};

/// Writes `n` secrets under the current primary, 5000 per store batch.
fn seed(ring: &KeyRing, store: &dyn Store, n: usize) -> Result<()> {
    const CHUNK: usize = 5000;
    let value = [0x5au8; 64];
    let mut start = 0;
    while start < n {
        let ids: Vec<String> = (start..(start + CHUNK).min(n))
            .map(|i| format!("bench-secret-{i:08}"))
            .collect();
        let items: Vec<(&str, &[u8])> = ids.iter().map(|id| (id.as_str(), &value[..])).collect();
        let receipt = ring.seal_many_and_write(&items, |envs, key_id, key_version| {
            let ops = ids
                .iter()
                .zip(envs)
                .map(|(id, env)| {
                    let rec = SecretRecord {
                        id: id.clone(),
                        secret_type: "api_key".into(),
                        owner: "bench".into(),
                        envelope: hex_encode(&env),
                        key_id: key_id.into(),
                        key_version,
                        created_at: format_us(0),
                        created_at_us: 0,
                        updated_at: format_us(0),
                        updated_at_us: 0,
                        rotation_required: false,
                        rotation_reason: None,
                    };
                    WriteOp::put_json(Collection::Secrets, id.clone(), &rec, Expect::Absent)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!(e))?;
            store
                .write(ops, Durability::Visible)
                .map_err(|e| anyhow!(e))
        })?;
        store.wait_durable(receipt)?;
        start += CHUNK;
    }
    Ok(())
}

fn hex_encode(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(HEX[usize::from(x >> 4)] as char);
        s.push(HEX[usize::from(x & 15)] as char);
    }
    s
}

pub fn run(options: &Options, report: &mut Report) -> Result<()> {
    let records = if options.quick { 20_000 } else { 1_000_000 };
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(
        &dir.path().join("aedb"),
        [3; 32],
        [4; 32],
    )?);
    let audit = Arc::new(AuditLog::new(store.clone()));
    let metrics = Metrics::new().map_err(|e| anyhow!(e))?;
    let ring = Arc::new(KeyRing::open(
        store.clone(),
        audit.clone(),
        metrics.clone(),
        Some(MasterKey::from_bytes(Zeroizing::new([0x42; 32]))),
        None,
        dir.path(),
        Environment::Development,
        false,
        vec![aragora::secrets::encrypted_collection()],
    )?);
    let t = Instant::now();
    seed(&ring, store.as_ref(), records)?;
    let seed_secs = t.elapsed().as_secs_f64();
    ring.rotate("bench", None, "migration bench", true)?;
    let migrator = Migrator::new(
        store.clone(),
        audit,
        ring.clone(),
        metrics,
        MigrationOptions::default(),
    );
    let t = Instant::now();
    let st = migrator.run(MigrationStore::Secrets, "bench", &|_| {})?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        st.migrated == records as u64 && st.failed == 0,
        "migration did not rewrap every record: {:?}",
        st.view()
    );
    let per_s = records as f64 / secs;
    let million_s = 1e6 / per_s;
    report.record("migration", "aragora", "records_per_s", per_s);
    report.record("migration", "aragora", "seconds_per_1m", million_s);
    let mut table = String::new();
    writeln!(
        table,
        "migration: {} secrets (64 B values) rewrapped after a rotation, batches of 1000, each durable (seeded in {seed_secs:.1} s)",
        thousands(records as f64)
    )?;
    writeln!(
        table,
        "  {:>12} records/s   {secs:.2} s for {}   1M records: {million_s:.1} s{} (target <= 60 s)",
        thousands(per_s),
        thousands(records as f64),
        if records < 1_000_000 {
            " (extrapolated)"
        } else {
            ""
        }
    )?;
    report.section(table);
    Ok(())
}
