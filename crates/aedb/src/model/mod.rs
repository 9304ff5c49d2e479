//! Projects, scopes, tables and KV keyspaces: the data model and its in-memory state.

pub(crate) mod bytes;
pub(crate) mod state;
pub(crate) mod value;

use crate::error::AedbError;

/// Names of projects, scopes, tables and columns: non-empty, bounded, printable ASCII
/// identifiers, so they can appear in errors, paths and audit rows without escaping.
pub(crate) fn validate_name(kind: &'static str, name: &str, max: usize) -> Result<(), AedbError> {
    if name.is_empty() || name.len() > max {
        return Err(AedbError::InvalidArgument(format!(
            "{kind} name must be 1..={max} bytes, got {}",
            name.len()
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(AedbError::InvalidArgument(format!(
            "{kind} name {name:?} may only contain ASCII letters, digits, '_', '-' and '.'"
        )));
    }
    Ok(())
}
