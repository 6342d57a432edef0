//! The SQLite implementation of the store: one file per database, WAL mode.
//!
//! Schema (version 4, recorded in `PRAGMA user_version`; `MIGRATIONS` upgrades older files):
//!
//! - `docs`: one row per document, keyed by the sequence of its latest change (so the changes
//!   feed reads the table in order): its id and collection, the winner (revision, deleted
//!   flag, clock, body), its leaves (`NULL` when the winner is the only one, as it is without
//!   conflicts) and the encoded revision tree (`NULL` when it is the winner alone). The
//!   winner's body lives only here, so reads, `_all_docs` and queries never parse trees, and
//!   writing a new document writes its body once.
//! - `revs`: bodies of the other kept revisions: leaves and recent ancestors
//!   (`Limits::ancestor_bodies` levels above each leaf), with their deleted flag and clock. It
//!   may also hold the winner's body (a revision that won later); readers look in `docs` first.
//! - `local_docs`: checkpoints and other local documents, never replicated.
//! - `meta`: the replica id, the last sequence and document counters.
//! - `outbox` (version 2, keyed by sequence since version 4): on client replicas, the sequence
//!   of every document with a local edit no push has acknowledged yet, or why the server
//!   refused it. A pending document's row moves with its `docs` row when its sequence changes,
//!   so its edit waits for the page that carries the document as it is now; an acknowledgement
//!   deletes a range of these small rows.
//! - `resolutions` (version 3): the record of every conflict resolution this replica wrote.
//!
//! Durability: with [`Durability::Full`] every commit runs `fsync` on the WAL before it
//! returns (`synchronous=FULL`), so a write acknowledged over HTTP survives power loss; a
//! SIGKILL at any moment leaves the last committed transaction intact (SQLite's WAL recovery).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_core::hlc::Timestamp;
use ferry_core::json::canonical_object;
use ferry_core::model::{
    Body, COLLECTION_SEPARATOR, Document, LOCAL_PREFIX, Revision, collection_of,
};
use ferry_core::resolve::{Resolution, ResolutionRecord};
use ferry_core::rev::Rev;
use ferry_core::selector::Selector;
use ferry_core::tree::{Applied, EditError, Leaf, RevTree, RevsDiff};
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use crate::{
    AllDocsQuery, Backend, Change, Database, DatabaseInfo, Durability, Edit, LocalDoc,
    OutboxSummary, PendingState, Query, Replica, StoreConfig, StoreError, StoredRevision,
    WriteReport, valid_database_name,
};

const SCHEMA_VERSION: i64 = 4;

/// Each entry upgrades the schema from its index to the next version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE docs (
    doc_id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    seq INTEGER NOT NULL,
    rev TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    hlc INTEGER NOT NULL,
    body TEXT NOT NULL,
    leaves TEXT NOT NULL,
    tree TEXT NOT NULL
);
CREATE UNIQUE INDEX docs_by_seq ON docs(seq);
CREATE INDEX docs_by_collection ON docs(collection, deleted, doc_id);
CREATE TABLE revs (
    doc_id TEXT NOT NULL,
    rev TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    hlc INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (doc_id, rev)
) WITHOUT ROWID;
CREATE TABLE local_docs (id TEXT PRIMARY KEY, rev INTEGER NOT NULL, body TEXT NOT NULL) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE outbox (
    doc_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    rejected TEXT
) WITHOUT ROWID;
CREATE INDEX outbox_by_seq ON outbox(seq);
"#,
    r#"
CREATE TABLE resolutions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL,
    rev TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX resolutions_by_doc ON resolutions(doc_id, id);
"#,
    // Fewer b-trees per written document: the sequence is the row id (no index of its own),
    // the outbox is keyed by sequence (no index of its own), and the collection index is gone
    // (the collection is the id's prefix, so the id index serves it).
    r#"
CREATE TABLE docs_v4 (
    seq INTEGER PRIMARY KEY,
    doc_id TEXT NOT NULL UNIQUE,
    collection TEXT NOT NULL,
    rev TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    hlc INTEGER NOT NULL,
    body TEXT NOT NULL,
    leaves TEXT,
    tree TEXT
);
INSERT INTO docs_v4 (seq, doc_id, collection, rev, deleted, hlc, body, leaves, tree)
    SELECT seq, doc_id, collection, rev, deleted, hlc, body, leaves, tree FROM docs;
CREATE TABLE outbox_v4 (seq INTEGER PRIMARY KEY, rejected TEXT);
INSERT INTO outbox_v4 (seq, rejected)
    SELECT docs.seq, outbox.rejected FROM outbox JOIN docs ON docs.doc_id = outbox.doc_id;
DROP TABLE docs;
DROP TABLE outbox;
ALTER TABLE docs_v4 RENAME TO docs;
ALTER TABLE outbox_v4 RENAME TO outbox;
"#,
];

/// How many read connections a database keeps open (WAL lets them read while one writes).
const READERS: usize = 4;

/// Databases stored as SQLite files in one directory: `{dir}/{name}.sqlite`.
///
/// Open databases are a bounded cache (each holds a few file descriptors): past
/// [`BackendLimits::max_open`], the least recently used one that nobody holds is closed, to
/// be opened again on demand.
pub struct SqliteBackend {
    dir: PathBuf,
    config: StoreConfig,
    limits: BackendLimits,
    open: Mutex<OpenDatabases>,
}

/// How many databases a backend holds and keeps open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendLimits {
    /// The most databases (files); creating one more is refused.
    pub max_databases: usize,
    /// The most databases open at once (each keeps up to six file descriptors: the file, its
    /// WAL and shared memory, and its connections).
    pub max_open: usize,
}

impl Default for BackendLimits {
    fn default() -> BackendLimits {
        BackendLimits {
            max_databases: 10_000,
            max_open: 100,
        }
    }
}

/// The open databases, each with when it was last handed out.
#[derive(Default)]
struct OpenDatabases {
    databases: HashMap<String, (Arc<SqliteDatabase>, u64)>,
    uses: u64,
}

impl OpenDatabases {
    fn get(&mut self, name: &str) -> Option<Arc<SqliteDatabase>> {
        self.uses += 1;
        let (database, used) = self.databases.get_mut(name)?;
        *used = self.uses;
        Some(database.clone())
    }

    /// Makes room for one more under `max_open`, closing the least recently used databases
    /// only the cache holds.
    fn make_room(&mut self, max_open: usize) -> Result<(), StoreError> {
        while self.databases.len() >= max_open.max(1) {
            let idle = self
                .databases
                .iter()
                .filter(|(_, (database, _))| Arc::strong_count(database) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(name, _)| name.clone());
            let Some(idle) = idle else {
                return Err(StoreError::TooManyOpen { limit: max_open });
            };
            self.databases.remove(&idle);
        }
        Ok(())
    }

    fn insert(&mut self, name: &str, database: Arc<SqliteDatabase>) {
        self.uses += 1;
        self.databases
            .insert(name.to_owned(), (database, self.uses));
    }
}

impl SqliteBackend {
    /// Uses (and creates if needed) `dir` for database files.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<SqliteBackend, StoreError> {
        std::fs::create_dir_all(dir)?;
        Ok(SqliteBackend {
            dir: dir.to_owned(),
            config,
            limits: BackendLimits::default(),
            open: Mutex::new(OpenDatabases::default()),
        })
    }

    /// The same backend with other limits on databases.
    #[must_use]
    pub fn with_limits(mut self, limits: BackendLimits) -> SqliteBackend {
        self.limits = limits;
        self
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sqlite"))
    }

    fn check_name(name: &str) -> Result<(), StoreError> {
        if valid_database_name(name) {
            Ok(())
        } else {
            Err(StoreError::InvalidDatabaseName(
                name.chars().take(140).collect(),
            ))
        }
    }
}

impl Backend for SqliteBackend {
    fn create_database(&self, name: &str) -> Result<Arc<dyn Database>, StoreError> {
        Self::check_name(name)?;
        let mut open = lock(&self.open);
        let path = self.path_of(name);
        if open.databases.contains_key(name) || path.exists() {
            return Err(StoreError::DatabaseExists(name.to_owned()));
        }
        if self.database_names()?.len() >= self.limits.max_databases {
            return Err(StoreError::TooManyDatabases {
                limit: self.limits.max_databases,
            });
        }
        open.make_room(self.limits.max_open)?;
        let database = Arc::new(SqliteDatabase::open(&path, name, self.config.clone())?);
        open.insert(name, database.clone());
        Ok(database)
    }

    fn open_database(&self, name: &str) -> Result<Arc<dyn Database>, StoreError> {
        Self::check_name(name).map_err(|_| StoreError::NoSuchDatabase(name.to_owned()))?;
        let mut open = lock(&self.open);
        if let Some(database) = open.get(name) {
            return Ok(database);
        }
        let path = self.path_of(name);
        if !path.exists() {
            return Err(StoreError::NoSuchDatabase(name.to_owned()));
        }
        open.make_room(self.limits.max_open)?;
        let database = Arc::new(SqliteDatabase::open(&path, name, self.config.clone())?);
        open.insert(name, database.clone());
        Ok(database)
    }

    fn delete_database(&self, name: &str) -> Result<(), StoreError> {
        Self::check_name(name).map_err(|_| StoreError::NoSuchDatabase(name.to_owned()))?;
        let mut open = lock(&self.open);
        let path = self.path_of(name);
        if !path.exists() {
            return Err(StoreError::NoSuchDatabase(name.to_owned()));
        }
        open.databases.remove(name);
        std::fs::remove_file(&path)?;
        for suffix in ["-wal", "-shm"] {
            let mut extra = path.clone().into_os_string();
            extra.push(suffix);
            match std::fs::remove_file(PathBuf::from(extra)) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err.into()),
                _ => {}
            }
        }
        Ok(())
    }

    fn database_names(&self) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let file_name = entry?.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".sqlite")) else {
                continue;
            };
            if valid_database_name(name) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}

/// One database in one SQLite file.
pub struct SqliteDatabase {
    name: String,
    config: StoreConfig,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
    replica_id: String,
}

impl SqliteDatabase {
    /// Opens (creating and migrating if needed) the database file at `path`.
    pub fn open(
        path: &Path,
        name: &str,
        config: StoreConfig,
    ) -> Result<SqliteDatabase, StoreError> {
        let mut writer = connect(path, &config, false)?;
        migrate(&mut writer)?;
        let replica_id = writer.query_row(
            "SELECT value FROM meta WHERE key = 'replica_id'",
            [],
            |row| row.get::<_, String>(0),
        )?;
        Ok(SqliteDatabase {
            name: name.to_owned(),
            config,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            path: path.to_owned(),
            replica_id,
        })
    }

    /// The file this database lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with_reader<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let reader = lock(&self.readers).pop();
        let reader = match reader {
            Some(reader) => reader,
            None => connect(&self.path, &self.config, true)?,
        };
        let result = read(&reader);
        let mut readers = lock(&self.readers);
        if readers.len() < READERS {
            readers.push(reader);
        }
        result
    }

    fn with_write_transaction<T>(
        &self,
        write: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut writer = lock(&self.writer);
        // IMMEDIATE takes the write lock up front, so a second process writing the same file
        // waits (busy_timeout) instead of failing halfway through a read-then-write.
        let transaction = writer.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let result = write(&transaction)?;
        transaction.commit()?;
        Ok(result)
    }

    /// A transaction of local edits (see [`SqliteDatabase::with_counted_transaction`]): on
    /// client replicas every document it gives a sequence waits in the outbox at that sequence.
    /// The sequences it gave are those past the last one before it, so one statement at the end
    /// records them all.
    fn with_local_edits<T>(
        &self,
        write: impl FnOnce(&Transaction<'_>, &mut Counters) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_counted_transaction(|transaction, counters| {
            let first = to_i64(counters.update_seq + 1);
            let result = write(transaction, counters)?;
            if self.config.track_pending {
                transaction
                    .prepare_cached(
                        "INSERT OR REPLACE INTO outbox (seq, rejected) \
                         SELECT seq, NULL FROM docs WHERE seq >= ?1",
                    )?
                    .execute(params![first])?;
            }
            Ok(result)
        })
    }

    /// A write transaction that changes documents: the counters come loaded and are saved.
    fn with_counted_transaction<T>(
        &self,
        write: impl FnOnce(&Transaction<'_>, &mut Counters) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_write_transaction(|transaction| {
            let mut counters = Counters::load(transaction)?;
            let result = write(transaction, &mut counters)?;
            counters.save(transaction)?;
            Ok(result)
        })
    }
}

/// The sequence and document counters, read once per writing transaction and written back at
/// its end (instead of a read and a write per document).
struct Counters {
    update_seq: u64,
    doc_count: u64,
    deleted_count: u64,
    changed: bool,
}

impl Counters {
    const KEYS: [&'static str; 3] = ["update_seq", "doc_count", "deleted_count"];

    fn load(connection: &Connection) -> Result<Counters, StoreError> {
        Ok(Counters {
            update_seq: read_meta(connection, "update_seq")?,
            doc_count: read_meta(connection, "doc_count")?,
            deleted_count: read_meta(connection, "deleted_count")?,
            changed: false,
        })
    }

    fn save(&self, connection: &Connection) -> Result<(), StoreError> {
        if self.changed {
            let values = [self.update_seq, self.doc_count, self.deleted_count];
            for (key, value) in Self::KEYS.into_iter().zip(values) {
                write_meta(connection, key, value)?;
            }
        }
        Ok(())
    }

    fn next_seq(&mut self) -> u64 {
        self.update_seq += 1;
        self.changed = true;
        self.update_seq
    }

    fn adjust(&mut self, live_delta: i64, deleted_delta: i64) {
        self.doc_count = self.doc_count.saturating_add_signed(live_delta);
        self.deleted_count = self.deleted_count.saturating_add_signed(deleted_delta);
        self.changed = true;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the connection usable: SQLite rolls back the
    // transaction that was open when the guard's owner unwound.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn connect(path: &Path, config: &StoreConfig, read_only: bool) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let connection = Connection::open_with_flags(path, flags)?;
    connection.busy_timeout(Duration::from_secs(10))?;
    if !read_only {
        connection.pragma_update(None, "journal_mode", "WAL")?;
    }
    let synchronous = match config.durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    connection.pragma_update(None, "synchronous", synchronous)?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = transaction.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::FutureSchema {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    let start = usize::try_from(version).map_err(|_| StoreError::Corrupt {
        what: "schema version",
        detail: version.to_string(),
    })?;
    // Version 4 rebuilds `docs`, which drops the query indexes made by `ensure_index`: they
    // are made again on the new table.
    let rebuilds_docs = (1..4).contains(&start);
    let query_indexes: Vec<String> = if rebuilds_docs {
        transaction
            .prepare(
                "SELECT sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'docs' \
                 AND name LIKE 'ix_%'",
            )?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    for migration in &MIGRATIONS[start..] {
        transaction.execute_batch(migration)?;
    }
    for index in &query_indexes {
        transaction.execute_batch(index)?;
    }
    if version == 0 {
        let replica_id = uuid::Uuid::new_v4().simple().to_string();
        transaction.execute(
            "INSERT INTO meta (key, value) VALUES ('replica_id', ?1), ('update_seq', '0'), \
             ('doc_count', '0'), ('deleted_count', '0')",
            params![replica_id],
        )?;
    }
    transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    transaction.commit()?;
    Ok(())
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn read_meta(connection: &Connection, key: &str) -> Result<u64, StoreError> {
    // Cached: this runs several times per written document.
    let text: String = connection
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row(params![key], |row| row.get(0))?;
    text.parse().map_err(|_| StoreError::Corrupt {
        what: "meta",
        detail: format!("{key} = {text:?}"),
    })
}

fn write_meta(connection: &Connection, key: &str, value: u64) -> Result<(), StoreError> {
    connection
        .prepare_cached("UPDATE meta SET value = ?2 WHERE key = ?1")?
        .execute(params![key, value.to_string()])?;
    Ok(())
}

fn parse_body(text: &str) -> Result<Body, StoreError> {
    serde_json::from_str(text).map_err(|err| StoreError::Corrupt {
        what: "document body",
        detail: err.to_string(),
    })
}

fn body_text(body: &Body) -> String {
    // Canonical form: stored bodies are byte-identical across replicas for the same revision.
    String::from_utf8(canonical_object(body)).expect("JSON is UTF-8")
}

fn parse_rev(text: &str) -> Result<Rev, StoreError> {
    text.parse()
        .map_err(|err: ferry_core::rev::RevParseError| StoreError::Corrupt {
            what: "revision id",
            detail: err.to_string(),
        })
}

/// `None` when the winner is the only leaf (most documents): the column is then `NULL`.
fn encode_leaves(leaves: &[Leaf]) -> Option<String> {
    if leaves.len() == 1 {
        return None;
    }
    let encoded: Vec<(String, bool)> = leaves
        .iter()
        .map(|leaf| (leaf.rev.to_string(), leaf.deleted))
        .collect();
    Some(serde_json::to_string(&encoded).expect("leaves serialization"))
}

/// The leaves stored beside a winner (`text` is `None` when the winner is the only one).
fn decode_leaves(text: Option<&str>, winner: &Rev, deleted: bool) -> Result<Vec<Leaf>, StoreError> {
    let Some(text) = text else {
        return Ok(vec![Leaf {
            rev: winner.clone(),
            deleted,
        }]);
    };
    let encoded: Vec<(String, bool)> =
        serde_json::from_str(text).map_err(|err| StoreError::Corrupt {
            what: "leaves",
            detail: err.to_string(),
        })?;
    encoded
        .into_iter()
        .map(|(rev, deleted)| {
            Ok(Leaf {
                rev: parse_rev(&rev)?,
                deleted,
            })
        })
        .collect()
}

/// `None` when the tree is the winner alone (a document never edited): the column is then
/// `NULL`, and the row's own revision and deleted flag are the tree.
fn encode_tree(tree: &RevTree) -> Option<String> {
    tree.revs().nth(1).is_some().then(|| tree.encode())
}

/// The tree of a `docs` row (see [`encode_tree`]), read from the columns `tree, rev, deleted`
/// starting at `first`.
fn tree_from_row(row: &rusqlite::Row<'_>, first: usize) -> Result<RevTree, StoreError> {
    match row.get::<_, Option<String>>(first)? {
        Some(text) => RevTree::decode(&text).map_err(|err| StoreError::Corrupt {
            what: "revision tree",
            detail: err.to_string(),
        }),
        None => {
            let mut tree = RevTree::new();
            let winner = parse_rev(&row.get::<_, String>(first + 1)?)?;
            tree.add_child(None, winner, row.get(first + 2)?);
            Ok(tree)
        }
    }
}

fn load_tree(connection: &Connection, doc_id: &str) -> Result<Option<RevTree>, StoreError> {
    connection
        .prepare_cached("SELECT tree, rev, deleted FROM docs WHERE doc_id = ?1")?
        .query_and_then(params![doc_id], |row| tree_from_row(row, 0))?
        .next()
        .transpose()
}

/// What a writer reads of a document before changing it: its tree, and its winner's body and
/// clock, which move to `revs` if another revision wins while it is still kept.
struct Current {
    tree: RevTree,
    winner: Leaf,
    hlc: Timestamp,
    body: String,
    seq: u64,
}

fn load_current(connection: &Connection, doc_id: &str) -> Result<Option<Current>, StoreError> {
    connection
        .prepare_cached(
            "SELECT doc_id, tree, rev, deleted, hlc, body, seq FROM docs WHERE doc_id = ?1",
        )?
        .query_and_then(params![doc_id], current_from_row)?
        .next()
        .transpose()
}

/// A [`Current`] from a row of `SELECT doc_id, tree, rev, deleted, hlc, body, seq`.
fn current_from_row(row: &rusqlite::Row<'_>) -> Result<Current, StoreError> {
    let doc_id: String = row.get(0)?;
    let tree = tree_from_row(row, 1)?;
    let winner = tree.winner().ok_or_else(|| StoreError::Corrupt {
        what: "revision tree",
        detail: format!("{doc_id} has an empty tree"),
    })?;
    Ok(Current {
        tree,
        winner,
        hlc: Timestamp::from_u64(to_u64(row.get(4)?)),
        body: row.get(5)?,
        seq: to_u64(row.get(6)?),
    })
}

/// How many ids one batched lookup binds. Unused places are bound to NULL, which matches
/// nothing, so one prepared statement serves every chunk.
const LOOKUP_CHUNK: usize = 128;

/// Runs `select`, a query whose `{ids}` stands for a list of document ids, for `doc_ids` in
/// chunks, calling `each` with every row: one statement per chunk instead of one per document.
fn select_by_ids(
    connection: &Connection,
    select: &str,
    doc_ids: &[&str],
    mut each: impl FnMut(&rusqlite::Row<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let sql = select.replace("{ids}", &vec!["?"; LOOKUP_CHUNK].join(", "));
    let mut statement = connection.prepare_cached(&sql)?;
    for chunk in doc_ids.chunks(LOOKUP_CHUNK) {
        let values = (0..LOOKUP_CHUNK).map(|position| chunk.get(position).copied());
        let mut rows = statement.query(rusqlite::params_from_iter(values))?;
        while let Some(row) = rows.next()? {
            each(row)?;
        }
    }
    Ok(())
}

/// The documents a batch writes, read up front with a few queries. Taking a document out
/// hands over what it was before the batch; once taken (the batch changed it), taking it
/// again reads it anew.
struct BatchDocs(HashMap<String, Option<Current>>);

impl BatchDocs {
    fn load(connection: &Connection, doc_ids: &[&str]) -> Result<BatchDocs, StoreError> {
        let mut docs: HashMap<String, Option<Current>> = doc_ids
            .iter()
            .map(|doc_id| ((*doc_id).to_owned(), None))
            .collect();
        select_by_ids(
            connection,
            "SELECT doc_id, tree, rev, deleted, hlc, body, seq FROM docs WHERE doc_id IN ({ids})",
            doc_ids,
            |row| {
                let current = current_from_row(row)?;
                docs.insert(row.get(0)?, Some(current));
                Ok(())
            },
        )?;
        Ok(BatchDocs(docs))
    }

    fn take(
        &mut self,
        connection: &Connection,
        doc_id: &str,
    ) -> Result<Option<Current>, StoreError> {
        match self.0.remove(doc_id) {
            Some(before) => Ok(before),
            None => load_current(connection, doc_id),
        }
    }
}

/// Revision `rev` of a document whose row is `current`, with up to `max_path` entries of its
/// path; its body comes from the row if it is the winner, from `revs` otherwise.
fn stored_revision(
    connection: &Connection,
    doc_id: &str,
    current: &Current,
    rev: &Rev,
    max_path: usize,
) -> Result<Option<StoredRevision>, StoreError> {
    let tree = &current.tree;
    if !tree.contains(rev) {
        return Ok(None);
    }
    let (deleted, hlc, body) = if &current.winner.rev == rev {
        (
            current.winner.deleted,
            current.hlc,
            Some(parse_body(&current.body)?),
        )
    } else {
        let stored = connection
            .prepare_cached("SELECT deleted, hlc, body FROM revs WHERE doc_id = ?1 AND rev = ?2")?
            .query_row(params![doc_id, rev.to_string()], |row| {
                Ok((
                    row.get::<_, bool>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })
            .optional()?;
        match stored {
            Some((deleted, hlc, body)) => (
                deleted,
                Timestamp::from_u64(to_u64(hlc)),
                Some(parse_body(&body)?),
            ),
            None => (tree.is_deleted(rev), Timestamp::ZERO, None),
        }
    };
    Ok(Some(StoredRevision {
        doc_id: doc_id.to_owned(),
        path: tree.ancestry(rev, max_path.max(1)),
        deleted,
        body,
        hlc,
    }))
}

/// The new revision an update brings, with what must be stored for it.
struct NewRevision<'a> {
    rev: &'a Rev,
    deleted: bool,
    /// The body's canonical text (computed once: it is also what the revision id hashes).
    body: String,
    hlc: Timestamp,
    /// Written on this replica (an edit or a resolution), not received from another: on
    /// client replicas it waits for the server.
    local: bool,
}

/// A local edit's new revision, before its id is computed: a child of `parent`.
struct Child<'a> {
    parent: Option<&'a Rev>,
    deleted: bool,
    body: &'a Body,
    hlc: Timestamp,
}

impl SqliteDatabase {
    /// Adds `child` to the document (`before`: what it was, `None` for a new one) and stores
    /// it. Returns its revision and whether the tree did not have it already.
    fn add_child(
        &self,
        transaction: &Transaction<'_>,
        counters: &mut Counters,
        doc_id: &str,
        before: Option<&Current>,
        child: Child<'_>,
    ) -> Result<(Rev, bool), StoreError> {
        let body = body_text(child.body);
        let rev = crate::edit_rev(doc_id, child.parent, child.deleted, body.as_bytes())?;
        let mut tree = before
            .map(|current| current.tree.clone())
            .unwrap_or_default();
        if tree.add_child(child.parent, rev.clone(), child.deleted) != Applied::Added {
            return Ok((rev, false));
        }
        self.store_update(
            transaction,
            counters,
            doc_id,
            before,
            tree,
            NewRevision {
                rev: &rev,
                deleted: child.deleted,
                body,
                hlc: child.hlc,
                local: true,
            },
        )?;
        Ok((rev, true))
    }

    /// Stores the result of changing one document's tree inside an open write transaction:
    /// the stemmed tree, the bodies of kept revisions other than the winner (in `revs`), the
    /// winner, a new sequence if the leaves changed, the outbox flag and the counters.
    fn store_update(
        &self,
        transaction: &Transaction<'_>,
        counters: &mut Counters,
        doc_id: &str,
        before: Option<&Current>,
        mut tree: RevTree,
        new: NewRevision<'_>,
    ) -> Result<(), StoreError> {
        let limits = &self.config.limits;
        let unkept = crate::bodies_to_drop(
            limits,
            before.map(|current| &current.tree),
            &mut tree,
            new.rev,
        );
        let winner = tree
            .winner()
            .expect("a tree with a new revision has a winner");
        // Statements are prepared only when needed: a new document needs none of these.
        let insert_body = |rev: &Rev, deleted: bool, hlc: Timestamp, body: &str| {
            transaction
                .prepare_cached(
                    "INSERT OR IGNORE INTO revs (doc_id, rev, deleted, hlc, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    doc_id,
                    rev.to_string(),
                    deleted,
                    to_i64(hlc.as_u64()),
                    body
                ])
        };
        if &winner.rev != new.rev && !unkept.contains(new.rev) {
            insert_body(new.rev, new.deleted, new.hlc, &new.body)?;
        }
        // The previous winner's body was only in `docs`: keep it in `revs` if it is still
        // kept (a parent within the body window, or a losing leaf).
        if let Some(before) = before
            && before.winner.rev != winner.rev
            && !unkept.contains(&before.winner.rev)
        {
            insert_body(
                &before.winner.rev,
                before.winner.deleted,
                before.hlc,
                &before.body,
            )?;
        }
        if !unkept.is_empty() {
            let mut delete =
                transaction.prepare_cached("DELETE FROM revs WHERE doc_id = ?1 AND rev = ?2")?;
            for rev in &unkept {
                delete.execute(params![doc_id, rev.to_string()])?;
            }
        }

        let (body, hlc) = match before {
            _ if &winner.rev == new.rev => (new.body, new.hlc),
            Some(before) if before.winner.rev == winner.rev => (before.body.clone(), before.hlc),
            _ => transaction
                .prepare_cached("SELECT body, hlc FROM revs WHERE doc_id = ?1 AND rev = ?2")?
                .query_row(params![doc_id, winner.rev.to_string()], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        Timestamp::from_u64(to_u64(row.get(1)?)),
                    ))
                })
                .optional()?
                .ok_or_else(|| StoreError::Corrupt {
                    what: "revs",
                    detail: format!("no body for winning leaf {doc_id} {}", winner.rev),
                })?,
        };

        let leaves = tree.leaves();
        // A new document always gets a sequence; an existing one keeps its own when only its
        // tree changed (a parent filled in), since its leaves, and so its changes row, did not.
        let leaves_changed = before.is_none_or(|before| before.tree.leaves() != leaves);
        let seq = leaves_changed.then(|| to_i64(counters.next_seq()));
        if self.config.track_pending {
            self.update_outbox(transaction, before, seq, new.local)?;
        }
        let (rev, leaves, tree) = (
            winner.rev.to_string(),
            encode_leaves(&leaves),
            encode_tree(&tree),
        );
        let hlc = to_i64(hlc.as_u64());
        // The same values for both statements; an update sets the collection it already has.
        let sql = if before.is_none() {
            "INSERT INTO docs (doc_id, seq, rev, deleted, hlc, body, leaves, tree, collection) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        } else {
            "UPDATE docs SET seq = COALESCE(?2, seq), rev = ?3, deleted = ?4, hlc = ?5, \
             body = ?6, leaves = ?7, tree = ?8, collection = ?9 WHERE doc_id = ?1"
        };
        transaction.prepare_cached(sql)?.execute(params![
            doc_id,
            seq,
            rev,
            winner.deleted,
            hlc,
            body,
            leaves,
            tree,
            collection_of(doc_id)
        ])?;
        let was_deleted = before.map(|before| before.winner.deleted);
        if was_deleted != Some(winner.deleted) {
            let (live_delta, deleted_delta) = crate::count_change(was_deleted, winner.deleted);
            counters.adjust(live_delta, deleted_delta);
        }
        Ok(())
    }
}

impl SqliteDatabase {
    /// Keeps the outbox in step with a document that got sequence `seq` (`None`: it kept its
    /// own): a local edit drops its old place (the transaction records the new one, see
    /// [`SqliteDatabase::with_local_edits`]); a replicated change moves a pending document to
    /// its new sequence, so its edit waits for the page that carries the document as it is now.
    fn update_outbox(
        &self,
        transaction: &Transaction<'_>,
        before: Option<&Current>,
        seq: Option<i64>,
        local: bool,
    ) -> Result<(), StoreError> {
        let old = before.map(|before| to_i64(before.seq));
        let Some(new) = seq.or(old) else {
            return Ok(());
        };
        if let Some(old) = old.filter(|old| *old != new) {
            if local {
                transaction
                    .prepare_cached("DELETE FROM outbox WHERE seq = ?1")?
                    .execute(params![old])?;
            } else {
                transaction
                    .prepare_cached("UPDATE outbox SET seq = ?1 WHERE seq = ?2")?
                    .execute(params![new, old])?;
            }
        }
        Ok(())
    }
}

impl Replica for SqliteDatabase {
    fn outbox(&self) -> Result<OutboxSummary, StoreError> {
        self.with_reader(|connection| {
            let (pending, rejected): (i64, i64) = connection.query_row(
                "SELECT COUNT(*), COUNT(rejected) FROM outbox",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            Ok(OutboxSummary {
                pending: to_u64(pending - rejected),
                rejected: to_u64(rejected),
            })
        })
    }

    fn outbox_state(&self, doc_id: &str) -> Result<Option<PendingState>, StoreError> {
        self.with_reader(|connection| {
            let row: Option<(i64, Option<String>)> = connection
                .prepare_cached(
                    "SELECT outbox.seq, outbox.rejected FROM docs \
                     JOIN outbox ON outbox.seq = docs.seq WHERE docs.doc_id = ?1",
                )?
                .query_row(params![doc_id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            Ok(row.map(|(seq, rejected)| match rejected {
                Some(reason) => PendingState::Rejected { reason },
                None => PendingState::Pending { seq: to_u64(seq) },
            }))
        })
    }

    fn pending(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT docs.doc_id, outbox.seq FROM outbox JOIN docs ON docs.seq = outbox.seq \
                 WHERE outbox.rejected IS NULL ORDER BY outbox.seq",
            )?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })?
                .map(|row| row.map(|(doc_id, seq)| (doc_id, to_u64(seq))))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn acknowledge_through(&self, seq: u64) -> Result<u64, StoreError> {
        self.with_write_transaction(|transaction| {
            let removed = transaction
                .prepare_cached("DELETE FROM outbox WHERE seq <= ?1 AND rejected IS NULL")?
                .execute(params![to_i64(seq)])?;
            Ok(removed as u64)
        })
    }

    fn reject(&self, doc_id: &str, reason: &str) -> Result<(), StoreError> {
        self.with_write_transaction(|transaction| {
            transaction
                .prepare_cached(
                    "UPDATE outbox SET rejected = ?2 \
                     WHERE seq = (SELECT seq FROM docs WHERE doc_id = ?1)",
                )?
                .execute(params![doc_id, reason])?;
            Ok(())
        })
    }

    fn restamp_outbox(
        &self,
        later_than: Timestamp,
        stamp: &mut dyn FnMut() -> Timestamp,
    ) -> Result<u64, StoreError> {
        let later_than = to_i64(later_than.as_u64());
        self.with_counted_transaction(|transaction, counters| {
            // The winner's clock is in `docs`, the other leaves' in `revs` (a conflict's local
            // leaf may be one of them); ancestors found by the second test are skipped below.
            let found = transaction
                .prepare_cached(
                    "SELECT docs.seq, docs.doc_id, docs.rev, docs.deleted, docs.hlc, docs.leaves \
                     FROM outbox JOIN docs ON docs.seq = outbox.seq \
                     WHERE docs.hlc > ?1 OR (docs.leaves IS NOT NULL AND EXISTS \
                       (SELECT 1 FROM revs WHERE revs.doc_id = docs.doc_id AND revs.hlc > ?1)) \
                     ORDER BY outbox.seq",
                )?
                .query_map(params![later_than], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, bool>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, Option<String>>(5)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut restamped = 0;
            for (seq, doc_id, winner, deleted, hlc, leaves) in found {
                let winner = parse_rev(&winner)?;
                let mut changed = false;
                for leaf in decode_leaves(leaves.as_deref(), &winner, deleted)? {
                    let rev = leaf.rev.to_string();
                    let clock = if leaf.rev == winner {
                        Some(hlc)
                    } else {
                        transaction
                            .prepare_cached("SELECT hlc FROM revs WHERE doc_id = ?1 AND rev = ?2")?
                            .query_row(params![doc_id, rev], |row| row.get::<_, i64>(0))
                            .optional()?
                    };
                    if clock.is_none_or(|clock| clock <= later_than) {
                        continue;
                    }
                    let new = to_i64(stamp().as_u64());
                    // A winner may also have a copy in `revs` (a revision that won later).
                    transaction
                        .prepare_cached("UPDATE revs SET hlc = ?3 WHERE doc_id = ?1 AND rev = ?2")?
                        .execute(params![doc_id, rev, new])?;
                    if leaf.rev == winner {
                        transaction
                            .prepare_cached("UPDATE docs SET hlc = ?2 WHERE seq = ?1")?
                            .execute(params![seq, new])?;
                    }
                    changed = true;
                }
                if changed {
                    let new_seq = to_i64(counters.next_seq());
                    transaction
                        .prepare_cached("UPDATE docs SET seq = ?2 WHERE seq = ?1")?
                        .execute(params![seq, new_seq])?;
                    transaction
                        .prepare_cached(
                            "UPDATE outbox SET seq = ?2, rejected = NULL WHERE seq = ?1",
                        )?
                        .execute(params![seq, new_seq])?;
                    restamped += 1;
                }
            }
            Ok(restamped)
        })
    }
}

impl Database for SqliteDatabase {
    fn durability(&self) -> Result<Durability, StoreError> {
        let synchronous: i64 =
            lock(&self.writer).query_row("PRAGMA synchronous", [], |row| row.get(0))?;
        match synchronous {
            2 => Ok(Durability::Full),
            1 => Ok(Durability::Normal),
            other => Err(StoreError::Corrupt {
                what: "connection settings",
                detail: format!("synchronous is {other}, neither FULL nor NORMAL"),
            }),
        }
    }

    fn info(&self) -> Result<DatabaseInfo, StoreError> {
        self.with_reader(|connection| {
            Ok(DatabaseInfo {
                name: self.name.clone(),
                replica_id: self.replica_id.clone(),
                doc_count: read_meta(connection, "doc_count")?,
                deleted_count: read_meta(connection, "deleted_count")?,
                update_seq: read_meta(connection, "update_seq")?,
            })
        })
    }

    fn write_edits(&self, edits: Vec<Edit>) -> Result<Vec<Result<Rev, EditError>>, StoreError> {
        self.with_local_edits(|transaction, counters| {
            let mut results = Vec::with_capacity(edits.len());
            let doc_ids: Vec<&str> = edits.iter().map(|edit| edit.doc_id.as_str()).collect();
            let mut docs = BatchDocs::load(transaction, &doc_ids)?;
            for edit in &edits {
                let before = docs.take(transaction, &edit.doc_id)?;
                let parent = match before
                    .as_ref()
                    .map_or(&RevTree::new(), |current| &current.tree)
                    .edit_parent(edit.base.as_ref())
                {
                    Ok(parent) => parent,
                    Err(err) => {
                        results.push(Err(err));
                        continue;
                    }
                };
                let child = Child {
                    parent: parent.as_ref(),
                    deleted: edit.deleted,
                    body: &edit.body,
                    hlc: edit.hlc,
                };
                let (rev, _) =
                    self.add_child(transaction, counters, &edit.doc_id, before.as_ref(), child)?;
                results.push(Ok(rev));
            }
            Ok(results)
        })
    }

    fn write_revisions(
        &self,
        revisions: Vec<Revision>,
        default_hlc: Timestamp,
    ) -> Result<WriteReport, StoreError> {
        self.with_counted_transaction(|transaction, counters| {
            let mut report = WriteReport::default();
            let doc_ids: Vec<&str> = revisions
                .iter()
                .map(|revision| revision.doc_id.as_str())
                .collect();
            let mut docs = BatchDocs::load(transaction, &doc_ids)?;
            for revision in &revisions {
                let before = docs.take(transaction, &revision.doc_id)?;
                let mut tree = before
                    .as_ref()
                    .map(|current| current.tree.clone())
                    .unwrap_or_default();
                let applied = tree
                    .merge_path(&revision.path, revision.deleted)
                    .map_err(|err| StoreError::InvalidRevision {
                        doc_id: revision.doc_id.clone(),
                        reason: err.to_string(),
                    })?;
                if before.as_ref().is_some_and(|current| current.tree == tree) {
                    report.already_present += 1;
                    continue;
                }
                match applied {
                    Applied::Added => report.added += 1,
                    Applied::AlreadyPresent => report.already_present += 1,
                }
                self.store_update(
                    transaction,
                    counters,
                    &revision.doc_id,
                    before.as_ref(),
                    tree,
                    NewRevision {
                        rev: &revision.path[0],
                        deleted: revision.deleted,
                        body: body_text(&revision.body),
                        hlc: revision.hlc.unwrap_or(default_hlc),
                        local: false,
                    },
                )?;
            }
            Ok(report)
        })
    }

    fn apply_resolution(
        &self,
        doc_id: &str,
        resolution: &Resolution,
    ) -> Result<Option<Rev>, StoreError> {
        self.with_local_edits(|transaction, counters| {
            let Some(mut current) = load_current(transaction, doc_id)? else {
                return Ok(None);
            };
            if !resolution.applies_to(&current.tree) {
                return Ok(None);
            }
            for (parent, deleted, body) in resolution.children(&Body::new()) {
                let child = Child {
                    parent: Some(parent),
                    deleted,
                    body,
                    hlc: resolution.hlc,
                };
                let (_, added) =
                    self.add_child(transaction, counters, doc_id, Some(&current), child)?;
                if added {
                    current =
                        load_current(transaction, doc_id)?.ok_or_else(|| StoreError::Corrupt {
                            what: "docs",
                            detail: format!("{doc_id} vanished while being resolved"),
                        })?;
                }
            }
            let record = serde_json::to_string(&resolution.record).expect("records serialize");
            transaction
                .prepare_cached(
                    "INSERT INTO resolutions (doc_id, rev, record) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![doc_id, resolution.rev().to_string(), record])?;
            Ok(Some(resolution.rev()))
        })
    }

    fn compact(&self) -> Result<u64, StoreError> {
        const CHUNK: i64 = 500;
        let depth = self.config.limits.ancestor_bodies;
        let mut dropped = 0;
        let mut after = String::new();
        loop {
            // One short transaction per chunk of documents, so writers are not held up.
            let (count, last) = self.with_write_transaction(|transaction| {
                let documents: Vec<(String, RevTree)> = transaction
                    .prepare_cached(
                        "SELECT doc_id, tree, rev, deleted FROM docs WHERE doc_id > ?1 \
                         ORDER BY doc_id LIMIT ?2",
                    )?
                    .query_and_then(params![after, CHUNK], |row| {
                        Ok::<_, StoreError>((row.get(0)?, tree_from_row(row, 1)?))
                    })?
                    .collect::<Result<_, _>>()?;
                let mut count = 0u64;
                for (doc_id, tree) in &documents {
                    let keep = tree.compaction_window(depth);
                    let stored: Vec<String> = transaction
                        .prepare_cached("SELECT rev FROM revs WHERE doc_id = ?1")?
                        .query_map(params![doc_id], |row| row.get(0))?
                        .collect::<Result<_, _>>()?;
                    let mut delete = transaction
                        .prepare_cached("DELETE FROM revs WHERE doc_id = ?1 AND rev = ?2")?;
                    for rev in stored {
                        if !keep.contains(&parse_rev(&rev)?) {
                            delete.execute(params![doc_id, rev])?;
                            count += 1;
                        }
                    }
                }
                Ok((count, documents.last().map(|(doc_id, ..)| doc_id.clone())))
            })?;
            dropped += count;
            match last {
                Some(last) => after = last,
                None => return Ok(dropped),
            }
        }
    }

    fn resolutions(&self, doc_id: &str) -> Result<Vec<ResolutionRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached("SELECT record FROM resolutions WHERE doc_id = ?1 ORDER BY id")?;
            let texts = statement
                .query_map(params![doc_id], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            texts
                .iter()
                .map(|text| {
                    serde_json::from_str(text).map_err(|error| StoreError::Corrupt {
                        what: "resolutions",
                        detail: error.to_string(),
                    })
                })
                .collect()
        })
    }

    fn get_document(&self, doc_id: &str) -> Result<Option<Document>, StoreError> {
        self.with_reader(|connection| {
            let row = connection
                .prepare_cached(
                    "SELECT rev, deleted, body, hlc, seq, leaves FROM docs WHERE doc_id = ?1",
                )?
                .query_row(params![doc_id], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, bool>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, Option<String>>(5)?,
                    ))
                })
                .optional()?;
            row.map(|(rev, deleted, body, hlc, seq, leaves)| {
                document_from_row(
                    doc_id.to_owned(),
                    &rev,
                    deleted,
                    &body,
                    hlc,
                    seq,
                    leaves.as_deref(),
                )
            })
            .transpose()
        })
    }

    fn get_tree(&self, doc_id: &str) -> Result<Option<RevTree>, StoreError> {
        self.with_reader(|connection| load_tree(connection, doc_id))
    }

    fn get_revision(
        &self,
        doc_id: &str,
        rev: &Rev,
        max_path: usize,
    ) -> Result<Option<StoredRevision>, StoreError> {
        self.with_reader(|connection| {
            let Some(current) = load_current(connection, doc_id)? else {
                return Ok(None);
            };
            stored_revision(connection, doc_id, &current, rev, max_path)
        })
    }

    fn get_revisions(
        &self,
        wanted: &[(String, Rev)],
        max_path: usize,
    ) -> Result<Vec<Option<StoredRevision>>, StoreError> {
        self.with_reader(|connection| {
            let doc_ids: Vec<&str> = wanted.iter().map(|(doc_id, _)| doc_id.as_str()).collect();
            let docs = BatchDocs::load(connection, &doc_ids)?;
            wanted
                .iter()
                .map(|(doc_id, rev)| match docs.0.get(doc_id) {
                    Some(Some(current)) => {
                        stored_revision(connection, doc_id, current, rev, max_path)
                    }
                    _ => Ok(None),
                })
                .collect()
        })
    }

    fn changes(
        &self,
        since: u64,
        limit: usize,
        include_bodies: bool,
    ) -> Result<Vec<Change>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT seq, doc_id, rev, deleted, leaves, CASE WHEN ?3 THEN body END \
                 FROM docs WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut changes = Vec::new();
            let mut cursor = since;
            // Rows that cannot be decoded are left out, so the scan goes on until `limit`
            // readable ones or the end: callers take a short page for the end of the feed.
            loop {
                let wanted = limit - changes.len();
                let mut rows = statement.query(params![
                    to_i64(cursor),
                    i64::try_from(wanted).unwrap_or(i64::MAX),
                    include_bodies
                ])?;
                let mut scanned = 0;
                while let Some(row) = rows.next()? {
                    scanned += 1;
                    cursor = to_u64(row.get(0)?);
                    let doc_id: String = row.get(1)?;
                    let decoded = (|| {
                        let body: Option<String> = row.get(5)?;
                        let rev = parse_rev(&row.get::<_, String>(2)?)?;
                        let deleted = row.get(3)?;
                        let leaves: Option<String> = row.get(4)?;
                        Ok(Change {
                            seq: cursor,
                            doc_id: doc_id.clone(),
                            leaves: decode_leaves(leaves.as_deref(), &rev, deleted)?,
                            rev,
                            deleted,
                            body: body.as_deref().map(parse_body).transpose()?,
                        })
                    })();
                    changes.extend(readable(&doc_id, decoded)?);
                }
                if scanned < wanted || changes.len() >= limit {
                    return Ok(changes);
                }
            }
        })
    }

    fn revs_diff(
        &self,
        revs: &[(String, Vec<Rev>)],
    ) -> Result<Vec<(String, RevsDiff)>, StoreError> {
        self.with_reader(|connection| {
            let doc_ids: Vec<&str> = revs.iter().map(|(doc_id, _)| doc_id.as_str()).collect();
            let mut trees = HashMap::with_capacity(revs.len());
            select_by_ids(
                connection,
                "SELECT doc_id, tree, rev, deleted FROM docs WHERE doc_id IN ({ids})",
                &doc_ids,
                |row| {
                    trees.insert(row.get::<_, String>(0)?, tree_from_row(row, 1)?);
                    Ok(())
                },
            )?;
            let empty = RevTree::new();
            Ok(revs
                .iter()
                .map(|(doc_id, asked)| {
                    let tree = trees.get(doc_id).unwrap_or(&empty);
                    (doc_id.clone(), tree.revs_diff(asked))
                })
                .collect())
        })
    }

    fn get_local(&self, id: &str) -> Result<Option<LocalDoc>, StoreError> {
        let id = id.strip_prefix(LOCAL_PREFIX).unwrap_or(id);
        self.with_reader(|connection| {
            let row = connection
                .prepare_cached("SELECT rev, body FROM local_docs WHERE id = ?1")?
                .query_row(params![id], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                })
                .optional()?;
            row.map(|(rev, body)| {
                Ok(LocalDoc {
                    id: id.to_owned(),
                    rev: to_u64(rev),
                    body: parse_body(&body)?,
                })
            })
            .transpose()
        })
    }

    fn put_local(
        &self,
        id: &str,
        expected_rev: Option<u64>,
        body: Option<Body>,
    ) -> Result<u64, StoreError> {
        let id = id.strip_prefix(LOCAL_PREFIX).unwrap_or(id);
        self.with_write_transaction(|transaction| {
            let current: Option<i64> = transaction
                .prepare_cached("SELECT rev FROM local_docs WHERE id = ?1")?
                .query_row(params![id], |row| row.get(0))
                .optional()?;
            if current.map(to_u64) != expected_rev {
                return Err(StoreError::LocalConflict);
            }
            let next = expected_rev.unwrap_or(0) + 1;
            match body {
                Some(body) => {
                    transaction
                        .prepare_cached(
                            "INSERT INTO local_docs (id, rev, body) VALUES (?1, ?2, ?3) \
                             ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, body = excluded.body",
                        )?
                        .execute(params![id, to_i64(next), body_text(&body)])?;
                }
                None => {
                    transaction
                        .prepare_cached("DELETE FROM local_docs WHERE id = ?1")?
                        .execute(params![id])?;
                }
            }
            Ok(next)
        })
    }

    fn all_docs(&self, query: &AllDocsQuery) -> Result<Vec<Document>, StoreError> {
        let (low, high) = if query.descending {
            (&query.end_key, &query.start_key)
        } else {
            (&query.start_key, &query.end_key)
        };
        // Which bound the inclusive_end flag applies to depends on the direction.
        let (low_op, high_op) = match (query.descending, query.inclusive_end) {
            (false, true) | (true, true) => (">=", "<="),
            (false, false) => (">=", "<"),
            (true, false) => (">", "<="),
        };
        let sql = format!(
            "SELECT doc_id, rev, deleted, {body}, hlc, seq, leaves FROM docs \
             WHERE deleted = 0 AND (?1 IS NULL OR doc_id {low_op} ?1) AND (?2 IS NULL OR doc_id {high_op} ?2) \
             ORDER BY doc_id {order} LIMIT ?3 OFFSET ?4",
            body = if query.include_bodies { "body" } else { "'{}'" },
            order = if query.descending { "DESC" } else { "ASC" },
        );
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&sql)?;
            let rows = statement.query(params![
                low,
                high,
                i64::try_from(query.limit).unwrap_or(i64::MAX),
                i64::try_from(query.skip).unwrap_or(i64::MAX)
            ])?;
            documents_from_rows(rows)
        })
    }

    fn collections(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT collection, COUNT(*) FROM docs WHERE deleted = 0 \
                 GROUP BY collection ORDER BY collection",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, to_u64(row.get(1)?)))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn query(&self, query: &Query) -> Result<Vec<Document>, StoreError> {
        let mut order = String::new();
        for (field, descending) in &query.sort {
            let path = json_path(field).ok_or_else(|| {
                StoreError::InvalidQuery(format!("cannot sort on field {field:?}"))
            })?;
            order.push_str(&format!(
                "json_extract(body, '{path}') {}, ",
                if *descending { "DESC" } else { "ASC" }
            ));
        }
        order.push_str("doc_id ASC");
        let (mut prefilter, mut values) = sql_prefilter(&query.selector);
        values.insert(0, rusqlite::types::Value::Text(query.collection.clone()));
        if !query.collection.is_empty() {
            // A collection's documents are the ids between `name:` and `name;` (the next
            // character), so the id index finds them.
            let low = format!("{}{COLLECTION_SEPARATOR}", query.collection);
            let after_separator = char::from_u32(u32::from(COLLECTION_SEPARATOR) + 1)
                .expect("the separator is ASCII");
            let high = format!("{}{after_separator}", query.collection);
            prefilter.push_str(&format!(
                " AND doc_id >= ?{} AND doc_id < ?{}",
                values.len() + 1,
                values.len() + 2
            ));
            values.push(rusqlite::types::Value::Text(low));
            values.push(rusqlite::types::Value::Text(high));
        }
        let sql = format!(
            "SELECT doc_id, rev, deleted, body, hlc, seq, leaves FROM docs \
             WHERE collection = ?1 AND deleted = 0{prefilter} ORDER BY {order}"
        );
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&sql)?;
            let mut rows = statement.query(rusqlite::params_from_iter(values))?;
            // Rows are filtered here rather than in SQL so that every selector operator has
            // exactly the semantics of `ferry_core::selector`; the scan stops at the limit, so
            // memory stays bounded by the page size.
            let mut matched = Vec::new();
            let mut skipped = 0;
            while let Some(row) = rows.next()? {
                let document = document_from_sql_row(row)?;
                if !query
                    .selector
                    .matches(&serde_json::Value::Object(document.body.clone()))
                {
                    continue;
                }
                if skipped < query.skip {
                    skipped += 1;
                    continue;
                }
                matched.push(document);
                if matched.len() >= query.limit {
                    break;
                }
            }
            Ok(matched)
        })
    }

    fn ensure_index(&self, collection: &str, field: &str) -> Result<(), StoreError> {
        let path = json_path(field)
            .ok_or_else(|| StoreError::InvalidQuery(format!("cannot index field {field:?}")))?;
        let digest = ferry_core::rev::Rev::compute(
            None,
            false,
            format!("{collection}\u{0}{field}").as_bytes(),
        )
        .expect("a revision without a parent always has an id");
        let name = format!("ix_{}", digest.hash());
        self.with_write_transaction(|transaction| {
            transaction.execute_batch(&format!(
                "CREATE INDEX IF NOT EXISTS {name} ON docs(collection, json_extract(body, '{path}')) \
                 WHERE deleted = 0"
            ))?;
            Ok(())
        })
    }
}

/// SQL conditions that select a superset of what `selector` matches, so that an index on
/// `json_extract(body, path)` narrows the scan. Only top-level conditions comparing a field
/// with a number or a string are translated: SQLite orders integers and reals numerically and
/// text by bytes (code points), as the selector does, and values of other types that slip
/// through are removed by the exact check that follows.
fn sql_prefilter(selector: &Selector) -> (String, Vec<rusqlite::types::Value>) {
    use ferry_core::selector::Condition;
    use rusqlite::types::Value as Sql;
    let parts: Vec<&Selector> = match selector {
        Selector::And(parts) => parts.iter().collect(),
        other => vec![other],
    };
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    let mut add = |path: &str, operator: &str, operand: &serde_json::Value| {
        let value = match operand {
            serde_json::Value::Number(number) => match (number.as_i64(), number.as_f64()) {
                (Some(integer), _) => Sql::Integer(integer),
                (None, Some(real)) => Sql::Real(real),
                _ => return,
            },
            serde_json::Value::String(text) => Sql::Text(text.clone()),
            _ => return,
        };
        values.push(value);
        conditions.push(format!(
            " AND json_extract(body, '{path}') {operator} ?{}",
            values.len() + 1
        ));
    };
    for part in parts {
        let Selector::Field { path, condition } = part else {
            continue;
        };
        let Some(path) = json_path(&path.join(".")) else {
            continue;
        };
        let simple: Vec<&Condition> = match condition {
            Condition::AllOf(all) => all.iter().collect(),
            other => vec![other],
        };
        for condition in simple {
            match condition {
                Condition::Eq(operand) => add(&path, "=", operand),
                Condition::Gt(operand) => add(&path, ">", operand),
                Condition::Gte(operand) => add(&path, ">=", operand),
                Condition::Lt(operand) => add(&path, "<", operand),
                Condition::Lte(operand) => add(&path, "<=", operand),
                _ => {}
            }
        }
    }
    (conditions.concat(), values)
}

/// `a.b_c` → `$.a.b_c`; `None` for field names that cannot be embedded in SQL safely.
fn json_path(field: &str) -> Option<String> {
    let valid = !field.is_empty()
        && field.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
        });
    valid.then(|| format!("$.{field}"))
}

fn document_from_row(
    doc_id: String,
    rev: &str,
    deleted: bool,
    body: &str,
    hlc: i64,
    seq: i64,
    leaves: Option<&str>,
) -> Result<Document, StoreError> {
    let rev = parse_rev(rev)?;
    let mut conflicts: Vec<Rev> = decode_leaves(leaves, &rev, deleted)?
        .into_iter()
        .filter(|leaf| !leaf.deleted && leaf.rev != rev)
        .map(|leaf| leaf.rev)
        .collect();
    if deleted {
        conflicts.clear();
    }
    conflicts.sort_by(|a, b| b.cmp(a));
    Ok(Document {
        doc_id,
        rev,
        deleted,
        body: parse_body(body)?,
        hlc: Timestamp::from_u64(to_u64(hlc)),
        seq: to_u64(seq),
        conflicts,
    })
}

fn document_from_sql_row(row: &rusqlite::Row<'_>) -> Result<Document, StoreError> {
    document_from_row(
        row.get(0)?,
        &row.get::<_, String>(1)?,
        row.get(2)?,
        &row.get::<_, String>(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get::<_, Option<String>>(6)?.as_deref(),
    )
}

/// The documents of `rows`, leaving out (see [`readable`]) those that cannot be decoded.
fn documents_from_rows(mut rows: rusqlite::Rows<'_>) -> Result<Vec<Document>, StoreError> {
    let mut documents = Vec::new();
    while let Some(row) = rows.next()? {
        let doc_id: String = row.get(0)?;
        documents.extend(readable(&doc_id, document_from_sql_row(row))?);
    }
    Ok(documents)
}

/// A decoded row, or `None` (logged) for a row whose stored data cannot be decoded: one
/// damaged document must not take its database's feeds and listings down with it. Reading
/// that document itself still fails with [`StoreError::Corrupt`]; any other error is the
/// whole read's.
fn readable<T>(doc_id: &str, decoded: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match decoded {
        Ok(value) => Ok(Some(value)),
        Err(error @ StoreError::Corrupt { .. }) => {
            tracing::error!(%doc_id, %error, "a stored document cannot be read; it is left out");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}
