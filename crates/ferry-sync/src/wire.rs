//! JSON shapes both remote peers read and write: the sync session carries the bodies of the
//! CouchDB endpoints, so `HttpPeer` and `WsPeer` build and parse them the same way.

use ferry_core::replicate::{ChangeRow, Seq};
use ferry_core::rev::Rev;
use serde_json::{Value, json};

/// Revisions as a JSON array of strings.
fn rev_list(revs: &[Rev]) -> Value {
    revs.iter()
        .map(|rev| Value::String(rev.to_string()))
        .collect()
}

/// A revs-diff request body: each document id with the revisions asked about.
pub(crate) fn revs_diff_request(revs: &[(String, Vec<Rev>)]) -> Value {
    Value::Object(
        revs.iter()
            .map(|(doc_id, revs)| (doc_id.clone(), rev_list(revs)))
            .collect(),
    )
}

/// A JSON array of revision strings; `None` if it is not one.
pub(crate) fn parse_rev_list(value: &Value) -> Option<Vec<Rev>> {
    value
        .as_array()?
        .iter()
        .map(|rev| rev.as_str()?.parse().ok())
        .collect()
}

/// The rows of a changes response (`results`): `{"seq", "id", "changes": [{"rev"}], "deleted"}`.
/// The error says what was wrong.
pub(crate) fn change_rows(results: &Value) -> Result<Vec<ChangeRow>, &'static str> {
    results
        .as_array()
        .ok_or("no results array")?
        .iter()
        .map(|row| {
            let doc_id = row["id"].as_str().ok_or("a change without an id")?;
            let revs = row["changes"]
                .as_array()
                .ok_or("a change without revisions")?
                .iter()
                .map(|change| {
                    change["rev"]
                        .as_str()
                        .and_then(|rev| rev.parse().ok())
                        .ok_or("an invalid revision")
                })
                .collect::<Result<Vec<Rev>, _>>()?;
            Ok(ChangeRow {
                doc_id: doc_id.to_owned(),
                seq: Seq::from_json(&row["seq"]).ok_or("a change with an invalid seq")?,
                revs,
                deleted: row["deleted"].as_bool().unwrap_or(false),
            })
        })
        .collect()
}

/// The `docs` of a `_bulk_get` (or session `bulk_get`): one `{"id", "rev"}` per revision.
pub(crate) fn bulk_get_docs(wanted: &[(String, Vec<Rev>)]) -> Vec<Value> {
    wanted
        .iter()
        .flat_map(|(doc_id, revs)| {
            revs.iter()
                .map(move |rev| json!({"id": doc_id, "rev": rev.to_string()}))
        })
        .collect()
}
