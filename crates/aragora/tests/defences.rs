//! Brute-force defences and input handling, against the real `aragora serve`
//! binary: account lockout and unlock, the per-IP login rate limit under a
//! concurrent burst, bulk-lock, and bad input of every kind answered with a 4xx
//! and a JSON error naming the problem, never a 5xx.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::Duration;

use aragora_testkit::{Request, Response, Scenario, Server, Value, json};

const SECRET: &str = "defences-test-secret-0123456789abcdef0123";
const PASSWORD: &str = "correct horse battery staple";

fn start(extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("JWT_SECRET", SECRET),
        ("ARAGORA_AUTH_FAILURE_AUDIT_WINDOW", "1"),
    ];
    env.extend_from_slice(extra);
    Server::start(Path::new(env!("CARGO_BIN_EXE_aragora")), &env)
}

fn login_from(s: &Server, ip: &str, email: &str, password: &str) -> Response {
    s.send(
        Request::new("POST", "/api/auth/login")
            .header("X-Forwarded-For", ip)
            .json(&json!({"email": email, "password": password})),
    )
}

fn audit(s: &Server, key: &str, action: &str) -> Vec<Value> {
    s.audit(key, action)
}

fn metric(s: &Server, series: &str) -> f64 {
    s.metric(series)
}

fn failures_metric(s: &Server, reason: &str) -> f64 {
    metric(
        s,
        &format!("aragora_security_auth_failures_total{{reason=\"{reason}\"}}"),
    )
}

/// Refused attempts the audit log records (for `reason` and `email`, when
/// given), summing the `count` of aggregated entries, once it reaches `want`
/// (the summaries of repeats are written when their window closes; the
/// servers these tests start use a one-second window). Panics with what it saw
/// after a generous deadline.
fn audited_attempts(s: &Server, admin: &str, reason: Option<&str>, email: Option<&str>, want: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let entries = audit(s, admin, "auth_failure");
        let got: u64 = entries
            .iter()
            .filter(|e| {
                reason.is_none_or(|r| e["details"]["reason"] == r)
                    && email.is_none_or(|m| e["details"]["email"] == m)
            })
            .map(|e| e["details"]["count"].as_u64().unwrap_or(1))
            .sum();
        if got == want {
            return;
        }
        assert!(
            got < want && std::time::Instant::now() < deadline,
            "{reason:?} attempts audited: {got}, expected {want}: {entries:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn retry_after(r: &Response) -> u64 {
    r.header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Retry-After: {:?} {}", r.headers, r.body))
}

/// Lockout, unlock and bulk lock on one server, in order (each step locks
/// or unlocks what the next checks); each step one behaviour.
fn lockout() -> &'static Scenario {
    static S: OnceLock<Scenario> = OnceLock::new();
    S.get_or_init(|| {
        let mut sc = Scenario::new();
        run_lockout(&mut sc);
        sc
    })
}

aragora_testkit::scenario_tests!(mod lockout = lockout;
    a_viewer_account_is_set_up,
    three_wrong_passwords_lock_the_account,
    a_locked_account_answers_like_an_unknown_one_from_any_address,
    the_user_view_shows_the_lock,
    wrong_passwords_and_the_lock_are_audited,
    an_administrator_unlocks_and_the_password_works_again,
    bulk_lock_locks_known_accounts_reports_unknown_ones_and_is_audited,
    a_bulk_locked_account_is_unlocked_by_an_administrator,
);

fn run_lockout(sc: &mut Scenario) {
    let Some((s, admin, victim)) = sc.step("a_viewer_account_is_set_up", || {
        let s = start(&[
            ("AUTH_LOCKOUT_THRESHOLD", "3"),
            ("AUTH_LOCKOUT_SECONDS", "60"),
            ("AUTH_RATE_LIMIT_PER_IP", "5"),
            ("AUTH_RATE_LIMIT_WINDOW", "60"),
        ]);
        let (_, admin) = s.bootstrap_admin("root@defences.test");
        let victim = s.create_user(&admin, "victim@defences.test", PASSWORD, &["viewer"]);

        (s, admin, victim)
    }) else {
        return;
    };
    sc.step("three_wrong_passwords_lock_the_account", || {
        // Three wrong passwords lock the account; the right one is then refused.
        for i in 1..=3 {
            let r = login_from(
                &s,
                "198.51.100.10",
                "victim@defences.test",
                "wrong password!!",
            );
            assert_eq!(r.status, 401, "wrong password {i}: {}", r.body);
            assert_eq!(r.json()["reason"], "invalid_credentials");
            assert_eq!(r.json()["error"], "invalid email or password");
        }
    });
    sc.step(
        "a_locked_account_answers_like_an_unknown_one_from_any_address",
        || {
            // Locked: the right password is refused with exactly the answer of an
            // unknown account or a wrong password (the lockout shows only in the
            // audit log), from this address or another, right password or wrong.
            let unknown = login_from(&s, "198.51.100.13", "nobody@defences.test", PASSWORD);
            assert_eq!(unknown.status, 401, "{}", unknown.body);
            for (ip, password) in [
                ("198.51.100.10", PASSWORD),
                ("198.51.100.11", "wrong password!!"),
            ] {
                let r = login_from(&s, ip, "victim@defences.test", password);
                assert_eq!(
                    (r.status, &r.body, r.header("retry-after")),
                    (unknown.status, &unknown.body, None),
                    "a locked account answers like an unknown one"
                );
            }
        },
    );
    sc.step("the_user_view_shows_the_lock", || {
        let r = s.get(&format!("/api/admin/users/{victim}"), &admin);
        assert_eq!(r.json()["locked"], true, "{}", r.body);
    });
    sc.step("wrong_passwords_and_the_lock_are_audited", || {
        audited_attempts(
            &s,
            &admin,
            Some("bad_password"),
            Some("victim@defences.test"),
            3,
        );
        let failures = audit(&s, &admin, "auth_failure");
        assert!(
            failures
                .iter()
                .any(|e| e["details"]["reason"] == "bad_password"
                    && e["details"]["email"] == "victim@defences.test"
                    && e["actor"] == victim.as_str()),
            "bad_password entries name the account: {failures:?}"
        );
        assert!(
            failures.iter().any(|e| e["details"]["reason"] == "locked"
                && e["details"]["email"] == "victim@defences.test"),
            "no auth_failure reason=locked"
        );
        let locked = audit(&s, &admin, "account_locked");
        assert!(
            locked.iter().any(|e| e["actor"] == victim.as_str()
                && e["details"]["email"] == "victim@defences.test"
                && e["details"]["by"] == "lockout_policy"),
            "no account_locked entry: {locked:?}"
        );
        assert!(failures_metric(&s, "locked") >= 2.0);
        assert!(failures_metric(&s, "bad_password") >= 3.0);
    });
    sc.step(
        "an_administrator_unlocks_and_the_password_works_again",
        || {
            // An administrator unlocks; the password works again.
            let r = s.post(
                &format!("/api/admin/users/{victim}/unlock"),
                &admin,
                &json!({}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.json()["locked"], false);
            let r = login_from(&s, "198.51.100.12", "victim@defences.test", PASSWORD);
            assert_eq!(r.status, 200, "after unlock: {}", r.body);
            assert!(!audit(&s, &admin, "account_unlocked").is_empty());
        },
    );
    let bulk_opt = sc.step(
        "bulk_lock_locks_known_accounts_reports_unknown_ones_and_is_audited",
        || {
            // Bulk-lock: known accounts are locked (emails normalised), unknown reported.
            let bulk = s.create_user(&admin, "bulk@defences.test", PASSWORD, &["viewer"]);
            let r = s.post(
        "/api/admin/users/bulk-lock",
        &admin,
        &json!({"emails": ["  BULK@Defences.Test ", "nobody@defences.test"], "duration": "1h"}),
    );
            assert_eq!(r.status, 200, "{}", r.body);
            let v = r.json();
            assert_eq!(
                v["not_found"],
                json!(["nobody@defences.test"]),
                "{}",
                r.body
            );
            assert_eq!(v["locked"].as_array().map(Vec::len), Some(1), "{}", r.body);
            assert_eq!(v["locked"][0]["user_id"], bulk.as_str());
            assert_eq!(v["locked"][0]["email"], "bulk@defences.test");
            let r = login_from(&s, "198.51.100.13", "bulk@defences.test", PASSWORD);
            assert_eq!(r.status, 401, "bulk-locked: {}", r.body);
            assert_eq!(r.json()["reason"], "invalid_credentials");
            let r = s.get(&format!("/api/admin/users/{bulk}"), &admin);
            let until = r.json()["locked_until"].as_str().map(str::to_string);
            assert!(
                until.is_some(),
                "the lock end is for administrators: {}",
                r.body
            );
            assert!(
                audit(&s, &admin, "account_locked")
                    .iter()
                    .any(|e| e["details"]["user_id"] == bulk.as_str()
                        && e["details"]["by"] == "bulk_lock"),
                "bulk lock not audited"
            );
            bulk
        },
    );
    if let Some(bulk) = bulk_opt.clone() {
        sc.step(
            "a_bulk_locked_account_is_unlocked_by_an_administrator",
            || {
                let r = s.post(
                    &format!("/api/admin/users/{bulk}/unlock"),
                    &admin,
                    &json!({}),
                );
                assert_eq!(r.status, 200, "{}", r.body);
                assert_eq!(
                    login_from(&s, "198.51.100.14", "bulk@defences.test", PASSWORD).status,
                    200
                );
            },
        );
    }
}

#[test]
fn login_rate_limit_under_a_concurrent_burst() {
    let s = start(&[
        ("AUTH_RATE_LIMIT_PER_IP", "5"),
        ("AUTH_RATE_LIMIT_WINDOW", "60"),
    ]);
    let (_, admin) = s.bootstrap_admin("root@burst.test");
    s.create_user(&admin, "burst@burst.test", PASSWORD, &["viewer"]);
    let before = failures_metric(&s, "rate_limited");

    const N: usize = 20;
    const IP: &str = "203.0.113.50";
    let barrier = Arc::new(Barrier::new(N));
    let client = s.client();
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let (barrier, client) = (barrier.clone(), client.clone());
            std::thread::spawn(move || {
                // Half the right password, half an unknown account: both are
                // processed attempts (200 / 401) when the limiter lets them by.
                let email = if i % 2 == 0 {
                    "burst@burst.test"
                } else {
                    "ghost@burst.test"
                };
                let req = Request::new("POST", "/api/auth/login")
                    .header("X-Forwarded-For", IP)
                    .json(&json!({"email": email, "password": PASSWORD}));
                barrier.wait();
                client.send(req)
            })
        })
        .collect();
    let responses: Vec<Response> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let processed = responses
        .iter()
        .filter(|r| r.status == 200 || r.status == 401)
        .count();
    let limited: Vec<&Response> = responses.iter().filter(|r| r.status == 429).collect();
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert_eq!(processed, 5, "processed attempts: {statuses:?}");
    assert_eq!(limited.len(), N - 5, "429s: {statuses:?}");
    for r in &limited {
        let wait = retry_after(r);
        assert!((1..=60).contains(&wait), "Retry-After {wait}");
        let v = r.json();
        assert_eq!(v["reason"], "rate_limited");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("too many attempts")),
            "{}",
            r.body
        );
    }

    // The limit holds for that address, and only for it.
    assert_eq!(login_from(&s, IP, "burst@burst.test", PASSWORD).status, 429);
    let r = login_from(&s, "203.0.113.51", "burst@burst.test", PASSWORD);
    assert_eq!(r.status, 200, "another address: {}", r.body);
    let after = failures_metric(&s, "rate_limited");
    assert_eq!(
        after - before,
        (N - 5 + 1) as f64,
        "rate_limited metric {before} -> {after}"
    );
    // Every refusal is counted in the audit log, but as a few entries (the
    // first at once, the rest as one summary per window), not one each.
    audited_attempts(&s, &admin, Some("rate_limited"), None, (N - 5 + 1) as u64);
    let entries = audit(&s, &admin, "auth_failure")
        .into_iter()
        .filter(|e| e["details"]["reason"] == "rate_limited" && e["ip_address"] == IP)
        .count();
    assert!(
        entries <= 6,
        "{entries} rate_limited entries for {} refusals",
        N - 5 + 1
    );
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

/// A response read from a raw exchange (for bytes the test kit cannot send).
struct Raw {
    status: u16,
    body: String,
}

/// Sends `head` (request line and headers, without the blank line) and
/// `body` as raw bytes; tolerates the server closing early. Only for what a
/// client library will not send or not report: non-UTF-8 header bytes, and
/// oversized bodies the server answers (and closes on) before reading them.
fn raw(port: u16, head: &[u8], body: &[u8]) -> Raw {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = head.to_vec();
    req.extend_from_slice(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    req.extend_from_slice(body);
    let _ = s.write_all(&req);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Raw {
        status,
        body: body.to_string(),
    }
}

/// One bad-input case: its outcome checked and any problem recorded.
struct Checker<'a> {
    s: &'a Server,
    problems: Vec<String>,
    cases: usize,
}

impl Checker<'_> {
    /// Panics listing the cases since `from` (a count of problems) that
    /// did not get a 4xx naming their problem.
    fn no_problems_since(&self, from: usize) {
        let new = &self.problems[from..];
        assert!(new.is_empty(), "{} cases:\n{}", new.len(), new.join("\n"));
    }

    fn check(&mut self, what: &str, status: u16, body: &str, keyword: &str) {
        self.cases += 1;
        let error = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string));
        if !(400..500).contains(&status) {
            self.problems
                .push(format!("{what}: status {status}, expected 4xx: {body}"));
        } else if let Some(e) = error {
            if !e.to_lowercase().contains(&keyword.to_lowercase()) {
                self.problems
                    .push(format!("{what}: error {e:?} does not name {keyword:?}"));
            }
        } else {
            self.problems.push(format!(
                "{what}: {status} without a JSON error string: {body:?}"
            ));
        }
    }

    fn send(&mut self, what: &str, req: Request, keyword: &str) {
        match self.s.client().try_send(&req) {
            Ok(r) => self.check(what, r.status, &r.body, keyword),
            Err(e) => self.problems.push(format!("{what}: request failed: {e}")),
        }
    }

    fn post_raw(
        &mut self,
        what: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
        keyword: &str,
    ) {
        let mut req = Request::new("POST", path).raw_body(body.to_vec());
        if let Some(t) = token {
            req = req.bearer(t);
        }
        self.send(what, req, keyword);
    }

    fn post(&mut self, what: &str, path: &str, token: &str, body: Value, keyword: &str) {
        self.send(
            what,
            Request::new("POST", path).bearer(token).json(&body),
            keyword,
        );
    }

    fn get(&mut self, what: &str, path: &str, token: &str, keyword: &str) {
        self.send(what, Request::new("GET", path).bearer(token), keyword);
    }
}

/// Bad input of every kind on one server, by kind, then what the refused
/// requests left behind; each step one behaviour.
fn bad_input() -> &'static Scenario {
    static S: OnceLock<Scenario> = OnceLock::new();
    S.get_or_init(|| {
        let mut sc = Scenario::new();
        run_bad_input(&mut sc);
        sc
    })
}

aragora_testkit::scenario_tests!(mod bad_input_is_a_4xx_naming_the_problem = bad_input;
    the_server_and_its_admin_are_set_up,
    malformed_or_mistyped_bodies_are_4xx_naming_the_problem,
    an_oversized_body_is_refused_before_parsing_naming_the_limit,
    bad_query_strings_are_4xx_naming_the_parameter,
    bad_durations_addresses_emails_passwords_roles_and_names_are_4xx_naming_them,
    bad_credentials_in_headers_are_4xx_and_unread_non_utf8_headers_are_ignored,
    unknown_routes_and_wrong_methods_are_4xx,
    at_least_sixty_cases_were_checked,
    refused_requests_leave_the_server_healthy,
    refused_requests_create_no_user_and_no_block,
    the_audit_chain_stays_intact_and_the_admin_keeps_its_roles,
);

fn run_bad_input(sc: &mut Scenario) {
    let Some((s, admin_id, admin)) = sc.step("the_server_and_its_admin_are_set_up", || {
        let s = start(&[("AUTH_RATE_LIMIT_PER_IP", "100000")]);
        let (admin_id, admin) = s.bootstrap_admin("root@input.test");
        (s, admin_id, admin)
    }) else {
        return;
    };
    let mut c = Checker {
        s: &s,
        problems: Vec::new(),
        cases: 0,
    };
    let login = "/api/auth/login";
    let users = "/api/admin/users";

    sc.step(
        "malformed_or_mistyped_bodies_are_4xx_naming_the_problem",
        || {
            let from = c.problems.len();
            // Bodies: malformed, empty, wrong types, unknown fields, wrong shape, deep.
            c.post_raw(
                "malformed JSON",
                login,
                None,
                br#"{"email": "a@b.c", "password": "#,
                "not valid",
            );
            c.post_raw(
                "malformed JSON (admin)",
                users,
                Some(&admin),
                b"{email: x}",
                "not valid",
            );
            c.post_raw(
                "trailing garbage",
                login,
                None,
                br#"{"email":"a@b.c","password":"p"} x"#,
                "trailing",
            );
            c.post_raw("empty body", login, None, b"", "empty");
            c.post_raw(
                "empty body (admin)",
                "/api/admin/ratelimit/block",
                Some(&admin),
                b"",
                "empty",
            );
            c.post_raw("JSON null", login, None, b"null", "invalid type");
            c.post_raw("JSON array", login, None, b"[]", "not valid");
            c.post_raw(
                "not UTF-8",
                login,
                None,
                b"{\"email\": \"\xff\xfe\", \"password\": \"x\"}",
                "not valid",
            );
            let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
            c.post_raw(
                "5000-deep nesting",
                users,
                Some(&admin),
                deep.as_bytes(),
                "not valid",
            );
            c.send(
                "password as number",
                Request::new("POST", login).json(&json!({"email": "a@b.c", "password": 123})),
                "invalid type",
            );
            c.post(
                "roles as string",
                users,
                &admin,
                json!({"email": "t@input.test", "password": PASSWORD, "roles": "admin"}),
                "invalid type",
            );
            c.post(
                "emails as string",
                "/api/admin/users/bulk-lock",
                &admin,
                json!({"emails": "x@input.test", "duration": "1h"}),
                "invalid type",
            );
            c.post(
                "duration as number",
                "/api/admin/ratelimit/block",
                &admin,
                json!({"ip": "203.0.113.1", "duration": 3600}),
                "invalid type",
            );
            c.send(
                "missing field",
                Request::new("POST", login).json(&json!({"email": "a@b.c"})),
                "missing field",
            );
            c.send(
                "unknown field",
                Request::new("POST", login)
                    .json(&json!({"email": "a@b.c", "password": "x", "otp": 1})),
                "unknown field",
            );
            c.post(
                "unknown field (admin)",
                users,
                &admin,
                json!({"email": "t@input.test", "is_admin": true}),
                "unknown field",
            );
            c.post_raw(
                "bad revoke body",
                &format!("/api/admin/users/{admin_id}/sessions/revoke"),
                Some(&admin),
                b"{oops",
                "not valid",
            );

            c.no_problems_since(from);
        },
    );
    sc.step("an_oversized_body_is_refused_before_parsing_naming_the_limit", || {
    let from = c.problems.len();
    // Oversized body: refused before parsing (raw, the server may close early).
    let big = format!(
        r#"{{"email":"big@input.test","password":"{}"}}"#,
        "x".repeat(200 * 1024)
    );
    let head = format!(
        "POST {users} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\n"
    );
    let r = raw(s.port, head.as_bytes(), big.as_bytes());
    c.check("200 KiB body", r.status, &r.body, "larger than");
    let head =
        format!("POST {login} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n");
    let r = raw(s.port, head.as_bytes(), big.as_bytes());
    c.check("200 KiB login body", r.status, &r.body, "larger than");

    c.no_problems_since(from);
    });
    sc.step("bad_query_strings_are_4xx_naming_the_parameter", || {
        let from = c.problems.len();
        // Query strings.
        let search = "/api/security/audit/search";
        c.get(
            "minutes=abc",
            &format!("{search}?minutes=abc"),
            &admin,
            "query string",
        );
        c.get(
            "minutes=-5",
            &format!("{search}?minutes=-5"),
            &admin,
            "query string",
        );
        c.get(
            "minutes=0",
            &format!("{search}?minutes=0"),
            &admin,
            "minutes",
        );
        c.get("limit=0", &format!("{search}?limit=0"), &admin, "limit");
        c.get(
            "limit=999999",
            &format!("{search}?limit=999999"),
            &admin,
            "limit",
        );
        c.get(
            "limit=abc",
            &format!("{search}?limit=abc"),
            &admin,
            "query string",
        );
        c.get(
            "limit overflow",
            &format!("{search}?limit=99999999999999999999999"),
            &admin,
            "query string",
        );
        c.get(
            "unknown parameter",
            &format!("{search}?actions=login"),
            &admin,
            "unknown field",
        );
        c.get(
            "users limit=abc",
            "/api/admin/users?limit=abc",
            &admin,
            "query string",
        );
        c.get(
            "denials minutes=abc",
            "/api/security/rbac/denials/recent?minutes=abc",
            &admin,
            "query string",
        );

        c.no_problems_since(from);
    });
    sc.step(
        "bad_durations_addresses_emails_passwords_roles_and_names_are_4xx_naming_them",
        || {
            let from = c.problems.len();
            // Durations, addresses, emails, passwords, roles, names.
            let block = "/api/admin/ratelimit/block";
            c.post(
                "duration soon (block)",
                block,
                &admin,
                json!({"ip": "203.0.113.1", "duration": "soon"}),
                "duration",
            );
            c.post(
                "duration 0s (block)",
                block,
                &admin,
                json!({"ip": "203.0.113.1", "duration": "0s"}),
                "duration",
            );
            c.post(
                "duration 400d (block)",
                block,
                &admin,
                json!({"ip": "203.0.113.1", "duration": "400d"}),
                "366 days",
            );
            c.post(
                "duration soon (bulk-lock)",
                "/api/admin/users/bulk-lock",
                &admin,
                json!({"emails": ["a@input.test"], "duration": "soon"}),
                "duration",
            );
            c.post(
                "duration -1h (bulk-lock)",
                "/api/admin/users/bulk-lock",
                &admin,
                json!({"emails": ["a@input.test"], "duration": "-1h"}),
                "duration",
            );
            c.post(
                "no emails (bulk-lock)",
                "/api/admin/users/bulk-lock",
                &admin,
                json!({"emails": [], "duration": "1h"}),
                "emails",
            );
            c.post(
                "bad IPv4",
                block,
                &admin,
                json!({"ip": "999.1.1.1", "duration": "1h"}),
                "IPv4",
            );
            c.post(
                "IP with port",
                block,
                &admin,
                json!({"ip": "203.0.113.1:80", "duration": "1h"}),
                "IPv4",
            );
            c.post(
                "empty IP",
                block,
                &admin,
                json!({"ip": "", "duration": "1h"}),
                "IPv4",
            );
            c.send(
                "bad IP (unblock)",
                Request::new("DELETE", "/api/admin/ratelimit/blocks/not-an-ip").bearer(&admin),
                "IPv4",
            );
            c.send(
                "IP not blocked (unblock)",
                Request::new("DELETE", "/api/admin/ratelimit/blocks/203.0.113.77").bearer(&admin),
                "not blocked",
            );
            c.post(
                "email without @",
                users,
                &admin,
                json!({"email": "no-at-sign", "password": PASSWORD}),
                "not an email address",
            );
            c.post(
                "email with space",
                users,
                &admin,
                json!({"email": "a b@input.test", "password": PASSWORD}),
                "not an email address",
            );
            c.post(
                "email without local part",
                users,
                &admin,
                json!({"email": "@input.test", "password": PASSWORD}),
                "not an email address",
            );
            c.post(
                "300-char email",
                users,
                &admin,
                json!({"email": format!("{}@input.test", "a".repeat(300)), "password": PASSWORD}),
                "not an email address",
            );
            c.post(
                "short password",
                users,
                &admin,
                json!({"email": "short@input.test", "password": "short"}),
                "at least 12",
            );
            c.post(
                "1100-byte password",
                users,
                &admin,
                json!({"email": "long@input.test", "password": "x".repeat(1100)}),
                "at most",
            );
            c.post(
                "short password (set)",
                &format!("/api/admin/users/{admin_id}/password"),
                &admin,
                json!({"password": "eleven char"}),
                "at least 12",
            );
            c.post(
                "unknown role",
                users,
                &admin,
                json!({"email": "role@input.test", "password": PASSWORD, "roles": ["superuser"]}),
                "not a role",
            );
            c.post(
                "unknown role (assign)",
                &format!("/api/admin/users/{admin_id}/roles"),
                &admin,
                json!({"role": "superuser"}),
                "not a role",
            );
            c.post(
                "bad role name",
                "/api/admin/roles",
                &admin,
                json!({"name": "Ops Team!", "permissions": []}),
                "must be 1 to 64",
            );
            c.post(
                "uncatalogued permission",
                "/api/admin/roles",
                &admin,
                json!({"name": "ops", "permissions": ["nuke.everything"]}),
                "catalogue",
            );
            c.post(
                "redefine built-in role",
                "/api/admin/roles",
                &admin,
                json!({"name": "admin", "permissions": []}),
                "built-in",
            );
            c.post(
                "empty key name",
                "/api/auth/api-keys",
                &admin,
                json!({"name": "  "}),
                "name",
            );
            c.post(
                "200-char key name",
                "/api/auth/api-keys",
                &admin,
                json!({"name": "k".repeat(200)}),
                "name",
            );
            c.post(
                "empty disable reason",
                &format!("/api/admin/users/{admin_id}/disable"),
                &admin,
                json!({"reason": " "}),
                "reason",
            );
            c.post(
                "disable oneself",
                &format!("/api/admin/users/{admin_id}/disable"),
                &admin,
                json!({"reason": "oops"}),
                "your own",
            );
            c.send(
                "remove own admin",
                Request::new(
                    "DELETE",
                    &format!("/api/admin/users/{admin_id}/roles/admin"),
                )
                .bearer(&admin),
                "your own admin",
            );
            c.get(
                "unknown user",
                "/api/admin/users/usr_nobody",
                &admin,
                "no user",
            );

            c.no_problems_since(from);
        },
    );
    sc.step(
        "bad_credentials_in_headers_are_4xx_and_unread_non_utf8_headers_are_ignored",
        || {
            let from = c.problems.len();
            // Headers: a 10 KB credential, non-UTF-8 bytes, a bare scheme.
            let long = "a".repeat(10 * 1024);
            c.send(
                "10 KB Authorization",
                Request::new("GET", "/api/auth/me").bearer(&long),
                "authorization",
            );
            c.send(
                "10 KB API key",
                Request::new("GET", "/api/auth/me").bearer(&format!("ara_{long}")),
                "authorization",
            );
            c.send(
                "bare Bearer",
                Request::new("GET", "/api/auth/me").header("Authorization", "Bearer"),
                "authorization",
            );
            c.send(
                "Bearer and spaces",
                Request::new("GET", "/api/auth/me").header("Authorization", "Bearer    "),
                "authorization",
            );
            let r = raw(
        s.port,
        b"GET /api/auth/me HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\xfd\r\n",
        b"",
    );
            c.check(
                "non-UTF-8 Authorization",
                r.status,
                &r.body,
                "authorization",
            );
            // Non-UTF-8 in headers the server only reads: ignored, the request served.
            let mut head = format!(
                "GET /api/auth/me HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {admin}\r\n"
            )
            .into_bytes();
            head.extend_from_slice(b"X-Forwarded-For: \xff\xfe\r\nUser-Agent: \xc3\x28agent\r\n");
            let r = raw(s.port, &head, b"");
            c.cases += 1;
            if r.status != 200 {
                c.problems.push(format!(
                    "non-UTF-8 X-Forwarded-For/User-Agent: {} {}",
                    r.status, r.body
                ));
            }

            c.no_problems_since(from);
        },
    );
    sc.step("unknown_routes_and_wrong_methods_are_4xx", || {
        let from = c.problems.len();
        // Routing.
        c.get("unknown route", "/api/nothing/here", &admin, "no route");
        c.send(
            "wrong method",
            Request::new("PUT", login).json(&json!({})),
            "not allowed",
        );

        c.no_problems_since(from);
    });
    sc.step("at_least_sixty_cases_were_checked", || {
        assert!(c.cases >= 60, "only {} cases", c.cases);
    });
    sc.step("refused_requests_leave_the_server_healthy", || {
        let r = s.send(Request::new("GET", "/api/health"));
        assert_eq!(r.status, 200);
    });
    sc.step("refused_requests_create_no_user_and_no_block", || {
        let r = s.get("/api/admin/users", &admin);
        assert_eq!(
            r.json().as_array().map(Vec::len),
            Some(1),
            "refused requests created users: {}",
            r.body
        );
        let r = s.get("/api/admin/ratelimit/blocks", &admin);
        assert_eq!(r.json()["blocks"], json!([]), "{}", r.body);
    });
    sc.step(
        "the_audit_chain_stays_intact_and_the_admin_keeps_its_roles",
        || {
            let r = s.get("/api/security/audit/verify", &admin);
            assert_eq!(r.json()["ok"], true, "{}", r.body);
            assert_eq!(
                s.get("/api/auth/me", &admin).json()["roles"],
                json!(["admin"])
            );
        },
    );
}

/// Path parameters that do not decode (`%FF` is not UTF-8) are refused like
/// every other bad input: 4xx with a JSON `error`.
#[test]
fn undecodable_path_parameter_is_a_json_4xx() {
    let s = start(&[]);
    let (_, admin) = s.bootstrap_admin("root@path.test");
    let r = s.get("/api/admin/users/%FF", &admin);
    assert!((400..500).contains(&r.status), "{} {}", r.status, r.body);
    let v: Option<Value> = serde_json::from_str(&r.body).ok();
    assert!(
        v.as_ref().and_then(|v| v["error"].as_str()).is_some(),
        "{} with a non-JSON body: {:?}",
        r.status,
        r.body
    );
}

/// A bad query value names its parameter (the extractor's documented promise).
#[test]
fn bad_query_value_names_its_parameter() {
    let s = start(&[]);
    let (_, admin) = s.bootstrap_admin("root@query.test");
    for (param, query) in [("minutes", "minutes=abc"), ("limit", "limit=abc")] {
        let r = s.get(&format!("/api/security/audit/search?{query}"), &admin);
        assert_eq!(r.status, 400, "{}", r.body);
        let e = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            e.contains(param),
            "{query}: error {e:?} does not name {param}"
        );
    }
}

/// A bulk-lock far in the future reports a lock end in the future.
#[test]
fn bulk_lock_with_a_huge_duration_reports_a_future_end() {
    let s = start(&[]);
    let (_, admin) = s.bootstrap_admin("root@huge.test");
    let r = s.post(
        "/api/admin/users/bulk-lock",
        &admin,
        &json!({"emails": ["nobody@huge.test"], "duration": "500000years"}),
    );
    assert!(r.status < 500, "{} {}", r.status, r.body);
    if r.status == 200 {
        let until = r.json()["locked_until"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            until.as_str() > "2026",
            "locked_until {until:?} is in the past"
        );
    }
}

/// Behind a trusted proxy the client is the last X-Forwarded-For hop the proxy
/// appended, not a first hop the client wrote itself: a blocked or
/// rate-limited client cannot escape by prepending addresses of its choice.
#[test]
fn spoofed_forwarded_for_hop_does_not_evade_blocks_or_the_limiter() {
    let s = start(&[
        ("AUTH_RATE_LIMIT_PER_IP", "3"),
        ("AUTH_RATE_LIMIT_WINDOW", "60"),
    ]);
    let (_, admin) = s.bootstrap_admin("root@xff.test");
    let r = s.post(
        "/api/admin/ratelimit/block",
        &admin,
        &json!({"ip": "203.0.113.66", "duration": "1h", "reason": "attacker"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // What nginx's $proxy_add_x_forwarded_for sends for a client at
    // 203.0.113.66 that wrote "X-Forwarded-For: 198.51.100.1" itself.
    let r = s.send(
        Request::new("GET", "/api/auth/me")
            .bearer(&admin)
            .header("X-Forwarded-For", "198.51.100.1, 203.0.113.66"),
    );
    let blocked = r.status == 403;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = s.send(
            Request::new("POST", "/api/auth/login")
                .header(
                    "X-Forwarded-For",
                    &format!("198.51.100.{}, 203.0.113.67", 10 + i),
                )
                .json(&json!({"email": "ghost@xff.test", "password": PASSWORD})),
        );
        statuses.push(r.status);
    }
    let limited = statuses.iter().filter(|&&st| st == 429).count();
    assert!(
        blocked && limited >= 3,
        "spoofed first hop: blocked client got {} (expected 403); 6 logins from one real client: {statuses:?} (expected 3 refused with 429)",
        r.status
    );
}

/// The lockout threshold bounds the guesses evaluated even when they arrive
/// at once (from many addresses).
#[test]
fn concurrent_wrong_passwords_are_bounded_by_the_lockout_threshold() {
    let s = start(&[
        ("AUTH_LOCKOUT_THRESHOLD", "3"),
        ("AUTH_RATE_LIMIT_PER_IP", "100"),
    ]);
    let (_, admin) = s.bootstrap_admin("root@race.test");
    s.create_user(&admin, "race@race.test", PASSWORD, &["viewer"]);
    let bad_before = failures_metric(&s, "bad_password");
    const N: usize = 12;
    let barrier = Arc::new(Barrier::new(N));
    let client = s.client();
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let (barrier, client) = (barrier.clone(), client.clone());
            std::thread::spawn(move || {
                let req = Request::new("POST", "/api/auth/login")
                    .header("X-Forwarded-For", &format!("198.51.100.{}", 100 + i))
                    .json(&json!({"email": "race@race.test", "password": format!("wrong guess {i:03}")}));
                barrier.wait();
                client.send(req).status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    // Every answer is the same 401; the metric tells evaluated guesses
    // (bad_password) from refusals of the locked account.
    assert!(statuses.iter().all(|&st| st == 401), "{statuses:?}");
    let evaluated = failures_metric(&s, "bad_password") - bad_before;
    assert!(
        evaluated <= 3.0,
        "{evaluated} of {N} concurrent wrong passwords were evaluated with a lockout threshold of 3"
    );
}

/// With one password-hashing slot, concurrent logins queue for it instead of
/// failing: every one is answered, none with a 5xx.
#[test]
fn concurrent_logins_share_a_bounded_number_of_hashing_slots() {
    let s = aragora_testkit::Server::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_aragora")),
        &[
            ("ARAGORA_PASSWORD_HASH_CONCURRENCY", "1"),
            ("AUTH_RATE_LIMIT_PER_IP", "1000"),
        ],
    );
    let (_, admin) = s.bootstrap_admin("root@slots.test");
    s.create_user(
        &admin,
        "slots@slots.test",
        "correct horse battery staple",
        &["viewer"],
    );
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    let password = if i % 2 == 0 { "correct horse battery staple" } else { "wrong password!!" };
                    s.send(
                        aragora_testkit::Request::new("POST", "/api/auth/login")
                            .json(&aragora_testkit::json!({"email": "slots@slots.test", "password": password})),
                    )
                    .status
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(
        statuses.iter().all(|&st| st == 200 || st == 401),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&st| st == 200).count(),
        4,
        "{statuses:?}"
    );
}

// ---------------------------------------------------------------------------
// Bounded anonymous work
// ---------------------------------------------------------------------------

/// Every audit entry of the last hour (all actions), oldest first.
fn all_audit(s: &Server, admin: &str) -> Vec<Value> {
    let r = s.get("/api/security/audit/search?minutes=60&limit=10000", admin);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["entries"].as_array().expect("entries").clone()
}

/// Sends `reqs` from `threads` threads at once; the statuses, in order.
fn flood(s: &Server, reqs: Vec<Request>, threads: usize) -> Vec<u16> {
    let client = s.client();
    let chunk = reqs.len().div_ceil(threads);
    let mut parts: Vec<Vec<Request>> = Vec::new();
    let mut rest = reqs;
    while !rest.is_empty() {
        let tail = rest.split_off(chunk.min(rest.len()));
        parts.push(rest);
        rest = tail;
    }
    let handles: Vec<_> = parts
        .into_iter()
        .map(|part| {
            let client = client.clone();
            std::thread::spawn(move || {
                part.into_iter()
                    .map(|r| client.send(r).status)
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect()
}

/// Thousands of refused anonymous requests (oversized bodies, malformed
/// input, rate-limited guesses, bad bearer tokens from thousands of
/// addresses) add a bounded amount of audit state: no entry carries more than
/// a bounded prefix of what the attacker sent, the entries added are a small
/// fraction of the requests (repeats are counted, not stored), their number is
/// capped per aggregation window whatever the number of sources, and no
/// refusal goes uncounted.
#[test]
fn anonymous_floods_add_bounded_audit_state() {
    let s = start(&[("AUTH_RATE_LIMIT_PER_IP", "5")]);
    let (_, admin) = s.bootstrap_admin("root@flood.test");
    let entries_before = all_audit(&s, &admin).len();
    let huge = "a".repeat(60_000);
    let long_local = "b".repeat(240);
    let started = std::time::Instant::now();
    let mut reqs = Vec::new();
    // 1,000 bodies of 60 KB: refused before parsing.
    for i in 0..1000 {
        reqs.push(
            Request::new("POST", "/api/auth/login")
                .header("X-Forwarded-For", &format!("198.18.0.{}", i % 200))
                .json(&json!({"email": format!("{huge}@x.test"), "password": "wrong password!!"})),
        );
    }
    // 500 emails over 254 bytes in a small body: 400 naming the field.
    for i in 0..500 {
        reqs.push(
            Request::new("POST", "/api/auth/login")
                .header("X-Forwarded-For", &format!("198.18.1.{}", i % 200))
                .json(&json!({"email": format!("{}@x.test", "c".repeat(300)), "password": "x"})),
        );
    }
    // 1,000 well-formed guesses at long, distinct addresses from 10 sources:
    // 5 per source are evaluated (unknown account), the rest rate-limited.
    let guesses = 1000;
    for i in 0..guesses {
        reqs.push(
            Request::new("POST", "/api/auth/login")
                .header("X-Forwarded-For", &format!("198.18.2.{}", i % 10))
                .json(&json!({"email": format!("{long_local}{i}@x.test"), "password": "wrong password!!"})),
        );
    }
    // 2,000 forged bearer tokens of 4 KB from 2,000 addresses.
    let tokens = 2000;
    let forged = format!("eyJhbGciOiJIUzI1NiJ9.{}.sig", "d".repeat(4000));
    for i in 0..tokens {
        reqs.push(
            Request::new("GET", "/api/auth/me")
                .header(
                    "X-Forwarded-For",
                    &format!("198.19.{}.{}", i / 250, i % 250),
                )
                .bearer(&forged),
        );
    }
    let total = reqs.len();
    let statuses = flood(&s, reqs, 4);
    let elapsed = started.elapsed();
    assert!(
        statuses[..1500].iter().all(|&st| st == 400),
        "oversized and malformed logins are 400: {:?}",
        &statuses[..1500]
            .iter()
            .filter(|&&st| st != 400)
            .collect::<Vec<_>>()
    );
    assert!(statuses[1500..].iter().all(|&st| st == 401 || st == 429));

    // Wait for every summary (the one-second windows close), then measure.
    audited_attempts(&s, &admin, None, None, (guesses + tokens) as u64);
    let all = all_audit(&s, &admin);
    let added: Vec<&Value> = all.iter().skip(entries_before).collect();
    let bytes: usize = added.iter().map(|e| e.to_string().len()).sum();
    for e in &added {
        let n = e.to_string().len();
        assert!(n <= 1024, "an audit entry of {n} bytes: {e}");
    }
    assert!(
        bytes <= 1024 * total,
        "{bytes} bytes of audit for {total} requests"
    );
    // The 1,500 logins refused before parsing store nothing; the others are
    // counted (their counts sum to every refusal, checked above) in at most
    // one entry each. How few entries that is depends on how many one-second
    // windows the flood spans, i.e. on machine speed, so the bound that holds
    // everywhere is the per-window cap below.
    assert!(
        added.len() <= guesses + tokens,
        "{} audit entries for {} refused requests that reached authentication",
        added.len(),
        guesses + tokens
    );
    // The cap per window holds however many sources there are: at most the
    // tracked keys written at once plus their summaries and one overflow
    // entry per (one-second) window.
    let windows = elapsed.as_secs() as usize + 2;
    assert!(
        added.len() <= windows * (2 * 100 + 1),
        "{} entries in {windows} windows",
        added.len()
    );
    eprintln!(
        "{total} anonymous requests in {elapsed:?}: {} audit entries, {bytes} bytes ({:.1} bytes/request)",
        added.len(),
        bytes as f64 / total as f64
    );
}

/// Login input is checked before anything costly or stored: 400 naming the
/// field, nothing audited, no hashing slot taken.
#[test]
fn login_input_is_validated_first() {
    let s = start(&[]);
    let (_, admin) = s.bootstrap_admin("root@input.test");
    let cases = [
        (
            json!({"email": format!("{}@x.test", "e".repeat(250)), "password": "x"}),
            "email",
        ),
        (json!({"email": "not-an-address", "password": "x"}), "email"),
        (json!({"email": "a@b@c", "password": "x"}), "email"),
        (
            json!({"email": "a@x.test", "password": "p".repeat(1025)}),
            "password",
        ),
        (json!({"email": "a@x.test", "password": ""}), "password"),
    ];
    for (body, field) in cases {
        let r = s.send(Request::new("POST", "/api/auth/login").json(&body));
        assert_eq!(r.status, 400, "{}", r.body);
        let err = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(err.starts_with(field), "names {field}: {err}");
        assert!(err.len() < 200, "the error does not echo the input: {err}");
    }
    let r = s.send(Request::new("POST", "/api/auth/login").raw_body(vec![b' '; 5000]));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("4096"), "names the limit: {}", r.body);
    assert!(audit(&s, &admin, "auth_failure").is_empty());
}

// ---------------------------------------------------------------------------
// Credential changes end access
// ---------------------------------------------------------------------------

/// An administrator's password reset ends every session of the user; a
/// self-service change keeps only the calling session; API keys are not
/// sessions and keep working.
#[test]
fn password_changes_end_sessions() {
    let s = start(&[("AUTH_RATE_LIMIT_PER_IP", "1000")]);
    let (_, admin) = s.bootstrap_admin("root@pw.test");
    let id = s.create_user(&admin, "pw@pw.test", PASSWORD, &["member"]);
    let t1 = s.login("pw@pw.test", PASSWORD);
    let t2 = s.login("pw@pw.test", PASSWORD);
    let r = s.post("/api/auth/api-keys", &t1, &json!({"name": "ci"}));
    assert_eq!(r.status, 201, "{}", r.body);
    let key = r.json()["token"].as_str().expect("token").to_string();

    // Reset by an administrator: both sessions end.
    const NEW: &str = "a brand new passphrase";
    let r = s.post(
        &format!("/api/admin/users/{id}/password"),
        &admin,
        &json!({"password": NEW}),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    for t in [&t1, &t2] {
        let r = s.get("/api/auth/me", t);
        assert_eq!(
            (r.status, r.json()["reason"].clone()),
            (401, json!("revoked")),
            "{}",
            r.body
        );
    }
    assert_eq!(s.get("/api/auth/me", &key).status, 200, "API key");
    let r = s.get(&format!("/api/admin/users/{id}/sessions"), &admin);
    assert_eq!(r.json()["active_sessions"], 0, "{}", r.body);

    // Self-service change: the calling session stays, the other ends.
    let a = s.login("pw@pw.test", NEW);
    let b = s.login("pw@pw.test", NEW);
    let r = s.post(
        "/api/auth/password",
        &a,
        &json!({"current_password": "not the password", "new_password": "another new passphrase"}),
    );
    assert_eq!(r.status, 400, "wrong current password: {}", r.body);
    assert_eq!(
        s.get("/api/auth/me", &b).status,
        200,
        "a failed change ends nothing"
    );
    let r = s.post(
        "/api/auth/password",
        &a,
        &json!({"current_password": NEW, "new_password": "another new passphrase"}),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        s.get("/api/auth/me", &a).status,
        200,
        "the calling session stays"
    );
    assert_eq!(
        s.get("/api/auth/me", &b).status,
        401,
        "the other session ends"
    );
    assert_eq!(
        s.send(
            Request::new("POST", "/api/auth/login")
                .json(&json!({"email": "pw@pw.test", "password": NEW}))
        )
        .status,
        401,
        "the old password is gone"
    );
    s.login("pw@pw.test", "another new passphrase");
    assert!(!audit(&s, &admin, "password_changed").is_empty());
}

/// The session record's expiry is checked on every request, not only the
/// token's (a session shortened on the server ends before its JWT does).
#[test]
fn server_side_session_expiry_is_checked() {
    use aragora::auth::model::Session;
    use aragora::store::{Collection, Durability, Expect, WriteOp, get_json};

    let mut s = start(&[]);
    let (_, admin) = s.bootstrap_admin("root@expiry.test");
    s.create_user(&admin, "exp@expiry.test", PASSWORD, &["viewer"]);
    let r = s.send(
        Request::new("POST", "/api/auth/login")
            .json(&json!({"email": "exp@expiry.test", "password": PASSWORD})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let token = r.json()["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    let sid = r.json()["session_id"].as_str().expect("sid").to_string();
    assert_eq!(s.get("/api/auth/me", &token).status, 200);
    s.stop();
    {
        let store = aragora_testkit::store::open_stopped(&s);
        let (v, mut session) = get_json::<Session>(&store, Collection::Sessions, &sid)
            .expect("read")
            .expect("session");
        session.expires_at = session.created_at + 1;
        aragora::store::Store::write(
            &store,
            vec![
                WriteOp::put_json(
                    Collection::Sessions,
                    sid.clone(),
                    &session,
                    Expect::Version(v),
                )
                .expect("op"),
            ],
            Durability::Durable,
        )
        .expect("write");
        store.close().expect("close");
    }
    s.restart_with(&[]);
    let r = s.get("/api/auth/me", &token);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["reason"], "revoked", "{}", r.body);
    assert!(r.body.contains("expired"), "{}", r.body);
}

/// Blocks take CIDR networks and hold every address inside them, in IPv4,
/// IPv4-mapped IPv6 and IPv6 form; a single IPv6 address blocks its /64 (an
/// attacker owns the whole /64); the runbook's single-address body still
/// works; a network is removed by its own name with the slash URL-encoded.
#[test]
fn blocked_networks_refuse_every_address_inside_them() {
    let s = start(&[("ARAGORA_TRUSTED_PROXIES", "127.0.0.1/32")]);
    let (admin_id, admin) = s.bootstrap_admin("root@cidr.test");
    let me = |ip: &str| {
        s.send(
            Request::new("GET", "/api/auth/me")
                .bearer(&admin)
                .header("X-Forwarded-For", ip),
        )
    };
    let block = |ip: &str| {
        s.post(
            "/api/admin/ratelimit/block",
            &admin,
            &json!({"ip": ip, "duration": "1h", "reason": "scanner"}),
        )
    };
    // The runbook's body and response fields.
    let r = block("1.2.3.4");
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (
            v["ip"].as_str(),
            v["reason"].as_str(),
            v["created_by"].as_str()
        ),
        (Some("1.2.3.4"), Some("scanner"), Some(admin_id.as_str())),
        "{v}"
    );
    assert!(
        v["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
    assert_eq!(me("1.2.3.4").status, 403);
    assert_eq!(me("::ffff:1.2.3.4").status, 403, "IPv4-mapped form");
    assert_eq!(me("1.2.3.5").status, 200);

    for (target, listed) in [
        ("10.9.0.0/24", "10.9.0.0/24"),
        ("2001:db8:aa::/48", "2001:db8:aa::/48"),
        ("2001:db8:bb:1::1", "2001:db8:bb:1::/64"),
    ] {
        let r = block(target);
        assert_eq!(r.status, 201, "{target}: {}", r.body);
        assert_eq!(r.json()["ip"], listed, "{target}");
    }
    for (ip, status) in [
        ("10.9.0.77", 403),
        ("10.9.0.255", 403),
        ("::ffff:10.9.0.5", 403),
        ("10.9.1.1", 200),
        ("2001:db8:aa:5::1", 403),
        ("2001:db8:ab::1", 200),
        ("2001:db8:bb:1:ffff:ffff:ffff:fffe", 403),
        ("2001:db8:bb:2::1", 200),
    ] {
        let r = me(ip);
        assert_eq!(r.status, status, "{ip}: {}", r.body);
        if status == 403 {
            assert_eq!(r.json()["reason"], "ip_blocked", "{ip}");
        }
    }
    let listed: Vec<Value> = s.get("/api/admin/ratelimit/blocks", &admin).json()["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| b["ip"].clone())
        .collect();
    for ip in [
        "1.2.3.4",
        "10.9.0.0/24",
        "2001:db8:aa::/48",
        "2001:db8:bb:1::/64",
    ] {
        assert!(listed.contains(&json!(ip)), "{ip} not in {listed:?}");
    }

    // A block containing the operator's own address would lock them out.
    let r = s.send(
        Request::new("POST", "/api/admin/ratelimit/block")
            .bearer(&admin)
            .header("X-Forwarded-For", "192.0.2.10")
            .json(&json!({"ip": "192.0.2.0/24", "duration": "1h", "reason": "oops"})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("your own address"), "{}", r.body);

    let unblock = |path_ip: &str| {
        s.send(
            Request::new("DELETE", &format!("/api/admin/ratelimit/blocks/{path_ip}"))
                .bearer(&admin),
        )
    };
    assert_eq!(unblock("10.9.0.0%2F24").status, 204);
    assert_eq!(me("10.9.0.77").status, 200, "unblocked");
    // Another address of a blocked /64 names the same block.
    assert_eq!(unblock("2001:db8:bb:1::99").status, 204);
    assert_eq!(me("2001:db8:bb:1::1").status, 200, "unblocked");
    let r = unblock("10.9.0.0%2F24");
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(me("2001:db8:aa:5::1").status, 403, "other blocks stay");
    let removed = audit(&s, &admin, "ip_unblocked");
    assert!(
        removed
            .iter()
            .any(|e| e["details"]["blocked_ip"] == "10.9.0.0/24"),
        "{removed:?}"
    );

    // Blocks survive a restart, networks included.
    let mut s = s;
    s.restart_with(&[]);
    let r = s.send(
        Request::new("GET", "/api/auth/me")
            .bearer(&admin)
            .header("X-Forwarded-For", "2001:db8:aa:ffff::1"),
    );
    assert_eq!(r.status, 403, "after restart: {}", r.body);
}

/// An attacker rotating through the addresses of one IPv6 /64, or switching
/// between the IPv4 and IPv4-mapped form of one address, is one client for the
/// login rate limit.
#[test]
fn one_ipv6_network_shares_the_login_rate_limit() {
    let s = start(&[
        ("AUTH_RATE_LIMIT_PER_IP", "3"),
        ("AUTH_RATE_LIMIT_WINDOW", "3600"),
        ("ARAGORA_TRUSTED_PROXIES", "127.0.0.1/32"),
    ]);
    let attempt = |ip: &str| login_from(&s, ip, "nobody@limit6.test", PASSWORD).status;
    let first: Vec<u16> = (1..=3)
        .map(|i| attempt(&format!("2001:db8:77:1::{i}")))
        .collect();
    assert!(first.iter().all(|&st| st == 401), "{first:?}");
    assert_eq!(
        attempt("2001:db8:77:1:ffff:ffff:ffff:ffff"),
        429,
        "another address of the same /64"
    );
    assert_eq!(
        attempt("2001:db8:77:2::1"),
        401,
        "the next /64 is another client"
    );

    for _ in 0..3 {
        assert_eq!(attempt("192.0.2.50"), 401);
    }
    assert_eq!(attempt("::ffff:192.0.2.50"), 429, "IPv4-mapped form");
}
