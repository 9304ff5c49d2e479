//! Retention (`ARAGORA_AUDIT_RETENTION`): entries older than the period are
//! removed from the live log, but only those a signed export holds. Each
//! entry removed is first found in a segment of the export directory whose
//! signature (under this server's export key) and chain verify, with the same
//! sequence number, id and hash; the first entry that is not stops the run,
//! and the reason is logged and returned.
//!
//! Each batch removes its entries, takes them out of the counts, and moves the
//! chain's anchor (the last removed entry: its seq, id and hash) in one atomic
//! write, so the live chain always verifies from its anchor
//! (`AuditLog::verify`) and the anchor can be checked against the export
//! (`aragora audit verify --export DIR`). The access index keeps its records:
//! it says who read what, for as long as the export holds the evidence.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::export::{
    ARAGORA_SOURCE, ExportError, ExportSigner, Payload, Segment, check_signature, read_segment,
    verify_aragora_entries,
};
use super::{ANCHOR_ID, AuditEntry, AuditLog, ChainAnchor, GENESIS, counts, entry_hash};
use crate::clock::format_us;
use crate::store::{Collection, Durability, Expect, ListQuery, WriteOp, decode};

/// Entries one retention batch removes (one atomic write).
pub const RETENTION_BATCH: usize = 1_000;
/// Entries one run removes at most; the next run continues.
pub const MAX_REMOVED_PER_RUN: u64 = 200_000;
/// Times a batch is rebuilt after losing to a concurrent append.
const CONFLICT_RETRIES: usize = 16;

/// What one retention run did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetentionReport {
    /// Entries before this time were due for removal.
    pub cutoff: String,
    pub removed: u64,
    /// The anchor the live chain now starts from.
    pub anchor: Option<ChainAnchor>,
    /// Why entries older than the period are still in the live log (none:
    /// every due entry was removed, or this run reached its bound).
    pub kept_reason: Option<String>,
}

/// The aragora segments of an export directory, by first sequence number,
/// read (and verified) only when an entry they cover is to be removed.
struct Exported {
    dir: PathBuf,
    trusted: Vec<String>,
    /// first seq -> (last seq, file)
    files: BTreeMap<u64, (u64, PathBuf)>,
    /// The segment read last: (first seq, its entries).
    loaded: Option<(u64, Vec<AuditEntry>)>,
}

impl Exported {
    fn open(dir: &Path, signer: &ExportSigner) -> Result<Self, ExportError> {
        let read = std::fs::read_dir(dir)
            .map_err(|e| ExportError::Io(format!("reading {}: {e}", dir.display())))?;
        let mut files = BTreeMap::new();
        for entry in read {
            let entry =
                entry.map_err(|e| ExportError::Io(format!("reading {}: {e}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().to_string();
            // `aragora-{first:020}-{last:020}.json`, as the export names them.
            let Some(range) = name
                .strip_prefix(&format!("{ARAGORA_SOURCE}-"))
                .and_then(|r| r.strip_suffix(".json"))
            else {
                continue;
            };
            let Some((first, last)) = range.split_once('-') else {
                continue;
            };
            if let (Ok(first), Ok(last)) = (first.parse::<u64>(), last.parse::<u64>()) {
                files.insert(first, (last, entry.path()));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            trusted: vec![signer.public_key_hex()],
            files,
            loaded: None,
        })
    }

    /// The exported entry at `seq`, from a segment that verifies; `Err` says
    /// why there is none.
    fn entry(&mut self, seq: u64) -> Result<&AuditEntry, String> {
        let hit = self
            .loaded
            .as_ref()
            .is_some_and(|(first, entries)| seq >= *first && seq < first + entries.len() as u64);
        if !hit {
            let (first, (last, path)) = self
                .files
                .range(..=seq)
                .next_back()
                .filter(|(_, (last, _))| seq <= *last)
                .ok_or_else(|| format!("no segment in {} holds seq {seq}", self.dir.display()))?;
            let seg: Segment = read_segment(path).map_err(|e| e.to_string())?;
            check_signature(&seg, Some(&self.trusted))
                .map_err(|p| format!("{}: {p}", path.display()))?;
            let Payload::Aragora(entries) = seg.payload else {
                return Err(format!("{}: not an aragora segment", path.display()));
            };
            verify_aragora_entries(&entries, &seg.prev_hash)
                .map_err(|p| format!("{}: {p}", path.display()))?;
            let bounds_ok = seg.first == *first
                && seg.last == *last
                && entries.first().map(|e| e.seq) == Some(*first)
                && entries.last().map(|e| e.seq) == Some(*last);
            if !bounds_ok {
                return Err(format!(
                    "{}: its name, bounds and entries disagree",
                    path.display()
                ));
            }
            self.loaded = Some((*first, entries));
        }
        let (first, entries) = self
            .loaded
            .as_ref()
            .ok_or_else(|| "no segment loaded".to_string())?;
        usize::try_from(seq - first)
            .ok()
            .and_then(|i| entries.get(i))
            .ok_or_else(|| format!("seq {seq} is missing from its segment"))
    }
}

/// Removes live entries older than `period` that the export in `dir` holds.
pub fn apply(
    log: &AuditLog,
    dir: &Path,
    signer: &ExportSigner,
    period: Duration,
) -> Result<RetentionReport, ExportError> {
    let now = (log.now)();
    let period_us = i64::try_from(period.as_micros()).unwrap_or(i64::MAX);
    let cutoff = now.saturating_sub(period_us);
    let cutoff_key = counts::time_key(cutoff);
    let mut exported = Exported::open(dir, signer)?;
    let read_err = |e: crate::store::StoreError| ExportError::Read(e.to_string());
    let mut report = RetentionReport {
        cutoff: format_us(cutoff),
        removed: 0,
        anchor: None,
        kept_reason: None,
    };
    let mut conflicts = 0;
    'run: while report.removed < MAX_REMOVED_PER_RUN {
        let (anchor_version, anchor) = match log
            .load_anchor()
            .map_err(|e| ExportError::Read(e.to_string()))?
        {
            Some((v, a)) => (v, Some(a)),
            None => (0, None),
        };
        report.anchor = anchor.clone();
        let q = ListQuery {
            start: anchor
                .as_ref()
                .map_or(Bound::Unbounded, |a| Bound::Excluded(a.id.as_str())),
            end: Bound::Excluded(cutoff_key.as_str()),
            reverse: false,
            limit: RETENTION_BATCH,
        };
        let page = log.store.list(Collection::Audit, &q).map_err(read_err)?;
        if page.is_empty() {
            break;
        }
        let (mut prev_seq, mut prev_hash) = anchor
            .as_ref()
            .map_or((0, GENESIS.to_string()), |a| (a.seq, a.hash.clone()));
        let mut removed: Vec<(AuditEntry, u64)> = Vec::with_capacity(page.len());
        for (id, record) in &page {
            let e: AuditEntry = decode(Collection::Audit, id, record).map_err(read_err)?;
            if e.seq != prev_seq + 1 || e.prev_hash != prev_hash {
                report.kept_reason = Some(format!(
                    "entry seq {} ({id}) does not continue the chain from seq {prev_seq}: \
                     run `aragora audit verify`; nothing past it is removed",
                    e.seq
                ));
                break;
            }
            let covered = match exported.entry(e.seq) {
                Ok(x) if x.id == e.id && x.hash == e.hash => Ok(()),
                Ok(x) => Err(format!(
                    "the export holds seq {} as {} with hash {}, not the live {id} with hash {}",
                    e.seq, x.id, x.hash, e.hash
                )),
                Err(why) => Err(why),
            };
            if let Err(why) = covered {
                report.kept_reason = Some(format!(
                    "entry seq {} ({id}) is older than the retention period but is not in a \
                     verified export ({why}); run `aragora audit export --out {}`",
                    e.seq,
                    dir.display()
                ));
                break;
            }
            if entry_hash(&e) != e.hash {
                report.kept_reason = Some(format!(
                    "entry seq {} ({id}) was altered after it was written (its content does not \
                     match its hash): run `aragora audit verify`; nothing past it is removed",
                    e.seq
                ));
                break;
            }
            prev_seq = e.seq;
            prev_hash = e.hash.clone();
            removed.push((e, record.version));
        }
        let Some((last, _)) = removed.last() else {
            break;
        };
        let new_anchor = ChainAnchor {
            seq: last.seq,
            hash: last.hash.clone(),
            id: last.id.clone(),
            timestamp_us: last.timestamp_us,
            export_dir: dir.display().to_string(),
            removed: anchor.as_ref().map_or(0, |a| a.removed) + removed.len() as u64,
            updated_at: format_us(now),
        };
        let mut batch: Vec<WriteOp> = removed
            .iter()
            .map(|(e, version)| {
                WriteOp::delete(Collection::Audit, e.id.clone(), Expect::Version(*version))
            })
            .collect();
        let deltas = counts::deltas(removed.iter().map(|(e, _)| e));
        let keys: Vec<(Collection, &str)> = deltas
            .keys()
            .map(|id| (Collection::AuditCounts, id.as_str()))
            .collect();
        let current = log.store.get_many(&keys).map_err(read_err)?;
        batch.extend(counts::apply_ops(&deltas, &current, true).map_err(read_err)?);
        let expect = if anchor_version == 0 {
            Expect::Absent
        } else {
            Expect::Version(anchor_version)
        };
        batch.push(
            WriteOp::put_json(Collection::AuditChain, ANCHOR_ID, &new_anchor, expect)
                .map_err(read_err)?,
        );
        match log.store.write(batch, Durability::Durable) {
            Ok(_) => {
                report.removed += removed.len() as u64;
                report.anchor = Some(new_anchor);
                conflicts = 0;
            }
            Err(e) if e.is_conflict() && conflicts < CONFLICT_RETRIES => {
                // An append changed a count this batch also changes: re-read.
                conflicts += 1;
                continue 'run;
            }
            Err(e) => return Err(ExportError::Read(format!("removing audit entries: {e}"))),
        }
        if report.kept_reason.is_some() || removed.len() < page.len() {
            break;
        }
    }
    match &report.kept_reason {
        Some(why) => tracing::warn!(
            removed = report.removed,
            cutoff = %report.cutoff,
            reason = %why,
            "audit retention kept entries older than the period"
        ),
        None => tracing::info!(
            removed = report.removed,
            cutoff = %report.cutoff,
            anchor_seq = report.anchor.as_ref().map(|a| a.seq),
            "audit retention"
        ),
    }
    Ok(report)
}
