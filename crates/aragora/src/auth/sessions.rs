//! Sessions: what a password login starts, what an access token names, and
//! how they end (one, all of a user's, or all issued before an instant).
//! `Sessions` owns `Collection::Sessions` and the revocation epoch record.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use super::defences::Attempt;
use super::details::{AllSessionsRevoked, FailureDetail, LoginSucceeded, SessionsRevoked};
use super::jwt::JwtKeys;
use super::model::{RevocationEpoch, Session, User};
use super::tokens::random_hex;
use super::{
    AuthService, CAS_RETRIES, Credential, INVALID_LOGIN, Principal, RequestMeta, password, users,
};
use crate::audit::{AuditEvent, Outcome, RecordError};
use crate::clock::{self, now_us};
use crate::error::ServiceError;
use crate::store::{
    Collection, Expect, ListQuery, Store, StoreError, WriteOp, for_each_json, get_json, list_json,
};

/// The singleton revocation epoch in `Collection::AuthState`.
pub(crate) const EPOCH_ID: &str = "session_epoch";

/// The session records, the signing keys of the tokens that name them, and
/// when expired ones were last pruned.
#[derive(Debug)]
pub(crate) struct Sessions {
    store: Arc<dyn Store>,
    jwt: JwtKeys,
    /// When expired sessions were last pruned (µs).
    last_prune: AtomicI64,
}

impl Sessions {
    pub(crate) fn new(store: Arc<dyn Store>, jwt: JwtKeys) -> Self {
        Self {
            store,
            jwt,
            last_prune: AtomicI64::new(0),
        }
    }

    pub(crate) fn jwt(&self) -> &JwtKeys {
        &self.jwt
    }

    pub(crate) fn get(&self, id: &str) -> Result<Option<(u64, Session)>, ServiceError> {
        Ok(get_json::<Session>(
            self.store.as_ref(),
            Collection::Sessions,
            id,
        )?)
    }

    pub(crate) fn epoch(&self) -> Result<(u64, RevocationEpoch), ServiceError> {
        Ok(
            get_json::<RevocationEpoch>(self.store.as_ref(), Collection::AuthState, EPOCH_ID)?
                .unwrap_or_default(),
        )
    }

    pub(crate) fn for_each(
        &self,
        f: impl FnMut(String, u64, Session) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for_each_json::<Session>(self.store.as_ref(), Collection::Sessions, f)
    }

    /// The writes that revoke the unrevoked sessions of `user_id` (only
    /// `only`, if given; only unexpired ones if `live_only`), and their ids.
    pub(crate) fn revoke_ops(
        &self,
        user_id: &str,
        only: Option<&str>,
        live_only: bool,
        reason: &str,
        now: i64,
    ) -> Result<(Vec<String>, Vec<WriteOp>), ServiceError> {
        let mut ids = Vec::new();
        let mut ops = Vec::new();
        for (id, version, mut s) in self.of_user(user_id)? {
            if s.revoked_at.is_none()
                && (!live_only || s.expires_at > now)
                && only.is_none_or(|o| o == id)
            {
                s.revoked_at = Some(now);
                s.revoked_reason = Some(reason.to_string());
                ops.push(WriteOp::put_json(
                    Collection::Sessions,
                    id.clone(),
                    &s,
                    Expect::Version(version),
                )?);
                ids.push(id);
            }
        }
        Ok((ids, ops))
    }

    /// (id, version, session) of every session of one user: the ids share the
    /// prefix `{user_id}.`, so this is a range scan, page by page.
    pub(crate) fn of_user(
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
    pub(crate) fn prune_if_due(&self, now: i64) {
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
        let r = self.for_each(|id, version, s| {
            if s.expires_at < now - GRACE_US && ops.len() < MAX_BATCH {
                ops.push(WriteOp::delete(
                    Collection::Sessions,
                    id,
                    Expect::Version(version),
                ));
            }
            Ok(())
        });
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
}

impl AuthService {
    /// `POST /api/auth/login`: returns (token, expires_in seconds, session id).
    /// Input is validated and the address limit taken by the caller
    /// (`validate_login_input`, `check_login_rate`) before a hashing slot.
    /// Every failure answers the same 401.
    pub fn login(
        &self,
        email: &str,
        password: &str,
        meta: &RequestMeta,
    ) -> Result<(String, i64, String), ServiceError> {
        let started = Instant::now();
        self.metrics
            .auth_attempts
            .with_label_values(&["password"])
            .inc();
        let result = self.login_inner(email, password, meta);
        self.metrics
            .auth_latency
            .observe(started.elapsed().as_secs_f64());
        result.map_err(|e| match e {
            ServiceError::Unauthorized { .. } | ServiceError::Locked { .. } => {
                ServiceError::Unauthorized {
                    reason: "invalid_credentials",
                    message: INVALID_LOGIN.into(),
                }
            }
            other => other,
        })
    }

    fn login_inner(
        &self,
        email: &str,
        password: &str,
        meta: &RequestMeta,
    ) -> Result<(String, i64, String), ServiceError> {
        let email = users::normalize_email(email);
        let Some((version, user)) = self.user_by_email(&email)? else {
            password::verify_dummy(password);
            return Err(self.fail(
                crate::metrics::auth_method::PASSWORD,
                "bad_password",
                INVALID_LOGIN,
                "anonymous",
                Some(&email),
                meta,
                FailureDetail::UnknownUser { unknown_user: true },
            ));
        };
        // The attempt counts as a failure before the (slow) password check, in
        // a compare-and-set on the account: concurrent guesses serialize here,
        // so no more than the threshold are ever evaluated per lockout.
        let user_id = user.id.clone();
        let (version, user, locks) = match self.reserve_attempt(user, version)? {
            Attempt::Counted {
                version,
                user,
                locks_until,
            } => (version, user, locks_until),
            Attempt::Locked { until } => {
                // The same work as a wrong password: a locked account must not
                // answer faster.
                password::verify_dummy(password);
                return Err(self.fail(
                    crate::metrics::auth_method::PASSWORD,
                    "locked",
                    INVALID_LOGIN,
                    &user_id,
                    Some(&email),
                    meta,
                    FailureDetail::Locked {
                        locked_until: clock::format_us(until),
                    },
                ));
            }
        };
        let ok = user
            .password_hash
            .as_deref()
            .is_some_and(|h| password::verify(h, password));
        if !ok {
            if user.password_hash.is_none() {
                password::verify_dummy(password);
            }
            return Err(self.record_bad_password(&user, locks, &email, meta));
        }
        if user.disabled {
            return Err(self.fail(
                crate::metrics::auth_method::PASSWORD,
                "disabled",
                INVALID_LOGIN,
                &user.id,
                Some(&email),
                meta,
                FailureDetail::None {},
            ));
        }
        self.start_session(user, version, &email, meta)
    }

    /// Creates a session for a verified login and returns its access token.
    pub(crate) fn start_session(
        &self,
        mut user: User,
        version: u64,
        email: &str,
        meta: &RequestMeta,
    ) -> Result<(String, i64, String), ServiceError> {
        let now = now_us();
        self.sessions.prune_if_due(now);
        let session = Session {
            // Prefixed by the user id: one user's sessions are a range scan.
            id: format!("{}.{}", user.id, random_hex(16)?),
            user_id: user.id.clone(),
            created_at: now,
            expires_at: now + self.sessions.jwt().ttl_secs * 1_000_000,
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
            .sessions
            .jwt()
            .issue(&user.id, &session.id, now / 1_000_000)
            .map_err(ServiceError::Internal)?;
        self.defences.lockout().on_success(&mut user);
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
                            crate::metrics::auth_method::PASSWORD,
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
                    self.defences.lockout().on_success(&mut user);
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
        Ok((token, self.sessions.jwt().ttl_secs, session.id))
    }

    /// The user and its sessions, oldest first.
    pub fn sessions_of(&self, user_id: &str) -> Result<(User, Vec<Session>), ServiceError> {
        let (_, user) = self.user(user_id)?;
        let mut out: Vec<Session> = self
            .sessions
            .of_user(user_id)?
            .into_iter()
            .map(|(_, _, s)| s)
            .collect();
        out.sort_by_key(|s| s.created_at);
        Ok((user, out))
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
        let (ids, ops) = self
            .sessions
            .revoke_ops(user_id, only, false, reason, now)?;
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
            let (version, _) = self.sessions.epoch()?;
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
            self.sessions.for_each(|_, _, s| {
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
                    Collection::AuthState,
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
