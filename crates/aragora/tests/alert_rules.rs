//! deploy/prometheus/aragora-alerts.yml: one rule per runbook alert, named as
//! the runbook names it, with the runbook's threshold, over metrics aragora
//! registers (or, for features still to come, names listed here).

use std::collections::BTreeSet;
use std::path::Path;

use aragora::metrics::Metrics;
use aragora::rbac::catalogue::PERMISSIONS;
use serde_yaml_ng::Value;

const RULES: &str = "../../deploy/prometheus/aragora-alerts.yml";

/// Every alert of the runbook (its "### Alert:" headings, split at " / ") and a
/// piece of its rule that carries the runbook's threshold.
const ALERTS: &[(&str, &str)] = &[
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

/// Alerts of ours beyond the runbook's, with their thresholds.
const EXTRA_ALERTS: &[(&str, &str)] = &[("ApprovalNotificationsFailing", "[15m])) > 0")];

/// Metrics a rule may name before the feature recording them exists.
const NOT_YET_REGISTERED: &[&str] = &[];

fn rules() -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES))
        .expect("alert rules file");
    let doc: Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    doc["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("aragora_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &expr[start..end];
        out.insert(name.strip_suffix("_bucket").unwrap_or(name).to_string());
        i = end;
    }
    out
}

#[test]
fn one_rule_per_runbook_alert_with_its_threshold() {
    let rules = rules();
    let names: Vec<&str> = rules
        .iter()
        .map(|r| r["alert"].as_str().expect("alert name"))
        .collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(
        unique.len(),
        names.len(),
        "duplicate alert names: {names:?}"
    );
    let expected: BTreeSet<&str> = ALERTS.iter().chain(EXTRA_ALERTS).map(|(n, _)| *n).collect();
    assert_eq!(unique, expected, "alerts differ from the runbook's");
    for (name, threshold) in ALERTS.iter().chain(EXTRA_ALERTS) {
        let rule = rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .expect("rule");
        let expr = rule["expr"].as_str().expect("expr");
        assert!(
            expr.contains(threshold),
            "{name}: expected {threshold:?} in {expr}"
        );
        assert!(
            rule["labels"]["severity"].as_str().is_some(),
            "{name}: severity label"
        );
        assert!(
            rule["annotations"]["runbook"].as_str().is_some(),
            "{name}: runbook annotation"
        );
    }
    // Runbook: "critical approval pending > 1 hour" is the age of one request,
    // not a `for: 1h` over a count that a stream of short requests keeps above 0.
    let pending = rules
        .iter()
        .find(|r| r["alert"].as_str() == Some("CriticalOperationPendingTooLong"))
        .expect("rule");
    assert!(
        pending["expr"]
            .as_str()
            .is_some_and(|e| e.contains("aragora_oldest_pending_critical_approval_age_seconds")),
        "{pending:?}"
    );
    assert!(pending["for"].is_null(), "the age already counts the hour");
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

/// A runbook link that leads nowhere sends the on-call reader to the top of a
/// long document in the middle of an incident.
#[test]
fn runbook_annotations_point_at_headings_of_our_edition() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for rule in rules() {
        let name = rule["alert"].as_str().expect("alert name");
        let link = rule["annotations"]["runbook"].as_str().expect("runbook");
        let (file, anchor) = link
            .split_once('#')
            .unwrap_or_else(|| panic!("{name}: {link} has no #anchor"));
        assert_eq!(
            file, "docs/runbooks/aragora-security-operations.md",
            "{name}: our edition"
        );
        let doc = std::fs::read_to_string(root.join(file)).expect("runbook edition");
        // Headings only: a `# comment` inside a fenced block is not one.
        let mut in_fence = false;
        let anchors: BTreeSet<String> = doc
            .lines()
            .filter(|l| {
                // A fence line: backticks, then an info string without any
                // (CommonMark); "```` ```x ```` ..." is inline code in prose.
                let t = l.trim_start();
                if t.starts_with("```") && !t.trim_start_matches('`').contains('`') {
                    in_fence = !in_fence;
                }
                !in_fence
            })
            .filter_map(|l| l.strip_prefix('#'))
            .map(|l| slug(l.trim_start_matches('#')))
            .collect();
        assert!(
            anchors.contains(anchor),
            "{name}: no heading of {file} has the anchor #{anchor}"
        );
    }
    assert_eq!(
        slug("### Alert: RBACDenialSpike / SensitivePermissionDenied".trim_start_matches('#')),
        "alert-rbacdenialspike--sensitivepermissiondenied"
    );
}

#[test]
fn rules_name_only_metrics_aragora_exports() {
    let metrics = Metrics::new().expect("metrics").with_known_series();
    // As at boot, where the migration creates its own series.
    aragora::encryption::migration::register_metrics(&metrics);
    let exported = metrics.render().expect("render");
    for rule in rules() {
        let expr = rule["expr"].as_str().expect("expr");
        for name in metric_names(expr) {
            let registered = exported.contains(&format!("# TYPE {name} "));
            assert!(
                registered || NOT_YET_REGISTERED.contains(&name.as_str()),
                "{}: {name} is not a metric aragora exports",
                rule["alert"].as_str().unwrap_or_default()
            );
            assert!(
                !(registered && NOT_YET_REGISTERED.contains(&name.as_str())),
                "{name} is exported now: drop it from NOT_YET_REGISTERED"
            );
        }
    }
}

#[test]
fn sensitive_permission_rule_covers_exactly_the_catalogue_sensitive_set() {
    let rule = rules()
        .into_iter()
        .find(|r| r["alert"].as_str() == Some("SensitivePermissionDenied"))
        .expect("rule");
    let expr = rule["expr"].as_str().expect("expr").to_string();
    let start = expr.find("permission=~\"").expect("permission matcher") + "permission=~\"".len();
    let end = start + expr[start..].find('"').expect("closing quote");
    let in_rule: BTreeSet<&str> = expr[start..end].split('|').collect();
    let sensitive: BTreeSet<&str> = PERMISSIONS
        .iter()
        .filter(|p| p.sensitive)
        .map(|p| p.name)
        .collect();
    assert_eq!(in_rule, sensitive);
}

/// promtool's own syntax check and the rule unit tests (Debian package
/// `prometheus`; `.ci/run` installs it). Outside CI a machine without promtool
/// runs only the structural checks above; under `CI=true` its absence fails.
#[test]
fn promtool_checks_and_unit_tests_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus");
    let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "rules", "aragora-alerts.yml"])
        .current_dir(&dir)
        .output()
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is not installed (apt-get install prometheus): CI must run the alert rule tests"
        );
        eprintln!("promtool not installed: skipped its checks (the structural checks ran)");
        return;
    };
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = std::process::Command::new("promtool")
        .args(["test", "rules", "aragora-alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
