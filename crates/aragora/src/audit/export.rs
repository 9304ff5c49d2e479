//! Audit export to immutable storage: `aragora audit export --out DIR` (and the
//! schedule `ARAGORA_AUDIT_EXPORT_DIR`) writes what is new since the last export
//! in DIR as signed, chain-linked segment files; `aragora audit verify --export
//! DIR` checks a set of them against each other and against the live chains.
//!
//! Three chains are exported: aragora's audit log and the engine's two audit
//! tables (aedb `authz_audit` and `assertion_audit`). A segment holds up to
//! [`MAX_SEGMENT_ENTRIES`] consecutive entries of one chain, the hash that
//! precedes its first entry (`prev_hash`) and the chain head it ends at
//! (`end_hash`), so consecutive segments link exactly like the entries do. Each
//! segment is signed with Ed25519 under a key derived (HKDF) from
//! the master key (`ARAGORA_ENCRYPTION_KEY`, or the key given to `aragora unseal`):
//! its public key is in the segment and printed by
//! every export, so an auditor can check a copy with the public key alone.
//!
//! Files are written once (temp file, fsync, read-only, hard link into place —
//! which refuses to replace an existing name — and a directory fsync) and never
//! rewritten. An export resumes after the newest segment of each chain in DIR,
//! after checking that segment's signature and that the live chain still links
//! to it: a chain that no longer does is reported, not exported over.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::Bound;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use super::{AuditEntry, AuditLog, GENESIS, entry_hash};
use crate::clock::{format_us, now_us};
use crate::store::{Collection, ListQuery, decode};

/// The format tag of every segment file.
pub const SEGMENT_FORMAT: &str = "aragora-audit-export/1";
/// Entries of one chain per segment file (a backlog becomes several files).
pub const MAX_SEGMENT_ENTRIES: usize = 10_000;
/// Segment files one verification reads (a directory with more is refused
/// rather than read without bound; export to a fresh directory per period).
pub const MAX_SEGMENT_FILES: usize = 100_000;
/// The largest segment file read back.
const MAX_SEGMENT_BYTES: u64 = 256 << 20;
const SIGNING_INFO: &[u8] = b"aragora/audit-export-signing/v1";
/// The source name of aragora's own chain.
pub const ARAGORA_SOURCE: &str = "aragora";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("audit export: {0}")]
    Io(String),
    #[error("audit export: reading the audit log: {0}")]
    Read(String),
    #[error(
        "audit export: segments are signed with a key derived from the master key, and there is none: {0}"
    )]
    NoSigningKey(String),
    #[error("audit export: {0}")]
    Invalid(String),
}

impl From<ExportError> for crate::error::ServiceError {
    fn from(e: ExportError) -> Self {
        match e {
            ExportError::Invalid(m) => crate::error::ServiceError::BadRequest(m),
            ExportError::NoSigningKey(_) => crate::error::ServiceError::Unavailable(e.to_string()),
            other => crate::error::ServiceError::Backend(other.to_string()),
        }
    }
}

/// What a segment carries: aragora's entries, or rows of an engine table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    Aragora(Vec<AuditEntry>),
    Aedb(aedb::AuditExport),
}

/// One segment file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub format: String,
    /// `aragora`, `aedb.authz_audit` or `aedb.assertion_audit`.
    pub source: String,
    /// Sequence (aragora) or row id (aedb) of the first and last entry.
    pub first: u64,
    pub last: u64,
    /// The chain hash before `first` (all zeros before the first entry).
    pub prev_hash: String,
    /// The chain head this segment ends at: the hash of `last`.
    pub end_hash: String,
    /// aragora: the id of `last` (an export resumes after it).
    #[serde(default)]
    pub end_id: Option<String>,
    pub exported_at: String,
    pub payload: Payload,
    /// Ed25519 public key (hex) the signature verifies under.
    pub public_key: String,
    /// Ed25519 signature (hex) of the segment serialized with this field empty.
    pub signature: String,
}

impl Segment {
    fn signed_bytes(&self) -> Result<Vec<u8>, ExportError> {
        let mut unsigned = self.clone();
        unsigned.signature = String::new();
        serde_json::to_vec(&unsigned).map_err(|e| ExportError::Io(e.to_string()))
    }

    fn file_name(&self) -> String {
        format!("{}-{:020}-{:020}.json", self.source, self.first, self.last)
    }
}

/// Signs segments; derived from the master key so no other secret needs
/// managing, and verifiable by anyone holding the public key.
pub struct ExportSigner {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for ExportSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExportSigner({})", self.public_key_hex())
    }
}

impl ExportSigner {
    /// The signer of the key ring's current master key.
    pub fn from_key_ring(ring: &crate::encryption::KeyRing) -> Result<Self, ExportError> {
        let seed = ring
            .derive_from_master(SIGNING_INFO)
            .map_err(|e| ExportError::NoSigningKey(e.to_string()))?;
        Self::from_seed(&seed)
    }

    /// The signer of a master key given as bytes (tests, and verification of
    /// exports made under a previous master key).
    pub fn from_master_key(master: &[u8; 32]) -> Result<Self, ExportError> {
        let seed = crate::crypto::kdf::derive_subkey(master, b"aragora", SIGNING_INFO)
            .map_err(|e| ExportError::Io(format!("deriving the signing key: {e}")))?;
        Self::from_seed(&seed)
    }

    fn from_seed(seed: &[u8; 32]) -> Result<Self, ExportError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
            .map_err(|_| ExportError::Io("the derived signing key was refused".into()))?;
        Ok(Self { pair })
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    fn sign(&self, segment: &mut Segment) -> Result<(), ExportError> {
        segment.public_key = self.public_key_hex();
        segment.signature = String::new();
        let bytes = segment.signed_bytes()?;
        segment.signature = hex::encode(self.pair.sign(&bytes).as_ref());
        Ok(())
    }
}

/// What one export wrote.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportReport {
    pub dir: String,
    pub public_key: String,
    /// Segment files written, in order.
    pub written: Vec<WrittenSegment>,
    /// Per chain: the head the export directory now ends at.
    pub heads: Vec<ChainPosition>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WrittenSegment {
    pub file: String,
    pub source: String,
    pub first: u64,
    pub last: u64,
    pub entries: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChainPosition {
    pub source: String,
    pub last: u64,
    pub end_hash: String,
    /// Verification only: whether the live chain has `end_hash` at `last`
    /// (None: not checked).
    #[serde(default)]
    pub matches_live: Option<bool>,
}

/// What `aragora audit verify --export DIR` found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportVerifyReport {
    pub ok: bool,
    pub dir: String,
    pub segments: usize,
    pub entries: u64,
    /// Public keys the segments were signed with (each one trusted).
    pub public_keys: Vec<String>,
    pub chains: Vec<ChainPosition>,
    pub problems: Vec<String>,
    /// With the live log, once retention removed its beginning: its anchor
    /// and whether this export holds that entry with that hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_in_export: Option<AnchorCheck>,
}

/// The live chain's retention anchor, checked against an export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnchorCheck {
    pub seq: u64,
    pub hash: String,
    /// The directory retention removed the entries after finding them in.
    pub export_dir: String,
    /// Whether this export's entry at `seq` has the anchor's hash and id
    /// (None: this export does not hold `seq`).
    pub matches_export: Option<bool>,
}

/// Exports what is new since the newest segment of each chain in `dir`.
/// `since_us`: for a chain with no segment in `dir` yet, start at its first
/// entry at or after this time (aragora) instead of its beginning.
pub fn export(
    log: &AuditLog,
    signer: &ExportSigner,
    dir: &Path,
    since_us: Option<i64>,
) -> Result<ExportReport, ExportError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ExportError::Io(format!("creating {}: {e}", dir.display())))?;
    let existing = read_dir_segments(dir)?;
    let mut newest: BTreeMap<String, Segment> = BTreeMap::new();
    for (path, seg) in existing {
        check_signature(&seg, None).map_err(|p| {
            ExportError::Invalid(format!(
                "{}: {p}; this directory is not a trustworthy place to continue",
                path.display()
            ))
        })?;
        let replace = newest
            .get(&seg.source)
            .is_none_or(|cur: &Segment| seg.last > cur.last);
        if replace {
            newest.insert(seg.source.clone(), seg);
        }
    }
    // Continuing a chain the live log no longer holds would link new segments
    // to a history that was rewritten: refuse, and leave the evidence.
    let anchor = log.anchor().map_err(|e| ExportError::Read(e.to_string()))?;
    for seg in newest.values() {
        if seg.source == ARAGORA_SOURCE
            && let Some(a) = anchor.as_ref().filter(|a| a.seq > seg.last)
        {
            return Err(ExportError::Invalid(format!(
                "{} ends at seq {}, but retention removed the live log up to seq {} \
                 (exported to {}): export to a new directory (with --since) or continue {}",
                dir.display(),
                seg.last,
                a.seq,
                a.export_dir,
                a.export_dir
            )));
        }
        if !live_has(log, seg)? {
            return Err(ExportError::Invalid(format!(
                "the live {} chain no longer holds the exported head (entry {} with hash {}): \
                 it was altered after the last export; run `aragora audit verify --export {}` \
                 and keep this directory as evidence",
                seg.source,
                seg.last,
                seg.end_hash,
                dir.display()
            )));
        }
    }
    let mut report = ExportReport {
        dir: dir.display().to_string(),
        public_key: signer.public_key_hex(),
        ..ExportReport::default()
    };
    let now = format_us(now_us());

    // aragora's own chain.
    let resume = newest.get(ARAGORA_SOURCE);
    let mut prev = resume.map(|seg| (seg.last, seg.end_hash.clone(), seg.end_id.clone()));
    let mut start: Bound<String> = match (&prev, since_us) {
        (Some((_, _, Some(id))), _) => Bound::Excluded(id.clone()),
        (Some((_, _, None)), _) => {
            return Err(ExportError::Invalid(
                "the newest aragora segment has no end_id to resume after".into(),
            ));
        }
        (None, Some(t)) => Bound::Included(format!("{:016x}", t.max(0))),
        (None, None) => Bound::Unbounded,
    };
    loop {
        let q = ListQuery {
            start: match &start {
                Bound::Included(s) => Bound::Included(s.as_str()),
                Bound::Excluded(s) => Bound::Excluded(s.as_str()),
                Bound::Unbounded => Bound::Unbounded,
            },
            end: Bound::Unbounded,
            reverse: false,
            limit: MAX_SEGMENT_ENTRIES,
        };
        let page = log
            .store
            .list(Collection::Audit, &q)
            .map_err(|e| ExportError::Read(e.to_string()))?;
        if page.is_empty() {
            break;
        }
        let n = page.len();
        let mut entries = Vec::with_capacity(n);
        for (id, record) in &page {
            let e: AuditEntry = decode(Collection::Audit, id, record)
                .map_err(|e| ExportError::Read(e.to_string()))?;
            entries.push(e);
        }
        let first = &entries[0];
        let prev_hash = match &prev {
            Some((last, hash, _)) => {
                if first.seq != last + 1 || first.prev_hash != *hash {
                    return Err(ExportError::Invalid(format!(
                        "the live audit log does not continue the exported chain: seq {} \
                         (prev hash {}) follows exported seq {last} (hash {hash}); run \
                         `aragora audit verify` and keep this directory as evidence",
                        first.seq, first.prev_hash
                    )));
                }
                hash.clone()
            }
            None => first.prev_hash.clone(),
        };
        let last = &entries[n - 1];
        let mut seg = Segment {
            format: SEGMENT_FORMAT.into(),
            source: ARAGORA_SOURCE.into(),
            first: first.seq,
            last: last.seq,
            prev_hash,
            end_hash: last.hash.clone(),
            end_id: Some(last.id.clone()),
            exported_at: now.clone(),
            payload: Payload::Aragora(Vec::new()),
            public_key: String::new(),
            signature: String::new(),
        };
        // The segment must verify before it is written.
        verify_aragora_entries(&entries, &seg.prev_hash).map_err(ExportError::Invalid)?;
        prev = Some((seg.last, seg.end_hash.clone(), seg.end_id.clone()));
        start = Bound::Excluded(last.id.clone());
        seg.payload = Payload::Aragora(entries);
        write_segment(dir, signer, seg, &mut report)?;
        if n < MAX_SEGMENT_ENTRIES {
            break;
        }
    }
    if let Some((last, end_hash, _)) = prev {
        report.heads.push(ChainPosition {
            source: ARAGORA_SOURCE.into(),
            last,
            end_hash,
            matches_live: None,
        });
    }

    // The engine's tables.
    let from = |source: &str| newest.get(source).map(|s| (s.last, s.end_hash.clone()));
    let since_id = ["aedb.authz_audit", "aedb.assertion_audit"]
        .iter()
        .map(|s| from(s).map_or(1, |(last, _)| last + 1))
        .min()
        .unwrap_or(1);
    let tables = log
        .store
        .engine_audit(i64::try_from(since_id).unwrap_or(i64::MAX))
        .map_err(|e| ExportError::Read(e.to_string()))?;
    for table in tables {
        let source = format!("aedb.{}", table.table);
        let mut prev = from(&source);
        let rows: Vec<Vec<aedb::Value>> = table
            .rows
            .into_iter()
            .filter(|r| row_id(r).is_some_and(|id| prev.as_ref().is_none_or(|(l, _)| id > *l)))
            .collect();
        for chunk in rows.chunks(MAX_SEGMENT_ENTRIES) {
            let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
                continue;
            };
            let (first_id, first_prev) = row_links(first).ok_or_else(|| {
                ExportError::Invalid(format!("{source}: a row has a malformed layout"))
            })?;
            let (last_id, _) = row_links(last).ok_or_else(|| {
                ExportError::Invalid(format!("{source}: a row has a malformed layout"))
            })?;
            let end_hash = row_hash_hex(last).unwrap_or_default();
            if let Some((l, h)) = &prev
                && (first_id != l + 1 || first_prev != *h)
            {
                return Err(ExportError::Invalid(format!(
                    "{source}: the live table does not continue the exported chain at row {first_id}"
                )));
            }
            let export = aedb::AuditExport {
                table: table.table.clone(),
                columns: table.columns.clone(),
                rows: chunk.to_vec(),
                chain_head: end_hash.clone(),
                exported_at: table.exported_at,
            };
            aedb::verify_audit_export(&export)
                .map_err(|e| ExportError::Invalid(format!("{source}: {e}")))?;
            let seg = Segment {
                format: SEGMENT_FORMAT.into(),
                source: source.clone(),
                first: first_id,
                last: last_id,
                prev_hash: first_prev,
                end_hash: end_hash.clone(),
                end_id: None,
                exported_at: now.clone(),
                payload: Payload::Aedb(export),
                public_key: String::new(),
                signature: String::new(),
            };
            prev = Some((last_id, end_hash));
            write_segment(dir, signer, seg, &mut report)?;
        }
        if let Some((last, end_hash)) = prev {
            report.heads.push(ChainPosition {
                source,
                last,
                end_hash,
                matches_live: None,
            });
        }
    }
    Ok(report)
}

/// Checks every segment in `dir`: format, signature under a trusted key (the
/// one derived from this server's master key, plus `extra_keys`), each
/// segment's own chain, the links between consecutive segments of a chain, and
/// with `live`, that the live chains still hold each chain's exported head.
pub fn verify_dir(
    dir: &Path,
    signer: Option<&ExportSigner>,
    extra_keys: &[String],
    live: Option<&AuditLog>,
) -> Result<ExportVerifyReport, ExportError> {
    let mut trusted: Vec<String> = extra_keys.iter().map(|k| k.to_ascii_lowercase()).collect();
    if let Some(s) = signer {
        trusted.push(s.public_key_hex());
    }
    if trusted.is_empty() {
        return Err(ExportError::Invalid(
            "no public key to verify against: give --public-key (printed by every export)".into(),
        ));
    }
    let mut report = ExportVerifyReport {
        dir: dir.display().to_string(),
        ..ExportVerifyReport::default()
    };
    let segments = read_dir_segments(dir)?;
    if segments.is_empty() {
        report
            .problems
            .push(format!("{} holds no audit export segment", dir.display()));
    }
    let mut chains: BTreeMap<String, Vec<(PathBuf, Segment)>> = BTreeMap::new();
    for (path, seg) in segments {
        report.segments += 1;
        if let Err(p) = check_signature(&seg, Some(&trusted)) {
            report.problems.push(format!("{}: {p}", path.display()));
            continue;
        }
        if !report.public_keys.contains(&seg.public_key) {
            report.public_keys.push(seg.public_key.clone());
        }
        let inner = match &seg.payload {
            Payload::Aragora(entries) => {
                report.entries += entries.len() as u64;
                verify_aragora_entries(entries, &seg.prev_hash).and_then(|()| {
                    let ok = entries.first().map(|e| e.seq) == Some(seg.first)
                        && entries.last().map(|e| (e.seq, e.hash.as_str()))
                            == Some((seg.last, seg.end_hash.as_str()));
                    if ok {
                        Ok(())
                    } else {
                        Err("its bounds do not match its entries".into())
                    }
                })
            }
            Payload::Aedb(export) => {
                report.entries += export.rows.len() as u64;
                aedb::verify_audit_export(export)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        let first = export.rows.first().and_then(|r| row_links(r));
                        let last = export.rows.last().and_then(|r| row_links(r));
                        let ok = first == Some((seg.first, seg.prev_hash.clone()))
                            && last.map(|(id, _)| id) == Some(seg.last)
                            && export.chain_head == seg.end_hash;
                        if ok {
                            Ok(())
                        } else {
                            Err("its bounds do not match its rows".into())
                        }
                    })
            }
        };
        if let Err(p) = inner {
            report.problems.push(format!("{}: {p}", path.display()));
            continue;
        }
        chains
            .entry(seg.source.clone())
            .or_default()
            .push((path, seg));
    }
    for (source, mut segs) in chains {
        segs.sort_by_key(|(_, s)| (s.first, s.last));
        let mut prev: Option<&Segment> = None;
        for (path, seg) in &segs {
            if let Some(p) = prev {
                if seg.first != p.last + 1 || seg.prev_hash != p.end_hash {
                    report.problems.push(format!(
                        "{}: does not continue the previous segment of {source} \
                         (ends at {} with hash {}; this one starts at {} after hash {})",
                        path.display(),
                        p.last,
                        p.end_hash,
                        seg.first,
                        seg.prev_hash
                    ));
                }
            } else if seg.first == 1 && seg.prev_hash != GENESIS && source == ARAGORA_SOURCE {
                report.problems.push(format!(
                    "{}: the first entry of the chain does not start from the genesis hash",
                    path.display()
                ));
            }
            prev = Some(seg);
        }
        if let (Some(log), true) = (live, source == ARAGORA_SOURCE)
            && let Some(a) = log.anchor().map_err(|e| ExportError::Read(e.to_string()))?
        {
            let holding = segs
                .iter()
                .find(|(_, s)| s.first <= a.seq && a.seq <= s.last);
            let check = holding.and_then(|(_, s)| match &s.payload {
                Payload::Aragora(entries) => entries
                    .iter()
                    .find(|e| e.seq == a.seq)
                    .map(|e| e.hash == a.hash && e.id == a.id),
                Payload::Aedb(_) => None,
            });
            if check == Some(false) {
                report.problems.push(format!(
                    "the live chain's retention anchor (seq {}, {}, hash {}) is not the entry \
                     this export holds at seq {}: the live log does not continue this export",
                    a.seq, a.id, a.hash, a.seq
                ));
            }
            report.anchor_in_export = Some(AnchorCheck {
                seq: a.seq,
                hash: a.hash.clone(),
                export_dir: a.export_dir.clone(),
                matches_export: check,
            });
        }
        if let Some(last) = prev {
            let anchored_past = live
                .map(|log| log.anchor())
                .transpose()
                .map_err(|e| ExportError::Read(e.to_string()))?
                .flatten()
                .is_some_and(|a| source == ARAGORA_SOURCE && a.seq > last.last);
            let matches_live = match live {
                // Removed by retention past this export's end: nothing live
                // to compare with (the anchor check above is what links).
                Some(_) if anchored_past => None,
                Some(log) => Some(live_has(log, last)?),
                None => None,
            };
            if matches_live == Some(false) {
                report.problems.push(format!(
                    "{source}: the live chain does not hold the exported head \
                     (entry {} with hash {}): the live log was altered or replaced after the export",
                    last.last, last.end_hash
                ));
            }
            report.chains.push(ChainPosition {
                source,
                last: last.last,
                end_hash: last.end_hash.clone(),
                matches_live,
            });
        }
    }
    report.ok = report.problems.is_empty();
    Ok(report)
}

/// Whether the live chain has `seg.end_hash` at `seg.last`.
fn live_has(log: &AuditLog, seg: &Segment) -> Result<bool, ExportError> {
    if seg.source == ARAGORA_SOURCE {
        let Some(id) = &seg.end_id else {
            return Ok(false);
        };
        let found = log
            .store
            .get(Collection::Audit, id)
            .map_err(|e| ExportError::Read(e.to_string()))?;
        return Ok(match found {
            Some(record) => decode::<AuditEntry>(Collection::Audit, id, &record)
                .map(|e| e.seq == seg.last && e.hash == seg.end_hash && entry_hash(&e) == e.hash)
                .unwrap_or(false),
            // Removed by retention: the anchor is that entry, if it was the
            // last one removed.
            None => log
                .anchor()
                .map_err(|e| ExportError::Read(e.to_string()))?
                .is_some_and(|a| a.seq == seg.last && a.hash == seg.end_hash && a.id == *id),
        });
    }
    let tables = log
        .store
        .engine_audit(i64::try_from(seg.last).unwrap_or(i64::MAX))
        .map_err(|e| ExportError::Read(e.to_string()))?;
    Ok(tables.iter().any(|t| {
        format!("aedb.{}", t.table) == seg.source
            && t.rows.first().is_some_and(|r| {
                row_id(r) == Some(seg.last) && row_hash_hex(r).as_deref() == Some(&seg.end_hash)
            })
    }))
}

pub(super) fn verify_aragora_entries(
    entries: &[AuditEntry],
    prev_hash: &str,
) -> Result<(), String> {
    let mut prev = prev_hash.to_string();
    let mut prev_seq: Option<u64> = None;
    for e in entries {
        if prev_seq.is_some_and(|s| e.seq != s + 1) {
            return Err(format!(
                "entry seq {} does not follow seq {:?}",
                e.seq, prev_seq
            ));
        }
        if e.prev_hash != prev {
            return Err(format!(
                "entry seq {} does not link to the previous hash",
                e.seq
            ));
        }
        if entry_hash(e) != e.hash {
            return Err(format!("entry seq {} was altered (hash mismatch)", e.seq));
        }
        prev = e.hash.clone();
        prev_seq = Some(e.seq);
    }
    Ok(())
}

pub(super) fn check_signature(seg: &Segment, trusted: Option<&[String]>) -> Result<(), String> {
    if seg.format != SEGMENT_FORMAT {
        return Err(format!("unknown format {:?}", seg.format));
    }
    if let Some(keys) = trusted
        && !keys.contains(&seg.public_key)
    {
        return Err(format!(
            "signed with public key {}, which is not trusted here",
            seg.public_key
        ));
    }
    let key = hex::decode(&seg.public_key).map_err(|_| "public_key is not hex".to_string())?;
    let sig = hex::decode(&seg.signature).map_err(|_| "signature is not hex".to_string())?;
    let bytes = seg.signed_bytes().map_err(|e| e.to_string())?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&bytes, &sig)
        .map_err(|_| "the signature does not verify (the file was modified)".to_string())
}

fn row_id(row: &[aedb::Value]) -> Option<u64> {
    match row.first() {
        Some(aedb::Value::Int(id)) => u64::try_from(*id).ok(),
        _ => None,
    }
}

/// A row's id and the previous row's hash (hex).
fn row_links(row: &[aedb::Value]) -> Option<(u64, String)> {
    let n = row.len();
    if n < 3 {
        return None;
    }
    match &row[n - 2] {
        aedb::Value::Bytes(p) => Some((row_id(row)?, hex::encode(p))),
        _ => None,
    }
}

fn row_hash_hex(row: &[aedb::Value]) -> Option<String> {
    match row.last() {
        Some(aedb::Value::Bytes(h)) => Some(hex::encode(h)),
        _ => None,
    }
}

/// Every segment file in `dir` (names `*.json` not starting with a dot),
/// parsed; a file that does not parse is an error naming it.
fn read_dir_segments(dir: &Path) -> Result<Vec<(PathBuf, Segment)>, ExportError> {
    let read = std::fs::read_dir(dir)
        .map_err(|e| ExportError::Io(format!("reading {}: {e}", dir.display())))?;
    let mut out = Vec::new();
    for entry in read {
        let entry =
            entry.map_err(|e| ExportError::Io(format!("reading {}: {e}", dir.display())))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        if out.len() >= MAX_SEGMENT_FILES {
            return Err(ExportError::Invalid(format!(
                "{} holds more than {MAX_SEGMENT_FILES} segment files",
                dir.display()
            )));
        }
        let seg = read_segment(&path)?;
        out.push((path, seg));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// One segment file, parsed (not yet verified).
pub(super) fn read_segment(path: &Path) -> Result<Segment, ExportError> {
    let len = std::fs::metadata(path)
        .map_err(|e| ExportError::Io(format!("{}: {e}", path.display())))?
        .len();
    if len > MAX_SEGMENT_BYTES {
        return Err(ExportError::Invalid(format!(
            "{}: {len} bytes is larger than any segment",
            path.display()
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| ExportError::Io(format!("reading {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ExportError::Invalid(format!(
            "{} is not an audit export segment: {e}",
            path.display()
        ))
    })
}

/// Signs and writes one segment, once: never replaces an existing file.
fn write_segment(
    dir: &Path,
    signer: &ExportSigner,
    mut seg: Segment,
    report: &mut ExportReport,
) -> Result<(), ExportError> {
    signer.sign(&mut seg)?;
    let name = seg.file_name();
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let io =
        |what: &str, e: std::io::Error| ExportError::Io(format!("{what} {}: {e}", path.display()));
    let bytes = serde_json::to_vec_pretty(&seg).map_err(|e| ExportError::Io(e.to_string()))?;
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        f.write_all(&bytes).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| io("protecting", e))?;
    // A hard link fails when the name exists: a segment is never rewritten.
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(|e| io("placing", e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the directory of", e))?;
    let entries = match &seg.payload {
        Payload::Aragora(e) => e.len(),
        Payload::Aedb(t) => t.rows.len(),
    };
    tracing::info!(file = %path.display(), entries, "audit export segment written");
    report.written.push(WrittenSegment {
        file: name,
        source: seg.source,
        first: seg.first,
        last: seg.last,
        entries,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::{AuditEvent, Outcome};
    use crate::store::{Durability, EmbeddedStore, Expect, Store, WriteOp};

    struct Fixture {
        log: AuditLog,
        store: Arc<dyn Store>,
        signer: ExportSigner,
        out: PathBuf,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        Fixture {
            log: AuditLog::new(store.clone()),
            store,
            signer: ExportSigner::from_master_key(&[7; 32]).expect("signer"),
            out: dir.path().join("exports"),
            _dir: dir,
        }
    }

    fn events(log: &AuditLog, n: usize) {
        for i in 0..n {
            log.record(
                AuditEvent::new("test_event", format!("user-{i}"), Outcome::Success)
                    .details(serde_json::json!({"i": i})),
            )
            .expect("record");
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn exports_continue_where_the_directory_ends_and_verify_against_the_live_chains() {
        let f = fixture();
        events(&f.log, 3);
        let first = export(&f.log, &f.signer, &f.out, None).expect("export");
        let ours: Vec<_> = first
            .written
            .iter()
            .filter(|w| w.source == "aragora")
            .collect();
        assert_eq!((ours[0].first, ours[0].last), (1, 3), "{first:?}");
        // The engine's own audit table is exported too: creating aragora's
        // project used the bootstrap admin (GlobalAdmin), which aedb audits.
        assert!(
            first.written.iter().any(|w| w.source == "aedb.authz_audit"),
            "{first:?}"
        );
        let again = export(&f.log, &f.signer, &f.out, None).expect("rerun");
        assert!(again.written.is_empty(), "nothing new: {again:?}");

        events(&f.log, 2);
        let second = export(&f.log, &f.signer, &f.out, None).expect("export");
        assert_eq!(second.written.len(), 1, "{second:?}");
        assert_eq!((second.written[0].first, second.written[0].last), (4, 5));
        for name in files(&f.out) {
            let mode = std::fs::metadata(f.out.join(&name))
                .expect("meta")
                .permissions();
            assert_eq!(mode.mode() & 0o777, 0o444, "{name} is read-only");
        }

        let report = verify_dir(&f.out, Some(&f.signer), &[], Some(&f.log)).expect("verify");
        assert!(report.ok, "{report:?}");
        assert_eq!(report.segments, files(&f.out).len());
        let aragora = report
            .chains
            .iter()
            .find(|c| c.source == "aragora")
            .expect("aragora chain");
        assert_eq!((aragora.last, aragora.matches_live), (5, Some(true)));
        // Anyone with the public key alone verifies the same set.
        let public = verify_dir(&f.out, None, &[f.signer.public_key_hex()], None).expect("verify");
        assert!(public.ok, "{public:?}");
        // A key nobody trusts does not.
        let other = ExportSigner::from_master_key(&[8; 32]).expect("other");
        let untrusted = verify_dir(&f.out, Some(&other), &[], None).expect("verify");
        assert!(!untrusted.ok && untrusted.problems[0].contains("not trusted"));
    }

    #[test]
    fn a_modified_or_missing_segment_and_a_rewritten_live_log_are_reported() {
        let f = fixture();
        events(&f.log, 2);
        export(&f.log, &f.signer, &f.out, None).expect("export");
        events(&f.log, 2);
        export(&f.log, &f.signer, &f.out, None).expect("export");
        events(&f.log, 2);
        export(&f.log, &f.signer, &f.out, None).expect("export");
        let ours: Vec<String> = files(&f.out)
            .into_iter()
            .filter(|n| n.starts_with("aragora-"))
            .collect();
        assert_eq!(ours.len(), 3);

        // An entry edited in a copy breaks its segment's signature.
        let copy = f.out.with_file_name("copy");
        std::fs::create_dir_all(&copy).expect("copy dir");
        for name in files(&f.out) {
            std::fs::copy(f.out.join(&name), copy.join(&name)).expect("copy");
        }
        let victim = copy.join(&ours[1]);
        let mut perms = std::fs::metadata(&victim).expect("meta").permissions();
        perms.set_mode(0o644);
        std::fs::set_permissions(&victim, perms).expect("chmod");
        let text = std::fs::read_to_string(&victim).expect("read");
        std::fs::write(&victim, text.replacen("user-0", "user-X", 1)).expect("write");
        let r = verify_dir(&copy, Some(&f.signer), &[], None).expect("verify");
        assert!(
            !r.ok && r.problems.iter().any(|p| p.contains("modified")),
            "{r:?}"
        );

        // A segment removed from the middle leaves a gap.
        std::fs::remove_file(&victim).expect("remove");
        let r = verify_dir(&copy, Some(&f.signer), &[], None).expect("verify");
        assert!(
            !r.ok && r.problems.iter().any(|p| p.contains("does not continue")),
            "{r:?}"
        );

        // The live log rewritten after the export no longer holds its head.
        let (id, record) = f
            .store
            .list(Collection::Audit, &ListQuery::all(100))
            .expect("list")
            .pop()
            .expect("an entry");
        let mut e: AuditEntry = decode(Collection::Audit, &id, &record).expect("entry");
        e.actor = "someone-else".into();
        e.hash = entry_hash(&e);
        f.store
            .write(
                vec![WriteOp::put_json(Collection::Audit, &id, &e, Expect::Any).expect("op")],
                Durability::Durable,
            )
            .expect("rewrite");
        let r = verify_dir(&f.out, Some(&f.signer), &[], Some(&f.log)).expect("verify");
        assert!(
            !r.ok
                && r.problems
                    .iter()
                    .any(|p| p.contains("live chain does not hold")),
            "{r:?}"
        );
        // And an export refuses to continue a chain the live log no longer extends.
        events(&f.log, 1);
        let err = export(&f.log, &f.signer, &f.out, None).expect_err("refused");
        assert!(err.to_string().contains("no longer holds"), "{err}");
    }

    #[test]
    fn since_starts_a_new_directory_mid_chain_and_it_still_verifies() {
        let f = fixture();
        events(&f.log, 3);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let cut = now_us();
        events(&f.log, 2);
        let r = export(&f.log, &f.signer, &f.out, Some(cut)).expect("export");
        let ours = r
            .written
            .iter()
            .find(|w| w.source == "aragora")
            .expect("ours");
        assert_eq!((ours.first, ours.last), (4, 5));
        let v = verify_dir(&f.out, Some(&f.signer), &[], Some(&f.log)).expect("verify");
        assert!(v.ok, "{v:?}");
    }

    #[test]
    fn a_backlog_larger_than_a_segment_is_split_and_linked() {
        let f = fixture();
        let batch: Vec<AuditEvent> = (0..MAX_SEGMENT_ENTRIES + 5)
            .map(|i| AuditEvent::new("bulk", format!("u{i}"), Outcome::Success))
            .collect();
        for e in batch {
            f.log.record_unsynced(e).expect("record");
        }
        let r = export(&f.log, &f.signer, &f.out, None).expect("export");
        let ours: Vec<_> = r.written.iter().filter(|w| w.source == "aragora").collect();
        assert_eq!(ours.len(), 2, "{ours:?}");
        assert_eq!(ours[0].entries, MAX_SEGMENT_ENTRIES);
        assert_eq!(ours[1].first, ours[0].last + 1);
        let v = verify_dir(&f.out, Some(&f.signer), &[], Some(&f.log)).expect("verify");
        assert!(v.ok, "{v:?}");
    }
}
