//! The HTTP envelope every route sits in, built from tower-http layers: request
//! ids (`x-request-id`, kept when the client sent a sane one, generated
//! otherwise, echoed on the response, recorded in the request's tracing span
//! and in internal-error bodies), a request timeout, the body size limit,
//! security headers, and panics answered as internal errors.

use std::any::Any;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use super::{MAX_BODY_BYTES, json_errors};
use crate::config::Config;

const X_REQUEST_ID: &str = "x-request-id";
/// Longest client-supplied request id kept (it is logged and echoed).
const MAX_REQUEST_ID_LEN: usize = 128;

/// Marks a 500 whose detail is logged with the request id rather than sent.
#[derive(Clone, Debug)]
struct InternalError(String);

/// A 500 for `detail`: the client gets `{"error": "internal error",
/// "request_id": ...}`, the log gets the detail under the same request id.
pub fn internal_error(detail: String) -> Response {
    hidden_error(StatusCode::INTERNAL_SERVER_ERROR, detail)
}

/// An error whose detail (store or audit internals, file paths) stays in the
/// log under the request id; the client gets the status, a generic message and
/// the id.
pub fn hidden_error(status: StatusCode, detail: String) -> Response {
    let mut resp = (status, axum::Json(json!({"error": public_message(status)}))).into_response();
    resp.extensions_mut().insert(InternalError(detail));
    resp
}

fn public_message(status: StatusCode) -> &'static str {
    if status == StatusCode::SERVICE_UNAVAILABLE {
        "the service is temporarily unavailable; retry"
    } else {
        "internal error"
    }
}

fn request_id(headers: &HeaderMap) -> &str {
    headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// Wraps `router` (outermost last): the body limit and timeout nearest the
/// routes, then JSON for every error, panics, internal-error ids, security
/// headers, the tracing span, and the request id around everything.
pub fn envelope<S: Clone + Send + Sync + 'static>(router: Router<S>, config: &Config) -> Router<S> {
    let timeout = config.request_timeout;
    let mut router = router
        // One limit, tower-http's: it refuses a declared Content-Length over
        // the limit before any handler runs and caps streamed bodies.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        // 503: a handler that overran is the server's problem, not the
        // client's (408 would invite an immediate identical retry).
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(middleware::map_response(move |r: Response| {
            timeout_body(r, timeout)
        }))
        .layer(middleware::map_response(json_errors))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(internal_errors));
    for (name, value) in security_headers(config) {
        router = router.layer(SetResponseHeaderLayer::if_not_present(name, value));
    }
    router
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                // Server errors are logged where they happen, with the cause.
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(HeaderName::from_static(
            X_REQUEST_ID,
        )))
        .layer(SetRequestIdLayer::new(
            HeaderName::from_static(X_REQUEST_ID),
            MakeRequestUuid,
        ))
        .layer(middleware::map_request(drop_unusable_request_id))
}

/// Every response is an API answer about security state, secrets or
/// credentials: none may be sniffed into another type, framed, leak its URL
/// through Referer, load anything, or be kept by a browser or shared cache.
/// `no-store` applies to all of them (health and the route table included): a
/// per-route list of what may be cached is one more thing to get wrong, and
/// nothing here is worth caching. HSTS only when clients reach us over HTTPS
/// (our listener or a terminating proxy): browsers ignore it over plain HTTP.
fn security_headers(config: &Config) -> Vec<(HeaderName, HeaderValue)> {
    let mut h = vec![
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    if config.clients_use_https() {
        h.push((
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=63072000; includeSubDomains"),
        ));
    }
    h
}

fn request_span(req: &axum::http::Request<Body>) -> tracing::Span {
    tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %request_id(req.headers()),
        // Recorded by `identify` once the client is known (trusted proxies).
        client_ip = tracing::field::Empty,
    )
}

/// A client's own request id is kept when it is short and plain (it goes into
/// logs and back into the response); anything else is replaced by a fresh one.
async fn drop_unusable_request_id(mut req: Request) -> Request {
    let usable = req.headers().get(X_REQUEST_ID).map(|v| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_REQUEST_ID_LEN
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    });
    if usable == Some(false) || req.headers().get_all(X_REQUEST_ID).iter().count() > 1 {
        req.headers_mut().remove(X_REQUEST_ID);
    }
    req
}

/// Gives internal errors (from handlers or panics) the request id in their
/// body and logs their detail under it.
async fn internal_errors(req: Request, next: Next) -> Response {
    let id = request_id(req.headers()).to_string();
    let mut resp = next.run(req).await;
    let Some(InternalError(detail)) = resp.extensions_mut().remove::<InternalError>() else {
        return resp;
    };
    tracing::error!(request_id = %id, status = %resp.status(), error = %detail, "internal error");
    let (parts, _) = resp.into_parts();
    let mut out = (
        parts.status,
        axum::Json(json!({"error": public_message(parts.status), "request_id": id})),
    )
        .into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response {
    let what = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    internal_error(format!("handler panicked: {what}"))
}

/// The timeout layer answers with an empty body; say what happened.
async fn timeout_body(resp: Response, timeout: Duration) -> Response {
    let is_timeout = resp.status() == StatusCode::SERVICE_UNAVAILABLE
        && !resp.headers().contains_key(header::CONTENT_TYPE);
    if !is_timeout {
        return resp;
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        axum::Json(json!({
            "error": format!(
                "request took longer than {} s (ARAGORA_REQUEST_TIMEOUT)",
                timeout.as_secs()
            )
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::api::ApiError;
    use crate::error::ServiceError;

    #[derive(Clone)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// (status, headers and body as text) of GET `path` with `x-request-id: id`.
    async fn get_with_id(addr: std::net::SocketAddr, path: &str, id: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nx-request-id: {id}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, out)
    }

    /// A 500 tells the client only the request id; the log has the cause
    /// under the same id. Panics and timeouts are JSON answers too.
    #[tokio::test]
    async fn internal_errors_carry_the_request_id_and_log_the_cause_under_it() {
        let logs = Logs(Arc::new(Mutex::new(Vec::new())));
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let vars: BTreeMap<String, String> = [("ARAGORA_REQUEST_TIMEOUT", "1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = Config::from_vars(&vars).expect("config");
        let routes = Router::new()
            .route(
                "/boom",
                get(|| async { ApiError(ServiceError::Internal("disk on fire".into())) }),
            )
            .route(
                "/store-down",
                get(|| async {
                    ApiError(ServiceError::Backend(
                        "aedb: /var/lib/aragora/aedb/wal/000042.seg: commit queue full".into(),
                    ))
                }),
            )
            .route(
                "/panic",
                get(|| async {
                    if true {
                        panic!("inconsistent state");
                    }
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(600)).await;
                    "late"
                }),
            );
        let app = envelope(routes, &config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });

        let (status, resp) = get_with_id(addr, "/boom", "req-42").await;
        assert_eq!(status, 500, "{resp}");
        assert!(
            resp.contains(r#"{"error":"internal error","request_id":"req-42"}"#),
            "{resp}"
        );
        assert!(resp.contains("x-request-id: req-42"), "{resp}");
        assert!(
            !resp.contains("disk on fire"),
            "the cause stays in the log: {resp}"
        );
        let log = String::from_utf8_lossy(&logs.0.lock().expect("logs")).into_owned();
        let line = log
            .lines()
            .find(|l| l.contains("disk on fire"))
            .unwrap_or_else(|| panic!("cause not logged: {log}"));
        assert!(
            line.contains("req-42"),
            "request id not logged with the cause: {line}"
        );

        // A store failure is a 503 to retry; its detail (paths, engine
        // internals) stays in the log.
        let (status, resp) = get_with_id(addr, "/store-down", "req-45").await;
        assert_eq!(status, 503, "{resp}");
        assert!(resp.contains(r#""request_id":"req-45""#), "{resp}");
        assert!(
            resp.to_ascii_lowercase().contains("retry-after: 1"),
            "{resp}"
        );
        assert!(
            !resp.contains("/var/lib") && !resp.contains("aedb"),
            "{resp}"
        );
        let log = String::from_utf8_lossy(&logs.0.lock().expect("logs")).into_owned();
        assert!(
            log.lines()
                .any(|l| l.contains("commit queue full") && l.contains("req-45")),
            "{log}"
        );

        let (status, resp) = get_with_id(addr, "/panic", "req-43").await;
        assert_eq!(status, 500, "{resp}");
        assert!(resp.contains(r#""request_id":"req-43""#), "{resp}");

        let (status, resp) = get_with_id(addr, "/slow", "req-44").await;
        assert_eq!(status, 503, "{resp}");
        assert!(resp.contains("longer than 1 s"), "{resp}");
        assert!(resp.contains("application/json"), "{resp}");
    }
}
