//! The one error type of the crypto layer. No variant carries key material:
//! errors end up in logs, API responses and the audit trail.

/// Why an encryption, decryption, wrap or derivation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The bytes are not an envelope or wrapped key we can read (truncated,
    /// wrong magic, bad lengths, bad hex), or an input is out of range.
    #[error("malformed input: {reason}")]
    Malformed { reason: String },

    /// The envelope names a key the caller's key ring does not hold.
    #[error("unknown key {key_id} version {version}: not in the key ring")]
    UnknownKey { key_id: String, version: u32 },

    /// The caller offered a key other than the one the envelope names.
    #[error(
        "wrong key: envelope is encrypted under {envelope_key_id} v{envelope_version}, \
         refusing to try {given_key_id} v{given_version}"
    )]
    WrongKey {
        envelope_key_id: String,
        envelope_version: u32,
        given_key_id: String,
        given_version: u32,
    },

    /// GCM tag check failed. GCM cannot tell a changed AAD (record id or
    /// header) from a changed nonce or ciphertext, so the message names both.
    #[error("authentication failed (AAD mismatch or tampered ciphertext) for record {record_id}")]
    AadMismatch { record_id: String },

    /// A wrapped data key did not open under this master key.
    #[error(
        "data key {key_id} v{version} did not unwrap: a different master key, or the \
         wrapped key was altered or moved to another id or version"
    )]
    UnwrapFailed { key_id: String, version: u32 },

    /// The operating system's random number generator failed.
    #[error("system random number generator failed")]
    Rng,

    /// HKDF refused the requested output (cannot happen for 32-byte keys).
    #[error("key derivation failed")]
    Kdf,

    /// The key ring is sealed (no master key, or one that does not open it):
    /// no data key is usable. `why` names the variable and the way out.
    #[error("{why}")]
    Sealed { why: String },
}

impl CryptoError {
    /// A short, stable label for metrics (`..._errors_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::UnknownKey { .. } => "unknown_key",
            Self::WrongKey { .. } => "wrong_key",
            Self::AadMismatch { .. } => "aad_mismatch",
            Self::UnwrapFailed { .. } => "unwrap_failed",
            Self::Rng => "rng",
            Self::Kdf => "kdf",
            Self::Sealed { .. } => "sealed",
        }
    }

    pub(crate) fn malformed(reason: impl Into<String>) -> Self {
        Self::Malformed {
            reason: reason.into(),
        }
    }
}
