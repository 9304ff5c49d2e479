//! The keys a WAL is written and read with.

use crate::config::SecretKey;
use crate::crypto::{self, Aead, LABEL_WAL_CHAIN, LABEL_WAL_FRAME};
use crate::error::AedbError;

use super::format::{FLAG_ENCRYPTED, FLAG_KEYED_CHAIN, SegmentHeader};

/// Chain key (from the manifest key) and frame-encryption keys (current, and the
/// previous one during a key rotation).
#[derive(Clone, Default)]
pub(crate) struct WalKeys {
    pub chain: Option<ring::hmac::Key>,
    pub frame: Option<(SecretKey, [u8; 8])>,
    pub previous_frame: Option<(SecretKey, [u8; 8])>,
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
            frame: frame_key.map(|k| (k.clone(), crypto::key_id(k))),
            previous_frame: previous_frame_key.map(|k| (k.clone(), crypto::key_id(k))),
        }
    }

    /// True when a segment with `h` was written with exactly the current keys, so the
    /// writer may continue appending to it.
    pub fn writes_like(&self, h: &SegmentHeader) -> bool {
        h.flags == self.flags() && self.frame.as_ref().is_none_or(|(_, id)| *id == h.key_id)
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
