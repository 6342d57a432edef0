//! `ferry`: run the sync server, keep local replicas, and sync them.
//!
//! The binary is glue: argument parsing (clap) and output formatting here, everything else in
//! `ferry-server` (`serve`, `users`) and the SDK, `ferry-client` (the replica commands in
//! `replica.rs`, `sync`). Errors carry context (anyhow) and are printed
//! as one readable chain; `--json` switches every command's output to JSON for scripts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ferry_core::model::Limits;
use ferry_server::auth::AuthConfig;

use serde_json::Value;

mod replica;
mod sync;
mod users;

// glibc's allocator spends a quarter of a replication's CPU in malloc and free (many small
// JSON values, and batch-sized buffers whose release consolidates its free lists); mimalloc's
// thread-local pages cost a fraction of that (BENCHMARKS.md). It is built without transparent
// huge pages (the workspace's `no_thp`), which doubled the resident memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Offline-first data sync: server, local replicas, sync"
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sync server (CouchDB replication protocol over HTTP).
    // Boxed: its many flags make it far larger than the other commands.
    Serve(Box<ServeArgs>),
    #[command(flatten)]
    Replica(replica::ReplicaCommand),
    /// Sync a local replica with a server database: push local changes, then pull remote ones.
    Sync(sync::SyncArgs),
    /// Manage the server's users and tokens.
    Users(users::UsersArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Where database files are kept.
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "ferry-data")]
    data_dir: PathBuf,
    /// The address to listen on.
    #[arg(long, env = "FERRY_LISTEN", default_value = ferry_server::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The largest document, in bytes of canonical JSON.
    #[arg(long, env = "FERRY_MAX_DOCUMENT_BYTES", default_value_t = Limits::default().max_document_bytes)]
    max_document_bytes: usize,
    /// The largest request body, in bytes.
    #[arg(long, env = "FERRY_MAX_REQUEST_BYTES", default_value_t = Limits::default().max_request_bytes)]
    max_request_bytes: usize,
    /// The deepest nesting of arrays and objects in a document.
    #[arg(long, env = "FERRY_MAX_JSON_DEPTH", default_value_t = Limits::default().max_json_depth)]
    max_json_depth: usize,
    /// The most JSON values in one request body or session frame (bounds the memory a
    /// request of many tiny values takes: about 100 bytes each at worst).
    #[arg(long, env = "FERRY_MAX_JSON_VALUES", default_value_t = Limits::default().max_json_values)]
    max_json_values: usize,
    /// The longest document id, in bytes.
    #[arg(long, env = "FERRY_MAX_DOC_ID_BYTES", default_value_t = Limits::default().max_doc_id_bytes)]
    max_doc_id_bytes: usize,
    /// The most documents in one bulk request.
    #[arg(long, env = "FERRY_MAX_BATCH_DOCS", default_value_t = Limits::default().max_batch_docs)]
    max_batch_docs: usize,
    /// The most rows in one changes or _all_docs response.
    #[arg(long, env = "FERRY_MAX_PAGE_ROWS", default_value_t = Limits::default().max_page_rows)]
    max_page_rows: usize,
    /// Revisions of history kept per document.
    #[arg(long, env = "FERRY_REVS_LIMIT", default_value_t = Limits::default().revs_limit)]
    revs_limit: usize,
    /// How many levels of ancestors above each live version keep their bodies, for three-way
    /// merges (`POST /{db}/_compact` drops the rest, including superseded versions).
    #[arg(long, env = "FERRY_ANCESTOR_BODIES", default_value_t = Limits::default().ancestor_bodies)]
    ancestor_bodies: usize,
    /// A web origin (https://host[:port]) whose pages may call the server, with the user's
    /// cookie; repeat for several, or separate them with commas. Pages from any other origin
    /// are refused (403), and by default only the server's own origin is served.
    #[arg(
        long = "allow-origin",
        env = "FERRY_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<ferry_server::Origin>,
    /// How a collection's conflicts are resolved, as COLLECTION=POLICY (keep, last-write-wins
    /// or merge); repeat for several collections, or separate them with commas.
    #[arg(long = "conflict-policy", env = "FERRY_CONFLICT_POLICIES", value_delimiter = ',', value_parser = parse_collection_policy)]
    conflict_policies: Vec<(String, ferry_core::resolve::Policy)>,
    /// The policy of collections without their own.
    #[arg(long, env = "FERRY_DEFAULT_CONFLICT_POLICY", default_value = "keep")]
    default_conflict_policy: ferry_core::resolve::Policy,
    /// How far ahead of the server's clock a replicated revision's clock may be, in seconds;
    /// revisions further ahead are refused (they would win every last-write-wins conflict).
    #[arg(long, env = "FERRY_MAX_CLOCK_DRIFT", default_value_t = ferry_server::ServerConfig::default().max_clock_drift.as_secs())]
    max_clock_drift: u64,
    /// The most authenticated WebSocket sync sessions open at once.
    #[arg(long, env = "FERRY_MAX_SESSIONS", default_value_t = ferry_server::ServerConfig::default().max_sessions)]
    max_sessions: usize,
    /// The most databases the server holds; creating one more is refused with 403.
    #[arg(long, env = "FERRY_MAX_DATABASES", default_value_t = ferry_store::sqlite::BackendLimits::default().max_databases)]
    max_databases: usize,
    /// The most databases open at once (each holds up to six file descriptors); past it the
    /// least recently used idle one is closed, and reopened when asked for.
    #[arg(long, env = "FERRY_MAX_OPEN_DATABASES", default_value_t = ferry_store::sqlite::BackendLimits::default().max_open)]
    max_open_databases: usize,
    /// The memory each open database's writing connection may keep for cached pages, in KiB
    /// (64 to 1,048,576).
    #[arg(long, env = "FERRY_PAGE_CACHE_WRITER_KIB", default_value_t = ferry_store::PageCache::default().writer_kib)]
    page_cache_writer_kib: u32,
    /// The memory each of an open database's (up to four) reading connections may keep for
    /// cached pages, in KiB (64 to 1,048,576).
    #[arg(long, env = "FERRY_PAGE_CACHE_READER_KIB", default_value_t = ferry_store::PageCache::default().reader_kib)]
    page_cache_reader_kib: u32,
    /// The most sync sessions open at once that have not authenticated yet.
    #[arg(long, env = "FERRY_MAX_UNAUTHENTICATED_SESSIONS", default_value_t = ferry_server::ServerConfig::default().max_unauthenticated_sessions)]
    max_unauthenticated_sessions: usize,
    /// How long a sync session may take to send its hello, in seconds.
    #[arg(long, env = "FERRY_HELLO_TIMEOUT", default_value_t = ferry_server::ServerConfig::default().hello_timeout.as_secs())]
    hello_timeout: u64,
    /// How long an authenticated sync session may send nothing (not even a ping) before it is
    /// closed, in seconds. Clients learn it when their session opens and ping within it.
    #[arg(long, env = "FERRY_SESSION_IDLE_TIMEOUT", default_value_t = ferry_server::ServerConfig::default().session_idle_timeout.as_secs())]
    session_idle_timeout: u64,
    /// The largest login body (`POST /_session`, `/_ferry/login`) and the most a sync session
    /// sends before it is authenticated, in bytes.
    #[arg(long, env = "FERRY_MAX_UNAUTHENTICATED_BYTES", default_value_t = ferry_server::ServerConfig::default().max_unauthenticated_bytes)]
    max_unauthenticated_bytes: usize,
    /// The most TCP connections open at once (sessions included); lowered to what the open
    /// files limit leaves room for.
    #[arg(long, env = "FERRY_MAX_CONNECTIONS", default_value_t = ferry_server::ServerConfig::default().max_connections)]
    max_connections: usize,
    /// How long a request's headers may take to arrive, in seconds.
    #[arg(long, env = "FERRY_HEADER_READ_TIMEOUT", default_value_t = ferry_server::ServerConfig::default().header_read_timeout.as_secs())]
    header_read_timeout: u64,
    /// How long a request body may take to arrive in full, in seconds.
    #[arg(long, env = "FERRY_REQUEST_BODY_TIMEOUT", default_value_t = ferry_server::ServerConfig::default().request_body_timeout.as_secs())]
    request_body_timeout: u64,
    /// How long an idle keep-alive connection is kept open, in seconds.
    #[arg(long, env = "FERRY_IDLE_TIMEOUT", default_value_t = ferry_server::ServerConfig::default().idle_timeout.as_secs())]
    idle_timeout: u64,
    /// The largest request head (request line and headers), in bytes (at least 8192).
    #[arg(long, env = "FERRY_MAX_HEADER_BYTES", default_value_t = ferry_server::ServerConfig::default().max_header_bytes)]
    max_header_bytes: usize,
    /// The most password checks (argon2, about 19 MiB each) running at once.
    #[arg(long, env = "FERRY_MAX_PASSWORD_CHECKS", default_value_t = AuthConfig::default().max_password_checks)]
    max_password_checks: usize,
    /// How long a login waits for a password check before it is answered 503, in seconds.
    #[arg(long, env = "FERRY_PASSWORD_CHECK_WAIT", default_value_t = AuthConfig::default().password_check_wait.as_secs())]
    password_check_wait: u64,
    /// Accept every request without credentials, as an administrator. For local development
    /// only: by default the server requires a user (see `ferry users add`).
    #[arg(long, env = "FERRY_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// How long a login's access token (and `_session` cookie) lasts, in seconds.
    #[arg(long, env = "FERRY_ACCESS_TOKEN_TTL", default_value_t = AuthConfig::default().access_token_ttl.as_secs())]
    access_token_ttl: u64,
    /// How long a replica may keep resuming with reconnect tokens before logging in again,
    /// in seconds.
    #[arg(long, env = "FERRY_RECONNECT_TOKEN_TTL", default_value_t = AuthConfig::default().reconnect_token_ttl.as_secs())]
    reconnect_token_ttl: u64,
    /// Serve HTTPS and WSS with this certificate chain (PEM, the server's certificate first);
    /// needs --tls-key. Without both, the server speaks plain HTTP.
    #[arg(long, env = "FERRY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "FERRY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// How long a client may take to complete the TLS handshake, in seconds.
    #[arg(long, env = "FERRY_TLS_HANDSHAKE_TIMEOUT", default_value_t = ferry_server::TlsConfig::DEFAULT_HANDSHAKE_TIMEOUT.as_secs())]
    tls_handshake_timeout: u64,
}

impl ServeArgs {
    fn config(&self) -> Result<ferry_server::ServerConfig> {
        if self.max_json_depth
            > ferry_core::json::PARSER_HARD_DEPTH_LIMIT - ferry_server::params::ENVELOPE_DEPTH
        {
            bail!(
                "--max-json-depth can be at most {}",
                ferry_core::json::PARSER_HARD_DEPTH_LIMIT - ferry_server::params::ENVELOPE_DEPTH
            );
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let mut tls = ferry_server::TlsConfig::from_pem_files(cert, key)?;
                tls.handshake_timeout = Duration::from_secs(self.tls_handshake_timeout.max(1));
                Some(tls)
            }
            (Some(_), None) => bail!("--tls-cert needs --tls-key (or FERRY_TLS_KEY) too"),
            (None, Some(_)) => bail!("--tls-key needs --tls-cert (or FERRY_TLS_CERT) too"),
        };
        Ok(ferry_server::ServerConfig {
            data_dir: self.data_dir.clone(),
            tls,
            listen: self.listen,
            limits: Limits {
                max_document_bytes: self.max_document_bytes,
                max_request_bytes: self.max_request_bytes,
                max_json_depth: self.max_json_depth,
                max_json_values: self.max_json_values,
                max_doc_id_bytes: self.max_doc_id_bytes,
                max_batch_docs: self.max_batch_docs,
                max_page_rows: self.max_page_rows,
                revs_limit: self.revs_limit,
                ancestor_bodies: self.ancestor_bodies,
            },
            auth: AuthConfig {
                required: !self.insecure_no_auth,
                access_token_ttl: Duration::from_secs(self.access_token_ttl),
                reconnect_token_ttl: Duration::from_secs(self.reconnect_token_ttl),
                max_password_checks: self.max_password_checks.max(1),
                password_check_wait: Duration::from_secs(self.password_check_wait),
                ..AuthConfig::default()
            },
            max_sessions: self.max_sessions,
            databases: ferry_store::sqlite::BackendLimits {
                max_databases: self.max_databases,
                max_open: self.max_open_databases,
            },
            page_cache: ferry_store::PageCache {
                writer_kib: self.page_cache_writer_kib,
                reader_kib: self.page_cache_reader_kib,
            },
            max_unauthenticated_sessions: self.max_unauthenticated_sessions,
            // A zero timeout would close every connection at once: one second at least.
            hello_timeout: Duration::from_secs(self.hello_timeout.max(1)),
            session_idle_timeout: Duration::from_secs(self.session_idle_timeout.max(1)),
            max_unauthenticated_bytes: self.max_unauthenticated_bytes,
            max_connections: self.max_connections.max(1),
            header_read_timeout: Duration::from_secs(self.header_read_timeout.max(1)),
            request_body_timeout: Duration::from_secs(self.request_body_timeout.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout.max(1)),
            max_header_bytes: self.max_header_bytes,
            max_clock_drift: Duration::from_secs(self.max_clock_drift),
            conflict_policies: ferry_core::resolve::Policies {
                default: self.default_conflict_policy,
                collections: self.conflict_policies.iter().cloned().collect(),
            },
            allowed_origins: self.allowed_origins.clone(),
            ..ferry_server::ServerConfig::default()
        })
    }
}

fn parse_collection_policy(text: &str) -> Result<(String, ferry_core::resolve::Policy), String> {
    let (collection, policy) = text
        .split_once('=')
        .ok_or_else(|| format!("expected COLLECTION=POLICY, got {text:?}"))?;
    let policy = policy.parse().map_err(|error| format!("{error}"))?;
    Ok((collection.to_owned(), policy))
}

fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli) {
        eprintln!("error: {error}");
        for cause in error.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Users(args) => users::run(args, json),
        Command::Replica(command) => replica::run(command, json),
        Command::Sync(args) => sync::run(args, json),
    }
}

fn serve(args: &ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .init();
    let config = args.config()?;
    if !config.auth.required {
        tracing::warn!("--insecure-no-auth: every request is accepted as an administrator");
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        ferry_server::serve(config.clone(), shutdown)
            .await
            .with_context(|| format!("serving on {}", config.listen))
    })
}

/// Prints `value` as JSON, or the human text.
fn print(json: bool, value: Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// SIGKILL cannot reveal a missing fsync, so the setting itself is checked: from the
    /// command line `ferry serve` runs with, through the server's state, to the SQLite
    /// connection of a database it opens. (CLI replicas are the SDK's: its
    /// `replicas_commit_with_fsync` checks them.)
    #[test]
    fn the_server_commits_with_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("server");
        let cli = Cli::try_parse_from([
            "ferry",
            "serve",
            "--insecure-no-auth",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("parsed as serve")
        };
        let config = args.config().unwrap();
        let state = ferry_server::open_state(&config).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let durability = runtime
            .block_on(state.run(|backend| backend.create_database("durable")?.durability()))
            .unwrap();
        assert_eq!(durability, ferry_store::Durability::Full);
    }
}
