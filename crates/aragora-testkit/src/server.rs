//! The real `aragora serve` as a child process: bound to port 0 on a fresh
//! data directory, its address read back from the one line it prints on
//! stdout, its log kept for assertions, stopped on drop (and by a watchdog
//! when the test process exits without dropping it, as a `static` fixture).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

use crate::http::{Client, Request, Response};
use crate::metric_value;

/// What `aragora serve` prints on stdout once its listener is bound.
const LISTENING: &str = "aragora listening on ";
/// Boot includes key derivation and opening the store; on a loaded two-core
/// machine that has taken seconds, never a minute.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A server that exited, or never said where it listens, instead of starting.
#[derive(Debug, Clone)]
pub struct BootFailure {
    /// The exit status, when it exited.
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl BootFailure {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

impl std::fmt::Display for BootFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "aragora serve did not start ({:?}): {}",
            self.status, self.stderr
        )
    }
}

/// A production-mode environment (`ARAGORA_ENV=production`: every key from
/// the environment) with fixed test AEDB keys and JWT secret and the given
/// master key, for tests of what production does differently (backups,
/// drills, sealed start).
pub fn production_env(master_key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ARAGORA_ENV", "production".to_string()),
        ("AEDB_MANIFEST_KEY", "2b".repeat(32)),
        ("AEDB_CHECKPOINT_KEY", "3c".repeat(32)),
        (
            "JWT_SECRET",
            "a-production-jwt-secret-of-at-least-32-characters".to_string(),
        ),
        ("ARAGORA_ENCRYPTION_KEY", master_key.to_string()),
    ]
}

/// `env` as the pairs `Server::start` takes.
pub fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Environment every test server gets: quiet logs, port 0, and X-Forwarded-For
/// believed from loopback so tests can act as many client addresses.
pub fn base_env() -> Vec<(String, String)> {
    vec![
        ("ARAGORA_LOG_LEVEL".into(), "warn".into()),
        ("ARAGORA_TRUSTED_PROXIES".into(), "127.0.0.1".into()),
        ("ARAGORA_BIND".into(), "127.0.0.1:0".into()),
    ]
}

/// One run of `aragora serve`.
struct Running {
    child: Child,
    /// `sh` blocked reading this pipe: when the test process dies the pipe
    /// closes and the watchdog stops the server and removes its data dir.
    watchdog: Child,
    _watch: ChildStdin,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<JoinHandle<()>>,
}

impl Running {
    fn finish(mut self, signal: Option<&str>) -> Option<ExitStatus> {
        if let Some(signal) = signal {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &self.child.id().to_string()])
                .status();
        }
        let status = self.child.wait().ok();
        if let Some(h) = self.stderr_reader.take() {
            let _ = h.join();
        }
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        status
    }
}

/// How long `Server::wait` waits for an exit the test caused (generous: the
/// machine may be loaded).
const WAIT_FOR_EXIT: Duration = Duration::from_secs(120);

/// A running `aragora serve`, stopped (SIGTERM) on drop.
pub struct Server {
    /// Where it listens now (a restart binds a new port).
    pub addr: SocketAddr,
    pub port: u16,
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub env: Vec<(String, String)>,
    client: Client,
    running: Option<Running>,
    /// stderr of the runs before the current one.
    past_stderr: String,
    _tmp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("data_dir", &self.data_dir)
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl Server {
    /// Starts the binary at `bin` on a fresh data dir with `extra` env vars
    /// (an `ARAGORA_BIND` among them sets the address; by default port 0 on
    /// 127.0.0.1). Panics with the server's stderr when it does not start.
    pub fn start(bin: &Path, extra: &[(&str, &str)]) -> Self {
        Self::try_start(bin, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `start`, but a server that refuses to boot is the result, with
    /// its exit status and stderr.
    pub fn try_start(bin: &Path, extra: &[(&str, &str)]) -> Result<Self, BootFailure> {
        let mut s = Self::stopped(bin, extra);
        s.start_once(&[])?;
        Ok(s)
    }

    /// A fresh data dir and environment, no process yet (`start_once` or
    /// `restart_with` starts it; `cli` works on the data dir directly).
    pub fn stopped(bin: &Path, extra: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut env = base_env();
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        Self {
            addr,
            port: 0,
            bin: bin.to_path_buf(),
            data_dir: tmp.path().to_path_buf(),
            env,
            client: Client::http(addr),
            running: None,
            past_stderr: String::new(),
            _tmp: Some(tmp),
        }
    }

    /// `aragora` (no arguments yet) with this server's environment: its data
    /// dir and env vars; callers add arguments and overrides.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ARAGORA_DATA_DIR", &self.data_dir);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts `aragora serve` on this data dir with `overrides` for this run
    /// only, and waits until it has printed its address. A server that exits
    /// first (a bad key, say) is an error carrying its status and stderr.
    pub fn start_once(&mut self, overrides: &[(&str, &str)]) -> Result<(), BootFailure> {
        assert!(self.running.is_none(), "the server is already running");
        let mut cmd = self.command();
        for (k, v) in overrides {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} serve: {e}", self.bin.display()));
        let watchdog = Command::new("sh")
            .args([
                "-c",
                // Stdin reaches EOF only when the test process has gone.
                r#"read _ ; kill -TERM "$0" 2>/dev/null ; while kill -0 "$0" 2>/dev/null ; do sleep 0.1 ; done ; rm -rf "$1""#,
            ])
            .arg(child.id().to_string())
            .arg(&self.data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the watchdog shell: {e}"));
        let mut watchdog = watchdog;
        let watch = watchdog
            .stdin
            .take()
            .unwrap_or_else(|| panic!("watchdog stdin"));

        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_reader = child.stderr.take().map(|pipe| {
            let log = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    // Through the test harness's capture: shown when a test fails.
                    eprintln!("[aragora] {line}");
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        });
        let (tx, rx) = mpsc::channel();
        if let Some(pipe) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                // Keep draining after the address so a later write never
                // meets a closed pipe.
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(addr) = line.strip_prefix(LISTENING)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
            });
        }
        let mut running = Running {
            child,
            watchdog,
            _watch: watch,
            stderr,
            stderr_reader,
        };
        let line = match rx.recv_timeout(BOOT_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let timed_out = matches!(e, mpsc::RecvTimeoutError::Timeout);
                let log = running.stderr.clone();
                let status = running.finish(timed_out.then_some("KILL"));
                let stderr = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let stderr = if timed_out {
                    format!("no address within {BOOT_TIMEOUT:?}; stderr: {stderr}")
                } else {
                    stderr
                };
                return Err(BootFailure { status, stderr });
            }
        };
        let mut addr: SocketAddr = line
            .parse()
            .unwrap_or_else(|e| panic!("aragora printed {line:?}, not an address: {e}"));
        // Bound to every interface: reach it over loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        self.addr = addr;
        self.port = addr.port();
        self.client = Client::http(addr);
        // The address is printed once the listener is bound, a moment before
        // the server installs its SIGTERM handler and serves: one answered
        // request shows it is there (a test that stops the server at once
        // then sees a graceful exit). An HTTPS server is left to its test's
        // own client, which knows the certificate.
        let tls = self
            .env
            .iter()
            .map(|(k, _)| k.as_str())
            .chain(overrides.iter().map(|(k, _)| *k))
            .any(|k| k == "ARAGORA_TLS_CERT_FILE");
        if !tls {
            let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
            while self
                .client
                .try_send(&Request::new("GET", "/api/health"))
                .is_err()
            {
                if let Ok(Some(status)) = running.child.try_wait() {
                    let log = running.stderr.clone();
                    running.finish(None);
                    let stderr = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    return Err(BootFailure {
                        status: Some(status),
                        stderr,
                    });
                }
                if std::time::Instant::now() > deadline {
                    let log = running.stderr.clone();
                    let status = running.finish(Some("KILL"));
                    let stderr = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    return Err(BootFailure {
                        status,
                        stderr: format!(
                            "no answer on {addr} within {BOOT_TIMEOUT:?}; stderr: {stderr}"
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.running = Some(running);
        Ok(())
    }

    /// Stops (SIGTERM, waits) and starts again on the same data dir, with env
    /// changes applied (the runbook's `kubectl set env` followed by a
    /// restart). The new run listens on a new port.
    pub fn restart_with(&mut self, changes: &[(&str, &str)]) {
        self.stop();
        for (k, v) in changes {
            self.env.retain(|(ek, _)| ek != k);
            self.env.push((k.to_string(), v.to_string()));
        }
        self.start_once(&[]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) to the running server.
    pub fn signal(&self, signal: &str) {
        let r = self.running.as_ref().expect("server running");
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &r.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} failed");
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.finish(Some("TERM"))
    }

    /// SIGKILL (a crash), then waits for the exit.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.finish(Some("KILL"))
    }

    /// Waits for the server to exit by itself (an injected fault, say). A
    /// server still running after `WAIT_FOR_EXIT` fails the test (killed,
    /// with its stderr) instead of hanging it.
    pub fn wait(&mut self) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + WAIT_FOR_EXIT;
        while let Some(r) = self.running.as_mut() {
            match r.child.try_wait() {
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    let status = self.kill();
                    panic!(
                        "the server did not exit by itself within {WAIT_FOR_EXIT:?} (killed: {status:?}); stderr:\n{}",
                        self.stderr()
                    );
                }
                Ok(Some(_)) | Err(_) => break,
            }
        }
        self.finish(None)
    }

    fn finish(&mut self, signal: Option<&str>) -> Option<ExitStatus> {
        let r = self.running.take()?;
        let log = r.stderr.clone();
        let status = r.finish(signal);
        self.past_stderr
            .push_str(&log.lock().unwrap_or_else(|e| e.into_inner()));
        status
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Everything the server wrote to stderr so far, over all its runs.
    pub fn stderr(&self) -> String {
        let mut all = self.past_stderr.clone();
        if let Some(r) = &self.running {
            all.push_str(&r.stderr.lock().unwrap_or_else(|e| e.into_inner()));
        }
        all
    }

    /// A client for the current run (plain HTTP), for other threads.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The keys a development server generated into its data dir
    /// (`dev-keys.env`: `NAME=hex` lines), by name.
    pub fn dev_keys(&self) -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(self.data_dir.join("dev-keys.env"))
            .unwrap_or_else(|e| panic!("dev-keys.env in the data dir: {e}"));
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    /// Runs `aragora ARGS` with the server's environment.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run aragora: {e}"))
    }

    /// Runs `aragora ARGS` with the server's environment and `stdin` as its
    /// standard input (`aragora unseal` reads the key there, never from argv).
    pub fn cli_with_stdin(&self, args: &[&str], stdin: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run aragora: {e}"));
        if let Some(mut input) = child.stdin.take() {
            // A command that exits before reading closes the pipe: its
            // output says why, so a failed write is not the test's failure.
            let _ = input.write_all(stdin.as_bytes());
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("run aragora: {e}"))
    }

    /// `aragora ARGS --json`-style commands that must succeed: their stdout
    /// as JSON (panics with stderr otherwise).
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "aragora {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "aragora {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `aragora admin bootstrap --email EMAIL --json` against this server:
    /// (user id, token).
    pub fn bootstrap_admin(&self, email: &str) -> (String, String) {
        let v = self.cli_json(&["admin", "bootstrap", "--email", email, "--json"]);
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

    /// Sends `r` to the current run; panics when no response comes back.
    pub fn send(&self, r: Request) -> Response {
        assert!(self.running.is_some(), "the server is not running");
        self.client.send(r)
    }

    pub fn get(&self, path: &str, token: &str) -> Response {
        self.send(Request::new("GET", path).bearer(token))
    }

    pub fn post(&self, path: &str, token: &str, body: &Value) -> Response {
        self.send(Request::new("POST", path).bearer(token).json(body))
    }

    pub fn put(&self, path: &str, token: &str, body: &Value) -> Response {
        self.send(Request::new("PUT", path).bearer(token).json(body))
    }

    pub fn delete(&self, path: &str, token: &str) -> Response {
        self.send(Request::new("DELETE", path).bearer(token))
    }

    /// Stores the password secret `id` = `value` as `token`, asserting it was
    /// created or replaced.
    pub fn put_secret(&self, token: &str, id: &str, value: &str) {
        let r = self.put(
            &format!("/api/secrets/{id}"),
            token,
            &json!({"value": value, "secret_type": "password"}),
        );
        assert!(r.status == 200 || r.status == 201, "PUT {id}: {}", r.body);
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

    /// Every page of a listing that paginates with `Link: <...>; rel="next"`
    /// (`GET /api/admin/users`), from `path`: the pages' arrays, in order.
    pub fn pages(&self, path: &str, token: &str) -> Vec<Vec<Value>> {
        let mut pages = Vec::new();
        let mut next = Some(path.to_string());
        while let Some(path) = next.take() {
            let r = self.get(&path, token);
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            let page = r.json().as_array().cloned().unwrap_or_else(|| {
                panic!("{path}: not a top-level array: {}", r.body);
            });
            next = r.next_link();
            assert!(pages.len() < 10_000, "{path}: the Link chain does not end");
            pages.push(page);
        }
        pages
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

/// One server shared by the tests of a file that do not interfere (each makes
/// its own users and secrets), with an admin bootstrapped: started by the
/// first test that asks, stopped by its watchdog when the test binary exits.
///
/// ```text
/// static SHARED: OnceLock<Shared> = OnceLock::new();
/// fn shared() -> &'static Shared {
///     Shared::get(&SHARED, Path::new(env!("CARGO_BIN_EXE_aragora")), &[], "root@x.test")
/// }
/// ```
#[derive(Debug)]
pub struct Shared {
    pub server: Server,
    pub admin_id: String,
    /// The admin's API key.
    pub admin: String,
}

impl Shared {
    pub fn get(
        cell: &'static OnceLock<Shared>,
        bin: &Path,
        extra: &[(&str, &str)],
        admin_email: &str,
    ) -> &'static Shared {
        cell.get_or_init(|| {
            let server = Server::start(bin, extra);
            let (admin_id, admin) = server.bootstrap_admin(admin_email);
            Shared {
                server,
                admin_id,
                admin,
            }
        })
    }
}

impl std::ops::Deref for Shared {
    type Target = Server;

    fn deref(&self) -> &Server {
        &self.server
    }
}
