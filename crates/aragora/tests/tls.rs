//! The HTTPS listener and the HTTP envelope, against the real `aragora serve`:
//! TLS with a certificate generated here (rcgen), only TLS 1.2 and newer, the
//! certificate reloaded on SIGHUP (a bad one refused, the old one kept),
//! production refusing plain HTTP beyond loopback, security headers and
//! request ids on every response.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aragora_testkit::{Client, HttpError, Request, Response, Server};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

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
) -> Result<Response, HttpError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trusted.as_bytes()).expect("PEM"))
        .expect("root");
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    Client::https(addr, "localhost", config).try_send(req)
}

fn https(port: u16, trusted: &str, path: &str) -> Result<Response, HttpError> {
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

/// One HTTPS server the read-only TLS tests share, with its certificate.
struct TlsServer {
    server: Server,
    cert: String,
}

fn tls_server() -> &'static TlsServer {
    static S: OnceLock<TlsServer> = OnceLock::new();
    S.get_or_init(|| {
        let (cert, key) = certificate();
        // The files live in the server's data dir, which goes with it (a
        // static is never dropped: the test kit's watchdog removes the dir).
        let mut server = Server::stopped(bin(), &[("JWT_SECRET", SECRET)]);
        for (var, file, pem) in [
            ("ARAGORA_TLS_CERT_FILE", "tls.crt", &cert),
            ("ARAGORA_TLS_KEY_FILE", "tls.key", &key),
        ] {
            let path = server.data_dir.join(file);
            std::fs::write(&path, pem).expect("write PEM");
            server.env.push((var.into(), path.display().to_string()));
        }
        server.start_once(&[]).unwrap_or_else(|e| panic!("{e}"));
        TlsServer { server, cert }
    })
}

#[test]
fn https_serves_health_with_security_headers_and_hsts() {
    let t = tls_server();
    let r = https(t.server.port, &t.cert, "/api/health").expect("HTTPS health");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "ok");
    assert_security_headers(&r, true);
}

#[test]
fn tls_1_2_is_accepted() {
    let t = tls_server();
    let r = https_with(
        t.server.port,
        &t.cert,
        &[&rustls::version::TLS12],
        &Request::new("GET", "/api/health"),
    )
    .expect("TLS 1.2");
    assert_eq!(r.status, 200, "TLS 1.2 is accepted");
}

#[test]
fn plain_http_on_the_tls_port_gets_no_http_answer() {
    let t = tls_server();
    let plain = t
        .server
        .client()
        .try_send(&Request::new("GET", "/api/health"));
    assert!(plain.is_err(), "plain HTTP on the TLS port: {plain:?}");
}

#[test]
fn tls_1_1_is_refused_with_a_protocol_version_alert() {
    let t = tls_server();
    let reply = raw_exchange(t.server.port, &tls11_client_hello());
    // A fatal alert (21) whose description is protocol_version (70), never a
    // ServerHello.
    assert!(
        reply.len() >= 7 && reply[0] == 0x15 && reply[5] == 2 && reply[6] == 70,
        "TLS 1.1 hello answered with {reply:02x?}, expected a protocol_version alert"
    );
}

#[test]
fn a_client_that_does_not_trust_the_certificate_does_not_get_through() {
    let t = tls_server();
    let (other, _) = certificate();
    assert!(https(t.server.port, &other, "/api/health").is_err());
}

#[test]
fn the_api_works_over_https() {
    let t = tls_server();
    let (_, admin) = t.server.bootstrap_admin("root@tls.test");
    let r = https_with(
        t.server.port,
        &t.cert,
        rustls::DEFAULT_VERSIONS,
        &Request::new("GET", "/api/auth/me").bearer(&admin),
    )
    .expect("HTTPS me");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["email"], "root@tls.test");
}

#[test]
fn sigterm_shuts_the_https_server_down_cleanly() {
    let (cert, key) = certificate();
    let files = Files::new(&cert, &key);
    let mut s = start_tls(&files);
    assert_eq!(https(s.port, &cert, "/api/health").expect("up").status, 200);
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
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.crt");
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
        let err = match Server::try_start(bin(), &env) {
            Ok(s) => panic!("{env:?}: started at {}", s.addr),
            Err(e) => e,
        };
        assert_eq!(err.code(), Some(2), "{env:?}: {err}");
        assert!(
            err.stderr.contains(&named),
            "{env:?}: {named} not named in {err}"
        );
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
/// secrets in clear: refused at boot, naming the ways out.
#[test]
fn production_refuses_plain_http_beyond_loopback() {
    let env = production_env();
    let mut extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    extra.push(("ARAGORA_BIND", "0.0.0.0:0"));
    let err = match Server::try_start(bin(), &extra) {
        Ok(s) => panic!("production plain HTTP on {} started", s.addr),
        Err(e) => e,
    };
    assert_eq!(err.code(), Some(2), "{err}");
    for name in [
        "ARAGORA_TLS_CERT_FILE",
        "ARAGORA_TLS_TERMINATED_UPSTREAM",
        "ARAGORA_BIND",
    ] {
        assert!(err.stderr.contains(name), "{name} not named: {err}");
    }
}

/// Behind a proxy that terminates TLS it serves, and tells browsers to use
/// HTTPS (HSTS), since clients reach it that way.
#[test]
fn production_beyond_loopback_serves_when_tls_is_terminated_upstream() {
    let env = production_env();
    let mut extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    extra.push(("ARAGORA_BIND", "0.0.0.0:0"));
    extra.push(("ARAGORA_TLS_TERMINATED_UPSTREAM", "true"));
    let s = Server::start(bin(), &extra);
    let r = s.send(Request::new("GET", "/api/health"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_security_headers(&r, true);
}

/// The plain-HTTP server the envelope tests share.
fn plain() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(bin(), &[("JWT_SECRET", SECRET)]))
}

#[test]
fn a_response_has_security_headers_without_hsts_over_plain_http() {
    let health = plain().send(Request::new("GET", "/api/health"));
    assert_eq!(health.status, 200);
    assert_security_headers(&health, false);
}

#[test]
fn each_response_gets_a_new_generated_request_id() {
    let s = plain();
    let first = s.send(Request::new("GET", "/api/health"));
    let generated = first
        .header("x-request-id")
        .expect("generated id")
        .to_string();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let again = s.send(Request::new("GET", "/api/health"));
    assert_ne!(again.header("x-request-id"), Some(generated.as_str()));
}

#[test]
fn a_client_request_id_is_echoed() {
    let r =
        plain().send(Request::new("GET", "/api/health").header("X-Request-Id", "trace-42.a_b:c"));
    assert_eq!(r.header("x-request-id"), Some("trace-42.a_b:c"));
}

#[test]
fn an_unusable_client_request_id_is_replaced() {
    let long = "x".repeat(300);
    let r = plain().send(Request::new("GET", "/api/health").header("X-Request-Id", &long));
    let id = r.header("x-request-id").expect("id");
    assert_ne!(id, long);
    assert_eq!(id.len(), 36);
}

#[test]
fn errors_and_refusals_carry_security_headers_and_the_request_id() {
    let s = plain();
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
}

#[test]
fn a_body_over_64_kib_is_413() {
    let big =
        plain().send(Request::new("POST", "/api/auth/login").raw_body(vec![b'x'; 100 * 1024]));
    assert_eq!(big.status, 413, "{}", big.body);
}
