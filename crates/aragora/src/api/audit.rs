//! `/api/security/audit/*`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiResult, QueryParams, blocking};
use crate::app::AppState;
use crate::audit::{DEFAULT_SEARCH_LIMIT, MAX_SEARCH_LIMIT, SEARCH_SCAN_BUDGET, SearchFilter};
use crate::error::ServiceError;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// Only entries with this action (e.g. permission_denied).
    action: Option<String>,
    /// Only entries by this actor (a user id).
    actor: Option<String>,
    /// Only entries of the last this many minutes (at least 1).
    minutes: Option<u64>,
    /// Entries per page: 1 to 10000, default 1000.
    limit: Option<usize>,
    /// Only entries older than this entry id (`next_before` of the previous page).
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
    // `before` is an entry id (`next_before`): 16 to 32 lowercase hex digits,
    // the first 16 its time. Anything else would be a range of no meaning.
    let is_id = |b: &str| {
        (16..=32).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    if q.before
        .as_deref()
        .is_some_and(|b| !b.is_empty() && !is_id(b))
    {
        return Err(ServiceError::BadRequest(
            "before: must be an entry id (next_before of a previous page)".into(),
        )
        .into());
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
    // Bounded: one request reads at most the budget's entries, whatever the
    // window holds (a short page says so with `next_before`).
    let result =
        blocking(move || Ok(state.audit.search_bounded(&filter, SEARCH_SCAN_BUDGET)?)).await?;
    Ok(axum::Json(result).into_response())
}

pub async fn verify(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let report = blocking(move || Ok(state.audit.verify()?)).await?;
    Ok(axum::Json(report).into_response())
}
