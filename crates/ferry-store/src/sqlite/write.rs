//! Storing a new revision of a document: the `docs` row, the bodies kept in `revs`, the
//! sequence and counters.

use ferry_core::hlc::Timestamp;
use ferry_core::model::collection_of;
use ferry_core::rev::Rev;
use ferry_core::tree::{Applied, RevTree};
use rusqlite::{OptionalExtension, Transaction, params};

use crate::StoreError;

use super::encoding::*;
use super::schema::*;
use super::{Counters, SqliteDatabase};

impl SqliteDatabase {
    /// Adds `child` to the document (`before`: what it was, `None` for a new one) and stores
    /// it. Returns its revision and whether the tree did not have it already.
    pub(super) fn add_child(
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
    pub(super) fn store_update(
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
