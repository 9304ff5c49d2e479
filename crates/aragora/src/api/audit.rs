//! `/api/security/audit/*`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiResult, QueryParams, blocking};
use crate::app::AppState;
use crate::audit::{DEFAULT_SEARCH_LIMIT, MAX_SEARCH_LIMIT, SearchFilter};
use crate::error::ServiceError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    action: Option<String>,
    actor: Option<String>,
    minutes: Option<u64>,
    limit: Option<usize>,
    before: Option<String>,
}

pub async fn search(
    State(state): State<Arc<AppState>>,
    QueryParams(q): QueryParams<SearchQuery>,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(DEFAULT_SEARCH_LIMIT);
    if limit == 0 || limit > MAX_SEARCH_LIMIT {
        return Err(
            ServiceError::BadRequest(format!("limit: must be 1 to {MAX_SEARCH_LIMIT}")).into(),
        );
    }
    if q.minutes == Some(0) {
        return Err(ServiceError::BadRequest("minutes: must be at least 1".into()).into());
    }
    let filter = SearchFilter {
        action: q.action.filter(|s| !s.is_empty()),
        actor: q.actor.filter(|s| !s.is_empty()),
        minutes: q.minutes,
        before: q.before.filter(|s| !s.is_empty()),
        limit,
    };
    let result = blocking(move || Ok(state.audit.search(&filter)?)).await?;
    Ok(axum::Json(result).into_response())
}

pub async fn verify(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let report = blocking(move || Ok(state.audit.verify()?)).await?;
    Ok(axum::Json(report).into_response())
}
