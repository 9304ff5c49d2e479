//! Byte layout of WAL segments and frames (documented in FORMAT.md).
//!
//! Segment header (128 bytes):
//!   0..8 magic "AEDBWAL\0" | 8..12 format version | 12..16 flags | 16..24 segment index |
//!   24..32 first LSN | 32..64 chain hash before the first frame | 64..80 salt |
//!   80..88 id of the frame-encryption key (zero when not encrypted) |
//!   88..96 id of the manifest key whose chain key chains the frames (zero when the
//!   chain is not keyed, and in segments written before it was recorded) |
//!   96..124 reserved (zero) | 124..128 CRC32C of bytes 0..124
//! Flags: bit 0 = frames encrypted (AES-256-GCM), bit 1 = keyed chain (HMAC-SHA256).
//! Frame header (48 bytes), then the payload:
//!   0..4 payload length (>= 1; bit 31 marks the first frame of a write batch) |
//!   4..8 CRC32C of bytes 8..48 and the payload |
//!   8..16 LSN | 16..48 chain hash = H(previous hash || LSN || length || payload), where H is
//!   HMAC-SHA256 under a key derived from the manifest key (flag bit 1), else SHA-256.
//! A zero frame header marks the end of the written part of a (preallocated) segment.

use sha2::{Digest, Sha256};

pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"AEDBWAL\0";
pub(crate) const FORMAT_VERSION: u32 = 1;
pub(crate) const SEGMENT_HEADER_LEN: usize = 128;
pub(crate) const FRAME_HEADER_LEN: usize = 48;

pub(crate) type ChainHash = [u8; 32];

/// Bit 31 of a frame's length word: the first frame written after a completed fdatasync.
/// Everything before such a frame was durable when it was written, so damage
/// followed by a valid batch start is damage to acknowledged data, never a torn
/// write. (Not covered by the CRC: a flipped flag can only change that verdict.)
pub(crate) const BATCH_START: u32 = 1 << 31;

pub(crate) const FLAG_ENCRYPTED: u32 = 1;
pub(crate) const FLAG_KEYED_CHAIN: u32 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub version: u32,
    pub flags: u32,
    pub index: u64,
    pub first_lsn: u64,
    pub prev_hash: ChainHash,
    pub salt: [u8; 16],
    pub key_id: [u8; 8],
    /// Id of the manifest key the chain is keyed with (zero: unkeyed, or not
    /// recorded by the version that wrote the segment).
    pub chain_key_id: [u8; 8],
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.index.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_lsn.to_le_bytes());
        b[32..64].copy_from_slice(&self.prev_hash);
        b[64..80].copy_from_slice(&self.salt);
        b[80..88].copy_from_slice(&self.key_id);
        b[88..96].copy_from_slice(&self.chain_key_id);
        let crc = crc32c::crc32c(&b[0..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header; the error says which field is wrong.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < SEGMENT_HEADER_LEN {
            return Err(format!(
                "segment shorter than its {SEGMENT_HEADER_LEN}-byte header ({} bytes)",
                b.len()
            ));
        }
        if &b[0..8] != SEGMENT_MAGIC {
            return Err("bad segment magic (not an aedb WAL segment)".into());
        }
        let stored = u32_at(b, 124);
        if crc32c::crc32c(&b[0..124]) != stored {
            return Err("segment header checksum mismatch".into());
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "unsupported segment format version {version} (this build reads {FORMAT_VERSION})"
            ));
        }
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(&b[32..64]);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&b[64..80]);
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&b[80..88]);
        let mut chain_key_id = [0u8; 8];
        chain_key_id.copy_from_slice(&b[88..96]);
        Ok(Self {
            version,
            flags: u32_at(b, 12),
            index: u64_at(b, 16),
            first_lsn: u64_at(b, 24),
            prev_hash,
            salt,
            key_id,
            chain_key_id,
        })
    }
}

pub(crate) fn chain_hash(
    keyed: Option<&ring::hmac::Key>,
    prev: &ChainHash,
    lsn: u64,
    payload: &[u8],
) -> ChainHash {
    match keyed {
        Some(key) => {
            let mut ctx = ring::hmac::Context::with_key(key);
            ctx.update(prev);
            ctx.update(&lsn.to_le_bytes());
            ctx.update(&(payload.len() as u32).to_le_bytes());
            ctx.update(payload);
            let mut out = [0u8; 32];
            out.copy_from_slice(ctx.sign().as_ref());
            out
        }
        None => {
            let mut h = Sha256::new();
            h.update(prev);
            h.update(lsn.to_le_bytes());
            h.update((payload.len() as u32).to_le_bytes());
            h.update(payload);
            h.finalize().into()
        }
    }
}

/// Appends one frame to `out` and returns its chain hash.
pub(crate) fn encode_frame(
    out: &mut Vec<u8>,
    keyed: Option<&ring::hmac::Key>,
    prev: &ChainHash,
    lsn: u64,
    payload: &[u8],
) -> ChainHash {
    debug_assert!(
        !payload.is_empty(),
        "an empty payload would read as end-of-segment"
    );
    let hash = chain_hash(keyed, prev, lsn, payload);
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&hash);
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    hash
}

/// A frame as it sits in a segment buffer (not yet checked).
pub(crate) struct RawFrame<'a> {
    pub len: u32,
    pub batch_start: bool,
    pub crc: u32,
    pub lsn: u64,
    pub hash: ChainHash,
    /// Header bytes 8..48 followed by the payload, exactly what the CRC covers.
    pub covered_header: &'a [u8],
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    pub fn crc_ok(&self) -> bool {
        let c = crc32c::crc32c_append(crc32c::crc32c(self.covered_header), self.payload);
        c == self.crc
    }
}

/// What sits at `pos` of a segment buffer.
pub(crate) enum FrameAt<'a> {
    /// A zero header: nothing was written from here on.
    End,
    /// Fewer bytes left than a header, or than the header's length says.
    Truncated,
    Frame(RawFrame<'a>),
}

pub(crate) fn frame_at(buf: &[u8], pos: usize) -> FrameAt<'_> {
    let Some(h) = buf.get(pos..pos + FRAME_HEADER_LEN) else {
        return if buf[pos.min(buf.len())..].iter().all(|&b| b == 0) {
            FrameAt::End
        } else {
            FrameAt::Truncated
        };
    };
    let raw_len = u32_at(h, 0);
    let len = raw_len & !BATCH_START;
    let crc = u32_at(h, 4);
    if len == 0 && crc == 0 && h.iter().all(|&b| b == 0) {
        return FrameAt::End;
    }
    let end = pos + FRAME_HEADER_LEN + len as usize;
    let Some(payload) = buf.get(pos + FRAME_HEADER_LEN..end) else {
        return FrameAt::Truncated;
    };
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&h[16..48]);
    FrameAt::Frame(RawFrame {
        len,
        batch_start: raw_len & BATCH_START != 0,
        crc,
        lsn: u64_at(h, 8),
        hash,
        covered_header: &h[8..48],
        payload,
    })
}

pub(crate) fn segment_file_name(index: u64) -> String {
    format!("wal-{index:016}.seg")
}

pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".seg")?;
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_crc() {
        let mut buf = vec![];
        let h = encode_frame(&mut buf, None, &[0; 32], 7, b"hello");
        match frame_at(&buf, 0) {
            FrameAt::Frame(f) => {
                assert!(f.crc_ok());
                assert_eq!(f.lsn, 7);
                assert_eq!(f.hash, h);
                assert_eq!(f.payload, b"hello");
            }
            _ => panic!("expected a frame"),
        }
        buf[50] ^= 1;
        match frame_at(&buf, 0) {
            FrameAt::Frame(f) => assert!(!f.crc_ok()),
            _ => panic!("expected a frame"),
        }
        buf.extend_from_slice(&[0; 48]);
        assert!(matches!(frame_at(&buf, 53), FrameAt::End));
        assert!(matches!(frame_at(&buf[..40], 0), FrameAt::Truncated));
    }

    #[test]
    fn segment_names() {
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("wal-12.seg"), None);
    }
}
