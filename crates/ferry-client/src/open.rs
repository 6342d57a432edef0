//! Opening a replica: [`FerryBuilder`], with the limits, durability, clock and conflict
//! policies it opens with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::model::Limits;
use ferry_store::clock::{ReplicaClock, SystemClock, WallClock};
use ferry_store::endpoint::EndpointConfig;
use ferry_store::sqlite::SqliteDatabase;
use ferry_store::{Database, Durability, PageCache, StoreConfig, StoreError};
use ferry_sync::{BlockingCalls, SyncError};
use tokio::sync::watch;

use crate::{ClientError, ConflictPolicy, Ferry, Inner, MAX_CLOCK_DRIFT_MS};

/// How to open a replica: [`Ferry::builder`], the options, then [`FerryBuilder::open`].
///
/// ```
/// use std::time::Duration;
/// use ferry_client::{ConflictPolicy, Durability, Ferry, Limits};
/// let dir = tempfile::tempdir().unwrap();
/// let ferry = Ferry::builder("ann")
///     .limits(Limits { max_document_bytes: 64 * 1024, ..Limits::default() })
///     .durability(Durability::Full)
///     .max_clock_drift(Duration::from_secs(30))
///     .conflict_policy("todos", ConflictPolicy::Merge)
///     .open(dir.path().join("notes.ferry"))
///     .unwrap();
/// assert_eq!(ferry.limits().max_document_bytes, 64 * 1024);
/// ```
#[derive(Clone)]
#[must_use]
pub struct FerryBuilder {
    user: String,
    limits: Limits,
    durability: Durability,
    page_cache: PageCache,
    max_blocking_calls: usize,
    wall_clock: Arc<dyn WallClock>,
    max_clock_drift: Duration,
    policies: Vec<(String, ConflictPolicy)>,
}

impl std::fmt::Debug for FerryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FerryBuilder")
            .field("user", &self.user)
            .field("limits", &self.limits)
            .field("durability", &self.durability)
            .field("page_cache", &self.page_cache)
            .field("max_blocking_calls", &self.max_blocking_calls)
            .field("max_clock_drift", &self.max_clock_drift)
            .field("policies", &self.policies)
            .finish_non_exhaustive()
    }
}

impl Ferry {
    /// Options for opening a replica for `user`: every default is
    /// [`Ferry::initialize_offline`]'s.
    pub fn builder(user: &str) -> FerryBuilder {
        FerryBuilder {
            user: user.to_owned(),
            limits: Limits::default(),
            durability: Durability::Full,
            page_cache: PageCache::CLIENT,
            max_blocking_calls: BlockingCalls::DEFAULT_MAX,
            wall_clock: Arc::new(SystemClock),
            max_clock_drift: Duration::from_millis(MAX_CLOCK_DRIFT_MS),
            policies: Vec::new(),
        }
    }
}

impl FerryBuilder {
    /// The limits documents are checked against (each must be above zero). Keep them within
    /// the server's: a document the server refuses is marked rejected when it is pushed.
    pub fn limits(mut self, limits: Limits) -> FerryBuilder {
        self.limits = limits;
        self
    }

    /// How commits reach the disk. [`Durability::Full`] (the default) makes every
    /// acknowledged local write survive a power loss; [`Durability::Normal`] only a crash of
    /// the process, for caches and tests.
    pub fn durability(mut self, durability: Durability) -> FerryBuilder {
        self.durability = durability;
        self
    }

    /// How much memory the replica's SQLite connections may keep for cached pages
    /// ([`PageCache::CLIENT`] by default); sizes outside [`PageCache::MIN_KIB`] to
    /// [`PageCache::MAX_KIB`] are refused when the replica opens.
    ///
    /// ```
    /// use ferry_client::{Ferry, PageCache};
    /// let dir = tempfile::tempdir().unwrap();
    /// let small = PageCache { writer_kib: 512, reader_kib: 128 };
    /// let ferry = Ferry::builder("ann").page_cache(small).open(dir.path().join("a.ferry"));
    /// assert!(ferry.is_ok());
    /// let none = PageCache { writer_kib: 0, reader_kib: 128 };
    /// assert!(Ferry::builder("ann").page_cache(none).open(dir.path().join("b.ferry")).is_err());
    /// ```
    pub fn page_cache(mut self, page_cache: PageCache) -> FerryBuilder {
        self.page_cache = page_cache;
        self
    }

    /// How many store calls the replica's async work (sync,
    /// [`Collection::watch`](crate::Collection::watch) and the other streams) makes at once,
    /// each on one of tokio's blocking threads: 2 by default, at most [`BlockingCalls::MAX`].
    /// Unbounded, tokio's blocking pool would grow a thread per waiting call, each with
    /// buffers of its own. The synchronous API runs on the caller's thread, unbounded.
    ///
    /// ```
    /// use ferry_client::Ferry;
    /// let dir = tempfile::tempdir().unwrap();
    /// let ferry = Ferry::builder("ann").max_blocking_calls(4).open(dir.path().join("a.ferry"));
    /// assert!(ferry.is_ok());
    /// let none = Ferry::builder("ann").max_blocking_calls(0).open(dir.path().join("b.ferry"));
    /// assert!(none.is_err());
    /// ```
    pub fn max_blocking_calls(mut self, max: usize) -> FerryBuilder {
        self.max_blocking_calls = max;
        self
    }

    /// The wall clock the replica stamps edits and checks expiries with (the system's by
    /// default): tests hand a [`ManualClock`](crate::ManualClock) to control time.
    pub fn wall_clock(mut self, clock: Arc<dyn WallClock>) -> FerryBuilder {
        self.wall_clock = clock;
        self
    }

    /// How far ahead of this device's clock a pulled revision's clock may be and still be
    /// adopted (60 s by default, the server's default limit; keep it equal to the server's).
    pub fn max_clock_drift(mut self, drift: Duration) -> FerryBuilder {
        self.max_clock_drift = drift;
        self
    }

    /// Resolves `collection`'s conflicts by `policy`, as [`Ferry::set_conflict_policy`] does
    /// once the replica is open (a named policy is kept in the replica).
    pub fn conflict_policy(mut self, collection: &str, policy: ConflictPolicy) -> FerryBuilder {
        self.policies.push((collection.to_owned(), policy));
        self
    }

    /// Opens (creating if needed) the replica at `path`.
    pub fn open(self, path: impl AsRef<Path>) -> Result<Ferry, ClientError> {
        self.open_at(path.as_ref().to_owned(), None)
    }

    /// Opens a replica in a new temporary file, deleted when the last handle is dropped: for
    /// tests and throwaway sessions.
    pub fn open_temporary(self) -> Result<Ferry, ClientError> {
        let dir = tempfile::tempdir().map_err(StoreError::from)?;
        self.open_at(dir.path().join("replica.ferry"), Some(dir))
    }

    fn open_at(
        self,
        path: PathBuf,
        temporary: Option<tempfile::TempDir>,
    ) -> Result<Ferry, ClientError> {
        check_limits(&self.limits)?;
        let blocking =
            BlockingCalls::new(self.max_blocking_calls).map_err(|error| match error {
                SyncError::InvalidOptions(problem) => ClientError::InvalidOptions(problem),
                other => ClientError::Sync(other),
            })?;
        let max_drift_ms = u64::try_from(self.max_clock_drift.as_millis()).unwrap_or(u64::MAX);
        let config = StoreConfig {
            limits: self.limits.clone(),
            durability: self.durability,
            track_pending: true,
            page_cache: self.page_cache,
        };
        let db = SqliteDatabase::open(&path, "local", config)?;
        let update_seq = db.info()?.update_seq;
        let clock = ReplicaClock::resumed(
            self.wall_clock,
            max_drift_ms,
            ferry_store::newest_clock(&db)?,
        );
        let ferry = Ferry {
            inner: Arc::new(Inner {
                db: Arc::new(db),
                path,
                user: self.user,
                clock: Arc::new(clock),
                endpoint: EndpointConfig {
                    limits: self.limits,
                    ..EndpointConfig::default()
                },
                changes: watch::channel(update_seq).0,
                poller_started: std::sync::atomic::AtomicBool::new(false),
                connection: Arc::new(crate::connection::ConnectionShared::new()),
                conflicts: crate::conflicts::ConflictState::new(),
                subscriptions_changed: watch::channel(0).0,
                blocking,
                _temporary: temporary,
            }),
        };
        for (collection, policy) in self.policies {
            ferry.set_conflict_policy(&collection, policy)?;
        }
        Ok(ferry)
    }
}

/// Refuses limits no document could pass.
fn check_limits(limits: &Limits) -> Result<(), ClientError> {
    let named = [
        ("max_document_bytes", limits.max_document_bytes),
        ("max_request_bytes", limits.max_request_bytes),
        ("max_json_depth", limits.max_json_depth),
        ("max_json_values", limits.max_json_values),
        ("max_doc_id_bytes", limits.max_doc_id_bytes),
        ("max_batch_docs", limits.max_batch_docs),
        ("max_page_rows", limits.max_page_rows),
        ("revs_limit", limits.revs_limit),
    ];
    match named.iter().find(|(_, value)| *value == 0) {
        Some((name, _)) => Err(ClientError::InvalidOptions(format!(
            "the limit {name} must be above zero"
        ))),
        None => Ok(()),
    }
}
