//! Access tokens: HS256 JWTs signed with `JWT_SECRET`. Verification pins the
//! algorithm (a token naming `none` or any other algorithm is refused), checks
//! expiry, issuer and audience, and accepts `JWT_SECRET_PREVIOUS` during a
//! rotation. A token names its server-side session (`sid`), which is what makes
//! it revocable.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "aragora";
pub const AUDIENCE: &str = "aragora-api";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub sid: String,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
}

/// Why a token was refused; the label of `aragora_security_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenProblem {
    Expired,
    BadSignature,
    Malformed,
    /// Wrong issuer or audience, or a token not yet valid.
    InvalidClaims,
}

impl TokenProblem {
    pub fn reason(self) -> &'static str {
        match self {
            TokenProblem::Expired => "expired",
            TokenProblem::BadSignature => "bad_signature",
            TokenProblem::Malformed => "malformed",
            TokenProblem::InvalidClaims => "invalid_claims",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            TokenProblem::Expired => "token expired",
            TokenProblem::BadSignature => "token signature is not valid",
            TokenProblem::Malformed => "token is malformed or uses an algorithm other than HS256",
            TokenProblem::InvalidClaims => "token issuer or audience is not valid for this server",
        }
    }
}

pub struct JwtKeys {
    encoding: EncodingKey,
    current: DecodingKey,
    previous: Option<DecodingKey>,
    validation: Validation,
    pub ttl_secs: i64,
    /// When these keys were loaded (seconds): a token signed with the previous
    /// secret is accepted only if issued before then, and only for one token
    /// lifetime after it (every such token has expired by then anyway).
    loaded_at_secs: i64,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("secrets", &"<redacted>")
            .field("previous", &self.previous.is_some())
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

impl JwtKeys {
    pub fn new(secret: &str, previous: Option<&str>, ttl_secs: i64) -> Self {
        Self::loaded_at(
            secret,
            previous,
            ttl_secs,
            crate::clock::now_us() / 1_000_000,
        )
    }

    pub fn loaded_at(
        secret: &str,
        previous: Option<&str>,
        ttl_secs: i64,
        loaded_at_secs: i64,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            current: DecodingKey::from_secret(secret.as_bytes()),
            previous: previous.map(|p| DecodingKey::from_secret(p.as_bytes())),
            validation,
            ttl_secs,
            loaded_at_secs,
        }
    }

    pub fn issue(
        &self,
        user_id: &str,
        session_id: &str,
        now_secs: i64,
    ) -> Result<(String, Claims), String> {
        let claims = Claims {
            sub: user_id.to_string(),
            sid: session_id.to_string(),
            iat: now_secs,
            exp: now_secs + self.ttl_secs,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map(|t| (t, claims))
            .map_err(|e| format!("token signing failed: {e}"))
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenProblem> {
        match self.verify_with(token, &self.current) {
            Err(TokenProblem::BadSignature) if self.previous.is_some() => {
                let prev = self.previous.as_ref().ok_or(TokenProblem::BadSignature)?;
                let claims = self.verify_with(token, prev)?;
                let now = crate::clock::now_us() / 1_000_000;
                // Only tokens from before the rotation, and never past one
                // token lifetime after it: a leaked previous secret cannot mint
                // new tokens, nor keep old ones alive.
                if claims.iat > self.loaded_at_secs || now >= self.loaded_at_secs + self.ttl_secs {
                    return Err(TokenProblem::BadSignature);
                }
                Ok(claims)
            }
            other => other,
        }
    }

    fn verify_with(&self, token: &str, key: &DecodingKey) -> Result<Claims, TokenProblem> {
        jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenProblem::Expired,
                ErrorKind::InvalidSignature => TokenProblem::BadSignature,
                ErrorKind::InvalidIssuer
                | ErrorKind::InvalidAudience
                | ErrorKind::ImmatureSignature
                | ErrorKind::MissingRequiredClaim(_) => TokenProblem::InvalidClaims,
                _ => TokenProblem::Malformed,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "0123456789abcdef0123456789abcdef-current";
    const P: &str = "0123456789abcdef0123456789abcdef-previous";

    fn now() -> i64 {
        crate::clock::now_us() / 1_000_000
    }

    #[test]
    fn issue_verify_rotation_and_refusals() {
        let keys = JwtKeys::new(S, None, 3600);
        let (t, c) = keys.issue("u1", "s1", now()).expect("issue");
        assert_eq!(keys.verify(&t).expect("valid"), c);

        // Rotation: a token signed with the old secret verifies while it is
        // configured as previous, and not after.
        let old = JwtKeys::new(P, None, 3600);
        let (old_token, _) = old.issue("u1", "s1", now()).expect("issue");
        assert_eq!(keys.verify(&old_token), Err(TokenProblem::BadSignature));
        let rotating = JwtKeys::new(S, Some(P), 3600);
        assert!(rotating.verify(&old_token).is_ok());
        // A token signed with the previous secret after the rotation (a leaked
        // old secret minting tokens) is refused.
        let booted_earlier = JwtKeys::loaded_at(S, Some(P), 3600, now() - 60);
        assert_eq!(
            booted_earlier.verify(&old_token),
            Err(TokenProblem::BadSignature)
        );
        let (before_rotation, _) = old.issue("u1", "s1", now() - 120).expect("issue");
        assert!(booted_earlier.verify(&before_rotation).is_ok());
        // One token lifetime after the rotation, the previous secret is dead.
        let long_lived = JwtKeys::new(P, None, 86_400);
        let (older, _) = long_lived.issue("u1", "s1", now() - 7300).expect("issue");
        let within = JwtKeys::loaded_at(S, Some(P), 7200, now() - 7000);
        assert!(within.verify(&older).is_ok());
        let past = JwtKeys::loaded_at(S, Some(P), 7200, now() - 7200);
        assert_eq!(past.verify(&older), Err(TokenProblem::BadSignature));

        let (expired, _) = keys.issue("u1", "s1", now() - 7200).expect("issue");
        assert_eq!(keys.verify(&expired), Err(TokenProblem::Expired));

        assert_eq!(keys.verify("not.a.token"), Err(TokenProblem::Malformed));
        assert_eq!(keys.verify(""), Err(TokenProblem::Malformed));

        // alg none: header {"alg":"none","typ":"JWT"} with valid claims, empty signature.
        let claims = serde_json::to_vec(&c).expect("claims");
        use base64::Engine;
        let encode = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let none = format!(
            "{}.{}.",
            encode(br#"{"alg":"none","typ":"JWT"}"#),
            encode(&claims)
        );
        assert!(keys.verify(&none).is_err(), "alg none must be refused");
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &c,
            &EncodingKey::from_secret(S.as_bytes()),
        )
        .expect("hs512");
        assert!(keys.verify(&hs512).is_err(), "other algorithms are refused");

        let mut wrong_aud = c.clone();
        wrong_aud.aud = "someone-else".into();
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &wrong_aud,
            &EncodingKey::from_secret(S.as_bytes()),
        )
        .expect("encode");
        assert_eq!(keys.verify(&t), Err(TokenProblem::InvalidClaims));
    }
}
