//! What each gated operation runs with. A request's `params` are stored as
//! JSON (bounded by `MAX_PARAMS_BYTES`); they are parsed into these types when
//! the request is made (a bad field is a 400 naming it, before anyone is asked
//! to approve it) and again when the approved operation runs.

use serde::{Deserialize, Serialize};

use super::catalogue::Operation;

/// Secrets one export request may name: an export is reviewed secret by secret.
pub const MAX_EXPORT_SECRETS: usize = 100;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotationParams {
    /// Rotate although the primary is not yet due.
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationRunParams {
    /// A store name or `all`.
    pub store: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleGrantParams {
    pub user_id: String,
    pub role: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomRoleParams {
    pub name: String,
    pub permissions: Vec<String>,
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeleteParams {
    pub user_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretExportParams {
    pub ids: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpUnblockParams {
    /// The block's address or network (`10.0.0.0/24`).
    pub ip: String,
}

/// Operations that take nothing (or whose params must be empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// A gated operation with its parsed parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperationParams {
    KeyRotation(KeyRotationParams),
    KeyCleanup,
    MigrationRun(MigrationRunParams),
    MasterKeyRotation,
    SessionsRevokeAll,
    PrivilegedRoleGrant(RoleGrantParams),
    CustomRoleChange(CustomRoleParams),
    UserDelete(UserDeleteParams),
    SecretExport(SecretExportParams),
    IpUnblock(IpUnblockParams),
}

fn parse<T: serde::de::DeserializeOwned + Default>(
    op: Operation,
    v: &serde_json::Value,
) -> Result<T, String> {
    if v.is_null() {
        return Ok(T::default());
    }
    parse_required(op, v)
}

fn parse_required<T: serde::de::DeserializeOwned>(
    op: Operation,
    v: &serde_json::Value,
) -> Result<T, String> {
    // serde's message names the missing or unknown field.
    serde_json::from_value(v.clone()).map_err(|e| format!("params of {op}: {e}"))
}

impl OperationParams {
    /// Parses and checks `params` for `op`; the error names the field.
    pub fn parse(op: Operation, v: &serde_json::Value) -> Result<Self, String> {
        let p = match op {
            Operation::KeyRotation => Self::KeyRotation(parse(op, v)?),
            Operation::KeyCleanup => {
                parse::<NoParams>(op, v)?;
                Self::KeyCleanup
            }
            Operation::MigrationRun => Self::MigrationRun(parse_required(op, v)?),
            Operation::MasterKeyRotation => {
                parse::<NoParams>(op, v)?;
                Self::MasterKeyRotation
            }
            Operation::SessionsRevokeAll => {
                parse::<NoParams>(op, v)?;
                Self::SessionsRevokeAll
            }
            Operation::PrivilegedRoleGrant => Self::PrivilegedRoleGrant(parse_required(op, v)?),
            Operation::CustomRoleChange => Self::CustomRoleChange(parse_required(op, v)?),
            Operation::UserDelete => Self::UserDelete(parse_required(op, v)?),
            Operation::SecretExport => {
                let p: SecretExportParams = parse_required(op, v)?;
                if p.ids.is_empty() {
                    return Err(format!("params of {op}: ids is empty"));
                }
                if p.ids.len() > MAX_EXPORT_SECRETS {
                    return Err(format!(
                        "params of {op}: ids names {} secrets, more than {MAX_EXPORT_SECRETS}",
                        p.ids.len()
                    ));
                }
                Self::SecretExport(p)
            }
            Operation::IpUnblock => Self::IpUnblock(parse_required(op, v)?),
        };
        Ok(p)
    }

    pub fn operation(&self) -> Operation {
        match self {
            Self::KeyRotation(_) => Operation::KeyRotation,
            Self::KeyCleanup => Operation::KeyCleanup,
            Self::MigrationRun(_) => Operation::MigrationRun,
            Self::MasterKeyRotation => Operation::MasterKeyRotation,
            Self::SessionsRevokeAll => Operation::SessionsRevokeAll,
            Self::PrivilegedRoleGrant(_) => Operation::PrivilegedRoleGrant,
            Self::CustomRoleChange(_) => Operation::CustomRoleChange,
            Self::UserDelete(_) => Operation::UserDelete,
            Self::SecretExport(_) => Operation::SecretExport,
            Self::IpUnblock(_) => Operation::IpUnblock,
        }
    }

    /// The params as stored on the request (normalized: defaults filled in).
    pub fn to_value(&self) -> serde_json::Value {
        let v = match self {
            Self::KeyRotation(p) => serde_json::to_value(p),
            Self::MigrationRun(p) => serde_json::to_value(p),
            Self::PrivilegedRoleGrant(p) => serde_json::to_value(p),
            Self::CustomRoleChange(p) => serde_json::to_value(p),
            Self::UserDelete(p) => serde_json::to_value(p),
            Self::SecretExport(p) => serde_json::to_value(p),
            Self::IpUnblock(p) => serde_json::to_value(p),
            Self::KeyCleanup | Self::MasterKeyRotation | Self::SessionsRevokeAll => {
                Ok(serde_json::json!({}))
            }
        };
        v.unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_are_checked_per_operation_and_errors_name_the_field() {
        assert_eq!(
            OperationParams::parse(Operation::KeyRotation, &json!(null)),
            Ok(OperationParams::KeyRotation(KeyRotationParams {
                force: false
            }))
        );
        let e =
            OperationParams::parse(Operation::MigrationRun, &json!({})).expect_err("store missing");
        assert!(e.contains("store"), "{e}");
        let e = OperationParams::parse(
            Operation::PrivilegedRoleGrant,
            &json!({"user_id": "u", "role": "admin", "extra": 1}),
        )
        .expect_err("unknown field");
        assert!(e.contains("extra"), "{e}");
        let e = OperationParams::parse(Operation::SessionsRevokeAll, &json!({"all": true}))
            .expect_err("no params");
        assert!(e.contains("all"), "{e}");
        let many: Vec<String> = (0..=MAX_EXPORT_SECRETS).map(|i| i.to_string()).collect();
        let e = OperationParams::parse(Operation::SecretExport, &json!({ "ids": many }))
            .expect_err("too many");
        assert!(e.contains("more than"), "{e}");
        for op in Operation::all() {
            let sample = match op {
                Operation::MigrationRun => json!({"store": "all"}),
                Operation::PrivilegedRoleGrant => json!({"user_id": "u", "role": "admin"}),
                Operation::CustomRoleChange => json!({"name": "r", "permissions": []}),
                Operation::UserDelete => json!({"user_id": "u"}),
                Operation::SecretExport => json!({"ids": ["a"]}),
                Operation::IpUnblock => json!({"ip": "203.0.113.9"}),
                _ => json!({}),
            };
            let p = OperationParams::parse(op, &sample).expect("parses");
            assert_eq!(p.operation(), op);
            assert_eq!(OperationParams::parse(op, &p.to_value()), Ok(p), "{op}");
        }
    }
}
