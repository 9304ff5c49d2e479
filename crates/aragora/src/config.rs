//! Every environment variable aragora reads, parsed and validated once at boot.
//! Errors name the variable and what is wrong with it, never its value when the
//! value is a secret.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::net::ClientNets;

/// A 32-byte secret from the environment. Never printed.
#[derive(Clone)]
pub struct Key32(Zeroizing<[u8; 32]>);

impl Key32 {
    pub fn bytes(&self) -> [u8; 32] {
        *self.0
    }
}

impl fmt::Debug for Key32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key32(<redacted>)")
    }
}

/// A secret string from the environment (JWT secrets): zeroized when dropped,
/// never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

/// Why a key variable is unusable (the value itself is never reported).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("{0} is not set")]
    Missing(&'static str),
    #[error("{name} must be 64 hex characters (32 bytes), got {len} characters")]
    WrongLength { name: &'static str, len: usize },
    #[error("{0} is not valid hex (only 0-9 and a-f are allowed)")]
    NotHex(&'static str),
}

/// Parses a 64-hex-character key variable.
pub fn parse_key(name: &'static str, value: Option<&str>) -> Result<Key32, KeyProblem> {
    let v = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(KeyProblem::Missing(name))?;
    if v.len() != 64 {
        return Err(KeyProblem::WrongLength { name, len: v.len() });
    }
    let bytes = Zeroizing::new(hex::decode(v).map_err(|_| KeyProblem::NotHex(name))?);
    let mut k = Zeroizing::new([0u8; 32]);
    k.copy_from_slice(&bytes);
    Ok(Key32(k))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Environment {
    Production,
    Development,
}

/// ARAGORA_KEY_DESTROY_GRACE's default: a week in `expired` before a data key
/// is destroyed, so a cleanup run by mistake (or twice) can still be undone.
pub const DEFAULT_KEY_DESTROY_GRACE: u64 = 7 * 86_400;

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub log_level: String,
    pub log_json: bool,
    pub environment: Environment,
    pub maintenance_mode: bool,
    /// MAINTENANCE_MODE as the runtime mode starts (`crate::maintenance`):
    /// a boolean (on/off) or `read-only`.
    pub maintenance_boot: crate::maintenance::MaintenanceMode,
    pub rbac_cache_ttl: Duration,
    pub auth_rate_limit_per_ip: u32,
    pub auth_rate_limit_window: Duration,
    pub encryption_key: Option<Key32>,
    /// The master key before the current one (ARAGORA_ENCRYPTION_KEY_PREVIOUS):
    /// opens key-ring records `aragora master-key rotate` has not rewrapped
    /// yet. Never wraps anything.
    pub encryption_key_previous: Option<Key32>,
    pub jwt_secret: Option<SecretString>,
    pub jwt_secret_previous: Option<SecretString>,
    pub aedb_manifest_key: Option<Key32>,
    pub aedb_checkpoint_key: Option<Key32>,
    /// Lifetime of access tokens (ARAGORA_TOKEN_TTL, seconds).
    pub token_ttl: Duration,
    /// Failed logins that lock an account (AUTH_LOCKOUT_THRESHOLD).
    pub lockout_threshold: u32,
    /// First lockout; each further one doubles, up to the maximum
    /// (AUTH_LOCKOUT_SECONDS, AUTH_LOCKOUT_MAX_SECONDS).
    pub lockout_base: Duration,
    pub lockout_max: Duration,
    /// Peers whose X-Forwarded-For is believed (ARAGORA_TRUSTED_PROXIES,
    /// comma-separated addresses or CIDR networks); everyone else is
    /// identified by the socket address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// How clients are grouped for rate limits and blocks
    /// (ARAGORA_IPV6_PREFIX_LEN: an IPv6 client is its /N, default 64).
    pub client_nets: ClientNets,
    /// The HTTPS listener's certificate and key (ARAGORA_TLS_CERT_FILE,
    /// ARAGORA_TLS_KEY_FILE); `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// A proxy in front terminates TLS (ARAGORA_TLS_TERMINATED_UPSTREAM):
    /// production may then listen in plain HTTP beyond loopback, and responses
    /// carry Strict-Transport-Security.
    pub tls_terminated_upstream: bool,
    /// Longest a request may take before a 503 (ARAGORA_REQUEST_TIMEOUT, seconds).
    pub request_timeout: Duration,
    /// Password hashes (Argon2id) computed at once
    /// (ARAGORA_PASSWORD_HASH_CONCURRENCY, default: the number of cores).
    pub password_hash_concurrency: usize,
    /// How long repeated authentication refusals of one kind are counted
    /// before one summary audit entry is written
    /// (ARAGORA_AUTH_FAILURE_AUDIT_WINDOW, seconds).
    pub auth_failure_audit_window: Duration,
    /// Approval gates: `APPROVAL_TIMEOUT_<OPERATION>` (seconds) and
    /// `APPROVAL_AUTO_APPROVE_LOW`.
    pub approvals: crate::approvals::ApprovalSettings,
    /// Approval notifications (APPROVAL_WEBHOOK_URL and its companions);
    /// `None`: none are sent.
    pub approval_webhook: Option<crate::approvals::WebhookSettings>,
    /// Records per migration batch (ARAGORA_MIGRATION_BATCH_SIZE).
    pub migration_batch_size: usize,
    /// How long a data key stays `expired` (unused, still recoverable from
    /// the store) before a cleanup destroys it (ARAGORA_KEY_DESTROY_GRACE,
    /// seconds, default 7 days).
    pub key_destroy_grace: Duration,
    /// Scheduled audit export (ARAGORA_AUDIT_EXPORT_DIR; `None`: off) and
    /// its period (ARAGORA_AUDIT_EXPORT_INTERVAL, seconds, default 3600).
    pub audit_export_dir: Option<PathBuf>,
    pub audit_export_interval: Duration,
    /// ARAGORA_AUDIT_RETENTION (`90d`; `None`: keep every entry): after each
    /// scheduled export, entries older than this that the export holds are
    /// removed from the live log (`audit::retention`).
    pub audit_retention: Option<Duration>,
    /// Scheduled online backups (`crate::backup`): `None` (ARAGORA_BACKUP_DIR
    /// unset) turns the schedule off.
    pub backup: Option<BackupSchedule>,
    /// REDIS_URL: replicas share the login limit through it
    /// (`crate::redis_link`); `None`: each process limits on its own. May
    /// hold a password: never shown.
    pub redis_url: Option<SecretString>,
    /// Test-only faults (none unless a test asks for one).
    pub faults: FaultPlan,
    /// The shared PostgreSQL store (DATABASE_URL, ARAGORA_DATABASE_POOL_SIZE);
    /// `None`: the embedded store in ARAGORA_DATA_DIR.
    pub database: Option<DatabaseSettings>,
    /// The AEDB keys before the current ones (AEDB_PREVIOUS_MANIFEST_KEY,
    /// AEDB_PREVIOUS_CHECKPOINT_KEY): during a key rotation the store opens a
    /// directory (and backups) signed or encrypted under them and re-signs it
    /// under the current keys. Optional everywhere.
    pub aedb_previous_manifest_key: Option<Key32>,
    pub aedb_previous_checkpoint_key: Option<Key32>,
}

/// DATABASE_URL and its pool: all state in PostgreSQL (scale-out).
#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    /// The connection string; it may hold a password, so it is never shown.
    pub url: SecretString,
    /// Where it points (`host:port/dbname`), for logs and messages.
    pub target: String,
    pub pool_size: usize,
    /// `ARAGORA_DATABASE_CA_FILE`: the roots PostgreSQL's certificate must
    /// chain to when `sslmode` asks for TLS (else the Mozilla roots).
    pub ca_file: Option<PathBuf>,
}

/// ARAGORA_BACKUP_INCREMENTAL_INTERVAL's default: an hour of writes at most
/// is lost with the newest backup.
pub const DEFAULT_BACKUP_INCREMENTAL_INTERVAL: u64 = 3600;
/// ARAGORA_BACKUP_FULL_INTERVAL's default: a new chain (full backup) daily.
pub const DEFAULT_BACKUP_FULL_INTERVAL: u64 = 86_400;
/// ARAGORA_BACKUP_RETAIN_FULL's default: a week of daily chains.
pub const DEFAULT_BACKUP_RETAIN_FULL: u64 = 7;

/// The backup schedule: a chain (a full backup, then incrementals) in `dir`
/// every `full_interval`, an incremental every `incremental_interval`, the
/// newest `retain_full` chains kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupSchedule {
    /// ARAGORA_BACKUP_DIR.
    pub dir: PathBuf,
    /// ARAGORA_BACKUP_INCREMENTAL_INTERVAL (seconds, default 3600).
    pub incremental_interval: Duration,
    /// ARAGORA_BACKUP_FULL_INTERVAL (seconds, default 86400).
    pub full_interval: Duration,
    /// ARAGORA_BACKUP_RETAIN_FULL (chains, default 7).
    pub retain_full: usize,
}

/// Where a fault plan can strike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// A migration batch (records and progress) has been written durably;
    /// `batches` so far in this run.
    MigrationBatchDurable { batches: u64 },
    /// A job has taken the slot and is about to run.
    JobStarted,
    /// An approved request is about to be claimed for execution.
    ApprovalBeforeExecution,
    /// An approved operation ran and its job recorded the outcome; the
    /// request does not say so yet.
    ApprovalAfterJob,
}

/// Test-only faults, read once with the rest of the configuration: the crash
/// and resume tests make the process die at a chosen point, like a `kill -9`,
/// to prove what a crash there leaves behind. Services call [`FaultPlan::at`]
/// at each [`FaultPoint`]; with the default (empty) plan it does nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Abort after this many durable migration batches
    /// (ARAGORA_MIGRATION_STOP_AFTER_BATCHES).
    pub crash_after_migration_batches: Option<u64>,
    /// A started job waits until this file exists (ARAGORA_TEST_JOB_GATE):
    /// a test holds a job running for as long as it needs, whatever the
    /// machine's speed.
    pub job_gate: Option<PathBuf>,
    /// Abort at this approval execution step (ARAGORA_TEST_APPROVAL_CRASH:
    /// `before_execution` or `after_job`).
    pub approval_crash: Option<FaultPoint>,
}

impl FaultPlan {
    /// Crashes the process when the plan names this point.
    pub fn at(&self, point: FaultPoint) {
        match point {
            FaultPoint::MigrationBatchDurable { batches }
                if self.crash_after_migration_batches == Some(batches) =>
            {
                tracing::error!(
                    batches,
                    "ARAGORA_MIGRATION_STOP_AFTER_BATCHES: aborting the process (test fault)"
                );
                std::process::abort();
            }
            FaultPoint::MigrationBatchDurable { .. } => {}
            FaultPoint::ApprovalBeforeExecution | FaultPoint::ApprovalAfterJob => {
                if self.approval_crash == Some(point) {
                    tracing::error!(
                        ?point,
                        "ARAGORA_TEST_APPROVAL_CRASH: aborting the process (test fault)"
                    );
                    std::process::abort();
                }
            }
            FaultPoint::JobStarted => {
                if let Some(gate) = &self.job_gate {
                    while !gate.exists() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error(transparent)]
    DevKeys(#[from] crate::keys::KeyFileError),
}

/// `aragora check-key`: ARAGORA_ENCRYPTION_KEY as the server would read it.
pub fn check_encryption_key() -> Result<(), KeyProblem> {
    parse_key(
        "ARAGORA_ENCRYPTION_KEY",
        std::env::var("ARAGORA_ENCRYPTION_KEY").ok().as_deref(),
    )
    .map(|_| ())
}

/// PEM files of the HTTPS listener, read at boot and on SIGHUP (`crate::tls`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Config {
    /// Responses tell browsers to use HTTPS only when clients reach us over it.
    pub fn clients_use_https(&self) -> bool {
        self.tls.is_some() || self.tls_terminated_upstream
    }
}

/// Every problem found, each naming its variable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

fn boolean(name: &str, v: &str, problems: &mut Vec<String>) -> bool {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => true,
        "0" | "false" | "no" | "off" | "" => false,
        other => {
            problems.push(format!("{name} must be true or false, got {other:?}"));
            false
        }
    }
}

fn number(name: &str, v: &str, min: u64, max: u64, problems: &mut Vec<String>) -> u64 {
    match v.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => n,
        Ok(n) => {
            problems.push(format!("{name} must be between {min} and {max}, got {n}"));
            min
        }
        Err(_) => {
            problems.push(format!("{name} must be a whole number, got {v:?}"));
            min
        }
    }
}

/// `APPROVAL_WEBHOOK_URL` with its secret and delivery knobs. Neither the URL
/// (its path may hold a token) nor the secret is echoed in a problem.
fn webhook<'v>(
    get: &dyn Fn(&str) -> Option<&'v str>,
    p: &mut Vec<String>,
) -> Option<crate::approvals::WebhookSettings> {
    use crate::approvals::notify::{
        DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_BACKOFF_BASE, DEFAULT_MAX_ATTEMPTS, MAX_ATTEMPTS_LIMIT,
        MIN_SECRET_BYTES, WebhookSettings, WebhookUrl,
    };
    let url = get("APPROVAL_WEBHOOK_URL").filter(|v| !v.trim().is_empty())?;
    let url = WebhookUrl::parse(url).map_err(|e| p.push(e)).ok();
    let secret = match get("APPROVAL_WEBHOOK_SECRET").filter(|s| !s.is_empty()) {
        None => {
            p.push(
                "APPROVAL_WEBHOOK_SECRET is not set (required with APPROVAL_WEBHOOK_URL, \
                 at least 32 bytes)"
                    .into(),
            );
            None
        }
        Some(s) if s.len() < MIN_SECRET_BYTES => {
            p.push(format!(
                "APPROVAL_WEBHOOK_SECRET must be at least {MIN_SECRET_BYTES} bytes, got {}",
                s.len()
            ));
            None
        }
        Some(s) => Some(SecretString::new(s.to_owned())),
    };
    let max_attempts =
        get("APPROVAL_WEBHOOK_MAX_ATTEMPTS").map_or(u64::from(DEFAULT_MAX_ATTEMPTS), |v| {
            number(
                "APPROVAL_WEBHOOK_MAX_ATTEMPTS",
                v,
                1,
                u64::from(MAX_ATTEMPTS_LIMIT),
                p,
            )
        });
    let backoff_ms = get("APPROVAL_WEBHOOK_BACKOFF_BASE_MS").map_or(
        u64::try_from(DEFAULT_BACKOFF_BASE.as_millis()).unwrap_or(1000),
        |v| number("APPROVAL_WEBHOOK_BACKOFF_BASE_MS", v, 1, 60_000, p),
    );
    let timeout = get("APPROVAL_WEBHOOK_TIMEOUT").map_or(DEFAULT_ATTEMPT_TIMEOUT.as_secs(), |v| {
        number("APPROVAL_WEBHOOK_TIMEOUT", v, 1, 120, p)
    });
    let ca_file = get("APPROVAL_WEBHOOK_CA_FILE")
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let mut s = WebhookSettings::new(url?, secret?);
    s.max_attempts = u32::try_from(max_attempts).unwrap_or(DEFAULT_MAX_ATTEMPTS);
    s.backoff_base = Duration::from_millis(backoff_ms);
    s.attempt_timeout = Duration::from_secs(timeout);
    s.ca_file = ca_file;
    Some(s)
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// The configuration, built once from the process environment (the only
    /// module that reads it). In development, missing keys come from (or are
    /// generated into) the data dir's owner-only key file first; `logging`
    /// is set up before that (so the key warnings are seen) and again once
    /// the final configuration is known.
    pub fn load(logging: &dyn Fn(&Config)) -> Result<Config, LoadError> {
        let mut vars: BTreeMap<String, String> = std::env::vars().collect();
        let first = Config::from_vars(&vars);
        if let Ok(c) = &first
            && c.environment == Environment::Development
        {
            logging(c);
            crate::keys::load_or_generate_dev_keys(&c.data_dir, &mut vars)?;
        }
        let config = Config::from_vars(&vars)?;
        if first.is_err() || config.environment == Environment::Production {
            logging(&config);
        }
        Ok(config)
    }

    /// Parses `vars` (the environment), reporting every problem at once. In
    /// production every key must be present; in development missing keys are
    /// generated later (see `keys::load_or_generate`).
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let mut p = Vec::new();
        let get = |n: &str| vars.get(n).map(String::as_str);
        let environment = match get("ARAGORA_ENV").map(|v| v.trim().to_ascii_lowercase()) {
            None => Environment::Development,
            Some(v) if v == "production" || v == "prod" => Environment::Production,
            Some(v) if v == "development" || v == "dev" || v.is_empty() => Environment::Development,
            Some(v) => {
                p.push(format!(
                    "ARAGORA_ENV must be production or development, got {v:?}"
                ));
                Environment::Development
            }
        };
        let bind = match get("ARAGORA_BIND")
            .unwrap_or("127.0.0.1:8080")
            .trim()
            .parse()
        {
            Ok(a) => a,
            Err(_) => {
                p.push(format!(
                    "ARAGORA_BIND must be an address like 127.0.0.1:8080, got {:?}",
                    get("ARAGORA_BIND").unwrap_or_default()
                ));
                SocketAddr::from(([127, 0, 0, 1], 8080))
            }
        };
        let log_level = get("ARAGORA_LOG_LEVEL")
            .unwrap_or("info")
            .trim()
            .to_ascii_lowercase();
        if !["trace", "debug", "info", "warn", "error"].contains(&log_level.as_str()) {
            p.push(format!(
                "ARAGORA_LOG_LEVEL must be one of trace, debug, info, warn, error, got {log_level:?}"
            ));
        }
        let log_json =
            get("ARAGORA_LOG_JSON").is_some_and(|v| boolean("ARAGORA_LOG_JSON", v, &mut p));
        let maintenance_read_only =
            get("MAINTENANCE_MODE").is_some_and(|v| v.trim().eq_ignore_ascii_case("read-only"));
        let maintenance_mode = !maintenance_read_only
            && get("MAINTENANCE_MODE").is_some_and(|v| boolean("MAINTENANCE_MODE", v, &mut p));
        let maintenance_boot = match (maintenance_read_only, maintenance_mode) {
            (true, _) => crate::maintenance::MaintenanceMode::ReadOnly,
            (false, true) => crate::maintenance::MaintenanceMode::On,
            (false, false) => crate::maintenance::MaintenanceMode::Off,
        };
        let ttl =
            get("RBAC_CACHE_TTL").map_or(300, |v| number("RBAC_CACHE_TTL", v, 0, 86_400, &mut p));
        let per_ip = get("AUTH_RATE_LIMIT_PER_IP").map_or(10, |v| {
            number("AUTH_RATE_LIMIT_PER_IP", v, 1, 1_000_000, &mut p)
        });
        let window = get("AUTH_RATE_LIMIT_WINDOW").map_or(60, |v| {
            number("AUTH_RATE_LIMIT_WINDOW", v, 1, 86_400, &mut p)
        });
        let key = |name: &'static str, p: &mut Vec<String>| match parse_key(name, get(name)) {
            Ok(k) => Some(k),
            Err(KeyProblem::Missing(_)) if environment == Environment::Development => None,
            Err(e) => {
                p.push(e.to_string());
                None
            }
        };
        // Missing is allowed in production too: the server starts sealed
        // (`encryption::KeyRing`), which a malformed key never does.
        let encryption_key =
            match parse_key("ARAGORA_ENCRYPTION_KEY", get("ARAGORA_ENCRYPTION_KEY")) {
                Ok(k) => Some(k),
                Err(KeyProblem::Missing(_)) => None,
                Err(e) => {
                    p.push(e.to_string());
                    None
                }
            };
        // Optional everywhere; malformed stops boot like the current key.
        let encryption_key_previous = match parse_key(
            "ARAGORA_ENCRYPTION_KEY_PREVIOUS",
            get("ARAGORA_ENCRYPTION_KEY_PREVIOUS"),
        ) {
            Ok(k) => Some(k),
            Err(KeyProblem::Missing(_)) => None,
            Err(e) => {
                p.push(e.to_string());
                None
            }
        };
        if let (Some(cur), Some(prev)) = (&encryption_key, &encryption_key_previous)
            && *cur.0 == *prev.0
        {
            p.push(
                "ARAGORA_ENCRYPTION_KEY_PREVIOUS is the same key as ARAGORA_ENCRYPTION_KEY \
                 (unset it, or set it to the master key before this one)"
                    .into(),
            );
        }
        let pool_size = get("ARAGORA_DATABASE_POOL_SIZE")
            .map_or(crate::store::postgres::DEFAULT_POOL_SIZE as u64, |v| {
                number("ARAGORA_DATABASE_POOL_SIZE", v, 1, 1000, &mut p)
            }) as usize;
        let database_url = get("DATABASE_URL").map(str::trim).filter(|v| !v.is_empty());
        let ca_file = get("ARAGORA_DATABASE_CA_FILE")
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let database = match database_url {
            None => None,
            Some(url) => match crate::store::postgres::describe_url(url).and_then(|target| {
                crate::store::postgres_tls::tls_mode(url).map(|(mode, _)| (target, mode))
            }) {
                Ok((target, mode)) => {
                    if ca_file.is_some() && mode == crate::store::postgres_tls::TlsMode::Disabled {
                        p.push(
                            "ARAGORA_DATABASE_CA_FILE is set but DATABASE_URL does not ask for \
                             TLS: add sslmode=verify-full (or require) to it"
                                .into(),
                        );
                    }
                    Some(DatabaseSettings {
                        url: SecretString::new(url.to_string()),
                        target,
                        pool_size,
                        ca_file: ca_file.clone(),
                    })
                }
                // The message names the variable, never its value (a password).
                Err(e) => {
                    p.push(e.to_string().replace("store error: ", ""));
                    None
                }
            },
        };
        // The embedded store's keys: not needed when PostgreSQL holds the state.
        let aedb_key = |name: &'static str, p: &mut Vec<String>| match parse_key(name, get(name)) {
            Ok(k) => Some(k),
            Err(KeyProblem::Missing(_)) if database_url.is_some() => None,
            Err(_) => key(name, p),
        };
        let aedb_manifest_key = aedb_key("AEDB_MANIFEST_KEY", &mut p);
        let aedb_checkpoint_key = aedb_key("AEDB_CHECKPOINT_KEY", &mut p);
        let optional_key =
            |name: &'static str, p: &mut Vec<String>| match parse_key(name, get(name)) {
                Ok(k) => Some(k),
                Err(KeyProblem::Missing(_)) => None,
                Err(e) => {
                    p.push(e.to_string());
                    None
                }
            };
        let aedb_previous_manifest_key = optional_key("AEDB_PREVIOUS_MANIFEST_KEY", &mut p);
        let aedb_previous_checkpoint_key = optional_key("AEDB_PREVIOUS_CHECKPOINT_KEY", &mut p);
        for (previous, current, names) in [
            (
                &aedb_previous_manifest_key,
                &aedb_manifest_key,
                "AEDB_PREVIOUS_MANIFEST_KEY is the same key as AEDB_MANIFEST_KEY",
            ),
            (
                &aedb_previous_checkpoint_key,
                &aedb_checkpoint_key,
                "AEDB_PREVIOUS_CHECKPOINT_KEY is the same key as AEDB_CHECKPOINT_KEY",
            ),
        ] {
            if let (Some(prev), Some(cur)) = (previous, current)
                && *prev.0 == *cur.0
            {
                p.push(format!(
                    "{names} (unset it, or set it to the key before this one)"
                ));
            }
        }
        let jwt_secret = get("JWT_SECRET")
            .filter(|s| !s.is_empty())
            .map(|s| SecretString::new(s.to_string()));
        match &jwt_secret {
            None if environment == Environment::Production => {
                p.push("JWT_SECRET is not set".into())
            }
            Some(s) if s.len() < 32 => p.push(format!(
                "JWT_SECRET must be at least 32 characters, got {}",
                s.len()
            )),
            _ => {}
        }
        let jwt_secret_previous = get("JWT_SECRET_PREVIOUS")
            .filter(|s| !s.is_empty())
            .map(|s| SecretString::new(s.to_string()));
        if let Some(s) = &jwt_secret_previous
            && s.len() < 32
        {
            p.push(format!(
                "JWT_SECRET_PREVIOUS must be at least 32 characters, got {}",
                s.len()
            ));
        }
        let token_ttl = get("ARAGORA_TOKEN_TTL").map_or(3600, |v| {
            number("ARAGORA_TOKEN_TTL", v, 60, 30 * 86_400, &mut p)
        });
        let lockout_threshold = get("AUTH_LOCKOUT_THRESHOLD")
            .map_or(5, |v| number("AUTH_LOCKOUT_THRESHOLD", v, 1, 1000, &mut p));
        let lockout_base = get("AUTH_LOCKOUT_SECONDS")
            .map_or(60, |v| number("AUTH_LOCKOUT_SECONDS", v, 1, 86_400, &mut p));
        let lockout_max = get("AUTH_LOCKOUT_MAX_SECONDS").map_or(3600, |v| {
            number("AUTH_LOCKOUT_MAX_SECONDS", v, 1, 30 * 86_400, &mut p)
        });
        if lockout_max < lockout_base {
            p.push(format!(
                "AUTH_LOCKOUT_MAX_SECONDS ({lockout_max}) must not be below AUTH_LOCKOUT_SECONDS ({lockout_base})"
            ));
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
        let password_hash_concurrency = get("ARAGORA_PASSWORD_HASH_CONCURRENCY")
            .map_or(cores, |v| {
                number("ARAGORA_PASSWORD_HASH_CONCURRENCY", v, 1, 256, &mut p)
            });
        let audit_export_dir = get("ARAGORA_AUDIT_EXPORT_DIR")
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        if let Some(d) = &audit_export_dir
            && !d.is_absolute()
        {
            p.push(format!(
                "ARAGORA_AUDIT_EXPORT_DIR must be an absolute path, got {}",
                d.display()
            ));
        }
        let audit_export_interval = get("ARAGORA_AUDIT_EXPORT_INTERVAL").map_or(3600, |v| {
            number("ARAGORA_AUDIT_EXPORT_INTERVAL", v, 10, 7 * 86_400, &mut p)
        });
        let audit_retention = get("ARAGORA_AUDIT_RETENTION")
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .and_then(|v| {
                crate::clock::parse_duration("ARAGORA_AUDIT_RETENTION", v)
                    .map_err(|e| p.push(e))
                    .ok()
            });
        if audit_retention.is_some() && audit_export_dir.is_none() {
            // Entries are removed only once an export holds them: without a
            // scheduled export nothing would ever be.
            p.push(
                "ARAGORA_AUDIT_RETENTION needs ARAGORA_AUDIT_EXPORT_DIR: entries are removed \
                 only after a verified export there holds them"
                    .into(),
            );
        }
        let key_destroy_grace = get("ARAGORA_KEY_DESTROY_GRACE")
            .map_or(DEFAULT_KEY_DESTROY_GRACE, |v| {
                number("ARAGORA_KEY_DESTROY_GRACE", v, 0, 10 * 365 * 86_400, &mut p)
            });
        let auth_failure_audit_window = get("ARAGORA_AUTH_FAILURE_AUDIT_WINDOW").map_or(10, |v| {
            number("ARAGORA_AUTH_FAILURE_AUDIT_WINDOW", v, 1, 3600, &mut p)
        });
        let approvals =
            crate::approvals::ApprovalSettings::from_lookup(|k| get(k).map(str::to_owned))
                .unwrap_or_else(|e| {
                    p.push(e);
                    crate::approvals::ApprovalSettings::default()
                });
        let approval_webhook = webhook(&get, &mut p);
        let mut trusted_proxies = Vec::new();
        for part in get("ARAGORA_TRUSTED_PROXIES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match crate::net::parse_net(part) {
                Some(net) => trusted_proxies.push(net),
                None => p.push(format!(
                    "ARAGORA_TRUSTED_PROXIES must be comma-separated IP addresses or CIDR networks (10.0.0.0/8), {part:?} is not one"
                )),
            }
        }
        let ipv6_prefix_len = get("ARAGORA_IPV6_PREFIX_LEN")
            .map_or(u64::from(crate::net::DEFAULT_IPV6_PREFIX_LEN), |v| {
                number("ARAGORA_IPV6_PREFIX_LEN", v, 32, 128, &mut p)
            });
        let file = |name: &str| {
            get(name)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let tls = match (file("ARAGORA_TLS_CERT_FILE"), file("ARAGORA_TLS_KEY_FILE")) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                p.push("ARAGORA_TLS_CERT_FILE is set but ARAGORA_TLS_KEY_FILE is not (set both or neither)".into());
                None
            }
            (None, Some(_)) => {
                p.push("ARAGORA_TLS_KEY_FILE is set but ARAGORA_TLS_CERT_FILE is not (set both or neither)".into());
                None
            }
        };
        let tls_terminated_upstream = get("ARAGORA_TLS_TERMINATED_UPSTREAM")
            .is_some_and(|v| boolean("ARAGORA_TLS_TERMINATED_UPSTREAM", v, &mut p));
        // Tokens, passwords and secrets cross this listener: in production
        // they must not travel in clear beyond this machine.
        if environment == Environment::Production
            && tls.is_none()
            && !tls_terminated_upstream
            && !crate::net::normalize(bind.ip()).is_loopback()
        {
            p.push(format!(
                "ARAGORA_ENV=production with ARAGORA_BIND={bind} (not loopback) requires TLS: set \
                 ARAGORA_TLS_CERT_FILE and ARAGORA_TLS_KEY_FILE, or ARAGORA_TLS_TERMINATED_UPSTREAM=true \
                 when a proxy in front of aragora terminates TLS"
            ));
        }
        let request_timeout = get("ARAGORA_REQUEST_TIMEOUT").map_or(30, |v| {
            number("ARAGORA_REQUEST_TIMEOUT", v, 1, 3600, &mut p)
        });
        let migration_batch_size = get("ARAGORA_MIGRATION_BATCH_SIZE").map_or(1000, |v| {
            number("ARAGORA_MIGRATION_BATCH_SIZE", v, 1, 100_000, &mut p)
        });
        let crash_after_migration_batches = get("ARAGORA_MIGRATION_STOP_AFTER_BATCHES")
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                number(
                    "ARAGORA_MIGRATION_STOP_AFTER_BATCHES",
                    v,
                    1,
                    u64::MAX,
                    &mut p,
                )
            });
        let backup_incremental_interval = get("ARAGORA_BACKUP_INCREMENTAL_INTERVAL").map_or(
            DEFAULT_BACKUP_INCREMENTAL_INTERVAL,
            |v| {
                number(
                    "ARAGORA_BACKUP_INCREMENTAL_INTERVAL",
                    v,
                    1,
                    30 * 86_400,
                    &mut p,
                )
            },
        );
        let backup_full_interval = get("ARAGORA_BACKUP_FULL_INTERVAL")
            .map_or(DEFAULT_BACKUP_FULL_INTERVAL, |v| {
                number("ARAGORA_BACKUP_FULL_INTERVAL", v, 1, 365 * 86_400, &mut p)
            });
        let backup_retain_full = get("ARAGORA_BACKUP_RETAIN_FULL")
            .map_or(DEFAULT_BACKUP_RETAIN_FULL, |v| {
                number("ARAGORA_BACKUP_RETAIN_FULL", v, 1, 10_000, &mut p)
            });
        let backup = file("ARAGORA_BACKUP_DIR").map(|dir| BackupSchedule {
            dir,
            incremental_interval: Duration::from_secs(backup_incremental_interval),
            full_interval: Duration::from_secs(backup_full_interval),
            retain_full: backup_retain_full as usize,
        });
        let job_gate = file("ARAGORA_TEST_JOB_GATE");
        let approval_crash = match get("ARAGORA_TEST_APPROVAL_CRASH").map(str::trim) {
            None | Some("") => None,
            Some("before_execution") => Some(FaultPoint::ApprovalBeforeExecution),
            Some("after_job") => Some(FaultPoint::ApprovalAfterJob),
            Some(other) => {
                p.push(format!(
                    "ARAGORA_TEST_APPROVAL_CRASH={other:?} is not before_execution or after_job"
                ));
                None
            }
        };
        let redis_url = get("REDIS_URL")
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .and_then(|v| {
                if v.starts_with("redis://") || v.starts_with("rediss://") {
                    Some(SecretString::new(v.to_string()))
                } else {
                    p.push(format!(
                        "REDIS_URL must start with redis:// or rediss:// (host {})",
                        crate::redis_link::redacted_host(v)
                    ));
                    None
                }
            });
        if !p.is_empty() {
            return Err(ConfigError { problems: p });
        }
        Ok(Self {
            bind,
            data_dir: PathBuf::from(get("ARAGORA_DATA_DIR").unwrap_or("./data")),
            log_level,
            log_json,
            environment,
            maintenance_mode,
            maintenance_boot,
            rbac_cache_ttl: Duration::from_secs(ttl),
            auth_rate_limit_per_ip: per_ip as u32,
            auth_rate_limit_window: Duration::from_secs(window),
            encryption_key,
            encryption_key_previous,
            jwt_secret,
            jwt_secret_previous,
            aedb_manifest_key,
            aedb_checkpoint_key,
            token_ttl: Duration::from_secs(token_ttl),
            lockout_threshold: lockout_threshold as u32,
            lockout_base: Duration::from_secs(lockout_base),
            lockout_max: Duration::from_secs(lockout_max),
            trusted_proxies,
            client_nets: ClientNets {
                ipv6_prefix_len: ipv6_prefix_len as u8,
            },
            tls,
            tls_terminated_upstream,
            request_timeout: Duration::from_secs(request_timeout),
            password_hash_concurrency: password_hash_concurrency as usize,
            auth_failure_audit_window: Duration::from_secs(auth_failure_audit_window),
            approvals,
            approval_webhook,
            migration_batch_size: migration_batch_size as usize,
            key_destroy_grace: Duration::from_secs(key_destroy_grace),
            audit_export_dir,
            audit_export_interval: Duration::from_secs(audit_export_interval),
            audit_retention,
            backup,
            redis_url,
            faults: FaultPlan {
                crash_after_migration_batches,
                job_gate,
                approval_crash,
            },
            database,
            aedb_previous_manifest_key,
            aedb_previous_checkpoint_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn development_defaults() {
        let c = Config::from_vars(&vars(&[])).expect("defaults");
        assert_eq!(c.bind, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(c.environment, Environment::Development);
        assert!(c.encryption_key.is_none());
    }

    #[test]
    fn production_names_every_missing_key() {
        let e =
            Config::from_vars(&vars(&[("ARAGORA_ENV", "production")])).expect_err("keys missing");
        for name in ["AEDB_MANIFEST_KEY", "AEDB_CHECKPOINT_KEY", "JWT_SECRET"] {
            assert!(
                e.problems.iter().any(|p| p.contains(name)),
                "{name} not named: {e}"
            );
        }
    }

    #[test]
    fn bad_values_are_named_and_secrets_not_echoed() {
        let e = Config::from_vars(&vars(&[
            ("ARAGORA_ENCRYPTION_KEY", "abcd"),
            ("AEDB_MANIFEST_KEY", &"zz".repeat(32)),
            ("RBAC_CACHE_TTL", "soon"),
            ("MAINTENANCE_MODE", "maybe"),
            ("ARAGORA_BIND", "localhost"),
        ]))
        .expect_err("bad values");
        let text = e.to_string();
        assert!(text.contains(
            "ARAGORA_ENCRYPTION_KEY must be 64 hex characters (32 bytes), got 4 characters"
        ));
        assert!(text.contains("AEDB_MANIFEST_KEY is not valid hex"));
        assert!(
            !text.contains("zzzz"),
            "key material must not be echoed: {text}"
        );
        assert!(text.contains("RBAC_CACHE_TTL must be a whole number"));
        assert!(text.contains("MAINTENANCE_MODE must be true or false"));
        assert!(text.contains("ARAGORA_BIND must be an address"));
    }

    #[test]
    fn audit_retention_is_a_duration_and_needs_the_export_dir() {
        let c = Config::from_vars(&vars(&[
            ("ARAGORA_AUDIT_RETENTION", "90d"),
            ("ARAGORA_AUDIT_EXPORT_DIR", "/var/lib/aragora/audit"),
        ]))
        .expect("valid");
        assert_eq!(c.audit_retention, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(
            Config::from_vars(&vars(&[]))
                .expect("defaults")
                .audit_retention,
            None
        );
        let e = Config::from_vars(&vars(&[
            ("ARAGORA_AUDIT_RETENTION", "forever"),
            ("ARAGORA_AUDIT_EXPORT_DIR", "/var/lib/aragora/audit"),
        ]))
        .expect_err("not a duration");
        assert!(e.to_string().contains("ARAGORA_AUDIT_RETENTION"), "{e}");
        let e = Config::from_vars(&vars(&[("ARAGORA_AUDIT_RETENTION", "30d")]))
            .expect_err("no export dir");
        assert!(
            e.to_string()
                .contains("ARAGORA_AUDIT_RETENTION needs ARAGORA_AUDIT_EXPORT_DIR"),
            "{e}"
        );
    }

    #[test]
    fn debug_output_redacts_keys() {
        let k = parse_key("X", Some(&"ab".repeat(32))).expect("key");
        assert_eq!(format!("{k:?}"), "Key32(<redacted>)");
    }

    fn production(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let key = "ab".repeat(32);
        let mut v = vars(&[
            ("ARAGORA_ENV", "production"),
            ("ARAGORA_ENCRYPTION_KEY", &key),
            ("AEDB_MANIFEST_KEY", &key),
            ("AEDB_CHECKPOINT_KEY", &key),
            ("JWT_SECRET", "a-jwt-secret-of-at-least-32-characters"),
        ]);
        v.extend(vars(extra));
        v
    }

    #[test]
    fn database_url_replaces_the_embedded_store_keys_and_is_never_echoed() {
        let mut v = production(&[(
            "DATABASE_URL",
            "postgres://aragora:pw-sekrit@db.internal:6543/aragora",
        )]);
        v.remove("AEDB_MANIFEST_KEY");
        v.remove("AEDB_CHECKPOINT_KEY");
        let c = Config::from_vars(&v).expect("PostgreSQL needs no aedb keys");
        let db = c.database.as_ref().expect("database settings");
        assert_eq!(db.target, "db.internal:6543/aragora");
        assert_eq!(db.pool_size, crate::store::postgres::DEFAULT_POOL_SIZE);
        assert!(
            !format!("{c:?}").contains("pw-sekrit"),
            "Debug hides the URL"
        );

        let e = Config::from_vars(&production(&[
            (
                "DATABASE_URL",
                "postgres://aragora:pw-sekrit@db:notaport/aragora",
            ),
            ("ARAGORA_DATABASE_POOL_SIZE", "0"),
        ]))
        .expect_err("bad database settings");
        let text = e.to_string();
        assert!(
            text.contains("DATABASE_URL is not a PostgreSQL connection string"),
            "{text}"
        );
        assert!(
            text.contains("ARAGORA_DATABASE_POOL_SIZE must be between 1"),
            "{text}"
        );
        assert!(!text.contains("pw-sekrit"), "never the password: {text}");
    }

    #[test]
    fn production_without_the_master_key_loads_to_start_sealed_but_a_malformed_one_is_refused() {
        let mut v = production(&[]);
        v.remove("ARAGORA_ENCRYPTION_KEY");
        let c = Config::from_vars(&v).expect("a missing master key starts sealed");
        assert!(c.encryption_key.is_none());
        for (bad, named) in [
            ("abcd", "ARAGORA_ENCRYPTION_KEY must be 64 hex characters"),
            (&*"zz".repeat(32), "ARAGORA_ENCRYPTION_KEY is not valid hex"),
        ] {
            let e = Config::from_vars(&production(&[("ARAGORA_ENCRYPTION_KEY", bad)]))
                .expect_err("malformed")
                .to_string();
            assert!(e.contains(named), "{e}");
        }
    }

    #[test]
    fn the_previous_master_key_is_optional_validated_and_redacted() {
        let c = Config::from_vars(&production(&[])).expect("no previous key");
        assert!(c.encryption_key_previous.is_none());
        let previous = "cd".repeat(32);
        let c = Config::from_vars(&production(&[(
            "ARAGORA_ENCRYPTION_KEY_PREVIOUS",
            &previous,
        )]))
        .expect("a previous key");
        assert!(c.encryption_key_previous.is_some());
        let shown = format!("{c:?}");
        assert!(!shown.contains(&previous), "{shown}");
        for (bad, named) in [
            (
                "abcd",
                "ARAGORA_ENCRYPTION_KEY_PREVIOUS must be 64 hex characters",
            ),
            (
                &*"zz".repeat(32),
                "ARAGORA_ENCRYPTION_KEY_PREVIOUS is not valid hex",
            ),
            (
                &*"ab".repeat(32),
                "ARAGORA_ENCRYPTION_KEY_PREVIOUS is the same key",
            ),
        ] {
            let e = Config::from_vars(&production(&[("ARAGORA_ENCRYPTION_KEY_PREVIOUS", bad)]))
                .expect_err("refused")
                .to_string();
            assert!(e.contains(named), "{e}");
            assert!(!e.contains(bad), "the value is never shown: {e}");
        }
    }

    #[test]
    fn production_beyond_loopback_needs_tls() {
        let e = Config::from_vars(&production(&[("ARAGORA_BIND", "0.0.0.0:8080")]))
            .expect_err("plain HTTP beyond loopback")
            .to_string();
        assert!(
            e.contains("ARAGORA_TLS_CERT_FILE") && e.contains("ARAGORA_TLS_TERMINATED_UPSTREAM"),
            "{e}"
        );
        for ok in [
            vec![("ARAGORA_BIND", "127.0.0.1:8080")],
            vec![("ARAGORA_BIND", "[::1]:8080")],
            vec![
                ("ARAGORA_BIND", "0.0.0.0:8080"),
                ("ARAGORA_TLS_TERMINATED_UPSTREAM", "true"),
            ],
            vec![
                ("ARAGORA_BIND", "0.0.0.0:8443"),
                ("ARAGORA_TLS_CERT_FILE", "/etc/aragora/tls.crt"),
                ("ARAGORA_TLS_KEY_FILE", "/etc/aragora/tls.key"),
            ],
        ] {
            let c = Config::from_vars(&production(&ok)).expect("allowed");
            assert_eq!(c.clients_use_https(), !c.bind.ip().is_loopback(), "{ok:?}");
        }
        // Development may listen anywhere in plain HTTP.
        assert!(Config::from_vars(&vars(&[("ARAGORA_BIND", "0.0.0.0:8080")])).is_ok());
    }

    #[test]
    fn network_and_tls_variables_are_validated() {
        let e = Config::from_vars(&vars(&[
            ("ARAGORA_TLS_CERT_FILE", "/tmp/cert.pem"),
            ("ARAGORA_IPV6_PREFIX_LEN", "130"),
            ("ARAGORA_TLS_TERMINATED_UPSTREAM", "sure"),
            ("ARAGORA_REQUEST_TIMEOUT", "0"),
            ("ARAGORA_TRUSTED_PROXIES", "10.0.0.0/8, 10.0.0.0/99"),
        ]))
        .expect_err("bad values")
        .to_string();
        for name in [
            "ARAGORA_TLS_KEY_FILE",
            "ARAGORA_IPV6_PREFIX_LEN",
            "ARAGORA_TLS_TERMINATED_UPSTREAM",
            "ARAGORA_REQUEST_TIMEOUT",
            "\"10.0.0.0/99\"",
        ] {
            assert!(e.contains(name), "{name} not named: {e}");
        }
        let c = Config::from_vars(&vars(&[
            (
                "ARAGORA_TRUSTED_PROXIES",
                "10.42.0.0/16, ::ffff:127.0.0.1,fd00::/8",
            ),
            ("ARAGORA_IPV6_PREFIX_LEN", "56"),
        ]))
        .expect("valid");
        let nets: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.42.0.0/16", "127.0.0.1/32", "fd00::/8"]);
        assert_eq!(c.client_nets.ipv6_prefix_len, 56);
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert!(c.tls.is_none() && !c.clients_use_https());
    }

    #[test]
    fn the_whole_config_debug_shows_no_secret() {
        let key = "ab".repeat(32);
        let jwt = "a-jwt-secret-of-at-least-32-characters!";
        let c = Config::from_vars(&vars(&[
            ("ARAGORA_ENCRYPTION_KEY", &key),
            ("AEDB_MANIFEST_KEY", &"cd".repeat(32)),
            ("AEDB_CHECKPOINT_KEY", &"ef".repeat(32)),
            ("JWT_SECRET", jwt),
            (
                "JWT_SECRET_PREVIOUS",
                "the-previous-jwt-secret-also-32-chars!!",
            ),
        ]))
        .expect("valid");
        let shown = format!("{c:?}");
        for secret in [
            key.as_str(),
            &"cd".repeat(32),
            &"ef".repeat(32),
            jwt,
            "the-previous-jwt-secret",
        ] {
            assert!(!shown.contains(secret), "Debug shows a secret: {shown}");
        }
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn the_approval_webhook_is_validated_without_echoing_url_or_secret() {
        let secret = "a-webhook-secret-of-at-least-32-bytes!";
        let c = Config::from_vars(&vars(&[
            ("APPROVAL_WEBHOOK_URL", "https://hooks.example.com/t/TOKEN"),
            ("APPROVAL_WEBHOOK_SECRET", secret),
            ("APPROVAL_WEBHOOK_MAX_ATTEMPTS", "3"),
            ("APPROVAL_WEBHOOK_BACKOFF_BASE_MS", "20"),
        ]))
        .expect("valid");
        let w = c.approval_webhook.as_ref().expect("configured");
        assert_eq!(w.max_attempts, 3);
        assert_eq!(w.backoff_base, Duration::from_millis(20));
        assert_eq!(w.secret.expose(), secret);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains(secret) && !shown.contains("TOKEN"),
            "{shown}"
        );
        assert!(
            Config::from_vars(&vars(&[]))
                .expect("defaults")
                .approval_webhook
                .is_none()
        );

        for (pairs, name) in [
            (
                vec![
                    ("APPROVAL_WEBHOOK_URL", "hooks.example.com/TOKEN"),
                    ("APPROVAL_WEBHOOK_SECRET", secret),
                ],
                "APPROVAL_WEBHOOK_URL",
            ),
            (
                vec![("APPROVAL_WEBHOOK_URL", "http://127.0.0.1:9/TOKEN")],
                "APPROVAL_WEBHOOK_SECRET",
            ),
            (
                vec![
                    ("APPROVAL_WEBHOOK_URL", "http://127.0.0.1:9/TOKEN"),
                    ("APPROVAL_WEBHOOK_SECRET", "short-secret-value"),
                ],
                "APPROVAL_WEBHOOK_SECRET",
            ),
            (
                vec![
                    ("APPROVAL_WEBHOOK_URL", "http://127.0.0.1:9/TOKEN"),
                    ("APPROVAL_WEBHOOK_SECRET", secret),
                    ("APPROVAL_WEBHOOK_MAX_ATTEMPTS", "0"),
                ],
                "APPROVAL_WEBHOOK_MAX_ATTEMPTS",
            ),
        ] {
            let e = Config::from_vars(&vars(&pairs))
                .expect_err("refused")
                .to_string();
            assert!(e.contains(name), "{name} not named: {e}");
            assert!(
                !e.contains("TOKEN") && !e.contains("short-secret-value") && !e.contains(secret),
                "{e}"
            );
        }
    }

    #[test]
    fn migration_sizes_and_the_fault_plan_are_read_and_validated() {
        let c = Config::from_vars(&vars(&[
            ("ARAGORA_MIGRATION_BATCH_SIZE", "25"),
            ("ARAGORA_MIGRATION_STOP_AFTER_BATCHES", "3"),
        ]))
        .expect("valid");
        assert_eq!(c.migration_batch_size, 25);
        assert_eq!(c.faults.crash_after_migration_batches, Some(3));
        let d = Config::from_vars(&vars(&[])).expect("defaults");
        assert_eq!(d.migration_batch_size, 1000);
        assert_eq!(d.faults, FaultPlan::default());
        // Not a crash point: passing it does nothing.
        c.faults
            .at(FaultPoint::MigrationBatchDurable { batches: 2 });
        let e = Config::from_vars(&vars(&[("ARAGORA_MIGRATION_BATCH_SIZE", "0")]))
            .expect_err("zero batch")
            .to_string();
        assert!(e.contains("ARAGORA_MIGRATION_BATCH_SIZE"), "{e}");
    }

    #[test]
    fn the_previous_aedb_keys_are_optional_validated_and_redacted() {
        let c = Config::from_vars(&production(&[])).expect("no previous keys");
        assert!(c.aedb_previous_manifest_key.is_none() && c.aedb_previous_checkpoint_key.is_none());
        let previous = "cd".repeat(32);
        let c = Config::from_vars(&production(&[
            ("AEDB_PREVIOUS_MANIFEST_KEY", &previous),
            ("AEDB_PREVIOUS_CHECKPOINT_KEY", &previous),
        ]))
        .expect("previous keys");
        assert_eq!(
            c.aedb_previous_manifest_key.as_ref().map(Key32::bytes),
            Some([0xcd; 32])
        );
        assert_eq!(
            c.aedb_previous_checkpoint_key.as_ref().map(Key32::bytes),
            Some([0xcd; 32])
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains(&previous), "{shown}");
        for name in ["AEDB_PREVIOUS_MANIFEST_KEY", "AEDB_PREVIOUS_CHECKPOINT_KEY"] {
            for (bad, named) in [
                ("abcd", format!("{name} must be 64 hex characters")),
                (&*"zz".repeat(32), format!("{name} is not valid hex")),
                (&*"ab".repeat(32), format!("{name} is the same key")),
            ] {
                let e = Config::from_vars(&production(&[(name, bad)]))
                    .expect_err("refused")
                    .to_string();
                assert!(e.contains(&named), "{e}");
                assert!(!e.contains(bad), "the value is never shown: {e}");
            }
        }
    }
}
