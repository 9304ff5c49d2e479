//! The fsync floor: what one durable commit costs if the commit itself were
//! free. Roughly a WAL record (~130 bytes for a 16+100-byte put plus framing)
//! appended and fdatasync'd; appending (rather than overwriting) keeps the
//! file-size metadata update in the loop, as a real log has it.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;

const RECORD_BYTES: usize = 130;

/// Returns commits (append + fdatasync) per second over `iterations`.
pub fn commits_per_s(dir: &Path, iterations: u64) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("floor.log"))?;
    let record = [0xA5u8; RECORD_BYTES];
    let start = Instant::now();
    for _ in 0..iterations {
        file.write_all(&record)?;
        file.sync_data()?;
    }
    Ok(iterations as f64 / start.elapsed().as_secs_f64())
}
