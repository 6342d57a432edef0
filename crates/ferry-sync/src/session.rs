//! The client's half of each sync-session request, without I/O: the op a replication step
//! sends and how its result becomes what the step returns. `WsPeer` sends these ops over a
//! WebSocket; the simulator (`ferry-sim`) carries the same frames over its simulated network
//! to the server's own handler, so both run this code.

use ferry_core::couch::{revision_from_text, revision_text};
use ferry_core::json::PARSER_HARD_DEPTH_LIMIT;
use ferry_core::model::Revision;
use ferry_core::protocol::{BulkDocsResult, BulkGetResult, ChangesResult, ChangesRow, Op, RevRef};
use ferry_core::replicate::Seq;
use ferry_core::rev::Rev;

use crate::{ChangesFilter, ChangesPage, FETCH_ANSWER_BYTES, RejectedRevision};

/// `changes` after `since`, at most `limit` rows, filtered as `filter` says.
pub fn changes_op(since: u64, limit: usize, filter: &ChangesFilter) -> Op {
    let (doc_ids, selector) = match filter.ids() {
        Some(ids) => (Some(ids.iter().cloned().collect()), None),
        None => (None, filter.selector_json().cloned()),
    };
    Op::Changes {
        since,
        limit: Some(limit as u64),
        doc_ids,
        selector,
    }
}

/// A `changes` result as the page a replication reads.
pub fn changes_page(result: ChangesResult) -> ChangesPage {
    ChangesPage {
        rows: result
            .results
            .into_iter()
            .map(ChangesRow::into_change_row)
            .collect(),
        last_seq: Seq::from(result.last_seq),
        pending: Some(result.pending),
    }
}

/// `bulk_get` of `wanted` (each document with the revisions wanted), its answer bounded by
/// the client's fetch budget.
pub fn bulk_get_op(wanted: Vec<RevRef>) -> Op {
    Op::BulkGet {
        docs: wanted,
        max_bytes: Some(FETCH_ANSWER_BYTES as u64),
    }
}

/// The revisions `wanted` asks for, one per revision, as `bulk_get` takes them.
pub fn wanted_refs(wanted: Vec<(String, Vec<Rev>)>) -> Vec<RevRef> {
    wanted
        .into_iter()
        .flat_map(|(id, revs)| {
            revs.into_iter().map(move |rev| RevRef {
                id: id.clone(),
                rev,
            })
        })
        .collect()
}

/// A `bulk_get` result of a request for `asked` revisions: the revisions it carries, and
/// those left for another request (an answer bounded by bytes serves a prefix). Revisions the
/// server no longer has are skipped, and said in the log.
pub fn fetched(
    result: BulkGetResult,
    asked: usize,
) -> Result<(Vec<Revision>, Vec<RevRef>), String> {
    for missing in &result.missing {
        tracing::warn!(doc_id = %missing.id, rev = %missing.rev, "revision not available on the server; skipped");
    }
    // Each answer must serve at least one revision, so that asking again ends.
    if asked > 0 && result.unserved.len() >= asked {
        return Err("the server answered none of the revisions asked for".to_owned());
    }
    let revisions = result
        .docs
        .iter()
        .map(|doc| revision_from_text(doc, PARSER_HARD_DEPTH_LIMIT).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((revisions, result.unserved))
}

/// `bulk_docs` of `revisions`, and the revisions sent, in order, to read its acks by.
pub fn bulk_docs_op(revisions: &[Revision]) -> (Op, Vec<(String, Rev)>) {
    let sent = revisions
        .iter()
        .map(|revision| (revision.doc_id.clone(), revision.rev().clone()))
        .collect();
    let docs = revisions
        .iter()
        .map(|revision| revision_text(revision, true))
        .collect();
    (Op::BulkDocs { docs }, sent)
}

/// The revisions a `bulk_docs` result refused, checked against those `sent`: one ack per
/// revision, in order.
pub fn refused(
    result: BulkDocsResult,
    sent: Vec<(String, Rev)>,
) -> Result<Vec<RejectedRevision>, String> {
    if result.acks.len() != sent.len() {
        return Err("the server did not answer for every revision".to_owned());
    }
    let mut rejected = Vec::new();
    for (ack, (doc_id, rev)) in result.acks.into_iter().zip(sent) {
        if ack.id != doc_id || ack.rev != rev {
            return Err("acknowledgements out of order".to_owned());
        }
        if ack.ok {
            continue;
        }
        rejected.push(RejectedRevision {
            doc_id,
            rev,
            error: ack.error.unwrap_or_else(|| "unknown".to_owned()),
            reason: ack.reason.unwrap_or_default(),
        });
    }
    Ok(rejected)
}
