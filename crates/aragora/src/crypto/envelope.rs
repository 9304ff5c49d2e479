//! Record encryption: a data key turns one record into one self-describing
//! envelope.
//!
//! Layout (integers big-endian):
//!
//! | bytes | field                                   |
//! |-------|-----------------------------------------|
//! | 4     | magic `ARG1` (the `1` is the format)    |
//! | 1     | key id length `n`, 1..=255              |
//! | n     | key id, UTF-8                           |
//! | 4     | key version                             |
//! | 12    | nonce, fresh from the OS per record     |
//! | rest  | ciphertext, then the 16-byte GCM tag    |
//!
//! The header is magic through version. AAD = header || record id: the
//! header is self-delimiting, so the concatenation is unambiguous, and
//! authenticating it means a relabelled key id/version or a record copied
//! under another id fails the tag check instead of decrypting.

use std::fmt;
use std::ops::Deref;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use super::CryptoError;

/// Envelope magic and format version.
pub const MAGIC: &[u8; 4] = b"ARG1";
/// AES-256 key length.
pub const KEY_LEN: usize = 32;
/// Key ids are length-prefixed with one byte.
pub const MAX_KEY_ID_LEN: usize = 255;
/// AES-GCM nonce length.
pub const NONCE_LEN: usize = ring::aead::NONCE_LEN;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;

/// Header bytes besides the key id: magic, id length, version.
const HEADER_FIXED: usize = MAGIC.len() + 1 + 4;
/// AADs up to this size are built on the stack (header with a 32-byte key
/// id plus a 119-byte record id); longer ones take one heap allocation. Kept
/// small because the buffer is zeroed on every call.
const AAD_STACK: usize = 192;

/// A record-encryption key: 32 secret bytes named by `key_id` and `version`.
///
/// Holds the expanded AES key so per-record work is only nonce + seal/open.
/// Share it behind an `Arc` rather than cloning the secret around.
pub struct DataKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    key_id: String,
    version: u32,
    aead: LessSafeKey,
}

impl DataKey {
    /// A fresh random key.
    pub fn generate(key_id: impl Into<String>, version: u32) -> Result<Self, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| CryptoError::Rng)?;
        Self::from_bytes(key_id, version, bytes)
    }

    /// A key from known bytes (e.g. just unwrapped). The key id must be
    /// 1..=255 bytes so it fits the envelope header.
    pub fn from_bytes(
        key_id: impl Into<String>,
        version: u32,
        bytes: Zeroizing<[u8; KEY_LEN]>,
    ) -> Result<Self, CryptoError> {
        let key_id = key_id.into();
        validate_key_id(&key_id)?;
        let unbound = UnboundKey::new(&AES_256_GCM, bytes.as_ref())
            .map_err(|_| CryptoError::malformed("AES-256-GCM rejected the key bytes"))?;
        Ok(Self {
            bytes,
            key_id,
            version,
            aead: LessSafeKey::new(unbound),
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The header this key writes, i.e. the name under which to look it up.
    pub fn header(&self) -> EnvelopeHeader {
        EnvelopeHeader {
            key_id: self.key_id.clone(),
            version: self.version,
        }
    }

    /// Only for wrapping under the master key.
    pub(super) fn secret_bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("key_id", &self.key_id)
            .field("version", &self.version)
            .field("key", &format_args!("<redacted>"))
            .finish()
    }
}

/// Which key an envelope was encrypted under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EnvelopeHeader {
    pub key_id: String,
    pub version: u32,
}

pub(super) fn validate_key_id(key_id: &str) -> Result<(), CryptoError> {
    if key_id.is_empty() || key_id.len() > MAX_KEY_ID_LEN {
        return Err(CryptoError::malformed(format!(
            "key id must be 1..={MAX_KEY_ID_LEN} bytes, got {}",
            key_id.len()
        )));
    }
    Ok(())
}

/// Total envelope size for a key id of `key_id_len` bytes and a plaintext of
/// `plaintext_len` bytes.
pub fn envelope_len(key_id_len: usize, plaintext_len: usize) -> usize {
    HEADER_FIXED + key_id_len + NONCE_LEN + plaintext_len + TAG_LEN
}

/// Encrypts `plaintext` for the record `record_id` under `dek`.
///
/// Fails only if the OS random number generator does.
pub fn encrypt(dek: &DataKey, record_id: &str, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| CryptoError::Rng)?;

    let id = dek.key_id.as_bytes();
    let mut out = Vec::with_capacity(envelope_len(id.len(), plaintext.len()));
    out.extend_from_slice(MAGIC);
    // validate_key_id at construction guarantees the length fits one byte.
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(&dek.version.to_be_bytes());
    let header_len = out.len();
    out.extend_from_slice(&nonce);
    let body_start = out.len();
    out.extend_from_slice(plaintext);

    let (head, body) = out.split_at_mut(body_start);
    let tag = with_aad(&head[..header_len], record_id, |aad| {
        dek.aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), aad, body)
    })
    // Sealing fails only for inputs beyond GCM's ~64 GiB limit.
    .map_err(|_| CryptoError::malformed("plaintext too long for AES-GCM"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Reads which key an envelope needs, without decrypting it.
pub fn parse_header(envelope: &[u8]) -> Result<EnvelopeHeader, CryptoError> {
    let p = parse(envelope)?;
    Ok(EnvelopeHeader {
        key_id: p.key_id_str()?.to_owned(),
        version: p.version,
    })
}

/// Decrypts the envelope of record `record_id` with `dek`, which must be the
/// key the header names: another key is refused, never tried.
pub fn decrypt(dek: &DataKey, record_id: &str, envelope: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let p = parse(envelope)?;
    p.check_key(dek)?;
    open(dek, record_id, &p)
}

/// Decrypts with the key `lookup` returns for the header's (key id,
/// version); `None` gives [`CryptoError::UnknownKey`]. The key ring's read
/// path: exactly one lookup, no fallback.
pub fn decrypt_with<K>(
    record_id: &str,
    envelope: &[u8],
    lookup: impl FnOnce(&str, u32) -> Option<K>,
) -> Result<Vec<u8>, CryptoError>
where
    K: Deref<Target = DataKey>,
{
    let p = parse(envelope)?;
    let key_id = p.key_id_str()?;
    let dek = lookup(key_id, p.version).ok_or_else(|| CryptoError::UnknownKey {
        key_id: key_id.to_owned(),
        version: p.version,
    })?;
    p.check_key(&dek)?;
    open(&dek, record_id, &p)
}

struct Parsed<'a> {
    header: &'a [u8],
    // Bytes, not str: the hot path compares them with the key's id, and only
    // lookups and errors need them as text.
    key_id: &'a [u8],
    version: u32,
    nonce: [u8; NONCE_LEN],
    sealed: &'a [u8],
}

impl Parsed<'_> {
    fn key_id_str(&self) -> Result<&str, CryptoError> {
        std::str::from_utf8(self.key_id)
            .map_err(|_| CryptoError::malformed("envelope key id is not UTF-8"))
    }

    fn check_key(&self, dek: &DataKey) -> Result<(), CryptoError> {
        if self.key_id == dek.key_id.as_bytes() && self.version == dek.version {
            return Ok(());
        }
        Err(CryptoError::WrongKey {
            envelope_key_id: String::from_utf8_lossy(self.key_id).into_owned(),
            envelope_version: self.version,
            given_key_id: dek.key_id.clone(),
            given_version: dek.version,
        })
    }
}

fn parse(envelope: &[u8]) -> Result<Parsed<'_>, CryptoError> {
    let Some((magic, rest)) = envelope.split_first_chunk::<4>() else {
        return Err(CryptoError::malformed("envelope shorter than its magic"));
    };
    if magic != MAGIC {
        return Err(CryptoError::malformed(if magic[..3] == MAGIC[..3] {
            "unsupported envelope format version"
        } else {
            "not an aragora envelope (bad magic)"
        }));
    }
    let Some((&id_len, rest)) = rest.split_first() else {
        return Err(CryptoError::malformed("envelope truncated in its header"));
    };
    let id_len = usize::from(id_len);
    if id_len == 0 {
        return Err(CryptoError::malformed("envelope names an empty key id"));
    }
    if rest.len() < id_len + 4 + NONCE_LEN + TAG_LEN {
        return Err(CryptoError::malformed("envelope truncated"));
    }
    let (key_id, rest) = rest.split_at(id_len);
    let (version, rest) = rest.split_at(4);
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let mut v = [0u8; 4];
    v.copy_from_slice(version);
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(nonce);
    Ok(Parsed {
        header: &envelope[..HEADER_FIXED + id_len],
        key_id,
        version: u32::from_be_bytes(v),
        nonce: n,
        sealed,
    })
}

fn open(dek: &DataKey, record_id: &str, p: &Parsed<'_>) -> Result<Vec<u8>, CryptoError> {
    let mut out = p.sealed.to_vec();
    let opened = with_aad(p.header, record_id, |aad| {
        dek.aead
            .open_in_place(Nonce::assume_unique_for_key(p.nonce), aad, &mut out)
            .map(|plain| plain.len())
    });
    match opened {
        Ok(len) => {
            out.truncate(len);
            Ok(out)
        }
        Err(_) => {
            // ring may leave unauthenticated plaintext in the buffer.
            out.zeroize();
            Err(CryptoError::AadMismatch {
                record_id: record_id.to_owned(),
            })
        }
    }
}

/// Runs `f` with AAD = `header` || `record_id`, contiguous as ring needs it,
/// without a heap allocation for ordinary record ids.
fn with_aad<R>(header: &[u8], record_id: &str, f: impl FnOnce(Aad<&[u8]>) -> R) -> R {
    let len = header.len() + record_id.len();
    let mut stack = [0u8; AAD_STACK];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if len <= AAD_STACK {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    buf[..header.len()].copy_from_slice(header);
    buf[header.len()..].copy_from_slice(record_id.as_bytes());
    f(Aad::from(&*buf))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn key(id: &str, version: u32) -> DataKey {
        DataKey::generate(id, version).expect("OS RNG available in tests")
    }

    fn same_bytes_as(dek: &DataKey, id: &str, version: u32) -> DataKey {
        DataKey::from_bytes(id, version, Zeroizing::new(*dek.secret_bytes())).expect("valid key id")
    }

    fn seal(dek: &DataKey, record: &str, plain: &[u8]) -> Vec<u8> {
        encrypt(dek, record, plain).expect("encrypt")
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn round_trips_0_64_and_16k() {
        let dek = key("k-primary", 3);
        for len in [0, 64, 16 * 1024] {
            let plain = sample(len);
            let env = seal(&dek, "rec-1", &plain);
            assert_eq!(env.len(), envelope_len("k-primary".len(), len));
            assert_eq!(&env[..4], MAGIC);
            if len > 0 {
                assert_ne!(
                    &env[env.len() - TAG_LEN - len..env.len() - TAG_LEN],
                    &plain[..]
                );
            }
            assert_eq!(decrypt(&dek, "rec-1", &env).expect("round trip"), plain);
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let dek = key("k", 1);
        assert_ne!(seal(&dek, "r", b"same"), seal(&dek, "r", b"same"));
    }

    #[test]
    fn header_names_the_key() {
        let dek = key("k-2025-06", 7);
        let env = seal(&dek, "r", b"x");
        assert_eq!(parse_header(&env).expect("header"), dek.header());
    }

    #[test]
    fn another_key_is_refused_not_tried() {
        let dek = key("k1", 1);
        let env = seal(&dek, "r", b"secret");
        for other in [key("k2", 1), key("k1", 2)] {
            match decrypt(&other, "r", &env) {
                Err(CryptoError::WrongKey {
                    envelope_key_id,
                    envelope_version,
                    ..
                }) => assert_eq!((envelope_key_id.as_str(), envelope_version), ("k1", 1)),
                other => panic!("expected WrongKey, got {other:?}"),
            }
        }
    }

    #[test]
    fn same_name_different_bytes_fails_authentication() {
        let env = seal(&key("k1", 1), "r", b"secret");
        let impostor = key("k1", 1);
        assert!(matches!(
            decrypt(&impostor, "r", &env),
            Err(CryptoError::AadMismatch { .. })
        ));
    }

    #[test]
    fn tampered_ciphertext_and_tag_are_detected() {
        let dek = key("k1", 1);
        let env = seal(&dek, "r", &sample(64));
        let body = HEADER_FIXED + 2 + NONCE_LEN;
        for at in [body, body + 63, env.len() - 1] {
            let mut bad = env.clone();
            bad[at] ^= 0x01;
            assert!(
                matches!(
                    decrypt(&dek, "r", &bad),
                    Err(CryptoError::AadMismatch { .. })
                ),
                "flip at {at} not detected"
            );
        }
    }

    #[test]
    fn tampered_nonce_is_detected() {
        let dek = key("k1", 1);
        let mut env = seal(&dek, "r", b"secret");
        env[HEADER_FIXED + 2] ^= 0x80;
        assert!(matches!(
            decrypt(&dek, "r", &env),
            Err(CryptoError::AadMismatch { .. })
        ));
    }

    #[test]
    fn tampered_key_id_is_detected() {
        let dek = key("k1", 1);
        let mut env = seal(&dek, "r", b"secret");
        env[MAGIC.len() + 2] = b'9'; // "k1" -> "k9"
        assert_eq!(parse_header(&env).expect("still parses").key_id, "k9");
        // A reader looking up the named key is refused or finds no key...
        assert!(matches!(
            decrypt(&dek, "r", &env),
            Err(CryptoError::WrongKey { .. })
        ));
        assert!(matches!(
            decrypt_with("r", &env, |_, _| None::<&DataKey>),
            Err(CryptoError::UnknownKey { .. })
        ));
        // ...and even if "k9" held the same bytes, the header is in the AAD.
        let relabelled = same_bytes_as(&dek, "k9", 1);
        let err = decrypt(&relabelled, "r", &env).expect_err("header is authenticated");
        assert!(matches!(err, CryptoError::AadMismatch { .. }), "{err:?}");
    }

    #[test]
    fn tampered_version_is_detected() {
        let dek = key("k1", 1);
        let mut env = seal(&dek, "r", b"secret");
        env[MAGIC.len() + 1 + 2 + 3] = 2; // version 1 -> 2
        assert_eq!(parse_header(&env).expect("still parses").version, 2);
        assert!(matches!(
            decrypt(&dek, "r", &env),
            Err(CryptoError::WrongKey { .. })
        ));
        let relabelled = same_bytes_as(&dek, "k1", 2);
        assert!(matches!(
            decrypt(&relabelled, "r", &env),
            Err(CryptoError::AadMismatch { .. })
        ));
    }

    #[test]
    fn record_moved_to_another_id_fails_with_aad_mismatch() {
        let dek = key("k1", 1);
        let env = seal(&dek, "secret-a", b"value of a");
        let err = decrypt(&dek, "secret-b", &env).expect_err("AAD binds the record id");
        assert!(matches!(err, CryptoError::AadMismatch { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("AAD mismatch") && msg.contains("secret-b"),
            "{msg}"
        );
    }

    #[test]
    fn long_record_ids_use_the_heap_path() {
        let dek = key("k1", 1);
        let long_id = "r".repeat(AAD_STACK * 2);
        let env = seal(&dek, &long_id, b"v");
        assert_eq!(decrypt(&dek, &long_id, &env).expect("round trip"), b"v");
        assert!(decrypt(&dek, &long_id[1..], &env).is_err());
    }

    #[test]
    fn malformed_envelopes_are_rejected() {
        let env = seal(&key("k1", 1), "r", b"v");
        let mut wrong_format = env.clone();
        wrong_format[3] = b'2';
        let mut empty_id = env.clone();
        empty_id[4] = 0;
        for bad in [
            &b""[..],
            &b"ARG"[..],
            &b"XXXX\x02k1"[..],
            &wrong_format[..],
            &empty_id[..],
            &env[..env.len() - 1 - TAG_LEN - 1],
            &env[..HEADER_FIXED + 2 + NONCE_LEN + TAG_LEN - 1],
        ] {
            assert!(
                matches!(parse_header(bad), Err(CryptoError::Malformed { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn key_ids_must_fit_the_header() {
        assert!(DataKey::generate("", 1).is_err());
        assert!(DataKey::generate("x".repeat(MAX_KEY_ID_LEN + 1), 1).is_err());
        let dek = key(&"x".repeat(MAX_KEY_ID_LEN), u32::MAX);
        let env = seal(&dek, "r", b"v");
        assert_eq!(parse_header(&env).expect("max id").version, u32::MAX);
        assert_eq!(decrypt(&dek, "r", &env).expect("max id"), b"v");
    }

    #[test]
    fn decrypt_with_looks_up_exactly_the_named_key() {
        let old = Arc::new(key("k1", 1));
        let new = Arc::new(key("k1", 2));
        let env = seal(&old, "r", b"v");
        let mut asked = Vec::new();
        let plain = decrypt_with("r", &env, |id, v| {
            asked.push((id.to_owned(), v));
            [&old, &new]
                .into_iter()
                .find(|k| k.key_id() == id && k.version() == v)
                .cloned()
        })
        .expect("found");
        assert_eq!(plain, b"v");
        assert_eq!(asked, [("k1".to_owned(), 1)]);
    }

    #[test]
    fn debug_is_redacted() {
        let dek = key("k1", 1);
        let shown = format!("{dek:?} {dek:#?}");
        assert!(
            shown.contains("<redacted>") && shown.contains("k1"),
            "{shown}"
        );
        let bytes = dek.secret_bytes();
        assert!(!shown.contains(&hex::encode(bytes)));
        assert!(!shown.contains(&format!("{bytes:?}")));
    }
}
