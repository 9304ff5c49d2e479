//! Reads every segment in order, replays good frames, and decides what to do with
//! damage: a torn final write is repaired in both modes; anything else stops strict
//! recovery with the file and offset, while permissive recovery keeps the longest
//! valid prefix, moves what it drops to `dropped/`, and reports it.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{
    ChainHash, SEGMENT_HEADER_LEN, SegmentHeader, parse_segment_file_name, segment_file_name,
};
use super::keys::{WalKeys, decrypt_frame};
use super::reader::{Damage, count_frames_best_effort, scan_frames};
use super::writer::{SealedSegment, WriterPosition, sync_dir};
use crate::config::RecoveryMode;
use crate::error::AedbError;

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
    /// First LSN that is no longer in the log.
    pub first_dropped_lsn: u64,
    /// Frames with a valid checksum found after the damage (best effort).
    pub frames_dropped: u64,
    /// Highest LSN seen among the dropped frames and segments (0 if none readable).
    pub max_dropped_lsn: u64,
    /// Copies of the damaged segment and every later segment, kept for forensics.
    pub preserved: Vec<PathBuf>,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub frames_replayed: u64,
    pub last_lsn: u64,
    pub torn_tail: Option<TornTail>,
    pub dropped: Option<DroppedTail>,
}

pub(crate) struct Recovered {
    pub position: Option<WriterPosition>,
    /// Header of the segment `position` is in.
    pub last_header: Option<SegmentHeader>,
    /// Every segment kept, in order, with its LSN range and final chain hash.
    pub segments: Vec<SealedSegment>,
    pub report: RecoveryReport,
}

/// Lists the segment files of `dir` in index order, removing leftovers of
/// interrupted segment creation.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AedbError> {
    let mut segs = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| AedbError::io(dir, e))? {
        let entry = entry.map_err(|e| AedbError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(index) = parse_segment_file_name(name) {
            segs.push((index, entry.path()));
        }
    }
    segs.sort();
    Ok(segs)
}

pub(crate) fn remove_leftovers(dir: &Path) -> Result<(), AedbError> {
    for entry in fs::read_dir(dir).map_err(|e| AedbError::io(dir, e))? {
        let entry = entry.map_err(|e| AedbError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") || name == "wal-next.prep" {
            let p = entry.path();
            fs::remove_file(&p).map_err(|e| AedbError::io(&p, e))?;
        }
    }
    Ok(())
}

/// True when the segment file at `path` has a valid header and no frame.
pub(crate) fn segment_is_empty(path: &Path) -> bool {
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    let mut b = vec![0u8; SEGMENT_HEADER_LEN + super::format::FRAME_HEADER_LEN];
    f.read_exact_at(&mut b, 0).is_ok()
        && SegmentHeader::decode(&b).is_ok()
        && b[SEGMENT_HEADER_LEN..].iter().all(|&x| x == 0)
}

/// Where replay starts: from the beginning of the log, or after a checkpoint whose
/// LSN and chain head the log must reproduce.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ReplayStart {
    pub checkpoint: Option<(u64, ChainHash)>,
    /// Inspection: change nothing on disk (a torn tail is reported, not cut off).
    pub read_only: bool,
}

/// Replays the log, calling `apply` with each decrypted frame after the checkpoint,
/// in LSN order.
pub(crate) fn recover(
    dir: &Path,
    mode: RecoveryMode,
    keys: &WalKeys,
    start: ReplayStart,
    mut apply: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<Recovered, AedbError> {
    if !start.read_only {
        remove_leftovers(dir)?;
    }
    let segs = list_segments(dir)?;
    let ckpt_lsn = start.checkpoint.map_or(0, |(l, _)| l);
    let mut report = RecoveryReport {
        segments: segs.len(),
        last_lsn: ckpt_lsn,
        ..RecoveryReport::default()
    };
    if segs.is_empty() {
        return Ok(Recovered {
            position: None,
            last_header: None,
            segments: Vec::new(),
            report,
        });
    }

    // Reported as the first dropped LSN if the very first header is unreadable.
    let mut next_lsn = ckpt_lsn + 1;
    let mut head = [0u8; 32];
    let mut position: Option<WriterPosition> = None;
    let mut last_header = None;
    let mut summaries: Vec<SealedSegment> = Vec::new();
    // Every damage exit hands the progress so far to `finish_damaged`.
    macro_rules! damaged {
        ($i:expr, $path:expr, $damage:expr, $named:expr) => {
            return finish_damaged(
                dir,
                mode,
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
        let buf = fs::read(path).map_err(|e| AedbError::io(path, e))?;
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
        let cipher = keys
            .reader_cipher(&header)
            .map_err(|reason| AedbError::KeyMismatch {
                file: path.clone(),
                reason,
            })?;

        let mut replayed = 0u64;
        let outcome = scan_frames(
            keys.chain.as_ref(),
            &buf,
            SEGMENT_HEADER_LEN,
            next_lsn,
            head,
            |lsn, hash, payload| {
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
                replayed += 1;
                match &cipher {
                    Some(c) => {
                        let plain = decrypt_frame(c, lsn, payload).map_err(|e| e.to_string())?;
                        apply(lsn, &plain)
                    }
                    None => apply(lsn, payload),
                }
            },
        );
        report.frames_replayed += replayed;
        next_lsn = outcome.last_lsn + 1;
        head = outcome.chain_head;
        report.last_lsn = report.last_lsn.max(outcome.last_lsn);
        position = Some(WriterPosition {
            segment_index: *index,
            offset: outcome.end_offset,
            last_lsn: outcome.last_lsn,
            chain_head: outcome.chain_head,
        });
        summaries.push(SealedSegment {
            index: *index,
            first_lsn: header.first_lsn,
            last_lsn: outcome.last_lsn,
            end_hash: outcome.chain_head,
        });
        last_header = Some(header);
        if let Some(damage) = outcome.damage {
            if is_last && damage.is_torn() {
                // Torn final write: never acknowledged, cut off in both modes.
                if !start.read_only {
                    zero_from(path, damage.offset, buf.len() as u64)?;
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
            damaged!(i, path, damage, path);
        }
    }
    if report.last_lsn < ckpt_lsn {
        return Err(AedbError::corruption(
            dir,
            0,
            format!(
                "the log ends at LSN {} before the checkpoint's LSN {ckpt_lsn}",
                report.last_lsn
            ),
        ));
    }
    Ok(Recovered {
        position,
        last_header,
        segments: summaries,
        report,
    })
}

/// Where damage was found: segment `index` of the list, its file, and the file
/// the error names (a missing segment names the file that should exist).
struct DamageAt<'a> {
    index: usize,
    path: &'a Path,
    named_file: &'a Path,
}

/// What the replay established before the damage.
struct Progress {
    next_lsn: u64,
    report: RecoveryReport,
    position: Option<WriterPosition>,
    last_header: Option<SegmentHeader>,
    segments: Vec<SealedSegment>,
}

/// Strict: the error. Permissive: keep everything before the damage in segment
/// `at.index`, preserve copies of what is dropped, and continue from the last
/// good frame.
fn finish_damaged(
    dir: &Path,
    mode: RecoveryMode,
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
    let Progress {
        next_lsn,
        mut report,
        position,
        last_header,
        segments,
    } = progress;
    if mode == RecoveryMode::Strict {
        return Err(AedbError::corruption(
            named_file,
            damage.offset,
            damage.reason,
        ));
    }
    let preserve_dir = dir.join("dropped");
    fs::create_dir_all(&preserve_dir).map_err(|e| AedbError::io(&preserve_dir, e))?;
    // Nanoseconds: two recoveries in the same second must not overwrite each
    // other's preserved copies.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut preserved = Vec::new();
    let mut frames_dropped = 0;
    let mut max_dropped_lsn = 0;

    // Does the damage sit inside a segment we keep the front of?
    let keep_front = position
        .as_ref()
        .is_some_and(|p| p.segment_index == segs[i].0 && damage.offset > 0);
    let first_moved = if keep_front { i + 1 } else { i };
    if keep_front {
        let buf = fs::read(path).map_err(|e| AedbError::io(path, e))?;
        let (n, max) = match damage.next_valid.filter(|&p| p > damage.offset as usize) {
            Some(p) => count_frames_best_effort(&buf, p),
            None => (0, 0),
        };
        frames_dropped += n;
        max_dropped_lsn = max_dropped_lsn.max(max);
        let copy = preserve_dir.join(format!("{stamp}-{}", file_name(path)));
        fs::copy(path, &copy).map_err(|e| AedbError::io(&copy, e))?;
        preserved.push(copy);
        zero_from(path, damage.offset, buf.len() as u64)?;
    }
    for (_, seg) in &segs[first_moved..] {
        if let Ok(buf) = fs::read(seg) {
            let (n, max) = count_frames_best_effort(&buf, SEGMENT_HEADER_LEN);
            frames_dropped += n;
            max_dropped_lsn = max_dropped_lsn.max(max);
        }
        let dest = preserve_dir.join(format!("{stamp}-{}", file_name(seg)));
        fs::rename(seg, &dest).map_err(|e| AedbError::io(seg, e))?;
        preserved.push(dest);
    }
    sync_dir(dir)?;
    tracing::warn!(file = %named_file.display(), offset = damage.offset, reason = %damage.reason,
        first_dropped_lsn = next_lsn, frames_dropped, "permissive recovery dropped the WAL after damage");
    report.dropped = Some(DroppedTail {
        file: named_file.to_path_buf(),
        offset: damage.offset,
        reason: damage.reason,
        first_dropped_lsn: next_lsn,
        frames_dropped,
        max_dropped_lsn,
        preserved,
    });
    report.segments = first_moved;
    Ok(Recovered {
        position,
        last_header,
        segments,
        report,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Overwrites `[from, to)` with zeros and fsyncs, so the region reads as unwritten.
fn zero_from(path: &Path, from: u64, to: u64) -> Result<(), AedbError> {
    if from >= to {
        return Ok(());
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
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
