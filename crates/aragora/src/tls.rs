//! The optional HTTPS listener: the certificate chain and key from PEM files
//! (ARAGORA_TLS_CERT_FILE, ARAGORA_TLS_KEY_FILE) as a rustls server
//! configuration (TLS 1.2 and 1.3 only, the `ring` provider the rest of the
//! crate already uses), and their reload on SIGHUP: a reload that fails keeps
//! the certificate in use, so a half-written renewal never takes HTTPS down.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;
use crate::metrics::Metrics;

/// Why the certificate or key cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{var}: cannot read {}: {source}", path.display())]
    Read {
        var: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ARAGORA_TLS_CERT_FILE: {} holds no PEM certificate ({reason})", path.display())]
    Certificate { path: PathBuf, reason: String },
    #[error("ARAGORA_TLS_KEY_FILE: {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1) ({reason})", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("ARAGORA_TLS_CERT_FILE {} and ARAGORA_TLS_KEY_FILE {} are not a usable pair: {reason}", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

fn read(var: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        var,
        path: path.to_path_buf(),
        source,
    })
}

/// PEM problems in words (the library prints markers as byte lists).
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a section has no -----END {}----- line (truncated file?)",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("malformed line {:?}", String::from_utf8_lossy(line))
        }
        Error::NoItemsFound => "no section of the expected kind".into(),
        other => other.to_string(),
    }
}

/// Reads and checks both files: the chain parses, the key parses, and the key
/// belongs to the first certificate.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = read("ARAGORA_TLS_CERT_FILE", &files.cert)?;
    let key_pem = zeroize::Zeroizing::new(read("ARAGORA_TLS_KEY_FILE", &files.key)?);
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate {
            path: files.cert.clone(),
            reason: pem_problem(&e),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: files.cert.clone(),
            reason: "no CERTIFICATE section".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        reason: pem_problem(&e),
    })?;
    let pair = |reason: String| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| pair(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// On every SIGHUP (`hup`: registered by the caller before it announces the
/// server, so an early one is not lost): reload the certificate into `live`
/// (new connections get it; open ones keep theirs), or log why not and keep
/// the current one.
/// Counted in `aragora_tls_certificate_reloads_total{outcome}`.
pub async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    live: RustlsConfig,
    files: TlsFiles,
    metrics: Metrics,
) {
    while hup.recv().await.is_some() {
        let f = files.clone();
        let loaded = tokio::task::spawn_blocking(move || server_config(&f))
            .await
            .map_err(|e| format!("reload task failed: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        match loaded {
            Ok(config) => {
                live.reload_from_config(config);
                metrics
                    .tls_certificate_reloads
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                metrics
                    .tls_certificate_reloads
                    .with_label_values(&["failed"])
                    .inc();
                tracing::error!(error = %e, "TLS certificate reload failed; the current certificate stays in use");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn a_valid_pair_loads_and_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let files = |c: &str, k: &str| TlsFiles {
            cert: write(dir.path(), "cert.pem", c),
            key: write(dir.path(), "key.pem", k),
        };
        assert!(server_config(&files(&cert, &key)).is_ok());

        let missing = TlsFiles {
            cert: dir.path().join("absent.pem"),
            key: dir.path().join("key.pem"),
        };
        let e = server_config(&missing).expect_err("missing").to_string();
        assert!(
            e.contains("ARAGORA_TLS_CERT_FILE") && e.contains("absent.pem"),
            "{e}"
        );
        let e = server_config(&files("not a certificate", &key))
            .expect_err("garbage cert")
            .to_string();
        assert!(
            e.contains("ARAGORA_TLS_CERT_FILE") && e.contains("cert.pem"),
            "{e}"
        );
        let e = server_config(&files(&cert, &cert))
            .expect_err("cert as key")
            .to_string();
        assert!(
            e.contains("ARAGORA_TLS_KEY_FILE") && e.contains("key.pem"),
            "{e}"
        );
        let e = server_config(&files(&cert, &other_key))
            .expect_err("key of another certificate")
            .to_string();
        assert!(e.contains("not a usable pair"), "{e}");
    }
}
