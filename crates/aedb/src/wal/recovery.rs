//! Reads every segment in order, replays good frames, and decides what to do with
//! damage: a torn final write is repaired in both modes; anything else stops strict
//! recovery with the file and offset, while permissive recovery keeps the longest
//! valid prefix, moves what it drops to `dropped/`, and reports it.
//!
//! What the manifest records is checked too: the segments it lists must all be
//! there, and the log must reach the durable head it records (frames at or before
//! it were acknowledged, so losing them is never a torn write). A head anchored off
//! the machine (`AedbConfig::with_expected_head`) must be reached in both modes.

use std::path::{Path, PathBuf};

use super::format::{
    ChainHash, FLAG_ENCRYPTED, FLAG_KEYED_CHAIN, SEGMENT_HEADER_LEN, SegmentHeader,
    parse_segment_file_name, segment_file_name,
};
use super::keys::{SegmentChain, WalKeys, decrypt_frame};
use super::reader::{ChainCheck, Damage, MAX_LSN, count_frames_best_effort, scan_frames_with};
use super::writer::{ForeignChain, SealedSegment, WriterPosition, sync_dir};
use crate::config::RecoveryMode;
use crate::error::AedbError;
use crate::storage::{OpenMode, Storage};

/// A point of the hash-chained log: an LSN and the chain hash after the frame with
/// that LSN. It commits to every frame up to it, so a host that stores it off the
/// machine can later require a directory to reach it
/// (`AedbConfig::with_expected_head`, `aedb check invariants --expect-head`).
///
/// Written and parsed as `LSN:HASH` (decimal LSN, 64 hex characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChainHead {
    pub lsn: u64,
    pub hash: [u8; 32],
}

impl ChainHead {
    /// The head of an empty log (LSN 0, zero hash).
    pub const GENESIS: ChainHead = ChainHead {
        lsn: 0,
        hash: [0; 32],
    };
}

impl std::fmt::Display for ChainHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.lsn, hex::encode(self.hash))
    }
}

impl std::str::FromStr for ChainHead {
    type Err = AedbError;

    fn from_str(s: &str) -> Result<Self, AedbError> {
        let bad = |why: &str| {
            AedbError::InvalidArgument(format!(
                "chain head {s:?}: {why} (expected LSN:HASH, HASH 64 hex characters)"
            ))
        };
        let (lsn, hash) = s.trim().split_once(':').ok_or_else(|| bad("no ':'"))?;
        let lsn = lsn.parse().map_err(|_| bad("the LSN is not a number"))?;
        let bytes = hex::decode(hash).map_err(|_| bad("the hash is not hex"))?;
        let hash =
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| bad("the hash is not 32 bytes"))?;
        Ok(ChainHead { lsn, hash })
    }
}

/// A torn final write that recovery cut off (never acknowledged as durable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: u64,
    pub reason: String,
}

/// What permissive recovery discarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedTail {
    pub file: PathBuf,
    pub offset: u64,
    pub reason: String,
    /// First commit (LSN) that is no longer in the database: the first one after
    /// the damage, or after the checkpoint when the damage is at or below it.
    pub first_dropped_lsn: u64,
    /// Frames known to be lost: found with a valid checksum after the damage, or
    /// recorded as durable by the manifest but no longer in the log (best effort).
    pub frames_dropped: u64,
    /// Highest LSN seen among the dropped frames and segments, or recorded as
    /// durable by the manifest (0 if none is known).
    pub max_dropped_lsn: u64,
    /// Copies of the damaged segment and every later segment, kept for forensics.
    pub preserved: Vec<PathBuf>,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub frames_replayed: u64,
    /// LSN of the recovered state (the end of the log, or the checkpoint's LSN).
    pub last_lsn: u64,
    pub torn_tail: Option<TornTail>,
    pub dropped: Option<DroppedTail>,
    /// Segments the manifest lists that are not in the directory (permissive mode:
    /// strict refuses to open).
    pub missing_segments: Vec<PathBuf>,
    /// The segment recovery fsynced before counting its frames durable: frames
    /// written before a crash may have reached only the page cache.
    pub synced_tail: Option<PathBuf>,
}

pub(crate) struct Recovered {
    pub position: Option<WriterPosition>,
    /// Header of the segment `position` is in.
    pub last_header: Option<SegmentHeader>,
    /// Every segment kept, in order, with its LSN range and final chain hash.
    pub segments: Vec<SealedSegment>,
    pub report: RecoveryReport,
    /// The writer must start a new segment after `position.segment_index` instead
    /// of appending (permissive recovery moved every segment away because the
    /// kept log ended below the checkpoint).
    pub start_new_segment: bool,
    /// LSN and chain hash of the recovered state.
    pub head: ChainHead,
    /// A frame after the checkpoint was read under a previous key (a frame key
    /// other than the current one, or a chain key other than the current one):
    /// the directory needs a previous key until a checkpoint covers it.
    pub replayed_under_previous_keys: bool,
}

/// Lists the segment files of `dir` in index order, removing leftovers of
/// interrupted segment creation.
pub(crate) fn list_segments(
    fs: &dyn Storage,
    dir: &Path,
) -> Result<Vec<(u64, PathBuf)>, AedbError> {
    let mut segs = Vec::new();
    for entry in fs.list_dir(dir).map_err(|e| AedbError::io(dir, e))? {
        if let Some(index) = parse_segment_file_name(&entry.name) {
            segs.push((index, dir.join(&entry.name)));
        }
    }
    segs.sort();
    Ok(segs)
}

pub(crate) fn remove_leftovers(fs: &dyn Storage, dir: &Path) -> Result<(), AedbError> {
    for entry in fs.list_dir(dir).map_err(|e| AedbError::io(dir, e))? {
        let name = entry.name.as_str();
        if !entry.is_dir && (name.ends_with(".tmp") || name == "wal-next.prep") {
            let p = dir.join(name);
            fs.remove_file(&p).map_err(|e| AedbError::io(&p, e))?;
        }
    }
    Ok(())
}

/// True when the segment file at `path` has a valid header and no frame.
pub(crate) fn segment_is_empty(fs: &dyn Storage, path: &Path) -> bool {
    let Ok(f) = fs.open(path, OpenMode::Read) else {
        return false;
    };
    let mut b = vec![0u8; SEGMENT_HEADER_LEN + super::format::FRAME_HEADER_LEN];
    f.read_exact_at(&mut b, 0).is_ok()
        && SegmentHeader::decode(&b).is_ok()
        && b[SEGMENT_HEADER_LEN..].iter().all(|&x| x == 0)
}

/// Where replay starts: from the beginning of the log, or after a checkpoint whose
/// LSN and chain head the log must reproduce; and what the log must reach.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplayStart {
    pub checkpoint: Option<(u64, ChainHash)>,
    /// Inspection: change nothing on disk (a torn tail is reported, not cut off).
    pub read_only: bool,
    /// The durable end of the log the manifest records: every frame up to it was
    /// acknowledged, so the log must reach it with this chain hash.
    pub durable_head: Option<ChainHead>,
    /// First and last segment index the manifest lists.
    pub listed_segments: Option<(u64, u64)>,
    /// A head anchored off the machine that the log must reach (both modes).
    pub expected_head: Option<ChainHead>,
    /// Segments (by index) the manifest records as chained under a rotated-away
    /// manifest key, with that key's id and the digest that authenticates them.
    pub foreign: Vec<(u64, ForeignChain)>,
}

/// Replays the log, calling `apply` with each decrypted frame after the checkpoint,
/// in LSN order.
pub(crate) fn recover(
    fs: &dyn Storage,
    dir: &Path,
    mode: RecoveryMode,
    keys: &WalKeys,
    start: ReplayStart,
    mut apply: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<Recovered, AedbError> {
    if !start.read_only {
        remove_leftovers(fs, dir)?;
    }
    let segs = list_segments(fs, dir)?;
    let ckpt_lsn = start.checkpoint.map_or(0, |(l, _)| l);
    // Reading a checkpoint refuses this too; recovery adds 1 to it below.
    if ckpt_lsn > MAX_LSN {
        return Err(AedbError::corruption(
            dir,
            0,
            format!("checkpoint LSN {ckpt_lsn} is past the largest LSN {MAX_LSN}"),
        ));
    }
    let mut report = RecoveryReport {
        segments: segs.len(),
        last_lsn: ckpt_lsn,
        ..RecoveryReport::default()
    };

    // Reported as the first dropped LSN if the very first header is unreadable.
    let mut next_lsn = ckpt_lsn + 1;
    let mut head = [0u8; 32];
    let mut position: Option<WriterPosition> = None;
    let mut last_header = None;
    let mut summaries: Vec<SealedSegment> = Vec::new();
    // The chain hash the log has at the expected head's LSN, once seen.
    let mut expected_seen: Option<ChainHash> = None;
    let mut replayed_under_previous_keys = false;
    // Every damage exit hands the progress so far to `finish_damaged`.
    macro_rules! damaged {
        ($i:expr, $path:expr, $damage:expr, $named:expr) => {
            return finish_damaged(
                fs,
                dir,
                mode,
                &start,
                &segs,
                DamageAt {
                    index: $i,
                    path: $path,
                    named_file: $named,
                },
                $damage,
                Progress {
                    next_lsn,
                    report,
                    position,
                    last_header,
                    segments: summaries,
                    expected_seen,
                    replayed_under_previous_keys,
                },
            )
        };
    }
    for (i, (index, path)) in segs.iter().enumerate() {
        let is_last = i + 1 == segs.len();
        // A gap in segment numbers is a missing segment: never a torn write.
        if i > 0 && *index != segs[i - 1].0 + 1 {
            let missing = dir.join(segment_file_name(segs[i - 1].0 + 1));
            let damage = Damage::structural(format!(
                "segment missing: expected {} after {}",
                missing.display(),
                segs[i - 1].1.display()
            ));
            damaged!(i, path, damage, &missing);
        }
        let buf = fs.read(path).map_err(|e| AedbError::io(path, e))?;
        let header = match SegmentHeader::decode(&buf) {
            Ok(h) => h,
            Err(reason) => {
                let damage = Damage::structural(reason);
                damaged!(i, path, damage, path);
            }
        };
        if i == 0 {
            // The first live segment: the log starts here (LSN 1) or, after a
            // checkpoint, somewhere at or before the checkpoint's next LSN.
            next_lsn = header.first_lsn;
            head = header.prev_hash;
        }
        let header_problem = if header.index != *index {
            Some(format!(
                "segment header says index {}, file name says {index} (renamed or reordered segment)",
                header.index
            ))
        } else if header.first_lsn == 0 {
            Some("segment starts at LSN 0 (LSNs start at 1)".to_string())
        } else if header.first_lsn > MAX_LSN {
            Some(format!(
                "segment starts at LSN {}, past the largest LSN {MAX_LSN}",
                header.first_lsn
            ))
        } else if header.index > MAX_LSN {
            // The writer continues in segment index + 1.
            Some(format!(
                "segment index {} is past the largest segment index {MAX_LSN}",
                header.index
            ))
        } else if header.first_lsn != next_lsn {
            Some(format!(
                "segment starts at LSN {}, expected {next_lsn} (missing or reordered segment)",
                header.first_lsn
            ))
        } else if i == 0
            && start.checkpoint.is_none()
            && (header.first_lsn != 1 || header.prev_hash != [0; 32])
        {
            Some(format!(
                "log starts at LSN {} but there is no checkpoint covering the LSNs before it",
                header.first_lsn
            ))
        } else if i == 0 && header.first_lsn > ckpt_lsn + 1 {
            Some(format!(
                "log starts at LSN {}, after the checkpoint's LSN {ckpt_lsn} + 1 (segments missing)",
                header.first_lsn
            ))
        } else if i == 0
            && header.first_lsn == ckpt_lsn + 1
            && start.checkpoint.is_some_and(|(_, h)| h != header.prev_hash)
        {
            Some("first segment does not continue the checkpoint's hash chain".to_string())
        } else if header.prev_hash != head {
            Some("segment does not continue the hash chain of the previous one".to_string())
        } else {
            None
        };
        if let Some(reason) = header_problem {
            let damage = Damage::structural(reason);
            damaged!(i, path, damage, path);
        }
        // Without the right chain key nothing in the segment can be verified. A
        // missing frame key matters only for frames that must be decrypted: those
        // a checkpoint covers are verified by the chain alone, so segments kept
        // under a rotated-away key (for the backup floor) do not need it.
        let keyed = header.flags & FLAG_KEYED_CHAIN != 0;
        let cipher = match keys.reader_cipher(&header) {
            Err(reason) if keyed != keys.chain.is_some() => {
                return Err(AedbError::KeyMismatch {
                    file: path.clone(),
                    reason,
                });
            }
            other => other,
        };
        // A segment chained under a rotated-away manifest key verifies under that
        // key when it is still configured, or else by the digest the manifest
        // (signed under the current key) records for it.
        let recorded = start
            .foreign
            .iter()
            .find(|(i, _)| i == index)
            .map(|(_, f)| *f);
        let chain = keys.chain_for(&header, &buf);
        let check = match (chain, recorded) {
            (SegmentChain::Plain, _) => ChainCheck::Verify(None),
            (SegmentChain::Current(k) | SegmentChain::Previous(k, _), _) => {
                ChainCheck::Verify(Some(k))
            }
            (SegmentChain::Unknown(_), Some(_)) => ChainCheck::Stored,
            // No id recorded and no configured key verifies the first frame:
            // reported where the chain breaks, as before ids were recorded.
            (SegmentChain::Unknown(None), None) => ChainCheck::Verify(keys.chain.as_ref()),
            (SegmentChain::Unknown(Some(id)), None) => {
                return Err(AedbError::KeyMismatch {
                    file: path.clone(),
                    reason: keys.unknown_chain_reason(Some(id)),
                });
            }
        };
        if let (ChainCheck::Stored, Some(r)) = (check, recorded) {
            // Checked before any frame is applied: a mismatch keeps nothing of it.
            let pre = scan_frames_with(
                check,
                &buf,
                SEGMENT_HEADER_LEN,
                next_lsn,
                head,
                |_, _, _| Ok(()),
            );
            let end = pre.end_offset as usize;
            if pre.damage.is_some() || !crate::crypto::ct_eq(&sha256(&buf[..end]), &r.sha256) {
                let damage = Damage::structural(format!(
                    "segment does not match the digest the manifest records for it (chained under the rotated-away manifest key with id {}): replaced or altered",
                    hex::encode(r.key_id)
                ));
                damaged!(i, path, damage, path);
            }
        }

        let mut replayed = 0u64;
        let mut key_error = None;
        let outcome = scan_frames_with(
            check,
            &buf,
            SEGMENT_HEADER_LEN,
            next_lsn,
            head,
            |lsn, hash, payload| {
                if start.expected_head.is_some_and(|e| e.lsn == lsn) {
                    expected_seen = Some(*hash);
                }
                if let Some(d) = start.durable_head
                    && d.lsn == lsn
                    && !crate::crypto::ct_eq(&d.hash, hash)
                {
                    return Err(format!(
                        "the log's hash chain at LSN {lsn} differs from the durable head the manifest records (the log was replaced)"
                    ));
                }
                if lsn <= ckpt_lsn {
                    // Already in the checkpoint; the chain must lead to its head.
                    if let Some((l, h)) = start.checkpoint
                        && l == lsn
                        && h != *hash
                    {
                        return Err(format!(
                            "the log's hash chain at LSN {lsn} does not match the checkpoint's"
                        ));
                    }
                    return Ok(());
                }
                let cipher = match &cipher {
                    Ok(c) => c,
                    Err(reason) => {
                        key_error = Some(reason.clone());
                        return Err(reason.clone());
                    }
                };
                replayed += 1;
                match cipher {
                    Some(c) => {
                        let plain = decrypt_frame(c, lsn, payload).map_err(|e| e.to_string())?;
                        apply(lsn, &plain)
                    }
                    None => apply(lsn, payload),
                }
            },
        );
        if let Some(reason) = key_error {
            return Err(AedbError::KeyMismatch {
                file: path.clone(),
                reason,
            });
        }
        // Another history than the anchored one: refused before anything is changed.
        if let (Some(e), Some(seen)) = (start.expected_head, expected_seen)
            && !crate::crypto::ct_eq(&e.hash, &seen)
        {
            return Err(AedbError::RolledBack {
                dir: dir.to_path_buf(),
                expected: Box::new(e),
                found: Box::new(ChainHead {
                    lsn: e.lsn,
                    hash: seen,
                }),
                reason: format!(
                    "the log in {} has another chain hash at LSN {} (a different history)",
                    path.display(),
                    e.lsn
                ),
            });
        }
        let current_frame_key = header.flags & FLAG_ENCRYPTED == 0
            || keys
                .frame
                .as_ref()
                .is_some_and(|(_, id)| *id == header.key_id);
        let current_chain = matches!(chain, SegmentChain::Plain | SegmentChain::Current(_));
        if replayed > 0 && !(current_frame_key && current_chain) {
            replayed_under_previous_keys = true;
        }
        report.frames_replayed += replayed;
        next_lsn = outcome.last_lsn + 1;
        head = outcome.chain_head;
        position = Some(WriterPosition {
            segment_index: *index,
            offset: outcome.end_offset,
            last_lsn: outcome.last_lsn,
            chain_head: outcome.chain_head,
        });
        let foreign = match (chain, recorded) {
            (SegmentChain::Previous(_, key_id), _) => Some(ForeignChain {
                key_id,
                sha256: sha256(&buf[..outcome.end_offset as usize]),
            }),
            (SegmentChain::Unknown(_), Some(r)) => Some(r),
            _ => None,
        };
        summaries.push(SealedSegment {
            index: *index,
            first_lsn: header.first_lsn,
            last_lsn: outcome.last_lsn,
            end_hash: outcome.chain_head,
            foreign,
        });
        last_header = Some(header);
        if let Some(mut damage) = outcome.damage {
            if is_last && damage.is_torn() {
                // A frame at or before the recorded durable head was acknowledged:
                // an incomplete one there is lost data, not a torn final write.
                match start.durable_head.filter(|d| outcome.last_lsn < d.lsn) {
                    None => {
                        // Torn final write: never acknowledged, cut off in both modes.
                        if !start.read_only {
                            zero_from(fs, path, damage.offset, buf.len() as u64)?;
                        }
                        tracing::warn!(file = %path.display(), offset = damage.offset, reason = %damage.reason,
                            "truncated an incomplete final WAL frame");
                        report.torn_tail = Some(TornTail {
                            file: path.clone(),
                            offset: damage.offset,
                            reason: damage.reason,
                        });
                        break;
                    }
                    Some(d) => {
                        damage.reason = format!(
                            "{} at LSN {}, at or before the durable head (LSN {}) the manifest records: an acknowledged frame, not a torn write",
                            damage.reason,
                            outcome.last_lsn + 1,
                            d.lsn
                        );
                    }
                }
            }
            damaged!(i, path, damage, path);
        }
    }
    finish_clean(
        fs,
        dir,
        mode,
        &start,
        &segs,
        Progress {
            next_lsn,
            report,
            position,
            last_header,
            segments: summaries,
            expected_seen,
            replayed_under_previous_keys,
        },
    )
}

/// Where damage was found: segment `index` of the list, its file, and the file
/// the error names (a missing segment names the file that should exist).
struct DamageAt<'a> {
    index: usize,
    path: &'a Path,
    named_file: &'a Path,
}

/// What the replay established before the damage (or the end of the log).
struct Progress {
    next_lsn: u64,
    report: RecoveryReport,
    position: Option<WriterPosition>,
    last_header: Option<SegmentHeader>,
    segments: Vec<SealedSegment>,
    expected_seen: Option<ChainHash>,
    replayed_under_previous_keys: bool,
}

impl Progress {
    /// The state recovery ends with if the log is kept up to `position`: the log's
    /// end, or the checkpoint's when the log does not reach it.
    fn head(&self, start: &ReplayStart) -> ChainHead {
        let log = self.position.as_ref().map(|p| ChainHead {
            lsn: p.last_lsn,
            hash: p.chain_head,
        });
        let ckpt = start.checkpoint.map(|(lsn, hash)| ChainHead { lsn, hash });
        match (log, ckpt) {
            (Some(l), Some(c)) if c.lsn > l.lsn => c,
            (Some(l), _) => l,
            (None, Some(c)) => c,
            (None, None) => ChainHead::GENESIS,
        }
    }

    fn into_recovered(self, head: ChainHead) -> Recovered {
        Recovered {
            position: self.position,
            last_header: self.last_header,
            segments: self.segments,
            report: self.report,
            start_new_segment: false,
            head,
            replayed_under_previous_keys: self.replayed_under_previous_keys,
        }
    }
}

/// Refuses a log that does not reach the anchored head or that has another hash
/// at its LSN. An anchor whose frame is gone (covered by the checkpoint and no
/// longer in the log) can be checked by LSN only, unless it is the checkpoint's.
fn check_expected(
    dir: &Path,
    start: &ReplayStart,
    head: ChainHead,
    seen: Option<ChainHash>,
    why_short: &str,
) -> Result<(), AedbError> {
    let Some(e) = start.expected_head else {
        return Ok(());
    };
    let refuse = |reason: String| AedbError::RolledBack {
        dir: dir.to_path_buf(),
        expected: Box::new(e),
        found: Box::new(head),
        reason,
    };
    if head.lsn < e.lsn {
        return Err(refuse(why_short.to_string()));
    }
    let at = seen
        .or_else(|| {
            start
                .checkpoint
                .filter(|(l, _)| *l == e.lsn)
                .map(|(_, h)| h)
        })
        .or((head.lsn == e.lsn).then_some(head.hash));
    match at {
        Some(h) if !crate::crypto::ct_eq(&h, &e.hash) => Err(refuse(format!(
            "the chain hash at LSN {} differs (a different history)",
            e.lsn
        ))),
        _ => Ok(()),
    }
}

/// The log ended without damage: check it against the checkpoint, the manifest
/// (listed segments, durable head) and the anchored head; strict refuses what is
/// missing, permissive reports it (and continues after the checkpoint when the
/// log does not reach it).
fn finish_clean(
    fs: &dyn Storage,
    dir: &Path,
    mode: RecoveryMode,
    start: &ReplayStart,
    segs: &[(u64, PathBuf)],
    progress: Progress,
) -> Result<Recovered, AedbError> {
    let strict = mode == RecoveryMode::Strict;
    let ckpt_lsn = start.checkpoint.map_or(0, |(l, _)| l);
    let head = progress.head(start);
    check_expected(
        dir,
        start,
        head,
        progress.expected_seen,
        "the log ends before the expected head (a stale copy of the directory, or lost frames)",
    )?;
    // Where the log ends: what an error about missing frames names.
    let (end_file, end_offset) = match &progress.position {
        Some(p) => (dir.join(segment_file_name(p.segment_index)), p.offset),
        None => (dir.to_path_buf(), 0),
    };
    let log_end = progress.position.as_ref().map(|p| p.last_lsn);
    let mut recovered = progress.into_recovered(head);

    if let Some(end) = log_end.filter(|&e| e < ckpt_lsn) {
        let reason = format!(
            "the log ends at LSN {end}, before the checkpoint's LSN {ckpt_lsn} (frames lost: a truncated, zeroed or stale segment)"
        );
        if strict {
            return Err(AedbError::corruption(&end_file, end_offset, reason));
        }
        let preserved = reset_to_checkpoint(fs, dir, segs, &mut recovered, start)?;
        let max = start.durable_head.map_or(0, |d| d.lsn);
        tracing::warn!(file = %end_file.display(), %reason, "permissive recovery: continuing after the checkpoint");
        recovered.report.dropped = Some(DroppedTail {
            file: end_file,
            offset: end_offset,
            reason,
            first_dropped_lsn: ckpt_lsn + 1,
            frames_dropped: max.saturating_sub(ckpt_lsn),
            max_dropped_lsn: max,
            preserved,
        });
        recovered.report.last_lsn = recovered.head.lsn;
        return Ok(recovered);
    }

    let last_found = recovered.position.as_ref().map(|p| p.segment_index);
    let missing: Vec<(u64, PathBuf)> = start
        .listed_segments
        .map(|(first, last)| {
            (first..=last)
                .filter(|i| !segs.iter().any(|(j, _)| j == i))
                .map(|i| (i, dir.join(segment_file_name(i))))
                .collect()
        })
        .unwrap_or_default();
    if let Some((_, m)) = missing.first()
        && strict
    {
        return Err(AedbError::corruption(
            m,
            0,
            "segment listed in the manifest is missing",
        ));
    }
    let behind = start.durable_head.filter(|d| head.lsn < d.lsn);
    let behind_reason = |d: ChainHead| {
        format!(
            "the log ends at LSN {}, but the manifest records LSN {} as durable: acknowledged commits are missing (a truncated or stale segment)",
            head.lsn, d.lsn
        )
    };
    if let Some(d) = behind
        && strict
    {
        return Err(AedbError::corruption(
            &end_file,
            end_offset,
            behind_reason(d),
        ));
    }
    // Permissive: lost segments at the end of the log, or acknowledged frames, are
    // reported as dropped (there is nothing left to preserve).
    let tail_missing = missing
        .iter()
        .find(|(i, _)| last_found.is_none_or(|l| *i > l));
    let dropped_at = match (tail_missing, behind) {
        (Some((_, m)), _) => Some((
            m.clone(),
            0,
            "segment listed in the manifest is missing".to_string(),
        )),
        (None, Some(d)) => Some((end_file, end_offset, behind_reason(d))),
        (None, None) => None,
    };
    if let Some((file, offset, reason)) = dropped_at {
        let max = behind.map_or(0, |d| d.lsn);
        tracing::warn!(file = %file.display(), %reason, "permissive recovery: the log is shorter than the manifest says");
        recovered.report.dropped = Some(DroppedTail {
            file,
            offset,
            reason,
            first_dropped_lsn: head.lsn + 1,
            frames_dropped: max.saturating_sub(head.lsn),
            max_dropped_lsn: max,
            preserved: Vec::new(),
        });
    }
    recovered.report.missing_segments = missing.into_iter().map(|(_, p)| p).collect();
    sync_tail(fs, dir, start, &mut recovered)?;
    recovered.report.last_lsn = recovered.head.lsn;
    Ok(recovered)
}

/// Frames recovered from the last segment may have reached only the page cache
/// before a crash; the writer counts them durable, so they are made durable first.
fn sync_tail(
    fs: &dyn Storage,
    dir: &Path,
    start: &ReplayStart,
    r: &mut Recovered,
) -> Result<(), AedbError> {
    if start.read_only || r.start_new_segment {
        return Ok(());
    }
    let Some(pos) = &r.position else {
        return Ok(());
    };
    let path = dir.join(segment_file_name(pos.segment_index));
    fs.open(&path, OpenMode::Write)
        .and_then(|f| f.sync_data())
        .map_err(|e| AedbError::io(&path, e))?;
    r.report.synced_tail = Some(path);
    Ok(())
}

/// Moves files into `dropped/` under one timestamp per recovery.
struct Preserver<'a> {
    fs: &'a dyn Storage,
    dir: PathBuf,
    stamp: u128,
}

impl<'a> Preserver<'a> {
    fn new(fs: &'a dyn Storage, dir: &Path) -> Result<Self, AedbError> {
        let preserve_dir = dir.join("dropped");
        fs.create_dir_all(&preserve_dir)
            .map_err(|e| AedbError::io(&preserve_dir, e))?;
        // Nanoseconds: two recoveries in the same second must not overwrite each
        // other's preserved copies.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(Self {
            fs,
            dir: preserve_dir,
            stamp,
        })
    }

    fn dest(&self, path: &Path) -> PathBuf {
        self.dir.join(format!("{}-{}", self.stamp, file_name(path)))
    }

    fn copy(&self, path: &Path) -> Result<PathBuf, AedbError> {
        let dest = self.dest(path);
        let bytes = self.fs.read(path).map_err(|e| AedbError::io(path, e))?;
        self.fs
            .write(&dest, &bytes)
            .map_err(|e| AedbError::io(&dest, e))?;
        Ok(dest)
    }

    fn move_away(&self, path: &Path) -> Result<PathBuf, AedbError> {
        let dest = self.dest(path);
        self.fs
            .rename(path, &dest)
            .map_err(|e| AedbError::io(path, e))?;
        Ok(dest)
    }
}

/// Permissive: the kept log ends below the checkpoint, so it cannot continue at
/// the checkpoint's LSN. Every segment still here holds only frames the checkpoint
/// covers: they move to `dropped/`, and the writer starts a new segment after the
/// highest index ever used (indexes are never reused: backups name segments by
/// index), from the checkpoint's LSN and chain head.
fn reset_to_checkpoint(
    fs: &dyn Storage,
    dir: &Path,
    segs: &[(u64, PathBuf)],
    r: &mut Recovered,
    start: &ReplayStart,
) -> Result<Vec<PathBuf>, AedbError> {
    let Some((lsn, hash)) = start.checkpoint else {
        return Ok(Vec::new());
    };
    let preserver = Preserver::new(fs, dir)?;
    let mut preserved = Vec::new();
    for (_, seg) in list_segments(fs, dir)? {
        preserved.push(preserver.move_away(&seg)?);
    }
    sync_dir(fs, dir)?;
    let highest = segs.last().map_or(0, |(i, _)| *i);
    r.position = Some(WriterPosition {
        segment_index: highest,
        offset: SEGMENT_HEADER_LEN as u64,
        last_lsn: lsn,
        chain_head: hash,
    });
    r.start_new_segment = true;
    r.segments.clear();
    r.report.segments = 0;
    r.head = ChainHead { lsn, hash };
    Ok(preserved)
}

/// Strict: the error. Permissive: keep everything before the damage in segment
/// `at.index`, preserve copies of what is dropped, and continue from the last
/// good frame (or after the checkpoint, when the damage is at or below it).
// The storage joined the existing seven; grouping them would only rename them.
#[allow(clippy::too_many_arguments)]
fn finish_damaged(
    fs: &dyn Storage,
    dir: &Path,
    mode: RecoveryMode,
    start: &ReplayStart,
    segs: &[(u64, PathBuf)],
    at: DamageAt<'_>,
    damage: Damage,
    progress: Progress,
) -> Result<Recovered, AedbError> {
    let DamageAt {
        index: i,
        path,
        named_file,
    } = at;
    if mode == RecoveryMode::Strict {
        return Err(AedbError::corruption(
            named_file,
            damage.offset,
            damage.reason,
        ));
    }
    let ckpt_lsn = start.checkpoint.map_or(0, |(l, _)| l);
    let head = progress.head(start);
    // An anchored head beyond what would be kept: refuse before changing anything.
    check_expected(
        dir,
        start,
        head,
        progress.expected_seen,
        &format!(
            "permissive recovery would keep the log only up to LSN {} because of damage in {} at byte {}: {}",
            head.lsn,
            named_file.display(),
            damage.offset,
            damage.reason
        ),
    )?;
    let next_lsn = progress.next_lsn;
    let mut recovered = progress.into_recovered(head);
    let preserver = Preserver::new(fs, dir)?;
    let mut preserved = Vec::new();
    let mut frames_dropped = 0;
    let mut max_dropped_lsn = 0;

    // Does the damage sit inside a segment we keep the front of?
    let keep_front = recovered
        .position
        .as_ref()
        .is_some_and(|p| p.segment_index == segs[i].0 && damage.offset > 0);
    let first_moved = if keep_front { i + 1 } else { i };
    if keep_front {
        let buf = fs.read(path).map_err(|e| AedbError::io(path, e))?;
        let (n, max) = match damage.next_valid.filter(|&p| p > damage.offset as usize) {
            Some(p) => count_frames_best_effort(&buf, p),
            None => (0, 0),
        };
        frames_dropped += n;
        max_dropped_lsn = max_dropped_lsn.max(max);
        preserved.push(preserver.copy(path)?);
        zero_from(fs, path, damage.offset, buf.len() as u64)?;
    }
    for (_, seg) in &segs[first_moved..] {
        if let Ok(buf) = fs.read(seg) {
            let (n, max) = count_frames_best_effort(&buf, SEGMENT_HEADER_LEN);
            frames_dropped += n;
            max_dropped_lsn = max_dropped_lsn.max(max);
        }
        preserved.push(preserver.move_away(seg)?);
    }
    sync_dir(fs, dir)?;
    recovered.report.segments = first_moved;
    // The kept log ends below the checkpoint: the frames up to it are in the
    // checkpoint, and the log continues after it in a new segment.
    if recovered
        .position
        .as_ref()
        .is_none_or(|p| p.last_lsn < ckpt_lsn)
        && start.checkpoint.is_some()
    {
        preserved.extend(reset_to_checkpoint(fs, dir, segs, &mut recovered, start)?);
    }
    if let Some(d) = start.durable_head {
        max_dropped_lsn = max_dropped_lsn.max(d.lsn);
    }
    let first_dropped_lsn = next_lsn.max(ckpt_lsn + 1);
    tracing::warn!(file = %named_file.display(), offset = damage.offset, reason = %damage.reason,
        first_dropped_lsn, frames_dropped, "permissive recovery dropped the WAL after damage");
    recovered.report.dropped = Some(DroppedTail {
        file: named_file.to_path_buf(),
        offset: damage.offset,
        reason: damage.reason,
        first_dropped_lsn,
        frames_dropped,
        max_dropped_lsn,
        preserved,
    });
    sync_tail(fs, dir, start, &mut recovered)?;
    recovered.report.last_lsn = recovered.head.lsn;
    Ok(recovered)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Overwrites `[from, to)` with zeros and fsyncs, so the region reads as unwritten.
fn zero_from(fs: &dyn Storage, path: &Path, from: u64, to: u64) -> Result<(), AedbError> {
    if from >= to {
        return Ok(());
    }
    let f = fs
        .open(path, OpenMode::Write)
        .map_err(|e| AedbError::io(path, e))?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)
            .map_err(|e| AedbError::io(path, e))?;
        at += n as u64;
    }
    f.sync_data().map_err(|e| AedbError::io(path, e))
}
