use std::path::Path;

use zeroize::Zeroizing;

use std::sync::Arc;

use super::*;
use crate::audit::AuditLog;
use crate::auth::{Credential, Principal, RequestMeta};
use crate::config::Environment;
use crate::crypto::{CryptoError, MasterKey};
use crate::metrics::Metrics;
use crate::secrets::SecretsService;
use crate::store::{Collection, Durability, EmbeddedStore, Expect, Store, WriteOp};

const MK: [u8; 32] = [7; 32];
const CK: [u8; 32] = [9; 32];

/// A key ring with its store, audit log, metrics and secrets service; shared
/// with the migration tests.
#[derive(Debug)]
pub(super) struct Fixture {
    pub(super) store: Arc<dyn Store>,
    pub(super) audit: Arc<AuditLog>,
    pub(super) ring: Arc<KeyRing>,
    pub(super) metrics: Metrics,
    pub(super) secrets: SecretsService,
}

pub(super) fn open(dir: &Path, master: [u8; 32]) -> Result<Fixture, KeyRingError> {
    open_with(dir, Some(master), false)
}

/// [`open`] with an optional master key; `sealed_start` as in production.
pub(super) fn open_with(
    dir: &Path,
    master: Option<[u8; 32]>,
    sealed_start: bool,
) -> Result<Fixture, KeyRingError> {
    open_full(dir, master, None, sealed_start)
}

/// [`open_with`] with ARAGORA_ENCRYPTION_KEY_PREVIOUS too.
pub(super) fn open_full(
    dir: &Path,
    master: Option<[u8; 32]>,
    previous: Option<[u8; 32]>,
    sealed_start: bool,
) -> Result<Fixture, KeyRingError> {
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.join("aedb"), MK, CK).expect("store"));
    let audit = Arc::new(AuditLog::new(store.clone()));
    let metrics = Metrics::new().expect("metrics");
    let ring = Arc::new(KeyRing::open(
        store.clone(),
        audit.clone(),
        metrics.clone(),
        master.map(|m| MasterKey::from_bytes(Zeroizing::new(m))),
        previous.map(|m| MasterKey::from_bytes(Zeroizing::new(m))),
        dir,
        Environment::Development,
        sealed_start,
        vec![crate::secrets::encrypted_collection()],
    )?);
    let rbac = Arc::new(
        crate::rbac::Rbac::load(store.as_ref(), metrics.clone(), std::time::Duration::ZERO)
            .expect("rbac"),
    );
    let secrets = SecretsService::new(store.clone(), audit.clone(), ring.clone(), rbac);
    Ok(Fixture {
        store,
        audit,
        ring,
        metrics,
        secrets,
    })
}

pub(super) fn principal() -> Principal {
    Principal {
        user_id: "u-1".into(),
        email: "u@example.com".into(),
        roles: vec!["admin".into()],
        credential: Credential::ApiKey { key_id: "k".into() },
    }
}

#[test]
fn first_open_creates_a_primary_and_reopen_keeps_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (primary, env) = {
        let f = open(dir.path(), [1; 32]).expect("open");
        let env = f.ring.encrypt("rec-1", b"hello").expect("encrypt");
        assert_eq!(j(f.ring.keys().expect("open ring"))["active_count"], 1);
        (f.ring.primary_key_id().expect("open ring"), env)
    };
    let f = open(dir.path(), [1; 32]).expect("reopen");
    assert_eq!(f.ring.primary_key_id().expect("open ring"), primary);
    assert_eq!(
        f.ring.decrypt("rec-1", &env, None).expect("decrypt"),
        b"hello"
    );
    // A ciphertext moved to another record id does not decrypt.
    let e = f.ring.decrypt("rec-2", &env, None).expect_err("moved");
    assert!(matches!(e, CryptoError::AadMismatch { .. }), "{e}");
    assert!(e.to_string().contains("AAD mismatch"), "{e}");
}

#[test]
fn wrong_master_key_refuses_to_open_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let primary = open(dir.path(), [1; 32])
        .expect("open")
        .ring
        .primary_key_id()
        .expect("open ring");
    let e = open(dir.path(), [2; 32]).expect_err("wrong master key");
    let msg = e.to_string();
    assert!(msg.contains(&primary), "{msg}");
    assert!(msg.contains("ARAGORA_ENCRYPTION_KEY"), "{msg}");
    assert!(!msg.contains(&hex::encode([2u8; 32])), "{msg}");
}

#[test]
fn rotation_keeps_old_keys_for_decryption_and_cleanup_spares_keys_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = open(dir.path(), [1; 32]).expect("open");
    let p = principal();
    let meta = RequestMeta::default();
    let old = f.ring.primary_key_id().expect("open ring");
    f.secrets
        .put(&p, "s1", "v1", "api_key", None, &meta)
        .expect("put");

    let not_due = f
        .ring
        .rotate("t", None, "scheduled", false)
        .expect("rotate");
    assert!(!not_due.rotated);
    assert_eq!(f.ring.primary_key_id().expect("open ring"), old);

    let out = f.ring.rotate("t", None, "test", true).expect("rotate");
    assert!(out.rotated);
    let new = f.ring.primary_key_id().expect("open ring");
    assert_ne!(new, old);
    let backup = out.backup.expect("backup path");
    let mode = std::fs::metadata(&backup).expect("backup").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let (view, value) = f.secrets.get(&p, "s1", &meta).expect("old secret");
    assert_eq!(
        (Some(view.key_id.as_str()), value.as_str()),
        (Some(old.as_str()), "v1")
    );
    let (view, _) = f
        .secrets
        .put(&p, "s2", "v2", "api_key", None, &meta)
        .expect("put");
    assert_eq!(Some(view.key_id.as_str()), Some(new.as_str()));
    assert_eq!(j(f.ring.keys().expect("open ring"))["active_count"], 2);

    // s1 uses the old key: cleanup keeps it.
    let c = j(f.ring.cleanup_expired("t", None, WEEK).expect("cleanup"));
    assert_eq!(c["retired"].as_array().map(Vec::len), Some(0), "{c}");
    assert_eq!(
        c["kept_in_use"][0]["key_id"].as_str(),
        Some(old.as_str()),
        "{c}"
    );

    // Rewritten under the new key, the old one retires in two steps.
    f.secrets
        .put(&p, "s1", "v1b", "api_key", None, &meta)
        .expect("rewrite");
    let c = j(f.ring.cleanup_expired("t", None, WEEK).expect("cleanup"));
    assert_eq!(c["retired"][0]["to"], "expired", "{c}");
    // A second run straight after destroys nothing: the key waits out its grace.
    let c = j(f.ring.cleanup_expired("t", None, WEEK).expect("cleanup"));
    assert_eq!(c["retired"].as_array().map(Vec::len), Some(0), "{c}");
    assert_eq!(
        c["waiting_to_be_destroyed"][0]["key_id"].as_str(),
        Some(old.as_str()),
        "{c}"
    );
    // Past its grace (none here), the next run destroys it.
    let c = j(f
        .ring
        .cleanup_expired("t", None, std::time::Duration::ZERO)
        .expect("cleanup"));
    assert_eq!(c["retired"][0]["to"], "destroyed", "{c}");
    assert_eq!(j(f.ring.keys().expect("open ring"))["active_count"], 1);
    assert_eq!(f.secrets.get(&p, "s1", &meta).expect("s1").1, "v1b");
    assert_eq!(f.secrets.get(&p, "s2", &meta).expect("s2").1, "v2");

    // The key-ring backup taken at the rotation brings the destroyed key back,
    // decrypt-only, and a record still under it decrypts again.
    let restored = j(f
        .ring
        .restore(std::path::Path::new(&backup), "t", None)
        .expect("restore"));
    assert_eq!(
        restored["restored"][0]["key_id"].as_str(),
        Some(old.as_str())
    );
    assert_eq!(
        restored["restored"][0]["status"], "decrypt_only",
        "{restored}"
    );
    let keys = j(f.ring.keys().expect("open ring"));
    assert_eq!(keys["active_count"], 2, "{keys}");
    assert_eq!(
        f.ring.primary_key_id().expect("open ring"),
        new,
        "the primary stays"
    );
    // A second restore finds it present.
    let again = j(f
        .ring
        .restore(std::path::Path::new(&backup), "t", None)
        .expect("restore"));
    assert_eq!(
        again["restored"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );
}

const WEEK: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

#[test]
fn restore_brings_back_a_lost_key_from_the_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = open(dir.path(), [1; 32]).expect("open");
    let p = principal();
    let meta = RequestMeta::default();
    let old = f.ring.primary_key_id().expect("open ring");
    f.secrets
        .put(&p, "s1", "v1", "token", None, &meta)
        .expect("put");
    let backup = f
        .ring
        .rotate("t", None, "test", true)
        .expect("rotate")
        .backup
        .expect("backup");
    // The old key is lost.
    f.store
        .write(
            vec![WriteOp::delete(Collection::KeyRing, &old, Expect::Any)],
            Durability::Durable,
        )
        .expect("delete");
    f.ring.reload().expect("reload");
    let e = f.secrets.get(&p, "s1", &meta).expect_err("key lost");
    assert!(e.to_string().contains("unknown key"), "{e}");
    let r = j(f
        .ring
        .restore(Path::new(&backup), "t", None)
        .expect("restore"));
    assert_eq!(
        r["restored"][0]["key_id"].as_str(),
        Some(old.as_str()),
        "{r}"
    );
    assert_eq!(r["restored"][0]["status"], "decrypt_only", "{r}");
    assert_eq!(f.secrets.get(&p, "s1", &meta).expect("s1").1, "v1");
    // Restoring again changes nothing.
    let r = j(f
        .ring
        .restore(Path::new(&backup), "t", None)
        .expect("restore"));
    assert_eq!(r["restored"].as_array().map(Vec::len), Some(0), "{r}");
}

#[test]
fn stats_count_operations_and_decrypts_per_actor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = open(dir.path(), [1; 32]).expect("open");
    let p = principal();
    let meta = RequestMeta::default();
    f.secrets
        .put(&p, "s1", "v1", "token", None, &meta)
        .expect("put");
    for _ in 0..3 {
        f.secrets.get(&p, "s1", &meta).expect("get");
    }
    let s = j(f.ring.stats());
    assert_eq!(s["encrypt_ops"], 1, "{s}");
    assert_eq!(s["decrypt_ops"], 3, "{s}");
    assert_eq!(s["decrypts_per_actor"][0]["actor"], "u-1", "{s}");
    assert_eq!(s["decrypts_per_actor"][0]["last_minute"], 3, "{s}");
    assert!(
        s["derivation_latency_p95"]
            .as_f64()
            .is_some_and(|v| v > 0.0),
        "{s}"
    );
    assert!(
        s["encryption_latency_p95"]
            .as_f64()
            .is_some_and(|v| v > 0.0),
        "{s}"
    );
    // Boot took one derivation sample; the server's probe adds one per
    // interval, and the window keeps the last hour's.
    assert_eq!(s["derivation_samples"], 1, "{s}");
    f.ring.sample_derivation_cost();
    assert_eq!(j(f.ring.stats())["derivation_samples"], 2);
    for _ in 0..200 {
        f.ring.sample_derivation_cost();
    }
    assert_eq!(j(f.ring.stats())["derivation_samples"], 120);
}

#[test]
fn a_wrong_key_seals_the_ring_until_the_right_key_unseals_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (primary, env) = {
        let f = open(dir.path(), [1; 32]).expect("open");
        let env = f.ring.encrypt("rec-1", b"hello").expect("encrypt");
        (f.ring.primary_key_id().expect("open ring"), env)
    };
    let f = open_with(dir.path(), Some([2; 32]), true).expect("starts sealed");
    let sealed = f.ring.sealed().expect("sealed");
    assert_eq!(sealed.reason, "wrong_key");
    assert!(sealed.message.contains(&primary), "{}", sealed.message);
    let h = j(f.ring.health());
    assert_eq!(
        (&h["master_key_loaded"], &h["sealed"], &h["active_keys"]),
        (
            &serde_json::json!(false),
            &serde_json::json!(true),
            &serde_json::json!(0)
        ),
        "{h}"
    );
    let master = |g: &Metrics| g.active_keys.with_label_values(&["master"]).get();
    assert_eq!(master(&f.metrics), 0);
    let e = f.ring.decrypt("rec-1", &env, None).expect_err("sealed");
    assert!(matches!(e, CryptoError::Sealed { .. }), "{e}");
    assert!(e.to_string().contains("ARAGORA_ENCRYPTION_KEY"), "{e}");
    assert!(matches!(
        f.ring.rotate("t", None, "sealed", true),
        Err(KeyRingError::Sealed(_))
    ));
    // Sealed is not an encryption error: no metric, no error per request.
    let errors: u64 = ["sealed", "unwrap_failed", "aad_mismatch"]
        .iter()
        .map(|r| f.metrics.encryption_errors.with_label_values(&[r]).get())
        .sum();
    assert_eq!(errors, 0);

    let wrong = MasterKey::from_bytes(Zeroizing::new([3; 32]));
    let e = f.ring.unseal(wrong, "t").expect_err("wrong key");
    assert!(matches!(e, KeyRingError::UnsealRefused(_)), "{e}");
    assert!(f.ring.sealed().is_some());

    let right = MasterKey::from_bytes(Zeroizing::new([1; 32]));
    let done = f.ring.unseal(right, "t").expect("unseal");
    assert!(done.unsealed && done.primary_key_id == primary, "{done:?}");
    assert!(f.ring.sealed().is_none());
    assert_eq!(master(&f.metrics), 1);
    assert_eq!(
        f.ring.decrypt("rec-1", &env, None).expect("decrypt"),
        b"hello"
    );
    let e = f
        .ring
        .unseal(MasterKey::from_bytes(Zeroizing::new([3; 32])), "t")
        .expect_err("another key once open");
    assert!(matches!(e, KeyRingError::UnsealRefused(_)), "{e}");
}

#[test]
fn without_a_key_the_ring_starts_sealed_only_when_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(open_with(dir.path(), None, false).is_err());
    let f = open_with(dir.path(), None, true).expect("sealed");
    assert_eq!(f.ring.sealed().expect("sealed").reason, "missing_key");
    // A wrong key outside production still stops boot.
    drop(f);
    open(dir.path(), [1; 32]).expect("first start");
    assert!(matches!(
        open(dir.path(), [2; 32]),
        Err(KeyRingError::Unwrap { .. })
    ));
}

/// A view as the JSON it is served as.
fn j<T: serde::Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).expect("view serializes")
}

/// A rotation that fails before its commit (here: the key-ring backup cannot
/// be written) pages like one that fails at the commit: counted as
/// `rotation_failed` and audited as `key_rotation_failed`, ring unchanged.
#[test]
fn every_rotation_failure_is_counted_and_audited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = open(dir.path(), [1; 32]).expect("open");
    let before = f.ring.primary_key_id();
    // A file where the backup directory goes: the backup write fails.
    std::fs::write(dir.path().join(BACKUP_DIR), b"not a directory").expect("block");
    let failed = |f: &Fixture| {
        f.metrics
            .encryption_errors
            .with_label_values(&["rotation_failed"])
            .get()
    };
    f.ring
        .rotate("op", None, "drill", true)
        .expect_err("backup cannot be written");
    assert_eq!(failed(&f), 1);
    assert_eq!(f.ring.primary_key_id(), before, "the ring is unchanged");
    let audited = f
        .audit
        .search(&crate::audit::SearchFilter {
            action: Some("key_rotation_failed".into()),
            actor: None,
            minutes: None,
            before: None,
            limit: 10,
        })
        .expect("search");
    assert_eq!(audited.total, 1, "{:?}", audited.entries);
    // A refused reason is a bad request, not a failed rotation.
    f.ring.rotate("op", None, " ", true).expect_err("no reason");
    assert_eq!(failed(&f), 1);
    // Not due without --force: nothing failed either.
    std::fs::remove_file(dir.path().join(BACKUP_DIR)).expect("unblock");
    let r = f
        .ring
        .rotate("op", None, "not due", false)
        .expect("not due");
    assert!(!r.rotated);
    assert_eq!(failed(&f), 1);
}
