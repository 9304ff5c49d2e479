//! Key derivation: PBKDF2 for low-entropy secrets, HKDF for sub-keys of
//! high-entropy ones.
//!
//! PBKDF2's cost is its iteration count, which the caller chooses:
//! [`PRODUCTION_PBKDF2_ITERATIONS`] (600 000, OWASP's figure for
//! PBKDF2-HMAC-SHA256) in production, [`DEV_PBKDF2_ITERATIONS`] (1 000)
//! elsewhere so tests and local runs do not spend seconds per derivation.
//! [`pbkdf2_iterations`] picks by environment. Measure the chosen figure's
//! latency (`aragora-bench` does) before raising it: every derivation pays it.

use std::num::NonZeroU32;

use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, pbkdf2};
use zeroize::Zeroizing;

use super::{CryptoError, KEY_LEN};
use crate::config::Environment;

/// PBKDF2-HMAC-SHA256 iterations for production.
pub const PRODUCTION_PBKDF2_ITERATIONS: NonZeroU32 = non_zero(600_000);
/// PBKDF2-HMAC-SHA256 iterations outside production.
pub const DEV_PBKDF2_ITERATIONS: NonZeroU32 = non_zero(1_000);

/// Salt length [`generate_salt`] produces (128 bits, NIST SP 800-132's
/// minimum).
pub const SALT_LEN: usize = 16;

const fn non_zero(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("iteration count must be non-zero"),
    }
}

/// The default iteration count for an environment.
pub fn pbkdf2_iterations(environment: Environment) -> NonZeroU32 {
    match environment {
        Environment::Production => PRODUCTION_PBKDF2_ITERATIONS,
        Environment::Development => DEV_PBKDF2_ITERATIONS,
    }
}

/// PBKDF2-HMAC-SHA256 of `secret` and `salt` to a 32-byte key.
pub fn derive_key(secret: &[u8], salt: &[u8], iterations: NonZeroU32) -> Zeroizing<[u8; KEY_LEN]> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        secret,
        out.as_mut(),
    );
    out
}

/// A random salt for [`derive_key`].
pub fn generate_salt() -> Result<[u8; SALT_LEN], CryptoError> {
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| CryptoError::Rng)?;
    Ok(salt)
}

/// HKDF-SHA256 (extract then expand) of a high-entropy `ikm` into a 32-byte
/// sub-key; distinct `info` labels give independent keys from one secret.
pub fn derive_subkey(
    ikm: &[u8],
    salt: &[u8],
    info: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            KEY_LEN
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    prk.expand(&[info], Len32)
        .and_then(|okm| okm.fill(out.as_mut()))
        .map_err(|_| CryptoError::Kdf)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_rfc_7914_vector() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256("passwd", "salt", c=1).
        let key = derive_key(b"passwd", b"salt", non_zero(1));
        assert_eq!(
            hex::encode(&key[..]),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn pbkdf2_depends_on_every_input() {
        let base = derive_key(b"pw", b"salt-1", DEV_PBKDF2_ITERATIONS);
        assert_eq!(*base, *derive_key(b"pw", b"salt-1", DEV_PBKDF2_ITERATIONS));
        assert_ne!(*base, *derive_key(b"pX", b"salt-1", DEV_PBKDF2_ITERATIONS));
        assert_ne!(*base, *derive_key(b"pw", b"salt-2", DEV_PBKDF2_ITERATIONS));
        assert_ne!(*base, *derive_key(b"pw", b"salt-1", non_zero(1_001)));
    }

    #[test]
    fn hkdf_matches_rfc_5869_case_1_prefix() {
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let okm = derive_subkey(&ikm, &salt, &info).expect("32 bytes");
        // The first 32 of the RFC's 42 output bytes.
        assert_eq!(
            hex::encode(&okm[..]),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
        assert_ne!(
            *okm,
            *derive_subkey(&ikm, &salt, b"other").expect("32 bytes")
        );
    }

    #[test]
    fn iterations_follow_the_environment() {
        assert_eq!(pbkdf2_iterations(Environment::Production).get(), 600_000);
        assert_eq!(pbkdf2_iterations(Environment::Development).get(), 1_000);
        assert_ne!(generate_salt().expect("rng"), generate_salt().expect("rng"));
    }
}
