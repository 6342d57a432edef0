//! TLS termination: `ferry serve --tls-cert --tls-key` serves HTTPS and WSS itself.
//!
//! Each connection's handshake runs in the connection's own task (`connections`) under a
//! timeout, so a client that connects and then says nothing (or trickles its ClientHello) holds
//! only its own task and connection slot, never the accept loop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The server's certificate and key, checked, and how long a handshake may take.
///
/// Built with [`TlsConfig::from_pem`] or [`TlsConfig::from_pem_files`], which refuse a
/// certificate or key that cannot be used, so a server with a `TlsConfig` always starts.
#[derive(Clone)]
pub struct TlsConfig {
    server: Arc<rustls::ServerConfig>,
    /// A client that has not completed the TLS handshake this long after connecting is
    /// disconnected (10 s by default).
    pub handshake_timeout: Duration,
}

/// A certificate or key that cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate chain is not PEM, or holds no `CERTIFICATE`.
    #[error("the TLS certificate {0}")]
    Certificate(String),
    /// The private key is not PEM, or holds no key of a known kind.
    #[error("the TLS private key {0}")]
    PrivateKey(String),
    /// The certificate and key were read but cannot be served together (the key is not the
    /// certificate's, or of a kind rustls cannot sign with).
    #[error("the TLS certificate and key cannot be used: {0}")]
    Unusable(String),
}

impl TlsConfig {
    /// The default handshake timeout.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

    /// Serves `certificate_chain` (PEM: the server's certificate first, then the intermediate
    /// authorities' ones) with `private_key` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(
        certificate_chain: &[u8],
        private_key: &[u8],
    ) -> Result<TlsConfig, TlsConfigError> {
        let chain = CertificateDer::pem_slice_iter(certificate_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsConfigError::Certificate(format!("is not valid PEM: {error}")))?;
        if chain.is_empty() {
            return Err(TlsConfigError::Certificate(
                "holds no PEM CERTIFICATE block".into(),
            ));
        }
        warn_if_refused_as_server_certificate(&chain);
        let key = PrivateKeyDer::from_pem_slice(private_key).map_err(|error| {
            TlsConfigError::PrivateKey(format!(
                "holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {error}"
            ))
        })?;
        // The provider is named rather than taken from the process default, so the server
        // does not depend on which rustls features other crates enable.
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsConfigError::Unusable(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| TlsConfigError::Unusable(error.to_string()))?;
        // The router speaks HTTP/1.1 only; saying so lets clients that offer h2 pick 1.1.
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsConfig {
            server: Arc::new(server),
            handshake_timeout: TlsConfig::DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// [`TlsConfig::from_pem`] with the contents of two files; errors name the file.
    pub fn from_pem_files(
        certificate_chain: &Path,
        private_key: &Path,
    ) -> Result<TlsConfig, TlsConfigError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsConfigError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let (chain, key) = (read(certificate_chain)?, read(private_key)?);
        TlsConfig::from_pem(&chain, &key).map_err(|error| match error {
            TlsConfigError::Certificate(detail) => {
                TlsConfigError::Certificate(format!("{}: {detail}", certificate_chain.display()))
            }
            TlsConfigError::PrivateKey(detail) => {
                TlsConfigError::PrivateKey(format!("{}: {detail}", private_key.display()))
            }
            other => other,
        })
    }
}

/// Warns about a server certificate that is a certificate authority's (`CA:TRUE`, what
/// `openssl req -x509` makes by default): rustls clients (`ferry sync`, the SDK) refuse it even
/// when trusted, OpenSSL-based ones (PouchDB under Node) accept it, so it is not an error.
fn warn_if_refused_as_server_certificate(chain: &[CertificateDer<'static>]) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    // The certificate vouches for itself: only the checks of the certificate itself matter.
    if roots.add(chain[0].clone()).is_err() {
        return;
    }
    let Ok(verifier) =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
    else {
        return;
    };
    let name = rustls_pki_types::ServerName::try_from("ferry.invalid").expect("a valid name");
    let verified = rustls::client::danger::ServerCertVerifier::verify_server_cert(
        &*verifier,
        &chain[0],
        &chain[1..],
        &name,
        &[],
        rustls_pki_types::UnixTime::now(),
    );
    if let Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) = verified
        && matches!(
            other.0.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::CaUsedAsEndEntity)
        )
    {
        tracing::warn!(
            "the TLS certificate is a certificate authority's (CA:TRUE): ferry sync and the SDK \
             refuse it as a server's certificate; make it with basicConstraints CA:FALSE (see \
             docs/protocol.md, TLS)"
        );
    }
}

impl TlsConfig {
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }
}

impl std::fmt::Debug for TlsConfig {
    // Never print key material, even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Completes the handshake of one connection, or gives up on it after `timeout`.
pub(crate) async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    address: SocketAddr,
    timeout: Duration,
) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
    let handshake = async {
        let mut first = [0u8; 1];
        stream.peek(&mut first).await?;
        if first[0].is_ascii_uppercase() {
            // An HTTP method: a plain-HTTP client at the TLS port. An answer it can read
            // beats a TLS alert it would report as a garbled response.
            refuse_plain_http(stream).await?;
            return Ok(None);
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            return Ok(None);
        }
        acceptor.accept(stream).await.map(Some)
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(Some(stream))) => Some((stream, address)),
        Ok(Ok(None)) => {
            tracing::debug!(%address, "not a TLS client; disconnected");
            None
        }
        Ok(Err(error)) => {
            tracing::debug!(%address, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%address, "TLS handshake timed out");
            None
        }
    }
}

/// The most of a plain-HTTP request read before answering it.
const PLAIN_REQUEST_HEAD_LIMIT: usize = 16 * 1024;

/// Answers a plain-HTTP request with 400 and the reason, CouchDB-shaped like every error.
async fn refuse_plain_http(mut stream: TcpStream) -> std::io::Result<()> {
    // Read the request head first: closing a socket with unread data makes the kernel reset
    // the connection, and the client might lose the answer.
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n")
        && head.len() < PLAIN_REQUEST_HEAD_LIMIT
    {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let body = r#"{"error":"bad_request","reason":"this server speaks TLS only: use https:// (or wss://)"}"#;
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
