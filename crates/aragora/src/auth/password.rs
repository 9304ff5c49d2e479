//! Password hashing: Argon2id (the `argon2` crate's defaults, OWASP's minimum:
//! 19 MiB, 2 passes), PHC strings with a random salt.
//!
//! Argon2's working memory is kept between hashes ([`with_memory`]) instead of
//! allocated per hash: a freed 19 MiB block stays in whichever malloc arena
//! the hashing thread used, so a flood of refused logins spread over the
//! blocking pool's threads grew RSS by about 19 MiB per arena (measured: +254
//! MiB after 13 evaluated logins). At most as many blocks exist as hashes run
//! at once, which `ARAGORA_PASSWORD_HASH_CONCURRENCY` bounds.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use parking_lot::Mutex;
use zeroize::Zeroize;

pub const MIN_PASSWORD_LEN: usize = 12;
pub const MAX_PASSWORD_LEN: usize = 1024;

/// Working memory kept for reuse; more than this many idle blocks are freed
/// (the concurrency bound keeps it far lower).
const MAX_IDLE_MEMORY_BLOCKS: usize = 16;
/// The largest memory cost a stored hash may ask for (256 MiB, in 1 KiB
/// Argon2 blocks): a tampered hash must not make a login allocate gigabytes.
const MAX_BLOCKS: usize = 256 * 1024;

static IDLE_MEMORY: Mutex<Vec<Vec<Block>>> = Mutex::new(Vec::new());

/// Runs `f` with `blocks` Argon2 blocks of working memory, reused between
/// calls, and wiped before it is put back.
fn with_memory<T>(blocks: usize, f: impl FnOnce(&mut [Block]) -> T) -> T {
    let mut memory = IDLE_MEMORY.lock().pop().unwrap_or_default();
    if memory.len() != blocks {
        memory.clear();
        memory.resize(blocks, Block::default());
        memory.shrink_to_fit();
    }
    let out = f(&mut memory);
    memory.iter_mut().for_each(Zeroize::zeroize);
    let mut idle = IDLE_MEMORY.lock();
    if idle.len() < MAX_IDLE_MEMORY_BLOCKS {
        idle.push(memory);
    }
    out
}

/// Checks a new password against the policy; the message names the rule.
pub fn check_policy(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_LEN {
        return Err(format!(
            "password must be at least {MIN_PASSWORD_LEN} characters"
        ));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(format!("password must be at most {MAX_PASSWORD_LEN} bytes"));
    }
    Ok(())
}

pub fn hash(password: &str) -> Result<String, String> {
    let failed = |e: &dyn std::fmt::Display| format!("password hashing failed: {e}");
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf).map_err(|e| failed(&e))?;
    let params = Params::default();
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    with_memory(params.block_count(), |memory| {
        argon2.hash_password_into_with_memory(password.as_bytes(), salt_bytes, &mut out, memory)
    })
    .map_err(|e| failed(&e))?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| failed(&e))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| failed(&e))?),
    };
    out.zeroize();
    Ok(hash.to_string())
}

/// Constant-time verification (the output comparison is `Output`'s). A
/// malformed stored hash, or one asking for more memory than `MAX_BLOCKS`,
/// verifies nothing.
pub fn verify(stored: &str, password: &str) -> bool {
    if password.len() > MAX_PASSWORD_LEN {
        return false;
    }
    let Ok(hash) = PasswordHash::new(stored) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (hash.hash, hash.salt) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else {
        return false;
    };
    let version = match hash.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    if params.block_count() > MAX_BLOCKS {
        return false;
    }
    let mut salt_buf = [0u8; 64];
    let Ok(salt_bytes) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let argon2 = Argon2::new(algorithm, version, params.clone());
    let mut out = vec![0u8; expected.len()];
    let computed = with_memory(params.block_count(), |memory| {
        argon2.hash_password_into_with_memory(password.as_bytes(), salt_bytes, &mut out, memory)
    });
    let matches = computed.is_ok() && Output::new(&out).is_ok_and(|o| o == expected);
    out.zeroize();
    matches
}

/// Spends the time of one verification, so a login for an unknown email takes
/// as long as one with a wrong password (no account enumeration by timing).
pub fn verify_dummy(password: &str) {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let stored = DUMMY.get_or_init(|| hash("dummy-password-for-timing").unwrap_or_default());
    let _ = verify(stored, password);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes made before the memory pool (by the crate's own `hash_password`)
    /// still verify, and ours verify with the crate's own verifier.
    #[test]
    fn hashes_are_standard_phc_argon2id() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let salt = SaltString::generate(&mut OsRng);
        let theirs = Argon2::default()
            .hash_password(b"correct horse battery", &salt)
            .expect("hash")
            .to_string();
        assert!(verify(&theirs, "correct horse battery"));
        assert!(!verify(&theirs, "correct horse batterx"));
        let ours = hash("correct horse battery").expect("hash");
        let parsed = PasswordHash::new(&ours).expect("PHC");
        assert!(
            Argon2::default()
                .verify_password(b"correct horse battery", &parsed)
                .is_ok()
        );
    }

    #[test]
    fn a_stored_hash_asking_for_too_much_memory_verifies_nothing() {
        let ours = hash("correct horse battery").expect("hash");
        let greedy = ours.replace("m=19456", "m=4194304");
        assert_ne!(greedy, ours);
        assert!(!verify(&greedy, "correct horse battery"));
    }

    /// However many hashes ran at once, at most `MAX_IDLE_MEMORY_BLOCKS`
    /// working memories are kept for reuse (other tests of this binary may
    /// hash meanwhile; the bound holds whatever they do).
    #[test]
    fn kept_working_memory_is_bounded() {
        std::thread::scope(|s| {
            for _ in 0..MAX_IDLE_MEMORY_BLOCKS + 4 {
                s.spawn(|| hash("correct horse battery").expect("hash"));
            }
        });
        assert!(IDLE_MEMORY.lock().len() <= MAX_IDLE_MEMORY_BLOCKS);
    }

    #[test]
    fn round_trip_and_policy() {
        let h = hash("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(&h, "correct horse battery"));
        assert!(!verify(&h, "correct horse batterx"));
        assert!(!verify("not a phc string", "x"));
        assert!(check_policy("short").is_err());
        assert!(check_policy("long enough password").is_ok());
    }
}
