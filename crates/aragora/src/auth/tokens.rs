//! Bearer credentials: JWT access tokens bound to server-side sessions, and API
//! keys. Both are checked against the store on every request, so a revoke or
//! disable applies to the very next request. Also the principal an approved
//! request executes as.

use std::time::Instant;

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use super::details::FailureDetail;
use super::model::{RevocationEpoch, Session, User};
use super::sessions::EPOCH_ID;
use super::{AuthService, Credential, Principal, RequestMeta};
use crate::clock::now_us;
use crate::error::ServiceError;
use crate::metrics::auth_method;
use crate::store::{Collection, Record, decode_opt};

// Where these lived before the split; callers outside `auth` name them here.
pub use super::api_keys::{API_KEY_PREFIX, new_api_key};
pub use super::sessions::RevokeAllOutcome;

/// Upper bound on a bearer credential's length; anything longer is malformed.
const MAX_TOKEN_LEN: usize = 4096;

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> Result<String, ServiceError> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ServiceError::Internal("system random source failed".into()))?;
    Ok(hex::encode(b))
}

type SessionRecords = (Option<Session>, RevocationEpoch, Option<(u64, User)>);

/// The session, revocation epoch and user a session token's `session_keys` read.
fn decode_session_records(
    claims: &super::jwt::Claims,
    found: &[Option<Record>],
) -> Result<SessionRecords, ServiceError> {
    let get = |i: usize| found.get(i).and_then(Option::as_ref);
    let session = decode_opt::<Session>(Collection::Sessions, &claims.sid, get(0))?.map(|(_, s)| s);
    let epoch = decode_opt::<RevocationEpoch>(Collection::AuthState, EPOCH_ID, get(1))?
        .map(|(_, e)| e)
        .unwrap_or_default();
    let user = decode_opt::<User>(Collection::Users, &claims.sub, get(2))?;
    Ok((session, epoch, user))
}

/// Why a verified token's session no longer admits it, if it does not.
fn session_refusal(
    claims: &super::jwt::Claims,
    session: Option<&Session>,
    epoch: &RevocationEpoch,
    user: Option<&(u64, User)>,
    now: i64,
) -> Option<&'static str> {
    match session {
        None => Some("session not found"),
        Some(s) if s.user_id != claims.sub => Some("session belongs to another user"),
        Some(s) if s.revoked_at.is_some() => Some("session revoked"),
        Some(s) if s.created_at < epoch.revoked_before => {
            Some("session revoked (all sessions were revoked)")
        }
        Some(s) if s.expires_at <= now => Some("session expired"),
        // A disabled account is reported as such (by `principal_from`); once
        // enabled again, its sessions from before stay ended.
        Some(s)
            if user.is_some_and(|(_, u)| !u.disabled && u.session_generation != s.generation) =>
        {
            Some("session ended by a password change or account disable")
        }
        Some(_) => None,
    }
}

/// The credential of `Bearer <credential>` (the scheme is case-insensitive,
/// RFC 9110 section 11.1); `None` when malformed or too long.
fn bearer_token(header: &str) -> Option<&str> {
    header
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN)
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex::encode(digest(&SHA256, s.as_bytes()))
}

/// What authenticating a session token reads, read ahead of the request in the
/// same `get_many` as a replica's per-request freshness check
/// ([`crate::cluster`]): one round trip to a shared store for both. Used
/// only for the exact header it was read for.
#[derive(Clone)]
pub struct SessionPrefetch {
    authorization: String,
    claims: super::jwt::Claims,
    found: Vec<Option<Record>>,
}

/// Never the header (a bearer credential) or the session id.
impl std::fmt::Debug for SessionPrefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPrefetch")
            .field("user", &self.claims.sub)
            .field("records", &self.found.len())
            .finish_non_exhaustive()
    }
}

impl SessionPrefetch {
    /// Read for this very header, and filled in.
    fn serves(&self, authorization: Option<&str>) -> bool {
        authorization == Some(self.authorization.as_str()) && self.found.len() == 3
    }

    /// The records to read: session, revocation epoch and user, in this order.
    pub fn keys(&self) -> [(Collection, &str); 3] {
        session_keys(&self.claims)
    }

    /// Fills in what the keys read.
    pub fn with_found(mut self, found: Vec<Option<Record>>) -> Self {
        self.found = found;
        self
    }
}

fn session_keys(claims: &super::jwt::Claims) -> [(Collection, &str); 3] {
    [
        (Collection::Sessions, claims.sid.as_str()),
        (Collection::AuthState, EPOCH_ID),
        (Collection::Users, claims.sub.as_str()),
    ]
}

impl AuthService {
    /// For a session token whose signature and claims verify: what its
    /// authentication will read (to read it ahead). Anything else (API keys,
    /// bad tokens) gets `None`, is refused and counted by `authenticate`.
    pub fn session_prefetch(&self, authorization: Option<&str>) -> Option<SessionPrefetch> {
        let header = authorization?;
        let token = bearer_token(header)?;
        if token.starts_with(API_KEY_PREFIX) {
            return None;
        }
        let claims = self.sessions.jwt().verify(token).ok()?;
        Some(SessionPrefetch {
            authorization: header.to_string(),
            claims,
            found: Vec::new(),
        })
    }

    /// The principal of a session token from its prefetched records when
    /// admitting it writes nothing: a live session of an enabled user whose
    /// activity was recorded within the minute, and no refusal summary due.
    /// That is what `authenticate_prefetched` would answer, decided without
    /// leaving an async worker. `None`: take `authenticate_prefetched` (on
    /// the blocking pool), which refuses, audits and records as usual.
    pub fn principal_without_io(
        &self,
        authorization: Option<&str>,
        prefetch: &SessionPrefetch,
    ) -> Option<Principal> {
        if !prefetch.serves(authorization) {
            return None;
        }
        let started = Instant::now();
        let now = now_us();
        if self.failure_audit_due(now) {
            return None;
        }
        let claims = &prefetch.claims;
        let (session, epoch, user) = decode_session_records(claims, &prefetch.found).ok()?;
        if session_refusal(claims, session.as_ref(), &epoch, user.as_ref(), now).is_some() {
            return None;
        }
        let (_, user) = user?;
        if user.disabled || !self.users.touch_in_memory(&user, now) {
            return None;
        }
        self.metrics.auth_attempts.with_label_values(&["jwt"]).inc();
        self.metrics
            .auth_latency
            .observe(started.elapsed().as_secs_f64());
        Some(Principal::of(
            user,
            Credential::Session {
                session_id: claims.sid.clone(),
            },
        ))
    }

    /// Resolves `Authorization: Bearer ...` to a principal, or fails with the
    /// reason counted in `aragora_security_auth_failures_total`.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        meta: &RequestMeta,
    ) -> Result<Principal, ServiceError> {
        self.authenticate_prefetched(authorization, meta, None)
    }

    /// `authenticate`, using what `prefetch` read when it was read for this
    /// header (the freshness check's snapshot, taken after the request arrived).
    pub fn authenticate_prefetched(
        &self,
        authorization: Option<&str>,
        meta: &RequestMeta,
        prefetch: Option<&SessionPrefetch>,
    ) -> Result<Principal, ServiceError> {
        let started = Instant::now();
        self.flush_failure_audit_if_due();
        let prefetch = prefetch.filter(|p| p.serves(authorization));
        let r = self.authenticate_inner(authorization, meta, prefetch);
        self.metrics
            .auth_latency
            .observe(started.elapsed().as_secs_f64());
        r
    }

    fn authenticate_inner(
        &self,
        authorization: Option<&str>,
        meta: &RequestMeta,
        prefetch: Option<&SessionPrefetch>,
    ) -> Result<Principal, ServiceError> {
        let Some(header) = authorization else {
            self.metrics
                .auth_failures
                .with_label_values(&[auth_method::HEADER, "missing"])
                .inc();
            return Err(ServiceError::Unauthorized {
                reason: "missing",
                message: "authentication required: send Authorization: Bearer <token or API key>"
                    .into(),
            });
        };
        let Some(token) = bearer_token(header) else {
            return Err(self.fail(
                auth_method::HEADER,
                "malformed",
                "Authorization header must be 'Bearer <token>'",
                "anonymous",
                None,
                meta,
                FailureDetail::None {},
            ));
        };
        if let Some(rest) = token.strip_prefix(API_KEY_PREFIX) {
            self.metrics
                .auth_attempts
                .with_label_values(&["api_key"])
                .inc();
            return self.authenticate_api_key(rest, meta);
        }
        self.metrics.auth_attempts.with_label_values(&["jwt"]).inc();
        let (claims, found) = match prefetch {
            // Verified when it was read ahead, against this very header.
            Some(p) => (p.claims.clone(), p.found.clone()),
            None => {
                let claims = self.sessions.jwt().verify(token).map_err(|p| {
                    self.fail(
                        auth_method::JWT,
                        p.reason(),
                        p.message(),
                        "anonymous",
                        None,
                        meta,
                        FailureDetail::Credential {
                            credential: "jwt",
                            key_id: None,
                        },
                    )
                })?;
                // Session, revocation epoch and user in one snapshot.
                let found = self.store.get_many(&session_keys(&claims))?;
                (claims, found)
            }
        };
        let (session, epoch, user) = decode_session_records(&claims, &found)?;
        let revoked = session_refusal(&claims, session.as_ref(), &epoch, user.as_ref(), now_us());
        if let Some(why) = revoked {
            return Err(self.fail(
                auth_method::JWT,
                "revoked",
                why,
                &claims.sub,
                None,
                meta,
                FailureDetail::Session {
                    session_id: claims.sid.clone(),
                },
            ));
        }
        self.principal_from(
            &claims.sub,
            user,
            Credential::Session {
                session_id: claims.sid,
            },
            meta,
        )
    }

    fn authenticate_api_key(
        &self,
        rest: &str,
        meta: &RequestMeta,
    ) -> Result<Principal, ServiceError> {
        let Some((id, secret)) = rest.split_once('_') else {
            return Err(self.fail(
                auth_method::API_KEY,
                "malformed",
                "API key is malformed",
                "anonymous",
                None,
                meta,
                FailureDetail::Credential {
                    credential: "api_key",
                    key_id: None,
                },
            ));
        };
        let key = self.api_keys.get(id)?;
        let Some(key) = key else {
            return Err(self.fail(
                auth_method::API_KEY,
                "bad_signature",
                "API key is not valid",
                "anonymous",
                None,
                meta,
                FailureDetail::Credential {
                    credential: "api_key",
                    key_id: None,
                },
            ));
        };
        let presented = sha256_hex(secret);
        if !bool::from(presented.as_bytes().ct_eq(key.secret_sha256.as_bytes())) {
            return Err(self.fail(
                auth_method::API_KEY,
                "bad_signature",
                "API key is not valid",
                &key.user_id,
                None,
                meta,
                FailureDetail::Credential {
                    credential: "api_key",
                    key_id: Some(key.id.clone()),
                },
            ));
        }
        if key.revoked_at.is_some() {
            return Err(self.fail(
                auth_method::API_KEY,
                "revoked",
                "API key revoked",
                &key.user_id,
                None,
                meta,
                FailureDetail::Credential {
                    credential: "api_key",
                    key_id: Some(key.id.clone()),
                },
            ));
        }
        self.principal_for(
            &key.user_id.clone(),
            Credential::ApiKey { key_id: key.id },
            meta,
        )
    }

    /// The requester of an approved request, as the account is now, acting
    /// through that request: the server executes it later, so the roles are
    /// read again (a role removed meanwhile is not exercised) and a deleted or
    /// disabled account gets nothing run. A lockout is no reason to refuse: it
    /// stops password guessing, not an account's other credentials.
    /// Nothing is audited or counted here: the caller records the execution.
    pub fn principal_for_approval(
        &self,
        user_id: &str,
        approval_id: &str,
    ) -> Result<Principal, ServiceError> {
        let Some((_, user)) = self.users.find(user_id)? else {
            return Err(ServiceError::Conflict(format!(
                "the requester {user_id} of approval {approval_id} no longer exists; the request is not executed"
            )));
        };
        if user.disabled {
            return Err(ServiceError::Conflict(format!(
                "the requester {} ({user_id}) of approval {approval_id} is disabled; the request is not executed",
                user.email
            )));
        }
        Ok(Principal::of(
            user,
            Credential::Approval {
                approval_id: approval_id.to_string(),
            },
        ))
    }

    fn principal_for(
        &self,
        user_id: &str,
        credential: Credential,
        meta: &RequestMeta,
    ) -> Result<Principal, ServiceError> {
        let user = self.users.find(user_id)?;
        self.principal_from(user_id, user, credential, meta)
    }

    /// The principal for a user record already read (`None`: it is gone).
    fn principal_from(
        &self,
        user_id: &str,
        user: Option<(u64, User)>,
        credential: Credential,
        meta: &RequestMeta,
    ) -> Result<Principal, ServiceError> {
        let method = match credential {
            Credential::ApiKey { .. } => auth_method::API_KEY,
            Credential::Session { .. } | Credential::Approval { .. } => auth_method::JWT,
        };
        let Some((version, user)) = user else {
            return Err(self.fail(
                method,
                "revoked",
                "user no longer exists",
                user_id,
                None,
                meta,
                FailureDetail::None {},
            ));
        };
        if user.disabled {
            return Err(self.fail(
                method,
                "disabled",
                "account disabled",
                user_id,
                Some(&user.email),
                meta,
                FailureDetail::None {},
            ));
        }
        self.users.touch(&user, version);
        Ok(Principal::of(user, credential))
    }
}
