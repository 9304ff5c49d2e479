//! Entry points for the fuzz targets (`fuzz/` at the workspace root) and for the
//! stable-toolchain corpus replay test (`crates/fuzz-harness`). Not an API: each
//! function feeds arbitrary bytes to one on-disk decoder exactly as the engine
//! would, and panics only when an invariant breaks (a decoder panic, an untyped
//! failure, or a round trip that does not reproduce its input). Errors the decoders
//! return for bad input are the expected outcome and are ignored.
//!
//! Functions that need files use a scratch directory of their own under the system
//! temp directory (one per process and thread), rewritten on every call.

use std::path::{Path, PathBuf};

use crate::backup::{self, DESCRIPTOR_FILE};
use crate::checkpoint;
use crate::storage::OsStorage;

/// The fuzz targets read and write real scratch files.
const OS: OsStorage = OsStorage;
use crate::config::{AedbConfig, RecoveryMode, SecretKey};
use crate::crypto::{self, LABEL_BACKUP, LABEL_MANIFEST, LABEL_WAL_CHAIN};
use crate::error::AedbError;
use crate::manifest::{self, MANIFEST_FILE};
use crate::model::state::DbState;
use crate::record::WalRecord;
use crate::wal::format::{
    self, FLAG_KEYED_CHAIN, FORMAT_VERSION, FRAME_HEADER_LEN, FrameAt, SEGMENT_HEADER_LEN,
    SegmentHeader,
};
use crate::wal::reader::{count_frames_best_effort, next_valid_frame, scan_frames};

/// The manifest key used when a target needs one (and signs the fuzzed bodies
/// with it, so the parser behind the signature check is reached).
pub const FUZZ_MANIFEST_KEY: [u8; 32] = [0x4d; 32];
/// The checkpoint key used when a target needs one.
pub const FUZZ_CHECKPOINT_KEY: [u8; 32] = [0x43; 32];

/// Reads fields off the front of a fuzz input; past its end everything is zero.
#[derive(Debug)]
pub struct Fields<'a> {
    data: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length-prefixed (u16) piece.
    pub fn piece(&mut self) -> &'a [u8] {
        let n = u16::from_le_bytes(self.array()) as usize;
        self.bytes(n)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// A scratch directory for this process and thread, emptied.
fn scratch(name: &str) -> PathBuf {
    let base = std::env::var_os("AEDB_FUZZ_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            }
        });
    let dir = base.join(format!(
        "aedb-fuzz-{}-{:?}-{name}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fuzz scratch directory");
    dir
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write fuzz scratch file");
}

/// The signed two-line form of `body` (as `write_signed` writes it).
fn signed(body: &[u8], key: Option<&SecretKey>, label: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    out.push(b'\n');
    match key {
        Some(k) => {
            let mac = ring::hmac::sign(&crypto::hmac_key(k, label), body);
            out.extend_from_slice(b"hmac-sha256:");
            out.extend_from_slice(hex::encode(mac.as_ref()).as_bytes());
        }
        None => out.extend_from_slice(b"unsigned"),
    }
    out.push(b'\n');
    out
}

/// A state a decoder produced must be one the rest of the engine can use: rows
/// fit their tables (queries index them by column), keys are primary keys, counts
/// agree. (Audit chains of fuzzed rows may be broken: that is what `check` reports.)
fn assert_consistent(state: &DbState, what: &str) {
    for c in crate::check::state_checks(state) {
        if c.name == "table and keyspace consistency" {
            assert!(c.ok, "{what} produced an inconsistent state: {}", c.detail);
        }
    }
}

/// Bad input must come back as an `AedbError` or one of its families (the type
/// guarantees that much; this also renders it, which must not panic either).
fn typed(e: &dyn std::error::Error) {
    let _ = e.to_string();
}

// ---------------------------------------------------------------------------
// WAL segment header

/// `SegmentHeader::decode` on raw bytes; a decoded header re-encodes to bytes that
/// decode to the same header; a header built from the input round-trips.
pub fn wal_segment_header(data: &[u8]) {
    if let Ok(h) = SegmentHeader::decode(data) {
        let again = h.encode();
        // Everything the decoder reads is reproduced (the reserved bytes are not read).
        assert_eq!(again[..96], data[..96], "re-encoded header differs");
        assert_eq!(SegmentHeader::decode(&again).as_ref(), Ok(&h));
    }
    let mut f = Fields::new(data);
    let h = SegmentHeader {
        version: FORMAT_VERSION,
        flags: f.u32(),
        index: f.u64(),
        first_lsn: f.u64(),
        prev_hash: f.array(),
        salt: f.array(),
        key_id: f.array(),
        chain_key_id: f.array(),
    };
    let encoded = h.encode();
    assert_eq!(SegmentHeader::decode(&encoded), Ok(h.clone()), "round trip");
    // Any single flipped bit is detected (reserved bytes included: CRC-covered).
    let bit = f.u32() as usize % (SEGMENT_HEADER_LEN * 8);
    let mut flipped = encoded;
    flipped[bit / 8] ^= 1 << (bit % 8);
    assert!(
        SegmentHeader::decode(&flipped).is_err(),
        "flipped bit {bit} not detected"
    );
}

// ---------------------------------------------------------------------------
// WAL frames

fn chain_key() -> ring::hmac::Key {
    crypto::hmac_key(&SecretKey::new(FUZZ_MANIFEST_KEY), LABEL_WAL_CHAIN)
}

/// The frame scanner on a whole segment buffer, as recovery runs it (start after
/// the header, LSN and chain from the header when it decodes), plus the damage
/// classifiers; and frames built from the input scan back exactly.
pub fn wal_frames(data: &[u8]) {
    let mut f = Fields::new(data);
    let selector = f.u8();
    let key = chain_key();
    let keyed = (selector & 1 != 0).then_some(&key);
    let buf = f.rest();
    // Recovery and backup verification refuse a header with first LSN 0 before
    // they scan (LSNs start at 1): `scan_frames` requires `next_lsn >= 1`.
    let (next_lsn, prev) = match SegmentHeader::decode(buf) {
        Ok(h) if h.first_lsn > 0 => (h.first_lsn, h.prev_hash),
        _ => (1, [0u8; 32]),
    };
    let mut accepted = 0u64;
    let outcome = scan_frames(keyed, buf, SEGMENT_HEADER_LEN, next_lsn, prev, |_, _, p| {
        if selector & 2 != 0 && p.first() == Some(&0xff) {
            return Err("visitor refused".into());
        }
        accepted += 1;
        Ok(())
    });
    // The scan ends just after the frames it accepted.
    assert_eq!(
        outcome.last_lsn.wrapping_add(1).wrapping_sub(next_lsn),
        accepted
    );
    assert!(outcome.end_offset as usize <= buf.len().max(SEGMENT_HEADER_LEN));
    if let Some(d) = &outcome.damage {
        assert!(d.offset as usize <= buf.len().max(SEGMENT_HEADER_LEN));
        let _ = d.is_torn();
    } else {
        assert!(
            buf.get(outcome.end_offset as usize..)
                .unwrap_or_default()
                .iter()
                .all(|&b| b == 0),
            "clean scan stopped before non-zero bytes"
        );
    }
    let from = (selector as usize) << 2;
    let _ = next_valid_frame(buf, from, next_lsn, selector & 4 != 0);
    let _ = count_frames_best_effort(buf, from);
    let _ = count_frames_best_effort(buf, SEGMENT_HEADER_LEN);

    // Round trip: frames encoded from the input's pieces scan back in order.
    let mut f = Fields::new(data);
    let selector = f.u8();
    let keyed = (selector & 1 != 0).then_some(&key);
    let first_lsn = f.u64() >> 8;
    let first_lsn = first_lsn.max(1);
    let prev: [u8; 32] = f.array();
    let header = SegmentHeader {
        version: FORMAT_VERSION,
        flags: if keyed.is_some() { FLAG_KEYED_CHAIN } else { 0 },
        index: 1,
        first_lsn,
        prev_hash: prev,
        salt: [0; 16],
        key_id: [0; 8],
        chain_key_id: [0; 8],
    };
    let mut seg = header.encode().to_vec();
    let mut payloads = Vec::new();
    let mut head = prev;
    while !f.is_empty() && payloads.len() < 64 {
        let p = f.piece();
        if p.is_empty() {
            continue;
        }
        head = format::encode_frame(&mut seg, keyed, &head, first_lsn + payloads.len() as u64, p);
        payloads.push(p.to_vec());
    }
    seg.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    let mut seen = Vec::new();
    let out = scan_frames(
        keyed,
        &seg,
        SEGMENT_HEADER_LEN,
        first_lsn,
        prev,
        |lsn, _, p| {
            assert_eq!(lsn, first_lsn + seen.len() as u64);
            seen.push(p.to_vec());
            Ok(())
        },
    );
    assert!(
        out.damage.is_none(),
        "encoded frames read as damage: {:?}",
        out.damage
    );
    assert_eq!(seen, payloads, "frames did not scan back");
    assert_eq!(out.chain_head, head);
    assert_eq!(out.last_lsn, first_lsn + payloads.len() as u64 - 1);
    if let FrameAt::Frame(fr) = format::frame_at(&seg, SEGMENT_HEADER_LEN) {
        assert!(fr.crc_ok());
    }
}

// ---------------------------------------------------------------------------
// WAL records (frame payloads)

fn base_state() -> DbState {
    let mut s = DbState::initial();
    for op in [
        crate::DdlOperation::CreateProject {
            project: "p".into(),
            owner: None,
        },
        crate::DdlOperation::CreateScope {
            project: "p".into(),
            scope: "s".into(),
        },
        crate::DdlOperation::CreateTable {
            project: "p".into(),
            scope: "s".into(),
            table: "t".into(),
            schema: crate::TableSchema::new(
                vec![
                    crate::Column::new("id", crate::ColumnType::Int),
                    crate::Column::new("v", crate::ColumnType::Text),
                ],
                vec!["id".into()],
            ),
        },
    ] {
        let rec = WalRecord::Ddl {
            actor: None,
            ops: vec![op],
            audit: Vec::new(),
        };
        let seq = s.seq + 1;
        s.apply(&rec, seq).expect("base state");
    }
    s
}

/// A frame payload decoded as replay does, then applied to a small state; a
/// decoded record re-encodes to bytes that decode to the same encoding.
pub fn wal_record(data: &[u8]) {
    let rec = match WalRecord::decode(data) {
        Ok(r) => r,
        Err(e) => return typed(&e),
    };
    let encoded = rec.encode().expect("a decoded record encodes");
    let again = WalRecord::decode(&encoded).expect("re-encoded record decodes");
    assert_eq!(
        again.encode().expect("encode"),
        encoded,
        "decode(encode(x)) != x"
    );
    let mut state = base_state();
    let seq = state.seq + 1;
    match state.apply(&rec, seq) {
        // A failed apply aborts the open; the half-applied state is never used.
        Err(e) => typed(&e),
        Ok(()) => assert_consistent(&state, "replay"),
    }
    let _ = crate::check::state_digests(&state);
}

// ---------------------------------------------------------------------------
// Checkpoints

const CKPT_HEADER: usize = checkpoint::HEADER_LEN;

/// A checkpoint file whose header is valid (CRC, body length, body SHA-256) around
/// the chunked, zstd-compressed item stream `items` (unencrypted).
fn checkpoint_around(lsn: u64, chain_head: [u8; 32], items: &[u8]) -> Vec<u8> {
    let compressed = zstd::encode_all(items, 1).expect("zstd in memory");
    let mut body = Vec::new();
    for chunk in compressed.chunks(1 << 20) {
        body.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        body.extend_from_slice(chunk);
    }
    if compressed.is_empty() {
        body.extend_from_slice(&0u32.to_le_bytes());
    }
    let mut h = vec![0u8; CKPT_HEADER];
    h[0..8].copy_from_slice(b"AEDBCKP\0");
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[16..24].copy_from_slice(&lsn.to_le_bytes());
    h[24..56].copy_from_slice(&chain_head);
    h[96..104].copy_from_slice(&(body.len() as u64).to_le_bytes());
    use sha2::Digest;
    h[104..136].copy_from_slice(&sha2::Sha256::digest(&body));
    let crc = crc32c::crc32c(&h[0..252]);
    h[252..256].copy_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&body);
    h
}

fn checkpoint_keys() -> SecretKey {
    SecretKey::new(FUZZ_CHECKPOINT_KEY)
}

/// Selector bit 0 clear: the input is a whole checkpoint file (header, chunks,
/// encryption). Set: the input is LSN (8) || the item stream, which the harness
/// wraps in a valid header and chunks so the item decoder is reached; a state it
/// decodes is written as a checkpoint (encrypted) and must read back identical.
pub fn checkpoint_file(data: &[u8]) {
    let mut f = Fields::new(data);
    let selector = f.u8();
    let key = checkpoint_keys();
    let dir = scratch("checkpoint");
    let path = dir.join(checkpoint::file_name(1, None, 0));
    if selector & 1 == 0 {
        write(&path, f.rest());
        for keys in [&[][..], &[&key][..]] {
            if let Err(e) = checkpoint::read(&OS, &path, keys) {
                typed(&e);
            }
        }
        return;
    }
    let lsn = f.u64();
    let head: [u8; 32] = [selector; 32];
    write(&path, &checkpoint_around(lsn, head, f.rest()));
    let (loaded, meta) = match checkpoint::read(&OS, &path, &[]) {
        Ok(x) => x,
        Err(e) => return typed(&e),
    };
    assert_eq!((meta.lsn, meta.chain_head), (lsn, head));
    assert_consistent(&loaded.state, "checkpoint read");
    // Round trip through the real writer, encrypted.
    let out = dir.join("rt");
    std::fs::create_dir_all(&out).expect("mkdir");
    let written = checkpoint::write(
        &OS,
        &out,
        &checkpoint::file_name(loaded.state.seq, None, 0),
        &loaded.state,
        &loaded.idempotency,
        head,
        Some(&key),
        &mut |_| {},
    )
    .expect("a decoded state is written again");
    let (back, meta2) = checkpoint::read(&OS, &out.join(&written.file), &[&key])
        .expect("a written checkpoint reads");
    assert_eq!((meta2.lsn, meta2.chain_head), (lsn, head));
    assert_eq!(
        canonical(&back.state),
        canonical(&loaded.state),
        "checkpoint round trip changed the state"
    );
    assert_eq!(back.idempotency, loaded.idempotency);
}

/// What a state means (entries, schemas, grants), independent of bookkeeping
/// that a reader recomputes.
fn canonical(s: &DbState) -> String {
    let mut out = format!("seq {}\n", s.seq);
    for (pname, p) in &s.projects {
        for (sname, sc) in &p.scopes {
            out.push_str(&format!("{pname}/{sname}\n"));
            for (k, v) in &sc.kv {
                out.push_str(&format!("  {k:?} {} {:?}\n", v.version, v.value));
            }
            for (tname, t) in &sc.tables {
                out.push_str(&format!(
                    "  table {tname} {:?} {}\n",
                    t.schema, t.created_seq
                ));
                for (k, v) in &t.rows {
                    out.push_str(&format!("    {k:?} {} {:?}\n", v.version, v.value));
                }
            }
        }
        if p.scopes.is_empty() {
            out.push_str(&format!("{pname}\n"));
        }
    }
    out.push_str(&format!(
        "{:?} {:?} {}\n",
        s.authz.grants, s.authz.owners, s.authz.bootstrapped
    ));
    out
}

// ---------------------------------------------------------------------------
// Manifest

fn manifest_key() -> SecretKey {
    SecretKey::new(FUZZ_MANIFEST_KEY)
}

/// Selector bit 0 clear: the input is the whole `MANIFEST` file, read with and
/// without a key. Set: the input is a body the harness signs, so the JSON decoder
/// behind the signature is reached; a body it accepts is written and read back.
pub fn manifest_file(data: &[u8]) {
    let mut f = Fields::new(data);
    let selector = f.u8();
    let key = manifest_key();
    let dir = scratch("manifest");
    let path = dir.join(MANIFEST_FILE);
    if selector & 1 == 0 {
        write(&path, f.rest());
        for k in [None, Some(&key)] {
            if let Err(e) = manifest::read(&OS, &dir, k) {
                typed(&e);
            }
        }
        return;
    }
    let k = (selector & 2 != 0).then_some(&key);
    write(&path, &signed(f.rest(), k, LABEL_MANIFEST));
    let body = match manifest::read(&OS, &dir, k) {
        Ok(Some(b)) => b,
        Ok(None) => panic!("a manifest that exists read as absent"),
        Err(e) => return typed(&e),
    };
    manifest::write(&OS, &dir, &body, k).expect("a decoded manifest is written again");
    let back = manifest::read(&OS, &dir, k)
        .expect("a written manifest reads")
        .expect("present");
    assert_eq!(back, body, "manifest round trip");
}

// ---------------------------------------------------------------------------
// Backup descriptor

/// Selector bit 0 clear: the input is the whole `backup.json`. Set: the input is a
/// descriptor body the harness signs. Either way it is verified as a backup
/// directory and as a one-backup chain; an accepted descriptor round-trips.
pub fn backup_descriptor(data: &[u8]) {
    let mut f = Fields::new(data);
    let selector = f.u8();
    let key = manifest_key();
    let dir = scratch("backup");
    let path = dir.join(DESCRIPTOR_FILE);
    let keyed = selector & 2 != 0;
    let config = if keyed {
        AedbConfig::production(FUZZ_MANIFEST_KEY).with_checkpoint_key(FUZZ_CHECKPOINT_KEY)
    } else {
        AedbConfig::development()
    };
    let body = f.rest();
    if selector & 1 == 0 {
        write(&path, body);
    } else {
        write(&path, &signed(body, keyed.then_some(&key), LABEL_BACKUP));
    }
    // Members named by the descriptor may be present: a few plausible files.
    if selector & 4 != 0 {
        write(&dir.join("wal-0000000000000001.seg"), &[0u8; 256]);
        write(&dir.join(checkpoint::file_name(0, None, 0)), &[0u8; 300]);
    }
    match backup::verify_backup_dir(&config, &dir) {
        Ok(v) => {
            let json = serde_json::to_string(&v.descriptor).expect("encode descriptor");
            let back: backup::BackupDescriptor =
                serde_json::from_str(&json).expect("decode re-encoded descriptor");
            assert_eq!(back, v.descriptor, "descriptor round trip");
        }
        Err(e) => typed(&e),
    }
    if let Err(e) = backup::verify_backup_chain(&config, std::slice::from_ref(&dir)) {
        typed(&e);
    }
}

// ---------------------------------------------------------------------------
// Whole-directory open (recovery and replay)

/// Frames of an unkeyed, unencrypted segment: returned by [`craft_segment`].
#[derive(Debug)]
pub struct CraftedSegment {
    /// The whole file, zero-filled to at least the requested length.
    pub bytes: Vec<u8>,
    /// (LSN, chain hash after it) of each frame, in order.
    pub frames: Vec<(u64, [u8; 32])>,
}

/// A segment file (`index`, development mode: no chain key, no encryption) whose
/// frames carry `payloads` from LSN `first_lsn` on, chained from `prev_hash`, with
/// valid CRCs and chain hashes. Stops before an LSN past `u64::MAX`.
pub fn craft_segment(
    index: u64,
    first_lsn: u64,
    prev_hash: [u8; 32],
    payloads: &[&[u8]],
    min_len: usize,
) -> CraftedSegment {
    let header = SegmentHeader {
        version: FORMAT_VERSION,
        flags: 0,
        index,
        first_lsn,
        prev_hash,
        salt: [0; 16],
        key_id: [0; 8],
        chain_key_id: [0; 8],
    };
    let mut bytes = header.encode().to_vec();
    let mut frames = Vec::new();
    let mut head = prev_hash;
    let mut lsn = Some(first_lsn);
    for p in payloads.iter().filter(|p| !p.is_empty()) {
        let Some(l) = lsn else { break };
        head = format::encode_frame(&mut bytes, None, &head, l, p);
        frames.push((l, head));
        lsn = l.checked_add(1);
    }
    bytes.resize(bytes.len().max(min_len), 0);
    CraftedSegment { bytes, frames }
}

/// What [`craft_checkpoint`] writes next to a crafted segment 1.
#[derive(Clone, Debug)]
pub struct CraftedCheckpoint {
    /// The checkpoint's LSN (its state's `seq`) and chain head at that LSN.
    pub lsn: u64,
    pub chain_head: [u8; 32],
    /// The state holds project `p`, scope `s` and table `t` (else it is empty).
    pub tables: bool,
    /// An unsigned manifest names the checkpoint and lists segment 1 (starting at
    /// `segment_first_lsn`) as the active segment; without it only a permissive
    /// open uses the checkpoint.
    pub manifest: bool,
    pub segment_first_lsn: u64,
    /// The durable head the manifest records, if any.
    pub durable_head: Option<(u64, [u8; 32])>,
}

/// Writes a development-mode checkpoint (and manifest) into `dir`, as a checkpoint
/// that covered the log up to `c.lsn` would have left them.
pub fn craft_checkpoint(dir: &Path, c: &CraftedCheckpoint) -> Result<(), AedbError> {
    let mut state = if c.tables {
        base_state()
    } else {
        DbState::initial()
    };
    state.seq = c.lsn;
    let meta = checkpoint::write(
        &OS,
        dir,
        &checkpoint::file_name(c.lsn, None, 0),
        &state,
        &[],
        c.chain_head,
        None,
        &mut |_| {},
    )?;
    if !c.manifest {
        return Ok(());
    }
    let body = manifest::ManifestBody {
        format_version: manifest::FORMAT_VERSION,
        generation: 1,
        checkpoint: Some(manifest::CheckpointRef {
            file: meta.file.clone(),
            lsn: meta.lsn,
            chain_head: hex::encode(meta.chain_head),
            digest: hex::encode(meta.digest),
            bytes: meta.bytes,
        }),
        segments: vec![manifest::SegmentRef {
            file: format::segment_file_name(1),
            index: 1,
            first_lsn: c.segment_first_lsn,
            sealed: None,
        }],
        keyed_chain: false,
        checkpoint_key_id: None,
        backup_floor_lsn: None,
        durable_head: c.durable_head.map(|(lsn, h)| manifest::DurableHeadRef {
            lsn,
            chain_hash: hex::encode(h),
        }),
        manifest_key_id: None,
        tables: Vec::new(),
        next_table_id: 0,
    };
    manifest::write(&OS, dir, &body, None)
}

/// A segment of valid frames (CRC and chain fixed up by the harness) whose
/// payloads come from the input, opened strictly and permissively: recovery,
/// record decoding and replay of arbitrary records; then one commit, which must
/// succeed or fail with an error (the writer resumes where recovery left it).
///
/// Selector bit 0: a torn or damaged tail after the frames. Bit 1: a checkpoint,
/// described by the bytes after the selector: the segment's first LSN (bit 2:
/// any `u64`, else 1 + a byte), then a mode byte and a distance byte placing the
/// checkpoint's LSN below the log's first LSN, inside its frames, at or past its
/// end, or anywhere (`u64`); bit 3: the checkpoint's chain head is the log's at
/// that LSN (else a wrong one); bit 4: a manifest names it; bit 5: the manifest
/// records the checkpoint as the durable head; bit 6: its state holds the tables
/// the seeds' records write to. Frames follow as `u16`-length pieces.
pub fn wal_open(data: &[u8]) {
    let mut f = Fields::new(data);
    let selector = f.u8();
    let with_checkpoint = selector & 2 != 0;
    let mut plan = None;
    let first_lsn = if !with_checkpoint {
        1
    } else if selector & 4 != 0 {
        f.u64().max(1)
    } else {
        1 + u64::from(f.u8())
    };
    if with_checkpoint {
        plan = Some((f.u8(), u64::from(f.u8()), f.u64()));
    }
    let prev_hash = if first_lsn == 1 { [0; 32] } else { [0x11; 32] };
    let mut pieces = Vec::new();
    while !f.is_empty() && pieces.len() < 63 {
        let p = f.piece();
        if !p.is_empty() {
            pieces.push(p);
        }
    }
    let mut seg = craft_segment(1, first_lsn, prev_hash, &pieces, 0);
    if selector & 1 != 0 {
        // A torn or damaged tail after the good frames.
        seg.bytes.extend_from_slice(&data[..data.len().min(64)]);
    }
    seg.bytes.resize(seg.bytes.len().max(64 * 1024), 0);
    let last_lsn = seg.frames.last().map_or(first_lsn - 1, |(l, _)| *l);
    let checkpoint = plan.map(|(mode, delta, raw)| {
        let lsn = match mode % 4 {
            0 => (first_lsn - 1).saturating_sub(delta),
            1 => (first_lsn - 1).saturating_add(delta),
            2 => last_lsn.saturating_add(delta),
            _ => raw,
        };
        let log_head = if lsn == first_lsn - 1 {
            Some(prev_hash)
        } else {
            seg.frames.iter().find(|(l, _)| *l == lsn).map(|(_, h)| *h)
        };
        let chain_head = match log_head {
            Some(h) if selector & 8 != 0 => h,
            _ => [mode; 32],
        };
        CraftedCheckpoint {
            lsn,
            chain_head,
            tables: selector & 64 != 0,
            manifest: selector & 16 != 0,
            segment_first_lsn: first_lsn,
            durable_head: (selector & 32 != 0).then_some((lsn, chain_head)),
        }
    });
    for mode in [RecoveryMode::Strict, RecoveryMode::Permissive] {
        let dir = scratch("open");
        write(&dir.join(format::segment_file_name(1)), &seg.bytes);
        if let Some(c) = &checkpoint
            && let Err(e) = craft_checkpoint(&dir, c)
        {
            // The writer refuses what no engine would write (an LSN past the end).
            typed(&e);
            return;
        }
        let config = AedbConfig::development()
            .with_recovery_mode(mode)
            .with_segment_bytes(64 * 1024)
            .with_checkpoint_policy(None, None)
            .with_limits(crate::Limits {
                max_txn_bytes: 16 * 1024,
                max_value_bytes: 8 * 1024,
                ..Default::default()
            });
        match crate::AedbInstance::open(config, &dir) {
            Ok(db) => {
                match db.snapshot() {
                    Ok(snap) => {
                        let _ = crate::check::state_checks(&snap.state);
                        if let Some(c) = &checkpoint {
                            assert!(
                                snap.seq() >= c.lsn,
                                "{mode:?} open with a checkpoint at LSN {} is at seq {}",
                                c.lsn,
                                snap.seq()
                            );
                        }
                    }
                    Err(e) => typed(&e),
                }
                if let Err(e) = db.create_project("fuzz-after-open") {
                    typed(&e);
                }
                if let Err(e) = db.close() {
                    typed(&e);
                }
            }
            Err(e) => typed(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::bytes::Bytes;
    use crate::model::state::Versioned;
    use crate::record::WriteOp;
    use crate::{Row, Value};

    fn row_put(key: Vec<u8>, row: Row) -> WalRecord {
        WalRecord::Commit {
            project: "p".into(),
            ops: vec![WriteOp::RowPut {
                scope: "s".into(),
                table: "t".into(),
                key: Bytes::from(key),
                row: Arc::new(row),
            }],
            idempotency: None,
            audit: Vec::new(),
        }
    }

    /// Replay refuses a logged row that does not fit its table or is logged under
    /// another key (a query would index the short row out of bounds).
    #[test]
    fn replay_refuses_rows_that_do_not_fit_their_table() {
        let schema = base_state()
            .table("p", "s", "t")
            .expect("table")
            .schema
            .clone();
        let good: Row = vec![Value::Int(1), Value::Text("a".into())];
        let key = schema.row_key(&good);
        let mut s = base_state();
        let seq = s.seq + 1;
        s.apply(&row_put(key.clone(), good.clone()), seq)
            .expect("a fitting row");
        assert_consistent(&s, "replay");
        for (k, row) in [
            (key.clone(), vec![Value::Int(1)]),
            (key.clone(), vec![Value::Text("x".into()), Value::Int(2)]),
            (b"another key".to_vec(), good.clone()),
        ] {
            let mut s = base_state();
            let seq = s.seq + 1;
            assert!(
                s.apply(&row_put(k, row.clone()), seq).is_err(),
                "{row:?} accepted"
            );
        }
    }

    /// Checkpoints written before idempotency records carried the writes digest
    /// (version 1) still read; what the current writer stores reads back with it.
    #[test]
    fn version_1_checkpoints_read_and_idempotency_digests_round_trip() {
        let dir = scratch("unit-idempotency");
        let mut items = Vec::new();
        for item in [
            &b"\x05\x01c\x01k\x03"[..], // Idempotency { caller: "c", key: "k", seq: 3 }
            &b"\x09\x00\x00\x00"[..],   // End { seq: 0, keys: 0, rows: 0 }
        ] {
            items.extend_from_slice(&(item.len() as u32).to_le_bytes());
            items.extend_from_slice(item);
        }
        let path = dir.join(checkpoint::file_name(0, None, 0));
        write(&path, &checkpoint_around(0, [0; 32], &items));
        let (old, _) = checkpoint::read(&OS, &path, &[]).expect("a version 1 checkpoint reads");
        let tag = crate::record::IdempotencyTag {
            caller: "c".into(),
            key: "k".into(),
        };
        assert_eq!(
            old.idempotency,
            vec![checkpoint::IdempotencyEntry {
                tag: tag.clone(),
                seq: 3,
                digest: None
            }]
        );

        let entries = vec![
            checkpoint::IdempotencyEntry {
                tag: tag.clone(),
                seq: 3,
                digest: Some([7; 32]),
            },
            checkpoint::IdempotencyEntry {
                tag: crate::record::IdempotencyTag {
                    caller: "c".into(),
                    key: "older format".into(),
                },
                seq: 2,
                digest: None,
            },
        ];
        let state = base_state();
        let out = dir.join("v2");
        std::fs::create_dir_all(&out).expect("mkdir");
        let w = checkpoint::write(
            &OS,
            &out,
            &checkpoint::file_name(state.seq, None, 0),
            &state,
            &entries,
            [1; 32],
            Some(&checkpoint_keys()),
            &mut |_| {},
        )
        .expect("write");
        let (back, _) =
            checkpoint::read(&OS, &out.join(&w.file), &[&checkpoint_keys()]).expect("read back");
        assert_eq!(back.idempotency, entries, "order and digests kept");
    }

    /// A checkpoint whose rows do not fit their table, or whose keys repeat or
    /// are out of order, fails to read (instead of loading a state that
    /// `check` reports and queries trip over).
    #[test]
    fn checkpoints_with_unfit_rows_or_unordered_keys_are_refused() {
        let dir = scratch("unit-checkpoint");
        let good = base_state();
        let w = checkpoint::write(
            &OS,
            &dir,
            &checkpoint::file_name(good.seq, None, 0),
            &good,
            &[],
            [1; 32],
            None,
            &mut |_| {},
        )
        .expect("write");
        checkpoint::read(&OS, &dir.join(&w.file), &[]).expect("a good checkpoint reads");

        let mut bad = base_state();
        let t = bad
            .projects
            .get_mut("p")
            .and_then(|p| p.scopes.get_mut("s"))
            .and_then(|s| s.tables.get_mut("t"))
            .expect("table");
        let short: Row = vec![Value::Int(1)];
        t.rows.insert(
            Bytes::from(t.schema.row_key(&short)),
            Versioned {
                version: 1,
                value: Some(Arc::new(short)),
            },
        );
        t.live_rows = 1;
        std::fs::remove_dir_all(&dir).expect("rm");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let w = checkpoint::write(
            &OS,
            &dir,
            &checkpoint::file_name(bad.seq, None, 0),
            &bad,
            &[],
            [1; 32],
            None,
            &mut |_| {},
        )
        .expect("write");
        let e = checkpoint::read(&OS, &dir.join(&w.file), &[]).err();
        assert!(
            matches!(e, Some(AedbError::Corruption { .. })),
            "a short row loaded: {e:?}"
        );

        // Repeated keys: the same key twice in the item stream.
        let mut items = Vec::new();
        for item in [
            &b"\x00\x01p"[..],          // Project("p")
            &b"\x01\x01s"[..],          // Scope("s")
            &b"\x03\x01k\x01\x01v"[..], // Kv { key: "k", version: 1, value: "v" }
            &b"\x03\x01k\x01\x01v"[..],
        ] {
            items.extend_from_slice(&(item.len() as u32).to_le_bytes());
            items.extend_from_slice(item);
        }
        let end = b"\x09\x00\x02\x00"; // End { seq: 0, keys: 2, rows: 0 }
        items.extend_from_slice(&(end.len() as u32).to_le_bytes());
        items.extend_from_slice(end);
        let path = dir.join(checkpoint::file_name(0, None, 0));
        write(&path, &checkpoint_around(0, [0; 32], &items));
        let e = checkpoint::read(&OS, &path, &[]).err();
        assert!(
            e.as_ref()
                .is_some_and(|e| e.to_string().contains("out of order or repeated")),
            "repeated keys loaded: {e:?}"
        );
    }
}
