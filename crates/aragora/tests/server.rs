//! The real `aragora serve` through the test kit: health, the Appendix A
//! metric names, maintenance mode, graceful SIGTERM, and the checks of
//! configuration and keys at boot.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use aragora_testkit::{BootFailure, Request, Server};

const BIN: &str = env!("CARGO_BIN_EXE_aragora");

/// The development server the read-only tests share.
fn shared() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(Path::new(BIN), &[]))
}

/// A server in maintenance mode, shared the same way.
fn maintenance() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(Path::new(BIN), &[("MAINTENANCE_MODE", "true")]))
}

fn get(s: &Server, path: &str) -> aragora_testkit::Response {
    s.send(Request::new("GET", path))
}

#[test]
fn health_answers_ok() {
    let r = get(shared(), "/api/health");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "ok");
}

#[test]
fn metrics_expose_every_appendix_a_family() {
    let r = get(shared(), "/metrics");
    assert_eq!(r.status, 200);
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
        assert!(r.body.contains(name), "/metrics lacks {name}");
    }
}

#[test]
fn an_unknown_route_is_a_404_naming_method_and_path() {
    let r = get(shared(), "/api/nope");
    assert_eq!(r.status, 404);
    assert!(r.body.contains("no route for GET /api/nope"), "{}", r.body);
}

#[test]
fn development_keys_are_generated_into_an_owner_only_file() {
    let keys = shared().data_dir.join("dev-keys.env");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&keys).expect("keys file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn sigterm_shuts_down_cleanly_and_the_same_keys_reopen_the_store() {
    let mut s = Server::start(Path::new(BIN), &[]);
    assert!(
        s.stop().is_some_and(|st| st.success()),
        "SIGTERM shuts down cleanly"
    );
    // The store was closed (lock released) and the same keys reopen it.
    s.restart_with(&[]);
    assert_eq!(get(&s, "/api/health").status, 200);
    assert!(s.stop().is_some_and(|st| st.success()));
}

#[test]
fn maintenance_mode_still_serves_health_and_metrics() {
    assert_eq!(get(maintenance(), "/api/health").status, 200);
    assert_eq!(get(maintenance(), "/metrics").status, 200);
}

#[test]
fn maintenance_mode_refuses_the_rest_of_the_api_with_503() {
    let r = get(maintenance(), "/api/security/rbac/permissions");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("maintenance mode"), "{}", r.body);
}

#[test]
fn maintenance_mode_lets_admin_routes_through() {
    assert_ne!(
        get(maintenance(), "/api/admin/sessions/revoke-all").status,
        503
    );
}

/// Boots with `env` and expects a refusal with exit code 2: its stderr.
fn refused(env: &[(&str, &str)]) -> String {
    match Server::try_start(Path::new(BIN), env) {
        Ok(s) => panic!("{env:?}: the server started at {}", s.addr),
        Err(BootFailure { status, stderr }) => {
            assert_eq!(status.and_then(|s| s.code()), Some(2), "{env:?}: {stderr}");
            stderr
        }
    }
}

#[test]
fn production_without_keys_stops_boot_naming_each_missing_key() {
    let err = refused(&[("ARAGORA_ENV", "production")]);
    for name in ["JWT_SECRET is not set", "AEDB_MANIFEST_KEY is not set"] {
        assert!(err.contains(name), "{err}");
    }
    // A missing master key alone would start the server sealed (tests/sealed.rs).
    assert!(!err.contains("ARAGORA_ENCRYPTION_KEY is not set"), "{err}");
}

#[test]
fn a_short_encryption_key_stops_boot_naming_its_length() {
    let err = refused(&[("ARAGORA_ENCRYPTION_KEY", "xyz")]);
    assert!(err.contains("got 3 characters"), "{err}");
}

#[test]
fn a_bad_setting_stops_boot_naming_the_variable() {
    for (name, value) in [
        ("ARAGORA_PASSWORD_HASH_CONCURRENCY", "0"),
        ("AUTH_LOCKOUT_THRESHOLD", "many"),
        ("ARAGORA_TRUSTED_PROXIES", "10.0.0.1,not-an-ip"),
        ("RBAC_CACHE_TTL", "-5"),
    ] {
        let err = refused(&[(name, value)]);
        assert!(err.contains(name), "{name}={value}: {err}");
    }
}

fn check_key(v: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("check-key").env_clear();
    if let Some(v) = v {
        cmd.env("ARAGORA_ENCRYPTION_KEY", v);
    }
    cmd.output().expect("run")
}

#[test]
fn check_key_accepts_64_hex_characters() {
    assert!(check_key(Some(&"ab".repeat(32))).status.success());
}

#[test]
fn check_key_names_the_problem_and_never_prints_the_key() {
    for (v, msg) in [
        (None, "is not set"),
        (Some("abc"), "must be 64 hex characters"),
        (Some(&*"g".repeat(64)), "is not valid hex"),
    ] {
        let out = check_key(v);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{err}");
        assert!(!err.contains(&"g".repeat(64)), "the key is never printed");
    }
}
