//! Authorized read transactions and the helpers that decide what a DDL operation
//! needs and records.

use std::ops::Bound;
use std::sync::Arc;

use super::AedbInstance;
use crate::audit::SYSTEM_PROJECT;
use crate::authz::{CallerContext, Permission, validate_caller_id};
use crate::error::{AedbError, ReadError};
use crate::model::validate_name;
use crate::model::value::{Row, Value};
use crate::record::DdlOperation;
use crate::txn::query::{Query, QueryResult};
use crate::txn::snapshot::{KvPair, Snapshot, VersionedKvPair};

/// Reads on one snapshot, each authorized for the caller when it happens.
#[derive(Debug)]
pub struct ReadTx<'a, M> {
    pub(super) db: &'a AedbInstance<M>,
    pub(super) caller: CallerContext,
    pub(super) snapshot: Snapshot,
}

impl<M> ReadTx<'_, M> {
    pub fn seq(&self) -> u64 {
        self.snapshot.seq()
    }

    fn check(&self, project: &str, need: Permission) -> Result<(), ReadError> {
        self.db
            .authorize_read(&self.caller, project, need)
            .map_err(ReadError::narrow)
    }

    /// Authorizes a KV read of `prefix` (`None`: the whole scope) and returns
    /// the keyspace to read it from.
    fn kv_view(
        &self,
        project: &str,
        scope: &str,
        prefix: Option<&[u8]>,
    ) -> Result<crate::txn::snapshot::KvView<'_>, ReadError> {
        self.check(project, Permission::kv_read(project, scope, prefix))?;
        self.snapshot.kv(project, scope)
    }

    pub fn kv_get(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
    ) -> Result<Option<Arc<[u8]>>, ReadError> {
        self.kv_view(project, scope, Some(key))?.get(key)
    }

    /// The value and the sequence number of the commit that wrote it (the version
    /// `ReadAssertion::KeyVersion` compares against).
    pub fn kv_get_versioned(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
    ) -> Result<Option<crate::txn::snapshot::Versioned>, ReadError> {
        self.kv_view(project, scope, Some(key))?.get_versioned(key)
    }

    pub fn kv_scan_prefix(
        &self,
        project: &str,
        scope: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        self.kv_view(project, scope, Some(prefix))?
            .scan_prefix(prefix, limit)
    }

    /// A range scan needs read access to the whole scope (a range is not a prefix).
    pub fn kv_scan_range(
        &self,
        project: &str,
        scope: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        self.kv_view(project, scope, None)?
            .scan_range(start, end, limit)
    }

    /// `kv_scan_range` in descending key order.
    pub fn kv_scan_range_rev(
        &self,
        project: &str,
        scope: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        self.kv_view(project, scope, None)?
            .scan_range_rev(start, end, limit)
    }

    /// `kv_scan_prefix` with the version of each value (as `kv_get_versioned`).
    pub fn kv_scan_prefix_versioned(
        &self,
        project: &str,
        scope: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<VersionedKvPair>, ReadError> {
        self.kv_view(project, scope, Some(prefix))?
            .scan_prefix_versioned(prefix, limit)
    }

    /// `kv_scan_range` with the version of each value (as `kv_get_versioned`).
    pub fn kv_scan_range_versioned(
        &self,
        project: &str,
        scope: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<VersionedKvPair>, ReadError> {
        self.kv_view(project, scope, None)?
            .scan_range_versioned(start, end, limit)
    }

    /// `kv_scan_range_rev` with the version of each value (as `kv_get_versioned`).
    pub fn kv_scan_range_rev_versioned(
        &self,
        project: &str,
        scope: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<VersionedKvPair>, ReadError> {
        self.kv_view(project, scope, None)?
            .scan_range_rev_versioned(start, end, limit)
    }

    pub fn query(
        &self,
        project: &str,
        scope: &str,
        table: &str,
        q: &Query,
    ) -> Result<QueryResult, ReadError> {
        let need = if project == SYSTEM_PROJECT {
            Permission::AuditRead
        } else {
            Permission::table_read(project, scope, table)
        };
        self.check(project, need)?;
        self.snapshot.table(project, scope, table)?.query(q)
    }

    pub fn get_row(
        &self,
        project: &str,
        scope: &str,
        table: &str,
        pk: &[Value],
    ) -> Result<Option<Arc<Row>>, ReadError> {
        self.check(project, Permission::table_read(project, scope, table))?;
        self.snapshot.table(project, scope, table)?.get(pk)
    }
}

pub(super) fn ddl_name(op: &DdlOperation) -> &'static str {
    match op {
        DdlOperation::CreateProject { .. } => "create_project",
        DdlOperation::CreateScope { .. } => "create_scope",
        DdlOperation::CreateTable { .. } => "create_table",
        DdlOperation::DropTable { .. } => "drop_table",
        DdlOperation::GrantPermission { .. } => "grant",
        DdlOperation::RevokePermission { .. } => "revoke",
        DdlOperation::TransferOwnership { .. } => "transfer_ownership",
    }
}

/// The permission a schema operation needs.
pub(super) fn ddl_need(op: &DdlOperation) -> Permission {
    match op {
        DdlOperation::CreateProject { .. } => Permission::GlobalAdmin,
        DdlOperation::CreateScope { project, .. }
        | DdlOperation::TransferOwnership { project, .. } => Permission::ProjectAdmin {
            project: project.clone(),
        },
        DdlOperation::CreateTable { project, scope, .. }
        | DdlOperation::DropTable { project, scope, .. } => Permission::TableDdl {
            project: project.clone(),
            scope: Some(scope.clone()),
        },
        DdlOperation::GrantPermission { permission, .. }
        | DdlOperation::RevokePermission { permission, .. } => permission.clone(),
    }
}

pub(super) fn validate_ddl(op: &DdlOperation, max: usize) -> Result<(), AedbError> {
    let user_project = |p: &str| {
        validate_name("project", p, max)?;
        if p.starts_with('_') {
            return Err(AedbError::InvalidArgument(format!(
                "project names starting with '_' are reserved for the system ({p:?})"
            )));
        }
        Ok(())
    };
    match op {
        DdlOperation::CreateProject { project, owner } => {
            user_project(project)?;
            if let Some(o) = owner {
                validate_caller_id(o)?;
            }
        }
        DdlOperation::CreateScope { project, scope } => {
            user_project(project)?;
            validate_name("scope", scope, max)?;
        }
        DdlOperation::CreateTable {
            project,
            scope,
            table,
            schema,
        } => {
            user_project(project)?;
            validate_name("table", table, max)?;
            validate_name("scope", scope, max)?;
            schema.validate(table, max)?;
        }
        DdlOperation::DropTable { project, table, .. } => {
            user_project(project)?;
            validate_name("table", table, max)?;
        }
        DdlOperation::GrantPermission {
            grantee,
            permission,
            ..
        }
        | DdlOperation::RevokePermission {
            grantee,
            permission,
        } => {
            validate_principal(grantee, max)?;
            if let Some(p) = permission.project() {
                validate_name("project", p, max)?;
            }
        }
        DdlOperation::TransferOwnership { project, new_owner } => {
            user_project(project)?;
            validate_caller_id(new_owner)?;
        }
    }
    Ok(())
}

pub(super) fn validate_principal(p: &str, max: usize) -> Result<(), AedbError> {
    match p.strip_prefix("role:") {
        Some(role) => validate_name("role", role, max),
        None => validate_caller_id(p),
    }
}

/// The existing project a schema operation changes (CreateProject adds a new one
/// under the commit lock alone).
pub(super) fn ddl_project(op: &DdlOperation) -> Option<&str> {
    match op {
        DdlOperation::CreateScope { project, .. }
        | DdlOperation::CreateTable { project, .. }
        | DdlOperation::DropTable { project, .. }
        | DdlOperation::TransferOwnership { project, .. } => Some(project),
        _ => None,
    }
}
