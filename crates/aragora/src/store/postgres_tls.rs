//! TLS to PostgreSQL, chosen by the connection string's `sslmode` as libpq
//! users write it, with one deliberate difference: whenever TLS is used the
//! server's certificate chain and host name are verified (rustls), so
//! `require` and `verify-ca` mean what `verify-full` means to libpq. A
//! connection that is encrypted but unauthenticated protects against nobody
//! who can already intercept it.
//!
//! - no `sslmode`, or `disable`: plain TCP (a private network, a Unix socket);
//! - `prefer`: TLS when the server offers it, verified; plain when it does not;
//! - `require`, `verify-ca`, `verify-full`: TLS, verified, or no connection.
//!
//! Roots: the PEM file named by `ARAGORA_DATABASE_CA_FILE` (a private CA, or a
//! self-signed server certificate), else the Mozilla roots (webpki-roots).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::StoreError;

/// How a connection string asks for TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No `sslmode` or `sslmode=disable`.
    Disabled,
    /// `sslmode=prefer`.
    Preferred,
    /// `sslmode=require`, `verify-ca` or `verify-full`.
    Required,
}

impl TlsMode {
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Disabled => "disabled",
            TlsMode::Preferred => "preferred",
            TlsMode::Required => "required",
        }
    }
}

/// The `sslmode` a connection string names (URL query or key=value form), and
/// the string rewritten for tokio-postgres, which knows `disable`, `prefer`
/// and `require` only.
pub fn tls_mode(url: &str) -> Result<(TlsMode, String), StoreError> {
    let Some(at) = url.find("sslmode=") else {
        return Ok((TlsMode::Disabled, url.to_string()));
    };
    let value_start = at + "sslmode=".len();
    let value_end = url[value_start..]
        .find(|c: char| c == '&' || c.is_whitespace())
        .map_or(url.len(), |n| value_start + n);
    let value = &url[value_start..value_end];
    let (mode, rewritten) = match value {
        "disable" => (TlsMode::Disabled, "disable"),
        "allow" | "prefer" => (TlsMode::Preferred, "prefer"),
        "require" | "verify-ca" | "verify-full" => (TlsMode::Required, "require"),
        _ => {
            return Err(StoreError::Backend(format!(
                "DATABASE_URL has sslmode={value}: use disable, prefer, require, verify-ca or \
                 verify-full"
            )));
        }
    };
    Ok((
        mode,
        format!("{}{rewritten}{}", &url[..value_start], &url[value_end..]),
    ))
}

/// The roots a server certificate must chain to.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, StoreError> {
    let mut roots = RootCertStore::empty();
    let Some(path) = ca_file else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    };
    let problem = |reason: String| {
        StoreError::Backend(format!(
            "ARAGORA_DATABASE_CA_FILE ({}): {reason}",
            path.display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| problem(e.to_string()))?;
    let mut added = 0usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| problem(format!("not a PEM certificate ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| problem(format!("certificate refused ({e})")))?;
        added += 1;
    }
    if added == 0 {
        return Err(problem("holds no PEM certificate".into()));
    }
    Ok(roots)
}

/// The rustls connector for `mode`, or `None` for plain connections.
pub fn connector(
    mode: TlsMode,
    ca_file: Option<&PathBuf>,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
    if mode == TlsMode::Disabled {
        return Ok(None);
    }
    let roots = root_store(ca_file.map(PathBuf::as_path))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| StoreError::Backend(format!("PostgreSQL TLS settings: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_read_from_either_form_and_rewritten_for_the_client() {
        let cases = [
            ("postgres://u@h/db", TlsMode::Disabled, "postgres://u@h/db"),
            (
                "postgres://u@h/db?sslmode=verify-full",
                TlsMode::Required,
                "postgres://u@h/db?sslmode=require",
            ),
            (
                "postgres://u@h/db?application_name=x&sslmode=verify-ca&connect_timeout=3",
                TlsMode::Required,
                "postgres://u@h/db?application_name=x&sslmode=require&connect_timeout=3",
            ),
            (
                "host=h user=u sslmode=prefer dbname=d",
                TlsMode::Preferred,
                "host=h user=u sslmode=prefer dbname=d",
            ),
            (
                "host=h sslmode=disable",
                TlsMode::Disabled,
                "host=h sslmode=disable",
            ),
        ];
        for (url, mode, rewritten) in cases {
            let (m, r) = tls_mode(url).expect(url);
            assert_eq!((m, r.as_str()), (mode, rewritten), "{url}");
        }
        let err = tls_mode("postgres://u:pw@h/db?sslmode=maybe").expect_err("unknown mode");
        assert!(err.to_string().contains("sslmode=maybe"), "{err}");
        assert!(!err.to_string().contains("pw"), "never the password: {err}");
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        let err = root_store(Some(&empty)).expect_err("no certificate");
        assert!(
            err.to_string().contains("ARAGORA_DATABASE_CA_FILE"),
            "{err}"
        );
        let missing = dir.path().join("missing.pem");
        let err = root_store(Some(&missing)).expect_err("missing file");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        assert!(
            !root_store(None).expect("default roots").is_empty(),
            "the Mozilla roots by default"
        );
    }
}
