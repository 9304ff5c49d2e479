//! A test kit that runs the real `aragora serve` binary on a free port with a
//! fresh data directory, bootstraps an admin through the real CLI, and speaks
//! plain HTTP/1.1 to it (no client library between the test and the wire).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use serde_json::{Value, json};

/// The value of one series in a Prometheus text exposition (0 when absent).
pub fn metric_value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Response {
    /// The body as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): status {} body {:?}",
                self.status, self.body
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// A request being built: method, path, headers, body.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("Authorization", &format!("Bearer {token}"))
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn json(mut self, v: &Value) -> Self {
        self.body = Some(v.to_string().into_bytes());
        self.header("Content-Type", "application/json")
    }

    pub fn raw_body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = Some(b.into());
        self
    }

    /// Sends it on a new connection (`Connection: close`).
    pub fn send(&self, port: u16) -> std::io::Result<Response> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        self.send_over(s)
    }

    /// Sends it over `s`, a connection the caller opened (a TLS stream, say),
    /// and reads the response.
    pub fn send_over(&self, mut s: impl Read + Write) -> std::io::Result<Response> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n",
            self.method, self.path
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = self.body.clone().unwrap_or_default();
        if self.body.is_some() || self.method != "GET" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        s.write_all(&body)?;
        read_response(&mut BufReader::new(s))
    }
}

fn read_response(r: &mut impl BufRead) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(n) = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim(), 16).map_err(|_| bad("bad chunk size"))?;
            if n == 0 {
                line.clear();
                r.read_line(&mut line)?;
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A running `aragora serve`, stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct Server {
    pub port: u16,
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

/// Environment every test server gets: quiet logs, and X-Forwarded-For believed
/// from loopback so tests can act as many client addresses.
pub fn base_env() -> Vec<(String, String)> {
    vec![
        ("ARAGORA_LOG_LEVEL".into(), "warn".into()),
        ("ARAGORA_TRUSTED_PROXIES".into(), "127.0.0.1".into()),
    ]
}

impl Server {
    /// Starts the binary at `bin` on a fresh data dir with `extra` env vars
    /// (an `ARAGORA_BIND` among them sets the address and port; by default a
    /// free port on 127.0.0.1).
    pub fn start(bin: &Path, extra: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().to_path_buf();
        let mut env = base_env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let port = extra
            .iter()
            .find(|(k, _)| *k == "ARAGORA_BIND")
            .and_then(|(_, v)| v.rsplit(':').next()?.parse().ok())
            .unwrap_or_else(free_port);
        let mut s = Self {
            port,
            bin: bin.to_path_buf(),
            data_dir,
            env,
            child: None,
            _tmp: Some(tmp),
        };
        s.spawn();
        s
    }

    /// `aragora` (no arguments yet) with this server's environment: its port,
    /// data dir and env vars; callers add arguments and overrides.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ARAGORA_BIND", format!("127.0.0.1:{}", self.port))
            .env("ARAGORA_DATA_DIR", &self.data_dir);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(&mut self) {
        let child = self
            .command()
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn aragora serve");
        self.child = Some(child);
        // An HTTPS server cannot answer this plain-HTTP probe: it is up when
        // its port accepts connections (it binds only once ready to serve).
        let tls = self.env.iter().any(|(k, _)| k == "ARAGORA_TLS_CERT_FILE");
        let ready = |port: u16| {
            if tls {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            } else {
                Request::new("GET", "/api/health").send(port).is_ok()
            }
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready(self.port) {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("aragora serve exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "aragora serve did not start in 60 s"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops (SIGTERM, waits) and starts again on the same data dir, with env
    /// changes applied (the runbook's `kubectl set env` followed by a restart).
    pub fn restart_with(&mut self, changes: &[(&str, &str)]) {
        self.stop();
        for (k, v) in changes {
            self.env.retain(|(ek, _)| ek != k);
            self.env.push((k.to_string(), v.to_string()));
        }
        self.spawn();
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) to the running server.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("server running");
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} failed");
    }

    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().ok()
    }

    /// The keys a development server generated into its data dir
    /// (`dev-keys.env`: `NAME=hex` lines), by name.
    pub fn dev_keys(&self) -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(self.data_dir.join("dev-keys.env"))
            .expect("dev-keys.env in the data dir");
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    /// Runs `aragora ARGS` with the server's environment.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.command().args(args).output().expect("run aragora")
    }

    /// `aragora admin bootstrap --email EMAIL --json` against this server:
    /// (user id, token).
    pub fn bootstrap_admin(&self, email: &str) -> (String, String) {
        let out = self.cli(&["admin", "bootstrap", "--email", email, "--json"]);
        assert!(
            out.status.success(),
            "bootstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("bootstrap JSON");
        (
            v["user_id"].as_str().expect("user_id").to_string(),
            v["token"].as_str().expect("token").to_string(),
        )
    }

    /// Audit entries of the last five minutes with `action`, oldest first
    /// (searched with `token`, which needs `audit.read`).
    pub fn audit(&self, token: &str, action: &str) -> Vec<Value> {
        let r = self.get(
            &format!("/api/security/audit/search?action={action}&minutes=5&limit=10000"),
            token,
        );
        assert_eq!(r.status, 200, "audit search: {}", r.body);
        r.json()["entries"].as_array().expect("entries").clone()
    }

    /// The value of one series of `/metrics` (0 when absent), e.g.
    /// `aragora_security_auth_failures_total{reason="expired"}`.
    pub fn metric(&self, series: &str) -> f64 {
        let r = self.send(Request::new("GET", "/metrics"));
        assert_eq!(r.status, 200, "/metrics: {}", r.body);
        metric_value(&r.body, series)
    }

    pub fn send(&self, r: Request) -> Response {
        r.send(self.port)
            .unwrap_or_else(|e| panic!("request failed: {e}"))
    }

    pub fn get(&self, path: &str, token: &str) -> Response {
        self.send(Request::new("GET", path).bearer(token))
    }

    pub fn post(&self, path: &str, token: &str, body: &Value) -> Response {
        self.send(Request::new("POST", path).bearer(token).json(body))
    }

    /// Creates a user with a password and roles as `admin`; returns its id.
    pub fn create_user(&self, admin: &str, email: &str, password: &str, roles: &[&str]) -> String {
        let r = self.post(
            "/api/admin/users",
            admin,
            &json!({"email": email, "password": password, "roles": roles}),
        );
        assert_eq!(r.status, 201, "create user: {}", r.body);
        r.json()["id"].as_str().expect("id").to_string()
    }

    /// Logs in; returns the access token.
    pub fn login(&self, email: &str, password: &str) -> String {
        let r = self.send(
            Request::new("POST", "/api/auth/login")
                .json(&json!({"email": email, "password": password})),
        );
        assert_eq!(r.status, 200, "login {email}: {}", r.body);
        r.json()["access_token"]
            .as_str()
            .expect("token")
            .to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
