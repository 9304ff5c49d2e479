//! Scans one segment's bytes frame by frame and classifies where and why it stops.

use super::format::{ChainHash, FRAME_HEADER_LEN, FrameAt, RawFrame, chain_hash, frame_at};

/// Why a scan stopped before the end of the written data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Damage {
    pub offset: u64,
    pub reason: String,
    /// A well-formed frame with the next expected LSN follows the damaged one: the
    /// damage is in the middle of the log, not a torn final write.
    pub followed_by_valid: bool,
}

pub(crate) struct ScanOutcome {
    /// Offset just past the last good frame.
    pub end_offset: u64,
    pub last_lsn: u64,
    pub chain_head: ChainHash,
    pub damage: Option<Damage>,
}

/// Visits each good frame of `buf` (a whole segment file) in order, starting at
/// `start` with `next_lsn` and `prev_hash`. Stops at the end marker, at damage, or
/// when `visit` fails (its error is returned as damage with `followed_by_valid`).
pub(crate) fn scan_frames(
    keyed: Option<&ring::hmac::Key>,
    buf: &[u8],
    start: usize,
    mut next_lsn: u64,
    mut prev_hash: ChainHash,
    mut visit: impl FnMut(u64, &ChainHash, &[u8]) -> Result<(), String>,
) -> ScanOutcome {
    let mut pos = start;
    let damage = loop {
        let raw = match frame_at(buf, pos) {
            FrameAt::End => {
                let rest_zero = buf[pos.min(buf.len())..].iter().all(|&b| b == 0);
                if rest_zero {
                    break None;
                }
                let nonzero = buf[pos..].iter().position(|&b| b != 0).unwrap_or(0) + pos;
                break Some(Damage {
                    offset: pos as u64,
                    reason: format!(
                        "end-of-log marker followed by non-zero bytes at offset {nonzero}"
                    ),
                    followed_by_valid: valid_frame_from(buf, nonzero, next_lsn),
                });
            }
            FrameAt::Truncated => {
                break Some(Damage {
                    offset: pos as u64,
                    reason: "frame extends past the end of the segment".into(),
                    followed_by_valid: false,
                });
            }
            FrameAt::Frame(f) => f,
        };
        let next_pos = pos + FRAME_HEADER_LEN + raw.len as usize;
        if let Some(reason) = check_frame(keyed, &raw, next_lsn, &prev_hash) {
            break Some(Damage {
                offset: pos as u64,
                reason,
                followed_by_valid: valid_frame_from(buf, next_pos, next_lsn + 1),
            });
        }
        if let Err(reason) = visit(raw.lsn, &raw.hash, raw.payload) {
            break Some(Damage {
                offset: pos as u64,
                reason,
                followed_by_valid: true,
            });
        }
        prev_hash = raw.hash;
        next_lsn += 1;
        pos = next_pos;
    };
    ScanOutcome {
        end_offset: pos as u64,
        last_lsn: next_lsn - 1,
        chain_head: prev_hash,
        damage,
    }
}

fn check_frame(
    keyed: Option<&ring::hmac::Key>,
    raw: &RawFrame<'_>,
    expected_lsn: u64,
    prev_hash: &ChainHash,
) -> Option<String> {
    if !raw.crc_ok() {
        return Some(format!(
            "frame checksum mismatch (frame claims LSN {}, {} payload bytes)",
            raw.lsn, raw.len
        ));
    }
    if raw.lsn != expected_lsn {
        return Some(format!(
            "LSN out of order: expected {expected_lsn}, found {}",
            raw.lsn
        ));
    }
    if !crate::crypto::ct_eq(
        &chain_hash(keyed, prev_hash, raw.lsn, raw.payload),
        &raw.hash,
    ) {
        return Some(format!("hash chain broken at LSN {}", raw.lsn));
    }
    None
}

/// True when a frame with a valid checksum and LSN `lsn` starts at `pos`.
fn valid_frame_from(buf: &[u8], pos: usize, lsn: u64) -> bool {
    matches!(frame_at(buf, pos), FrameAt::Frame(f) if f.lsn == lsn && f.crc_ok())
}

/// Counts CRC-valid frames from `pos` on by following their lengths (best effort,
/// for reporting what permissive recovery discarded). Returns (frames, highest LSN).
pub(crate) fn count_frames_best_effort(buf: &[u8], mut pos: usize) -> (u64, u64) {
    let (mut n, mut max_lsn) = (0u64, 0u64);
    while let FrameAt::Frame(f) = frame_at(buf, pos) {
        if !f.crc_ok() {
            break;
        }
        n += 1;
        max_lsn = max_lsn.max(f.lsn);
        pos += FRAME_HEADER_LEN + f.len as usize;
    }
    (n, max_lsn)
}
