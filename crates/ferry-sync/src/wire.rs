//! The `_bulk_get` request body, as `HttpPeer` builds it (the bodies it reads are types of
//! `ferry_core::couch`, shared with the server).

use ferry_core::rev::Rev;
use serde_json::{Value, json};

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
