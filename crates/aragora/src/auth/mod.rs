//! Authentication and account administration: users (Argon2id passwords),
//! server-side sessions behind JWT access tokens, API keys, brute-force
//! defences. Every security event is audited; changes are written in the same
//! atomic batch as their audit entry.

mod ceiling;
pub mod defence;
pub mod delete;
mod details;
pub mod failures;
pub mod jwt;
pub mod model;
pub mod password;
pub mod recovery;
pub mod roles;
pub mod tokens;
pub mod users;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::clock::{self, now_us};
use crate::config::Config;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::rbac::Rbac;
use crate::store::{Collection, Store, StoreError, for_each_json, get_json};
use defence::{IpBlocks, IpLimiter, LockoutPolicy};
use details::{FailureDetail, PolicyLocked};
use failures::FailureAudit;
use jwt::JwtKeys;
use model::{IpBlock, RevocationEpoch, User};

pub use delete::DeletedUser;

/// How a request proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    Session {
        session_id: String,
    },
    ApiKey {
        key_id: String,
    },
    /// The requester acting through an approved request, executed later by
    /// the server: no bearer credential of the user's is involved, so there is
    /// no session or key to keep, end or revoke on its behalf.
    Approval {
        approval_id: String,
    },
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Principal {
    pub user_id: String,
    pub email: String,
    pub roles: Vec<String>,
    pub credential: Credential,
}

/// The request context every audited action carries.
#[derive(Clone, Debug, Default)]
pub struct RequestMeta {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl RequestMeta {
    pub fn ip_string(&self) -> Option<String> {
        self.ip.map(|i| i.to_string())
    }
}

/// A login attempt after it was counted on the account.
enum Attempt {
    /// Counted: the new record and version, and the lock end when this attempt
    /// reached the threshold.
    Counted {
        version: u64,
        user: User,
        locks_until: Option<i64>,
    },
    /// The account is locked; nothing was counted.
    Locked { until: i64 },
}

/// The one answer to every failed login, whatever the reason (unknown,
/// locked or disabled account, wrong password): the difference shows only in
/// the audit log and the metrics, never to the caller.
pub const INVALID_LOGIN: &str = "invalid email or password";
/// Login request bodies larger than this are refused before parsing.
pub const MAX_LOGIN_BODY_BYTES: usize = 4096;

/// Minimum interval between persisted `last_active_at` updates of one user.
const ACTIVITY_FLUSH_US: i64 = 60_000_000;
/// Compare-and-set attempts before a change reports a conflict.
pub(crate) const CAS_RETRIES: usize = 8;

#[derive(Debug)]
pub struct AuthService {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) rbac: Arc<Rbac>,
    pub(crate) metrics: Metrics,
    pub(crate) jwt: JwtKeys,
    pub(crate) lockout: LockoutPolicy,
    pub(crate) limiter: IpLimiter,
    pub(crate) blocks: IpBlocks,
    /// Latest activity per user seen by this process (flushed to the store at
    /// most once a minute per user).
    pub(crate) activity: Mutex<HashMap<String, i64>>,
    /// When expired sessions were last pruned (µs).
    pub(crate) last_prune: std::sync::atomic::AtomicI64,
    /// Bounds what refused authentications add to the audit log.
    pub(crate) failure_audit: FailureAudit,
}

impl AuthService {
    pub fn new(
        config: &Config,
        jwt_secret: &str,
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        rbac: Arc<Rbac>,
        metrics: Metrics,
    ) -> Result<Self, StoreError> {
        let mut blocks = Vec::new();
        for_each_json::<IpBlock>(store.as_ref(), Collection::IpBlocks, |_, _, b| {
            blocks.push(b);
            Ok(())
        })?;
        let ttl = i64::try_from(config.token_ttl.as_secs()).unwrap_or(3600);
        Ok(Self {
            jwt: JwtKeys::new(
                jwt_secret,
                config.jwt_secret_previous.as_ref().map(|s| s.expose()),
                ttl,
            ),
            lockout: LockoutPolicy {
                threshold: config.lockout_threshold,
                base: config.lockout_base,
                max: config.lockout_max,
            },
            limiter: IpLimiter::new(
                config.auth_rate_limit_per_ip,
                config.auth_rate_limit_window,
                config.client_nets,
            ),
            blocks: IpBlocks::load(blocks, config.client_nets, now_us()),
            activity: Mutex::new(HashMap::new()),
            last_prune: std::sync::atomic::AtomicI64::new(0),
            failure_audit: FailureAudit::new(config.auth_failure_audit_window),
            store,
            audit,
            rbac,
            metrics,
        })
    }

    pub fn blocked(&self, ip: IpAddr) -> Option<IpBlock> {
        self.blocks.active(ip, now_us())
    }

    /// Records an authentication failure: metric by reason, and an audit entry
    /// through the bounded failure trail (the first of its kind in a window at
    /// once, repeats as one summary). The audit write is best effort here: the
    /// request fails anyway, and failing it "closed" cannot fail it harder.
    pub(crate) fn fail(
        &self,
        reason: &'static str,
        message: impl Into<String>,
        actor: &str,
        email: Option<&str>,
        meta: &RequestMeta,
        extra: FailureDetail,
    ) -> ServiceError {
        self.metrics
            .auth_failures
            .with_label_values(&[reason])
            .inc();
        let (decision, summaries) =
            self.failure_audit
                .refusal(now_us(), meta.ip_string(), reason, actor, email, extra);
        if let failures::Decision::Write(event) = decision {
            self.write_failure_entry(event);
        }
        for event in summaries {
            self.write_failure_entry(event);
        }
        tracing::warn!(reason, ip = ?meta.ip, "auth_failure");
        ServiceError::Unauthorized {
            reason,
            message: message.into(),
        }
    }

    fn write_failure_entry(&self, event: AuditEvent) {
        if let Err(e) = self.audit.record_unsynced(event) {
            tracing::error!(error = %e, "auth_failure could not be audited");
        }
    }

    /// Writes the summaries of a closed aggregation window (called on the
    /// request path; cheap when none is due).
    pub fn flush_failure_audit_if_due(&self) {
        for event in self.failure_audit.due(now_us()) {
            self.write_failure_entry(event);
        }
    }

    /// Writes every pending summary (shutdown).
    pub fn flush_failure_audit(&self) {
        for event in self.failure_audit.drain() {
            self.write_failure_entry(event);
        }
    }

    /// Checks login input before anything costly or stored: the email is a
    /// well-formed address of at most 254 bytes, the password at most 1 KiB.
    /// 400 naming the field.
    pub fn validate_login_input(&self, email: &str, password: &str) -> Result<(), ServiceError> {
        let malformed = |what: String| {
            self.metrics
                .auth_failures
                .with_label_values(&["malformed"])
                .inc();
            ServiceError::BadRequest(what)
        };
        if email.len() > users::MAX_EMAIL_LEN {
            return Err(malformed(format!(
                "email: longer than {} bytes",
                users::MAX_EMAIL_LEN
            )));
        }
        if !users::is_email(&users::normalize_email(email)) {
            return Err(malformed("email: not an email address".into()));
        }
        if password.is_empty() {
            return Err(malformed("password: empty".into()));
        }
        if password.len() > password::MAX_PASSWORD_LEN {
            return Err(malformed(format!(
                "password: longer than {} bytes",
                password::MAX_PASSWORD_LEN
            )));
        }
        Ok(())
    }

    /// The per-address login limit, taken before a password-hash slot: a
    /// flood from one address never queues for the hasher.
    pub fn check_login_rate(&self, email: &str, meta: &RequestMeta) -> Result<(), ServiceError> {
        self.flush_failure_audit_if_due();
        if let Some(ip) = meta.ip
            && let Err(retry) = self.limiter.attempt(ip)
        {
            self.metrics
                .auth_attempts
                .with_label_values(&["password"])
                .inc();
            let email = users::normalize_email(email);
            let _ = self.fail(
                "rate_limited",
                "",
                "anonymous",
                Some(&email),
                meta,
                FailureDetail::None {},
            );
            return Err(ServiceError::RateLimited {
                retry_after_secs: retry,
            });
        }
        Ok(())
    }

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

    /// Counts one attempt on the account (`Err(locked until)` when it is
    /// locked). Returns the new version, the record, and the lock end when this
    /// attempt reached the threshold.
    fn reserve_attempt(&self, mut user: User, mut version: u64) -> Result<Attempt, ServiceError> {
        // Generous: every concurrent attempt on the account retries here.
        for _ in 0..CAS_RETRIES * 8 {
            let now = now_us();
            if user.is_locked(now) {
                return Ok(Attempt::Locked {
                    until: user.locked_until.unwrap_or(now),
                });
            }
            let mut counted = user.clone();
            let locks = self.lockout.on_failure(&mut counted, now);
            match self.store.write(
                vec![users::put_user(&counted, version)?],
                crate::store::Durability::Visible,
            ) {
                Ok(receipt) => {
                    return Ok(Attempt::Counted {
                        version: receipt.seq,
                        user: counted,
                        locks_until: locks,
                    });
                }
                Err(StoreError::Conflict { .. }) => {
                    (version, user) = self.user(&user.id)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Unavailable(
            "too many concurrent login attempts on this account; retry".into(),
        ))
    }

    /// Audits a wrong password (already counted by `reserve_attempt`), and the
    /// lockout when this attempt caused one.
    fn record_bad_password(
        &self,
        user: &User,
        locked: Option<i64>,
        email: &str,
        meta: &RequestMeta,
    ) -> ServiceError {
        let err = self.fail(
            "bad_password",
            INVALID_LOGIN,
            &user.id,
            Some(email),
            meta,
            FailureDetail::BadPassword {
                failed_logins: user.failed_logins,
                locked_until: clock::format_opt(locked),
            },
        );
        if let Some(until) = locked {
            tracing::warn!(user_id = %user.id, until = %clock::format_us(until), "account locked after failed logins");
            if let Err(e) = self.audit.record(
                AuditEvent::new("account_locked", user.id.clone(), Outcome::Success)
                    .ip(meta.ip_string())
                    .details(PolicyLocked {
                        email,
                        until: clock::format_us(until),
                        by: "lockout_policy",
                    }),
            ) {
                tracing::error!(error = %e, "account_locked could not be audited");
            }
        }
        err
    }

    pub(crate) fn user_by_email(&self, email: &str) -> Result<Option<(u64, User)>, ServiceError> {
        let Some((_, id)) = get_json::<String>(self.store.as_ref(), Collection::UserEmails, email)?
        else {
            return Ok(None);
        };
        Ok(get_json::<User>(
            self.store.as_ref(),
            Collection::Users,
            &id,
        )?)
    }

    pub(crate) fn user(&self, id: &str) -> Result<(u64, User), ServiceError> {
        get_json::<User>(self.store.as_ref(), Collection::Users, id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no user with id {id}")))
    }

    pub(crate) fn revocation_epoch(&self) -> Result<(u64, RevocationEpoch), ServiceError> {
        Ok(
            get_json::<RevocationEpoch>(self.store.as_ref(), Collection::Meta, tokens::EPOCH_ID)?
                .unwrap_or_default(),
        )
    }

    /// Notes activity; persists it when the stored value is over a minute old.
    pub(crate) fn touch(&self, user: &User, version: u64) {
        let now = now_us();
        self.activity.lock().insert(user.id.clone(), now);
        if user
            .last_active_at
            .is_some_and(|t| now - t < ACTIVITY_FLUSH_US)
        {
            return;
        }
        let mut u = user.clone();
        u.last_active_at = Some(now);
        // Best effort: a lost race means someone else wrote the user just now.
        if let Ok(op) = users::put_user(&u, version) {
            let _ = self
                .store
                .write(vec![op], crate::store::Durability::Visible);
        }
    }

    pub(crate) fn last_active(&self, user: &User) -> Option<i64> {
        let mem = self.activity.lock().get(&user.id).copied();
        match (mem, user.last_active_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests;
