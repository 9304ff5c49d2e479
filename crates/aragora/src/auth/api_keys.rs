//! API keys (`ara_<id>_<secret>`, shown once, stored as SHA-256 of the
//! secret). `ApiKeys` owns `Collection::ApiKeys`.

use std::sync::Arc;

use super::details::{ApiKeyCreated, ApiKeysRevoked};
use super::model::ApiKey;
use super::tokens::{random_hex, sha256_hex};
use super::{AuthService, Principal, RequestMeta};
use crate::audit::{AuditEvent, Outcome};
use crate::clock::now_us;
use crate::error::ServiceError;
use crate::store::{Collection, Expect, Store, StoreError, WriteOp, for_each_json, get_json};

pub const API_KEY_PREFIX: &str = "ara_";

#[derive(Debug)]
pub(crate) struct ApiKeys {
    store: Arc<dyn Store>,
}

impl ApiKeys {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub(crate) fn get(&self, id: &str) -> Result<Option<ApiKey>, ServiceError> {
        Ok(get_json::<ApiKey>(self.store.as_ref(), Collection::ApiKeys, id)?.map(|(_, k)| k))
    }

    pub(crate) fn for_each(
        &self,
        f: impl FnMut(String, u64, ApiKey) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for_each_json::<ApiKey>(self.store.as_ref(), Collection::ApiKeys, f)
    }

    /// The writes that revoke the active keys of `user_id` (only `only`, if
    /// given), and their ids.
    pub(crate) fn revoke_ops(
        &self,
        user_id: &str,
        only: Option<&str>,
        now: i64,
    ) -> Result<(Vec<String>, Vec<WriteOp>), ServiceError> {
        let mut ops = Vec::new();
        let mut ids = Vec::new();
        self.for_each(|id, version, mut k| {
            if k.user_id == user_id && k.revoked_at.is_none() && only.is_none_or(|o| o == id) {
                k.revoked_at = Some(now);
                ops.push(WriteOp::put_json(
                    Collection::ApiKeys,
                    id.clone(),
                    &k,
                    Expect::Version(version),
                )?);
                ids.push(id);
            }
            Ok(())
        })?;
        Ok((ids, ops))
    }
}

impl AuthService {
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
        self.api_keys.for_each(|_, _, k| {
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
        let (ids, ops) = self.api_keys.revoke_ops(user_id, only, now)?;
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
