//! [`SyncError`]: what can go wrong in a replication, sorted by what retrying would do.

use ferry_core::replicate::ReplicationError;

use crate::TlsProblem;

/// Replication failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The local store failed.
    #[error("local store: {0}")]
    Store(#[from] ferry_store::StoreError),
    /// The local replica refused a request as a whole (more items than its limits allow).
    #[error("local replica: {0}")]
    Endpoint(ferry_store::endpoint::EndpointError),
    /// The server answered with an error.
    #[error("{url} answered {status}: {error}: {reason}")]
    Http {
        /// The request URL (without credentials).
        url: String,
        /// The HTTP status.
        status: u16,
        /// CouchDB's error code.
        error: String,
        /// CouchDB's reason.
        reason: String,
    },
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach {url}: {source}")]
    Transport {
        /// The request URL (without credentials).
        url: String,
        /// The underlying error (boxed: the HTTP client is not part of this crate's API).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A TLS connection to the server could not be set up: its certificate was refused, or the
    /// handshake failed. Not transient: retrying gives the same answer.
    #[error("TLS with {url} failed: {problem}")]
    Tls {
        /// The URL (without credentials).
        url: String,
        /// What went wrong.
        problem: TlsProblem,
    },
    /// The TLS settings cannot be used (a CA file that cannot be read or holds no certificate).
    #[error("invalid TLS settings: {0}")]
    InvalidTlsOptions(String),
    /// The server answered something that is not the CouchDB protocol.
    #[error("invalid response from {url}: {detail}")]
    InvalidResponse {
        /// The request URL (without credentials).
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// An option cannot work (a count of zero, or past its bound).
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The URL is not an http(s) database URL.
    #[error("invalid database URL {0:?}: expected http(s)://host:port/database")]
    InvalidUrl(String),
    /// The peers broke the replication protocol.
    #[error("replication protocol: {0}")]
    Protocol(#[from] ReplicationError),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
    /// A sync session could not be opened, or was lost.
    #[error("sync session with {url}: {detail}")]
    Session {
        /// The session URL.
        url: String,
        /// What happened.
        detail: String,
    },
}

impl From<ferry_store::endpoint::EndpointError> for SyncError {
    fn from(error: ferry_store::endpoint::EndpointError) -> SyncError {
        match error {
            ferry_store::endpoint::EndpointError::Store(error) => SyncError::Store(error),
            other => SyncError::Endpoint(other),
        }
    }
}

impl SyncError {
    /// Whether retrying later may succeed (network trouble, server overload or restart).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Transport { .. } | SyncError::Task(_) | SyncError::Session { .. } => true,
            SyncError::Http { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }

    /// Whether the server refused the credentials (HTTP 401, or `unauthorized` in a session).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, SyncError::Http { status: 401, .. })
    }
}
