//! Documents, collections, identifiers and limits.
//!
//! A database holds JSON documents. Each document belongs to one **collection**, and its id
//! says which: the collection is the part of the id before the first `:` (`todos:42` is
//! document `42` of collection `todos`); an id without `:` belongs to the default collection,
//! whose name is empty. Because the collection is part of the id, CouchDB clients such as
//! PouchDB see Ferry collections as plain id prefixes, and the server knows a document's
//! collection (and so its conflict policy) from any request that names the document.

use serde_json::{Map, Value};

use crate::hlc::Timestamp;
use crate::json::{JsonError, ObjectShape, PARSER_HARD_DEPTH_LIMIT, RawJson};
use crate::rev::Rev;

/// A JSON object: the body of a document.
pub type Body = Map<String, Value>;

/// The separator between a collection name and a document's own id.
pub const COLLECTION_SEPARATOR: char = ':';

/// Prefix of local (never replicated) documents, as in CouchDB.
pub const LOCAL_PREFIX: &str = "_local/";

/// Prefix of design documents, stored and replicated like any document.
pub const DESIGN_PREFIX: &str = "_design/";

/// The collection of a document id: the text before the first `:`, or `""`.
///
/// ```
/// use ferry_core::model::collection_of;
/// assert_eq!(collection_of("todos:42"), "todos");
/// assert_eq!(collection_of("todos:a:b"), "todos");
/// assert_eq!(collection_of("plain"), "");
/// ```
pub fn collection_of(doc_id: &str) -> &str {
    doc_id
        .split_once(COLLECTION_SEPARATOR)
        .map_or("", |(collection, _)| collection)
}

/// The document id of `id` in `collection`.
///
/// ```
/// use ferry_core::model::doc_id_in;
/// assert_eq!(doc_id_in("todos", "42"), "todos:42");
/// assert_eq!(doc_id_in("", "42"), "42");
/// ```
pub fn doc_id_in(collection: &str, id: &str) -> String {
    if collection.is_empty() {
        id.to_owned()
    } else {
        format!("{collection}{COLLECTION_SEPARATOR}{id}")
    }
}

/// Bounds on what a replica accepts. Every one is explicit and configurable, and each is
/// enforced where input enters (the server's HTTP layer, the SDK's API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest document body, in bytes of its stored JSON text (an edit's canonical
    /// encoding; a replicated revision's text as it arrived).
    pub max_document_bytes: usize,
    /// The largest HTTP request body, in bytes.
    pub max_request_bytes: usize,
    /// The deepest nesting of arrays and objects in a document.
    pub max_json_depth: usize,
    /// The most JSON values (scalars, arrays and objects) in one request body or session
    /// frame: each costs far more memory parsed than its bytes of text, so this bounds what a
    /// request of many tiny values takes (about 100 bytes each at worst).
    pub max_json_values: usize,
    /// The longest document id, in bytes.
    pub max_doc_id_bytes: usize,
    /// The most documents in one `_bulk_docs`, `_bulk_get`, `_revs_diff` or `_all_docs` request.
    pub max_batch_docs: usize,
    /// The most rows one `_changes` or query response returns.
    pub max_page_rows: usize,
    /// How many revisions of history each document keeps (CouchDB's revs limit).
    pub revs_limit: usize,
    /// How many ancestor levels above each leaf keep their bodies (for three-way merges).
    pub ancestor_bodies: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_document_bytes: 1024 * 1024,
            max_request_bytes: 32 * 1024 * 1024,
            max_json_depth: 64,
            max_json_values: 1_000_000,
            max_doc_id_bytes: 512,
            max_batch_docs: 10_000,
            max_page_rows: 10_000,
            revs_limit: 1000,
            ancestor_bodies: 8,
        }
    }
}

/// Why a document id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocIdError {
    /// The id is empty.
    #[error("document id must not be empty")]
    Empty,
    /// The id is longer than the limit.
    #[error("document id is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Ids starting with `_` are reserved, except design documents.
    #[error("document id {0:?} starts with '_', which is reserved")]
    Reserved(String),
    /// Control characters are not allowed in ids.
    #[error("document id contains a control character")]
    ControlCharacter,
}

/// Checks a replicated document id (not a `_local/` id).
pub fn validate_doc_id(doc_id: &str, limits: &Limits) -> Result<(), DocIdError> {
    if doc_id.is_empty() {
        return Err(DocIdError::Empty);
    }
    if doc_id.len() > limits.max_doc_id_bytes {
        return Err(DocIdError::TooLong {
            len: doc_id.len(),
            max: limits.max_doc_id_bytes,
        });
    }
    if doc_id.starts_with('_') && !is_design_doc(doc_id) {
        return Err(DocIdError::Reserved(doc_id.chars().take(80).collect()));
    }
    if doc_id.chars().any(char::is_control) {
        return Err(DocIdError::ControlCharacter);
    }
    Ok(())
}

/// Why a document was refused before being stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// The id breaks [`validate_doc_id`]'s rules.
    #[error("{0}")]
    Id(#[from] DocIdError),
    /// The body nests deeper than [`Limits::max_json_depth`].
    #[error("{doc_id}: nesting depth {depth} exceeds the limit of {max}")]
    TooDeep {
        /// The document.
        doc_id: String,
        /// Its depth.
        depth: usize,
        /// The limit.
        max: usize,
    },
    /// A top-level field starts with `_`, which CouchDB reserves for its special members.
    #[error("{doc_id}: field {field:?} starts with '_', which is reserved")]
    ReservedField {
        /// The document.
        doc_id: String,
        /// The field (at most 80 characters of it).
        field: String,
    },
    /// The body is not a JSON object.
    #[error("{doc_id}: a document body must be a JSON object")]
    NotAnObject {
        /// The document.
        doc_id: String,
    },
    /// The stored text of the body is larger than [`Limits::max_document_bytes`].
    #[error("{doc_id} is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// The document.
        doc_id: String,
        /// Its size in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// The one rule every replica applies to a document before storing it, however it arrives
/// (an SDK write, a CLI command, HTTP, a sync session, replication): a valid id, a body no
/// deeper than the limit, no reserved top-level field, and no larger than the limit in the
/// text it is stored as: for an edit, its canonical encoding (the form revision ids hash).
///
/// ```
/// use ferry_core::model::{Limits, validate_document, DocumentError};
/// let limits = Limits { max_document_bytes: 16, ..Limits::default() };
/// let small = serde_json::json!({"a": 1}).as_object().unwrap().clone();
/// assert_eq!(validate_document("todos:1", &small, &limits), Ok(()));
/// let large = serde_json::json!({"a": "0123456789abcdef"}).as_object().unwrap().clone();
/// assert!(matches!(
///     validate_document("todos:1", &large, &limits),
///     Err(DocumentError::TooLarge { .. })
/// ));
/// ```
pub fn validate_document(doc_id: &str, body: &Body, limits: &Limits) -> Result<(), DocumentError> {
    // The stored (canonical) text's length, counted without writing it.
    let size = crate::json::encoded_len_object(body);
    check_document(doc_id, ObjectShape::of_map(body), size, limits)
}

/// [`validate_document`] for a body carried as its text (a replicated revision): the same
/// rule, the size being the text's length, as it is stored.
///
/// ```
/// use ferry_core::json::RawJson;
/// use ferry_core::model::{Limits, validate_document_text, DocumentError};
/// let limits = Limits::default();
/// let fine = RawJson::from_text(r#"{"a":{"_b":1}}"#.to_owned()).unwrap();
/// assert_eq!(validate_document_text("todos:1", &fine, &limits), Ok(()));
/// let reserved = RawJson::from_text(r#"{"a":1,"_b":1}"#.to_owned()).unwrap();
/// assert!(matches!(
///     validate_document_text("todos:1", &reserved, &limits),
///     Err(DocumentError::ReservedField { .. })
/// ));
/// ```
pub fn validate_document_text(
    doc_id: &str,
    body: &RawJson,
    limits: &Limits,
) -> Result<(), DocumentError> {
    let shape = ObjectShape::of_text(body).map_err(|_| DocumentError::NotAnObject {
        doc_id: doc_id.to_owned(),
    })?;
    check_document(doc_id, shape, body.len(), limits)
}

fn check_document(
    doc_id: &str,
    shape: ObjectShape,
    size: usize,
    limits: &Limits,
) -> Result<(), DocumentError> {
    validate_doc_id(doc_id, limits)?;
    if shape.depth > limits.max_json_depth {
        return Err(DocumentError::TooDeep {
            doc_id: doc_id.to_owned(),
            depth: shape.depth,
            max: limits.max_json_depth,
        });
    }
    if let Some(field) = shape.reserved_key {
        return Err(DocumentError::ReservedField {
            doc_id: doc_id.to_owned(),
            field: field.chars().take(80).collect(),
        });
    }
    if size > limits.max_document_bytes {
        return Err(DocumentError::TooLarge {
            doc_id: doc_id.to_owned(),
            size,
            max: limits.max_document_bytes,
        });
    }
    Ok(())
}

/// Whether `doc_id` names a design document.
pub fn is_design_doc(doc_id: &str) -> bool {
    doc_id.len() > DESIGN_PREFIX.len() && doc_id.starts_with(DESIGN_PREFIX)
}

/// One revision of one document, as replication carries it: the revision, its ancestry and,
/// when available, its body and clock.
#[derive(Clone, Debug, PartialEq)]
pub struct Revision {
    /// The document id.
    pub doc_id: String,
    /// The revision's path, newest first: `path[0]` is this revision, then its parent, and so
    /// on, as far back as the sender knows (bounded by its revs limit).
    pub path: Vec<Rev>,
    /// Whether this revision is a deletion.
    pub deleted: bool,
    /// The body: a JSON object's text without `_` members (`{}` for most tombstones), as the
    /// sender wrote it, so that it goes from the wire to the store and back without being
    /// parsed ([`validate_document_text`] checks it; [`Revision::parse_body`] reads it).
    pub body: RawJson,
    /// The hybrid logical clock timestamp the revision was made with, when the sender knows it
    /// (CouchDB peers do not send one; the receiving replica then assigns its own).
    pub hlc: Option<Timestamp>,
}

impl Revision {
    /// The revision id (the first element of the path).
    pub fn rev(&self) -> &Rev {
        &self.path[0]
    }

    /// The body parsed (its text is JSON; the depth was bounded where it arrived).
    pub fn parse_body(&self) -> Result<Body, JsonError> {
        self.body.parse_object(PARSER_HARD_DEPTH_LIMIT)
    }
}

/// The state of a document as stored: its winner and everything needed to describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// The document id.
    pub doc_id: String,
    /// The winning revision.
    pub rev: Rev,
    /// Whether the winner is a tombstone.
    pub deleted: bool,
    /// The winner's body.
    pub body: Body,
    /// The winner's clock.
    pub hlc: Timestamp,
    /// The sequence of the last change to this document on this replica.
    pub seq: u64,
    /// The other live leaves, highest first.
    pub conflicts: Vec<Rev>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_ids_are_checked_at_the_limit_and_one_past() {
        let limits = Limits {
            max_doc_id_bytes: 8,
            ..Limits::default()
        };
        assert_eq!(validate_doc_id("abcdefgh", &limits), Ok(()));
        assert_eq!(
            validate_doc_id("abcdefghi", &limits),
            Err(DocIdError::TooLong { len: 9, max: 8 })
        );
        assert_eq!(validate_doc_id("", &limits), Err(DocIdError::Empty));
        assert!(matches!(
            validate_doc_id("_secret", &limits),
            Err(DocIdError::Reserved(_))
        ));
        assert!(validate_doc_id("_design/", &Limits::default()).is_err());
        assert_eq!(validate_doc_id("_design/a", &Limits::default()), Ok(()));
        assert_eq!(
            validate_doc_id("a\nb", &limits),
            Err(DocIdError::ControlCharacter)
        );
    }

    #[test]
    fn collection_round_trips_through_the_id() {
        for (collection, id) in [("todos", "1"), ("", "x"), ("a", "b:c")] {
            let doc_id = doc_id_in(collection, id);
            assert_eq!(collection_of(&doc_id), collection);
        }
    }
}
