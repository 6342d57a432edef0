//! The Ferry sync server: the CouchDB replication protocol over HTTP, on top of `ferry-store`.
//!
//! [`serve`] binds a listener and runs [`router`] until shutdown, terminating TLS itself when
//! [`ServerConfig::tls`] is set ([`TlsConfig`]). Every route handler is a thin
//! shell: it parses the request (`params`), calls the store on a blocking thread
//! ([`AppState::run`]), and writes CouchDB-shaped JSON through `ferry_core::couch`. Handlers
//! are grouped by what they serve: `routes::server` (`/`, `/_all_dbs`, `/health`),
//! `routes::database` (`/{db}`), `routes::documents` (documents, `_all_docs`, `_local`),
//! `routes::replication` (`_revs_diff`, `_bulk_get`, `_bulk_docs`) and `routes::changes`.
//!
//! Architecture Invariant: a write is answered only after the store's transaction committed
//! (with `synchronous=FULL` by default), so every acknowledged change survives a crash.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let config = ferry_server::ServerConfig::default();
//! ferry_server::serve(config, std::future::pending()).await
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::serve::ListenerExt;
use ferry_core::hlc::{HlcClock, Timestamp};
use ferry_core::json::{canonical_object, check_depth};
use ferry_core::model::{Body, Limits, validate_doc_id};
use ferry_store::sqlite::SqliteBackend;
use ferry_store::{Backend, Database, Durability, StoreConfig, StoreError};
use tokio::sync::watch;
use tower_http::cors::CorsLayer;
use tower_http::trace::TraceLayer;

pub mod auth;
pub mod error;
pub mod params;
mod routes;
mod tls;

use auth::{Auth, AuthConfig};
use error::{ApiError, ApiResult};
pub use tls::{TlsConfig, TlsConfigError};

/// The default listen address: loopback only, so a fresh server is not exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5984";

/// How `ferry serve` runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where database files live.
    pub data_dir: PathBuf,
    /// The address to listen on.
    pub listen: SocketAddr,
    /// Request, document and batch limits.
    pub limits: Limits,
    /// When a write is durable (always `Full` in production).
    pub durability: Durability,
    /// How long a `feed=longpoll` or `continuous` request waits at most, by default.
    pub default_feed_timeout: Duration,
    /// A clock from another replica further ahead than this is not adopted.
    pub max_clock_drift: Duration,
    /// Who may connect, and how long tokens last.
    pub auth: AuthConfig,
    /// The most WebSocket sync sessions open at once; the next upgrade is refused with 503.
    pub max_sessions: usize,
    /// How each collection's conflicts are resolved when replicated revisions create them.
    pub conflict_policies: ferry_core::resolve::Policies,
    /// Serve HTTPS and WSS with this certificate instead of plain HTTP (`None`: plain, for
    /// loopback or behind a TLS-terminating proxy).
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            data_dir: PathBuf::from("ferry-data"),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            limits: Limits::default(),
            durability: Durability::Full,
            default_feed_timeout: Duration::from_secs(60),
            max_clock_drift: Duration::from_secs(60),
            auth: AuthConfig::default(),
            max_sessions: 20_000,
            conflict_policies: ferry_core::resolve::Policies::default(),
            tls: None,
        }
    }
}

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
    /// The limits in force.
    pub limits: Arc<Limits>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    auth: Arc<Auth>,
    server_uuid: String,
    clock: Mutex<HlcClock>,
    /// Per database, the latest sequence, for feeds waiting on changes.
    notifiers: Mutex<HashMap<String, watch::Sender<u64>>>,
    default_feed_timeout: Duration,
    /// One permit per sync session that may be open.
    sessions: Arc<tokio::sync::Semaphore>,
    conflict_policies: Arc<ferry_core::resolve::Policies>,
    max_clock_drift_ms: u64,
}

impl AppState {
    /// State over an opened backend.
    pub fn new(
        backend: Arc<dyn Backend>,
        auth: Arc<Auth>,
        server_uuid: String,
        config: &ServerConfig,
    ) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                backend,
                auth,
                server_uuid,
                clock: Mutex::new(HlcClock::new(
                    u64::try_from(config.max_clock_drift.as_millis()).unwrap_or(u64::MAX),
                )),
                notifiers: Mutex::new(HashMap::new()),
                default_feed_timeout: config.default_feed_timeout,
                sessions: Arc::new(tokio::sync::Semaphore::new(config.max_sessions)),
                conflict_policies: Arc::new(config.conflict_policies.clone()),
                max_clock_drift_ms: u64::try_from(config.max_clock_drift.as_millis())
                    .unwrap_or(u64::MAX),
            }),
            limits: Arc::new(config.limits.clone()),
        }
    }

    /// The server's stable identity (CouchDB's `uuid`).
    pub fn server_uuid(&self) -> &str {
        &self.inner.server_uuid
    }

    /// The storage backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// Users and tokens.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.inner.auth
    }

    /// Runs a blocking authentication call off the async threads.
    pub async fn authenticate<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Auth) -> Result<T, auth::AuthError> + Send + 'static,
    ) -> ApiResult<T> {
        let auth = self.inner.auth.clone();
        tokio::task::spawn_blocking(move || work(&auth))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::from)
    }

    /// A permit to open one more sync session, if the limit allows; the session holds it
    /// until it ends.
    pub fn session_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner.sessions.clone().try_acquire_owned().ok()
    }

    /// The conflict policy of every collection.
    pub fn conflict_policies(&self) -> &Arc<ferry_core::resolve::Policies> {
        &self.inner.conflict_policies
    }

    /// How long feeds wait by default.
    pub fn default_feed_timeout(&self) -> Duration {
        self.inner.default_feed_timeout
    }

    /// Runs a blocking store call off the async threads.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(Arc<dyn Backend>) -> Result<T, StoreError> + Send + 'static,
    ) -> ApiResult<T> {
        let backend = self.inner.backend.clone();
        tokio::task::spawn_blocking(move || work(backend))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::from)
    }

    /// Runs a blocking call on one database.
    pub async fn with_db<T: Send + 'static>(
        &self,
        name: &str,
        work: impl FnOnce(Arc<dyn Database>) -> Result<T, StoreError> + Send + 'static,
    ) -> ApiResult<T> {
        let name = name.to_owned();
        self.run(move |backend| work(backend.open_database(&name)?))
            .await
    }

    /// A timestamp for a write made now.
    pub fn now(&self) -> Timestamp {
        let mut clock = self.inner.clock.lock().unwrap_or_else(|e| e.into_inner());
        clock.now(wall_ms())
    }

    /// Refuses a replicated revision whose clock is further ahead of the server's than the
    /// allowed drift: under last-write-wins it would beat every other write until the real
    /// time caught up. The device's clock must be fixed; the revision stays on the device.
    pub fn check_clock(&self, hlc: Option<Timestamp>) -> ApiResult<()> {
        let Some(hlc) = hlc else { return Ok(()) };
        let now = wall_ms();
        let ahead = hlc.wall_ms().saturating_sub(now);
        if ahead > self.inner.max_clock_drift_ms {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "clock_ahead",
                format!(
                    "the revision's clock is {} s ahead of the server's (at most {} s allowed); \
                     correct the device's clock",
                    ahead / 1000,
                    self.inner.max_clock_drift_ms / 1000
                ),
            ));
        }
        Ok(())
    }

    /// Takes a replicated revision's clock into account (ignored if too far ahead).
    pub fn observe(&self, remote: Timestamp) {
        let mut clock = self.inner.clock.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(drift) = clock.observe(remote, wall_ms()) {
            tracing::warn!(%drift, "not adopting a replicated clock");
        }
    }

    /// Tells waiting feeds that `db` changed up to `seq`.
    pub fn notify(&self, db: &str, seq: u64) {
        let notifiers = self
            .inner
            .notifiers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = notifiers.get(db) {
            sender.send_if_modified(|current| {
                let newer = seq > *current;
                if newer {
                    *current = seq;
                }
                newer
            });
        }
    }

    /// A receiver that sees `db`'s latest sequence whenever it changes.
    pub fn subscribe(&self, db: &str, current: u64) -> watch::Receiver<u64> {
        let mut notifiers = self
            .inner
            .notifiers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        notifiers
            .entry(db.to_owned())
            .or_insert_with(|| watch::channel(current).0)
            .subscribe()
    }

    /// Checks a document about to be stored against the limits: id, depth and size.
    pub fn validate_document(&self, doc_id: &str, body: &Body) -> ApiResult<()> {
        validate_doc_id(doc_id, &self.limits).map_err(|error| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "illegal_docid",
                error.to_string(),
            )
        })?;
        let as_value = serde_json::Value::Object(body.clone());
        check_depth(&as_value, self.limits.max_json_depth)
            .map_err(|error| ApiError::bad_request(format!("{doc_id}: {error}")))?;
        let size = canonical_object(body).len();
        if size > self.limits.max_document_bytes {
            return Err(ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "document_too_large",
                format!(
                    "{doc_id} is {size} bytes, more than the {} allowed",
                    self.limits.max_document_bytes
                ),
            ));
        }
        Ok(())
    }
}

pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// The HTTP routes over `state`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_request_bytes;
    routes::routes()
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::auth::authenticate,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        // Browser PouchDB fetches with credentials, so CORS must mirror the origin and allow
        // them; authentication (not the origin) is what protects the data.
        .layer(CorsLayer::very_permissive())
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Opens the SQLite backend under `config.data_dir` and the server's identity file.
pub fn open_state(config: &ServerConfig) -> std::io::Result<AppState> {
    let store_config = StoreConfig {
        limits: config.limits.clone(),
        durability: config.durability,
        // The server is where edits are acknowledged; it has no outbox of its own.
        track_pending: false,
    };
    let backend =
        SqliteBackend::open(&config.data_dir, store_config).map_err(std::io::Error::other)?;
    let uuid = server_uuid(&config.data_dir)?;
    let auth = Auth::open(&config.data_dir, config.auth.clone()).map_err(std::io::Error::other)?;
    if config.auth.required
        && auth
            .accounts()
            .list_users()
            .map_err(std::io::Error::other)?
            .is_empty()
    {
        tracing::warn!(
            "authentication is required but no user exists yet: create one with `ferry users add`"
        );
    }
    Ok(AppState::new(
        Arc::new(backend),
        Arc::new(auth),
        uuid,
        config,
    ))
}

/// The server's uuid, created once per data directory: PouchDB derives replication ids from
/// it, so it must survive restarts for checkpoints to be found again.
fn server_uuid(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("server-uuid");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        _ => {
            let uuid = uuid::Uuid::new_v4().simple().to_string();
            std::fs::write(&path, &uuid)?;
            Ok(uuid)
        }
    }
}

/// Runs the server until `shutdown` completes.
pub async fn serve(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    serve_on(listener, config, shutdown).await
}

/// Runs the server on an already bound listener (tests bind `127.0.0.1:0`), over TLS when
/// `config.tls` is set.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = open_state(&config)?;
    tracing::info!(
        address = %listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        tls = config.tls.is_some(),
        "ferry server listening"
    );
    if let Some(tls) = &config.tls {
        let listener = tls::TlsListener::new(listener, tls);
        return axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown)
            .await;
    }
    // Sync sessions exchange small frames; Nagle's algorithm would delay each by up to 40 ms.
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
