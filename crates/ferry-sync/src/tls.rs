//! TLS for the peers on a server: which certificate authorities they trust, and what a failed
//! handshake means.
//!
//! Both transports ([`crate::HttpPeer`] over reqwest, [`crate::WsPeer`] over tokio-tungstenite)
//! get the same `rustls::ClientConfig` from here, so `https://` and `wss://` trust exactly the
//! same certificates and fail with the same [`TlsProblem`]s.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::{CertificateError, ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::SyncError;

/// Which certificates a peer on an `https://` (or `wss://`) server trusts.
///
/// By default, the certificate authorities of the web (Mozilla's list, compiled in). A server
/// with a self-signed certificate or one from a private authority is trusted by adding that
/// certificate (or the authority's) with [`TlsOptions::trusting_ca_pem`] or
/// [`TlsOptions::trusting_ca_file`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct TlsOptions {
    /// PEM certificates (one or more `CERTIFICATE` blocks) trusted as certificate authorities
    /// in addition to the built-in ones.
    pub extra_ca_pem: Option<Vec<u8>>,
}

impl TlsOptions {
    /// Also trusts the certificate authorities in `pem`.
    pub fn trusting_ca_pem(pem: impl Into<Vec<u8>>) -> TlsOptions {
        TlsOptions {
            extra_ca_pem: Some(pem.into()),
        }
    }

    /// Also trusts the certificate authorities in the PEM file at `path`, read now.
    pub fn trusting_ca_file(path: impl AsRef<Path>) -> Result<TlsOptions, SyncError> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|error| {
            SyncError::InvalidTlsOptions(format!(
                "cannot read the CA file {}: {error}",
                path.display()
            ))
        })?;
        Ok(TlsOptions::trusting_ca_pem(pem))
    }

    /// The client configuration both transports use, checking the extra certificates.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, SyncError> {
        let Some(pem) = &self.extra_ca_pem else {
            return Ok(default_client_config());
        };
        let mut roots = web_roots();
        let mut added = 0;
        for certificate in CertificateDer::pem_slice_iter(pem) {
            let certificate = certificate.map_err(|error| {
                SyncError::InvalidTlsOptions(format!(
                    "the CA certificates are not valid PEM: {error}"
                ))
            })?;
            roots.add(certificate).map_err(|error| {
                SyncError::InvalidTlsOptions(format!("a CA certificate is not usable: {error}"))
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(SyncError::InvalidTlsOptions(
                "no CERTIFICATE found in the CA certificates' PEM".into(),
            ));
        }
        Ok(Arc::new(client_config(roots)))
    }
}

impl std::fmt::Debug for TlsOptions {
    // A bundle of certificates is long and says nothing in a log; its size is enough.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field(
                "extra_ca_pem",
                &self
                    .extra_ca_pem
                    .as_ref()
                    .map(|pem| format!("{} bytes", pem.len())),
            )
            .finish()
    }
}

fn web_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

fn client_config(roots: RootCertStore) -> ClientConfig {
    // The provider is named rather than taken from the process default: the binary then never
    // depends on which rustls features other crates enabled, nor on an installed default.
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The configuration without extra authorities, built once: every peer of a process shares it.
pub(crate) fn default_client_config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| Arc::new(client_config(web_roots())))
        .clone()
}

/// Why a TLS connection to the server failed. Retrying does not help with any of these: the
/// certificate, the client's trust or the server's setup must change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsProblem {
    /// The server's certificate does not lead to an authority the client trusts: it is
    /// self-signed or from a private authority that was not added ([`TlsOptions`]).
    #[error(
        "the server's certificate is not trusted ({detail}): no certificate authority this \
         client trusts signed it"
    )]
    UntrustedCertificate {
        /// What the verifier said.
        detail: String,
    },
    /// The certificate is valid, but for other host names than the one in the URL.
    #[error("the server's certificate is not valid for this host name ({detail})")]
    WrongHostName {
        /// What the verifier said (with the names the certificate is valid for).
        detail: String,
    },
    /// The certificate has expired or is not valid yet (or this machine's clock is wrong).
    #[error("the server's certificate is expired or not yet valid ({detail})")]
    Expired {
        /// What the verifier said.
        detail: String,
    },
    /// The server presents a certificate authority's certificate (`CA:TRUE`) as its own, as
    /// `openssl req -x509` makes by default: refused even when trusted.
    #[error(
        "the server's certificate is a certificate authority's (CA:TRUE), which cannot be a \
         server's own ({detail}): make the server's certificate with CA:FALSE, or issue one \
         from that authority"
    )]
    CaCertificateAsServerCertificate {
        /// What the verifier said.
        detail: String,
    },
    /// The certificate was refused for another reason (revoked, malformed, wrong purpose).
    #[error("the server's certificate was refused ({detail})")]
    InvalidCertificate {
        /// What the verifier said.
        detail: String,
    },
    /// What came back is not TLS: most likely the server speaks plain HTTP on that port.
    #[error("the server did not answer in TLS ({detail}); if it serves plain HTTP, use http://")]
    NotTls {
        /// What the TLS library said.
        detail: String,
    },
    /// The handshake failed otherwise (no protocol version or cipher in common, an alert from
    /// the server).
    #[error("the TLS handshake failed ({detail})")]
    Handshake {
        /// What the TLS library said.
        detail: String,
    },
}

impl TlsProblem {
    fn from_rustls(error: &rustls::Error) -> TlsProblem {
        let detail = error.to_string();
        match error {
            rustls::Error::InvalidCertificate(certificate) => match certificate {
                CertificateError::UnknownIssuer => TlsProblem::UntrustedCertificate { detail },
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    TlsProblem::WrongHostName { detail }
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsProblem::Expired { detail },
                CertificateError::Other(other)
                    if matches!(
                        other.0.downcast_ref::<webpki::Error>(),
                        Some(webpki::Error::CaUsedAsEndEntity)
                    ) =>
                {
                    TlsProblem::CaCertificateAsServerCertificate { detail }
                }
                _ => TlsProblem::InvalidCertificate { detail },
            },
            rustls::Error::InvalidMessage(_) => TlsProblem::NotTls { detail },
            _ => TlsProblem::Handshake { detail },
        }
    }
}

/// The TLS problem behind `error`, if a TLS error is somewhere in its chain of causes.
///
/// reqwest and tungstenite wrap rustls' error in `io::Error`s (reqwest in two), whose
/// `source()` skips the error they carry: the walk goes into what an `io::Error` carries
/// instead.
pub(crate) fn tls_problem(error: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(rustls) = error.downcast_ref::<rustls::Error>() {
            return Some(TlsProblem::from_rustls(rustls));
        }
        current = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|carried| carried as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    None
}
