//! deploy/prometheus: the alert rules against our runbook edition (one
//! heading per alert with its severity and `for:`, anchors that exist, the
//! original's thresholds), against promtool (syntax and unit tests, every
//! alert tested firing and not firing), and against a real server's /metrics
//! (every series the unit tests feed the rules is one aragora exports, with
//! the labels it really has).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aragora::metrics::Metrics;
use aragora::rbac::catalogue::PERMISSIONS;
use aragora::store::embedded::{BOOTSTRAP_ADMIN, SERVICE_CALLER};
use aragora::store::{EmbeddedStore, Store};
use aragora_testkit::{Request, Server, json, parse_series};
use serde_yaml_ng::Value;

const DIR: &str = "../../deploy/prometheus";
const RULES: &str = "aragora-alerts.yml";
const TESTS: &[&str] = &["aragora-alerts.test.yml", "aragora-baselines.test.yml"];
const RUNBOOK: &str = "docs/runbooks/aragora-security-operations.md";
const URL_PREFIX: &str =
    "{{ $externalLabels.runbook_base_url }}/docs/runbooks/aragora-security-operations.md#";

/// The alerts of the original runbook (its "### Alert:" headings, split at
/// " / ") and a piece of each rule that carries the original's threshold.
const ORIGINAL: &[(&str, &str)] = &[
    ("HighEncryptionLatency", "> 0.1"),
    ("EncryptionErrorsIncreasing", "[5m])) > 5"),
    ("KeyRotationFailed", "> 0"),
    ("NoActiveEncryptionKeys", "== 0"),
    ("HighRBACDenialRate", "> 0.2"),
    ("RBACDenialSpike", "> 3 *"),
    ("SensitivePermissionDenied", "> 0"),
    ("SlowRBACEvaluation", "> 0.025"),
    ("ApprovalRequestTimeout", "[1h])) > 5"),
    ("CriticalOperationPendingTooLong", "> 3600"),
    ("UnauthorizedApprovalAttempt", "> 0"),
    ("BruteForceAttemptDetected", "> 5"),
    ("JWTValidationErrors", "> 1"),
    ("UnusualSecretAccessPattern", "> 3 *"),
    ("HighSecretDecryptionRate", "> 100"),
    ("MigrationErrorsDetected", "> 0"),
];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(DIR)
}

fn yaml(file: &str) -> Value {
    let text = std::fs::read_to_string(dir().join(file)).expect(file);
    serde_yaml_ng::from_str(&text).expect("valid YAML")
}

fn all_rules() -> Vec<Value> {
    yaml(RULES)["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

/// The alerting rules (recording rules left out).
fn rules() -> Vec<Value> {
    all_rules()
        .into_iter()
        .filter(|r| r["alert"].is_string())
        .collect()
}

fn rule(name: &str) -> Value {
    rules()
        .into_iter()
        .find(|r| r["alert"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no rule {name}"))
}

fn name(r: &Value) -> &str {
    r["alert"].as_str().expect("alert name")
}

fn expr(r: &Value) -> &str {
    r["expr"].as_str().expect("expr")
}

/// Metric names (not recording rules, which have colons) an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    for prefix in ["aragora_", "aedb_"] {
        let mut i = 0;
        while let Some(pos) = expr[i..].find(prefix) {
            let start = i + pos;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            let preceded = start > 0
                && (bytes[start - 1].is_ascii_alphanumeric()
                    || matches!(bytes[start - 1], b'_' | b':'));
            if !preceded && bytes.get(end) != Some(&b':') {
                let name = &expr[start..end];
                out.insert(name.strip_suffix("_bucket").unwrap_or(name).to_string());
            }
            i = end;
        }
    }
    out
}

/// A Prometheus duration (`15s`, `5m`, `1h`, `1d`, `1h30m`) in seconds.
fn seconds(d: &str) -> u64 {
    let mut total = 0;
    let mut n = String::new();
    for c in d.chars() {
        if c.is_ascii_digit() {
            n.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => panic!("duration {d}"),
        };
        total += n.parse::<u64>().expect("number") * unit;
        n.clear();
    }
    assert!(n.is_empty(), "duration {d} without a unit");
    total
}

/// GitHub's heading anchor: lower case, punctuation dropped (hyphens and
/// underscores kept), each space a hyphen.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// One `### Alert:` section of the runbook: its anchor and, per alert it
/// names, the severity and `For:` written under it.
#[derive(Debug)]
struct Section {
    anchor: String,
    severity: String,
    for_: String,
}

/// The runbook's lines outside fenced blocks (a `# comment` in a block is not
/// a heading).
fn prose(doc: &str) -> Vec<&str> {
    let mut in_fence = false;
    doc.lines()
        .filter(|l| {
            // A fence line: backticks, then an info string without any
            // (CommonMark); "```` ```x ```` ..." is inline code in prose.
            let t = l.trim_start();
            if t.starts_with("```") && !t.trim_start_matches('`').contains('`') {
                in_fence = !in_fence;
                return false;
            }
            !in_fence
        })
        .collect()
}

fn runbook() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(RUNBOOK),
    )
    .expect("runbook edition")
}

fn anchors(doc: &str) -> BTreeSet<String> {
    prose(doc)
        .into_iter()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// The text between `**{field}:** ` and the next ` · ` (or the end).
fn field<'a>(paragraph: &'a str, name: &str) -> Option<&'a str> {
    let start = paragraph.find(&format!("**{name}:** "))? + name.len() + 6;
    let rest = &paragraph[start..];
    Some(rest.split(" · ").next().unwrap_or(rest).trim())
}

/// Splits "A / B" into one value per alert (a single value applies to all).
fn per_alert(value: &str, n: usize) -> Vec<String> {
    let parts: Vec<String> = value.split('/').map(|p| p.trim().to_string()).collect();
    if parts.len() == 1 {
        vec![parts[0].clone(); n]
    } else {
        assert_eq!(parts.len(), n, "{value:?}: one value per alert");
        parts
    }
}

fn sections() -> BTreeMap<String, Section> {
    let doc = runbook();
    let lines = prose(&doc);
    let mut out = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(heading) = line.strip_prefix("### Alert: ") else {
            continue;
        };
        let names: Vec<&str> = heading.split(" / ").map(str::trim).collect();
        // The paragraph of the first line starting "**Severity:**" after it.
        let start = lines[i + 1..]
            .iter()
            .position(|l| l.starts_with("**Severity:**"))
            .map(|p| i + 1 + p)
            .unwrap_or_else(|| panic!("{heading}: no **Severity:** line"));
        let paragraph = lines[start..]
            .iter()
            .take_while(|l| !l.trim().is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        let severity = field(&paragraph, "Severity").expect("severity");
        let for_ = field(&paragraph, "For")
            .unwrap_or_else(|| panic!("{heading}: no **For:** in {paragraph:?}"));
        let severities = per_alert(severity, names.len());
        let fors = per_alert(for_, names.len());
        for (k, n) in names.iter().enumerate() {
            out.insert(
                n.to_string(),
                Section {
                    anchor: slug(&format!("Alert: {heading}")),
                    severity: severities[k].to_lowercase(),
                    for_: fors[k].clone(),
                },
            );
        }
    }
    out
}

#[test]
fn every_alert_has_a_runbook_section_with_its_severity_and_for() {
    let rules = rules();
    let names: Vec<&str> = rules.iter().map(name).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(
        unique.len(),
        names.len(),
        "duplicate alert names: {names:?}"
    );
    let sections = sections();
    let documented: BTreeSet<&str> = sections.keys().map(String::as_str).collect();
    assert_eq!(unique, documented, "rules and runbook headings differ");
    for r in &rules {
        let n = name(r);
        let s = &sections[n];
        assert_eq!(
            r["labels"]["severity"].as_str(),
            Some(s.severity.as_str()),
            "{n}: severity differs from the runbook's"
        );
        match r["for"].as_str() {
            None => assert_eq!(s.for_, "none", "{n}: the runbook says For: {}", s.for_),
            Some(f) => assert_eq!(f, s.for_, "{n}: for differs from the runbook's"),
        }
    }
    for (n, threshold) in ORIGINAL {
        let e = expr(&rule(n)).to_string();
        assert!(e.contains(threshold), "{n}: expected {threshold:?} in {e}");
    }
    // "Critical approval pending > 1 hour" is the age of one request, not a
    // `for: 1h` over a count that a stream of short requests keeps above 0.
    let pending = rule("CriticalOperationPendingTooLong");
    assert!(expr(&pending).contains("aragora_oldest_pending_critical_approval_age_seconds"));
    assert!(pending["for"].is_null(), "the age already counts the hour");
}

/// A runbook link that leads nowhere sends the on-call reader to the top of a
/// long document in the middle of an incident; a description without the
/// value makes them open Prometheus to learn how bad it is.
#[test]
fn annotations_link_the_alerts_own_section_and_give_the_value() {
    let sections = sections();
    let anchors = anchors(&runbook());
    for r in rules() {
        let n = name(&r);
        let url = r["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{n}: runbook_url"));
        let anchor = url
            .strip_prefix(URL_PREFIX)
            .unwrap_or_else(|| panic!("{n}: {url} is not {URL_PREFIX}<anchor>"));
        assert!(
            anchors.contains(anchor),
            "{n}: no heading #{anchor} in {RUNBOOK}"
        );
        assert_eq!(
            anchor, sections[n].anchor,
            "{n}: links another alert's section"
        );
        let description = r["annotations"]["description"]
            .as_str()
            .unwrap_or_else(|| panic!("{n}: description"));
        assert!(description.contains("$value"), "{n}: {description}");
        assert!(r["annotations"]["summary"].is_string(), "{n}: summary");
    }
    assert_eq!(
        slug("Alert: RBACDenialSpike / SensitivePermissionDenied"),
        "alert-rbacdenialspike--sensitivepermissiondenied"
    );
}

/// The scrape interval is pinned in deploy/, and every range covers at
/// least two scrapes (a 1m rate over a 1m scrape has one sample: no rate).
#[test]
fn every_range_covers_at_least_two_scrapes_of_the_pinned_job() {
    let config = yaml("prometheus.yml");
    let job = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .find(|j| j["job_name"].as_str() == Some("aragora"))
        .expect("job aragora")
        .clone();
    let interval = seconds(
        job["scrape_interval"]
            .as_str()
            .expect("scrape_interval pinned"),
    );
    assert!(
        config["rule_files"]
            .as_sequence()
            .is_some_and(|f| f.iter().any(|f| f.as_str() == Some(RULES))),
        "prometheus.yml loads the rules"
    );
    assert!(
        config["global"]["external_labels"]["runbook_base_url"].is_string(),
        "the runbook_url base is configured"
    );
    for r in all_rules() {
        let e = expr(&r);
        let mut rest = e;
        while let Some(open) = rest.find('[') {
            let close = open + rest[open..].find(']').expect("closing ]");
            let range = &rest[open + 1..close];
            assert!(
                seconds(range) >= 2 * interval,
                "{e}: [{range}] is under two {interval}s scrapes"
            );
            rest = &rest[close + 1..];
        }
    }
}

#[test]
fn sensitive_permission_rule_covers_exactly_the_catalogue_sensitive_set() {
    let r = rule("SensitivePermissionDenied");
    let e = expr(&r);
    let sensitive: BTreeSet<&str> = PERMISSIONS
        .iter()
        .filter(|p| p.sensitive)
        .map(|p| p.name)
        .collect();
    let matchers: Vec<&str> = e.split("permission=~\"").skip(1).collect();
    assert_eq!(matchers.len(), 2, "{e}");
    for m in matchers {
        let set: BTreeSet<&str> = m[..m.find('"').expect("quote")].split('|').collect();
        assert_eq!(set, sensitive);
    }
}

/// aragora's bootstrap admin uses GlobalAdmin at first start and must not
/// page; its request path runs as the service caller, which must.
#[test]
fn the_global_admin_allow_list_holds_the_bootstrap_admin_only() {
    let recorded = all_rules()
        .into_iter()
        .find(|r| r["record"].as_str() == Some("aedb:global_admin_uses_unexpected:5m"))
        .expect("allow-list recording rule");
    assert_eq!(
        expr(&recorded),
        format!("aedb_global_admin_uses_5m{{caller!~\"{BOOTSTRAP_ADMIN}\"}}")
    );
    assert_ne!(SERVICE_CALLER, BOOTSTRAP_ADMIN);
    assert!(
        expr(&rule("AedbUnexpectedGlobalAdminUse"))
            .contains("aedb:global_admin_uses_unexpected:5m")
    );
}

#[test]
fn inhibitions_name_alerts_that_exist() {
    let names: BTreeSet<String> = rules().iter().map(|r| name(r).to_string()).collect();
    let inhibit = yaml("alertmanager-inhibit.yml");
    let rules = inhibit["inhibit_rules"]
        .as_sequence()
        .expect("inhibit_rules");
    assert!(!rules.is_empty());
    for r in rules {
        for side in ["source_matchers", "target_matchers"] {
            for m in r[side].as_sequence().expect(side) {
                let m = m.as_str().expect("matcher");
                let (_, value) = m.split_once('"').expect("quoted value");
                for alert in value.trim_end_matches('"').split('|') {
                    assert!(names.contains(alert), "{m}: no alert {alert}");
                }
            }
        }
    }
}

/// Every test group of the promtool files, as (input series, alert checks).
fn promtool_tests() -> Vec<Value> {
    TESTS
        .iter()
        .flat_map(|f| yaml(f)["tests"].as_sequence().expect("tests").clone())
        .collect()
}

#[test]
fn every_alert_is_unit_tested_firing_and_not_firing() {
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in promtool_tests() {
        for check in t["alert_rule_test"].as_sequence().expect("alert_rule_test") {
            let n = check["alertname"].as_str().expect("alertname").to_string();
            if check["exp_alerts"]
                .as_sequence()
                .is_some_and(|a| !a.is_empty())
            {
                firing.insert(n);
            } else {
                quiet.insert(n);
            }
        }
    }
    for r in rules() {
        let n = name(&r);
        assert!(firing.contains(n), "{n}: no unit test where it fires");
        assert!(quiet.contains(n), "{n}: no unit test where it does not");
    }
}

/// promtool's checks and the rule unit tests (Debian package `prometheus`;
/// `.ci/run` installs it). A machine without promtool runs only the checks
/// above; under `CI=true` its absence fails.
#[test]
fn promtool_checks_and_unit_tests_pass() {
    let run = |args: &[&str]| {
        std::process::Command::new("promtool")
            .args(args)
            .current_dir(dir())
            .output()
    };
    let Ok(out) = run(&["check", "rules", RULES]) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is not installed (apt-get install prometheus): CI must run the alert rule tests"
        );
        eprintln!("promtool not installed: skipped its checks (the structural checks ran)");
        return;
    };
    assert!(out.status.success(), "promtool check rules: {out:?}");
    let out = run(&["check", "config", "prometheus.yml"]).expect("promtool");
    assert!(out.status.success(), "promtool check config: {out:?}");
    let mut args = vec!["test", "rules"];
    args.extend(TESTS);
    let out = run(&args).expect("promtool");
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Labels whose values are a closed set the exporter defines: the unit tests
/// may use only values a real server has.
const CLOSED_LABELS: &[&str] = &[
    "method",
    "reason",
    "outcome",
    "cause",
    "finality",
    "operation",
    "decision",
];
/// Labels Prometheus adds at scrape time.
const TARGET_LABELS: &[&str] = &["job", "instance"];

type Labels = Vec<(String, String)>;

/// Every series of an exposition: name -> label sets.
fn exposition(text: &str) -> BTreeMap<String, Vec<Labels>> {
    let mut out: BTreeMap<String, Vec<Labels>> = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _) = l.rsplit_once(' ').expect("series value");
        let (n, labels) = parse_series(series);
        out.entry(n.to_string()).or_default().push(labels);
    }
    out
}

fn label_names(labels: &Labels) -> BTreeSet<&str> {
    labels
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !TARGET_LABELS.contains(k))
        .collect()
}

/// Writes a checkpoint of a stopped development server's store.
fn checkpoint(s: &Server) {
    let store = aragora_testkit::store::open_stopped(s);
    store
        .engine()
        .checkpoint_as(&aedb::CallerContext::new(BOOTSTRAP_ADMIN).expect("caller"))
        .expect("checkpoint");
    store.close().expect("close");
}

/// The rules' inputs are the exporter's real shape: a real server, after a
/// denial, a failed login and a secret read, exports every series the unit
/// tests feed the rules, with the same label names and closed-set values.
#[test]
fn unit_test_inputs_are_series_a_real_server_exports() {
    let mut s = Server::start(Path::new(env!("CARGO_BIN_EXE_aragora")), &[]);
    let (_, admin) = s.bootstrap_admin("admin@example.com");
    s.create_user(
        &admin,
        "viewer@example.com",
        "correct horse battery",
        &["viewer"],
    );
    let first_start = s.send(Request::new("GET", "/metrics")).body;
    let has = |text: &str, series: &str| aragora_testkit::metric_value(text, series) >= 1.0;
    // The first start created the store's project with GlobalAdmin, as the
    // bootstrap admin: the allow-listed caller, in the 5-minute window.
    assert!(
        has(
            &first_start,
            &format!("aedb_global_admin_uses_5m{{caller=\"{BOOTSTRAP_ADMIN}\"}}")
        ),
        "{first_start}"
    );
    // A checkpoint, taken with the server stopped (the store's directory
    // lock): after the restart its age is exported.
    s.stop();
    checkpoint(&s);
    s.start_once(&[]).unwrap_or_else(|e| panic!("{e}"));

    let viewer = s.login("viewer@example.com", "correct horse battery");
    // A denial of a sensitive permission.
    assert_eq!(s.get("/api/security/audit/search", &viewer).status, 403);
    // A failed login.
    let r = s.send(Request::new("POST", "/api/auth/login").json(&json!({
        "email": "viewer@example.com", "password": "wrong password here"
    })));
    assert_eq!(r.status, 401, "{}", r.body);
    // A secret written and read through the API.
    let put = s.put(
        "/api/secrets/alerts/one",
        &admin,
        &json!({"value": "v", "secret_type": "token"}),
    );
    assert!(put.status < 300, "{}", put.body);
    assert_eq!(s.get("/api/secrets/alerts/one", &admin).status, 200);
    let text = s.send(Request::new("GET", "/metrics")).body;

    // What just happened, with the labels the rules select on.
    assert!(
        has(
            &text,
            "aragora_security_rbac_denied_total{permission=\"audit.read\",role=\"viewer\"}"
        ),
        "{text}"
    );
    assert!(has(
        &text,
        "aragora_security_auth_failures_total{method=\"password\",reason=\"bad_password\"}"
    ));
    assert!(has(
        &text,
        "aragora_security_secret_reads_total{outcome=\"success\"}"
    ));
    assert!(has(&text, "aedb_commits_total"));
    assert!(text.contains("\naedb_checkpoint_age_seconds "), "{text}");

    // The Redis link's families exist on replicas with REDIS_URL only: the
    // same server restarted with one (registered at boot; no command is
    // needed for the gauge to be exported, so Redis need not answer).
    s.restart_with(&[("REDIS_URL", "redis://127.0.0.1:6379/0")]);
    let with_redis = s.send(Request::new("GET", "/metrics")).body;
    assert!(with_redis.contains("\naragora_redis_up "), "{with_redis}");

    let mut real = exposition(&text);
    for (n, labels) in exposition(&first_start)
        .into_iter()
        .chain(exposition(&with_redis))
    {
        real.entry(n).or_default().extend(labels);
    }
    let mut checked = BTreeSet::new();
    for t in promtool_tests() {
        for input in t["input_series"].as_sequence().expect("input_series") {
            let series = input["series"].as_str().expect("series");
            let (n, labels) = parse_series(series);
            if n == "up" {
                continue; // Prometheus's own, per target
            }
            let exported = real
                .get(n)
                .unwrap_or_else(|| panic!("{series}: {n} is not on a real server's /metrics"));
            let names = label_names(&labels);
            assert!(
                exported.iter().any(|l| label_names(l) == names),
                "{series}: a real {n} has labels {:?}",
                exported.iter().map(label_names).collect::<Vec<_>>()
            );
            for (k, v) in labels
                .iter()
                .filter(|(k, _)| CLOSED_LABELS.contains(&k.as_str()))
            {
                assert!(
                    exported
                        .iter()
                        .any(|l| l.iter().any(|(k2, v2)| k2 == k && v2 == v)),
                    "{series}: a real {n} never has {k}=\"{v}\""
                );
            }
            checked.insert(n.to_string());
        }
    }
    // Every metric a rule reads is fed to some unit test, so the check above
    // covers every rule input.
    for r in all_rules() {
        for m in metric_names(expr(&r)) {
            let fed = checked.contains(&m) || checked.contains(&format!("{m}_bucket"));
            assert!(fed, "{m} (in {}) is fed to no unit test", expr(&r));
        }
    }
}

/// aragora's registry with the store's families, as `AppState::new` builds
/// it, without a server: the names the rules use are all there from boot.
#[test]
fn rules_name_only_metrics_aragora_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(dir.path(), [1; 32], [2; 32]).expect("open"));
    let metrics = Metrics::new().expect("metrics").with_known_series();
    aragora::encryption::migration::register_metrics(&metrics);
    // With REDIS_URL (what AuthService registers then).
    aragora::redis_link::RedisMetrics::register(&metrics.registry).expect("redis families");
    let engine = store.clone();
    metrics
        .register_aedb(Arc::new(move || engine.operational_metrics()))
        .expect("aedb families");
    let exported = metrics.render().expect("render");
    for r in all_rules() {
        for n in metric_names(expr(&r)) {
            // Created on a store's first checkpoint.
            if n.starts_with("aedb_checkpoint_") {
                continue;
            }
            // Per-caller families appear with their first caller.
            if n.ends_with("_5m") && n.starts_with("aedb_") {
                continue;
            }
            assert!(
                exported.contains(&format!("# TYPE {n} ")),
                "{}: {n} is not a metric aragora exports",
                r["alert"]
                    .as_str()
                    .or(r["record"].as_str())
                    .unwrap_or_default()
            );
        }
    }
}
