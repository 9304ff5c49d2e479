//! Break-glass recovery (`aragora admin recover`): the data dir's owner gives an
//! admin account fresh credentials when no admin can act (all disabled, locked
//! out, or without a credential). Reached only through the owner-only control
//! socket or by opening the store directly, never over HTTP: whoever can run it
//! already owns the data.
//!
//! A recovery is one atomic write with its audit entry: the account enabled,
//! unlocked and holding `admin`, every session and API key it had revoked (they
//! may be what an attacker holds), its password cleared, and one new API key.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::model::{Session, User};
use super::tokens::new_api_key;
use super::users::{new_user, normalize_email, put_user, validate_email};
use super::{AuthService, CAS_RETRIES};
use crate::audit::{AuditEvent, Outcome, RecordError};
use crate::clock::now_us;
use crate::error::ServiceError;
use crate::store::{Collection, Expect, WriteOp};

pub const ADMIN_ROLE: &str = "admin";
pub const ACTION: &str = "admin_recovered";
const MAX_REASON_LEN: usize = 1000;

/// What the operator asked for.
#[derive(Clone, Copy, Debug)]
pub struct RecoveryRequest<'a> {
    pub email: &'a str,
    pub reason: Option<&'a str>,
    /// Proceed although an admin can act (their credentials may be lost).
    pub force: bool,
    /// The audit actor.
    pub actor: &'a str,
    /// How the command reached the store: `socket` or `direct`.
    pub via: &'static str,
}

/// A credential that lets an admin act right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsableCredential {
    Password,
    ApiKey,
    Session,
}

/// An admin who can act, so break-glass is not needed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AbleAdmin {
    pub user_id: String,
    pub email: String,
    pub credentials: Vec<UsableCredential>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Refusal {
    pub message: String,
    pub able_admins: Vec<AbleAdmin>,
}

/// The recovered account and its new API key (shown once).
#[derive(Clone, Serialize, Deserialize)]
pub struct RecoveredAdmin {
    pub user_id: String,
    pub email: String,
    pub token: String,
    pub key_id: String,
    pub roles: Vec<String>,
    /// No account had the email: a new admin was created.
    pub created: bool,
    pub forced: bool,
    pub password_cleared: bool,
    pub revoked_session_ids: Vec<String>,
    pub revoked_key_ids: Vec<String>,
    pub audit_entry_id: String,
}

// The token is a credential: Debug (logs, panics) never shows it.
impl fmt::Debug for RecoveredAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveredAdmin")
            .field("user_id", &self.user_id)
            .field("email", &self.email)
            .field("token", &"<redacted>")
            .field("key_id", &self.key_id)
            .field("created", &self.created)
            .field("forced", &self.forced)
            .field("revoked_session_ids", &self.revoked_session_ids)
            .field("revoked_key_ids", &self.revoked_key_ids)
            .finish_non_exhaustive()
    }
}

/// The `admin_recovered` entry.
#[derive(Serialize)]
struct Recovered<'a> {
    severity: &'static str,
    reason: Option<&'a str>,
    email: &'a str,
    user_id: &'a str,
    created: bool,
    forced: bool,
    via: &'a str,
    key_id: &'a str,
    revoked_session_ids: &'a [String],
    revoked_key_ids: &'a [String],
    was_disabled: bool,
    was_locked: bool,
    granted_admin: bool,
    password_cleared: bool,
    able_admins: Vec<&'a str>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RecoveryOutcome {
    Recovered(RecoveredAdmin),
    /// An admin can act and `force` was not given; nothing was written.
    Refused(Refusal),
}

/// The credentials with which `user` can act as an admin now (empty: it cannot).
/// A lockout stops password logins only, so a locked admin with an API key or
/// a live session can still act.
pub fn usable_credentials(
    user: &User,
    active_keys: usize,
    live_sessions: usize,
    now_us: i64,
) -> Vec<UsableCredential> {
    if user.disabled || !user.roles.iter().any(|r| r == ADMIN_ROLE) {
        return Vec::new();
    }
    let mut out = Vec::new();
    if user.password_hash.is_some() && !user.is_locked(now_us) {
        out.push(UsableCredential::Password);
    }
    if active_keys > 0 {
        out.push(UsableCredential::ApiKey);
    }
    if live_sessions > 0 {
        out.push(UsableCredential::Session);
    }
    out
}

fn check_reason(reason: Option<&str>, force: bool) -> Result<Option<String>, ServiceError> {
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    if force && reason.is_none() {
        return Err(ServiceError::BadRequest(
            "--force requires --reason TEXT (why the admins that can act are not enough)".into(),
        ));
    }
    if reason.is_some_and(|r| r.chars().count() > MAX_REASON_LEN) {
        return Err(ServiceError::BadRequest(format!(
            "reason: at most {MAX_REASON_LEN} characters"
        )));
    }
    Ok(reason.map(str::to_string))
}

impl AuthService {
    /// `aragora admin recover`: see the module documentation.
    pub fn recover_admin(&self, req: RecoveryRequest<'_>) -> Result<RecoveryOutcome, ServiceError> {
        let email = normalize_email(req.email);
        validate_email(&email)?;
        let reason = check_reason(req.reason, req.force)?;
        for _ in 0..CAS_RETRIES {
            let able = self.able_admins()?;
            if !able.is_empty() && !req.force {
                let names = able
                    .iter()
                    .map(|a| {
                        let creds: Vec<&str> = a
                            .credentials
                            .iter()
                            .map(|c| match c {
                                UsableCredential::Password => "password",
                                UsableCredential::ApiKey => "API key",
                                UsableCredential::Session => "session",
                            })
                            .collect();
                        format!("{} ({}; {})", a.email, a.user_id, creds.join(", "))
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let message = format!(
                    "refusing break-glass recovery: {} admin(s) can still act: {names}. \
                     Ask one of them; if their credentials are lost, rerun with --force --reason TEXT",
                    able.len()
                );
                tracing::warn!(email = %email, via = req.via, able_admins = able.len(), "admin recovery refused: an admin can act");
                return Ok(RecoveryOutcome::Refused(Refusal {
                    message,
                    able_admins: able,
                }));
            }
            match self.try_recover(&email, reason.as_deref(), &req, &able)? {
                Some(r) => {
                    self.rbac.invalidate_user(&r.user_id);
                    tracing::warn!(
                        user_id = %r.user_id,
                        email = %r.email,
                        created = r.created,
                        forced = r.forced,
                        via = req.via,
                        revoked_sessions = r.revoked_session_ids.len(),
                        revoked_keys = r.revoked_key_ids.len(),
                        "break-glass: admin recovered with a new API key"
                    );
                    return Ok(RecoveryOutcome::Recovered(r));
                }
                None => continue,
            }
        }
        Err(ServiceError::Conflict(format!(
            "the account {email} is changing concurrently; retry"
        )))
    }

    /// Every enabled admin that can act now, with how.
    fn able_admins(&self) -> Result<Vec<AbleAdmin>, ServiceError> {
        let mut admins = Vec::new();
        self.users.for_each(|_, _, u| {
            // Any holder of `*` (the built-in admin role or a custom one) is
            // an admin here, as for the last-admin rule.
            if !u.disabled && self.is_admin(&u) {
                admins.push(u);
            }
            Ok(())
        })?;
        if admins.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = std::collections::HashMap::<String, usize>::new();
        self.api_keys.for_each(|_, _, k| {
            if k.revoked_at.is_none() {
                *keys.entry(k.user_id).or_default() += 1;
            }
            Ok(())
        })?;
        let (_, epoch) = self.sessions.epoch()?;
        let now = now_us();
        let mut out = Vec::new();
        for u in admins {
            let live = self
                .sessions
                .of_user(&u.id)?
                .iter()
                .filter(|(_, _, s)| {
                    s.generation == u.session_generation
                        && session_live(s, epoch.revoked_before, now)
                })
                .count();
            let credentials =
                usable_credentials(&u, keys.get(&u.id).copied().unwrap_or(0), live, now);
            if !credentials.is_empty() {
                out.push(AbleAdmin {
                    user_id: u.id,
                    email: u.email,
                    credentials,
                });
            }
        }
        Ok(out)
    }

    /// One attempt: `None` when a concurrent change moved a record (re-read and
    /// decide again).
    fn try_recover(
        &self,
        email: &str,
        reason: Option<&str>,
        req: &RecoveryRequest<'_>,
        able: &[AbleAdmin],
    ) -> Result<Option<RecoveredAdmin>, ServiceError> {
        let now = now_us();
        let existing = self.user_by_email(email)?;
        let created = existing.is_none();
        let mut revoked_session_ids = Vec::new();
        let mut revoked_key_ids = Vec::new();
        let (user, mut ops, before) = match existing {
            None => {
                let (user, ops) = new_user(email.to_string(), None, vec![ADMIN_ROLE.into()])?;
                (user, ops, None)
            }
            Some((version, before)) => {
                let mut user = before.clone();
                user.disabled = false;
                user.disabled_reason = None;
                self.defences.lockout().on_success(&mut user);
                // The password may be what was stolen; the new API key is the
                // only credential the account leaves with.
                user.password_hash = None;
                // Ends every session, including any the scan below misses.
                user.session_generation += 1;
                if !user.roles.iter().any(|r| r == ADMIN_ROLE) {
                    user.roles.push(ADMIN_ROLE.into());
                    user.roles.sort();
                }
                let mut ops = vec![put_user(&user, version)?];
                let (session_ids, session_ops) = self
                    .sessions
                    .revoke_ops(&user.id, None, true, ACTION, now)?;
                let (key_ids, key_ops) = self.api_keys.revoke_ops(&user.id, None, now)?;
                ops.extend(session_ops);
                ops.extend(key_ops);
                revoked_session_ids = session_ids;
                revoked_key_ids = key_ids;
                (user, ops, Some(before))
            }
        };
        let (key, token) = new_api_key(&user.id, "recovery")?;
        ops.push(WriteOp::put_json(
            Collection::ApiKeys,
            key.id.clone(),
            &key,
            Expect::Absent,
        )?);
        let password_cleared = before.as_ref().is_some_and(|b| b.password_hash.is_some());
        let event = AuditEvent::new(ACTION, req.actor, Outcome::Success).details(Recovered {
            severity: "critical",
            reason,
            email: &user.email,
            user_id: &user.id,
            created,
            forced: req.force,
            via: req.via,
            key_id: &key.id,
            revoked_session_ids: &revoked_session_ids,
            revoked_key_ids: &revoked_key_ids,
            was_disabled: before.as_ref().is_some_and(|b| b.disabled),
            was_locked: before.as_ref().is_some_and(|b| b.is_locked(now)),
            granted_admin: before
                .as_ref()
                .is_none_or(|b| !b.roles.iter().any(|r| r == ADMIN_ROLE)),
            password_cleared,
            able_admins: able.iter().map(|a| a.user_id.as_str()).collect(),
        });
        let entry = match self.audit.record_with(event, ops) {
            Ok(entry) => entry,
            Err(RecordError::Ops(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(RecoveredAdmin {
            user_id: user.id,
            email: user.email,
            token,
            key_id: key.id,
            roles: user.roles,
            created,
            forced: req.force,
            password_cleared,
            revoked_session_ids,
            revoked_key_ids,
            audit_entry_id: entry.id,
        }))
    }
}

fn session_live(s: &Session, revoked_before: i64, now: i64) -> bool {
    s.revoked_at.is_none() && s.expires_at > now && s.created_at >= revoked_before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> User {
        User {
            id: "usr_1".into(),
            email: "root@example.com".into(),
            password_hash: None,
            roles: vec![ADMIN_ROLE.into()],
            disabled: false,
            disabled_reason: None,
            created_at: 0,
            failed_logins: 0,
            lockouts: 0,
            locked_until: None,
            last_active_at: None,
            session_generation: 0,
        }
    }

    #[test]
    fn an_admin_without_credentials_cannot_act() {
        assert!(usable_credentials(&admin(), 0, 0, 10).is_empty());
    }

    #[test]
    fn a_disabled_admin_or_a_non_admin_cannot_act_whatever_it_holds() {
        let mut u = admin();
        u.password_hash = Some("$argon2id$...".into());
        u.disabled = true;
        assert!(usable_credentials(&u, 3, 1, 10).is_empty());
        let mut u = admin();
        u.roles = vec!["viewer".into()];
        assert!(usable_credentials(&u, 3, 1, 10).is_empty());
    }

    #[test]
    fn a_lockout_stops_the_password_but_not_an_api_key() {
        let mut u = admin();
        u.password_hash = Some("$argon2id$...".into());
        u.locked_until = Some(100);
        assert!(usable_credentials(&u, 0, 0, 10).is_empty());
        assert_eq!(
            usable_credentials(&u, 1, 0, 10),
            vec![UsableCredential::ApiKey]
        );
        // The lock has run out: the password works again.
        assert_eq!(
            usable_credentials(&u, 0, 0, 200),
            vec![UsableCredential::Password]
        );
    }

    #[test]
    fn a_session_counts_only_while_live_and_after_the_revocation_epoch() {
        let s = Session {
            id: "usr_1.a".into(),
            user_id: "usr_1".into(),
            created_at: 50,
            expires_at: 100,
            revoked_at: None,
            revoked_reason: None,
            ip_address: None,
            user_agent: None,
            generation: 0,
        };
        assert!(session_live(&s, 0, 60));
        assert!(!session_live(&s, 0, 100), "expired");
        assert!(!session_live(&s, 51, 60), "revoked by revoke-all");
        let revoked = Session {
            revoked_at: Some(55),
            ..s
        };
        assert!(!session_live(&revoked, 0, 60));
    }

    #[test]
    fn force_needs_a_reason() {
        assert!(check_reason(None, true).is_err());
        assert!(check_reason(Some("  "), true).is_err());
        assert_eq!(
            check_reason(Some(" keys lost "), true)
                .ok()
                .flatten()
                .as_deref(),
            Some("keys lost")
        );
        assert_eq!(check_reason(None, false).ok().flatten(), None);
        assert!(check_reason(Some(&"x".repeat(1001)), false).is_err());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let r = RecoveredAdmin {
            user_id: "usr_1".into(),
            email: "root@example.com".into(),
            token: "ara_k_secret".into(),
            key_id: "k".into(),
            roles: vec![ADMIN_ROLE.into()],
            created: false,
            forced: false,
            password_cleared: false,
            revoked_session_ids: vec![],
            revoked_key_ids: vec![],
            audit_entry_id: "e".into(),
        };
        assert!(!format!("{r:?}").contains("secret"));
    }
}
