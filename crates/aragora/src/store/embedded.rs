//! The default store: aedb embedded in the process, opened with `open_production`
//! (signed manifest, encrypted WAL and checkpoints, strict recovery) and used only
//! through its authenticated `*_as` API.
//!
//! Layout: one project `aragora` owned by the service caller `aragora-server`, one
//! KV scope per collection, record id = key. The instance's one-time bootstrap
//! admin (`aragora-system`) only creates the project; everything after runs as the
//! project owner, so no request path exercises GlobalAdmin.

use std::path::Path;

use aedb::{
    AedbConfig, AedbError, AedbInstance, CallerContext, CommitError, CommitFinality,
    ConsistencyMode, DdlOperation, NotFoundKind, Permission, ReadAssertion, ReadError, Secure,
};

use super::Expect;
use super::{Collection, Durability, ListQuery, Receipt, Record, Store, StoreError, WriteOp};

pub const PROJECT: &str = "aragora";
pub const SERVICE_CALLER: &str = "aragora-server";
pub const BOOTSTRAP_ADMIN: &str = "aragora-system";

#[derive(Debug)]
pub struct EmbeddedStore {
    db: AedbInstance<Secure>,
    caller: CallerContext,
}

/// The AEDB keys before the current ones (AEDB_PREVIOUS_MANIFEST_KEY,
/// AEDB_PREVIOUS_CHECKPOINT_KEY), during a key rotation: the store opens a
/// directory signed or encrypted under them and re-signs it under the current
/// keys before it serves, so the next start needs only the current keys.
#[derive(Clone, Default)]
pub struct PreviousKeys {
    pub manifest: Option<zeroize::Zeroizing<[u8; 32]>>,
    pub checkpoint: Option<zeroize::Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for PreviousKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreviousKeys")
            .field("manifest", &self.manifest.as_ref().map(|_| "<redacted>"))
            .field(
                "checkpoint",
                &self.checkpoint.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir` with the manifest and checkpoint keys.
    pub fn open(
        dir: &Path,
        manifest_key: [u8; 32],
        checkpoint_key: [u8; 32],
    ) -> Result<Self, StoreError> {
        Self::open_rotating(dir, manifest_key, checkpoint_key, &PreviousKeys::default())
    }

    /// [`EmbeddedStore::open`] during a key rotation: `previous` are the keys
    /// the directory may still be signed or encrypted under.
    pub fn open_rotating(
        dir: &Path,
        manifest_key: [u8; 32],
        checkpoint_key: [u8; 32],
        previous: &PreviousKeys,
    ) -> Result<Self, StoreError> {
        let mut config = AedbConfig::production(manifest_key)
            .with_checkpoint_key(checkpoint_key)
            .with_bootstrap_admin(BOOTSTRAP_ADMIN);
        if let Some(k) = &previous.manifest {
            config = config.with_previous_manifest_key(**k);
        }
        if let Some(k) = &previous.checkpoint {
            config = config.with_previous_checkpoint_key(**k);
        }
        let db = AedbInstance::open_production(config, dir)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", dir.display())))?;
        let store = Self {
            db,
            caller: CallerContext::new(SERVICE_CALLER).map_err(backend)?,
        };
        store.ensure_layout()?;
        store.ensure_audit_read()?;
        store.ensure_backup()?;
        super::legacy_meta::upgrade(&store.db, &store.caller)?;
        Ok(store)
    }

    fn ensure_layout(&self) -> Result<(), StoreError> {
        // False also when the project exists but the service caller holds
        // nothing in it: creating it then fails with AlreadyExists, which is the
        // error to report (someone else owns the project).
        let project_exists = self
            .db
            .project_exists_as(&self.caller, PROJECT)
            .map_err(backend)?;
        if !project_exists {
            self.db
                .commit_ddl_as(
                    &CallerContext::new(BOOTSTRAP_ADMIN).map_err(backend)?,
                    vec![DdlOperation::CreateProject {
                        project: PROJECT.into(),
                        owner: Some(SERVICE_CALLER.into()),
                    }],
                )
                .map_err(backend)?;
        }
        let read = self
            .db
            .begin_read_tx_as(&self.caller, ConsistencyMode::AtLatest)
            .map_err(backend)?;
        let mut missing = Vec::new();
        for c in Collection::ALL {
            if let Err(ReadError::NotFound {
                kind: NotFoundKind::Scope,
                ..
            }) = read.kv_get(PROJECT, c.name(), b"-")
            {
                missing.push(DdlOperation::CreateScope {
                    project: PROJECT.into(),
                    scope: c.name().into(),
                });
            }
        }
        if !missing.is_empty() {
            self.db
                .commit_ddl_as(&self.caller, missing)
                .map_err(backend)?;
        }
        Ok(())
    }

    /// The service caller reads aedb's audit tables (for `aragora audit
    /// export`) through its own grant, so exports never use GlobalAdmin.
    fn ensure_audit_read(&self) -> Result<(), StoreError> {
        match self.db.export_audit_as(&self.caller, i64::MAX) {
            Ok(_) => Ok(()),
            Err(ReadError::PermissionDenied { .. }) => self
                .db
                .commit_ddl_as(
                    &CallerContext::new(BOOTSTRAP_ADMIN).map_err(backend)?,
                    vec![DdlOperation::GrantPermission {
                        grantee: SERVICE_CALLER.into(),
                        permission: Permission::AuditRead,
                        delegable: false,
                    }],
                )
                .map(|_| ())
                .map_err(backend),
            Err(e) => Err(backend(e)),
        }
    }

    /// The service caller takes online backups (`aragora backup`, the
    /// schedule) through its own grant, so backups never use GlobalAdmin.
    /// Reading its grants needs `AuditRead`, granted just before.
    fn ensure_backup(&self) -> Result<(), StoreError> {
        let grants = self
            .db
            .grants_of_as(&self.caller, SERVICE_CALLER)
            .map_err(backend)?;
        if grants.iter().any(|g| g.permission == Permission::Backup) {
            return Ok(());
        }
        self.db
            .commit_ddl_as(
                &CallerContext::new(BOOTSTRAP_ADMIN).map_err(backend)?,
                vec![DdlOperation::GrantPermission {
                    grantee: SERVICE_CALLER.into(),
                    permission: Permission::Backup,
                    delegable: false,
                }],
            )
            .map(|_| ())
            .map_err(backend)
    }

    /// The transaction for a batch, and for each assertion the op it guards.
    fn batch(&self, ops: &[WriteOp]) -> Result<(aedb::WriteTransaction, Vec<usize>), StoreError> {
        let mut tx = self
            .db
            .begin_write_as(&self.caller, PROJECT)
            .map_err(backend)?;
        let mut asserted: Vec<usize> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let (collection, id) = op.target();
            let scope = collection.name();
            let expect = match op {
                WriteOp::Put { value, expect, .. } => {
                    tx.kv_set(scope, id.as_bytes(), value).map_err(backend)?;
                    *expect
                }
                WriteOp::Delete { expect, .. } => {
                    tx.kv_del(scope, id.as_bytes()).map_err(backend)?;
                    *expect
                }
            };
            match expect {
                Expect::Any => {}
                Expect::Absent => {
                    tx.assert(ReadAssertion::key_absent(scope, id.as_bytes()));
                    asserted.push(i);
                }
                Expect::Version(version) => {
                    tx.assert(ReadAssertion::KeyVersion {
                        scope: scope.into(),
                        key: id.as_bytes().to_vec(),
                        version,
                    });
                    asserted.push(i);
                }
            }
        }
        Ok((tx, asserted))
    }

    /// The engine underneath (operational metrics, checkpoints, backups).
    pub fn engine(&self) -> &AedbInstance<Secure> {
        &self.db
    }

    /// Flushes and closes the engine.
    pub fn close(self) -> Result<(), StoreError> {
        self.db.close().map_err(backend)
    }
}

fn backend(e: impl Into<AedbError>) -> StoreError {
    match e.into() {
        AedbError::Overloaded { reason } => StoreError::Unavailable(reason),
        AedbError::Timeout { waited_ms } => {
            StoreError::Unavailable(format!("commit timed out after {waited_ms} ms"))
        }
        other => StoreError::Backend(other.to_string()),
    }
}

impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "aedb"
    }

    fn operational_metrics(&self) -> Option<aedb::OperationalMetrics> {
        Some(self.db.operational_metrics())
    }

    fn get(&self, collection: Collection, id: &str) -> Result<Option<Record>, StoreError> {
        let read = self
            .db
            .begin_read_tx_as(&self.caller, ConsistencyMode::AtLatest)
            .map_err(backend)?;
        Ok(read
            .kv_get_versioned(PROJECT, collection.name(), id.as_bytes())
            .map_err(backend)?
            .map(|(version, value)| Record { version, value }))
    }

    fn get_many(&self, keys: &[(Collection, &str)]) -> Result<Vec<Option<Record>>, StoreError> {
        let read = self
            .db
            .begin_read_tx_as(&self.caller, ConsistencyMode::AtLatest)
            .map_err(backend)?;
        keys.iter()
            .map(|(c, id)| {
                Ok(read
                    .kv_get_versioned(PROJECT, c.name(), id.as_bytes())
                    .map_err(backend)?
                    .map(|(version, value)| Record { version, value }))
            })
            .collect()
    }

    fn list(
        &self,
        collection: Collection,
        q: &ListQuery<'_>,
    ) -> Result<Vec<(String, Record)>, StoreError> {
        let read = self
            .db
            .begin_read_tx_as(&self.caller, ConsistencyMode::AtLatest)
            .map_err(backend)?;
        let start = q.start.map(str::as_bytes);
        let end = q.end.map(str::as_bytes);
        let scope = collection.name();
        let entries = if q.reverse {
            read.kv_scan_range_rev_versioned(PROJECT, scope, start, end, q.limit)
        } else {
            read.kv_scan_range_versioned(PROJECT, scope, start, end, q.limit)
        }
        .map_err(backend)?;
        entries
            .into_iter()
            .map(|(k, (version, value))| {
                let id =
                    String::from_utf8(k.as_ref().to_vec()).map_err(|_| StoreError::Corrupt {
                        collection: scope,
                        id: hex::encode(k.as_ref()),
                        reason: "record id is not UTF-8".into(),
                    })?;
                Ok((id, Record { version, value }))
            })
            .collect()
    }

    fn write(&self, ops: Vec<WriteOp>, durability: Durability) -> Result<Receipt, StoreError> {
        // Expectations are assertions checked when the commit applies, so a
        // write-write conflict (another commit touched a key of this batch
        // after its snapshot) is retried here with a fresh snapshot: the
        // expectations decide again. Callers then see a conflict only when an
        // expectation fails, and it names its record.
        // Writers of one hot record (a counter, the audit head) can keep
        // beating one another in step; a random pause growing with the
        // attempts (at most ~3 ms each, ~0.1 s in all) lets one through, so
        // giving up means real overload, not bad luck.
        const WRITE_CONFLICT_RETRIES: usize = 64;
        let finality = match durability {
            Durability::Durable => CommitFinality::Durable,
            Durability::Visible => CommitFinality::Visible,
        };
        for attempt in 0..WRITE_CONFLICT_RETRIES {
            if attempt >= 2 {
                std::thread::sleep(super::conflict_pause(attempt, 50, 6));
            }
            let (tx, asserted) = self.batch(&ops)?;
            match self.db.commit_as_with_finality(&self.caller, tx, finality) {
                Ok(r) => return Ok(Receipt { seq: r.commit_seq }),
                Err(CommitError::AssertionFailed { index, .. }) => {
                    let Some(op) = asserted.get(index).and_then(|&i| ops.get(i)) else {
                        return Err(StoreError::Backend(format!(
                            "assertion {index} failed, but this batch made no such assertion"
                        )));
                    };
                    let (collection, id) = op.target();
                    let reason = match op {
                        WriteOp::Put {
                            expect: Expect::Absent,
                            ..
                        }
                        | WriteOp::Delete {
                            expect: Expect::Absent,
                            ..
                        } => "already exists",
                        _ => "changed since it was read",
                    };
                    return Err(StoreError::Conflict {
                        collection: collection.name(),
                        id: id.to_string(),
                        reason: reason.into(),
                    });
                }
                Err(CommitError::Conflict { .. }) => continue,
                Err(e) => return Err(backend(e)),
            }
        }
        Err(StoreError::Unavailable(format!(
            "a batch of {} writes lost {WRITE_CONFLICT_RETRIES} times in a row to concurrent writers",
            ops.len()
        )))
    }

    fn wait_durable(&self, receipt: Receipt) -> Result<(), StoreError> {
        self.db.wait_durable(receipt.seq).map_err(backend)
    }

    fn engine_backup(
        &self,
        dest: &Path,
        parent: Option<&Path>,
    ) -> Result<aedb::BackupReport, StoreError> {
        match parent {
            None => self.db.backup_full_as(&self.caller, dest),
            Some(parent) => self.db.backup_incremental_as(&self.caller, dest, parent),
        }
        .map_err(backend)
    }

    fn engine_audit(&self, since_id: i64) -> Result<Vec<aedb::AuditExport>, StoreError> {
        self.db
            .export_audit_as(&self.caller, since_id)
            .map_err(backend)
    }

    /// As the bootstrap admin: slowing every writer is GlobalAdmin's in aedb
    /// (a `global_admin_use` row of `aragora-system`, on the allow-list), and
    /// only operator paths that aragora audits itself reach it.
    fn set_admission_rate(
        &self,
        max_commits_per_sec: Option<u32>,
    ) -> Result<Option<u32>, StoreError> {
        let admin = CallerContext::new(BOOTSTRAP_ADMIN).map_err(backend)?;
        self.db
            .set_max_commits_per_sec_as(&admin, max_commits_per_sec)
            .map_err(backend)
    }
}
