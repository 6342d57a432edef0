//! Runs Ferry's replication between two peers: a local store, or a remote server over the
//! CouchDB replication protocol.
//!
//! The algorithm itself is `ferry_core::replicate::Replication`, a state machine with no I/O.
//! This crate is its async shell: a [`Peer`] trait with two implementations ([`LocalPeer`] over
//! a `ferry_store::Database`, [`HttpPeer`] over HTTP, [`WsPeer`] over a WebSocket sync
//! session as `docs/protocol.md` describes it; both speak TLS for `https://` URLs, trusting
//! what [`TlsOptions`] says), and the drivers [`replicate`] (one way,
//! one-shot or continuous) and [`sync`] (push, then pull). Both ways continuously, with a
//! client replica's outbox, is the SDK's (`ferry_client::Ferry`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use ferry_store::{Backend, Edit, StoreConfig, sqlite::SqliteBackend};
//! use ferry_sync::{LocalPeer, ReplicationOptions, replicate};
//!
//! let dir = tempfile::tempdir()?;
//! let backend = SqliteBackend::open(dir.path(), StoreConfig::default())?;
//! let (a, b) = (backend.create_database("a")?, backend.create_database("b")?);
//! let body = serde_json::json!({"title": "milk"}).as_object().unwrap().clone();
//! a.write_edits(vec![Edit::put("todos:1", None, body)])?;
//!
//! let stats = replicate(
//!     &LocalPeer::new(a)?,
//!     &LocalPeer::new(b.clone())?,
//!     &ReplicationOptions::default(),
//!     |_| {},
//! )
//! .await?;
//! assert_eq!(stats.docs_written, 1);
//! assert!(b.get_document("todos:1")?.is_some());
//! # Ok(())
//! # }
//! ```

mod blocking;
mod driver;
mod error;
mod http;
pub mod local;
mod peer;
mod read_ahead;
pub mod session;
mod tls;
mod ws;

pub(crate) use driver::FETCH_ANSWER_BYTES;
pub use driver::{
    ReplicationEvent, ReplicationOptions, SyncStats, replicate, replicate_reporting,
    replication_id, sync,
};
pub use error::SyncError;
pub(crate) use peer::ServerTime;
pub use peer::{ChangesPage, Peer, RejectedRevision};

pub use blocking::BlockingCalls;
pub use ferry_core::filter::ChangesFilter;
pub use ferry_core::replicate::{Seq, Stats};
pub use http::HttpPeer;
pub use local::LocalPeer;
pub use tls::{TlsOptions, TlsProblem};
pub use ws::{SessionCredentials, WsPeer};

/// A sequence as a local store's integer sequence.
pub(crate) fn seq_number(since: &Seq) -> Result<u64, SyncError> {
    since.number().ok_or_else(|| SyncError::InvalidResponse {
        url: "local".into(),
        detail: format!("sequence {since} is not a local sequence number"),
    })
}

/// Removes `user:password@` from `url` and returns them percent-decoded.
pub(crate) fn take_url_credentials(url: &mut reqwest::Url) -> Option<(String, String)> {
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let credentials = (!url.username().is_empty()).then(|| {
        (
            decode(url.username()),
            decode(url.password().unwrap_or_default()),
        )
    });
    let _ = url.set_username("");
    let _ = url.set_password(None);
    credentials
}
