//! Approval notifications: each lifecycle event of a request is POSTed as
//! signed JSON to `APPROVAL_WEBHOOK_URL`, so eligible approvers hear about a
//! request without polling the pending list.
//!
//! The request path only puts a [`Notification`] on a bounded in-memory queue
//! (never waiting: when the queue is full the notification is dropped and
//! counted); one tokio task delivers them in order, retrying with backoff.
//! What is queued when the process stops is lost: the request itself is in the
//! store, and the pending list stays the source of truth.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rand::Rng;
use ring::hmac;
use serde::Serialize;
use tokio::sync::mpsc;

use super::catalogue::{Operation, RiskLevel};
use super::request::{ApprovalRequest, Status};
use crate::clock::{format_us, now_us};
use crate::config::SecretString;
use crate::metrics::Metrics;

/// Notifications waiting for delivery at most; beyond, new ones are dropped
/// (a receiver that is down must not grow our memory or block requests).
pub const QUEUE_LIMIT: usize = 1_024;
/// Attempts per notification unless `APPROVAL_WEBHOOK_MAX_ATTEMPTS` says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;
/// First retry delay; each further one doubles, up to [`MAX_BACKOFF`].
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A `Retry-After` longer than this is not honoured (we wait this long instead):
/// one receiver must not park the whole queue for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// One attempt (connect, TLS, request, response head) unless
/// `APPROVAL_WEBHOOK_TIMEOUT` says otherwise.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest accepted `APPROVAL_WEBHOOK_SECRET`, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// Eligible approvers listed in one notification at most.
pub const MAX_APPROVERS: usize = 1_000;

/// CA bundles tried, in order, for an https URL without `APPROVAL_WEBHOOK_CA_FILE`.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// What happened to the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Requested,
    Approved,
    Rejected,
    EmergencyBypass,
    Expired,
    Executed,
    Failed,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::EmergencyBypass => "emergency_bypass",
            Self::Expired => "expired",
            Self::Executed => "executed",
            Self::Failed => "failed",
        }
    }
}

/// Someone who may decide a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Approver {
    pub id: String,
    pub email: String,
}

/// Finds the eligible approvers of a request (enabled users holding one of the
/// operation's approver roles and `approvals.approve`, not the requester).
/// Given by the application, so the approval service needs no auth service.
pub type ApproverResolver = Arc<dyn Fn(Operation, &str) -> Vec<Approver> + Send + Sync>;

/// The JSON body of one webhook delivery.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Notification {
    pub event: Event,
    pub approval_id: String,
    pub operation: Operation,
    pub risk_level: RiskLevel,
    pub requester_id: String,
    pub reason: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub expires_at: String,
    pub status: Status,
    /// When the event happened, `YYYY-MM-DDTHH:MM:SSZ`.
    pub occurred_at: String,
    /// For `requested` only: who may decide (filled in by the delivery task,
    /// off the request path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approvers: Option<Vec<Approver>>,
    /// `/api/security/approvals/{id}`.
    pub link: String,
}

impl Notification {
    pub fn new(event: Event, r: &ApprovalRequest) -> Self {
        Self {
            event,
            approval_id: r.id.clone(),
            operation: r.operation,
            risk_level: r.risk_level,
            requester_id: r.requester_id.clone(),
            reason: r.reason.clone(),
            expires_at: format_us(r.expires_at),
            status: r.status,
            occurred_at: format_us(now_us()),
            approvers: None,
            link: format!("/api/security/approvals/{}", r.id),
        }
    }
}

/// `APPROVAL_WEBHOOK_URL`, parsed. Its path and query may carry a token (many
/// webhook receivers put one there), so `Debug` shows only scheme and host.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    https: bool,
    /// Without IPv6 brackets (what a socket connects to).
    host: String,
    port: u16,
    /// `host[:port]` as written (the Host header).
    authority: String,
    path_and_query: String,
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}/<redacted>",
            if self.https { "https" } else { "http" },
            self.authority
        )
    }
}

impl WebhookUrl {
    /// An `http://` or `https://` URL with a host and no user info. The error
    /// does not repeat the value (it may hold a token).
    pub fn parse(s: &str) -> Result<Self, String> {
        const WHAT: &str = "APPROVAL_WEBHOOK_URL must be an http:// or https:// URL with a host \
             (e.g. https://hooks.example.com/aragora)";
        let uri: http::Uri = s.trim().parse().map_err(|_| WHAT.to_string())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(WHAT.into()),
        };
        let authority = uri.authority().ok_or_else(|| WHAT.to_string())?;
        if authority.as_str().contains('@') {
            return Err(
                "APPROVAL_WEBHOOK_URL must not carry user info (user:password@); \
                 receivers authenticate us by the signature"
                    .into(),
            );
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(WHAT.into());
        }
        Ok(Self {
            https,
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }

    pub fn is_https(&self) -> bool {
        self.https
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// The validated `APPROVAL_WEBHOOK_*` variables.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub url: WebhookUrl,
    /// HMAC key of `X-Aragora-Signature` (`APPROVAL_WEBHOOK_SECRET`).
    pub secret: SecretString,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub attempt_timeout: Duration,
    /// PEM roots trusted for an https URL instead of the system bundle
    /// (`APPROVAL_WEBHOOK_CA_FILE`).
    pub ca_file: Option<PathBuf>,
}

impl WebhookSettings {
    pub fn new(url: WebhookUrl, secret: SecretString) -> Self {
        Self {
            url,
            secret,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            ca_file: None,
        }
    }
}

/// Why the notifier could not be built (boot is refused).
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("APPROVAL_WEBHOOK_CA_FILE {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error(
        "APPROVAL_WEBHOOK_URL is https but no CA bundle was found (tried {tried}); set APPROVAL_WEBHOOK_CA_FILE"
    )]
    NoRoots { tried: String },
    #[error("TLS client for APPROVAL_WEBHOOK_URL: {0}")]
    Tls(String),
}

/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`: the `X-Aragora-Signature`
/// value. The timestamp is signed too, so a receiver can refuse old replays.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// The delay before retry number `retry` (1 = the first retry): the base
/// doubled each time, capped, with the upper half jittered so receivers
/// recovering from an outage are not hit by every sender at once. A sane
/// `Retry-After` from the receiver wins.
pub fn backoff(base: Duration, retry: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(ra) = retry_after {
        return ra.min(MAX_RETRY_AFTER);
    }
    let exp = base
        .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)))
        .min(MAX_BACKOFF);
    let half = exp / 2;
    let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
}

/// How one attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Delivered,
    /// Worth another try (connection error, timeout, 5xx, 429).
    Retry {
        why: String,
        retry_after: Option<Duration>,
    },
    /// The receiver refused it (other 4xx, 3xx): retrying would not help.
    Refused(u16),
}

fn classify(status: u16, retry_after: Option<&str>) -> Attempt {
    match status {
        200..=299 => Attempt::Delivered,
        429 | 500..=599 => Attempt::Retry {
            why: format!("HTTP {status}"),
            // Only the delta-seconds form; an HTTP date falls back to backoff.
            retry_after: retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        },
        other => Attempt::Refused(other),
    }
}

/// Aborts the connection task when the attempt ends (also on timeout), so a
/// receiver that never answers holds no task.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where and how to deliver; shared by the delivery task.
struct Delivery {
    settings: WebhookSettings,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Delivery {
    async fn attempt(&self, delivery_id: &str, event: Event, body: &Bytes) -> Attempt {
        match tokio::time::timeout(
            self.settings.attempt_timeout,
            self.exchange(delivery_id, event, body),
        )
        .await
        {
            Ok(Ok((status, retry_after))) => classify(status, retry_after.as_deref()),
            Ok(Err(why)) => Attempt::Retry {
                why,
                retry_after: None,
            },
            Err(_) => Attempt::Retry {
                why: format!("no response within {:?}", self.settings.attempt_timeout),
                retry_after: None,
            },
        }
    }

    /// One POST on a fresh connection: the status and any `Retry-After`.
    async fn exchange(
        &self,
        delivery_id: &str,
        event: Event,
        body: &Bytes,
    ) -> Result<(u16, Option<String>), String> {
        let url = &self.settings.url;
        let timestamp = u64::try_from(now_us() / 1_000_000).unwrap_or(0);
        let sig = signature(self.settings.secret.expose().as_bytes(), timestamp, body);
        let req = http::Request::post(url.path_and_query.as_str())
            .header(http::header::HOST, url.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("aragora/", env!("CARGO_PKG_VERSION")),
            )
            .header("X-Aragora-Delivery", delivery_id)
            .header("X-Aragora-Event", event.as_str())
            .header("X-Aragora-Timestamp", timestamp.to_string())
            .header("X-Aragora-Signature", sig)
            .body(Full::new(body.clone()))
            .map_err(|e| format!("building the request: {e}"))?;
        let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("connecting to {}:{}: {e}", url.host, url.port))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => post(TokioIo::new(tcp), req).await,
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                    .map_err(|e| format!("TLS server name {}: {e}", url.host))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", url.host))?;
                post(TokioIo::new(stream), req).await
            }
        }
    }
}

async fn post<T>(io: T, req: http::Request<Full<Bytes>>) -> Result<(u16, Option<String>), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // The body is not read: the status says all we need.
    Ok((resp.status().as_u16(), retry_after))
}

fn tls_connector(settings: &WebhookSettings) -> Result<tokio_rustls::TlsConnector, NotifyError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let (path, pem) = match &settings.ca_file {
        Some(p) => {
            let pem = std::fs::read(p).map_err(|e| NotifyError::CaFile {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            (p.clone(), pem)
        }
        None => SYSTEM_CA_BUNDLES
            .iter()
            .find_map(|p| std::fs::read(p).ok().map(|pem| (PathBuf::from(p), pem)))
            .ok_or_else(|| NotifyError::NoRoots {
                tried: SYSTEM_CA_BUNDLES.join(", "),
            })?,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| NotifyError::CaFile {
            path: path.clone(),
            reason: format!("not PEM certificates: {e}"),
        })?;
        // A system bundle may hold a certificate rustls cannot use; the
        // rest still are roots.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(NotifyError::CaFile {
            path,
            reason: "holds no usable CA certificate".into(),
        });
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| NotifyError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Owns the queue and the delivery task of approval notifications.
pub struct Notifier {
    tx: mpsc::Sender<Notification>,
    /// Taken by the delivery task when it starts.
    rx: Mutex<Option<mpsc::Receiver<Notification>>>,
    delivery: Arc<Delivery>,
    resolver: Option<ApproverResolver>,
    metrics: Metrics,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("url", &self.delivery.settings.url)
            .field("queued", &(QUEUE_LIMIT - self.tx.capacity()))
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// Reads the CA roots for an https URL; nothing is sent until [`Notifier::run`].
    pub fn new(settings: WebhookSettings, metrics: Metrics) -> Result<Self, NotifyError> {
        Self::with_capacity(settings, metrics, QUEUE_LIMIT)
    }

    fn with_capacity(
        settings: WebhookSettings,
        metrics: Metrics,
        capacity: usize,
    ) -> Result<Self, NotifyError> {
        let tls = if settings.url.https {
            Some(tls_connector(&settings)?)
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(capacity);
        Ok(Self {
            tx,
            rx: Mutex::new(Some(rx)),
            delivery: Arc::new(Delivery { settings, tls }),
            resolver: None,
            metrics,
        })
    }

    /// Who is listed as eligible in `requested` notifications.
    pub fn with_resolver(mut self, resolver: ApproverResolver) -> Self {
        self.resolver = Some(resolver);
        self
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.delivery.settings
    }

    /// Queues `n` without waiting; when the queue is full (or delivery has
    /// stopped) it is dropped, counted and logged.
    pub fn enqueue(&self, n: Notification) {
        match self.tx.try_send(n) {
            Ok(()) => self.metrics.approval_notification_queue_depth.inc(),
            Err(e) => {
                let n = match e {
                    mpsc::error::TrySendError::Full(n) | mpsc::error::TrySendError::Closed(n) => n,
                };
                self.metrics
                    .approval_notifications
                    .with_label_values(&["dropped"])
                    .inc();
                tracing::warn!(
                    approval_id = %n.approval_id,
                    event = n.event.as_str(),
                    limit = QUEUE_LIMIT,
                    "approval notification dropped: the delivery queue is full"
                );
            }
        }
    }

    /// The delivery loop: one notification at a time, in order, until the
    /// notifier is dropped. Spawn it once on the server's runtime; a second
    /// call returns at once.
    pub async fn run(self: Arc<Self>) {
        let Some(mut rx) = self.rx.lock().take() else {
            return;
        };
        while let Some(mut n) = rx.recv().await {
            self.metrics.approval_notification_queue_depth.dec();
            if n.event == Event::Requested
                && n.approvers.is_none()
                && let Some(resolve) = self.resolver.clone()
            {
                let (op, requester) = (n.operation, n.requester_id.clone());
                // The resolver reads the store: off the async workers.
                let found = tokio::task::spawn_blocking(move || resolve(op, &requester))
                    .await
                    .unwrap_or_default();
                n.approvers = Some(found.into_iter().take(MAX_APPROVERS).collect());
            }
            self.deliver(&n).await;
        }
    }

    /// Sends one notification, retrying as the policy says, and counts how it ended.
    async fn deliver(&self, n: &Notification) {
        let body = match serde_json::to_vec(n) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "approval notification could not be encoded");
                self.count("failed");
                return;
            }
        };
        let delivery_id = format!("dlv_{:032x}", rand::rng().random::<u128>());
        let settings = &self.delivery.settings;
        for attempt in 1..=settings.max_attempts {
            match self.delivery.attempt(&delivery_id, n.event, &body).await {
                Attempt::Delivered => {
                    self.count("delivered");
                    tracing::debug!(%delivery_id, approval_id = %n.approval_id, event = n.event.as_str(), attempt, "approval notification delivered");
                    return;
                }
                Attempt::Refused(status) => {
                    self.count("failed");
                    tracing::warn!(%delivery_id, approval_id = %n.approval_id, event = n.event.as_str(), status, "approval notification refused by the receiver; not retried");
                    return;
                }
                Attempt::Retry { why, retry_after } => {
                    if attempt == settings.max_attempts {
                        self.count("failed");
                        tracing::warn!(%delivery_id, approval_id = %n.approval_id, event = n.event.as_str(), attempts = attempt, reason = %why, "approval notification failed after the last attempt");
                        return;
                    }
                    let wait = backoff(settings.backoff_base, attempt, retry_after);
                    tracing::info!(%delivery_id, approval_id = %n.approval_id, attempt, reason = %why, ?wait, "approval notification attempt failed; retrying");
                    self.metrics.approval_notification_retries.inc();
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .approval_notifications
            .with_label_values(&[outcome])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> WebhookSettings {
        WebhookSettings::new(
            WebhookUrl::parse(url).expect("url"),
            SecretString::new("s".repeat(MIN_SECRET_BYTES)),
        )
    }

    fn request() -> ApprovalRequest {
        ApprovalRequest {
            id: "apr_1".into(),
            operation: Operation::KeyRotation,
            risk_level: RiskLevel::High,
            params: serde_json::json!({}),
            reason: "quarterly rotation".into(),
            requester_id: "u_op".into(),
            requested_at: 0,
            expires_at: 7_200_000_000,
            required_approvals: 1,
            checklist: Vec::new(),
            status: Status::Pending,
            decisions: Vec::new(),
            execution: None,
        }
    }

    fn metrics() -> Metrics {
        Metrics::new().expect("metrics").with_known_series()
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let sig = signature(secret, 1_700_000_000, b"{\"a\":1}");
        let hex_part = sig.strip_prefix("sha256=").expect("prefix");
        assert_eq!(hex_part.len(), 64);
        assert!(
            hex_part
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let expected = hmac::sign(&key, b"1700000000.{\"a\":1}");
        assert_eq!(hex_part, hex::encode(expected.as_ref()));
        // Known answer, so a receiver in any language can check its code.
        assert_eq!(
            signature(b"key", 0, b"body"),
            format!(
                "sha256={}",
                hex::encode(
                    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, b"key"), b"0.body").as_ref()
                )
            )
        );
        assert_ne!(sig, signature(secret, 1_700_000_001, b"{\"a\":1}"));
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        let m = metrics();
        let n = Notifier::with_capacity(settings("http://127.0.0.1:9/hook"), m.clone(), 3)
            .expect("notifier");
        for _ in 0..5 {
            n.enqueue(Notification::new(Event::Requested, &request()));
        }
        assert_eq!(m.approval_notification_queue_depth.get(), 3);
        let dropped = m
            .approval_notifications
            .with_label_values(&["dropped"])
            .get();
        assert_eq!(dropped, 2);
        assert_eq!(QUEUE_LIMIT, 1_024);
    }

    #[test]
    fn the_notification_carries_the_request_and_its_link() {
        let n = Notification::new(Event::Requested, &request());
        let v = serde_json::to_value(&n).expect("json");
        assert_eq!(v["event"], "requested");
        assert_eq!(v["approval_id"], "apr_1");
        assert_eq!(v["operation"], "key_rotation");
        assert_eq!(v["risk_level"], "high");
        assert_eq!(v["status"], "pending");
        assert_eq!(v["expires_at"], "1970-01-01T02:00:00Z");
        assert_eq!(v["link"], "/api/security/approvals/apr_1");
        assert!(v.get("approvers").is_none(), "filled in at delivery");
        let v = serde_json::to_value(Notification::new(Event::EmergencyBypass, &request()))
            .expect("json");
        assert_eq!(v["event"], "emergency_bypass");
    }

    #[test]
    fn urls_are_http_or_https_with_a_host_and_not_echoed() {
        let u = WebhookUrl::parse("https://hooks.example.com/t/SECRET-TOKEN?x=1").expect("url");
        assert!(u.is_https());
        assert_eq!((u.host(), u.port()), ("hooks.example.com", 443));
        assert_eq!(u.path_and_query, "/t/SECRET-TOKEN?x=1");
        assert!(!format!("{u:?}").contains("SECRET-TOKEN"));
        let u = WebhookUrl::parse("http://[::1]:8099").expect("url");
        assert_eq!(
            (u.host(), u.port(), u.path_and_query.as_str()),
            ("::1", 8099, "/")
        );
        for bad in [
            "",
            "hooks.example.com/x",
            "ftp://hooks.example.com/x",
            "http://",
            "http:///path",
            "https://user:pw@hooks.example.com/",
            "not a url",
        ] {
            let e = WebhookUrl::parse(bad).expect_err(bad);
            assert!(e.contains("APPROVAL_WEBHOOK_URL"), "{e}");
            // The message names the scheme, never the value given.
            assert!(bad.len() <= "http://".len() || !e.contains(bad), "{e}");
        }
    }

    #[test]
    fn retries_on_transient_statuses_only_and_backoff_is_bounded() {
        assert_eq!(classify(204, None), Attempt::Delivered);
        assert_eq!(classify(400, None), Attempt::Refused(400));
        assert_eq!(classify(404, None), Attempt::Refused(404));
        assert_eq!(classify(301, None), Attempt::Refused(301));
        assert!(matches!(
            classify(503, None),
            Attempt::Retry {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            classify(429, Some("7")),
            Attempt::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            classify(429, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Attempt::Retry {
                retry_after: None,
                ..
            }
        ));
        let base = Duration::from_millis(100);
        for retry in 1..=30 {
            let d = backoff(base, retry, None);
            let exp = base
                .saturating_mul(2u32.saturating_pow(retry - 1))
                .min(MAX_BACKOFF);
            assert!(d >= exp / 2 && d <= exp, "retry {retry}: {d:?} vs {exp:?}");
        }
        assert_eq!(
            backoff(base, 1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            backoff(base, 1, Some(Duration::from_secs(86_400))),
            MAX_RETRY_AFTER
        );
    }

    /// A one-connection HTTPS receiver: reads one request (head and
    /// `Content-Length` body), answers 204, and hands back what it read.
    async fn https_receiver(
        files: &crate::config::TlsFiles,
    ) -> (u16, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let acceptor =
            tokio_rustls::TlsAcceptor::from(crate::tls::server_config(files).expect("tls config"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(tcp).await.expect("TLS accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = tls.read(&mut buf).await.expect("read");
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if got.len() >= end + 4 + len || n == 0 {
                        break;
                    }
                }
                assert!(n > 0, "connection closed mid-request");
            }
            tls.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let _ = tls.shutdown().await;
            String::from_utf8_lossy(&got).into_owned()
        });
        (port, task)
    }

    #[tokio::test]
    async fn https_delivers_to_a_receiver_trusted_through_the_ca_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let files = crate::config::TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        std::fs::write(&files.cert, c.cert.pem()).expect("write cert");
        std::fs::write(&files.key, c.signing_key.serialize_pem()).expect("write key");
        let (port, received) = https_receiver(&files).await;

        let mut s = settings(&format!("https://localhost:{port}/hooks/TOKEN"));
        s.ca_file = Some(files.cert.clone());
        s.max_attempts = 1;
        let m = metrics();
        let n = Arc::new(Notifier::new(s, m.clone()).expect("notifier"));
        n.enqueue(Notification::new(Event::Approved, &request()));
        let delivery = tokio::spawn(n.clone().run());
        let got = tokio::time::timeout(Duration::from_secs(60), received)
            .await
            .expect("received in time")
            .expect("receiver");
        assert!(got.starts_with("POST /hooks/TOKEN HTTP/1.1\r\n"), "{got}");
        let lower = got.to_ascii_lowercase();
        assert!(lower.contains("x-aragora-signature: sha256="), "{got}");
        assert!(lower.contains("x-aragora-event: approved"), "{got}");
        assert!(got.contains("\"event\":\"approved\""), "{got}");
        for _ in 0..3000 {
            if m.approval_notifications
                .with_label_values(&["delivered"])
                .get()
                == 1
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            m.approval_notifications
                .with_label_values(&["delivered"])
                .get(),
            1
        );
        delivery.abort();

        // Without the CA file the self-signed receiver is not trusted: a
        // missing file is a boot error naming the variable.
        let mut s = settings(&format!("https://localhost:{port}/hooks"));
        s.ca_file = Some(dir.path().join("absent.pem"));
        let e = Notifier::new(s, metrics()).expect_err("no CA file");
        assert!(e.to_string().contains("APPROVAL_WEBHOOK_CA_FILE"), "{e}");
    }

    /// The events the approval service queued, in order.
    fn drain(n: &Notifier) -> Vec<(Event, String)> {
        let mut guard = n.rx.lock();
        let rx = guard.as_mut().expect("not running");
        let mut out = Vec::new();
        while let Ok(x) = rx.try_recv() {
            out.push((x.event, x.approval_id));
        }
        out
    }

    #[test]
    fn the_approval_service_queues_each_lifecycle_event() {
        use crate::approvals::request::{ApproveInput, Decider};
        use crate::approvals::service::{ApprovalService, ApprovalSettings, Requester};
        use crate::approvals::store::{ApprovalStore, request_id};
        use crate::store::Store;

        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(
            crate::store::EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32])
                .expect("open"),
        );
        let audit = Arc::new(crate::audit::AuditLog::new(store.clone()));
        let m = metrics();
        let n = Arc::new(Notifier::new(settings("http://127.0.0.1:9/hook"), m.clone()).expect("n"));
        let svc =
            ApprovalService::new(store.clone(), audit, m.clone(), ApprovalSettings::default())
                .with_notifier(n.clone());
        let who = Requester {
            user_id: "u_op",
            ip: None,
        };
        let ask = || {
            svc.request(
                &who,
                Operation::MigrationRun,
                serde_json::json!({"store": "all"}),
                "r",
            )
            .expect("request")
        };
        let approver = vec!["approver".to_string()];
        let lead = vec!["security_lead".to_string()];
        let decider = |roles| Decider {
            user_id: "u_ap",
            roles,
            disabled: false,
            can_approve: true,
        };

        let a = ask();
        let input = ApproveInput {
            checklist_confirmed: a.checklist.clone(),
            ..ApproveInput::default()
        };
        svc.approve(&a.id, &decider(&approver), input, None)
            .expect("approve");
        let b = ask();
        svc.reject(&b.id, &decider(&approver), Some("no".into()), None)
            .expect("reject");
        let c = ask();
        svc.emergency_bypass(
            &c.id,
            &decider(&lead),
            Some("outage".into()),
            Some("INC-1".into()),
            None,
        )
        .expect("bypass");
        let mut due = a.clone();
        let now = now_us();
        due.id = request_id(now - 1_000_000, "0000000d");
        due.status = Status::Pending;
        due.decisions.clear();
        due.expires_at = now - 1;
        ApprovalStore::new(store).insert(&due).expect("insert");
        assert_eq!(svc.expire_due().expect("expire"), 1);

        let mut done = a.clone();
        done.status = Status::Executed;
        svc.notify_executed(&done);
        done.status = Status::Failed;
        svc.notify_executed(&done);
        done.status = Status::Pending;
        svc.notify_executed(&done);

        assert_eq!(
            drain(&n),
            vec![
                (Event::Requested, a.id.clone()),
                (Event::Approved, a.id.clone()),
                (Event::Requested, b.id.clone()),
                (Event::Rejected, b.id.clone()),
                (Event::Requested, c.id.clone()),
                (Event::EmergencyBypass, c.id.clone()),
                (Event::Expired, due.id.clone()),
                (Event::Executed, a.id.clone()),
                (Event::Failed, a.id.clone()),
            ]
        );
    }

    #[test]
    fn debug_shows_neither_secret_nor_path() {
        let s = settings("https://hooks.example.com/t/SECRET-TOKEN");
        let shown = format!("{s:?}");
        assert!(!shown.contains(&"s".repeat(MIN_SECRET_BYTES)), "{shown}");
        assert!(!shown.contains("SECRET-TOKEN"), "{shown}");
    }
}
