//! The schema: its version, the migrations from older files, opening a connection with the
//! durability asked for, and the `meta` table.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};

use crate::{Durability, StoreConfig, StoreError};

pub(super) const SCHEMA_VERSION: i64 = 4;

/// Each entry upgrades the schema from its index to the next version.
pub(super) const MIGRATIONS: &[&str] = &[
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

pub(super) fn connect(
    path: &Path,
    config: &StoreConfig,
    read_only: bool,
) -> Result<Connection, StoreError> {
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
    let cache_kib = if read_only {
        config.page_cache.reader_kib
    } else {
        config.page_cache.writer_kib
    };
    // A negative size is in KiB rather than pages.
    connection.pragma_update(None, "cache_size", -i64::from(cache_kib))?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

pub(super) fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let start = crate::schema_version(&transaction, SCHEMA_VERSION, "schema version")?;
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
    if start == 0 {
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

pub(super) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(super) fn read_meta(connection: &Connection, key: &str) -> Result<u64, StoreError> {
    // Cached: this runs several times per written document.
    let text: String = connection
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row(params![key], |row| row.get(0))?;
    text.parse().map_err(|_| StoreError::Corrupt {
        what: "meta",
        detail: format!("{key} = {text:?}"),
    })
}

pub(super) fn write_meta(connection: &Connection, key: &str, value: u64) -> Result<(), StoreError> {
    connection
        .prepare_cached("UPDATE meta SET value = ?2 WHERE key = ?1")?
        .execute(params![key, value.to_string()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PageCache;

    #[test]
    fn the_writer_and_the_readers_get_their_own_page_cache_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let config = StoreConfig {
            page_cache: PageCache {
                writer_kib: 1500,
                reader_kib: 96,
            },
            ..StoreConfig::default()
        };
        let cache_size = |connection: &Connection| -> i64 {
            connection
                .query_row("PRAGMA cache_size", [], |row| row.get(0))
                .unwrap()
        };
        let writer = connect(&path, &config, false).unwrap();
        let reader = connect(&path, &config, true).unwrap();
        // Negative: KiB, not pages.
        assert_eq!(cache_size(&writer), -1500);
        assert_eq!(cache_size(&reader), -96);
    }
}
