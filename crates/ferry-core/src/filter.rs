//! Which changes a changes feed or a replication carries: the one filter type every path
//! uses (HTTP `_changes`, the sync session's `changes`, local replication, the simulator).
//!
//! A filter is a set of document ids, a Mango selector over the winning revision, or both
//! (a change must pass each that is set). CouchDB's `_selector` feed matches the winner with
//! its `_id`; a deleted document only matches a selector that accepts its tombstone.
//!
//! ```
//! use ferry_core::filter::ChangesFilter;
//! let filter = ChangesFilter::doc_ids(["todos:1".to_owned()]);
//! assert!(filter.matches("todos:1", false, None));
//! assert!(!filter.matches("todos:2", false, None));
//!
//! let selector = ChangesFilter::selector(serde_json::json!({"done": false})).unwrap();
//! let body = serde_json::json!({"done": false}).as_object().unwrap().clone();
//! assert!(selector.needs_bodies());
//! assert!(selector.matches("todos:1", false, Some(&body)));
//! ```

use std::collections::BTreeSet;

use serde_json::Value;

use crate::model::Body;
use crate::selector::{Selector, SelectorError};

/// Which changes pass; the default passes every change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangesFilter {
    doc_ids: Option<BTreeSet<String>>,
    /// The selector as given (it names the filter in replication ids) and parsed.
    selector: Option<(Value, Selector)>,
}

impl ChangesFilter {
    /// Every change.
    pub fn all() -> ChangesFilter {
        ChangesFilter::default()
    }

    /// Only the changes of these documents.
    pub fn doc_ids(ids: impl IntoIterator<Item = String>) -> ChangesFilter {
        ChangesFilter {
            doc_ids: Some(ids.into_iter().collect()),
            selector: None,
        }
    }

    /// Only documents whose winner matches this Mango selector.
    pub fn selector(selector: Value) -> Result<ChangesFilter, SelectorError> {
        let parsed = Selector::parse(&selector)?;
        Ok(ChangesFilter {
            doc_ids: None,
            selector: Some((selector, parsed)),
        })
    }

    /// This filter, also restricted to `ids`.
    #[must_use]
    pub fn and_doc_ids(mut self, ids: impl IntoIterator<Item = String>) -> ChangesFilter {
        self.doc_ids = Some(ids.into_iter().collect());
        self
    }

    /// The document ids, when the filter has them.
    pub fn ids(&self) -> Option<&BTreeSet<String>> {
        self.doc_ids.as_ref()
    }

    /// The selector as it was given, when the filter has one.
    pub fn selector_json(&self) -> Option<&Value> {
        self.selector.as_ref().map(|(json, _)| json)
    }

    /// Whether every change passes.
    pub fn is_everything(&self) -> bool {
        self.doc_ids.is_none() && self.selector.is_none()
    }

    /// Whether [`ChangesFilter::matches`] needs the winner's body.
    pub fn needs_bodies(&self) -> bool {
        self.selector.is_some()
    }

    /// Whether a change passes; `body` is the winner's body (needed when a selector is set:
    /// without it nothing matches).
    pub fn matches(&self, doc_id: &str, deleted: bool, body: Option<&Body>) -> bool {
        if let Some(doc_ids) = &self.doc_ids
            && !doc_ids.contains(doc_id)
        {
            return false;
        }
        match &self.selector {
            Some((_, selector)) => {
                body.is_some_and(|body| selector.matches_document(doc_id, deleted, body))
            }
            None => true,
        }
    }

    /// A stable description, part of a replication's id: the same filter always describes
    /// the same way, whatever order its ids were given in.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        if let Some(doc_ids) = &self.doc_ids {
            text.push_str(&serde_json::to_string(doc_ids).expect("strings serialize"));
        }
        if let Some((json, _)) = &self.selector {
            text.push('|');
            text.push_str(&String::from_utf8_lossy(&crate::json::canonical(json)));
        }
        text
    }
}

/// The selector of every document of `collection`, deletions included (a collection is the id
/// prefix `name:`; `;` is the character after `:`). What an offline subscription to a
/// collection pulls.
pub fn collection_selector(collection: &str) -> Value {
    serde_json::json!({"_id": {"$gt": format!("{collection}:"), "$lt": format!("{collection};")}})
}

/// The selector of `collection`'s documents that match `selector`, and of deletions of any of
/// its documents (a replica must hear that a document it holds was deleted). What an offline
/// subscription to a query pulls.
pub fn query_selector(collection: &str, selector: Value) -> Value {
    let in_collection = collection_selector(collection);
    serde_json::json!({"$or": [
        {"$and": [in_collection.clone(), selector]},
        {"$and": [in_collection, {"_deleted": true}]},
    ]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_selector_both_apply_and_the_description_ignores_id_order() {
        let filter = ChangesFilter::selector(serde_json::json!({"n": {"$gt": 1}}))
            .unwrap()
            .and_doc_ids(["b".to_owned(), "a".to_owned()]);
        let body = |n: i64| serde_json::json!({ "n": n }).as_object().unwrap().clone();
        assert!(filter.matches("a", false, Some(&body(2))));
        assert!(!filter.matches("a", false, Some(&body(1))));
        assert!(!filter.matches("c", false, Some(&body(2))));
        assert!(!filter.matches("a", false, None), "no body, no match");
        let reordered = ChangesFilter::selector(serde_json::json!({"n": {"$gt": 1}}))
            .unwrap()
            .and_doc_ids(["a".to_owned(), "b".to_owned()]);
        assert_eq!(filter.describe(), reordered.describe());
        assert_ne!(filter.describe(), ChangesFilter::all().describe());
    }
}
