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
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use ferry_core::hlc::Timestamp;
use ferry_core::model::{Body, Limits, validate_document};
use ferry_store::clock::{ReplicaClock, SystemClock, WallClock};
use ferry_store::endpoint::{Endpoint, EndpointConfig, Fanout};
use ferry_store::sqlite::SqliteBackend;
use ferry_store::{Backend, Database, Durability, PageCache, StoreConfig, StoreError};
use tokio::sync::watch;
use tower_http::trace::TraceLayer;

pub mod auth;
mod connections;
pub mod error;
mod origins;
pub mod params;
mod password_checks;
mod routes;
mod tls;

/// The sync session's request handler, synchronous (the fuzz targets run it as the server
/// does).
pub mod session {
    pub use crate::routes::sync_session::handle_request;
}

use auth::{Auth, AuthConfig};
use error::{ApiError, ApiResult};
pub use origins::Origin;
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
    /// Memory each open database's SQLite connections may keep for cached pages.
    pub page_cache: PageCache,
    /// How long a `feed=longpoll` or `continuous` request waits at most, by default.
    pub default_feed_timeout: Duration,
    /// A clock from another replica further ahead than this is not adopted.
    pub max_clock_drift: Duration,
    /// Who may connect, and how long tokens last.
    pub auth: AuthConfig,
    /// The most authenticated WebSocket sync sessions open at once; a session authenticated
    /// past it is refused with 503 `too_many_sessions`.
    pub max_sessions: usize,
    /// How many databases the server holds, and keeps open at once.
    pub databases: ferry_store::sqlite::BackendLimits,
    /// The most sync sessions at once that have not authenticated yet (their `hello` not
    /// received or checked); the next upgrade is refused with 503.
    pub max_unauthenticated_sessions: usize,
    /// How long a sync session may take to send its `hello`; it is closed (1008) after.
    pub hello_timeout: Duration,
    /// How long an authenticated sync session may send nothing (not even a ping) while none
    /// of its requests is being answered; it is closed (1008) after. Clients learn it from
    /// `welcome` and ping well within it.
    pub session_idle_timeout: Duration,
    /// The largest request body or `hello` frame before authentication (`POST /_session`,
    /// `POST /_ferry/login`, a session's bytes until it is authenticated).
    pub max_unauthenticated_bytes: usize,
    /// The most TCP connections open at once, TLS handshakes and sync sessions included. A
    /// connection past it evicts the one idle longest, or is closed at once when none is idle.
    /// Lowered at start-up to what the open files limit leaves room for.
    pub max_connections: usize,
    /// How long a request's head (request line and headers) may take to arrive, from its
    /// first byte (from the connection's opening for its first request).
    pub header_read_timeout: Duration,
    /// How long a request body may take to arrive in full; past it the request is answered
    /// 408 and the connection closed.
    pub request_body_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// The largest request head (request line and headers) in bytes, at least 8 KiB; a larger
    /// one is answered 431 and its connection closed.
    pub max_header_bytes: usize,
    /// How each collection's conflicts are resolved when replicated revisions create them.
    pub conflict_policies: ferry_core::resolve::Policies,
    /// The time the server goes by (revision clocks, drift checks); the system's clock but in
    /// tests.
    pub wall_clock: Arc<dyn WallClock>,
    /// Serve HTTPS and WSS with this certificate instead of plain HTTP (`None`: plain, for
    /// loopback or behind a TLS-terminating proxy).
    pub tls: Option<TlsConfig>,
    /// Web origins whose pages may call the server besides its own (CORS, with credentials);
    /// a request from any other page is refused with 403. None by default.
    pub allowed_origins: Vec<Origin>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            data_dir: PathBuf::from("ferry-data"),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            limits: Limits::default(),
            durability: Durability::Full,
            page_cache: PageCache::default(),
            default_feed_timeout: Duration::from_secs(60),
            max_clock_drift: Duration::from_secs(60),
            auth: AuthConfig::default(),
            max_sessions: 20_000,
            databases: ferry_store::sqlite::BackendLimits::default(),
            max_unauthenticated_sessions: 256,
            hello_timeout: Duration::from_secs(10),
            session_idle_timeout: Duration::from_secs(60),
            max_unauthenticated_bytes: 64 * 1024,
            max_connections: 25_000,
            header_read_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 400 * 1024,
            conflict_policies: ferry_core::resolve::Policies::default(),
            wall_clock: Arc::new(SystemClock),
            tls: None,
            allowed_origins: Vec::new(),
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
    /// The server's one clock: every database's writes are stamped by it.
    clock: ReplicaClock,
    /// What every database's endpoint decides by.
    endpoint: EndpointConfig,
    /// How each collection's conflicts are resolved when replicated revisions create them.
    conflict_policies: ferry_core::resolve::Policies,
    /// Per database, the latest sequence, for feeds waiting on changes.
    notifiers: Mutex<HashMap<String, watch::Sender<u64>>>,
    default_feed_timeout: Duration,
    /// One permit per authenticated sync session that may be open.
    sessions: Arc<tokio::sync::Semaphore>,
    /// One permit per sync session that may be open before authenticating.
    unauthenticated_sessions: Arc<tokio::sync::Semaphore>,
    hello_timeout: Duration,
    session_idle_timeout: Duration,
    request_body_timeout: Duration,
    max_unauthenticated_bytes: usize,
    allowed_origins: origins::AllowedOrigins,
    /// Whether clients reach the server over TLS it terminates (cookies are then `Secure`).
    serves_tls: bool,
}

/// Announces a database's committed writes to its waiting feeds and sessions.
struct Notify<'a> {
    state: &'a AppState,
    db: &'a str,
}

impl Fanout for Notify<'_> {
    fn committed(&self, update_seq: u64, _doc_ids: &[String]) {
        self.state.notify(self.db, update_seq);
    }
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
                clock: ReplicaClock::new(
                    config.wall_clock.clone(),
                    u64::try_from(config.max_clock_drift.as_millis()).unwrap_or(u64::MAX),
                ),
                endpoint: EndpointConfig {
                    limits: config.limits.clone(),
                    refuse_clocks_ahead: true,
                },
                conflict_policies: config.conflict_policies.clone(),
                notifiers: Mutex::new(HashMap::new()),
                default_feed_timeout: config.default_feed_timeout,
                sessions: Arc::new(tokio::sync::Semaphore::new(config.max_sessions)),
                unauthenticated_sessions: Arc::new(tokio::sync::Semaphore::new(
                    config.max_unauthenticated_sessions,
                )),
                hello_timeout: config.hello_timeout,
                session_idle_timeout: config.session_idle_timeout,
                request_body_timeout: config.request_body_timeout,
                max_unauthenticated_bytes: config.max_unauthenticated_bytes,
                allowed_origins: origins::AllowedOrigins::new(&config.allowed_origins),
                serves_tls: config.tls.is_some(),
            }),
            limits: Arc::new(config.limits.clone()),
        }
    }

    /// Web origins allowed besides the server's own.
    pub(crate) fn allowed_origins(&self) -> &origins::AllowedOrigins {
        &self.inner.allowed_origins
    }

    /// Whether the server terminates TLS itself.
    pub(crate) fn serves_tls(&self) -> bool {
        self.inner.serves_tls
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

    /// A permit to open one more authenticated sync session, if the limit allows; the
    /// session holds it until it ends.
    pub fn session_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner.sessions.clone().try_acquire_owned().ok()
    }

    /// Whether every authenticated session slot is taken.
    pub fn sessions_full(&self) -> bool {
        self.inner.sessions.available_permits() == 0
    }

    /// A permit for one more sync session that has not authenticated yet, if the limit
    /// allows; the session holds it until it authenticates or ends.
    pub fn unauthenticated_session_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner
            .unauthenticated_sessions
            .clone()
            .try_acquire_owned()
            .ok()
    }

    /// How long a sync session may take to say hello.
    pub fn hello_timeout(&self) -> Duration {
        self.inner.hello_timeout
    }

    /// How long an authenticated sync session may stay silent.
    pub fn session_idle_timeout(&self) -> Duration {
        self.inner.session_idle_timeout
    }

    /// How long a request body may take to arrive.
    pub fn request_body_timeout(&self) -> Duration {
        self.inner.request_body_timeout
    }

    /// The most bytes a client sends before it is authenticated (a login body, a `hello`).
    pub fn max_unauthenticated_bytes(&self) -> usize {
        self.inner.max_unauthenticated_bytes
    }

    /// The conflict policy of every collection.
    pub fn conflict_policies(&self) -> &ferry_core::resolve::Policies {
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

    /// Runs a blocking call on one database's replica endpoint: the one way the server reads
    /// and writes replicated data (`ferry_store::endpoint`). Writes through it are announced to
    /// the database's feeds and sessions.
    pub async fn with_endpoint<T: Send + 'static, E>(
        &self,
        name: &str,
        work: impl FnOnce(&Endpoint<'_>) -> Result<T, E> + Send + 'static,
    ) -> ApiResult<T>
    where
        E: Into<ApiError> + From<StoreError> + Send + 'static,
    {
        let state = self.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let db = state.inner.backend.open_database(&name)?;
            let fanout = Notify {
                state: &state,
                db: &name,
            };
            let endpoint = Endpoint::new(&*db, &state.inner.endpoint, &state.inner.clock, &fanout)
                .resolving_by(&state.inner.conflict_policies);
            work(&endpoint)
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(Into::into)
    }

    /// A timestamp for a write made now.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// The server's wall clock (ms since the epoch).
    pub fn wall_ms(&self) -> u64 {
        self.inner.clock.wall_ms()
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

    /// Checks a `_local` document about to be stored by the rules of every document.
    pub fn validate_local(&self, id: &str, body: &Body) -> ApiResult<()> {
        validate_document(&format!("local-{id}"), body, &self.limits)
            .map_err(|error| ApiError::from(ferry_store::endpoint::Refusal::Invalid(error)))
    }
}

/// The HTTP routes over `state`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_request_bytes;
    routes::routes()
        // Inside authentication: a body is read only once its sender is known (or the route
        // is a public one, with the small pre-authentication limit).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::body::read_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::auth::authenticate,
        ))
        // Outside it: a declared length past the limit is refused before anything else.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::body::refuse_declared_length,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        // Before credentials are checked: a page from another origin gets nothing, not even a
        // password check (`origins`).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origins::check_origin,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            stamp_answers,
        ))
        .layer(state.allowed_origins().cors_layer())
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Dates every answer by the server's wall clock, the one replicated revisions' clocks are
/// checked against (hyper's own `Date` would read the system time): a client whose clock is
/// far off re-bases on it. To the second, as HTTP dates are. Every answer also tells the
/// request limit (`ferry_core::protocol::MAX_REQUEST_BYTES_HEADER`), which Ferry's HTTP clients
/// keep their writes below.
async fn stamp_answers(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut response = next.run(request).await;
    let now = std::time::UNIX_EPOCH + Duration::from_millis(state.wall_ms());
    if let Ok(date) = axum::http::HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
        response
            .headers_mut()
            .insert(axum::http::header::DATE, date);
    }
    response.headers_mut().insert(
        ferry_core::protocol::MAX_REQUEST_BYTES_HEADER,
        axum::http::HeaderValue::from(state.limits.max_request_bytes),
    );
    response
}

/// Opens the SQLite backend under `config.data_dir` and the server's identity file.
pub fn open_state(config: &ServerConfig) -> std::io::Result<AppState> {
    let store_config = StoreConfig {
        limits: config.limits.clone(),
        durability: config.durability,
        // The server is where edits are acknowledged; it has no outbox of its own.
        track_pending: false,
        page_cache: config.page_cache,
    };
    let backend = SqliteBackend::open(&config.data_dir, store_config)
        .map_err(std::io::Error::other)?
        .with_limits(config.databases);
    let uuid = server_uuid(&config.data_dir)?;
    let auth_config = AuthConfig {
        clock: config.wall_clock.clone(),
        ..config.auth.clone()
    };
    let auth = Auth::open(&config.data_dir, auth_config).map_err(std::io::Error::other)?;
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

/// The local document recording the sequence through which a database's conflicts were last
/// settled at start-up.
const SETTLED_THROUGH: &str = "ferry-settled-through";

/// Resolves what a crash may have left unresolved: a batch of replicated revisions commits
/// before its conflicts are resolved, so a server killed in between restarts with them.
/// Every database's changes since the last start-up are examined by the conflict policies
/// (in the background: requests are served meanwhile, and resolutions are idempotent).
async fn settle_after_restart(state: AppState) {
    if !state.conflict_policies().any_automatic() {
        return;
    }
    let names = match state.run(|backend| backend.database_names()).await {
        Ok(names) => names,
        Err(error) => {
            tracing::warn!(reason = %error.reason, "could not list databases to settle");
            return;
        }
    };
    for name in names {
        let settled = state
            .with_endpoint(&name, |endpoint| {
                let db = endpoint.database();
                let marker = db.get_local(SETTLED_THROUGH)?;
                let since = marker
                    .as_ref()
                    .and_then(|marker| marker.body.get("seq")?.as_u64())
                    .unwrap_or(0);
                let (through, resolved) = endpoint.settle_conflicts(since)?;
                let body = serde_json::json!({ "seq": through });
                let serde_json::Value::Object(body) = body else {
                    unreachable!("an object")
                };
                db.put_local(SETTLED_THROUGH, marker.map(|marker| marker.rev), Some(body))?;
                Ok::<_, ferry_store::endpoint::EndpointError>(resolved)
            })
            .await;
        match settled {
            Ok(0) => {}
            Ok(resolved) => {
                tracing::info!(db = %name, resolved, "conflicts left by a crash resolved")
            }
            Err(error) => {
                tracing::warn!(db = %name, reason = %error.reason, "could not settle conflicts")
            }
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
    tokio::spawn(settle_after_restart(state.clone()));
    tracing::info!(
        address = %listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        tls = config.tls.is_some(),
        "ferry server listening"
    );
    let limits = connections::HttpLimits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        max_header_bytes: config.max_header_bytes,
    };
    connections::serve(
        listener,
        router(state),
        limits,
        config.tls.clone(),
        shutdown,
    )
    .await
}
