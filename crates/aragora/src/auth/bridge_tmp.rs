//! TEMPORARY: stand-ins for helper D's functions; removed when h15-d merges.
use super::{AuthService, Credential, Principal, RequestMeta};
use crate::error::ServiceError;

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeletedUser {
    pub id: String,
}

impl AuthService {
    pub fn principal_for_approval(
        &self,
        user_id: &str,
        approval_id: &str,
    ) -> Result<Principal, ServiceError> {
        let (_, u) = self.user(user_id)?;
        if u.disabled {
            return Err(ServiceError::Forbidden {
                permission: "an enabled account".into(),
            });
        }
        Ok(Principal {
            user_id: u.id,
            email: u.email,
            roles: u.roles,
            credential: Credential::Session {
                session_id: format!("approval:{approval_id}"),
            },
        })
    }
    pub fn check_delete_user(
        &self,
        _actor: &Principal,
        user_id: &str,
        _meta: &RequestMeta,
    ) -> Result<(), ServiceError> {
        self.user(user_id).map(|_| ())
    }
    pub fn delete_user(
        &self,
        actor: &Principal,
        user_id: &str,
        meta: &RequestMeta,
    ) -> Result<DeletedUser, ServiceError> {
        self.check_delete_user(actor, user_id, meta)?;
        Err(ServiceError::Unavailable(
            "delete_user lands with h15-d".into(),
        ))
    }
}
