//! How values are stored in rows and read back: bodies as JSON text, revisions, leaves and
//! trees, the rows a writer reads before changing a document, and documents from query rows.

use std::collections::HashMap;

use ferry_core::hlc::Timestamp;
use ferry_core::json::{RawJson, canonical_object};
use ferry_core::model::{Body, Document};
use ferry_core::rev::Rev;
use ferry_core::tree::{Leaf, RevTree};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{StoreError, StoredRevision};

use super::schema::*;

pub(super) fn parse_body(text: &str) -> Result<Body, StoreError> {
    serde_json::from_str(text).map_err(|err| StoreError::Corrupt {
        what: "document body",
        detail: err.to_string(),
    })
}

/// A stored body's text as it is (checked to be JSON, not parsed).
pub(super) fn stored_body(text: String) -> Result<RawJson, StoreError> {
    RawJson::from_text(text).map_err(|err| StoreError::Corrupt {
        what: "document body",
        detail: err.to_string(),
    })
}

/// An edit's body as it is stored: canonical, the text its revision id hashes.
pub(super) fn body_text(body: &Body) -> String {
    String::from_utf8(canonical_object(body)).expect("JSON is UTF-8")
}

pub(super) fn parse_rev(text: &str) -> Result<Rev, StoreError> {
    text.parse()
        .map_err(|err: ferry_core::rev::RevParseError| StoreError::Corrupt {
            what: "revision id",
            detail: err.to_string(),
        })
}

/// `None` when the winner is the only leaf (most documents): the column is then `NULL`.
pub(super) fn encode_leaves(leaves: &[Leaf]) -> Option<String> {
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
pub(super) fn decode_leaves(
    text: Option<&str>,
    winner: &Rev,
    deleted: bool,
) -> Result<Vec<Leaf>, StoreError> {
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
pub(super) fn encode_tree(tree: &RevTree) -> Option<String> {
    tree.revs().nth(1).is_some().then(|| tree.encode())
}

/// The tree of a `docs` row (see [`encode_tree`]), read from the columns `tree, rev, deleted`
/// starting at `first`.
pub(super) fn tree_from_row(row: &rusqlite::Row<'_>, first: usize) -> Result<RevTree, StoreError> {
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

pub(super) fn load_tree(
    connection: &Connection,
    doc_id: &str,
) -> Result<Option<RevTree>, StoreError> {
    connection
        .prepare_cached("SELECT tree, rev, deleted FROM docs WHERE doc_id = ?1")?
        .query_and_then(params![doc_id], |row| tree_from_row(row, 0))?
        .next()
        .transpose()
}

/// What a writer reads of a document before changing it: its tree, and its winner's body and
/// clock, which move to `revs` if another revision wins while it is still kept.
pub(super) struct Current {
    pub(super) tree: RevTree,
    pub(super) winner: Leaf,
    pub(super) hlc: Timestamp,
    pub(super) body: String,
    pub(super) seq: u64,
}

pub(super) fn load_current(
    connection: &Connection,
    doc_id: &str,
) -> Result<Option<Current>, StoreError> {
    connection
        .prepare_cached(
            "SELECT doc_id, tree, rev, deleted, hlc, body, seq FROM docs WHERE doc_id = ?1",
        )?
        .query_and_then(params![doc_id], current_from_row)?
        .next()
        .transpose()
}

/// A [`Current`] from a row of `SELECT doc_id, tree, rev, deleted, hlc, body, seq`.
pub(super) fn current_from_row(row: &rusqlite::Row<'_>) -> Result<Current, StoreError> {
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
pub(super) const LOOKUP_CHUNK: usize = 128;

/// Runs `select`, a query whose `{ids}` stands for a list of document ids, for `doc_ids` in
/// chunks, calling `each` with every row: one statement per chunk instead of one per document.
pub(super) fn select_by_ids(
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
pub(super) struct BatchDocs(pub(super) HashMap<String, Option<Current>>);

impl BatchDocs {
    pub(super) fn load(connection: &Connection, doc_ids: &[&str]) -> Result<BatchDocs, StoreError> {
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

    pub(super) fn take(
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
pub(super) fn stored_revision(
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
            Some(stored_body(current.body.clone())?),
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
                Some(stored_body(body)?),
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
pub(super) struct NewRevision<'a> {
    pub(super) rev: &'a Rev,
    pub(super) deleted: bool,
    /// The body's text: for an edit its canonical encoding (computed once: it is also what
    /// the revision id hashes), for a replicated revision the text as the sender wrote it.
    pub(super) body: String,
    pub(super) hlc: Timestamp,
    /// Written on this replica (an edit or a resolution), not received from another: on
    /// client replicas it waits for the server.
    pub(super) local: bool,
}

/// A local edit's new revision, before its id is computed: a child of `parent`.
pub(super) struct Child<'a> {
    pub(super) parent: Option<&'a Rev>,
    pub(super) deleted: bool,
    pub(super) body: &'a Body,
    pub(super) hlc: Timestamp,
}

pub(super) fn document_from_row(
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

pub(super) fn document_from_sql_row(row: &rusqlite::Row<'_>) -> Result<Document, StoreError> {
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
pub(super) fn documents_from_rows(
    mut rows: rusqlite::Rows<'_>,
) -> Result<Vec<Document>, StoreError> {
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
pub(super) fn readable<T>(
    doc_id: &str,
    decoded: Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    match decoded {
        Ok(value) => Ok(Some(value)),
        Err(error @ StoreError::Corrupt { .. }) => {
            tracing::error!(%doc_id, %error, "a stored document cannot be read; it is left out");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}
