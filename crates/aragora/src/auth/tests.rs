//! Service-level tests of the account operations, on a real embedded store.

use std::sync::Arc;

use super::*;
use crate::audit::{AuditEntry, SearchFilter};
use crate::store::{Durability, EmbeddedStore};

pub(super) struct Fixture {
    pub(super) auth: AuthService,
    pub(super) audit: Arc<AuditLog>,
    pub(super) store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

pub(super) fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
    let audit = Arc::new(AuditLog::new(store.clone()));
    let metrics = Metrics::new().expect("metrics").with_known_series();
    let rbac = Arc::new(
        Rbac::load(store.as_ref(), metrics.clone(), std::time::Duration::ZERO).expect("rbac"),
    );
    let config = Config::from_vars(&Default::default()).expect("config");
    let auth = AuthService::new(
        &config,
        "test-jwt-secret-0123456789abcdef0123456789abcdef",
        store.clone(),
        audit.clone(),
        rbac,
        metrics,
        None,
    )
    .expect("auth");
    Fixture {
        auth,
        audit,
        store,
        _dir: dir,
    }
}

impl Fixture {
    /// A user written directly (no actor, no password): the starting state.
    pub(super) fn user(&self, email: &str, roles: &[&str]) -> User {
        let (user, ops) = users::new_user(
            email.to_string(),
            None,
            roles.iter().map(|r| r.to_string()).collect(),
        )
        .expect("new user");
        self.store.write(ops, Durability::Visible).expect("write");
        user
    }

    pub(super) fn principal(&self, user: &User) -> Principal {
        Principal::of(
            user.clone(),
            Credential::ApiKey {
                key_id: "test".into(),
            },
        )
    }

    pub(super) fn entries(&self, action: &str) -> Vec<AuditEntry> {
        self.audit
            .search(&SearchFilter {
                action: Some(action.into()),
                limit: 100,
                ..Default::default()
            })
            .expect("search")
            .entries
    }
}

pub(super) fn meta() -> RequestMeta {
    RequestMeta {
        ip: Some("192.0.2.10".parse().expect("ip")),
        user_agent: None,
    }
}

#[test]
fn an_approval_acts_as_the_requester_with_the_roles_held_now() {
    let f = fixture();
    let admin = f.user("root@example.com", &["admin"]);
    let op = f.user("op@example.com", &["operator"]);
    f.auth
        .add_role(&f.principal(&admin), &op.id, "approver", &meta())
        .expect("add role");
    let p = f
        .auth
        .principal_for_approval(&op.id, "apr_1")
        .expect("principal");
    assert_eq!(p.user_id, op.id);
    assert_eq!(p.email, "op@example.com");
    assert_eq!(
        p.roles,
        vec!["approver".to_string(), "operator".to_string()]
    );
    assert_eq!(
        p.credential,
        Credential::Approval {
            approval_id: "apr_1".into()
        }
    );
}

#[test]
fn an_approval_is_not_run_for_a_missing_or_disabled_requester() {
    let f = fixture();
    let admin = f.user("root@example.com", &["admin"]);
    let op = f.user("op@example.com", &["operator"]);
    let e = f
        .auth
        .principal_for_approval("usr_gone", "apr_1")
        .expect_err("missing");
    assert!(
        matches!(&e, ServiceError::Conflict(m) if m.contains("no longer exists") && m.contains("apr_1")),
        "{e}"
    );
    f.auth
        .disable(&f.principal(&admin), &op.id, "left the company", &meta())
        .expect("disable");
    let e = f
        .auth
        .principal_for_approval(&op.id, "apr_2")
        .expect_err("disabled");
    assert!(
        matches!(&e, ServiceError::Conflict(m) if m.contains("disabled") && m.contains("op@example.com")),
        "{e}"
    );
}

#[test]
fn a_locked_requester_still_gets_its_approved_request_run() {
    let f = fixture();
    let admin = f.user("root@example.com", &["admin"]);
    let op = f.user("op@example.com", &["operator"]);
    f.auth
        .bulk_lock(
            &f.principal(&admin),
            &["op@example.com".to_string()],
            "1h",
            &meta(),
        )
        .expect("lock");
    assert!(f.auth.principal_for_approval(&op.id, "apr_1").is_ok());
}

#[test]
fn an_approval_principal_has_no_session_to_log_out() {
    let f = fixture();
    let op = f.user("op@example.com", &["operator"]);
    let p = f
        .auth
        .principal_for_approval(&op.id, "apr_1")
        .expect("principal");
    assert!(matches!(
        f.auth.logout(&p, &meta()),
        Err(ServiceError::BadRequest(_))
    ));
}

const PASSWORD: &str = "correct horse battery staple";

/// A user with a password, a live session token and an API key.
fn user_with_credentials(
    f: &Fixture,
    admin: &User,
    email: &str,
    roles: &[&str],
) -> (User, String, String) {
    let actor = f.principal(admin);
    let user = f
        .auth
        .create_user(
            &actor,
            email,
            Some(PASSWORD),
            roles.iter().map(|r| r.to_string()).collect(),
            &meta(),
        )
        .expect("create user");
    let (token, _, _) = f.auth.login(email, PASSWORD, &meta()).expect("login");
    let (_, key) = f
        .auth
        .create_api_key(&actor, &user.id, "ci", &meta())
        .expect("api key");
    (user, token, key)
}

fn bearer(f: &Fixture, token: &str) -> Result<Principal, ServiceError> {
    f.auth
        .authenticate(Some(&format!("Bearer {token}")), &meta())
}

#[test]
fn deleting_a_user_removes_it_and_ends_its_sessions_and_keys() {
    let f = fixture();
    let admin = f.user("root@example.com", &["admin"]);
    let (user, token, key) = user_with_credentials(&f, &admin, "dev@example.com", &["member"]);
    assert!(bearer(&f, &token).is_ok() && bearer(&f, &key).is_ok());

    f.auth
        .check_delete_user(&f.principal(&admin), &user.id, &meta())
        .expect("allowed");
    assert!(f.auth.user(&user.id).is_ok(), "a check writes nothing");

    let done = f
        .auth
        .delete_user(&f.principal(&admin), &user.id, &meta())
        .expect("delete");
    assert_eq!(done.id, user.id);
    assert_eq!(done.email, "dev@example.com");
    assert_eq!((done.sessions_revoked, done.api_keys_revoked), (1, 1));
    assert!(matches!(
        f.auth.user(&user.id),
        Err(ServiceError::NotFound(_))
    ));
    assert!(
        f.auth
            .user_by_email("dev@example.com")
            .expect("read")
            .is_none()
    );
    let sessions = f.auth.sessions.of_user(&user.id).expect("sessions");
    assert!(
        sessions
            .iter()
            .all(|(_, _, s)| s.revoked_reason.as_deref() == Some("user_deleted"))
    );
    assert!(
        f.auth
            .api_keys_of(&user.id)
            .expect("keys")
            .iter()
            .all(|k| k.revoked_at.is_some())
    );
    for credential in [&token, &key] {
        assert!(
            matches!(
                bearer(&f, credential),
                Err(ServiceError::Unauthorized { .. })
            ),
            "a deleted user's credentials fail"
        );
    }

    let entries = f.entries("user_deleted");
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.actor, admin.id);
    assert_eq!(e.ip_address.as_deref(), Some("192.0.2.10"));
    assert_eq!(e.details["user_id"], user.id.as_str());
    assert_eq!(e.details["email"], "dev@example.com");
    assert_eq!(e.details["sessions_revoked"], 1);
    assert_eq!(e.details["api_keys_revoked"], 1);
    assert_eq!(e.details["roles"], serde_json::json!(["member"]));
}

#[test]
fn a_deleted_users_email_can_be_reused_and_its_old_credentials_stay_dead() {
    let f = fixture();
    let admin = f.user("root@example.com", &["admin"]);
    let (old, token, key) = user_with_credentials(&f, &admin, "dev@example.com", &["member"]);
    f.auth
        .delete_user(&f.principal(&admin), &old.id, &meta())
        .expect("delete");
    let (new, new_token, new_key) =
        user_with_credentials(&f, &admin, "dev@example.com", &["member"]);
    assert_ne!(new.id, old.id, "a new account, not the old one back");
    assert_eq!(bearer(&f, &new_token).expect("new token").user_id, new.id);
    assert_eq!(bearer(&f, &new_key).expect("new key").user_id, new.id);
    for credential in [&token, &key] {
        assert!(matches!(
            bearer(&f, credential),
            Err(ServiceError::Unauthorized { .. })
        ));
    }
}

#[test]
fn nobody_deletes_their_own_account() {
    let f = fixture();
    let admin = f.user("root@example.com", &["admin"]);
    f.user("other@example.com", &["admin"]);
    for e in [
        f.auth
            .check_delete_user(&f.principal(&admin), &admin.id, &meta())
            .expect_err("check"),
        f.auth
            .delete_user(&f.principal(&admin), &admin.id, &meta())
            .map(|_| ())
            .expect_err("delete"),
    ] {
        assert!(
            matches!(&e, ServiceError::Conflict(m) if m.contains("your own account")),
            "{e}"
        );
    }
    assert!(f.auth.user(&admin.id).is_ok());
}

#[test]
fn the_last_enabled_admin_is_not_deleted() {
    let f = fixture();
    let a = f.user("a@example.com", &["admin"]);
    let b = f.user("b@example.com", &["admin"]);
    // `a` is locked out of password logins but still acts with its API key:
    // deleting `b` would leave no admin able to log in.
    f.auth
        .bulk_lock(
            &f.principal(&b),
            &["a@example.com".to_string()],
            "1h",
            &meta(),
        )
        .expect("lock");
    let e = f
        .auth
        .delete_user(&f.principal(&a), &b.id, &meta())
        .expect_err("last enabled admin");
    assert!(
        matches!(&e, ServiceError::Conflict(m) if m.contains("last enabled admin") && m.contains("b@example.com")),
        "{e}"
    );
    assert!(
        f.auth
            .check_delete_user(&f.principal(&a), &b.id, &meta())
            .is_err()
    );
    assert!(f.auth.user(&b.id).is_ok());
    // With another able admin, it goes.
    f.user("c@example.com", &["admin"]);
    f.auth
        .delete_user(&f.principal(&a), &b.id, &meta())
        .expect("another admin remains");
}

#[test]
fn a_disabled_admin_can_be_deleted_by_the_last_enabled_one() {
    let f = fixture();
    let a = f.user("a@example.com", &["admin"]);
    let b = f.user("b@example.com", &["admin"]);
    f.auth
        .disable(&f.principal(&a), &b.id, "left", &meta())
        .expect("disable");
    f.auth
        .delete_user(&f.principal(&a), &b.id, &meta())
        .expect("deleting a disabled admin leaves the enabled ones");
}

#[test]
fn a_user_holding_more_than_the_actor_is_not_deleted_and_the_refusal_is_audited() {
    let f = fixture();
    let admin = f.user("root@example.com", &["admin"]);
    let lead = f.user("lead@example.com", &["security_lead"]);
    let op = f.user("op@example.com", &["operator"]);
    for result in [
        f.auth
            .check_delete_user(&f.principal(&lead), &admin.id, &meta()),
        f.auth
            .delete_user(&f.principal(&lead), &admin.id, &meta())
            .map(|_| ()),
    ] {
        assert!(
            matches!(&result, Err(ServiceError::Forbidden { permission }) if permission == "*"),
            "{result:?}"
        );
    }
    assert!(f.auth.user(&admin.id).is_ok());
    let denials = f.entries("permission_denied");
    assert_eq!(
        denials.len(),
        2,
        "the check and the delete are each audited"
    );
    let d = &denials[0].details;
    assert_eq!(d["action"], "user_deleted");
    assert_eq!(d["reason"], "privilege_ceiling");
    assert_eq!(d["permission"], "*");
    assert_eq!(d["target_user_id"], admin.id.as_str());
    assert_eq!(d["target_email"], "root@example.com");
    // Within its reach, it may.
    f.auth
        .delete_user(&f.principal(&lead), &op.id, &meta())
        .expect("operator is within a security lead's grants");
}

#[test]
fn deleting_an_unknown_user_is_not_found() {
    let f = fixture();
    let admin = f.user("root@example.com", &["admin"]);
    assert!(matches!(
        f.auth
            .delete_user(&f.principal(&admin), "usr_nope", &meta()),
        Err(ServiceError::NotFound(_))
    ));
}

#[test]
fn an_approved_request_by_a_deleted_requester_is_not_run() {
    let f = fixture();
    let admin = f.user("root@example.com", &["admin"]);
    let op = f.user("op@example.com", &["operator"]);
    f.auth
        .delete_user(&f.principal(&admin), &op.id, &meta())
        .expect("delete");
    assert!(matches!(
        f.auth.principal_for_approval(&op.id, "apr_1"),
        Err(ServiceError::Conflict(_))
    ));
}
