//! The HTTPS listener and the HTTP envelope, against the real `aragora serve`:
//! TLS with a certificate generated here (rcgen), only TLS 1.2 and newer, the
//! certificate reloaded on SIGHUP (a bad one refused, the old one kept),
//! production refusing plain HTTP beyond loopback, security headers and
//! request ids on every response.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aragora_testkit::{Request, Response, Server, free_port};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

const SECRET: &str = "tls-test-jwt-secret-0123456789abcdef0123";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_aragora"))
}

/// A self-signed certificate for localhost and 127.0.0.1: (cert PEM, key PEM).
fn certificate() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    (c.cert.pem(), c.signing_key.serialize_pem())
}

/// Certificate and key files in a directory that outlives the server.
struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new(cert: &str, key: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Self {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            _dir: dir,
        };
        f.write(cert, key);
        f
    }

    fn write(&self, cert: &str, key: &str) {
        std::fs::write(&self.cert, cert).expect("write cert");
        std::fs::write(&self.key, key).expect("write key");
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ARAGORA_TLS_CERT_FILE", self.cert.display().to_string()),
            ("ARAGORA_TLS_KEY_FILE", self.key.display().to_string()),
        ]
    }
}

fn start_tls(files: &Files) -> Server {
    let env = files.env();
    let mut extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    extra.push(("JWT_SECRET", SECRET));
    Server::start(bin(), &extra)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Sends `req` over TLS, trusting only `trusted` (a PEM certificate), offering
/// `versions`.
fn https_with(
    port: u16,
    trusted: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    req: &Request,
) -> std::io::Result<Response> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trusted.as_bytes()).expect("PEM"))
        .expect("root");
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").expect("name");
    let conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    req.send_over(rustls::StreamOwned::new(conn, tcp))
}

fn https(port: u16, trusted: &str, path: &str) -> std::io::Result<Response> {
    https_with(
        port,
        trusted,
        rustls::DEFAULT_VERSIONS,
        &Request::new("GET", path),
    )
}

/// A TLS 1.1 ClientHello (legacy version 3.2, no supported_versions
/// extension) that is otherwise acceptable to a TLS 1.2 server.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    // Including suites rustls serves over TLS 1.2, so only the version can be
    // what the server refuses.
    let suites: [u16; 6] = [0xc02b, 0xc02f, 0xc009, 0xc013, 0x002f, 0x0035];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // null compression
    let host = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&((host.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(host.len() as u16).to_be_bytes());
    sni.extend_from_slice(host);
    let mut ext = Vec::new();
    for (kind, data) in [
        (0x0000u16, sni),
        (0x000a, vec![0, 2, 0, 0x17]),    // supported groups: secp256r1
        (0x000b, vec![1, 0]),             // EC point formats: uncompressed
        (0x000d, vec![0, 4, 4, 3, 4, 1]), // signature algorithms (ECDSA, RSA)
    ] {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(&data);
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1u8]; // client_hello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// Everything the server sends back on a new connection for `bytes`, until
/// it closes (or 10 s of silence).
fn raw_exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

fn assert_security_headers(r: &Response, hsts: bool) {
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        (
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(r.header(name), Some(value), "{name}: {:?}", r.headers);
    }
    assert_eq!(
        r.header("strict-transport-security").is_some(),
        hsts,
        "HSTS expected: {hsts}; {:?}",
        r.headers
    );
    if hsts {
        assert!(
            r.header("strict-transport-security")
                .is_some_and(|v| v.starts_with("max-age=")),
            "{:?}",
            r.headers
        );
    }
}

#[test]
fn https_serves_the_api_to_tls_1_2_and_newer_only() {
    let (cert, key) = certificate();
    let files = Files::new(&cert, &key);
    let s = start_tls(&files);

    let r = https(s.port, &cert, "/api/health").expect("HTTPS health");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "ok");
    assert_security_headers(&r, true);
    let r = https_with(
        s.port,
        &cert,
        &[&rustls::version::TLS12],
        &Request::new("GET", "/api/health"),
    )
    .expect("TLS 1.2");
    assert_eq!(r.status, 200, "TLS 1.2 is accepted");

    // The listener speaks only TLS: plain HTTP gets no HTTP answer.
    let plain = Request::new("GET", "/api/health").send(s.port);
    assert!(plain.is_err(), "plain HTTP on the TLS port: {plain:?}");
    // TLS 1.1 is refused with an alert, never a ServerHello.
    let reply = raw_exchange(s.port, &tls11_client_hello());
    // A fatal alert (21) whose description is protocol_version (70).
    assert!(
        reply.len() >= 7 && reply[0] == 0x15 && reply[5] == 2 && reply[6] == 70,
        "TLS 1.1 hello answered with {reply:02x?}, expected a protocol_version alert"
    );
    // A client that does not trust the certificate does not get through.
    let (other, _) = certificate();
    assert!(https(s.port, &other, "/api/health").is_err());
    // The API itself works over it.
    let (_, admin) = s.bootstrap_admin("root@tls.test");
    let r = https_with(
        s.port,
        &cert,
        rustls::DEFAULT_VERSIONS,
        &Request::new("GET", "/api/auth/me").bearer(&admin),
    )
    .expect("HTTPS me");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["email"], "root@tls.test");
    let mut s = s;
    assert!(
        s.stop().is_some_and(|st| st.success()),
        "SIGTERM shuts the HTTPS server down cleanly"
    );
}

/// The value of `series` in the server's /metrics (over HTTPS).
fn metric(port: u16, trusted: &str, series: &str) -> f64 {
    let r = https(port, trusted, "/metrics").expect("metrics");
    aragora_testkit::metric_value(&r.body, series)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_the_old_one_when_the_new_is_bad() {
    let (cert_a, key_a) = certificate();
    let files = Files::new(&cert_a, &key_a);
    let s = start_tls(&files);
    assert_eq!(
        https(s.port, &cert_a, "/api/health").expect("A").status,
        200
    );
    let failed = r#"aragora_tls_certificate_reloads_total{outcome="failed"}"#;
    let ok = r#"aragora_tls_certificate_reloads_total{outcome="ok"}"#;

    // A renewal caught half-written: refused, the running certificate stays.
    files.write("-----BEGIN CERTIFICATE-----\ntruncated", &key_a);
    s.signal("HUP");
    wait_for("the failed reload", || {
        metric(s.port, &cert_a, failed) >= 1.0
    });
    let r = https(s.port, &cert_a, "/api/health").expect("still certificate A");
    assert_eq!(r.status, 200);
    assert_eq!(metric(s.port, &cert_a, ok), 0.0);

    // A good new certificate: new connections get it.
    let (cert_b, key_b) = certificate();
    files.write(&cert_b, &key_b);
    s.signal("HUP");
    wait_for("the reload", || {
        https(s.port, &cert_b, "/api/health").is_ok_and(|r| r.status == 200)
    });
    assert!(
        https(s.port, &cert_a, "/api/health").is_err(),
        "certificate A is no longer served"
    );
    assert_eq!(metric(s.port, &cert_b, ok), 1.0);
}

#[test]
fn a_bad_certificate_file_stops_boot_naming_it() {
    let (cert, key) = certificate();
    let data = tempfile::tempdir().expect("tempdir");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .env_clear()
            .env("ARAGORA_DATA_DIR", data.path())
            .env("ARAGORA_BIND", format!("127.0.0.1:{}", free_port()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = data.path().join("missing.crt");
    let files = Files::new("not PEM at all", &key);
    let good = Files::new(&cert, &key);
    for (env, named) in [
        (
            vec![
                ("ARAGORA_TLS_CERT_FILE", missing.to_str().expect("path")),
                ("ARAGORA_TLS_KEY_FILE", good.key.to_str().expect("path")),
            ],
            missing.display().to_string(),
        ),
        (
            vec![
                ("ARAGORA_TLS_CERT_FILE", files.cert.to_str().expect("path")),
                ("ARAGORA_TLS_KEY_FILE", files.key.to_str().expect("path")),
            ],
            files.cert.display().to_string(),
        ),
        (
            vec![("ARAGORA_TLS_CERT_FILE", good.cert.to_str().expect("path"))],
            "ARAGORA_TLS_KEY_FILE".to_string(),
        ),
    ] {
        let (code, err) = run(&env);
        assert_eq!(code, Some(2), "{env:?}: {err}");
        assert!(err.contains(&named), "{env:?}: {named} not named in {err}");
    }
}

fn production_env() -> Vec<(&'static str, String)> {
    vec![
        ("ARAGORA_ENV", "production".into()),
        ("ARAGORA_ENCRYPTION_KEY", "1a".repeat(32)),
        ("AEDB_MANIFEST_KEY", "2b".repeat(32)),
        ("AEDB_CHECKPOINT_KEY", "3c".repeat(32)),
        ("JWT_SECRET", SECRET.into()),
    ]
}

/// Production listening beyond loopback in plain HTTP would carry tokens and
/// secrets in clear: refused at boot unless a proxy terminates TLS.
#[test]
fn production_refuses_plain_http_beyond_loopback_unless_tls_is_terminated_upstream() {
    let port = free_port();
    let bind = format!("0.0.0.0:{port}");
    let data = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .env_clear()
        .env("ARAGORA_DATA_DIR", data.path())
        .env("ARAGORA_BIND", &bind);
    for (k, v) in production_env() {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for name in [
        "ARAGORA_TLS_CERT_FILE",
        "ARAGORA_TLS_TERMINATED_UPSTREAM",
        "ARAGORA_BIND",
    ] {
        assert!(err.contains(name), "{name} not named: {err}");
    }

    let env = production_env();
    let mut extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    extra.push(("ARAGORA_BIND", &bind));
    extra.push(("ARAGORA_TLS_TERMINATED_UPSTREAM", "true"));
    let s = Server::start(bin(), &extra);
    let r = s.send(Request::new("GET", "/api/health"));
    assert_eq!(r.status, 200, "{}", r.body);
    // Clients reach it over HTTPS (through the proxy): tell browsers so.
    assert_security_headers(&r, true);
}

#[test]
fn every_response_has_security_headers_and_a_request_id() {
    let s = Server::start(bin(), &[("JWT_SECRET", SECRET)]);
    let health = s.send(Request::new("GET", "/api/health"));
    assert_eq!(health.status, 200);
    assert_security_headers(&health, false);
    let generated = health
        .header("x-request-id")
        .expect("generated id")
        .to_string();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let again = s.send(Request::new("GET", "/api/health"));
    assert_ne!(again.header("x-request-id"), Some(generated.as_str()));

    // The client's id is echoed; an unusable one is replaced.
    let r = s.send(Request::new("GET", "/api/health").header("X-Request-Id", "trace-42.a_b:c"));
    assert_eq!(r.header("x-request-id"), Some("trace-42.a_b:c"));
    let long = "x".repeat(300);
    let r = s.send(Request::new("GET", "/api/health").header("X-Request-Id", &long));
    let id = r.header("x-request-id").expect("id");
    assert_ne!(id, long);
    assert_eq!(id.len(), 36);

    // Errors and refusals carry them too, and the body limit still names itself.
    for r in [
        s.send(Request::new("GET", "/api/nothing").header("X-Request-Id", "e-1")),
        s.send(Request::new("GET", "/api/auth/me").header("X-Request-Id", "e-1")),
        s.send(
            Request::new("POST", "/api/auth/login")
                .header("X-Request-Id", "e-1")
                .raw_body(vec![b'x'; 100 * 1024]),
        ),
    ] {
        assert!(r.status >= 400, "{} {}", r.status, r.body);
        assert_security_headers(&r, false);
        assert_eq!(r.header("x-request-id"), Some("e-1"), "{}", r.body);
        if r.status == 413 {
            let e = r.json()["error"].as_str().unwrap_or_default().to_string();
            assert!(e.contains("65536"), "{e}");
        }
    }
    let big = s.send(Request::new("POST", "/api/auth/login").raw_body(vec![b'x'; 100 * 1024]));
    assert_eq!(big.status, 413, "{}", big.body);
}
