//! Account administration. Each change is a compare-and-set on the user record
//! written with its audit entry, and invalidates the user's cached RBAC
//! decisions before returning. `Users` owns the user records and their email
//! index.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;

use super::details::{
    Bootstrapped, BulkLocked, Disabled, NoDetails, PasswordChanged, PasswordSet, RoleChange,
    TargetNewUser, TargetUserRole, UserChange, UserCreated,
};
use super::model::{User, UserView};
use super::tokens::{new_api_key, random_hex};
use super::{AuthService, CAS_RETRIES, Principal, RequestMeta, password};
use crate::audit::{AuditEvent, Outcome, RecordError};
use crate::clock::{self, now_us, parse_duration};
use crate::error::ServiceError;
use crate::store::{Collection, Expect, Store, StoreError, WriteOp, for_each_json, get_json};

pub const MAX_EMAIL_LEN: usize = 254;
const BOOTSTRAP_MARKER: &str = "bootstrap";
/// Accounts one bulk-lock call may name.
pub const MAX_BULK_LOCK: usize = 1000;
/// Longest lock or IP block one call may set.
pub const MAX_LOCK_SECS: u64 = 366 * 86_400;

pub fn normalize_email(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

/// A plausible address: at most 254 bytes, one `@` between a non-empty local
/// part and domain, no whitespace or control characters.
pub fn is_email(email: &str) -> bool {
    email.len() <= MAX_EMAIL_LEN
        && email
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@'))
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
}

pub(crate) fn validate_email(email: &str) -> Result<(), ServiceError> {
    if is_email(email) {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(format!(
            "email: not an email address (one @, no spaces, at most {MAX_EMAIL_LEN} bytes)"
        )))
    }
}

/// A new user record and the writes that create it (the email index entry
/// makes emails unique).
pub(crate) fn new_user(
    email: String,
    password_hash: Option<String>,
    mut roles: Vec<String>,
) -> Result<(User, Vec<WriteOp>), ServiceError> {
    roles.sort();
    roles.dedup();
    let user = User {
        id: format!("usr_{}", random_hex(8)?),
        email,
        password_hash,
        roles,
        disabled: false,
        disabled_reason: None,
        created_at: now_us(),
        failed_logins: 0,
        lockouts: 0,
        locked_until: None,
        last_active_at: None,
        session_generation: 0,
    };
    let ops = vec![
        WriteOp::put_json(
            Collection::UserEmails,
            user.email.clone(),
            &user.id,
            Expect::Absent,
        )?,
        put_user(&user, 0)?,
    ];
    Ok((user, ops))
}

pub(crate) fn put_user(user: &User, version: u64) -> Result<WriteOp, ServiceError> {
    let expect = if version == 0 {
        Expect::Absent
    } else {
        Expect::Version(version)
    };
    Ok(WriteOp::put_json(
        Collection::Users,
        user.id.clone(),
        user,
        expect,
    )?)
}

/// Minimum interval between persisted `last_active_at` updates of one user.
const ACTIVITY_FLUSH_US: i64 = 60_000_000;

/// Owns `Collection::Users` and its email index `Collection::UserEmails`,
/// and the latest activity per user seen by this process (flushed to the
/// store at most once a minute per user).
#[derive(Debug)]
pub(crate) struct Users {
    store: Arc<dyn Store>,
    activity: Mutex<HashMap<String, i64>>,
}

impl Users {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            activity: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn find(&self, id: &str) -> Result<Option<(u64, User)>, ServiceError> {
        Ok(get_json::<User>(
            self.store.as_ref(),
            Collection::Users,
            id,
        )?)
    }

    pub(crate) fn get(&self, id: &str) -> Result<(u64, User), ServiceError> {
        self.find(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no user with id {id}")))
    }

    /// The id the email index names for `email`, with the entry's version.
    pub(crate) fn email_owner(&self, email: &str) -> Result<Option<(u64, String)>, ServiceError> {
        Ok(get_json::<String>(
            self.store.as_ref(),
            Collection::UserEmails,
            email,
        )?)
    }

    pub(crate) fn by_email(&self, email: &str) -> Result<Option<(u64, User)>, ServiceError> {
        match self.email_owner(email)? {
            Some((_, id)) => self.find(&id),
            None => Ok(None),
        }
    }

    pub(crate) fn for_each(
        &self,
        f: impl FnMut(String, u64, User) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for_each_json::<User>(self.store.as_ref(), Collection::Users, f)
    }

    /// Notes activity; persists it when the stored value is over a minute old.
    pub(crate) fn touch(&self, user: &User, version: u64) {
        let now = now_us();
        if self.touch_in_memory(user, now) {
            return;
        }
        let mut u = user.clone();
        u.last_active_at = Some(now);
        // Best effort: a lost race means someone else wrote the user just now.
        if let Ok(op) = put_user(&u, version) {
            let _ = self
                .store
                .write(vec![op], crate::store::Durability::Visible);
        }
    }

    /// Records activity in memory; `false` when the stored record is due a
    /// write too (its `last_active_at` is more than a minute old).
    pub(crate) fn touch_in_memory(&self, user: &User, now: i64) -> bool {
        self.activity.lock().insert(user.id.clone(), now);
        user.last_active_at
            .is_some_and(|t| now - t < ACTIVITY_FLUSH_US)
    }

    pub(crate) fn last_active(&self, user: &User) -> Option<i64> {
        let mem = self.activity.lock().get(&user.id).copied();
        match (mem, user.last_active_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn forget_activity(&self, user_id: &str) {
        self.activity.lock().remove(user_id);
    }
}

impl AuthService {
    fn check_roles(&self, roles: &[String]) -> Result<(), ServiceError> {
        for r in roles {
            if !self.rbac.role_exists(r) {
                return Err(ServiceError::BadRequest(format!(
                    "roles: {r:?} is not a role (GET /api/security/rbac/roles lists them)"
                )));
            }
        }
        Ok(())
    }

    /// Creates a user; the email must be unused.
    pub fn create_user(
        &self,
        actor: &Principal,
        email: &str,
        password: Option<&str>,
        roles: Vec<String>,
        meta: &RequestMeta,
    ) -> Result<User, ServiceError> {
        let email = normalize_email(email);
        validate_email(&email)?;
        self.check_roles(&roles)?;
        let wanted: Vec<String> = roles
            .iter()
            .flat_map(|r| self.rbac.role_grants(r).unwrap_or_default())
            .collect();
        self.require_grants(
            actor,
            wanted.iter().map(String::as_str),
            "user_created",
            TargetNewUser {
                target_email: &email,
                target_roles: &roles,
            },
            meta,
        )?;
        let password_hash = match password {
            Some(p) => {
                password::check_policy(p).map_err(ServiceError::BadRequest)?;
                Some(password::hash(p).map_err(ServiceError::Internal)?)
            }
            None => None,
        };
        let (user, ops) = new_user(email.clone(), password_hash, roles)?;
        let event = AuditEvent::new("user_created", actor.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(UserCreated {
                user_id: &user.id,
                email: &email,
                roles: &user.roles,
            });
        match self.audit.record_with(event, ops) {
            Ok(_) => Ok(user),
            Err(RecordError::Ops(_)) => Err(ServiceError::Conflict(format!(
                "a user with email {email} already exists"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies `change` to the user with compare-and-set, audited as `action`;
    /// `change` returns the audit details and writes of its own (in the
    /// same atomic batch as the user record and the audit entry).
    pub(crate) fn update_user_with<D: Serialize>(
        &self,
        actor: &str,
        user_id: &str,
        action: &'static str,
        meta: &RequestMeta,
        mut change: impl FnMut(&mut User) -> Result<(D, Vec<WriteOp>), ServiceError>,
    ) -> Result<User, ServiceError> {
        for _ in 0..CAS_RETRIES {
            let (version, mut user) = self.user(user_id)?;
            let (change, mut ops) = change(&mut user)?;
            let event = AuditEvent::new(action, actor, Outcome::Success)
                .ip(meta.ip_string())
                .details(UserChange {
                    change,
                    user_id: &user.id,
                    email: &user.email,
                });
            ops.insert(0, put_user(&user, version)?);
            match self.audit.record_with(event, ops) {
                Ok(_) => {
                    self.rbac.invalidate_user(user_id);
                    return Ok(user);
                }
                Err(RecordError::Ops(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Conflict(format!(
            "user {user_id} is changing concurrently; retry"
        )))
    }

    /// An administrative change to another account: refused (403, audited)
    /// unless the target holds no grant the actor lacks, checked on the record
    /// the change applies to.
    fn admin_update<D: Serialize>(
        &self,
        actor: &Principal,
        user_id: &str,
        action: &'static str,
        meta: &RequestMeta,
        mut change: impl FnMut(&mut User) -> Result<(D, Vec<WriteOp>), ServiceError>,
    ) -> Result<User, ServiceError> {
        self.update_user_with(&actor.user_id, user_id, action, meta, |u| {
            self.require_ceiling_over(actor, u, action, meta)?;
            change(u)
        })
    }

    /// The refusals of `add_role` decided before its write (the role exists;
    /// the actor holds every grant it hands out), without writing: the
    /// approval gate checks a `privileged_role_grant` request with it.
    /// Returns the role's grants.
    pub fn check_add_role(
        &self,
        actor: &Principal,
        user_id: &str,
        role: &str,
        meta: &RequestMeta,
    ) -> Result<Vec<String>, ServiceError> {
        self.check_roles(&[role.to_string()])?;
        let grants = self.rbac.role_grants(role).unwrap_or_default();
        self.require_grants(
            actor,
            grants.iter().map(String::as_str),
            "role_assigned",
            TargetUserRole {
                target_user_id: user_id,
                target_role: role,
            },
            meta,
        )?;
        Ok(grants)
    }

    pub fn add_role(
        &self,
        actor: &Principal,
        user_id: &str,
        role: &str,
        meta: &RequestMeta,
    ) -> Result<User, ServiceError> {
        self.check_add_role(actor, user_id, role, meta)?;
        self.admin_update(actor, user_id, "role_assigned", meta, |u| {
            if !u.roles.iter().any(|r| r == role) {
                u.roles.push(role.to_string());
                u.roles.sort();
            }
            Ok((
                RoleChange {
                    role,
                    roles: u.roles.clone(),
                },
                Vec::new(),
            ))
        })
    }

    pub fn remove_role(
        &self,
        actor: &Principal,
        user_id: &str,
        role: &str,
        meta: &RequestMeta,
    ) -> Result<User, ServiceError> {
        if actor.user_id == user_id && role == "admin" {
            return Err(ServiceError::Conflict(
                "refusing to remove your own admin role (ask another admin)".into(),
            ));
        }
        self.admin_update(actor, user_id, "role_removed", meta, |u| {
            let was_admin = self.is_admin(u);
            let before = u.roles.len();
            u.roles.retain(|r| r != role);
            if u.roles.len() == before {
                return Err(ServiceError::NotFound(format!(
                    "user {} does not have role {role}",
                    u.id
                )));
            }
            let mut ops = Vec::new();
            if was_admin && !u.disabled && !self.is_admin(u) {
                ops.push(self.keep_another_admin(u, "remove the admin role")?);
            }
            Ok((
                RoleChange {
                    role,
                    roles: u.roles.clone(),
                },
                ops,
            ))
        })
    }

    /// Disables an account: every session ends now (enabling it later does not
    /// bring them back) and its API keys stop working until it is enabled.
    pub fn disable(
        &self,
        actor: &Principal,
        user_id: &str,
        reason: &str,
        meta: &RequestMeta,
    ) -> Result<User, ServiceError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > 1000 {
            return Err(ServiceError::BadRequest(
                "reason: 1 to 1000 characters".into(),
            ));
        }
        if actor.user_id == user_id {
            return Err(ServiceError::Conflict(
                "refusing to disable your own account".into(),
            ));
        }
        let user = self.admin_update(actor, user_id, "user_disabled", meta, |u| {
            let mut ops = Vec::new();
            if !u.disabled && self.is_admin(u) {
                ops.push(self.keep_another_admin(u, "disable this account")?);
            }
            u.disabled = true;
            u.disabled_reason = Some(reason.to_string());
            u.session_generation += 1;
            Ok((
                Disabled {
                    reason,
                    sessions_ended: true,
                    api_keys_suspended: true,
                },
                ops,
            ))
        })?;
        tracing::warn!(user_id, by = %actor.user_id, "user disabled");
        Ok(user)
    }

    pub fn enable(
        &self,
        actor: &Principal,
        user_id: &str,
        meta: &RequestMeta,
    ) -> Result<User, ServiceError> {
        self.admin_update(actor, user_id, "user_enabled", meta, |u| {
            u.disabled = false;
            u.disabled_reason = None;
            Ok((NoDetails {}, Vec::new()))
        })
    }

    /// An administrator sets (resets) a user's password: every session of the
    /// user ends.
    pub fn set_password(
        &self,
        actor: &Principal,
        user_id: &str,
        new_password: &str,
        meta: &RequestMeta,
    ) -> Result<User, ServiceError> {
        password::check_policy(new_password).map_err(ServiceError::BadRequest)?;
        // Before the (slow) hash: a refusal costs nothing.
        let (_, target) = self.user(user_id)?;
        self.require_ceiling_over(actor, &target, "password_set", meta)?;
        let hash = password::hash(new_password).map_err(ServiceError::Internal)?;
        self.admin_update(actor, user_id, "password_set", meta, |u| {
            u.password_hash = Some(hash.clone());
            u.session_generation += 1;
            Ok((
                PasswordSet {
                    sessions_ended: true,
                },
                Vec::new(),
            ))
        })
    }

    /// Self-service password change: the current password is checked, every
    /// other session of the caller ends, the calling session (if any) stays.
    pub fn change_own_password(
        &self,
        actor: &Principal,
        current_password: &str,
        new_password: &str,
        meta: &RequestMeta,
    ) -> Result<User, ServiceError> {
        password::check_policy(new_password).map_err(ServiceError::BadRequest)?;
        let (_, user) = self.user(&actor.user_id)?;
        let ok = user
            .password_hash
            .as_deref()
            .is_some_and(|h| password::verify(h, current_password));
        if !ok {
            if user.password_hash.is_none() {
                password::verify_dummy(current_password);
            }
            return Err(ServiceError::BadRequest(
                "current_password is not correct".into(),
            ));
        }
        let hash = password::hash(new_password).map_err(ServiceError::Internal)?;
        let keep = match &actor.credential {
            super::Credential::Session { session_id } => Some(session_id.clone()),
            super::Credential::ApiKey { .. } | super::Credential::Approval { .. } => None,
        };
        self.update_user_with(
            &actor.user_id,
            &actor.user_id,
            "password_changed",
            meta,
            |u| {
                u.password_hash = Some(hash.clone());
                u.session_generation += 1;
                let mut ops = Vec::new();
                // The caller's own session moves to the new generation.
                if let Some(sid) = &keep
                    && let Some((v, mut s)) = self.sessions.get(sid)?
                {
                    s.generation = u.session_generation;
                    ops.push(WriteOp::put_json(
                        Collection::Sessions,
                        sid.clone(),
                        &s,
                        Expect::Version(v),
                    )?);
                }
                Ok((
                    PasswordChanged {
                        other_sessions_ended: true,
                        kept_session: keep.clone(),
                    },
                    ops,
                ))
            },
        )
    }

    pub fn unlock(
        &self,
        actor: &Principal,
        user_id: &str,
        meta: &RequestMeta,
    ) -> Result<User, ServiceError> {
        self.admin_update(actor, user_id, "account_unlocked", meta, |u| {
            self.defences.lockout().on_success(u);
            Ok((NoDetails {}, Vec::new()))
        })
    }

    /// Locks the named accounts for `duration`; unknown emails are reported, not
    /// created, and do not stop the others.
    pub fn bulk_lock(
        &self,
        actor: &Principal,
        emails: &[String],
        duration: &str,
        meta: &RequestMeta,
    ) -> Result<BulkLockOutcome, ServiceError> {
        if emails.is_empty() || emails.len() > MAX_BULK_LOCK {
            return Err(ServiceError::BadRequest(format!(
                "emails: 1 to {MAX_BULK_LOCK} addresses"
            )));
        }
        let d = parse_duration("duration", duration).map_err(ServiceError::BadRequest)?;
        if d.as_secs() > MAX_LOCK_SECS {
            return Err(ServiceError::BadRequest(
                "duration: at most 366 days (disable the user for longer)".into(),
            ));
        }
        let until = now_us().saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2));
        // Every refusal is found before anything is locked: a list with one
        // account beyond the caller's reach (or the last admin in it) locks
        // nobody.
        let now = now_us();
        let mut targets = Vec::new();
        let mut not_found = Vec::new();
        for e in emails {
            let email = normalize_email(e);
            match self.user_by_email(&email)? {
                Some((_, u)) => {
                    self.require_ceiling_over(actor, &u, "account_locked", meta)?;
                    targets.push((email, u));
                }
                None => not_found.push(email),
            }
        }
        let able_admin = |u: &User| !u.disabled && !u.is_locked(now) && self.is_admin(u);
        if targets.iter().any(|(_, u)| able_admin(u)) {
            let mut remaining = 0usize;
            self.users.for_each(|id, _, u| {
                if able_admin(&u) && !targets.iter().any(|(_, t)| t.id == id) {
                    remaining += 1;
                }
                Ok(())
            })?;
            if remaining == 0 {
                let admins: Vec<&str> = targets
                    .iter()
                    .filter(|(_, u)| able_admin(u))
                    .map(|(e, _)| e.as_str())
                    .collect();
                return Err(ServiceError::Conflict(format!(
                    "refusing to lock these accounts: {} would leave no enabled admin ({} the last enabled admin{}; `aragora admin recover` is the break-glass path)",
                    admins.join(", "),
                    if admins.len() == 1 { "is" } else { "are" },
                    if admins.len() == 1 { "" } else { "s" },
                )));
            }
        }
        let mut locked = Vec::new();
        for (email, u) in targets {
            self.admin_update(actor, &u.id, "account_locked", meta, |u| {
                let mut ops = Vec::new();
                if !u.disabled && !u.is_locked(now_us()) && self.is_admin(u) {
                    ops.push(self.keep_another_admin(u, "lock this account")?);
                }
                u.locked_until = Some(until.max(u.locked_until.unwrap_or(0)));
                Ok((
                    BulkLocked {
                        until: clock::format_us(until),
                        by: "bulk_lock",
                    },
                    ops,
                ))
            })?;
            locked.push(LockedUser {
                user_id: u.id,
                email,
            });
        }
        Ok(BulkLockOutcome {
            locked,
            not_found,
            locked_until: clock::format_us(until),
        })
    }

    /// The user id an operator names by email or by id. An id need not be a
    /// current account if the audit log knows it as an actor (a deleted
    /// account's reads can still be investigated); anything else is refused, so
    /// a typo never reports "nothing found" as if all were well.
    pub fn resolve_user(&self, who: &str) -> Result<String, ServiceError> {
        let who = who.trim();
        if who.is_empty() {
            return Err(ServiceError::BadRequest(
                "a user is needed: give an email or a user id".into(),
            ));
        }
        if who.contains('@') {
            return match self.users.by_email(&normalize_email(who))? {
                Some((_, user)) => Ok(user.id),
                None => Err(ServiceError::NotFound(format!(
                    "no account has the email {who:?}"
                ))),
            };
        }
        if self.users.find(who)?.is_some() {
            return Ok(who.to_string());
        }
        let seen = self
            .audit
            .search(&crate::audit::SearchFilter {
                actor: Some(who.to_string()),
                limit: 1,
                ..Default::default()
            })
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        if seen.entries.is_empty() {
            return Err(ServiceError::NotFound(format!(
                "no user has the id {who:?} and the audit log never saw it"
            )));
        }
        Ok(who.to_string())
    }

    pub fn get_user(&self, user_id: &str) -> Result<UserView, ServiceError> {
        let (_, u) = self.user(user_id)?;
        Ok(u.view(now_us(), self.users.last_active(&u)))
    }

    /// Users, optionally only those holding `role`, in id order from `after`.
    pub fn list_users(
        &self,
        role: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<UserView>, Option<String>), ServiceError> {
        let now = now_us();
        let mut out = Vec::new();
        let mut next = None;
        self.users.for_each(|id, _, u| {
            if after.is_some_and(|a| id.as_str() <= a)
                || role.is_some_and(|r| !u.roles.iter().any(|x| x == r))
            {
                return Ok(());
            }
            if out.len() < limit {
                out.push(u.view(now, self.users.last_active(&u)));
                if out.len() == limit {
                    next = Some(id);
                }
            } else {
                return Ok(());
            }
            Ok(())
        })?;
        Ok((out, next))
    }

    /// Who may decide a request for an operation whose approver roles are
    /// `approver_roles`: enabled users holding one of them and
    /// `approvals.approve`, other than `requester`, in id order. What both
    /// `GET .../eligible-approvers` and the approval notifications list.
    pub fn eligible_approvers(
        &self,
        approver_roles: &[&str],
        requester: &str,
    ) -> Result<Vec<UserView>, ServiceError> {
        let now = now_us();
        let mut out = Vec::new();
        self.users.for_each(|_, _, u| {
            if u.id != requester
                && !u.disabled
                && u.roles.iter().any(|r| approver_roles.contains(&r.as_str()))
                && self.rbac.evaluate(&u.roles, "approvals.approve").is_some()
            {
                out.push(u.view(now, self.users.last_active(&u)));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Every user id with its roles (RBAC cache warm-up).
    pub fn all_user_roles(&self) -> Result<Vec<(String, Vec<String>)>, ServiceError> {
        let mut out = Vec::new();
        self.users.for_each(|_, _, u| {
            if !u.disabled {
                out.push((u.id, u.roles));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// `aragora admin bootstrap`: the first admin and an API key for it, once.
    /// Refused when any admin exists or a bootstrap already ran.
    pub fn bootstrap_admin(&self, email: &str) -> Result<(User, String), ServiceError> {
        let mut has_admin = false;
        self.users.for_each(|_, _, u| {
            has_admin |= u.roles.iter().any(|r| r == "admin");
            Ok(())
        })?;
        let done = get_json::<Value>(self.store.as_ref(), Collection::AuthState, BOOTSTRAP_MARKER)?
            .is_some();
        if has_admin || done {
            return Err(ServiceError::Conflict(
                "an admin already exists: bootstrap runs once; ask an admin to create your account"
                    .into(),
            ));
        }
        let email = normalize_email(email);
        validate_email(&email)?;
        // User, key and marker in one write: a failed bootstrap leaves nothing
        // behind that would refuse the next attempt.
        let (user, mut ops) = new_user(email, None, vec!["admin".into()])?;
        let (key, token) = new_api_key(&user.id, "bootstrap")?;
        let event = AuditEvent::new("admin_bootstrap", user.id.clone(), Outcome::Success).details(
            Bootstrapped {
                user_id: &user.id,
                email: &user.email,
                key_id: &key.id,
            },
        );
        ops.push(WriteOp::put_json(
            Collection::AuthState,
            BOOTSTRAP_MARKER,
            &BootstrapMarker {
                user_id: &user.id,
                at: now_us(),
            },
            Expect::Absent,
        )?);
        ops.push(WriteOp::put_json(
            Collection::ApiKeys,
            key.id.clone(),
            &key,
            Expect::Absent,
        )?);
        match self.audit.record_with(event, ops) {
            Ok(_) => Ok((user, token)),
            Err(RecordError::Ops(_)) => {
                Err(ServiceError::Conflict("a concurrent bootstrap won".into()))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The record saying the one-time bootstrap ran.
#[derive(Serialize)]
struct BootstrapMarker<'a> {
    user_id: &'a str,
    at: i64,
}

/// An account `bulk_lock` locked.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct LockedUser {
    pub user_id: String,
    pub email: String,
}

/// What `POST /api/admin/users/bulk-lock` did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BulkLockOutcome {
    pub locked: Vec<LockedUser>,
    /// Emails of no account (nothing created).
    pub not_found: Vec<String>,
    pub locked_until: String,
}
