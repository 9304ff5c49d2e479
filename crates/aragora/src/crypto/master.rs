//! The master key: wraps data keys for storage, and does nothing else.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::envelope::{KEY_LEN, NONCE_LEN, TAG_LEN, validate_key_id};
use super::{CryptoError, DataKey};
use crate::config::Key32;

/// `WrappedKey::alg` of keys this code writes; anything else is refused so a
/// future scheme cannot be misread as this one.
pub const WRAP_ALG: &str = "AES-256-GCM";

/// Domain-separates wrap AADs from every other use of AES-GCM under a key.
const WRAP_DOMAIN: &[u8] = b"aragora/data-key-wrap/v1";

/// The 32-byte key from `ARAGORA_ENCRYPTION_KEY`. Zeroized on drop, never
/// printed. It holds only raw bytes: wrapping is rare, so the AES key schedule
/// (which ring does not zeroize) is built per call and dropped straight away.
pub struct MasterKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

/// A data key encrypted under the master key, in a form that stores as JSON.
/// `nonce` and `ciphertext` (key + tag) are lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub alg: String,
    pub key_id: String,
    pub version: u32,
    pub nonce: String,
    pub ciphertext: String,
}

impl MasterKey {
    pub fn from_key32(key: &Key32) -> Self {
        Self::from_bytes(Zeroizing::new(key.bytes()))
    }

    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self { bytes }
    }

    /// A 32-byte key for another purpose, derived (HKDF-SHA256) so it reveals
    /// nothing about this one; `info` names the purpose.
    pub fn derive_subkey(&self, info: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
        super::kdf::derive_subkey(self.bytes.as_ref(), b"aragora", info)
    }

    /// Encrypts `dek` for storage. The AAD binds the wrapped bytes to the
    /// key's id and version, so a stored wrapped key copied under another
    /// name will not unwrap.
    pub fn wrap(&self, dek: &DataKey) -> Result<WrappedKey, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CryptoError::Rng)?;
        let mut buf = Zeroizing::new(Vec::with_capacity(KEY_LEN + TAG_LEN));
        buf.extend_from_slice(dek.secret_bytes());
        self.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(dek.key_id(), dek.version())),
                &mut *buf,
            )
            .map_err(|_| CryptoError::malformed("AES-GCM refused to seal a data key"))?;
        Ok(WrappedKey {
            alg: WRAP_ALG.to_owned(),
            key_id: dek.key_id().to_owned(),
            version: dek.version(),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(&*buf),
        })
    }

    /// Decrypts a stored data key. Fails with [`CryptoError::UnwrapFailed`]
    /// under another master key, or if the wrapped key was altered or
    /// relabelled with another id or version.
    pub fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, CryptoError> {
        if wrapped.alg != WRAP_ALG {
            return Err(CryptoError::malformed(format!(
                "wrapped key {} v{} uses unsupported algorithm {:?}",
                wrapped.key_id, wrapped.version, wrapped.alg
            )));
        }
        validate_key_id(&wrapped.key_id)?;
        let mut nonce = [0u8; NONCE_LEN];
        hex::decode_to_slice(&wrapped.nonce, &mut nonce)
            .map_err(|_| CryptoError::malformed("wrapped key nonce is not 12 hex-encoded bytes"))?;
        let mut buf = Zeroizing::new([0u8; KEY_LEN + TAG_LEN]);
        hex::decode_to_slice(&wrapped.ciphertext, &mut *buf).map_err(|_| {
            CryptoError::malformed("wrapped key ciphertext is not 48 hex-encoded bytes")
        })?;
        let opened = self.aead()?.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(wrap_aad(&wrapped.key_id, wrapped.version)),
            &mut *buf,
        );
        let Ok(plain) = opened else {
            buf.zeroize();
            return Err(CryptoError::UnwrapFailed {
                key_id: wrapped.key_id.clone(),
                version: wrapped.version,
            });
        };
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(plain);
        DataKey::from_bytes(wrapped.key_id.clone(), wrapped.version, bytes)
    }

    /// A short public identifier of this master key (HMAC of a fixed label),
    /// for telling "the key ring was wrapped by a different master key" apart
    /// from corruption, and for naming backups. Reveals nothing usable about
    /// the key.
    pub fn fingerprint(&self) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.bytes.as_ref());
        let tag = hmac::sign(&key, b"aragora/master-key-fingerprint/v1");
        hex::encode(&tag.as_ref()[..8])
    }

    fn aead(&self) -> Result<LessSafeKey, CryptoError> {
        UnboundKey::new(&AES_256_GCM, self.bytes.as_ref())
            .map(LessSafeKey::new)
            .map_err(|_| CryptoError::malformed("AES-256-GCM rejected the master key bytes"))
    }
}

impl From<&Key32> for MasterKey {
    fn from(key: &Key32) -> Self {
        Self::from_key32(key)
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// Domain || id length || id || version: length-prefixed so no two
/// (id, version) pairs share an AAD.
fn wrap_aad(key_id: &str, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_DOMAIN.len() + 1 + key_id.len() + 4);
    aad.extend_from_slice(WRAP_DOMAIN);
    // validate_key_id (DataKey construction, or unwrap) bounds this to 255.
    aad.push(key_id.len() as u8);
    aad.extend_from_slice(key_id.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_key;
    use crate::crypto::{decrypt, encrypt};

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn master() -> MasterKey {
        MasterKey::from_key32(&parse_key("ARAGORA_ENCRYPTION_KEY", Some(HEX)).expect("valid hex"))
    }

    fn other_master() -> MasterKey {
        MasterKey::from_bytes(Zeroizing::new([0x42; KEY_LEN]))
    }

    fn dek(id: &str, version: u32) -> DataKey {
        DataKey::generate(id, version).expect("OS RNG available in tests")
    }

    #[test]
    fn wrap_unwrap_round_trip_through_json() {
        let m = master();
        let original = dek("k1", 4);
        let env = encrypt(&original, "rec", b"payload").expect("encrypt");
        let wrapped = m.wrap(&original).expect("wrap");
        assert_eq!(wrapped.alg, WRAP_ALG);
        assert!(
            !wrapped
                .ciphertext
                .contains(&hex::encode(original.secret_bytes()))
        );

        let json = serde_json::to_string(&wrapped).expect("serialize");
        let back: WrappedKey = serde_json::from_str(&json).expect("deserialize");
        let restored = m.unwrap(&back).expect("unwrap");
        assert_eq!((restored.key_id(), restored.version()), ("k1", 4));
        assert_eq!(restored.secret_bytes(), original.secret_bytes());
        assert_eq!(
            decrypt(&restored, "rec", &env).expect("decrypt"),
            b"payload"
        );
    }

    #[test]
    fn wrapping_twice_uses_fresh_nonces() {
        let (m, k) = (master(), dek("k1", 1));
        let (a, b) = (m.wrap(&k).expect("wrap"), m.wrap(&k).expect("wrap"));
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn another_master_key_cannot_unwrap() {
        let wrapped = master().wrap(&dek("k1", 1)).expect("wrap");
        let err = other_master().unwrap(&wrapped).expect_err("wrong master");
        assert_eq!(
            err,
            CryptoError::UnwrapFailed {
                key_id: "k1".into(),
                version: 1
            }
        );
    }

    #[test]
    fn wrapped_key_moved_to_another_id_or_version_fails() {
        let m = master();
        let wrapped = m.wrap(&dek("k1", 1)).expect("wrap");
        let moved_id = WrappedKey {
            key_id: "k2".into(),
            ..wrapped.clone()
        };
        let moved_version = WrappedKey {
            version: 2,
            ..wrapped.clone()
        };
        for moved in [moved_id, moved_version] {
            assert!(matches!(
                m.unwrap(&moved),
                Err(CryptoError::UnwrapFailed { .. })
            ));
        }
    }

    #[test]
    fn tampered_or_malformed_wrapped_keys_are_rejected() {
        let m = master();
        let wrapped = m.wrap(&dek("k1", 1)).expect("wrap");
        let mut flipped = wrapped.clone();
        let first = if flipped.ciphertext.starts_with('0') {
            "1"
        } else {
            "0"
        };
        flipped.ciphertext.replace_range(..1, first);
        assert!(matches!(
            m.unwrap(&flipped),
            Err(CryptoError::UnwrapFailed { .. })
        ));

        let bad_alg = WrappedKey {
            alg: "AES-128-GCM".into(),
            ..wrapped.clone()
        };
        let short = WrappedKey {
            ciphertext: wrapped.ciphertext[..10].to_owned(),
            ..wrapped.clone()
        };
        let not_hex = WrappedKey {
            nonce: "zz".repeat(NONCE_LEN),
            ..wrapped.clone()
        };
        for bad in [bad_alg, short, not_hex] {
            assert!(matches!(m.unwrap(&bad), Err(CryptoError::Malformed { .. })));
        }
    }

    #[test]
    fn fingerprint_is_stable_and_distinguishes_keys() {
        assert_eq!(master().fingerprint(), master().fingerprint());
        assert_ne!(master().fingerprint(), other_master().fingerprint());
        assert_eq!(master().fingerprint().len(), 16);
    }

    #[test]
    fn debug_is_redacted() {
        let shown = format!("{:?} {:#?}", master(), master());
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(!shown.contains(HEX) && !shown.contains("0a0b0c"), "{shown}");
        let wrapped = master().wrap(&dek("k1", 1)).expect("wrap");
        let err = other_master().unwrap(&wrapped).expect_err("wrong master");
        assert!(!err.to_string().contains(HEX));
    }
}
