//! The defences' side of the service: refused authentications (metric,
//! bounded audit trail), the per-client login limit, the per-account lockout
//! counted before a password is checked, and operator-set IP blocks. The
//! mechanisms themselves are in `defence`; `Defences` owns their state and
//! the `ip_blocks` collection.

use std::net::IpAddr;

use super::defence::{IpBlocks, IpLimiter, LockoutPolicy};
use super::details::{FailureDetail, IpBlocked, IpUnblocked, PolicyLocked};
use super::failures::{self, FailureAudit};
use super::model::{IpBlock, IpBlockView, User};
use super::users::{self, MAX_LOCK_SECS};
use super::{AuthService, CAS_RETRIES, Principal, RequestMeta, password};
use crate::audit::{AuditEvent, Outcome};
use crate::clock::{self, now_us, parse_duration};
use crate::config::Config;
use crate::error::ServiceError;
use crate::store::{Collection, Expect, Store, StoreError, WriteOp, for_each_json};

/// The brute-force defences' state: lockout policy, per-client limiter, IP
/// blocks (memory, loaded from `Collection::IpBlocks`) and the bounded trail
/// of refused authentications.
#[derive(Debug)]
pub(crate) struct Defences {
    lockout: LockoutPolicy,
    limiter: IpLimiter,
    blocks: IpBlocks,
    failures: FailureAudit,
}

impl Defences {
    pub(crate) fn load(
        config: &Config,
        store: &dyn Store,
        redis: Option<std::sync::Arc<crate::redis_link::RedisLink>>,
    ) -> Result<Self, StoreError> {
        let mut blocks = Vec::new();
        for_each_json::<IpBlock>(store, Collection::IpBlocks, |_, _, b| {
            blocks.push(b);
            Ok(())
        })?;
        Ok(Self {
            lockout: LockoutPolicy {
                threshold: config.lockout_threshold,
                base: config.lockout_base,
                max: config.lockout_max,
            },
            limiter: {
                let l = IpLimiter::new(
                    config.auth_rate_limit_per_ip,
                    config.auth_rate_limit_window,
                    config.client_nets,
                );
                match redis {
                    Some(link) => l.shared(link),
                    None => l,
                }
            },
            blocks: IpBlocks::load(blocks, config.client_nets, now_us()),
            failures: FailureAudit::new(config.auth_failure_audit_window),
        })
    }

    pub(crate) fn lockout(&self) -> &LockoutPolicy {
        &self.lockout
    }

    /// Reloads the IP blocks from the store (another replica changed them).
    pub(crate) fn reload_blocks(&self, store: &dyn Store) -> Result<(), StoreError> {
        let mut blocks = Vec::new();
        for_each_json::<IpBlock>(store, Collection::IpBlocks, |_, _, b| {
            blocks.push(b);
            Ok(())
        })?;
        self.blocks.replace_all(blocks, now_us());
        Ok(())
    }
}

/// A login attempt after it was counted on the account.
pub(crate) enum Attempt {
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

impl AuthService {
    pub fn blocked(&self, ip: IpAddr) -> Option<IpBlock> {
        self.defences.blocks.active(ip, now_us())
    }

    /// Reloads the IP blocks another replica changed (`crate::cluster`).
    pub fn reload_ip_blocks(&self) -> Result<(), StoreError> {
        self.defences.reload_blocks(self.store.as_ref())
    }

    /// Records an authentication failure: metric by reason, and an audit entry
    /// through the bounded failure trail (the first of its kind in a window at
    /// once, repeats as one summary). The audit write is best effort here: the
    /// request fails anyway, and failing it "closed" cannot fail it harder.
    // `method` and `reason` are the two labels of one counter; a struct for
    // them would only move the argument count.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fail(
        &self,
        method: &'static str,
        reason: &'static str,
        message: impl Into<String>,
        actor: &str,
        email: Option<&str>,
        meta: &RequestMeta,
        extra: FailureDetail,
    ) -> ServiceError {
        let message = message.into();
        self.metrics
            .auth_failures
            .with_label_values(&[method, reason])
            .inc();
        // The log line the runbook greps (`auth_failure` ... `ip=`; a JWT's
        // `credential=jwt error=...`): plain values, the actor last.
        let credential = match (&extra, email) {
            (FailureDetail::Credential { credential, .. }, _) => *credential,
            (_, Some(_)) => "password",
            _ => "bearer",
        };
        let ip = meta.ip_string();
        tracing::warn!(
            reason = %reason,
            credential = %credential,
            error = ?message,
            email = %email.unwrap_or("-"),
            ip = %ip.as_deref().unwrap_or("-"),
            actor = %actor,
            "auth_failure"
        );
        let (decision, summaries) =
            self.defences
                .failures
                .refusal(now_us(), meta.ip_string(), reason, actor, email, extra);
        if let failures::Decision::Write(event) = decision {
            self.write_failure_entry(event);
        }
        for event in summaries {
            self.write_failure_entry(event);
        }
        ServiceError::Unauthorized { reason, message }
    }

    fn write_failure_entry(&self, event: AuditEvent) {
        if let Err(e) = self.audit.record_unsynced(event) {
            tracing::error!(error = %e, "auth_failure could not be audited");
        }
    }

    /// Writes the summaries of a closed aggregation window (called on the
    /// request path; cheap when none is due).
    /// Whether `flush_failure_audit_if_due` has a closed window to roll.
    pub(crate) fn failure_audit_due(&self, now: i64) -> bool {
        self.defences.failures.is_due(now)
    }

    pub fn flush_failure_audit_if_due(&self) {
        for event in self.defences.failures.due(now_us()) {
            self.write_failure_entry(event);
        }
    }

    /// Writes every pending summary (shutdown).
    pub fn flush_failure_audit(&self) {
        for event in self.defences.failures.drain() {
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
                .with_label_values(&[crate::metrics::auth_method::PASSWORD, "malformed"])
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
            && let Err(retry) = self.defences.limiter.attempt(ip)
        {
            self.metrics
                .auth_attempts
                .with_label_values(&["password"])
                .inc();
            let email = users::normalize_email(email);
            let _ = self.fail(
                crate::metrics::auth_method::PASSWORD,
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

    /// Counts one attempt on the account (`Err(locked until)` when it is
    /// locked). Returns the new version, the record, and the lock end when this
    /// attempt reached the threshold.
    pub(super) fn reserve_attempt(
        &self,
        mut user: User,
        mut version: u64,
    ) -> Result<Attempt, ServiceError> {
        // Generous: every concurrent attempt on the account retries here.
        for _ in 0..CAS_RETRIES * 8 {
            let now = now_us();
            if user.is_locked(now) {
                return Ok(Attempt::Locked {
                    until: user.locked_until.unwrap_or(now),
                });
            }
            let mut counted = user.clone();
            let locks = self.defences.lockout.on_failure(&mut counted, now);
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
    pub(super) fn record_bad_password(
        &self,
        user: &User,
        locked: Option<i64>,
        email: &str,
        meta: &RequestMeta,
    ) -> ServiceError {
        let err = self.fail(
            crate::metrics::auth_method::PASSWORD,
            "bad_password",
            super::INVALID_LOGIN,
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

    /// Blocks an address or CIDR network for `duration` (`1h`, `24h`, ...);
    /// an IPv6 address blocks its client network (`crate::net`).
    pub fn block_ip(
        &self,
        actor: &Principal,
        ip: &str,
        duration: &str,
        reason: &str,
        meta: &RequestMeta,
    ) -> Result<IpBlockView, ServiceError> {
        let net = self
            .defences
            .blocks
            .target(ip)
            .map_err(ServiceError::BadRequest)?;
        // Every route but health and metrics refuses a blocked address, this
        // one included: a block of one's own address could not be undone.
        if let Some(me) = meta.ip
            && net.contains(&crate::net::normalize(me))
        {
            return Err(ServiceError::BadRequest(format!(
                "ip: {} contains your own address {me}; blocking it would lock you out",
                crate::net::net_key(&net)
            )));
        }
        let d = parse_duration("duration", duration).map_err(ServiceError::BadRequest)?;
        if d.as_secs() > MAX_LOCK_SECS {
            return Err(ServiceError::BadRequest(
                "duration: at most 366 days".into(),
            ));
        }
        let reason = reason.trim();
        if reason.len() > 1000 {
            return Err(ServiceError::BadRequest(
                "reason: at most 1000 characters".into(),
            ));
        }
        let now = now_us();
        self.defences
            .blocks
            .check_room(&net, now)
            .map_err(ServiceError::BadRequest)?;
        let block = super::model::IpBlock {
            ip: crate::net::net_key(&net),
            reason: reason.to_string(),
            created_at: now,
            expires_at: now.saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2)),
            created_by: actor.user_id.clone(),
        };
        let event = AuditEvent::new("ip_blocked", actor.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(IpBlocked {
                blocked_ip: &block.ip,
                reason,
                until: clock::format_us(block.expires_at),
            });
        let mut ops = vec![WriteOp::put_json(
            Collection::IpBlocks,
            block.ip.clone(),
            &block,
            Expect::Any,
        )?];
        for old in self.defences.blocks.store_keys(&net) {
            if old != block.ip {
                ops.push(WriteOp::delete(Collection::IpBlocks, old, Expect::Any));
            }
        }
        self.audit.record_with(event, ops)?;
        self.defences.blocks.insert(net, block.clone());
        tracing::warn!(ip = %block.ip, by = %actor.user_id, "ip blocked");
        Ok(block.view())
    }

    pub fn unblock_ip(
        &self,
        actor: &Principal,
        ip: &str,
        meta: &RequestMeta,
    ) -> Result<(), ServiceError> {
        let net = self
            .defences
            .blocks
            .target(ip)
            .map_err(ServiceError::BadRequest)?;
        let key = crate::net::net_key(&net);
        if !self.defences.blocks.is_active(&net, now_us()) {
            return Err(ServiceError::NotFound(format!("{key} is not blocked")));
        }
        let event = AuditEvent::new("ip_unblocked", actor.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(IpUnblocked { blocked_ip: &key });
        let ops = self
            .defences
            .blocks
            .store_keys(&net)
            .into_iter()
            .map(|k| WriteOp::delete(Collection::IpBlocks, k, Expect::Any))
            .collect();
        self.audit.record_with(event, ops)?;
        self.defences.blocks.remove(&net);
        Ok(())
    }

    pub fn list_blocks(&self) -> Vec<IpBlockView> {
        self.defences
            .blocks
            .list(now_us())
            .iter()
            .map(|b| b.view())
            .collect()
    }
}
