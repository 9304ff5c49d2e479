//! Bearer credentials: JWT access tokens bound to server-side sessions, and API
//! keys (`ara_<id>_<secret>`, shown once, stored as SHA-256 of the secret).
//! Both are checked against the store on every request, so a revoke or disable
//! applies to the very next request.

use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use super::details::{
    AllSessionsRevoked, ApiKeyCreated, ApiKeysRevoked, FailureDetail, LoginSucceeded,
    SessionsRevoked,
};
use super::model::{ApiKey, RevocationEpoch, Session, User};
use super::{AuthService, CAS_RETRIES, Credential, Principal, RequestMeta, users};
use crate::audit::{AuditEvent, Outcome, RecordError};
use crate::clock::{self, now_us};
use crate::error::ServiceError;
use crate::store::{
    Collection, Expect, ListQuery, WriteOp, decode_opt, for_each_json, get_json, list_json,
};

pub const API_KEY_PREFIX: &str = "ara_";
pub(crate) const EPOCH_ID: &str = "session_epoch";
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

fn sha256_hex(s: &str) -> String {
    hex::encode(digest(&SHA256, s.as_bytes()))
}

impl AuthService {
    /// Creates a session for a verified login and returns its access token.
    pub(crate) fn start_session(
        &self,
        mut user: User,
        version: u64,
        email: &str,
        meta: &RequestMeta,
    ) -> Result<(String, i64, String), ServiceError> {
        let now = now_us();
        self.prune_sessions_if_due(now);
        let session = Session {
            // Prefixed by the user id: one user's sessions are a range scan.
            id: format!("{}.{}", user.id, random_hex(16)?),
            user_id: user.id.clone(),
            created_at: now,
            expires_at: now + self.jwt.ttl_secs * 1_000_000,
            revoked_at: None,
            revoked_reason: None,
            ip_address: meta.ip_string(),
            user_agent: meta.user_agent.clone(),
            generation: user.session_generation,
        };
        // What the password check saw: a retry below that finds the account
        // changed since (disabled, password reset) must not issue the session.
        let verified_hash = user.password_hash.clone();
        let verified_generation = user.session_generation;
        let (token, _) = self
            .jwt
            .issue(&user.id, &session.id, now / 1_000_000)
            .map_err(ServiceError::Internal)?;
        self.lockout.on_success(&mut user);
        user.last_active_at = Some(now);
        let event = AuditEvent::new("login_success", user.id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(LoginSucceeded {
                email,
                session_id: &session.id,
                method: "password",
            });
        // The session, the counter reset and the audit entry are one write; when
        // a concurrent attempt moved the account, re-read it and reset again (a
        // correct password clears the lockout state, whatever came between).
        let mut version = version;
        let mut written = false;
        for _ in 0..CAS_RETRIES * 8 {
            let ops = vec![
                WriteOp::put_json(
                    Collection::Sessions,
                    session.id.clone(),
                    &session,
                    Expect::Absent,
                )?,
                users::put_user(&user, version)?,
            ];
            match self.audit.record_with(event.clone(), ops) {
                Ok(_) => {
                    written = true;
                    break;
                }
                Err(RecordError::Ops(_)) => {
                    (version, user) = self.user(&user.id)?;
                    if user.disabled
                        || user.password_hash != verified_hash
                        || user.session_generation != verified_generation
                    {
                        return Err(self.fail(
                            "revoked",
                            super::INVALID_LOGIN,
                            &user.id,
                            Some(email),
                            meta,
                            FailureDetail::Why {
                                why: "account changed during login",
                            },
                        ));
                    }
                    self.lockout.on_success(&mut user);
                    user.last_active_at = Some(now);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !written {
            return Err(ServiceError::Unavailable(
                "the account is changing concurrently; retry the login".into(),
            ));
        }
        tracing::info!(user_id = %user.id, "login_success");
        Ok((token, self.jwt.ttl_secs, session.id))
    }

    /// Resolves `Authorization: Bearer ...` to a principal, or fails with the
    /// reason counted in `aragora_security_auth_failures_total`.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        meta: &RequestMeta,
    ) -> Result<Principal, ServiceError> {
        let started = Instant::now();
        self.flush_failure_audit_if_due();
        let r = self.authenticate_inner(authorization, meta);
        self.metrics
            .auth_latency
            .observe(started.elapsed().as_secs_f64());
        r
    }

    fn authenticate_inner(
        &self,
        authorization: Option<&str>,
        meta: &RequestMeta,
    ) -> Result<Principal, ServiceError> {
        let Some(header) = authorization else {
            self.metrics
                .auth_failures
                .with_label_values(&["missing"])
                .inc();
            return Err(ServiceError::Unauthorized {
                reason: "missing",
                message: "authentication required: send Authorization: Bearer <token or API key>"
                    .into(),
            });
        };
        let token = header
            .split_once(' ')
            // The scheme is case-insensitive (RFC 9110 section 11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN);
        let Some(token) = token else {
            return Err(self.fail(
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
        let claims = self.jwt.verify(token).map_err(|p| {
            self.fail(
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
        let found = self.store.get_many(&[
            (Collection::Sessions, &claims.sid),
            (Collection::Meta, EPOCH_ID),
            (Collection::Users, &claims.sub),
        ])?;
        let session = decode_opt::<Session>(Collection::Sessions, &claims.sid, found[0].as_ref())?
            .map(|(_, s)| s);
        let epoch = decode_opt::<RevocationEpoch>(Collection::Meta, EPOCH_ID, found[1].as_ref())?
            .map(|(_, e)| e)
            .unwrap_or_default();
        let user = decode_opt::<User>(Collection::Users, &claims.sub, found[2].as_ref())?;
        let now = now_us();
        let revoked = match &session {
            None => Some("session not found"),
            Some(s) if s.user_id != claims.sub => Some("session belongs to another user"),
            Some(s) if s.revoked_at.is_some() => Some("session revoked"),
            Some(s) if s.created_at < epoch.revoked_before => {
                Some("session revoked (all sessions were revoked)")
            }
            Some(s) if s.expires_at <= now => Some("session expired"),
            // A disabled account is reported as such (by `principal_from`);
            // once enabled again, its sessions from before stay ended.
            Some(s)
                if user
                    .as_ref()
                    .is_some_and(|(_, u)| !u.disabled && u.session_generation != s.generation) =>
            {
                Some("session ended by a password change or account disable")
            }
            Some(_) => None,
        };
        if let Some(why) = revoked {
            return Err(self.fail(
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
        let key = get_json::<ApiKey>(self.store.as_ref(), Collection::ApiKeys, id)?.map(|(_, k)| k);
        let Some(key) = key else {
            return Err(self.fail(
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
        let Some((_, user)) = get_json::<User>(self.store.as_ref(), Collection::Users, user_id)?
        else {
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
        Ok(Principal {
            user_id: user.id,
            email: user.email,
            roles: user.roles,
            credential: Credential::Approval {
                approval_id: approval_id.to_string(),
            },
        })
    }

    fn principal_for(
        &self,
        user_id: &str,
        credential: Credential,
        meta: &RequestMeta,
    ) -> Result<Principal, ServiceError> {
        let user = get_json::<User>(self.store.as_ref(), Collection::Users, user_id)?;
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
        let Some((version, user)) = user else {
            return Err(self.fail(
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
                "disabled",
                "account disabled",
                user_id,
                Some(&user.email),
                meta,
                FailureDetail::None {},
            ));
        }
        self.touch(&user, version);
        Ok(Principal {
            user_id: user.id,
            email: user.email,
            roles: user.roles,
            credential,
        })
    }

    /// Creates an API key for `user_id`; the full key is returned only here.
    pub fn create_api_key(
        &self,
        actor: &Principal,
        user_id: &str,
        name: &str,
        meta: &RequestMeta,
    ) -> Result<(ApiKey, String), ServiceError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 100 {
            return Err(ServiceError::BadRequest("name: 1 to 100 characters".into()));
        }
        let (_, user) = self.user(user_id)?;
        self.require_ceiling_over(actor, &user, "api_key_create", meta)?;
        let (key, token) = new_api_key(&user.id, name)?;
        let event = AuditEvent::new("api_key_created", actor.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(ApiKeyCreated {
                user_id: &user.id,
                key_id: &key.id,
                name,
            });
        self.audit.record_with(
            event,
            vec![WriteOp::put_json(
                Collection::ApiKeys,
                key.id.clone(),
                &key,
                Expect::Absent,
            )?],
        )?;
        Ok((key, token))
    }

    pub fn api_keys_of(&self, user_id: &str) -> Result<Vec<ApiKey>, ServiceError> {
        let mut out = Vec::new();
        for_each_json::<ApiKey>(self.store.as_ref(), Collection::ApiKeys, |_, _, k| {
            if k.user_id == user_id {
                out.push(k);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Revokes one key (`only`) or every active key of a user; returns the ids.
    pub fn revoke_api_keys(
        &self,
        actor: &Principal,
        user_id: &str,
        only: Option<&str>,
        meta: &RequestMeta,
    ) -> Result<Vec<String>, ServiceError> {
        let (_, target) = self.user(user_id)?;
        self.require_ceiling_over(actor, &target, "api_keys_revoke", meta)?;
        let now = now_us();
        let mut ops = Vec::new();
        let mut ids = Vec::new();
        for_each_json::<ApiKey>(
            self.store.as_ref(),
            Collection::ApiKeys,
            |id, version, mut k| {
                if k.user_id == user_id && k.revoked_at.is_none() && only.is_none_or(|o| o == id) {
                    k.revoked_at = Some(now);
                    ids.push(id.clone());
                    ops.push(WriteOp::put_json(
                        Collection::ApiKeys,
                        id,
                        &k,
                        Expect::Version(version),
                    )?);
                }
                Ok(())
            },
        )?;
        if let Some(o) = only
            && ids.is_empty()
        {
            return Err(ServiceError::NotFound(format!(
                "no active API key {o} for user {user_id}"
            )));
        }
        let event = AuditEvent::new("api_keys_revoked", actor.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(ApiKeysRevoked {
                user_id,
                key_ids: &ids,
            });
        self.audit.record_with(event, ops)?;
        self.rbac.invalidate_user(user_id);
        Ok(ids)
    }

    /// The user and its sessions, oldest first.
    pub fn sessions_of(&self, user_id: &str) -> Result<(User, Vec<Session>), ServiceError> {
        let (_, user) = self.user(user_id)?;
        let mut out: Vec<Session> = self
            .user_sessions(user_id)?
            .into_iter()
            .map(|(_, _, s)| s)
            .collect();
        out.sort_by_key(|s| s.created_at);
        Ok((user, out))
    }

    /// (id, version, session) of every session of one user: the ids share the
    /// prefix `{user_id}.`, so this is a range scan, page by page.
    pub(crate) fn user_sessions(
        &self,
        user_id: &str,
    ) -> Result<Vec<(String, u64, Session)>, ServiceError> {
        const PAGE: usize = 1000;
        let start = format!("{user_id}.");
        // '/' is the byte after '.': the end of the prefix range.
        let end = format!("{user_id}/");
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let q = ListQuery {
                start: after
                    .as_deref()
                    .map_or(Bound::Included(start.as_str()), Bound::Excluded),
                end: Bound::Excluded(end.as_str()),
                reverse: false,
                limit: PAGE,
            };
            let page = list_json::<Session>(self.store.as_ref(), Collection::Sessions, &q)?;
            let n = page.len();
            after = page.last().map(|(id, _, _)| id.clone());
            out.extend(page);
            if n < PAGE {
                return Ok(out);
            }
        }
    }

    /// Deletes sessions that expired over an hour ago, at most once every ten
    /// minutes and a bounded batch at a time (logins pay for it, a little).
    fn prune_sessions_if_due(&self, now: i64) {
        const EVERY_US: i64 = 600_000_000;
        const GRACE_US: i64 = 3_600_000_000;
        const MAX_BATCH: usize = 1000;
        let last = self.last_prune.load(Ordering::Relaxed);
        if now - last < EVERY_US
            || self
                .last_prune
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let mut ops = Vec::new();
        let r = for_each_json::<Session>(
            self.store.as_ref(),
            Collection::Sessions,
            |id, version, s| {
                if s.expires_at < now - GRACE_US && ops.len() < MAX_BATCH {
                    ops.push(WriteOp::delete(
                        Collection::Sessions,
                        id,
                        Expect::Version(version),
                    ));
                }
                Ok(())
            },
        );
        if let Err(e) = r {
            tracing::warn!(error = %e, "session pruning: scan failed");
            return;
        }
        let n = ops.len();
        if n > 0 {
            match self.store.write(ops, crate::store::Durability::Visible) {
                Ok(_) => tracing::info!(deleted = n, "pruned expired sessions"),
                Err(e) => tracing::warn!(error = %e, "session pruning: delete failed"),
            }
        }
    }

    /// Revokes the sessions of one user (or one session of it).
    pub fn revoke_sessions(
        &self,
        actor: &Principal,
        user_id: &str,
        only: Option<&str>,
        reason: &str,
        meta: &RequestMeta,
    ) -> Result<Vec<String>, ServiceError> {
        let (_, target) = self.user(user_id)?;
        self.require_ceiling_over(actor, &target, "sessions_revoke", meta)?;
        let now = now_us();
        let mut ops = Vec::new();
        let mut ids = Vec::new();
        for (id, version, mut s) in self.user_sessions(user_id)? {
            if s.revoked_at.is_none() && only.is_none_or(|o| o == id) {
                s.revoked_at = Some(now);
                s.revoked_reason = Some(reason.to_string());
                ids.push(id.clone());
                ops.push(WriteOp::put_json(
                    Collection::Sessions,
                    id,
                    &s,
                    Expect::Version(version),
                )?);
            }
        }
        if let Some(o) = only
            && ids.is_empty()
        {
            return Err(ServiceError::NotFound(format!(
                "no active session {o} for user {user_id}"
            )));
        }
        let event = AuditEvent::new("sessions_revoked", actor.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(SessionsRevoked {
                user_id,
                session_ids: &ids,
                reason,
            });
        self.audit.record_with(event, ops)?;
        Ok(ids)
    }

    /// Every session issued before now stops working (the emergency lockdown).
    /// API keys are not sessions: revoke them per user with `revoke-keys`.
    pub fn revoke_all_sessions(
        &self,
        actor: &Principal,
        meta: &RequestMeta,
    ) -> Result<RevokeAllOutcome, ServiceError> {
        for _ in 0..CAS_RETRIES {
            let (version, _) = self.revocation_epoch()?;
            let now = now_us();
            let epoch = RevocationEpoch {
                revoked_before: now,
            };
            let expect = if version == 0 {
                Expect::Absent
            } else {
                Expect::Version(version)
            };
            let mut active = 0u64;
            for_each_json::<Session>(self.store.as_ref(), Collection::Sessions, |_, _, s| {
                if s.revoked_at.is_none() && s.expires_at > now {
                    active += 1;
                }
                Ok(())
            })?;
            let event = AuditEvent::new(
                "sessions_revoked_all",
                actor.user_id.clone(),
                Outcome::Success,
            )
            .ip(meta.ip_string())
            .details(AllSessionsRevoked {
                revoked_before: clock::format_us(now),
                active_sessions: active,
            });
            match self.audit.record_with(
                event,
                vec![WriteOp::put_json(
                    Collection::Meta,
                    EPOCH_ID,
                    &epoch,
                    expect,
                )?],
            ) {
                Ok(_) => {
                    tracing::warn!(by = %actor.user_id, active, "all sessions revoked");
                    return Ok(RevokeAllOutcome {
                        revoked_before: clock::format_us(now),
                        sessions_revoked: active,
                        note: "API keys stay valid; revoke them per user with /api/admin/users/{id}/revoke-keys".into(),
                    });
                }
                Err(RecordError::Ops(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Conflict(
            "session epoch changed concurrently; retry".into(),
        ))
    }

    /// Revokes the caller's own session (logout).
    pub fn logout(&self, p: &Principal, meta: &RequestMeta) -> Result<(), ServiceError> {
        match &p.credential {
            Credential::Session { session_id } => {
                self.revoke_sessions(p, &p.user_id, Some(session_id), "logout", meta)?;
                Ok(())
            }
            Credential::ApiKey { .. } => Err(ServiceError::BadRequest(
                "an API key has no session; revoke the key instead".into(),
            )),
            Credential::Approval { .. } => Err(ServiceError::BadRequest(
                "an approved request acts without a session; there is nothing to log out".into(),
            )),
        }
    }
}

/// What `POST /api/admin/sessions/revoke-all` did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RevokeAllOutcome {
    /// Tokens issued before this instant are refused.
    pub revoked_before: String,
    /// Sessions that were active.
    pub sessions_revoked: u64,
    pub note: String,
}

/// A new key record and the one-time full key.
pub fn new_api_key(user_id: &str, name: &str) -> Result<(ApiKey, String), ServiceError> {
    let id = random_hex(8)?;
    let secret = random_hex(32)?;
    let token = format!("{API_KEY_PREFIX}{id}_{secret}");
    let key = ApiKey {
        id,
        user_id: user_id.to_string(),
        name: name.to_string(),
        secret_sha256: sha256_hex(&secret),
        created_at: now_us(),
        revoked_at: None,
    };
    Ok((key, token))
}
