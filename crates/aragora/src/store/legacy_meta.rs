//! One-time upgrade of data directories written before `Collection::Meta` was
//! split by owner. The old `meta` scope held singletons of three modules (the
//! audit chain head, the session revocation epoch and bootstrap marker, and the
//! migration progress records); each now lives in a collection its module owns.
//!
//! The move is one durable commit (every record lands in its new collection and
//! leaves `meta` together), so a crash mid-upgrade leaves the old layout and the
//! next open moves it again. A record found in both places is refused: two
//! histories for one singleton is corruption an operator must look at.

use aedb::{
    AedbError, AedbInstance, CallerContext, CommitFinality, ConsistencyMode, NotFoundKind,
    ReadError, Secure,
};

use super::embedded::PROJECT;
use super::{Collection, StoreError};

/// The scope of the old layout; nothing writes to it any more.
const LEGACY_SCOPE: &str = "meta";

/// More singletons than the old layout ever held: a bigger `meta` is not ours.
const MAX_LEGACY_RECORDS: usize = 1_000;

/// Where a record of the old `meta` scope belongs, by its id.
fn owner_of(id: &str) -> Option<Collection> {
    match id {
        "audit_head" => Some(Collection::AuditChain),
        "session_epoch" | "bootstrap" => Some(Collection::AuthState),
        _ if id.starts_with("migration:") => Some(Collection::Migrations),
        _ => None,
    }
}

/// Moves every record of the old `meta` scope to the collection that owns it.
/// Returns how many records moved (0 on a directory with the new layout).
pub(super) fn upgrade(
    db: &AedbInstance<Secure>,
    caller: &CallerContext,
) -> Result<usize, StoreError> {
    let read = db
        .begin_read_tx_as(caller, ConsistencyMode::AtLatest)
        .map_err(|e| backend("reading the old meta scope", e))?;
    let records = match read.kv_scan_prefix(PROJECT, LEGACY_SCOPE, b"", MAX_LEGACY_RECORDS + 1) {
        Ok(records) => records,
        // A directory created with the new layout has no `meta` scope.
        Err(ReadError::NotFound {
            kind: NotFoundKind::Scope,
            ..
        }) => return Ok(0),
        Err(e) => return Err(backend("reading the old meta scope", e)),
    };
    if records.is_empty() {
        return Ok(0);
    }
    if records.len() > MAX_LEGACY_RECORDS {
        return Err(StoreError::Backend(format!(
            "the old `meta` scope holds more than {MAX_LEGACY_RECORDS} records; \
             it was not written by aragora, so it is left as it is"
        )));
    }
    let mut tx = db
        .begin_write_as(caller, PROJECT)
        .map_err(|e| backend("upgrading the meta scope", e))?;
    let mut moved = 0;
    for (key, value) in &records {
        let id = String::from_utf8(key.as_ref().to_vec()).map_err(|_| StoreError::Corrupt {
            collection: LEGACY_SCOPE,
            id: hex::encode(key.as_ref()),
            reason: "record id is not UTF-8".into(),
        })?;
        let Some(owner) = owner_of(&id) else {
            tracing::warn!(
                id = %id,
                "the old `meta` scope holds a record no module owns; it is left in place"
            );
            continue;
        };
        let already = read
            .kv_get(PROJECT, owner.name(), key.as_ref())
            .map_err(|e| backend("upgrading the meta scope", e))?;
        if already.is_some() {
            return Err(StoreError::Corrupt {
                collection: owner.name(),
                id,
                reason: "the record exists both here and in the old `meta` scope; \
                         restore the data directory from a backup"
                    .into(),
            });
        }
        tx.kv_set(owner.name(), key.as_ref(), value.as_ref())
            .map_err(|e| backend("upgrading the meta scope", e))?;
        tx.kv_del(LEGACY_SCOPE, key.as_ref())
            .map_err(|e| backend("upgrading the meta scope", e))?;
        moved += 1;
    }
    if moved > 0 {
        db.commit_as_with_finality(caller, tx, CommitFinality::Durable)
            .map_err(|e| backend("upgrading the meta scope", e))?;
        tracing::info!(
            records = moved,
            "moved the old `meta` singletons to the collections that own them"
        );
    }
    Ok(moved)
}

fn backend(what: &str, e: impl Into<AedbError>) -> StoreError {
    StoreError::Backend(format!("{what}: {}", e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::{BOOTSTRAP_ADMIN, SERVICE_CALLER};
    use crate::store::{EmbeddedStore, Store};
    use aedb::{AedbConfig, DdlOperation};

    const MK: [u8; 32] = [1; 32];
    const CK: [u8; 32] = [2; 32];

    /// Writes the layout of a directory from before the split: project, the
    /// old `meta` scope, and its singletons.
    fn write_old_layout(dir: &std::path::Path, records: &[(&str, &str)]) {
        let db = AedbInstance::open_production(
            AedbConfig::production(MK)
                .with_checkpoint_key(CK)
                .with_bootstrap_admin(BOOTSTRAP_ADMIN),
            dir,
        )
        .expect("open");
        db.commit_ddl_as(
            &CallerContext::new(BOOTSTRAP_ADMIN).expect("caller"),
            vec![DdlOperation::CreateProject {
                project: PROJECT.into(),
                owner: Some(SERVICE_CALLER.into()),
            }],
        )
        .expect("project");
        let caller = CallerContext::new(SERVICE_CALLER).expect("caller");
        db.commit_ddl_as(
            &caller,
            vec![DdlOperation::CreateScope {
                project: PROJECT.into(),
                scope: LEGACY_SCOPE.into(),
            }],
        )
        .expect("scope");
        let mut tx = db.begin_write_as(&caller, PROJECT).expect("tx");
        for (id, value) in records {
            tx.kv_set(LEGACY_SCOPE, id.as_bytes(), value.as_bytes())
                .expect("set");
        }
        db.commit_as(&caller, tx).expect("commit");
        db.close().expect("close");
    }

    #[test]
    fn singletons_move_to_their_owners_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        write_old_layout(
            &path,
            &[
                ("audit_head", "h"),
                ("session_epoch", "e"),
                ("bootstrap", "b"),
                ("migration:secrets", "m"),
                ("someone_elses", "x"),
            ],
        );
        let store = EmbeddedStore::open(&path, MK, CK).expect("open upgrades");
        let value = |c, id| {
            store
                .get(c, id)
                .expect("get")
                .map(|r| String::from_utf8(r.value.to_vec()).expect("utf8"))
        };
        assert_eq!(
            value(Collection::AuditChain, "audit_head").as_deref(),
            Some("h")
        );
        assert_eq!(
            value(Collection::AuthState, "session_epoch").as_deref(),
            Some("e")
        );
        assert_eq!(
            value(Collection::AuthState, "bootstrap").as_deref(),
            Some("b")
        );
        assert_eq!(
            value(Collection::Migrations, "migration:secrets").as_deref(),
            Some("m")
        );
        // Only the record no module owns stays behind, and a second open moves nothing.
        let read = store
            .engine()
            .begin_read_tx_as(
                &CallerContext::new(SERVICE_CALLER).expect("caller"),
                ConsistencyMode::AtLatest,
            )
            .expect("read");
        let left = read
            .kv_scan_prefix(PROJECT, LEGACY_SCOPE, b"", 10)
            .expect("scan");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0.as_ref(), b"someone_elses");
        drop(read);
        assert_eq!(
            upgrade(
                store.engine(),
                &CallerContext::new(SERVICE_CALLER).expect("caller")
            )
            .expect("rerun"),
            0
        );
    }

    #[test]
    fn a_singleton_in_both_layouts_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        write_old_layout(&path, &[("audit_head", "old")]);
        // A store from before the split saw the old record; write a new-layout copy
        // behind its back, as a botched manual repair would.
        {
            let store = EmbeddedStore::open(&path, MK, CK).expect("first upgrade");
            store.close().expect("close");
        }
        let db = AedbInstance::open_production(
            AedbConfig::production(MK)
                .with_checkpoint_key(CK)
                .with_bootstrap_admin(BOOTSTRAP_ADMIN),
            &path,
        )
        .expect("open");
        let caller = CallerContext::new(SERVICE_CALLER).expect("caller");
        let mut tx = db.begin_write_as(&caller, PROJECT).expect("tx");
        tx.kv_set(LEGACY_SCOPE, b"audit_head", b"stale")
            .expect("set");
        db.commit_as(&caller, tx).expect("commit");
        db.close().expect("close");
        let err = EmbeddedStore::open(&path, MK, CK).expect_err("refused");
        assert!(
            err.to_string().contains("old `meta` scope"),
            "the error names the problem: {err}"
        );
    }
}
