//! Scans one segment's bytes frame by frame and classifies where and why it stops.

use super::format::{ChainHash, FRAME_HEADER_LEN, FrameAt, RawFrame, chain_hash, frame_at};

/// The largest LSN (and commit sequence number): `i64::MAX`, as audit rows store
/// the sequence number in a signed column. An LSN read from disk above it (a
/// checkpoint's, a segment header's, a frame's) is damage, so that adding 1 to an
/// accepted LSN can never overflow.
pub(crate) const MAX_LSN: u64 = i64::MAX as u64;

/// Why a scan stopped before the end of the written data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Damage {
    pub offset: u64,
    pub reason: String,
    /// Where a well-formed frame (valid CRC, a later LSN) follows the damage: the
    /// damage is then in the middle of the log, not a torn final write.
    pub next_valid: Option<usize>,
    /// The damaged frame itself is complete (its CRC holds): a torn write cannot
    /// produce that, so it is never treated as a torn tail.
    pub complete: bool,
    /// A valid frame that starts a later write batch follows the damage: the
    /// damaged bytes were fsynced before it was written.
    pub later_batch: bool,
}

impl Damage {
    /// A torn final write: an incomplete frame with no later write batch after it
    /// (valid frames of the same, unacknowledged batch may follow it: sectors of
    /// one write can reach the disk in any order).
    pub fn is_torn(&self) -> bool {
        !self.complete && !self.later_batch
    }

    /// Damage to a segment as a whole (header, name, order, a missing file): never
    /// a torn write.
    pub fn structural(reason: String) -> Self {
        Damage {
            offset: 0,
            reason,
            next_valid: Some(0),
            complete: true,
            later_batch: true,
        }
    }

    fn after(
        buf: &[u8],
        from: usize,
        min_lsn: u64,
        offset: usize,
        reason: String,
        complete: bool,
    ) -> Self {
        Damage {
            offset: offset as u64,
            reason,
            next_valid: next_valid_frame(buf, from, min_lsn, false),
            complete,
            later_batch: next_valid_frame(buf, from, min_lsn, true).is_some(),
        }
    }
}

pub(crate) struct ScanOutcome {
    /// Offset just past the last good frame.
    pub end_offset: u64,
    pub last_lsn: u64,
    pub chain_head: ChainHash,
    pub damage: Option<Damage>,
}

/// How a scan checks each frame's chain hash.
#[derive(Clone, Copy)]
pub(crate) enum ChainCheck<'a> {
    /// Recomputes it: SHA-256, or HMAC under the chain key.
    Verify(Option<&'a ring::hmac::Key>),
    /// Takes the stored hash as it is: the segment's bytes are authenticated by a
    /// digest the signed manifest records (a segment chained under a rotated-away
    /// manifest key); the caller compares that digest after the scan.
    Stored,
}

/// Visits each good frame of `buf` (a whole segment file) in order, starting at
/// `start` with `next_lsn` and `prev_hash`. Stops at the end marker, at damage, or
/// when `visit` fails (its error is returned as damage to a complete frame).
pub(crate) fn scan_frames(
    keyed: Option<&ring::hmac::Key>,
    buf: &[u8],
    start: usize,
    next_lsn: u64,
    prev_hash: ChainHash,
    visit: impl FnMut(u64, &ChainHash, &[u8]) -> Result<(), String>,
) -> ScanOutcome {
    scan_frames_with(
        ChainCheck::Verify(keyed),
        buf,
        start,
        next_lsn,
        prev_hash,
        visit,
    )
}

/// [`scan_frames`] with an explicit way of checking the chain.
pub(crate) fn scan_frames_with(
    chain: ChainCheck<'_>,
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
                let Some(nonzero) = buf[pos.min(buf.len())..].iter().position(|&b| b != 0) else {
                    break None;
                };
                let nonzero = nonzero + pos;
                break Some(Damage::after(
                    buf,
                    pos + 1,
                    next_lsn,
                    pos,
                    format!("end-of-log marker followed by non-zero bytes at offset {nonzero}"),
                    false,
                ));
            }
            FrameAt::Truncated => {
                break Some(Damage::after(
                    buf,
                    pos + 1,
                    next_lsn,
                    pos,
                    "frame extends past the end of the segment".into(),
                    false,
                ));
            }
            FrameAt::Frame(f) => f,
        };
        let next_pos = pos + FRAME_HEADER_LEN + raw.len as usize;
        let after = match check_frame(chain, &raw, next_lsn, &prev_hash) {
            Ok(after) => after,
            Err((reason, complete)) => {
                break Some(Damage::after(buf, pos + 1, next_lsn, pos, reason, complete));
            }
        };
        if let Err(reason) = visit(raw.lsn, &raw.hash, raw.payload) {
            break Some(Damage::after(buf, next_pos, after, pos, reason, true));
        }
        prev_hash = raw.hash;
        next_lsn = after;
        pos = next_pos;
    };
    ScanOutcome {
        end_offset: pos as u64,
        // Callers start at LSN 1 or later; 0 would mean "nothing before".
        last_lsn: next_lsn.saturating_sub(1),
        chain_head: prev_hash,
        damage,
    }
}

/// The LSN after the frame, if it is the next one of the log; else why not, and
/// whether it is complete.
fn check_frame(
    chain: ChainCheck<'_>,
    raw: &RawFrame<'_>,
    expected_lsn: u64,
    prev_hash: &ChainHash,
) -> Result<u64, (String, bool)> {
    if !raw.crc_ok() {
        return Err((
            format!(
                "frame checksum mismatch (frame claims LSN {}, {} payload bytes)",
                raw.lsn, raw.len
            ),
            false,
        ));
    }
    if raw.lsn != expected_lsn {
        return Err((
            format!(
                "LSN out of order: expected {expected_lsn}, found {}",
                raw.lsn
            ),
            true,
        ));
    }
    // Checked before the chain: a forged frame there must not reach `lsn + 1`.
    let Some(after) = raw.lsn.checked_add(1).filter(|_| raw.lsn <= MAX_LSN) else {
        return Err((
            format!("frame at LSN {} is past the largest LSN {MAX_LSN}", raw.lsn),
            true,
        ));
    };
    if let ChainCheck::Verify(keyed) = chain
        && !crate::crypto::ct_eq(
            &chain_hash(keyed, prev_hash, raw.lsn, raw.payload),
            &raw.hash,
        )
    {
        return Err((format!("hash chain broken at LSN {}", raw.lsn), true));
    }
    Ok(after)
}

/// The first offset at or after `from` where a frame with a valid CRC and an LSN
/// of at least `min_lsn` starts. Any damage (a flipped length, a zeroed header, a
/// lost sector) followed by such a frame is damage in the middle of the log.
pub(crate) fn next_valid_frame(
    buf: &[u8],
    from: usize,
    min_lsn: u64,
    batch_start: bool,
) -> Option<usize> {
    // Nothing can start in the zero tail of a preallocated segment.
    let last_nonzero = buf.iter().rposition(|&b| b != 0)?;
    let mut p = from;
    while p <= last_nonzero && p + FRAME_HEADER_LEN <= buf.len() {
        let word = u32::from_le_bytes([buf[p], buf[p + 1], buf[p + 2], buf[p + 3]]);
        let len = (word & !super::format::BATCH_START) as usize;
        if len != 0 && p + FRAME_HEADER_LEN + len <= buf.len() {
            let mut l = [0u8; 8];
            l.copy_from_slice(&buf[p + 8..p + 16]);
            let lsn = u64::from_le_bytes(l);
            if lsn >= min_lsn
                && lsn - min_lsn < 1 << 32
                && matches!(frame_at(buf, p), FrameAt::Frame(f) if f.crc_ok() && (f.batch_start || !batch_start))
            {
                return Some(p);
            }
        }
        p += 1;
    }
    None
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
