//! `/api/auth/*`: login, logout, the caller's account and API keys.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::views::{ApiKeysView, CreatedKeyView, LoginView, MeView, RevokedIdsView};
use super::{ApiResult, JsonBody, LimitedJsonBody, blocking, hashing};
use crate::app::AppState;
use crate::auth::{Principal, RequestMeta};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    email: String,
    password: String,
}

pub async fn login(
    State(state): State<Arc<AppState>>,
    Extension(meta): Extension<RequestMeta>,
    LimitedJsonBody(body): LimitedJsonBody<LoginBody, { crate::auth::MAX_LOGIN_BODY_BYTES }>,
) -> ApiResult<Response> {
    // Cheap refusals first: malformed input, then the address limit, before
    // a password-hashing slot is taken.
    state
        .auth
        .validate_login_input(&body.email, &body.password)?;
    // Off the executor: the limit may ask Redis, a refusal is audited.
    let (st, email, m) = (state.clone(), body.email.clone(), meta.clone());
    blocking(move || st.auth.check_login_rate(&email, &m)).await?;
    let st = state.clone();
    let (token, expires_in, session_id) = hashing(&state, move || {
        st.auth.login(&body.email, &body.password, &meta)
    })
    .await?;
    Ok(axum::Json(LoginView {
        access_token: token,
        token_type: "Bearer".into(),
        expires_in,
        session_id,
    })
    .into_response())
}

pub async fn logout(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
) -> ApiResult<Response> {
    blocking(move || state.auth.logout(&p, &meta)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn me(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Response> {
    let user = state.auth.get_user(&p.user_id)?;
    let permissions = state
        .rbac
        .permissions_of(&p.roles)
        .into_iter()
        .map(str::to_string)
        .collect();
    Ok(axum::Json(MeView { user, permissions }).into_response())
}

pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Response> {
    let keys = state.auth.api_keys_of(&p.user_id)?;
    Ok(axum::Json(ApiKeysView {
        api_keys: keys.iter().map(|k| k.view()).collect(),
    })
    .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    pub name: String,
}

pub async fn create_key(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(body): JsonBody<KeyBody>,
) -> ApiResult<Response> {
    let (key, token) = blocking(move || {
        let uid = p.user_id.clone();
        state.auth.create_api_key(&p, &uid, &body.name, &meta)
    })
    .await?;
    Ok(created_key(key, token))
}

pub(super) fn created_key(key: crate::auth::model::ApiKey, token: String) -> Response {
    let v = CreatedKeyView {
        key: key.view(),
        token,
        note: "the token is shown only now; store it securely".into(),
    };
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(key_id): Path<String>,
) -> ApiResult<Response> {
    let ids = blocking(move || {
        let uid = p.user_id.clone();
        state.auth.revoke_api_keys(&p, &uid, Some(&key_id), &meta)
    })
    .await?;
    Ok(axum::Json(RevokedIdsView { revoked: ids }).into_response())
}

/// Carries a password: Debug never shows it.
impl std::fmt::Debug for LoginBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginBody { .. }")
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChangeBody {
    current_password: String,
    new_password: String,
}

/// Carries passwords: Debug never shows them.
impl std::fmt::Debug for PasswordChangeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordChangeBody { .. }")
    }
}

pub async fn change_password(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<PasswordChangeBody>,
) -> ApiResult<Response> {
    if b.current_password.len() > crate::auth::password::MAX_PASSWORD_LEN {
        return Err(super::bad_request(
            "current_password: longer than 1024 bytes",
        ));
    }
    let st = state.clone();
    hashing(&state, move || {
        st.auth
            .change_own_password(&p, &b.current_password, &b.new_password, &meta)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
