//! The logical content of one WAL frame: a committed transaction or a DDL change.
//! Encoded with postcard; the frame around it is in `wal::format`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::audit::AuditRow;
use crate::authz::Permission;
use crate::error::AedbError;
use crate::model::bytes::{Bytes, SharedBytes};
use crate::model::value::{Row, TableSchema};

/// The idempotency key of a commit, scoped to the caller that supplied it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct IdempotencyTag {
    pub caller: String,
    pub key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum WriteOp {
    KvSet {
        scope: String,
        key: Bytes,
        value: SharedBytes,
    },
    KvDel {
        scope: String,
        key: Bytes,
    },
    RowPut {
        scope: String,
        table: String,
        /// Encoded primary key (derived from `row`, logged so replay needs no schema work).
        key: Bytes,
        row: Arc<Row>,
    },
    RowDel {
        scope: String,
        table: String,
        key: Bytes,
    },
}

/// A schema or authorization change, committed by `commit_ddl_as` (several in one
/// call commit atomically, each with its own audit row).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DdlOperation {
    CreateProject {
        project: String,
        /// Owner of the new project; None: the calling caller (anonymous: no owner).
        owner: Option<String>,
    },
    CreateScope {
        project: String,
        scope: String,
    },
    CreateTable {
        project: String,
        scope: String,
        table: String,
        schema: TableSchema,
    },
    DropTable {
        project: String,
        scope: String,
        table: String,
    },
    GrantPermission {
        /// A caller id, or `role:NAME`.
        grantee: String,
        permission: Permission,
        delegable: bool,
    },
    RevokePermission {
        grantee: String,
        permission: Permission,
    },
    TransferOwnership {
        project: String,
        new_owner: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum WalRecord {
    Commit {
        project: String,
        ops: Vec<WriteOp>,
        idempotency: Option<IdempotencyTag>,
        /// Audit rows recorded with this commit (GlobalAdmin use).
        audit: Vec<AuditRow>,
    },
    Ddl {
        /// The authenticated caller (None: anonymous, development instances).
        actor: Option<String>,
        ops: Vec<DdlOperation>,
        audit: Vec<AuditRow>,
    },
    /// The one-time creation of the first GlobalAdmin.
    Bootstrap { admin: String, audit: Vec<AuditRow> },
    /// Audit rows on their own: denials, failed assertions, GlobalAdmin reads.
    Audit { rows: Vec<AuditRow> },
}

impl WalRecord {
    pub fn encode(&self) -> Result<Vec<u8>, AedbError> {
        postcard::to_stdvec(self)
            .map_err(|e| AedbError::InvalidArgument(format!("unencodable record: {e}")))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, AedbError> {
        postcard::from_bytes(bytes)
            .map_err(|e| AedbError::InvalidArgument(format!("undecodable WAL record: {e}")))
    }
}
