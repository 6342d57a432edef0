//! `ferry`: run the sync server, keep local replicas, and sync them.
//!
//! The binary is glue: argument parsing (clap) and output formatting here, everything else in
//! `ferry-server`, `ferry-store` and `ferry-sync`. Errors carry context (anyhow) and are printed
//! as one readable chain; `--json` switches every command's output to JSON for scripts.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ferry_core::hlc::{HlcClock, Timestamp};
use ferry_core::json::parse_object;
use ferry_core::model::{Document, Limits, doc_id_in, validate_doc_id};
use ferry_core::selector::Selector;
use ferry_server::auth::AuthConfig;
use ferry_store::sqlite::SqliteDatabase;
use ferry_store::{Database, Durability, Edit, Query, StoreConfig};
use serde_json::{Value, json};

mod sync;
mod users;

// glibc's allocator spends a quarter of a replication's CPU in malloc and free (many small
// JSON values, and batch-sized buffers whose release consolidates its free lists); mimalloc's
// thread-local pages cost a fraction of that (BENCHMARKS.md).
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
    /// Create a local replica file (a SQLite database).
    Init {
        /// The replica file to create.
        replica: PathBuf,
    },
    /// Create or update a document in a local replica.
    Put {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// The document id; omit (or `-`) to generate a UUIDv7.
        id: Option<String>,
        /// The document body as JSON; read from standard input when omitted.
        #[arg(long, short)]
        data: Option<String>,
        /// The revision to update; by default the current winner.
        #[arg(long)]
        rev: Option<String>,
    },
    /// Show a document of a local replica.
    Get {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
    },
    /// Delete a document of a local replica.
    Delete {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
    },
    /// List the collections of a local replica with their document counts.
    Collections {
        /// The replica file.
        replica: PathBuf,
    },
    /// List the documents of a collection, optionally filtered and sorted.
    List {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// A Mango selector, e.g. '{"done": false}'.
        #[arg(long = "where")]
        selector: Option<String>,
        /// Sort by this field (prefix with `-` for descending).
        #[arg(long)]
        sort: Option<String>,
        /// At most this many documents.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// List documents that are in conflict, with every conflicting version.
    Conflicts {
        /// The replica file.
        replica: PathBuf,
        /// Only this collection.
        collection: Option<String>,
    },
    /// Resolve a conflict: keep one version (or write a merged one) and delete the others.
    Resolve {
        /// The replica file.
        replica: PathBuf,
        /// The collection.
        collection: String,
        /// The document id.
        id: String,
        /// The revision to keep; by default the current winner.
        #[arg(long)]
        keep: Option<String>,
        /// A merged body to write on top of the kept revision.
        #[arg(long, short)]
        data: Option<String>,
    },
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
        Command::Init { replica } => {
            if replica.exists() {
                bail!("{} already exists", replica.display());
            }
            let db = open_replica_allow_new(&replica)?;
            let info = db.info()?;
            print(
                json,
                json!({"replica": replica, "replica_id": info.replica_id}),
                || {
                    format!(
                        "created replica {} (id {})",
                        replica.display(),
                        info.replica_id
                    )
                },
            );
            Ok(())
        }
        Command::Put {
            replica,
            collection,
            id,
            data,
            rev,
        } => {
            let db = open_replica(&replica)?;
            let text = match data {
                Some(text) => text,
                None => {
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("reading the document from standard input")?;
                    text
                }
            };
            let limits = Limits::default();
            let body = parse_object(text.as_bytes(), limits.max_json_depth)
                .context("the document is not a valid JSON object")?;
            let id = match id.as_deref() {
                None | Some("-") => uuid::Uuid::now_v7().simple().to_string(),
                Some(id) => id.to_owned(),
            };
            let doc_id = doc_id_in(&collection, &id);
            validate_doc_id(&doc_id, &limits)?;
            let base = match rev {
                Some(rev) => Some(rev.parse().context("invalid --rev")?),
                None => db
                    .get_document(&doc_id)?
                    .filter(|document| !document.deleted)
                    .map(|document| document.rev),
            };
            let edit = Edit::put(doc_id.clone(), base, body).with_hlc(local_now(&*db)?);
            let rev = db.write_edits(vec![edit])?.remove(0).with_context(|| {
                format!("{doc_id} changed since the revision given; get it again")
            })?;
            print(
                json,
                json!({"id": id, "collection": collection, "rev": rev.to_string()}),
                || format!("{collection}/{id} {rev}"),
            );
            Ok(())
        }
        Command::Get {
            replica,
            collection,
            id,
        } => {
            let db = open_replica(&replica)?;
            let document = live_document(&*db, &collection, &id)?;
            let value = document_value(&collection, &id, &document);
            print(json, value.clone(), || {
                serde_json::to_string_pretty(&value).expect("JSON")
            });
            Ok(())
        }
        Command::Delete {
            replica,
            collection,
            id,
        } => {
            let db = open_replica(&replica)?;
            let document = live_document(&*db, &collection, &id)?;
            let edit = Edit::delete(document.doc_id, document.rev).with_hlc(local_now(&*db)?);
            let rev = db.write_edits(vec![edit])?.remove(0)?;
            print(
                json,
                json!({"id": id, "deleted": true, "rev": rev.to_string()}),
                || format!("deleted {collection}/{id} ({rev})"),
            );
            Ok(())
        }
        Command::Collections { replica } => {
            let db = open_replica(&replica)?;
            let collections = db.collections()?;
            let value: Value = collections
                .iter()
                .map(|(name, count)| json!({"collection": name, "documents": count}))
                .collect();
            print(json, value, || {
                collections
                    .iter()
                    .map(|(name, count)| {
                        let name = if name.is_empty() { "(default)" } else { name };
                        format!("{name}  {count}")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        Command::List {
            replica,
            collection,
            selector,
            sort,
            limit,
        } => {
            let db = open_replica(&replica)?;
            let selector = match selector {
                Some(text) => Selector::parse(
                    &serde_json::from_str(&text).context("--where is not valid JSON")?,
                )?,
                None => Selector::everything(),
            };
            let sort = sort
                .map(|field| match field.strip_prefix('-') {
                    Some(field) => vec![(field.to_owned(), true)],
                    None => vec![(field, false)],
                })
                .unwrap_or_default();
            let documents = db.query(&Query {
                collection: collection.clone(),
                selector,
                sort,
                skip: 0,
                limit,
            })?;
            let values: Vec<Value> = documents
                .iter()
                .map(|document| {
                    let id = own_id(&document.doc_id);
                    document_value(&collection, id, document)
                })
                .collect();
            print(json, Value::Array(values.clone()), || {
                values
                    .iter()
                    .map(|value| {
                        let mut line = value.clone();
                        let id = line["_id"].as_str().unwrap_or_default().to_owned();
                        let object = line.as_object_mut().expect("object");
                        object.retain(|key, _| !key.starts_with('_'));
                        let conflicts = if value.get("_conflicts").is_some() {
                            "  (in conflict)"
                        } else {
                            ""
                        };
                        format!("{id}  {line}{conflicts}")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        Command::Conflicts {
            replica,
            collection,
        } => {
            let db = open_replica(&replica)?;
            let conflicts = list_conflicts(&*db, collection.as_deref())?;
            print(json, Value::Array(conflicts.clone()), || {
                if conflicts.is_empty() {
                    return "no conflicts".to_owned();
                }
                let mut lines = Vec::new();
                for conflict in &conflicts {
                    lines.push(format!("{}:", conflict["id"].as_str().unwrap_or_default()));
                    for version in conflict["versions"].as_array().into_iter().flatten() {
                        lines.push(format!(
                            "  {} {} {}",
                            if version["winner"] == json!(true) {
                                "winner  "
                            } else {
                                "conflict"
                            },
                            version["rev"].as_str().unwrap_or_default(),
                            version["body"]
                        ));
                    }
                }
                lines.join("\n")
            });
            Ok(())
        }
        Command::Resolve {
            replica,
            collection,
            id,
            keep,
            data,
        } => {
            let db = open_replica(&replica)?;
            let doc_id = doc_id_in(&collection, &id);
            let conflict = db
                .conflict(&doc_id)?
                .with_context(|| format!("{collection}/{id} is not in conflict"))?;
            let body = match (data, keep) {
                (Some(text), _) => parse_object(text.as_bytes(), Limits::default().max_json_depth)
                    .context("--data is not a valid JSON object")?,
                (None, keep) => {
                    let keep: Option<ferry_core::rev::Rev> = keep
                        .map(|rev| rev.parse())
                        .transpose()
                        .context("invalid --keep")?;
                    let mut versions = conflict.versions.iter();
                    let chosen = match &keep {
                        Some(rev) => versions.find(|version| version.rev == *rev),
                        // The current winner: the highest revision.
                        None => versions.max_by(|a, b| a.rev.cmp(&b.rev)),
                    };
                    chosen
                        .with_context(|| {
                            format!(
                                "{} is not a current version of {collection}/{id}",
                                keep.map(|rev| rev.to_string()).unwrap_or_default()
                            )
                        })?
                        .body
                        .clone()
                }
            };
            // One transaction: the chosen or merged body on the winning version, a tombstone on
            // every other one, and a resolution record.
            let mut resolution = ferry_core::resolve::resolve_with(&conflict, body)?;
            resolution.hlc = resolution.hlc.max(local_now(&*db)?);
            db.apply_resolution(&doc_id, &resolution)?
                .context("the document changed meanwhile; run `ferry conflicts` again")?;
            let winner = db.get_document(&doc_id)?.context("document vanished")?;
            print(
                json,
                json!({"id": id, "rev": winner.rev.to_string(), "conflicts": winner.conflicts.len()}),
                || format!("{collection}/{id} resolved at {}", winner.rev),
            );
            Ok(())
        }
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

/// The current, not deleted, version of a document.
fn live_document(db: &dyn Database, collection: &str, id: &str) -> Result<Document> {
    db.get_document(&doc_id_in(collection, id))?
        .filter(|document| !document.deleted)
        .with_context(|| format!("{collection}/{id} does not exist"))
}

/// Prints `value` as JSON, or the human text.
fn print(json: bool, value: Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

/// A document id without its collection prefix.
fn own_id(doc_id: &str) -> &str {
    doc_id.split_once(':').map_or(doc_id, |(_, id)| id)
}

fn document_value(collection: &str, id: &str, document: &Document) -> Value {
    let mut value = json!({
        "_id": id,
        "_collection": collection,
        "_rev": document.rev.to_string(),
    });
    if !document.conflicts.is_empty() {
        value["_conflicts"] = document.conflicts.iter().map(ToString::to_string).collect();
    }
    for (key, field) in &document.body {
        value[key] = field.clone();
    }
    value
}

fn list_conflicts(db: &dyn Database, collection: Option<&str>) -> Result<Vec<Value>> {
    let mut found = Vec::new();
    let mut since = 0;
    loop {
        let changes = db.changes(since, 500, false)?;
        let Some(last) = changes.last() else { break };
        since = last.seq;
        for change in changes {
            let live: Vec<_> = change.leaves.iter().filter(|leaf| !leaf.deleted).collect();
            if live.len() < 2 {
                continue;
            }
            if collection.is_some_and(|collection| {
                ferry_core::model::collection_of(&change.doc_id) != collection
            }) {
                continue;
            }
            let mut versions = Vec::new();
            for leaf in live {
                let revision = db.get_revision(&change.doc_id, &leaf.rev, 1)?;
                versions.push(json!({
                    "rev": leaf.rev.to_string(),
                    "winner": leaf.rev == change.rev,
                    "hlc": revision.as_ref().map(|revision| revision.hlc.to_string()),
                    "body": revision.and_then(|revision| revision.body),
                }));
            }
            found.push(json!({"id": change.doc_id, "versions": versions}));
        }
    }
    Ok(found)
}

fn replica_config() -> StoreConfig {
    StoreConfig {
        limits: Limits::default(),
        durability: Durability::Full,
        track_pending: false,
    }
}

/// Opens an existing replica file.
pub(crate) fn open_replica(path: &Path) -> Result<Arc<dyn Database>> {
    if !path.exists() {
        bail!(
            "{} does not exist; create it with `ferry init {}`",
            path.display(),
            path.display()
        );
    }
    open_replica_allow_new(path)
}

fn open_replica_allow_new(path: &Path) -> Result<Arc<dyn Database>> {
    let name = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or("replica")
        .to_owned();
    let db = SqliteDatabase::open(path, &name, replica_config())
        .with_context(|| format!("opening replica {}", path.display()))?;
    Ok(Arc::new(db))
}

/// A clock reading for a local edit, after the newest clock this replica has seen.
fn local_now(db: &dyn Database) -> Result<Timestamp> {
    let mut clock = HlcClock::new(u64::MAX);
    // The CLI is a short-lived process: restore the clock from the newest stored change so
    // that timestamps stay monotonic across invocations.
    let seq = db.info()?.update_seq;
    if let Some(change) = db.changes(seq.saturating_sub(1), 1, false)?.first()
        && let Some(document) = db.get_document(&change.doc_id)?
    {
        clock
            .observe(document.hlc, u64::MAX)
            .expect("no drift bound");
    }
    let wall_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        });
    Ok(clock.now(wall_ms))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// SIGKILL cannot reveal a missing fsync, so the setting itself is checked: from the
    /// command line `ferry serve` runs with, through the server's state, to the SQLite
    /// connection of a database it opens; and the same for CLI replicas.
    #[test]
    fn the_server_and_cli_replicas_commit_with_fsync() {
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
        assert_eq!(durability, Durability::Full);

        let replica = open_replica_allow_new(&dir.path().join("replica.sqlite")).unwrap();
        assert_eq!(replica.durability().unwrap(), Durability::Full);
    }
}
