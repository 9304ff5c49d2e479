//! Key derivation, keyed hashing and AES-256-GCM, all from `ring`.
//!
//! One configured key is never used directly for two purposes: each use derives
//! its own subkey with HKDF-SHA256 and a distinct label, and per-file material
//! (WAL segment, checkpoint) adds a fresh random salt, so a (key, nonce) pair can
//! never repeat across files, reopenings, or LSNs reused after permissive recovery.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::config::SecretKey;
use crate::error::AedbError;

pub(crate) const TAG_LEN: usize = 16;
pub(crate) const KEY_ID_LEN: usize = 8;

pub(crate) const LABEL_WAL_FRAME: &[u8] = b"aedb wal frame v1";
pub(crate) const LABEL_WAL_CHAIN: &[u8] = b"aedb wal chain v1";
pub(crate) const LABEL_CHECKPOINT: &[u8] = b"aedb checkpoint v1";
pub(crate) const LABEL_MANIFEST: &[u8] = b"aedb manifest v1";
pub(crate) const LABEL_BACKUP: &[u8] = b"aedb backup v1";
const LABEL_KEY_ID: &[u8] = b"aedb key id v1";

/// Public fingerprint of a key, stored in file headers so a wrong key is reported
/// as such instead of as corruption.
pub(crate) fn key_id(key: &SecretKey) -> [u8; KEY_ID_LEN] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key.expose());
    let tag = hmac::sign(&k, LABEL_KEY_ID);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&tag.as_ref()[..KEY_ID_LEN]);
    id
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// HKDF-SHA256(key, salt, label) -> 32 bytes, zeroized when dropped.
pub(crate) fn derive(key: &SecretKey, salt: &[u8], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key.expose());
    let mut out = Zeroizing::new([0u8; 32]);
    let info = [label];
    let filled = prk
        .expand(&info, Len32)
        .and_then(|okm| okm.fill(out.as_mut()));
    // HKDF-SHA256 refuses only outputs longer than 255 * 32 bytes, so 32 always
    // fits; were it ever to fail, carrying on would key everything with zeros.
    // Fail closed instead.
    assert!(filled.is_ok(), "HKDF-SHA256 could not expand 32 bytes");
    out
}

pub(crate) fn hmac_key(key: &SecretKey, label: &[u8]) -> hmac::Key {
    let k = derive(key, &[], label);
    hmac::Key::new(hmac::HMAC_SHA256, k.as_ref())
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], AedbError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| AedbError::InvalidArgument("the system random source failed".into()))?;
    Ok(b)
}

/// AES-256-GCM under a derived key.
pub(crate) struct Aead {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Aead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aead(<key redacted>)")
    }
}

impl Aead {
    pub fn new(key: &SecretKey, salt: &[u8], label: &[u8]) -> Self {
        let k = derive(key, salt, label);
        // A 32-byte key is always a valid AES-256 key.
        let unbound = UnboundKey::new(&AES_256_GCM, k.as_ref())
            .unwrap_or_else(|_| unreachable!("32-byte AES-256 key"));
        Self {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        }
    }

    /// Encrypts with a fresh random nonce: output is nonce || ciphertext || tag.
    pub fn seal_random(
        &self,
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AedbError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| AedbError::InvalidArgument("the system random source failed".into()))?;
        out.extend_from_slice(&nonce);
        self.seal_with(nonce, aad, plaintext, out)
    }

    /// Encrypts with a caller-chosen nonce (unique under this derived key): output is
    /// ciphertext || tag.
    pub fn seal_with(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AedbError> {
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[start..],
            )
            .map_err(|_| AedbError::InvalidArgument("encryption failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts nonce || ciphertext || tag.
    pub fn open_random(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[..NONCE_LEN]);
        self.open_with(nonce, aad, &sealed[NONCE_LEN..])
    }

    pub fn open_with(&self, nonce: [u8; NONCE_LEN], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .ok()?;
        let n = plain.len();
        buf.truncate(n);
        Some(buf)
    }
}

/// Counter nonce for chunk `index` of one file (the file's key is unique to it).
pub(crate) fn counter_nonce(index: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&index.to_be_bytes());
    n
}

/// Constant-time equality for MACs and hashes.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_never_zero_and_separate_labels_and_salts() {
        let key = SecretKey::new([7; 32]);
        let a = derive(&key, b"", b"label-a");
        let b = derive(&key, b"", b"label-b");
        let c = derive(&key, b"salt", b"label-a");
        for k in [&a, &b, &c] {
            assert_ne!(**k, [0u8; 32]);
        }
        assert_ne!(*a, *b);
        assert_ne!(*a, *c);
        assert_eq!(*a, *derive(&key, b"", b"label-a"), "deterministic");
    }
}
