//! The keys a WAL is written and read with.

use crate::config::SecretKey;
use crate::crypto::{self, Aead, LABEL_WAL_CHAIN, LABEL_WAL_FRAME};
use crate::error::AedbError;

use super::format::{
    FLAG_ENCRYPTED, FLAG_KEYED_CHAIN, FrameAt, SEGMENT_HEADER_LEN, SegmentHeader, chain_hash,
    frame_at,
};

/// Chain keys (from the manifest key: current, and the previous one during a
/// manifest key rotation) and frame-encryption keys (current, and the previous one
/// during a checkpoint key rotation).
#[derive(Clone, Default)]
pub(crate) struct WalKeys {
    pub chain: Option<ring::hmac::Key>,
    /// Id of the manifest key `chain` derives from (zero without one): new
    /// segment headers record it.
    pub chain_id: [u8; 8],
    pub previous_chain: Option<(ring::hmac::Key, [u8; 8])>,
    pub frame: Option<(SecretKey, [u8; 8])>,
    pub previous_frame: Option<(SecretKey, [u8; 8])>,
}

/// Which key a segment's hash chain is verified with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SegmentChain<'a> {
    /// SHA-256 (no manifest key).
    Plain,
    /// The current manifest key's chain key.
    Current(&'a ring::hmac::Key),
    /// The previous manifest key's chain key, with that key's id.
    Previous(&'a ring::hmac::Key, [u8; 8]),
    /// A manifest key that is not configured: `Some(id)` as the header records
    /// it, `None` for a segment that records no id (written before ids were
    /// recorded) whose first frame verifies under no configured key.
    Unknown(Option<[u8; 8]>),
}

impl std::fmt::Debug for WalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalKeys")
            .field("keyed_chain", &self.chain.is_some())
            .field("encrypted", &self.frame.is_some())
            .finish()
    }
}

impl WalKeys {
    pub fn new(
        manifest_key: Option<&SecretKey>,
        frame_key: Option<&SecretKey>,
        previous_frame_key: Option<&SecretKey>,
    ) -> Self {
        Self {
            chain: manifest_key.map(|k| crypto::hmac_key(k, LABEL_WAL_CHAIN)),
            chain_id: manifest_key.map(crypto::key_id).unwrap_or_default(),
            previous_chain: None,
            frame: frame_key.map(|k| (k.clone(), crypto::key_id(k))),
            previous_frame: previous_frame_key.map(|k| (k.clone(), crypto::key_id(k))),
        }
    }

    /// Also verifies segments chained under `previous` (the manifest key being
    /// rotated away from). Ignored without a current manifest key.
    pub fn with_previous_chain(mut self, previous: Option<&SecretKey>) -> Self {
        if self.chain.is_some() {
            self.previous_chain =
                previous.map(|k| (crypto::hmac_key(k, LABEL_WAL_CHAIN), crypto::key_id(k)));
        }
        self
    }

    /// True when a segment with `h` was written with exactly the current keys, so the
    /// writer may continue appending to it (a segment never mixes keys).
    pub fn writes_like(&self, h: &SegmentHeader) -> bool {
        h.flags == self.flags()
            && self.frame.as_ref().is_none_or(|(_, id)| *id == h.key_id)
            && h.chain_key_id == self.chain_id
    }

    /// The chain key of the segment with header `h` and bytes `buf` (the whole
    /// file). Its keyed-chain flag must match the configuration (`reader_cipher`
    /// checks that first). A header that records no key id (written before ids
    /// were recorded) is matched by its first frame.
    pub fn chain_for<'a>(&'a self, h: &SegmentHeader, buf: &[u8]) -> SegmentChain<'a> {
        let Some(current) = self.chain.as_ref() else {
            return SegmentChain::Plain;
        };
        if h.flags & FLAG_KEYED_CHAIN == 0 {
            return SegmentChain::Plain;
        }
        if h.chain_key_id != [0; 8] {
            if h.chain_key_id == self.chain_id {
                return SegmentChain::Current(current);
            }
            return match &self.previous_chain {
                Some((k, id)) if *id == h.chain_key_id => SegmentChain::Previous(k, *id),
                _ => SegmentChain::Unknown(Some(h.chain_key_id)),
            };
        }
        let FrameAt::Frame(f) = frame_at(buf, SEGMENT_HEADER_LEN) else {
            return SegmentChain::Current(current);
        };
        if !f.crc_ok() {
            return SegmentChain::Current(current);
        }
        let matches = |k: &ring::hmac::Key| {
            crypto::ct_eq(
                &chain_hash(Some(k), &h.prev_hash, f.lsn, f.payload),
                &f.hash,
            )
        };
        if matches(current) {
            return SegmentChain::Current(current);
        }
        match &self.previous_chain {
            Some((k, id)) if matches(k) => SegmentChain::Previous(k, *id),
            _ => SegmentChain::Unknown(None),
        }
    }

    /// Why a segment chained under an unconfigured manifest key cannot be read.
    pub fn unknown_chain_reason(&self, id: Option<[u8; 8]>) -> String {
        let recorded = id.map_or_else(
            || "a manifest key that is not configured (its first frame verifies under neither the manifest key nor the previous manifest key)".to_string(),
            |id| format!("the manifest key with id {}", hex::encode(id)),
        );
        format!(
            "segment is chained under {recorded}; the configured manifest key has id {}, the previous manifest key {}",
            hex::encode(self.chain_id),
            self.previous_chain.as_ref().map_or_else(
                || "is not set".to_string(),
                |(_, id)| format!("has id {}", hex::encode(id))
            )
        )
    }

    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.frame.is_some() {
            f |= FLAG_ENCRYPTED;
        }
        if self.chain.is_some() {
            f |= FLAG_KEYED_CHAIN;
        }
        f
    }

    /// A fresh header's key id and the cipher for a new segment with `salt`.
    pub fn writer_cipher(&self, salt: &[u8; 16]) -> (Option<Aead>, [u8; 8]) {
        match &self.frame {
            Some((k, id)) => (Some(Aead::new(k, salt, LABEL_WAL_FRAME)), *id),
            None => (None, [0; 8]),
        }
    }

    /// The cipher for reading an existing segment, or a clear reason why its
    /// keying does not match this configuration.
    pub fn reader_cipher(&self, h: &SegmentHeader) -> Result<Option<Aead>, String> {
        let keyed = h.flags & FLAG_KEYED_CHAIN != 0;
        if keyed != self.chain.is_some() {
            return Err(if keyed {
                "segment was written with a manifest key (keyed hash chain), but none is configured"
                    .into()
            } else {
                "segment was written without a manifest key, but one is configured".into()
            });
        }
        if h.flags & FLAG_ENCRYPTED == 0 {
            return Ok(None);
        }
        for (k, id) in [&self.frame, &self.previous_frame].into_iter().flatten() {
            if *id == h.key_id {
                return Ok(Some(Aead::new(k, &h.salt, LABEL_WAL_FRAME)));
            }
        }
        Err(format!(
            "segment is encrypted with key id {}, configured key id is {}",
            hex::encode(h.key_id),
            self.frame
                .as_ref()
                .map_or_else(|| "none".to_string(), |(_, id)| hex::encode(id))
        ))
    }
}

/// Associated data binding an encrypted frame to its position in the log.
pub(crate) fn frame_aad(lsn: u64) -> [u8; 8] {
    lsn.to_le_bytes()
}

pub(crate) fn decrypt_frame(cipher: &Aead, lsn: u64, payload: &[u8]) -> Result<Vec<u8>, AedbError> {
    cipher.open_random(&frame_aad(lsn), payload).ok_or_else(|| {
        AedbError::InvalidArgument(format!("frame at LSN {lsn} fails authentication"))
    })
}
