//! Preconditions a commit must satisfy against the latest state at commit time.

use crate::authz::Permission;
use crate::error::AedbError;
use crate::model::state::DbState;
use crate::model::value::Value;
use crate::tableset::{kv_space, row_space};
use crate::txn::describe_key;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Lt,
    Le,
    Eq,
    Ne,
    Ge,
    Gt,
}

/// A read-side precondition. Absence is `Not(KeyExists)`; `KeyVersion` with
/// version 0 also means "absent".
#[derive(Clone, Debug, PartialEq)]
pub enum ReadAssertion {
    KeyExists {
        scope: String,
        key: Vec<u8>,
    },
    KeyEquals {
        scope: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    KeyVersion {
        scope: String,
        key: Vec<u8>,
        version: u64,
    },
    /// Bytewise comparison of the stored value with `value` (false when absent).
    KeyCompare {
        scope: String,
        key: Vec<u8>,
        op: CompareOp,
        value: Vec<u8>,
    },
    RowExists {
        scope: String,
        table: String,
        pk: Vec<Value>,
    },
    RowVersion {
        scope: String,
        table: String,
        pk: Vec<Value>,
        version: u64,
    },
    All(Vec<ReadAssertion>),
    Any(Vec<ReadAssertion>),
    Not(Box<ReadAssertion>),
}

impl ReadAssertion {
    pub fn key_absent(scope: impl Into<String>, key: impl Into<Vec<u8>>) -> Self {
        ReadAssertion::Not(Box::new(ReadAssertion::KeyExists {
            scope: scope.into(),
            key: key.into(),
        }))
    }

    /// Describes the assertion without revealing values (keys as a hex prefix).
    pub fn describe(&self) -> String {
        match self {
            ReadAssertion::KeyExists { scope, key } => {
                format!("KeyExists(scope {scope:?}, key {})", describe_key(key))
            }
            ReadAssertion::KeyEquals { scope, key, value } => format!(
                "KeyEquals(scope {scope:?}, key {}, expected <{} bytes>)",
                describe_key(key),
                value.len()
            ),
            ReadAssertion::KeyVersion {
                scope,
                key,
                version,
            } => format!(
                "KeyVersion(scope {scope:?}, key {}, expected version {version})",
                describe_key(key)
            ),
            ReadAssertion::KeyCompare {
                scope,
                key,
                op,
                value,
            } => format!(
                "KeyCompare(scope {scope:?}, key {}, {op:?} <{} bytes>)",
                describe_key(key),
                value.len()
            ),
            ReadAssertion::RowExists { scope, table, pk } => {
                format!(
                    "RowExists(scope {scope:?}, table {table:?}, {} key values)",
                    pk.len()
                )
            }
            ReadAssertion::RowVersion {
                scope,
                table,
                version,
                ..
            } => {
                format!("RowVersion(scope {scope:?}, table {table:?}, expected version {version})")
            }
            ReadAssertion::All(v) => format!("All({} assertions)", v.len()),
            ReadAssertion::Any(v) => format!("Any({} assertions)", v.len()),
            ReadAssertion::Not(a) => format!("Not({})", a.describe()),
        }
    }

    /// Read permissions evaluating this assertion needs.
    pub(crate) fn read_needs(
        &self,
        project: &str,
        out: &mut std::collections::BTreeSet<Permission>,
    ) {
        match self {
            ReadAssertion::KeyExists { scope, key }
            | ReadAssertion::KeyEquals { scope, key, .. }
            | ReadAssertion::KeyVersion { scope, key, .. }
            | ReadAssertion::KeyCompare { scope, key, .. } => {
                out.insert(Permission::KvRead {
                    project: project.to_string(),
                    scope: Some(scope.clone()),
                    prefix: Some(key.clone()),
                });
            }
            ReadAssertion::RowExists { scope, table, .. }
            | ReadAssertion::RowVersion { scope, table, .. } => {
                out.insert(Permission::TableRead {
                    project: project.to_string(),
                    scope: Some(scope.clone()),
                    table: Some(table.clone()),
                });
            }
            ReadAssertion::All(v) | ReadAssertion::Any(v) => {
                for a in v {
                    a.read_needs(project, out);
                }
            }
            ReadAssertion::Not(a) => a.read_needs(project, out),
        }
    }

    /// What was found instead, without revealing values: presence, version, size.
    pub(crate) fn actual_redacted(&self, state: &DbState, project: &str) -> String {
        match self {
            ReadAssertion::KeyExists { scope, key }
            | ReadAssertion::KeyEquals { scope, key, .. }
            | ReadAssertion::KeyVersion { scope, key, .. }
            | ReadAssertion::KeyCompare { scope, key, .. } => {
                match kv_space(state, project, scope)
                    .ok()
                    .and_then(|s| s.get(key.as_slice()).ok().flatten())
                {
                    Some(e) => match &e.value {
                        Some(v) => format!("present, version {}, <{} bytes>", e.version, v.len()),
                        None => format!("absent (deleted at version {})", e.version),
                    },
                    None => "absent".to_string(),
                }
            }
            ReadAssertion::RowExists { scope, table, pk }
            | ReadAssertion::RowVersion {
                scope, table, pk, ..
            } => {
                let found = state.table(project, scope, table).ok().and_then(|t| {
                    let k = t.schema.encode_pk(table, pk).ok()?;
                    row_space(state, project, scope, table)
                        .ok()?
                        .get_live(k.as_slice())
                        .ok()
                        .flatten()
                        .map(|(v, _)| v)
                });
                match found {
                    Some(v) => format!("present, version {v}"),
                    None => "absent".to_string(),
                }
            }
            ReadAssertion::All(_) | ReadAssertion::Any(_) | ReadAssertion::Not(_) => {
                "composite condition is false".to_string()
            }
        }
    }

    /// Evaluates against `state` for `project`. Unknown scopes or tables are errors
    /// (a typo must not read as "absent").
    pub(crate) fn eval(&self, state: &DbState, project: &str) -> Result<bool, AedbError> {
        let kv = |scope: &str, key: &[u8]| -> Result<Option<(u64, Vec<u8>)>, AedbError> {
            Ok(kv_space(state, project, scope)?
                .get_live(key)?
                .map(|(version, v)| (version, v.to_vec())))
        };
        let row_version = |scope: &str, table: &str, pk: &[Value]| -> Result<u64, AedbError> {
            let t = state.table(project, scope, table)?;
            let key = t.schema.encode_pk(table, pk)?;
            Ok(row_space(state, project, scope, table)?
                .get_live(key.as_slice())?
                .map_or(0, |(v, _)| v))
        };
        Ok(match self {
            ReadAssertion::KeyExists { scope, key } => kv(scope, key)?.is_some(),
            ReadAssertion::KeyEquals { scope, key, value } => {
                kv(scope, key)?.is_some_and(|(_, v)| &v == value)
            }
            ReadAssertion::KeyVersion {
                scope,
                key,
                version,
            } => kv(scope, key)?.map_or(0, |(v, _)| v) == *version,
            ReadAssertion::KeyCompare {
                scope,
                key,
                op,
                value,
            } => kv(scope, key)?.is_some_and(|(_, v)| {
                let o = v.as_slice().cmp(value.as_slice());
                match op {
                    CompareOp::Lt => o.is_lt(),
                    CompareOp::Le => o.is_le(),
                    CompareOp::Eq => o.is_eq(),
                    CompareOp::Ne => o.is_ne(),
                    CompareOp::Ge => o.is_ge(),
                    CompareOp::Gt => o.is_gt(),
                }
            }),
            ReadAssertion::RowExists { scope, table, pk } => row_version(scope, table, pk)? != 0,
            ReadAssertion::RowVersion {
                scope,
                table,
                pk,
                version,
            } => row_version(scope, table, pk)? == *version,
            ReadAssertion::All(v) => {
                for a in v {
                    if !a.eval(state, project)? {
                        return Ok(false);
                    }
                }
                true
            }
            ReadAssertion::Any(v) => {
                for a in v {
                    if a.eval(state, project)? {
                        return Ok(true);
                    }
                }
                false
            }
            ReadAssertion::Not(a) => !a.eval(state, project)?,
        })
    }
}
