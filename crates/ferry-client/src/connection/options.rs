//! Where and how to sync: [`SyncOptions`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{AuthenticationFailure, Credentials, Fallback, ReconnectPolicy};

/// Where and how to sync.
///
/// ```
/// use ferry_client::{Credentials, SyncOptions};
/// let options = SyncOptions::new("http://127.0.0.1:5984/notes")
///     .credentials(Credentials::password("ann", "a long password"))
///     .on_authentication_failure(|failure| async move {
///         eprintln!("login needed: {}", failure.reason);
///         None // or Some(credentials asked from the user)
///     });
/// ```
#[derive(Clone)]
pub struct SyncOptions {
    pub(crate) url: String,
    pub(crate) credentials: Option<Credentials>,
    pub(crate) fallback: Option<Fallback>,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) batch_size: usize,
    pub(crate) max_write_bytes: usize,
    pub(crate) heartbeat: Option<(Duration, Duration)>,
    pub(crate) only_subscribed: bool,
    pub(crate) ca_file: Option<PathBuf>,
}

impl SyncOptions {
    /// Sync with the server database at `url` (`http://host:port/db`; the session itself runs
    /// over a WebSocket on the same host, over TLS for `https://host:port/db`).
    pub fn new(url: impl Into<String>) -> SyncOptions {
        SyncOptions {
            url: url.into(),
            credentials: None,
            fallback: None,
            reconnect: ReconnectPolicy::default(),
            batch_size: DEFAULT_BATCH_SIZE,
            max_write_bytes: ferry_core::replicate::DEFAULT_MAX_WRITE_BYTES,
            heartbeat: None,
            only_subscribed: false,
            ca_file: None,
        }
    }

    /// Authenticate with these credentials (until a reconnect token replaces them).
    #[must_use]
    pub fn credentials(mut self, credentials: Credentials) -> SyncOptions {
        self.credentials = Some(credentials);
        self
    }

    /// Called when the server refuses both the reconnect token and the credentials; return
    /// new credentials to retry with, or `None` to stay in
    /// [`ConnectionState::AuthenticationFailed`] (pending writes are kept).
    #[must_use]
    pub fn on_authentication_failure<F, Fut>(mut self, callback: F) -> SyncOptions
    where
        F: Fn(AuthenticationFailure) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<Credentials>> + Send + 'static,
    {
        self.fallback = Some(Arc::new(move |failure| Box::pin(callback(failure))));
        self
    }

    /// How the loop reconnects.
    #[must_use]
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> SyncOptions {
        self.reconnect = policy;
        self
    }

    /// Changes per batch (default 500; memory is bounded by it).
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> SyncOptions {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The most bytes one write of a batch carries (default 4 MiB): a batch of large
    /// documents goes in several writes, each under the server's request limit, so any
    /// document within the document limit syncs. Keep it below the server's
    /// `--max-request-bytes`.
    ///
    /// ```
    /// let options = ferry_client::SyncOptions::new("ws://127.0.0.1:4984/todos")
    ///     .max_write_bytes(1024 * 1024);
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn max_write_bytes(mut self, bytes: usize) -> SyncOptions {
        self.max_write_bytes = bytes;
        self
    }

    /// Pings the server every `interval`, and treats `silence_timeout` without hearing from it
    /// as an interruption (defaults: 15 s and 30 s). A stalled network (packets silently
    /// dropped) is noticed only this way.
    #[must_use]
    pub fn heartbeat(mut self, interval: Duration, silence_timeout: Duration) -> SyncOptions {
        self.heartbeat = Some((interval, silence_timeout));
        self
    }

    /// Pull only what the replica's offline subscriptions match
    /// ([`Ferry::subscribe_offline`]) instead of mirroring the whole server database. Local
    /// changes are pushed either way.
    #[must_use]
    pub fn only_subscribed(mut self) -> SyncOptions {
        self.only_subscribed = true;
        self
    }

    /// Trust the certificate authority (or the self-signed certificate) in the PEM file at
    /// `path` for an `https://` server, in addition to the web's authorities: for servers
    /// whose certificate a private authority issued. The file is read when syncing starts
    /// ([`Ferry::start_sync`] and [`Ferry::sync_once`] fail if it is unreadable or holds no
    /// certificate). A certificate that is still not trusted shows as
    /// [`ConnectionState::Disconnected`] with a reason that says so.
    #[must_use]
    pub fn trust_ca_file(mut self, path: impl Into<PathBuf>) -> SyncOptions {
        self.ca_file = Some(path.into());
        self
    }

    /// The server database URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Changes per batch by default: five times CouchDB's 100, since each batch costs a few disk
/// flushes on each side (measured in BENCHMARKS.md); a batch of typical documents stays well
/// under a megabyte.
pub(crate) const DEFAULT_BATCH_SIZE: usize = 500;
