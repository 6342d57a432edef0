//! The CouchDB document format on the wire, converted explicitly to and from core types.
//!
//! This is the one place that knows how a document looks in the CouchDB replication protocol:
//! `_id`, `_rev`, `_deleted`, `_revisions` (`{"start": N, "ids": [hashes newest first]}`),
//! `_conflicts` and the rest of the body. The server and the HTTP peer both use it, so the two
//! ends of Ferry's own replication cannot disagree about the format, and core types can change
//! without changing the wire.
//!
//! Ferry adds one special member, `_ferry`, carrying what CouchDB documents have no place for
//! (the revision's hybrid logical clock). It is only sent to clients that ask for it (`ferry=true`
//! in the query), because PouchDB refuses documents with unknown `_` members.

use serde_json::{Value, json};

use crate::hlc::Timestamp;
use crate::model::{Body, Revision};
use crate::rev::Rev;

/// Why a CouchDB document was refused. The messages follow CouchDB's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CouchDocError {
    /// The document is not a JSON object.
    #[error("Document must be a JSON object")]
    NotAnObject,
    /// A special member Ferry does not know.
    #[error("Bad special document member: {0}")]
    BadSpecialMember(String),
    /// `_id` is missing or not a string.
    #[error("Document id must be a string")]
    BadId,
    /// `_rev` is not a valid revision.
    #[error("Invalid rev format")]
    BadRev,
    /// `_revisions` is malformed or disagrees with `_rev`.
    #[error("Invalid _revisions: {0}")]
    BadRevisions(&'static str),
    /// `_deleted` is not a boolean.
    #[error("_deleted must be a boolean")]
    BadDeleted,
    /// Attachments are not supported yet.
    #[error("attachments are not supported by this server")]
    Attachments,
    /// A body exceeds the size limit.
    #[error("document is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// A document as a CouchDB client sends it, taken apart.
#[derive(Clone, Debug, PartialEq)]
pub struct CouchDoc {
    /// `_id`, when present.
    pub id: Option<String>,
    /// `_rev`, when present.
    pub rev: Option<Rev>,
    /// `_deleted`.
    pub deleted: bool,
    /// `_revisions` as a path, newest first (starting with `_rev`), when present.
    pub revisions: Option<Vec<Rev>>,
    /// The clock from `_ferry.hlc`, when present.
    pub hlc: Option<Timestamp>,
    /// Everything that is not a special member.
    pub body: Body,
}

/// Members CouchDB computes on read; clients may echo them back, and they are then ignored.
const READ_ONLY_MEMBERS: &[&str] = &[
    "_conflicts",
    "_deleted_conflicts",
    "_revs_info",
    "_local_seq",
];

impl CouchDoc {
    /// Takes a CouchDB document apart, checking its special members.
    pub fn parse(value: Value) -> Result<CouchDoc, CouchDocError> {
        let Value::Object(mut map) = value else {
            return Err(CouchDocError::NotAnObject);
        };
        let id = match map.remove("_id") {
            None => None,
            Some(Value::String(id)) => Some(id),
            Some(_) => return Err(CouchDocError::BadId),
        };
        let rev = match map.remove("_rev") {
            None => None,
            Some(Value::String(text)) => Some(text.parse().map_err(|_| CouchDocError::BadRev)?),
            Some(_) => return Err(CouchDocError::BadRev),
        };
        let deleted = match map.remove("_deleted") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(deleted)) => deleted,
            Some(_) => return Err(CouchDocError::BadDeleted),
        };
        let revisions = map
            .remove("_revisions")
            .map(|value| parse_revisions(&value))
            .transpose()?;
        if let (Some(path), Some(rev)) = (&revisions, &rev)
            && path.first() != Some(rev)
        {
            return Err(CouchDocError::BadRevisions(
                "_revisions does not start with _rev",
            ));
        }
        let hlc = match map.remove("_ferry") {
            None => None,
            Some(ferry) => ferry
                .get("hlc")
                .and_then(Value::as_u64)
                .map(Timestamp::from_u64),
        };
        if let Some(attachments) = map.remove("_attachments")
            && attachments
                .as_object()
                .is_none_or(|stubs| !stubs.is_empty())
        {
            return Err(CouchDocError::Attachments);
        }
        for member in READ_ONLY_MEMBERS {
            map.remove(*member);
        }
        if let Some(key) = map.keys().find(|key| key.starts_with('_')) {
            return Err(CouchDocError::BadSpecialMember(key.clone()));
        }
        Ok(CouchDoc {
            id,
            rev,
            deleted,
            revisions,
            hlc,
            body: map,
        })
    }

    /// The revision path to merge for `new_edits=false`: `_revisions` if given, else `[_rev]`.
    pub fn path(&self) -> Option<Vec<Rev>> {
        self.revisions
            .clone()
            .or_else(|| self.rev.clone().map(|rev| vec![rev]))
    }
}

/// Parses `{"start": N, "ids": ["hash", ...]}` into a path, newest first.
pub fn parse_revisions(value: &Value) -> Result<Vec<Rev>, CouchDocError> {
    let start = value
        .get("start")
        .and_then(Value::as_u64)
        .ok_or(CouchDocError::BadRevisions(
            "start must be a positive integer",
        ))?;
    let ids = value
        .get("ids")
        .and_then(Value::as_array)
        .ok_or(CouchDocError::BadRevisions("ids must be an array"))?;
    if ids.is_empty() {
        return Err(CouchDocError::BadRevisions("ids must not be empty"));
    }
    if u64::try_from(ids.len()).map_or(true, |len| len > start) {
        return Err(CouchDocError::BadRevisions("more ids than generations"));
    }
    ids.iter()
        .zip(0u64..)
        .map(|(id, offset)| {
            let hash = id
                .as_str()
                .ok_or(CouchDocError::BadRevisions("ids must be strings"))?;
            Rev::new(start - offset, hash).map_err(|_| CouchDocError::BadRevisions("invalid id"))
        })
        .collect()
}

/// `{"start": N, "ids": [...]}` for a path, newest first.
pub fn revisions_json(path: &[Rev]) -> Value {
    json!({
        "start": path.first().map_or(0, Rev::generation),
        "ids": path.iter().map(Rev::hash).collect::<Vec<_>>(),
    })
}

/// What to add to a document when writing it out.
#[derive(Clone, Debug, Default)]
pub struct DocExtras<'a> {
    /// `_revisions`, from this path.
    pub revisions: Option<&'a [Rev]>,
    /// `_conflicts`.
    pub conflicts: Option<&'a [Rev]>,
    /// `_ferry.hlc`.
    pub hlc: Option<Timestamp>,
}

/// A document in CouchDB form: `_id`, `_rev`, `_deleted` when deleted, extras, then the body.
pub fn document_json(
    doc_id: &str,
    rev: &Rev,
    deleted: bool,
    body: &Body,
    extras: &DocExtras<'_>,
) -> Value {
    with_special_members(body.clone(), doc_id, rev, deleted, extras)
}

/// `body` with the special `_` members added (a body's own members never start with `_`).
fn with_special_members(
    mut map: Body,
    doc_id: &str,
    rev: &Rev,
    deleted: bool,
    extras: &DocExtras<'_>,
) -> Value {
    map.insert("_id".into(), Value::String(doc_id.to_owned()));
    map.insert("_rev".into(), Value::String(rev.to_string()));
    if deleted {
        map.insert("_deleted".into(), Value::Bool(true));
    }
    if let Some(path) = extras.revisions {
        map.insert("_revisions".into(), revisions_json(path));
    }
    if let Some(conflicts) = extras.conflicts.filter(|conflicts| !conflicts.is_empty()) {
        map.insert(
            "_conflicts".into(),
            conflicts
                .iter()
                .map(|rev| Value::String(rev.to_string()))
                .collect(),
        );
    }
    if let Some(hlc) = extras.hlc {
        map.insert("_ferry".into(), json!({ "hlc": hlc.as_u64() }));
    }
    Value::Object(map)
}

/// A replicated revision in CouchDB form, with `_revisions` (and `_ferry` when `with_hlc`).
pub fn revision_json(revision: &Revision, with_hlc: bool) -> Value {
    revision_into_json(revision.clone(), with_hlc)
}

/// [`revision_json`] taking the revision, so that its body becomes the document without a
/// copy.
pub fn revision_into_json(revision: Revision, with_hlc: bool) -> Value {
    let rev = revision.rev().clone();
    let Revision {
        doc_id,
        path,
        deleted,
        body,
        hlc,
    } = revision;
    let extras = DocExtras {
        revisions: Some(&path),
        conflicts: None,
        hlc: hlc.filter(|_| with_hlc),
    };
    with_special_members(body, &doc_id, &rev, deleted, &extras)
}

/// A replicated revision from its CouchDB form (as `_bulk_docs` with `new_edits=false` or
/// `_bulk_get` carries it).
pub fn revision_from_json(value: Value) -> Result<Revision, CouchDocError> {
    let doc = CouchDoc::parse(value)?;
    let path = doc.path().ok_or(CouchDocError::BadRev)?;
    Ok(Revision {
        doc_id: doc.id.ok_or(CouchDocError::BadId)?,
        path,
        deleted: doc.deleted,
        body: doc.body,
        hlc: doc.hlc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicated_revision_round_trips() {
        let revision = Revision {
            doc_id: "todos:1".into(),
            path: vec!["3-c".parse().unwrap(), "2-b".parse().unwrap()],
            deleted: true,
            body: json!({"x": 1}).as_object().unwrap().clone(),
            hlc: Some(Timestamp::new(5, 1)),
        };
        let value = revision_json(&revision, true);
        assert_eq!(value["_revisions"], json!({"start": 3, "ids": ["c", "b"]}));
        assert_eq!(revision_from_json(value).unwrap(), revision);
        let without_clock = revision_from_json(revision_json(&revision, false)).unwrap();
        assert_eq!(without_clock.hlc, None);
        assert_eq!(
            revision_into_json(revision.clone(), true),
            document_json(
                &revision.doc_id,
                revision.rev(),
                revision.deleted,
                &revision.body,
                &DocExtras {
                    revisions: Some(&revision.path),
                    conflicts: None,
                    hlc: revision.hlc,
                },
            ),
            "the same document as document_json writes"
        );
    }

    #[test]
    fn special_members_are_checked() {
        assert_eq!(
            CouchDoc::parse(json!({"_id": "a", "_secret": 1})),
            Err(CouchDocError::BadSpecialMember("_secret".into()))
        );
        assert_eq!(
            CouchDoc::parse(json!({"_id": "a", "_rev": "x"})),
            Err(CouchDocError::BadRev)
        );
        assert_eq!(
            CouchDoc::parse(
                json!({"_id": "a", "_rev": "2-b", "_revisions": {"start": 2, "ids": ["c"]}})
            ),
            Err(CouchDocError::BadRevisions(
                "_revisions does not start with _rev"
            ))
        );
        assert_eq!(
            CouchDoc::parse(json!({"_id": "a", "_attachments": {"f": {"data": "eA=="}}})),
            Err(CouchDocError::Attachments)
        );
        let echoed = CouchDoc::parse(json!({"_id": "a", "_conflicts": ["1-x"], "v": 1})).unwrap();
        assert_eq!(echoed.body, json!({"v": 1}).as_object().unwrap().clone());
    }

    #[test]
    fn revisions_must_fit_their_generations() {
        assert!(parse_revisions(&json!({"start": 1, "ids": ["a", "b"]})).is_err());
        assert!(parse_revisions(&json!({"start": 2, "ids": []})).is_err());
        assert!(parse_revisions(&json!({"start": 2, "ids": ["a/"]})).is_err());
        let path = parse_revisions(&json!({"start": 2, "ids": ["b", "a"]})).unwrap();
        assert_eq!(
            path,
            vec!["2-b".parse().unwrap(), "1-a".parse::<Rev>().unwrap()]
        );
    }
}
