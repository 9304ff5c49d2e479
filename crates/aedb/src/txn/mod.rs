//! Transactions: MVCC read snapshots, buffered writes with read-your-writes, and
//! assertions (preconditions) checked atomically at commit.

pub(crate) mod assertion;
pub(crate) mod query;
pub(crate) mod snapshot;
pub(crate) mod write;

/// Short, non-revealing description of a key for errors: length and a hex prefix.
pub(crate) fn describe_key(key: &[u8]) -> String {
    let shown: String = key.iter().take(16).map(|b| format!("{b:02x}")).collect();
    if key.len() > 16 {
        format!("0x{shown}… ({} bytes)", key.len())
    } else {
        format!("0x{shown}")
    }
}
