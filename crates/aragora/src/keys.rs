//! Keys at first start. Production takes every key from the environment (boot is
//! refused otherwise, see `config`). Development generates missing keys once into
//! an owner-only file in the data directory and warns on every start, so the
//! README's run command needs nothing else.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const DEV_KEYS_FILE: &str = "dev-keys.env";

/// Why the development key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path} must be readable by its owner only (mode {mode:o}); run chmod 600")]
    Exposed { path: String, mode: u32 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the system random source failed")]
    Random,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Fills missing development keys in `vars` from (or into) `data_dir/dev-keys.env`.
pub fn load_or_generate_dev_keys(
    data_dir: &Path,
    vars: &mut BTreeMap<String, String>,
) -> Result<(), KeyFileError> {
    let path = data_dir.join(DEV_KEYS_FILE);
    let mut stored = BTreeMap::new();
    if path.exists() {
        let mode = std::fs::metadata(&path)
            .map_err(io(&path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Exposed {
                path: path.display().to_string(),
                mode,
            });
        }
        for line in std::fs::read_to_string(&path).map_err(io(&path))?.lines() {
            if let Some((k, v)) = line.split_once('=') {
                stored.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    let mut changed = false;
    let mut from_file = Vec::new();
    for (name, len) in [
        ("ARAGORA_ENCRYPTION_KEY", 32usize),
        ("AEDB_MANIFEST_KEY", 32),
        ("AEDB_CHECKPOINT_KEY", 32),
        ("JWT_SECRET", 48),
    ] {
        if vars.get(name).is_some_and(|v| !v.is_empty()) {
            continue;
        }
        // With DATABASE_URL the state lives in PostgreSQL: no embedded store
        // whose keys would be needed (or generated and left unused).
        if name.starts_with("AEDB_")
            && vars
                .get("DATABASE_URL")
                .is_some_and(|v| !v.trim().is_empty())
        {
            continue;
        }
        let value = match stored.get(name) {
            Some(v) => v.clone(),
            None => {
                let mut b = vec![0u8; len];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                    .map_err(|_| KeyFileError::Random)?;
                changed = true;
                let v = hex::encode(&b);
                stored.insert(name.to_string(), v.clone());
                v
            }
        };
        from_file.push(name);
        vars.insert(name.to_string(), value);
    }
    if !from_file.is_empty() {
        tracing::warn!(keys = %from_file.join(","), file = %path.display(), "development mode: using generated keys (set ARAGORA_ENV=production to require keys from the environment)");
    }
    if changed {
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        for (k, v) in &stored {
            writeln!(f, "{k}={v}").map_err(io(&path))?;
        }
        f.sync_all().map_err(io(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_generates_the_embedded_store_keys_only_without_database_url() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut vars = BTreeMap::new();
        load_or_generate_dev_keys(dir.path(), &mut vars).expect("generate");
        assert!(vars.contains_key("AEDB_MANIFEST_KEY"));
        assert!(vars.contains_key("ARAGORA_ENCRYPTION_KEY"));

        let dir = tempfile::tempdir().expect("tempdir");
        let mut vars: BTreeMap<String, String> = [(
            "DATABASE_URL".to_string(),
            "postgres://127.0.0.1/test".to_string(),
        )]
        .into();
        load_or_generate_dev_keys(dir.path(), &mut vars).expect("generate");
        assert!(!vars.contains_key("AEDB_MANIFEST_KEY"));
        assert!(!vars.contains_key("AEDB_CHECKPOINT_KEY"));
        assert!(vars.contains_key("ARAGORA_ENCRYPTION_KEY"));
        assert!(vars.contains_key("JWT_SECRET"));
        let file = std::fs::read_to_string(dir.path().join(DEV_KEYS_FILE)).expect("file");
        assert!(!file.contains("AEDB_"), "{file}");
    }
}
