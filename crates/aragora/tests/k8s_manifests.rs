//! The Kubernetes deployment (deploy/k8s): both overlays render with
//! `kubectl kustomize`, pass `kubernetes-validate --strict`, and have what the
//! runbook's `kubectl` commands and the two storage modes depend on.
//!
//! Needs `kubectl` and `kubernetes-validate` (PyPI); `.ci/run` installs the
//! latter. Under `CI=true` a missing tool fails the test; elsewhere it is
//! skipped with the reason printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `true` when `tool` runs; otherwise fails under CI and returns `false`.
fn have(tool: &str, version_args: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(version_args)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required under CI=true (kubectl; pip install kubernetes-validate)"
        );
        eprintln!("skipping: {tool} is not installed");
    }
    ok
}

/// The overlay rendered and validated, as its documents.
fn render(overlay: &str) -> Vec<Value> {
    let dir = repo_root().join("deploy/k8s/overlays").join(overlay);
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(&dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(rendered.path(), &out.stdout).expect("write rendered");
    let v = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(rendered.path())
        .output()
        .expect("run kubernetes-validate");
    assert!(
        v.status.success(),
        "{overlay} does not validate against the Kubernetes schemas:\n{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml document"))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

fn deployment(docs: &[Value]) -> &Value {
    find(docs, "Deployment", "aragora").expect("Deployment aragora")
}

fn container(docs: &[Value]) -> &Value {
    let containers = deployment(docs)["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    containers
        .iter()
        .find(|c| c["name"].as_str() == Some("aragora"))
        .expect("container aragora")
}

fn env_names(docs: &[Value]) -> Vec<String> {
    container(docs)["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect()
}

fn volume<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    deployment(docs)["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("volume {name}"))
}

/// What both overlays share: the names the runbook's commands use, probes,
/// resources, the locked-down pod and the keys by reference.
fn assert_common(docs: &[Value]) {
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        if kind != "Namespace" {
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some("aragora"),
                "{kind}"
            );
        }
        assert_eq!(
            d["metadata"]["labels"]["app"].as_str(),
            Some("aragora"),
            "{kind} carries app=aragora (kubectl logs -l app=aragora)"
        );
    }
    let svc = find(docs, "Service", "aragora").expect("Service aragora");
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(8080));
    assert_eq!(svc["spec"]["type"].as_str(), Some("ClusterIP"));
    let dep = deployment(docs);
    assert_eq!(
        dep["spec"]["template"]["metadata"]["labels"]["app"].as_str(),
        Some("aragora")
    );
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let c = container(docs);
    assert_eq!(c["image"].as_str(), Some("aragora:latest"));
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["path"].as_str(),
            Some("/api/health"),
            "{probe}"
        );
    }
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(c["resources"][kind][r].is_string(), "resources.{kind}.{r}");
        }
    }
    // Keys by reference to a Secret, never inline.
    assert_eq!(
        c["envFrom"][0]["secretRef"]["name"].as_str(),
        Some("aragora-keys")
    );
    let names = env_names(docs);
    for forbidden in [
        "ARAGORA_ENCRYPTION_KEY",
        "AEDB_MANIFEST_KEY",
        "AEDB_CHECKPOINT_KEY",
        "JWT_SECRET",
    ] {
        assert!(!names.iter().any(|n| n == forbidden), "{forbidden} inline");
    }
    for needed in [
        "ARAGORA_ENV",
        "ARAGORA_TRUSTED_PROXIES",
        "ARAGORA_TLS_TERMINATED_UPSTREAM",
    ] {
        assert!(names.iter().any(|n| n == needed), "{needed}");
    }
}

#[test]
fn embedded_overlay_runs_one_replica_on_a_volume_claim() {
    if !have("kubectl", &["version", "--client"]) || !have("kubernetes-validate", &["--version"]) {
        return;
    }
    let docs = render("embedded");
    assert_common(&docs);
    let dep = deployment(&docs);
    // The store's directory lock admits one process: one replica, and a
    // rollout that stops the old pod before starting the new one.
    assert_eq!(dep["spec"]["replicas"].as_u64(), Some(1));
    assert_eq!(dep["spec"]["strategy"]["type"].as_str(), Some("Recreate"));
    assert_eq!(
        volume(&docs, "data")["persistentVolumeClaim"]["claimName"].as_str(),
        Some("aragora-data")
    );
    assert!(find(&docs, "PersistentVolumeClaim", "aragora-data").is_some());
    let names = env_names(&docs);
    assert!(
        !names
            .iter()
            .any(|n| n == "DATABASE_URL" || n == "REDIS_URL")
    );
}

#[test]
fn scale_out_overlay_runs_replicas_on_postgres_and_redis_from_secrets() {
    if !have("kubectl", &["version", "--client"]) || !have("kubernetes-validate", &["--version"]) {
        return;
    }
    let docs = render("scale-out");
    assert_common(&docs);
    let dep = deployment(&docs);
    assert!(dep["spec"]["replicas"].as_u64().is_some_and(|n| n >= 2));
    assert_eq!(
        dep["spec"]["strategy"]["type"].as_str(),
        Some("RollingUpdate")
    );
    assert_eq!(
        dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0)
    );
    let env = container(&docs)["env"].as_sequence().expect("env");
    for var in ["DATABASE_URL", "REDIS_URL"] {
        let e = env
            .iter()
            .find(|e| e["name"].as_str() == Some(var))
            .unwrap_or_else(|| panic!("{var}"));
        assert!(e["value"].is_null(), "{var} must not be inline");
        assert_eq!(
            e["valueFrom"]["secretKeyRef"]["name"].as_str(),
            Some("aragora-backends"),
            "{var}"
        );
    }
    // No PersistentVolumeClaim: state lives in PostgreSQL, so pods are
    // interchangeable.
    assert!(volume(&docs, "data")["emptyDir"].is_mapping());
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"].as_str() == Some("PersistentVolumeClaim"))
    );
    let pdb = find(&docs, "PodDisruptionBudget", "aragora").expect("PodDisruptionBudget");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app"].as_str(),
        Some("aragora")
    );
    assert!(pdb["spec"]["minAvailable"].as_u64().is_some_and(|n| n >= 1));
}

/// The image the overlays name runs as the same unprivileged user as the
/// pod's security context, and ships both binaries.
#[test]
fn dockerfile_builds_a_non_root_image_with_both_binaries() {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build");
    let last_stage = text.rsplit("\nFROM ").next().expect("final stage");
    let user = last_stage
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the final stage sets USER");
    assert!(
        user.starts_with("10001"),
        "USER {user} matches runAsUser 10001"
    );
    assert!(last_stage.contains("/usr/local/bin/aragora"));
    assert!(last_stage.contains("/usr/local/bin/aedb"));
}
