//! Crypto workloads: our envelope against raw ring AES-256-GCM on the same
//! record sizes, and PBKDF2 latency at the configured iteration count.
//!
//! Both engines do one full round trip per record (seal, then open) with a
//! fresh OS nonce and the record id in the AAD, so the difference is exactly
//! what the envelope adds: header writing/parsing, the key check, the AAD
//! assembly and the two output allocations (raw reuses one buffer, its
//! floor). Rounds run in back-to-back pairs, one per engine, alternating
//! which goes first, so load from elsewhere on the machine hits both alike;
//! rates are the median round, the ratio the median of per-pair ratios.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aragora::crypto::{DataKey, decrypt, encrypt, kdf};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::Options;
use crate::report::{Report, thousands};

/// The target: envelope throughput at least this share of raw.
const TARGET_RATIO: f64 = 0.8;

/// Record ids look like this in the secrets store.
const RECORD_ID: &str = "secrets/svc-payments/api-token";

struct Size {
    workload: &'static str,
    bytes: usize,
}

const SIZES: [Size; 2] = [
    Size {
        workload: "crypto_64B",
        bytes: 64,
    },
    Size {
        workload: "crypto_16KiB",
        bytes: 16 * 1024,
    },
];

struct Plan {
    rounds: usize,
    round_time: Duration,
    pbkdf2_samples: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 3,
                round_time: Duration::from_millis(30),
                pbkdf2_samples: 5,
            }
        } else {
            Self {
                rounds: 9,
                round_time: Duration::from_millis(250),
                pbkdf2_samples: 21,
            }
        }
    }
}

pub fn run(options: &Options, report: &mut Report) -> Result<()> {
    let plan = Plan::new(options.quick);
    let mut table = String::new();
    writeln!(
        table,
        "crypto: seal+open round trips; median of {} paired rounds of {:?} per engine",
        plan.rounds, plan.round_time
    )?;
    writeln!(
        table,
        "{:<14} {:<9} {:>12} {:>8} {:>8}  target",
        "workload", "engine", "records/s", "GB/s", "vs raw"
    )?;

    let mut key_bytes = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(key_bytes.as_mut())
        .map_err(|_| anyhow::anyhow!("OS random number generator failed"))?;
    let dek = DataKey::from_bytes("bench-key", 1, key_bytes.clone())?;
    let raw = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key_bytes.as_ref())
            .map_err(|_| anyhow::anyhow!("ring rejected a 32-byte AES key"))?,
    );

    for size in &SIZES {
        let plaintext: Vec<u8> = (0..size.bytes).map(|i| (i * 131 + 17) as u8).collect();
        verify(&dek, &raw, &plaintext)?;

        let mut raw_rounds = Vec::with_capacity(plan.rounds);
        let mut ours_rounds = Vec::with_capacity(plan.rounds);
        let mut buf = Vec::with_capacity(size.bytes + 16);
        let mut ratios = Vec::with_capacity(plan.rounds);
        for round in 0..plan.rounds {
            let mut raw_once = || {
                rate(plan.round_time, size.bytes, || {
                    raw_round_trip(&raw, &plaintext, &mut buf)
                })
            };
            let ours_once = || {
                rate(plan.round_time, size.bytes, || {
                    let envelope = encrypt(&dek, RECORD_ID, black_box(&plaintext))?;
                    black_box(decrypt(&dek, RECORD_ID, &envelope)?);
                    Ok(())
                })
            };
            // Swapping who goes first cancels any warm-up or order effect.
            let (r, o) = if round % 2 == 0 {
                let r = raw_once()?;
                (r, ours_once()?)
            } else {
                let o = ours_once()?;
                (raw_once()?, o)
            };
            raw_rounds.push(r);
            ours_rounds.push(o);
            ratios.push(o / r);
        }
        let raw_rate = median(&mut raw_rounds);
        let ours_rate = median(&mut ours_rounds);
        // Per-pair ratios: the two halves of a pair ran back to back under the
        // same machine load, so their ratio is steadier than a ratio of medians.
        let ratio = median(&mut ratios);
        let gbps = |r: f64| r * size.bytes as f64 / 1e9;

        report.record(size.workload, "raw_ring", "records_per_s", raw_rate);
        report.record(size.workload, "raw_ring", "gb_per_s", gbps(raw_rate));
        report.record(size.workload, "aragora", "records_per_s", ours_rate);
        report.record(size.workload, "aragora", "gb_per_s", gbps(ours_rate));
        report.record(size.workload, "aragora", "ratio_vs_raw", ratio);

        writeln!(
            table,
            "{:<14} {:<9} {:>12} {:>8.3} {:>8}",
            size.workload,
            "raw_ring",
            thousands(raw_rate),
            gbps(raw_rate),
            ""
        )?;
        writeln!(
            table,
            "{:<14} {:<9} {:>12} {:>8.3} {:>7.2}x  >={TARGET_RATIO}x {}",
            size.workload,
            "aragora",
            thousands(ours_rate),
            gbps(ours_rate),
            ratio,
            if ratio >= TARGET_RATIO { "ok" } else { "MISS" }
        )?;
    }

    let (p50, p95) = pbkdf2_latency(options.pbkdf2_iterations, plan.pbkdf2_samples);
    let workload = "pbkdf2_sha256";
    report.record(workload, "aragora", "p50_s", p50);
    report.record(workload, "aragora", "p95_s", p95);
    report.record(
        workload,
        "aragora",
        "iterations",
        f64::from(options.pbkdf2_iterations.get()),
    );
    writeln!(
        table,
        "{workload:<14} {:<9} p50 {:.4} s, p95 {:.4} s at {} iterations ({} samples)",
        "aragora",
        p50,
        p95,
        thousands(f64::from(options.pbkdf2_iterations.get())),
        plan.pbkdf2_samples
    )?;
    writeln!(
        table,
        "\nGB/s counts plaintext bytes per round trip (each byte sealed and opened once)."
    )?;
    report.section(table);
    Ok(())
}

/// The floor: one nonce, seal and open in place in a reused buffer.
fn raw_round_trip(key: &LessSafeKey, plaintext: &[u8], buf: &mut Vec<u8>) -> Result<()> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| anyhow::anyhow!("OS random number generator failed"))?;
    buf.clear();
    buf.extend_from_slice(black_box(plaintext));
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(RECORD_ID),
        buf,
    )
    .map_err(|_| anyhow::anyhow!("raw seal failed"))?;
    let opened = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(RECORD_ID),
            buf,
        )
        .map_err(|_| anyhow::anyhow!("raw open failed"))?;
    black_box(opened);
    Ok(())
}

/// Both engines must round-trip the payload before their speed means anything.
fn verify(dek: &DataKey, raw: &LessSafeKey, plaintext: &[u8]) -> Result<()> {
    let envelope = encrypt(dek, RECORD_ID, plaintext)?;
    ensure!(
        decrypt(dek, RECORD_ID, &envelope)? == plaintext,
        "envelope round trip changed the payload"
    );
    let mut buf = Vec::new();
    raw_round_trip(raw, plaintext, &mut buf)?;
    ensure!(
        buf.get(..plaintext.len()) == Some(plaintext),
        "raw round trip changed the payload"
    );
    Ok(())
}

/// Records per second of `op` over roughly `budget`, checking the clock only
/// every batch so reading it does not weigh on 64-byte records.
fn rate(budget: Duration, record_bytes: usize, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    let batch = (64 * 1024 / record_bytes.max(1)).clamp(4, 256);
    let start = Instant::now();
    let mut done = 0u64;
    loop {
        for _ in 0..batch {
            op().context("measured operation failed")?;
        }
        done += batch as u64;
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return Ok(done as f64 / elapsed.as_secs_f64());
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// (p50, p95) in seconds of `samples` derivations with fresh salts.
fn pbkdf2_latency(iterations: std::num::NonZeroU32, samples: usize) -> (f64, f64) {
    let mut seconds: Vec<f64> = (0..samples)
        .map(|i| {
            let salt = (i as u64).to_be_bytes();
            let start = Instant::now();
            black_box(kdf::derive_key(b"bench passphrase", &salt, iterations));
            start.elapsed().as_secs_f64()
        })
        .collect();
    seconds.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((seconds.len() as f64 - 1.0) * q).round() as usize;
        seconds.get(i).copied().unwrap_or(f64::NAN)
    };
    (at(0.50), at(0.95))
}
