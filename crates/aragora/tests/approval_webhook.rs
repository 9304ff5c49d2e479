//! Approval notifications against the real `aragora serve` binary and a real
//! HTTP receiver started here: signed delivery with the eligible approvers,
//! retries on 5xx, `failed` once a receiver stays down, and boot refusing a bad
//! URL or a short secret.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aragora_testkit::{Server, Value, json};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

const PASSWORD: &str = "correct horse battery staple";
const SECRET: &str = "webhook-secret-for-tests-0123456789abcdef";
/// Generous: only a broken delivery takes this long.
const WAIT: Duration = Duration::from_secs(60);

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

#[derive(Default)]
struct Recorded {
    hits: Vec<Hit>,
    /// Statuses to answer, in order; 200 once empty.
    script: VecDeque<u16>,
}

/// An HTTP server on 127.0.0.1 that records every request.
struct Receiver {
    url: String,
    state: Arc<Mutex<Recorded>>,
    _rt: tokio::runtime::Runtime,
}

async fn record(
    State(state): State<Arc<Mutex<Recorded>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    s.hits.push(Hit {
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    });
    let code = s.script.pop_front().unwrap_or(200);
    StatusCode::from_u16(code).unwrap_or(StatusCode::OK)
}

impl Receiver {
    fn start(script: &[u16]) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let state = Arc::new(Mutex::new(Recorded {
            hits: Vec::new(),
            script: script.iter().copied().collect(),
        }));
        let app = axum::Router::new()
            .route("/hooks/approvals", axum::routing::post(record))
            .with_state(state.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/hooks/approvals"),
            state,
            _rt: rt,
        }
    }

    fn hits(&self) -> Vec<Hit> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hits
            .clone()
    }

    /// The hits about `approval_id` with `event`, once there are `n` of them.
    fn wait_for(&self, approval_id: &str, event: &str, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found: Vec<Hit> = self
                .hits()
                .into_iter()
                .filter(|h| {
                    let v = h.json();
                    v["approval_id"] == approval_id && v["event"] == event
                })
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{n} {event} notification(s) for {approval_id} not received; got {:?}",
                self.hits()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn server(url: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("APPROVAL_WEBHOOK_URL", url),
        ("APPROVAL_WEBHOOK_SECRET", SECRET),
    ];
    env.extend_from_slice(extra);
    Server::start(Path::new(env!("CARGO_BIN_EXE_aragora")), &env)
}

/// (admin token, operator token)
fn users(s: &Server) -> (String, String) {
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    s.create_user(&admin, "op@example.com", PASSWORD, &["operator"]);
    let operator = s.login("op@example.com", PASSWORD);
    (admin, operator)
}

fn request(s: &Server, token: &str, operation: &str) -> String {
    let params = match operation {
        "migration_run" => json!({"store": "all"}),
        _ => json!({}),
    };
    let r = s.post(
        "/api/security/approvals",
        token,
        &json!({"operation": operation, "params": params, "reason": "quarterly rotation"}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    r.json()["approval_id"]
        .as_str()
        .expect("approval_id")
        .to_owned()
}

fn wait_metric(s: &Server, series: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = s.metric(series);
        if v >= at_least {
            return v;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn verify_signature(hit: &Hit) {
    let ts = hit.header("x-aragora-timestamp");
    let secs: u64 = ts.parse().expect("unix seconds");
    assert!(secs > 1_600_000_000, "{secs}");
    let mut signed = ts.as_bytes().to_vec();
    signed.push(b'.');
    signed.extend_from_slice(&hit.body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let sig = hit
        .header("x-aragora-signature")
        .strip_prefix("sha256=")
        .expect("sha256= prefix");
    let sig = hex::decode(sig).expect("hex");
    ring::hmac::verify(&key, &signed, &sig).expect("the signature verifies");
}

#[test]
fn a_request_is_delivered_signed_with_its_eligible_approvers() {
    let rx = Receiver::start(&[]);
    let s = server(&rx.url, &[]);
    let (admin, operator) = users(&s);
    s.create_user(&admin, "ap@example.com", PASSWORD, &["approver"]);
    s.create_user(&admin, "lead@example.com", PASSWORD, &["security_lead"]);
    s.create_user(&admin, "viewer@example.com", PASSWORD, &["viewer"]);
    let id = request(&s, &operator, "key_rotation");

    let hit = rx.wait_for(&id, "requested", 1).remove(0);
    verify_signature(&hit);
    assert!(hit.header("x-aragora-delivery").starts_with("dlv_"));
    assert_eq!(hit.header("x-aragora-event"), "requested");
    assert_eq!(hit.header("content-type"), "application/json");
    let v = hit.json();
    assert_eq!(v["operation"], "key_rotation");
    assert_eq!(v["risk_level"], "high");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["reason"], "quarterly rotation");
    assert_eq!(v["link"], format!("/api/security/approvals/{id}"));
    let expires = v["expires_at"].as_str().expect("expires_at");
    assert_eq!(expires.len(), "2026-01-01T00:00:00Z".len(), "{expires}");
    assert!(expires.ends_with('Z'), "{expires}");
    let emails: Vec<&str> = v["approvers"]
        .as_array()
        .expect("approvers")
        .iter()
        .map(|a| {
            assert!(a["id"].as_str().is_some_and(|i| !i.is_empty()), "{a}");
            a["email"].as_str().expect("email")
        })
        .collect();
    for eligible in ["ap@example.com", "lead@example.com", "admin@example.com"] {
        assert!(emails.contains(&eligible), "{eligible} not in {emails:?}");
    }
    for not in ["op@example.com", "viewer@example.com"] {
        assert!(!emails.contains(&not), "{not} in {emails:?}");
    }

    // The eligible list the API gives names the same people.
    let r = s.get(
        &format!("/api/security/approvals/{id}/eligible-approvers"),
        &admin,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let mut api: Vec<String> = r
        .json()
        .as_array()
        .expect("array")
        .iter()
        .map(|a| a["email"].as_str().expect("email").to_owned())
        .collect();
    let mut ours: Vec<String> = emails.iter().map(|e| e.to_string()).collect();
    api.sort();
    ours.sort();
    assert_eq!(api, ours);

    // A decision is notified too, without an approver list.
    let r = s.post(
        &format!("/api/security/approvals/{id}/reject"),
        &admin,
        &json!({"reason": "not this quarter"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let hit = rx.wait_for(&id, "rejected", 1).remove(0);
    verify_signature(&hit);
    assert_eq!(hit.json()["status"], "rejected");
    assert!(hit.json().get("approvers").is_none());
    wait_metric(
        &s,
        "aragora_approval_notifications_total{outcome=\"delivered\"}",
        2.0,
    );
    assert_eq!(
        s.metric("aragora_approval_notifications_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(s.metric("aragora_approval_notification_queue_depth"), 0.0);
}

#[test]
fn a_receiver_answering_500_twice_gets_it_on_the_third_attempt() {
    let rx = Receiver::start(&[500, 503]);
    let s = server(
        &rx.url,
        &[
            ("APPROVAL_WEBHOOK_MAX_ATTEMPTS", "5"),
            ("APPROVAL_WEBHOOK_BACKOFF_BASE_MS", "10"),
        ],
    );
    let (_, operator) = users(&s);
    let id = request(&s, &operator, "migration_run");
    let hits = rx.wait_for(&id, "requested", 3);
    assert_eq!(
        hits.len(),
        3,
        "delivered on the third attempt, then no more"
    );
    let delivery = hits[0].header("x-aragora-delivery");
    for h in &hits {
        verify_signature(h);
        assert_eq!(
            h.header("x-aragora-delivery"),
            delivery,
            "one id per notification"
        );
    }
    wait_metric(
        &s,
        "aragora_approval_notifications_total{outcome=\"delivered\"}",
        1.0,
    );
    assert_eq!(s.metric("aragora_approval_notification_retries_total"), 2.0);
    assert_eq!(
        s.metric("aragora_approval_notifications_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(rx.wait_for(&id, "requested", 3).len(), 3);
}

#[test]
fn a_receiver_that_is_down_counts_failed_after_the_last_attempt() {
    // A port that was just free: connections are refused.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let s = server(
        &format!("http://{addr}/hooks/approvals"),
        &[
            ("APPROVAL_WEBHOOK_MAX_ATTEMPTS", "3"),
            ("APPROVAL_WEBHOOK_BACKOFF_BASE_MS", "10"),
        ],
    );
    let (_, operator) = users(&s);
    request(&s, &operator, "key_rotation");
    wait_metric(
        &s,
        "aragora_approval_notifications_total{outcome=\"failed\"}",
        1.0,
    );
    assert_eq!(s.metric("aragora_approval_notification_retries_total"), 2.0);
    assert_eq!(
        s.metric("aragora_approval_notifications_total{outcome=\"delivered\"}"),
        0.0
    );
    assert_eq!(
        s.metric("aragora_approval_notifications_total{outcome=\"dropped\"}"),
        0.0
    );
    // The request path did not wait for any of it.
    assert!(s.is_running());
}

#[test]
fn a_bad_url_or_a_short_secret_stops_boot_naming_the_variable() {
    let bin = Path::new(env!("CARGO_BIN_EXE_aragora"));
    for (env, name, hidden) in [
        (
            vec![
                ("APPROVAL_WEBHOOK_URL", "hooks.example.com/t/TOKEN123"),
                ("APPROVAL_WEBHOOK_SECRET", SECRET),
            ],
            "APPROVAL_WEBHOOK_URL",
            "TOKEN123",
        ),
        (
            vec![
                ("APPROVAL_WEBHOOK_URL", "ftp://hooks.example.com/t/TOKEN123"),
                ("APPROVAL_WEBHOOK_SECRET", SECRET),
            ],
            "APPROVAL_WEBHOOK_URL",
            "TOKEN123",
        ),
        (
            vec![
                ("APPROVAL_WEBHOOK_URL", "http://127.0.0.1:9/hook"),
                ("APPROVAL_WEBHOOK_SECRET", "too-short-a-secret"),
            ],
            "APPROVAL_WEBHOOK_SECRET",
            "too-short-a-secret",
        ),
        (
            vec![("APPROVAL_WEBHOOK_URL", "http://127.0.0.1:9/hook")],
            "APPROVAL_WEBHOOK_SECRET",
            SECRET,
        ),
    ] {
        let e = Server::try_start(bin, &env).expect_err("boot refused");
        let text = e.to_string();
        assert!(text.contains(name), "{name} not named: {text}");
        assert!(!text.contains(hidden), "{hidden} echoed: {text}");
    }
}
