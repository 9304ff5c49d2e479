//! Starts the real `aragora serve` on a free port and exercises the foundation:
//! health, the Appendix A metric names, maintenance mode, graceful SIGTERM, and
//! the key checks at boot.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A minimal HTTP/1.1 GET (status, body): the tests need nothing more.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn start(data: &Path, port: u16, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aragora"));
    cmd.arg("serve")
        .env_clear()
        .env("ARAGORA_BIND", format!("127.0.0.1:{port}"))
        .env("ARAGORA_DATA_DIR", data)
        .env("ARAGORA_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn aragora");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(port, "/api/health").is_none() {
        assert!(Instant::now() < deadline, "aragora did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn stop(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    child.wait().expect("wait")
}

#[test]
fn serve_health_metrics_and_graceful_shutdown() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let child = start(tmp.path(), port, &[]);
    let (status, body) = get(port, "/api/health").expect("health");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["status"], "ok");
    let (status, text) = get(port, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    for name in [
        "aragora_security_encryption_operations_total",
        "aragora_security_encryption_latency_seconds",
        "aragora_security_encryption_errors_total",
        "aragora_security_active_keys",
        "aragora_security_rbac_decisions_total",
        "aragora_security_rbac_denied_total",
        "aragora_security_rbac_evaluation_latency_seconds",
        "aragora_security_auth_attempts_total",
        "aragora_security_auth_failures_total",
        "aragora_security_auth_latency_seconds",
        "aragora_approval_requests_total",
        "aragora_pending_critical_approvals",
        "aragora_approval_unauthorized_attempts_total",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }
    let (status, body) = get(port, "/api/nope").expect("404");
    assert_eq!(status, 404);
    assert!(body.contains("no route for GET /api/nope"));
    // Development keys were generated into an owner-only file.
    let keys = tmp.path().join("dev-keys.env");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&keys).expect("keys file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert!(stop(child).success(), "SIGTERM shuts down cleanly");
    // The store was closed (lock released) and the same keys reopen it.
    let child = start(tmp.path(), port, &[]);
    assert!(stop(child).success());
}

#[test]
fn maintenance_mode_serves_only_health_metrics_and_admin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let child = start(tmp.path(), port, &[("MAINTENANCE_MODE", "true")]);
    assert_eq!(get(port, "/api/health").expect("health").0, 200);
    assert_eq!(get(port, "/metrics").expect("metrics").0, 200);
    let (status, body) = get(port, "/api/security/rbac/permissions").expect("locked");
    assert_eq!(status, 503);
    assert!(body.contains("maintenance mode"));
    assert_ne!(
        get(port, "/api/admin/sessions/revoke-all")
            .expect("admin")
            .0,
        503
    );
    stop(child);
}

#[test]
fn bad_configuration_stops_boot_naming_the_variable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_aragora"));
        cmd.arg("serve")
            .env_clear()
            .env("ARAGORA_DATA_DIR", tmp.path())
            .env("ARAGORA_BIND", "127.0.0.1:1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run")
    };
    let out = run(&[("ARAGORA_ENV", "production")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for name in [
        "ARAGORA_ENCRYPTION_KEY is not set",
        "JWT_SECRET is not set",
        "AEDB_MANIFEST_KEY is not set",
    ] {
        assert!(err.contains(name), "{err}");
    }
    let out = run(&[("ARAGORA_ENCRYPTION_KEY", "xyz")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("got 3 characters"));
    for (name, value) in [
        ("ARAGORA_PASSWORD_HASH_CONCURRENCY", "0"),
        ("AUTH_LOCKOUT_THRESHOLD", "many"),
        ("ARAGORA_TRUSTED_PROXIES", "10.0.0.1,not-an-ip"),
        ("RBAC_CACHE_TTL", "-5"),
    ] {
        let out = run(&[(name, value)]);
        assert_eq!(out.status.code(), Some(2), "{name}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{name}={value}: {err}");
    }

    let check = |v: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_aragora"));
        cmd.arg("check-key").env_clear();
        if let Some(v) = v {
            cmd.env("ARAGORA_ENCRYPTION_KEY", v);
        }
        cmd.output().expect("run")
    };
    assert!(check(Some(&"ab".repeat(32))).status.success());
    for (v, msg) in [
        (None, "is not set"),
        (Some("abc"), "must be 64 hex characters"),
        (Some(&*"g".repeat(64)), "is not valid hex"),
    ] {
        let out = check(v);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{err}");
        assert!(!err.contains(&"g".repeat(64)), "the key is never printed");
    }
}
