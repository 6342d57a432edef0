//! The outbox of a client replica (`ferry_store::Replica`): which local edits wait for the
//! server, acknowledgements, refusals and re-stamping.

use ferry_core::hlc::Timestamp;
use rusqlite::{OptionalExtension, Transaction, params};

use crate::{OutboxSummary, PendingState, Replica, StoreError};

use super::SqliteDatabase;
use super::encoding::*;
use super::schema::*;

impl SqliteDatabase {
    /// Keeps the outbox in step with a document that got sequence `seq` (`None`: it kept its
    /// own): a local edit drops its old place (the transaction records the new one, see
    /// [`SqliteDatabase::with_local_edits`]); a replicated change moves a pending document to
    /// its new sequence, so its edit waits for the page that carries the document as it is now.
    pub(super) fn update_outbox(
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
