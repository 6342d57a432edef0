//! Storage for Ferry replicas: one trait, its SQLite implementation, and the conformance suite
//! every implementation must pass.
//!
//! A [`Backend`] holds named databases (a server hosts many; a client's local replica is one).
//! A [`Database`] stores documents with their revision trees, the bodies of their leaves and of
//! recent ancestors, a changes feed ordered by sequence, and local (never replicated) documents
//! such as replication checkpoints.
//!
//! The trait is synchronous: SQLite is called directly, the server calls it from
//! `spawn_blocking`, and a PostgreSQL implementation can use a blocking client on the same
//! threads. The revision-tree logic lives in `ferry_core::tree`; a store only loads a tree,
//! lets the core change it, and writes the result back inside one transaction.
//!
//! ```
//! use ferry_store::{Backend, Edit, sqlite::SqliteBackend, StoreConfig};
//! let dir = tempfile::tempdir().unwrap();
//! let backend = SqliteBackend::open(dir.path(), StoreConfig::default()).unwrap();
//! let db = backend.create_database("notes").unwrap();
//! let body = serde_json::json!({"title": "milk"}).as_object().unwrap().clone();
//! let results = db.write_edits(vec![Edit::put("todos:1", None, body)]).unwrap();
//! let rev = results[0].as_ref().unwrap();
//! assert_eq!(db.get_document("todos:1").unwrap().unwrap().rev, *rev);
//! ```

use std::sync::Arc;

use ferry_core::hlc::Timestamp;
use ferry_core::json::RawJson;
use ferry_core::model::{Body, Document, Limits, Revision};
use ferry_core::resolve::{Conflict, Policy, Resolution, ResolutionRecord, Version, resolve};
use ferry_core::rev::Rev;
use ferry_core::selector::Selector;
use ferry_core::tree::{Applied, EditError, Leaf, RevTree, RevsDiff};

pub mod accounts;
pub mod clock;
pub mod conformance;
pub mod endpoint;
pub mod failpoint;
pub mod memory;
pub mod sqlite;

/// How many of a SQLite file's migrations ran (`PRAGMA user_version`); a file from a newer
/// Ferry (past `supported`) is refused. Both the databases and the accounts file use it.
pub(crate) fn schema_version(
    connection: &rusqlite::Connection,
    supported: i64,
    what: &'static str,
) -> Result<usize, StoreError> {
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version > supported {
        return Err(StoreError::FutureSchema {
            found: version,
            supported,
        });
    }
    usize::try_from(version).map_err(|_| StoreError::Corrupt {
        what,
        detail: version.to_string(),
    })
}

/// Settings shared by every store implementation.
#[derive(Clone, Debug, Default)]
pub struct StoreConfig {
    /// Limits the store itself enforces (revs limit, ancestor bodies kept).
    pub limits: Limits,
    /// When a committed write is on disk.
    pub durability: Durability,
    /// Record local edits in an outbox until a push acknowledges them (client replicas; see
    /// `sqlite::SqliteDatabase::pending_summary`).
    pub track_pending: bool,
    /// Memory each SQLite connection may keep for cached pages (the in-memory stores ignore
    /// it).
    pub page_cache: PageCache,
}

/// How much memory a SQLite database's connections may keep for cached pages (`PRAGMA
/// cache_size`), in KiB per connection: one writer and up to four readers per open database.
///
/// Pages not in a connection's cache are read from the file (through the operating system's
/// own cache), so a smaller cache costs reads, not correctness. The writer's cache is worth
/// more: a transaction's changed pages stay in it until the commit, and a large write spills
/// to the file when they do not fit. [`PageCache::default`] is SQLite's own default for both
/// (2,000 KiB); [`PageCache::CLIENT`] is smaller, as a device's memory is the application's
/// (with SQLite's default a client syncing a million changes held about 10 MiB more,
/// `BENCHMARKS.md` session 31, and local writes were no faster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageCache {
    /// The writing connection's cache, in KiB.
    pub writer_kib: u32,
    /// Each reading connection's cache, in KiB.
    pub reader_kib: u32,
}

impl PageCache {
    /// The smallest cache a connection may have: SQLite needs a few pages to work at all.
    pub const MIN_KIB: u32 = 64;
    /// The largest: beyond this a database should be given more readers' memory by the
    /// operating system's page cache instead.
    pub const MAX_KIB: u32 = 1024 * 1024;
    /// Client replicas' default: the writer at 1 MiB, readers at 256 KiB.
    pub const CLIENT: PageCache = PageCache {
        writer_kib: 1024,
        reader_kib: 256,
    };

    /// Checks both sizes are within [`PageCache::MIN_KIB`] and [`PageCache::MAX_KIB`].
    pub fn check(&self) -> Result<(), StoreError> {
        for (what, kib) in [("writer", self.writer_kib), ("reader", self.reader_kib)] {
            if !(Self::MIN_KIB..=Self::MAX_KIB).contains(&kib) {
                return Err(StoreError::InvalidPageCache {
                    what,
                    kib,
                    min: Self::MIN_KIB,
                    max: Self::MAX_KIB,
                });
            }
        }
        Ok(())
    }
}

impl Default for PageCache {
    fn default() -> PageCache {
        PageCache {
            writer_kib: 2000,
            reader_kib: 2000,
        }
    }
}

/// When a committed transaction is durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is flushed to disk before it returns (SQLite `synchronous=FULL`). An
    /// acknowledged write survives a power loss. The default, on the server and on clients.
    #[default]
    Full,
    /// Commits survive a process crash but may be lost on power loss (SQLite
    /// `synchronous=NORMAL` in WAL mode). For tests and caches only.
    Normal,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database does not exist.
    #[error("database {0:?} does not exist")]
    NoSuchDatabase(String),
    /// A database with that name exists already.
    #[error("database {0:?} already exists")]
    DatabaseExists(String),
    /// A page cache size is outside the range a connection may have.
    #[error("the {what}'s page cache of {kib} KiB is outside {min}..={max} KiB")]
    InvalidPageCache {
        /// Which connection: `writer` or `reader`.
        what: &'static str,
        /// The size asked for.
        kib: u32,
        /// The smallest allowed.
        min: u32,
        /// The largest allowed.
        max: u32,
    },
    /// The database name is not allowed.
    #[error(
        "invalid database name {0:?}: use lowercase letters, digits and _$()+- , starting with a letter, at most 128 characters"
    )]
    InvalidDatabaseName(String),
    /// A local document's revision did not match.
    #[error("local document update conflict")]
    LocalConflict,
    /// A replicated revision was refused (its path is malformed).
    #[error("invalid revision for {doc_id}: {reason}")]
    InvalidRevision {
        /// The document.
        doc_id: String,
        /// What is wrong.
        reason: String,
    },
    /// A query was refused.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// Stored data could not be decoded: the file is corrupt or from a newer version.
    #[error("corrupt data in {what}: {detail}")]
    Corrupt {
        /// Where.
        what: &'static str,
        /// What.
        detail: String,
    },
    /// The database file was written by a newer Ferry.
    #[error("database schema version {found} is newer than this Ferry supports ({supported})")]
    FutureSchema {
        /// The version found.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// Storage refused a write: the disk is full, a file size limit was reached, or the
    /// device failed. The transaction was rolled back: nothing of it is stored, what was
    /// stored before is intact, and the database is usable (reads work; writes work again
    /// once there is room).
    #[error("cannot write to storage (disk full, file size limit or device error): {0}")]
    StorageFull(String),
    /// Creating the database would pass the backend's limit on databases.
    #[error("this server holds at most {limit} databases")]
    TooManyDatabases {
        /// The limit.
        limit: usize,
    },
    /// Every open database is in use and opening one more would pass the limit on open
    /// databases; retry when a request or session has finished with its database.
    #[error("at most {limit} databases are open at once, all in use")]
    TooManyOpen {
        /// The limit.
        limit: usize,
    },
    /// The underlying SQLite call failed. The source is SQLite's error, boxed: the SQLite
    /// binding is not part of this crate's API.
    #[error("sqlite: {0}")]
    Sqlite(Box<dyn std::error::Error + Send + Sync>),
    /// A file operation failed.
    #[error("i/o: {0}")]
    Io(std::io::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        // SQLITE_FULL on ENOSPC; SQLITE_IOERR_WRITE (778) on other failed writes, among them
        // EFBIG past a file size limit.
        const SQLITE_IOERR_WRITE: std::ffi::c_int = 778;
        match &error {
            rusqlite::Error::SqliteFailure(failure, _)
                if failure.code == rusqlite::ErrorCode::DiskFull
                    || failure.extended_code == SQLITE_IOERR_WRITE =>
            {
                StoreError::StorageFull(error.to_string())
            }
            _ => StoreError::Sqlite(Box::new(error)),
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(error: std::io::Error) -> StoreError {
        match error.kind() {
            std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::FileTooLarge
            | std::io::ErrorKind::QuotaExceeded => StoreError::StorageFull(error.to_string()),
            _ => StoreError::Io(error),
        }
    }
}

/// A collection of named databases.
pub trait Backend: Send + Sync {
    /// Creates a database; fails with [`StoreError::DatabaseExists`] if it exists.
    fn create_database(&self, name: &str) -> Result<Arc<dyn Database>, StoreError>;
    /// Opens an existing database; fails with [`StoreError::NoSuchDatabase`] otherwise.
    fn open_database(&self, name: &str) -> Result<Arc<dyn Database>, StoreError>;
    /// Deletes a database and everything in it.
    fn delete_database(&self, name: &str) -> Result<(), StoreError>;
    /// The names of all databases, sorted.
    fn database_names(&self) -> Result<Vec<String>, StoreError>;
}

/// Whether `name` is an acceptable database name (CouchDB's rule, without `/`).
pub fn valid_database_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 128
        && chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_$()+-".contains(c))
}

/// Counters describing a database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseInfo {
    /// The database name.
    pub name: String,
    /// This replica's id, fixed when the database was created.
    pub replica_id: String,
    /// Documents whose winner is not deleted.
    pub doc_count: u64,
    /// Documents whose winner is deleted.
    pub deleted_count: u64,
    /// The sequence of the latest change.
    pub update_seq: u64,
}

/// A local edit: a new revision on top of `base`, as the application or a CouchDB client with
/// `new_edits=true` makes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Edit {
    /// The document id.
    pub doc_id: String,
    /// The revision the edit is based on; `None` to create (or recreate after deletion).
    pub base: Option<Rev>,
    /// Whether the edit deletes the document.
    pub deleted: bool,
    /// The new body (usually empty for a deletion).
    pub body: Body,
    /// The edit's clock, assigned by the caller from its replica's [`ferry_core::hlc::HlcClock`].
    pub hlc: Timestamp,
}

impl Edit {
    /// An edit that writes `body`.
    pub fn put(doc_id: impl Into<String>, base: Option<Rev>, body: Body) -> Edit {
        Edit {
            doc_id: doc_id.into(),
            base,
            deleted: false,
            body,
            hlc: Timestamp::ZERO,
        }
    }

    /// An edit that deletes the document.
    pub fn delete(doc_id: impl Into<String>, base: Rev) -> Edit {
        Edit {
            doc_id: doc_id.into(),
            base: Some(base),
            deleted: true,
            body: Body::new(),
            hlc: Timestamp::ZERO,
        }
    }

    /// The same edit with a clock.
    pub fn with_hlc(mut self, hlc: Timestamp) -> Edit {
        self.hlc = hlc;
        self
    }
}

/// What writing replicated revisions did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Revisions that were new.
    pub added: u64,
    /// Revisions that were already present (a repeated batch changes nothing).
    pub already_present: u64,
    /// The documents the write changed that now have more than one live leaf (a conflict to
    /// resolve), in batch order without repeats: what a resolver looks at, instead of every
    /// document written.
    pub conflicted: Vec<String>,
}

/// One stored revision, as `GET /db/doc?rev=` and `_bulk_get` return it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRevision {
    /// The document id.
    pub doc_id: String,
    /// The revision's path, newest first, up to the requested length.
    pub path: Vec<Rev>,
    /// Whether it is a deletion.
    pub deleted: bool,
    /// The body as the store keeps it (JSON text: canonical for an edit, as received for a
    /// replicated revision; carried to the wire as it is), or
    /// `None` if this revision's body is no longer kept (an old ancestor).
    pub body: Option<RawJson>,
    /// The revision's clock.
    pub hlc: Timestamp,
}

impl StoredRevision {
    /// The body parsed, `None` if it is not kept.
    pub fn parsed_body(&self) -> Result<Option<Body>, StoreError> {
        self.body
            .as_ref()
            .map(|text| {
                serde_json::from_str(text.get()).map_err(|err| StoreError::Corrupt {
                    what: "document body",
                    detail: err.to_string(),
                })
            })
            .transpose()
    }

    /// As a [`Revision`] for replication (its body's text moved, not parsed); `None` if the
    /// body is not kept.
    pub fn into_revision(self) -> Option<Revision> {
        let body = self.body?;
        Some(Revision {
            doc_id: self.doc_id,
            path: self.path,
            deleted: self.deleted,
            body,
            hlc: Some(self.hlc),
        })
    }
}

/// One row of the changes feed: a document at its latest sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The sequence of the document's latest change.
    pub seq: u64,
    /// The document id.
    pub doc_id: String,
    /// The winning revision.
    pub rev: Rev,
    /// Whether the winner is deleted.
    pub deleted: bool,
    /// All leaves (for `style=all_docs`).
    pub leaves: Vec<Leaf>,
    /// The winner's body, when asked for.
    pub body: Option<Body>,
}

impl Change {
    /// The row as the replication state machine reads it (the leaves, the sequence as JSON).
    pub fn into_row(self) -> ferry_core::replicate::ChangeRow {
        ferry_core::replicate::ChangeRow {
            doc_id: self.doc_id,
            seq: ferry_core::replicate::Seq::from(self.seq),
            revs: self.leaves.into_iter().map(|leaf| leaf.rev).collect(),
            deleted: self.deleted,
        }
    }
}

/// A local (never replicated) document.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalDoc {
    /// Its id, without the `_local/` prefix.
    pub id: String,
    /// Its revision number (CouchDB shows it as `0-N`).
    pub rev: u64,
    /// Its body.
    pub body: Body,
}

/// Which documents `_all_docs` returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AllDocsQuery {
    /// Only ids at or after this one.
    pub start_key: Option<String>,
    /// Only ids at or before this one (before, if `inclusive_end` is false).
    pub end_key: Option<String>,
    /// Whether `end_key` itself is included.
    pub inclusive_end: bool,
    /// Descending id order.
    pub descending: bool,
    /// Rows to skip.
    pub skip: usize,
    /// The most rows.
    pub limit: usize,
    /// Whether to read bodies.
    pub include_bodies: bool,
}

/// A query over one collection's live documents.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// The collection.
    pub collection: String,
    /// Which documents match.
    pub selector: Selector,
    /// Sort fields (dotted paths) with descending flags; ties and the default order by id.
    pub sort: Vec<(String, bool)>,
    /// Rows to skip.
    pub skip: usize,
    /// The most rows.
    pub limit: usize,
}

/// One database of documents.
///
/// Architecture Invariant: every method that writes commits one transaction before it returns,
/// with the durability of [`StoreConfig::durability`]; nothing written is visible before then.
pub trait Database: Send + Sync {
    /// The durability its commits actually have, read from the live connection (what the
    /// crash tests cannot see: a missing fsync survives SIGKILL and loses data on power loss).
    fn durability(&self) -> Result<Durability, StoreError>;

    /// Counters and identity.
    fn info(&self) -> Result<DatabaseInfo, StoreError>;

    /// Applies local edits in one transaction. Each edit gets its own result: the new revision,
    /// or why it was refused (the refused ones change nothing). An edit identical to one
    /// already present (same parent, deleted flag and body) returns the existing revision.
    fn write_edits(&self, edits: Vec<Edit>) -> Result<Vec<Result<Rev, EditError>>, StoreError>;

    /// Merges replicated revisions into their trees (`new_edits=false`) in one transaction.
    /// Revisions without a clock get `default_hlc`. Never overwrites: a concurrent branch
    /// becomes a conflict. Applying the same revisions again changes nothing.
    fn write_revisions(
        &self,
        revisions: Vec<Revision>,
        default_hlc: Timestamp,
    ) -> Result<WriteReport, StoreError>;

    /// The winner of a document (deleted winners included), with its conflicts.
    fn get_document(&self, doc_id: &str) -> Result<Option<Document>, StoreError>;

    /// A document's revision tree.
    fn get_tree(&self, doc_id: &str) -> Result<Option<RevTree>, StoreError>;

    /// The conflict on `doc_id`: every live leaf with its body and clock, and their deepest
    /// common ancestor with its body if still stored. `None` when the document has fewer than
    /// two live leaves (deleted leaves never conflict, as in CouchDB).
    fn conflict(&self, doc_id: &str) -> Result<Option<Conflict>, StoreError> {
        let Some(tree) = self.get_tree(doc_id)? else {
            return Ok(None);
        };
        let live: Vec<Rev> = tree.live_leaves();
        if live.len() < 2 {
            return Ok(None);
        }
        let mut versions = Vec::with_capacity(live.len());
        for rev in &live {
            let stored = self.get_revision(doc_id, rev, 1)?;
            let Some((Some(body), hlc)) = stored
                .map(|stored| stored.parsed_body().map(|body| (body, stored.hlc)))
                .transpose()?
            else {
                return Err(StoreError::Corrupt {
                    what: "revs",
                    detail: format!("no body for live leaf {doc_id} {rev}"),
                });
            };
            versions.push(Version {
                rev: rev.clone(),
                hlc,
                body,
            });
        }
        let ancestor = match tree.common_ancestor(&live) {
            Some(rev) => {
                let body = match self.get_revision(doc_id, &rev, 1)? {
                    Some(stored) => stored.parsed_body()?,
                    None => None,
                };
                Some((rev, body))
            }
            None => None,
        };
        Ok(Some(Conflict { versions, ancestor }))
    }

    /// Writes `resolution` in one transaction: the resolved body on its parent, a tombstone on
    /// every superseded leaf, and the resolution record. Returns the resolved revision, or
    /// `None` (writing nothing) if the document changed since its conflict was read: read it
    /// again and resolve anew.
    fn apply_resolution(
        &self,
        doc_id: &str,
        resolution: &Resolution,
    ) -> Result<Option<Rev>, StoreError>;

    /// Compaction: drops the bodies of revisions more than `Limits::ancestor_bodies` steps
    /// above every live leaf, including versions a resolution superseded. Revision trees are
    /// untouched, so replication goes on; merges whose common ancestor lost its body fall back
    /// to last-write-wins. Returns how many bodies were dropped.
    fn compact(&self) -> Result<u64, StoreError>;

    /// The resolutions this replica wrote for `doc_id`, oldest first.
    fn resolutions(&self, doc_id: &str) -> Result<Vec<ResolutionRecord>, StoreError>;

    /// A specific revision with up to `max_path` entries of its path; `None` if the revision is
    /// not in the tree.
    fn get_revision(
        &self,
        doc_id: &str,
        rev: &Rev,
        max_path: usize,
    ) -> Result<Option<StoredRevision>, StoreError>;

    /// [`Database::get_revision`] for many revisions at once, answered in order; a store may
    /// read them with fewer queries than one each.
    fn get_revisions(
        &self,
        wanted: &[(String, Rev)],
        max_path: usize,
    ) -> Result<Vec<Option<StoredRevision>>, StoreError> {
        wanted
            .iter()
            .map(|(doc_id, rev)| self.get_revision(doc_id, rev, max_path))
            .collect()
    }

    /// Changes after `since`, at most `limit` rows, in sequence order.
    fn changes(
        &self,
        since: u64,
        limit: usize,
        include_bodies: bool,
    ) -> Result<Vec<Change>, StoreError>;

    /// Which of the given revisions this database lacks.
    fn revs_diff(&self, revs: &[(String, Vec<Rev>)])
    -> Result<Vec<(String, RevsDiff)>, StoreError>;

    /// A local document.
    fn get_local(&self, id: &str) -> Result<Option<LocalDoc>, StoreError>;

    /// Writes a local document if its current revision is `expected_rev` (`None`: it must not
    /// exist); returns the new revision number. `body: None` deletes it.
    fn put_local(
        &self,
        id: &str,
        expected_rev: Option<u64>,
        body: Option<Body>,
    ) -> Result<u64, StoreError>;

    /// Live (non-deleted) documents in id order.
    fn all_docs(&self, query: &AllDocsQuery) -> Result<Vec<Document>, StoreError>;

    /// The collections that hold live documents, sorted, with how many each holds.
    fn collections(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// Live documents of one collection matching a selector.
    fn query(&self, query: &Query) -> Result<Vec<Document>, StoreError>;

    /// Creates (if missing) an index on a field of a collection's documents, so equality and
    /// range conditions and sorts on it use the index.
    fn ensure_index(&self, collection: &str, field: &str) -> Result<(), StoreError>;
}

/// Counts of a client replica's outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxSummary {
    /// Documents with a local edit waiting for the server.
    pub pending: u64,
    /// Documents whose local edit the server refused.
    pub rejected: u64,
}

/// Where one document stands in a client replica's outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingState {
    /// A local edit waits for the server; `seq` is the document's sequence, the one a push
    /// must carry for the edit to be acknowledged.
    Pending {
        /// The sequence.
        seq: u64,
    },
    /// The server refused the local edit.
    Rejected {
        /// The server's reason.
        reason: String,
    },
}

/// A client replica: a [`Database`] with an outbox of the local edits the server has not
/// acknowledged (invariants 1 and 5: a write is kept, and known to be unacknowledged, until a
/// push the server committed carries it).
///
/// The rules every implementation follows (checked by [`conformance_tests!`]'s outbox
/// checks): a local edit (`write_edits`, `apply_resolution`) puts its document in the outbox
/// at the document's new sequence; a replicated revision that moves a pending document moves
/// its entry with it, so the edit waits for the page that carries the document as it is now;
/// [`Replica::acknowledge_through`] removes the entries at or below a sequence, except refused
/// ones; a refused entry stays, with its reason, until the next local edit of the document.
pub trait Replica: Database {
    /// How many documents wait, and how many of them were refused.
    fn outbox(&self) -> Result<OutboxSummary, StoreError>;

    /// Where `doc_id` stands; `None` when the server has every local edit of it.
    fn outbox_state(&self, doc_id: &str) -> Result<Option<PendingState>, StoreError>;

    /// The documents with an edit waiting (refused ones left out), with their sequences, in
    /// sequence order.
    fn pending(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// Records that a push committed and checkpointed every change through sequence `seq`;
    /// returns how many documents stopped being pending.
    fn acknowledge_through(&self, seq: u64) -> Result<u64, StoreError>;

    /// Records that the server refused `doc_id`'s local edit, so it is not retried blindly and
    /// the application can see why.
    fn reject(&self, doc_id: &str, reason: &str) -> Result<(), StoreError>;

    /// Gives the waiting edits a clock stamped too far ahead new clocks, in one transaction:
    /// every leaf of an outbox document (refused ones included) stamped later than
    /// `later_than` gets the next timestamp of `stamp`, in sequence order, and its document a
    /// new sequence and a pending entry again. Returns how many documents it re-stamped.
    ///
    /// A replica does this after re-basing its clock on the server's
    /// ([`clock::ReplicaClock::rebase`]); the server would otherwise refuse those edits as
    /// `clock_ahead` for as long as the device's clock stays ahead. Revision ids do not depend
    /// on clocks, so nothing else about the revisions changes.
    fn restamp_outbox(
        &self,
        later_than: Timestamp,
        stamp: &mut dyn FnMut() -> Timestamp,
    ) -> Result<u64, StoreError>;
}

/// What every store drops after an update brought `new_rev` into `tree` (`before` is the tree
/// it had): `tree` is stemmed to the revs limit, and the revisions whose bodies are no longer
/// kept are returned (stemmed away, fallen out of the body window, or the new revision itself
/// when it is outside the window).
pub(crate) fn bodies_to_drop(
    limits: &Limits,
    before: Option<&RevTree>,
    tree: &mut RevTree,
    new_rev: &Rev,
) -> std::collections::BTreeSet<Rev> {
    let dropped = tree.stem(limits.revs_limit);
    let window = tree.body_window(limits.ancestor_bodies);
    let mut unkept: std::collections::BTreeSet<Rev> = dropped.into_iter().collect();
    if let Some(before) = before {
        unkept.extend(
            before
                .body_window(limits.ancestor_bodies)
                .into_iter()
                .filter(|rev| !window.contains(rev)),
        );
    }
    if !window.contains(new_rev) {
        unkept.insert(new_rev.clone());
    }
    unkept
}

/// What every store does first with a replicated revision: merges its path into the
/// document's tree (`before`, none for a new document) and counts it in `report`. Returns the
/// tree to store, or `None` when the revision changed nothing (the tree had all of it).
pub(crate) fn merge_replicated(
    before: Option<&RevTree>,
    revision: &Revision,
    report: &mut WriteReport,
) -> Result<Option<RevTree>, StoreError> {
    let mut tree = before.cloned().unwrap_or_default();
    let applied = tree
        .merge_path(&revision.path, revision.deleted)
        .map_err(|error| StoreError::InvalidRevision {
            doc_id: revision.doc_id.clone(),
            reason: error.to_string(),
        })?;
    if before == Some(&tree) {
        report.already_present += 1;
        return Ok(None);
    }
    match applied {
        Applied::Added => report.added += 1,
        Applied::AlreadyPresent => report.already_present += 1,
    }
    if tree.live_leaves().len() > 1 && !report.conflicted.contains(&revision.doc_id) {
        report.conflicted.push(revision.doc_id.clone());
    }
    Ok(Some(tree))
}

/// How the counts of live and deleted documents change when a document's winner goes from
/// `was_deleted` (`None`: a new document) to `deleted`.
pub(crate) fn count_change(was_deleted: Option<bool>, deleted: bool) -> (i64, i64) {
    match (was_deleted, deleted) {
        (None, false) => (1, 0),
        (None, true) => (0, 1),
        (Some(true), false) => (1, -1),
        (Some(false), true) => (-1, 1),
        _ => (0, 0),
    }
}

/// The revision of an edit of `doc_id` (see [`Rev::compute`]); refused as an invalid revision
/// when `parent` is at the largest generation, so the edit is written nowhere.
pub(crate) fn edit_rev(
    doc_id: &str,
    parent: Option<&Rev>,
    deleted: bool,
    canonical_body: &[u8],
) -> Result<Rev, StoreError> {
    Rev::compute(parent, deleted, canonical_body).map_err(|error| StoreError::InvalidRevision {
        doc_id: doc_id.to_owned(),
        reason: error.to_string(),
    })
}

/// The clock of the replica's latest change: a replica's clock resumes after it when the
/// replica is opened again, so its timestamps keep increasing across restarts.
pub fn newest_clock(db: &dyn Database) -> Result<Timestamp, StoreError> {
    let update_seq = db.info()?.update_seq;
    let Some(change) = db.changes(update_seq.saturating_sub(1), 1, false)?.pop() else {
        return Ok(Timestamp::ZERO);
    };
    Ok(db
        .get_document(&change.doc_id)?
        .map_or(Timestamp::ZERO, |document| document.hlc))
}

/// Resolves the conflict on `doc_id` (if any) by `policy`, retrying if the document changes
/// meanwhile; returns the record of what was written, or `None` when there was nothing to do
/// (no conflict, or [`Policy::Keep`]).
///
/// Replicas call this after receiving revisions. Resolutions are deterministic, so replicas
/// resolving the same conflict write the same revisions.
pub fn resolve_conflict(
    db: &dyn Database,
    doc_id: &str,
    policy: Policy,
) -> Result<Option<ResolutionRecord>, StoreError> {
    if policy == Policy::Keep {
        return Ok(None);
    }
    // A document changing under the resolver a few times in a row is possible; forever is not.
    for _ in 0..8 {
        let Some(conflict) = db.conflict(doc_id)? else {
            return Ok(None);
        };
        let Some(resolution) = resolve(policy, &conflict) else {
            return Ok(None);
        };
        if db.apply_resolution(doc_id, &resolution)?.is_some() {
            return Ok(Some(resolution.record));
        }
    }
    tracing::warn!(%doc_id, "the document kept changing; its conflict is left for later");
    Ok(None)
}
