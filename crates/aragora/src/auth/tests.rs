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
        Principal {
            user_id: user.id.clone(),
            email: user.email.clone(),
            roles: user.roles.clone(),
            credential: Credential::ApiKey {
                key_id: "test".into(),
            },
        }
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
