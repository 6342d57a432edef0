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
//!
//! The bodies of the replication endpoints that carry no documents are types here too, used
//! by the server to answer and by `HttpPeer` to read: [`ChangesRow`] and [`ChangesAnswer`]
//! (`_changes`), [`RevsDiffAnswer`] (`_revs_diff`), [`BulkGetRequest`] and [`BulkGetAnswer`]
//! (`_bulk_get`), [`BulkDocsRow`] (`_bulk_docs`).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::hlc::Timestamp;
use crate::json::{JsonError, KeySeed, RawJson, check_within};
use crate::model::{Body, Revision};
use crate::replicate::{ChangeRow, Seq};
use crate::rev::Rev;

/// `{"rev": …}`, as a changes row lists a document's leaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevEntry {
    /// The revision.
    pub rev: Rev,
}

/// One row of a `_changes` answer. With `include_docs=true` the server adds the document
/// (`doc`); replication reads the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesRow {
    /// The sequence of the document's latest change.
    pub seq: Seq,
    /// The document.
    pub id: String,
    /// Its leaves (`style=all_docs`: the winner first), or its winner.
    pub changes: Vec<RevEntry>,
    /// Whether the winner is deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// The document, with `include_docs=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<Value>,
}

impl ChangesRow {
    /// The row as the replication state machine reads it.
    pub fn into_change_row(self) -> ChangeRow {
        ChangeRow {
            doc_id: self.id,
            seq: self.seq,
            revs: self.changes.into_iter().map(|entry| entry.rev).collect(),
            deleted: self.deleted,
        }
    }
}

/// A `_changes` answer (`feed=normal` or `longpoll`) as a replicator reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesAnswer {
    /// The rows, in sequence order.
    pub results: Vec<ChangesRow>,
    /// The sequence to continue after (CouchDB always sends it; without it, the last row's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<Seq>,
    /// How many changes remain after these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
}

/// One revision asked for in a `_bulk_get` request (`{"id", "rev"?}`; without `rev`, the
/// winner), as a Ferry server also lists those it left `unserved`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkGetItem {
    /// The document.
    pub id: String,
    /// The revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<Rev>,
}

/// A `_bulk_get` request body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkGetRequest {
    /// What is asked for.
    pub docs: Vec<BulkGetItem>,
}

/// A `_bulk_get` answer: a result per document asked for, and (Ferry's `max_bytes`
/// extension) what was left out to keep the answer within the bound, to ask for again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BulkGetAnswer {
    /// The results, in request order.
    pub results: Vec<BulkGetResult>,
    /// What the answer left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unserved: Vec<BulkGetItem>,
}

/// The revisions of one document in a `_bulk_get` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BulkGetResult {
    /// The document.
    pub id: String,
    /// Each revision asked for: found (`ok`, the document with `_revisions`) or not (`error`).
    pub docs: Vec<BulkGetDoc>,
}

/// One revision of a `_bulk_get` result: `{"ok": document}` or `{"error": {...}}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BulkGetDoc {
    /// The revision, as a CouchDB document's text ([`revision_from_text`] reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<RawJson>,
    /// Why it is not there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<BulkGetError>,
}

/// A revision a `_bulk_get` could not answer (every member optional when read: servers
/// differ in what they say).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BulkGetError {
    /// The document.
    pub id: String,
    /// The revision (`undefined` when the document has none), as text.
    pub rev: String,
    /// `not_found`.
    pub error: String,
    /// `missing`.
    pub reason: String,
}

impl BulkGetDoc {
    /// A revision found.
    pub fn found(document: RawJson) -> BulkGetDoc {
        BulkGetDoc {
            ok: Some(document),
            error: None,
        }
    }

    /// A revision (`None`: any) of `id` the database does not have.
    pub fn missing(id: &str, rev: Option<&Rev>) -> BulkGetDoc {
        BulkGetDoc {
            ok: None,
            error: Some(BulkGetError {
                id: id.to_owned(),
                rev: rev.map_or_else(|| "undefined".to_owned(), Rev::to_string),
                error: "not_found".to_owned(),
                reason: "missing".to_owned(),
            }),
        }
    }
}

/// The body of `POST /{db}/_changes`: the arguments of the filter that the query string's
/// `filter` names (`_doc_ids` or `_selector`). Other members are ignored, as CouchDB does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangesFilterBody {
    /// The documents `filter=_doc_ids` passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_ids: Option<Vec<String>>,
    /// The Mango selector `filter=_selector` matches winners against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Value>,
}

/// A `_bulk_docs` request: documents as their text, `new_edits` as CouchDB reads it (`false`:
/// replicated revisions stored as they are).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BulkDocsRequest {
    /// Whether the server makes new revisions of the documents (`true`) or stores the
    /// revisions given.
    pub new_edits: bool,
    /// The documents.
    pub docs: Vec<RawJson>,
}

/// One row of a `_bulk_docs` answer: a stored revision (`ok` with its `rev`), or a refusal
/// with CouchDB's `error` and `reason`. With `new_edits=false` servers list only refusals.
/// The revision is kept as text: a refusal from another server may name a revision this side
/// would not parse, and it is looked up among those sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkDocsRow {
    /// The document.
    pub id: String,
    /// The revision stored or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Set on a stored revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// The error code of a refusal (`forbidden`, `conflict`, `doc_validation`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl BulkDocsRow {
    /// A stored revision.
    pub fn stored(id: &str, rev: &Rev) -> BulkDocsRow {
        BulkDocsRow {
            id: id.to_owned(),
            rev: Some(rev.to_string()),
            ok: Some(true),
            ..BulkDocsRow::default()
        }
    }

    /// A refusal (of `rev`, when known).
    pub fn refused(id: &str, rev: Option<&Rev>, error: &str, reason: &str) -> BulkDocsRow {
        BulkDocsRow {
            id: id.to_owned(),
            rev: rev.map(Rev::to_string),
            error: Some(error.to_owned()),
            reason: Some(reason.to_owned()),
            ..BulkDocsRow::default()
        }
    }
}

/// What `_revs_diff` answers for one document: the revisions asked about that the database
/// lacks, and those it has that may be their ancestors. (The request is the document ids with
/// the revisions to ask about, `{"id": ["rev", …]}`.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevsDiffAnswer {
    /// The revisions the database lacks.
    pub missing: Vec<Rev>,
    /// Revisions it has that may be ancestors of the missing ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub possible_ancestors: Vec<Rev>,
}

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
    /// The document's text is not JSON, or not within the limits.
    #[error("{0}")]
    Json(#[from] JsonError),
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

/// The special members of a document, read one at a time: the same rules whether the
/// document arrives as a tree ([`CouchDoc::parse`]) or as text ([`revision_from_text`]).
#[derive(Default)]
struct SpecialMembers {
    id: Option<String>,
    rev: Option<Rev>,
    deleted: bool,
    revisions: Option<Vec<Rev>>,
    hlc: Option<Timestamp>,
}

impl SpecialMembers {
    /// Reads the member `key` (one that starts with `_`).
    fn read(&mut self, key: &str, value: Value) -> Result<(), CouchDocError> {
        match key {
            "_id" => match value {
                Value::String(id) => self.id = Some(id),
                _ => return Err(CouchDocError::BadId),
            },
            "_rev" => match value {
                Value::String(text) => {
                    self.rev = Some(text.parse().map_err(|_| CouchDocError::BadRev)?);
                }
                _ => return Err(CouchDocError::BadRev),
            },
            "_deleted" => {
                self.deleted = match value {
                    Value::Null => false,
                    Value::Bool(deleted) => deleted,
                    _ => return Err(CouchDocError::BadDeleted),
                }
            }
            "_revisions" => self.revisions = Some(parse_revisions(&value)?),
            "_ferry" => {
                self.hlc = value
                    .get("hlc")
                    .and_then(Value::as_u64)
                    .map(Timestamp::from_u64);
            }
            "_attachments" => {
                if value.as_object().is_none_or(|stubs| !stubs.is_empty()) {
                    return Err(CouchDocError::Attachments);
                }
            }
            read_only if READ_ONLY_MEMBERS.contains(&read_only) => {}
            _ => return Err(CouchDocError::BadSpecialMember(key.to_owned())),
        }
        Ok(())
    }

    /// The members once all are read, checked against each other.
    fn finish(self) -> Result<SpecialMembers, CouchDocError> {
        if let (Some(path), Some(rev)) = (&self.revisions, &self.rev)
            && path.first() != Some(rev)
        {
            return Err(CouchDocError::BadRevisions(
                "_revisions does not start with _rev",
            ));
        }
        Ok(self)
    }
}

/// The revision path to merge for `new_edits=false`: `_revisions` if given, else `[_rev]`.
fn replicated_path(revisions: Option<Vec<Rev>>, rev: Option<Rev>) -> Option<Vec<Rev>> {
    revisions.or_else(|| rev.map(|rev| vec![rev]))
}

impl CouchDoc {
    /// Takes a CouchDB document apart, checking its special members.
    pub fn parse(value: Value) -> Result<CouchDoc, CouchDocError> {
        let Value::Object(map) = value else {
            return Err(CouchDocError::NotAnObject);
        };
        let mut special = SpecialMembers::default();
        let mut body = Body::new();
        for (key, value) in map {
            if key.starts_with('_') {
                special.read(&key, value)?;
            } else {
                body.insert(key, value);
            }
        }
        let special = special.finish()?;
        Ok(CouchDoc {
            id: special.id,
            rev: special.rev,
            deleted: special.deleted,
            revisions: special.revisions,
            hlc: special.hlc,
            body,
        })
    }

    /// The revision path to merge for `new_edits=false`: `_revisions` if given, else `[_rev]`.
    pub fn path(&self) -> Option<Vec<Rev>> {
        replicated_path(self.revisions.clone(), self.rev.clone())
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

/// A replicated revision as the text of a CouchDB document: `_id`, `_rev`, `_deleted` when
/// deleted, `_revisions` when `with_revisions`, `_ferry` when `hlc` is given, then the
/// members of `body`, an
/// object's text as the store keeps it (no `_` members). Written around the body's text, not
/// through a tree: the store's text goes to the wire as it is.
///
/// ```
/// use ferry_core::couch::replicated_document;
/// use ferry_core::json::RawJson;
/// let body = RawJson::from_text(r#"{"title":"milk"}"#.to_owned()).unwrap();
/// let path = ["2-b".parse().unwrap(), "1-a".parse().unwrap()];
/// let doc = replicated_document("todos:1", &path, false, true, None, &body).unwrap();
/// assert_eq!(
///     doc.get(),
///     r#"{"_id":"todos:1","_rev":"2-b","_revisions":{"start":2,"ids":["b","a"]},"title":"milk"}"#
/// );
/// ```
pub fn replicated_document(
    doc_id: &str,
    path: &[Rev],
    deleted: bool,
    with_revisions: bool,
    hlc: Option<Timestamp>,
    body: &RawJson,
) -> Result<RawJson, CouchDocError> {
    use std::fmt::Write as _;
    let members = body
        .get()
        .trim_start()
        .strip_prefix('{')
        .ok_or(CouchDocError::NotAnObject)?
        .trim_start();
    let rev = path.first().ok_or(CouchDocError::BadRev)?;
    let mut text = String::with_capacity(body.len() + doc_id.len() + 48 + path.len() * 36);
    text.push_str(r#"{"_id":"#);
    text.push_str(&serde_json::to_string(doc_id).expect("a string serializes"));
    // Revision ids are digits, a dash and hex: nothing to escape.
    let _ = write!(text, r#","_rev":"{rev}""#);
    if deleted {
        text.push_str(r#","_deleted":true"#);
    }
    if with_revisions {
        let _ = write!(
            text,
            r#","_revisions":{{"start":{},"ids":["#,
            rev.generation()
        );
        for (index, rev) in path.iter().enumerate() {
            if index > 0 {
                text.push(',');
            }
            let _ = write!(text, r#""{}""#, rev.hash());
        }
        text.push_str("]}");
    }
    if let Some(hlc) = hlc {
        let _ = write!(text, r#","_ferry":{{"hlc":{}}}"#, hlc.as_u64());
    }
    if !members.starts_with('}') {
        text.push(',');
    }
    text.push_str(members);
    Ok(RawJson::from_text(text)?)
}

/// [`replicated_document`] of a revision, with `_ferry` when `with_hlc`.
pub fn revision_text(revision: &Revision, with_hlc: bool) -> RawJson {
    replicated_document(
        &revision.doc_id,
        &revision.path,
        revision.deleted,
        true,
        revision.hlc.filter(|_| with_hlc),
        &revision.body,
    )
    .expect("a revision has a path and an object body")
}

/// A replicated revision from its CouchDB document's text (as `_bulk_docs` with
/// `new_edits=false`, `_bulk_get` or a session frame carries it), checked as
/// [`parse_strict`](crate::json::parse_strict) checks (nesting at most `max_depth`).
///
/// ```
/// use ferry_core::couch::revision_from_text;
/// use ferry_core::json::RawJson;
/// let text = RawJson::from_text(
///     r#"{"_id":"todos:1","_rev":"2-b","_revisions":{"start":2,"ids":["b","a"]},"n":[1, 2]}"#
///         .to_owned(),
/// )
/// .unwrap();
/// let revision = revision_from_text(&text, 8).unwrap();
/// assert_eq!(revision.path.len(), 2);
/// assert_eq!(revision.body.get(), r#"{"n":[1, 2]}"#, "the body's text as it was sent");
/// ```
pub fn revision_from_text(text: &RawJson, max_depth: usize) -> Result<Revision, CouchDocError> {
    check_within(text.get().as_bytes(), max_depth, usize::MAX)?;
    revision_from_checked_text(text)
}

/// [`revision_from_text`] of a text already checked with [`check_within`] (a document inside
/// a frame that was checked whole): the body's members are copied out as their text, and only
/// the special members are parsed.
pub fn revision_from_checked_text(text: &RawJson) -> Result<Revision, CouchDocError> {
    if text.get().trim_start().as_bytes().first() != Some(&b'{') {
        return Err(CouchDocError::NotAnObject);
    }
    let members: DocumentMembers<'_> = serde_json::from_str(text.get())
        .map_err(|error| CouchDocError::Json(JsonError::Syntax(error.to_string())))?;
    let mut special = SpecialMembers::default();
    for (key, value) in members.special() {
        let value = serde_json::from_str(value.get())
            .map_err(|error| CouchDocError::Json(JsonError::Syntax(error.to_string())))?;
        special.read(key, value)?;
    }
    let SpecialMembers {
        id,
        rev,
        deleted,
        revisions,
        hlc,
    } = special.finish()?;
    Ok(Revision {
        path: replicated_path(revisions, rev).ok_or(CouchDocError::BadRev)?,
        doc_id: id.ok_or(CouchDocError::BadId)?,
        deleted,
        // Written by the serializer from checked text: not checked again.
        body: RawJson::of(&members),
        hlc,
    })
}

/// A JSON object's members in order, keys borrowed unless escaped, values as their text.
/// Serialized, it is the body: the object of the members that do not start with `_`.
struct DocumentMembers<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl DocumentMembers<'_> {
    fn special(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.0
            .iter()
            .filter(|(key, _)| key.starts_with('_'))
            .map(|(key, value)| (key.as_ref(), *value))
    }
}

impl Serialize for DocumentMembers<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0
                .iter()
                .filter(|(key, _)| !key.starts_with('_'))
                .map(|(key, value)| (key.as_ref(), *value)),
        )
    }
}

impl<'de> Deserialize<'de> for DocumentMembers<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> serde::de::Visitor<'de> for MembersVisitor {
            type Value = DocumentMembers<'de>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(access.size_hint().unwrap_or(8));
                while let Some(key) = access.next_key_seed(KeySeed)? {
                    members.push((key, access.next_value::<&'de RawValue>()?));
                }
                Ok(DocumentMembers(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_answers_of_couchdb_3_with_opaque_sequences_are_read() {
        let text = r#"{"results":[
            {"seq":"1-g1AAAAFR","id":"a","changes":[{"rev":"2-b"},{"rev":"2-a"}]},
            {"seq":"2-g1AAAAFS","id":"b","changes":[{"rev":"1-c"}],"deleted":true}
        ],"last_seq":"2-g1AAAAFS","pending":0}"#;
        let answer: ChangesAnswer = serde_json::from_str(text).unwrap();
        assert_eq!(answer.last_seq, Some(Seq::Opaque("2-g1AAAAFS".into())));
        let rows: Vec<ChangeRow> = answer
            .results
            .into_iter()
            .map(ChangesRow::into_change_row)
            .collect();
        assert_eq!(
            rows[0].revs,
            ["2-b".parse::<Rev>().unwrap(), "2-a".parse().unwrap()]
        );
        assert!(!rows[0].deleted && rows[1].deleted);
        assert_eq!(rows[1].seq.to_string(), "2-g1AAAAFS");
        // BigCouch's array sequences are kept as their JSON text, to be sent back as such.
        let old: ChangesRow =
            serde_json::from_str(r#"{"seq":[3,"g1AA"],"id":"c","changes":[{"rev":"1-d"}]}"#)
                .unwrap();
        assert_eq!(old.seq.to_string(), r#"[3,"g1AA"]"#);
        // What no feed sends is refused.
        assert!(
            serde_json::from_str::<ChangesRow>(r#"{"seq":null,"id":"c","changes":[]}"#).is_err()
        );
        assert!(serde_json::from_str::<ChangesRow>(r#"{"seq":-1,"id":"c","changes":[]}"#).is_err());
    }

    #[test]
    fn a_revs_diff_answer_lists_possible_ancestors_only_when_there_are_some() {
        let answer = RevsDiffAnswer {
            missing: vec!["2-b".parse().unwrap()],
            possible_ancestors: Vec::new(),
        };
        assert_eq!(
            serde_json::to_value(&answer).unwrap(),
            json!({"missing": ["2-b"]})
        );
        let read: RevsDiffAnswer =
            serde_json::from_value(json!({"missing": ["3-c"], "possible_ancestors": ["2-b"]}))
                .unwrap();
        assert_eq!(read.possible_ancestors, ["2-b".parse::<Rev>().unwrap()]);
    }

    #[test]
    fn a_replicated_revision_round_trips() {
        let revision = Revision {
            doc_id: "todos:1".into(),
            path: vec!["3-c".parse().unwrap(), "2-b".parse().unwrap()],
            deleted: true,
            body: RawJson::of(&json!({"x": 1})),
            hlc: Some(Timestamp::new(5, 1)),
        };
        let text = revision_text(&revision, true);
        let value: Value = serde_json::from_str(text.get()).unwrap();
        assert_eq!(value["_revisions"], json!({"start": 3, "ids": ["c", "b"]}));
        assert!(
            text.get().contains(r#""_revisions":{"start":3,"#),
            "start first, as CouchDB"
        );
        assert_eq!(revision_from_text(&text, 8).unwrap(), revision);
        let without_clock = revision_from_text(&revision_text(&revision, false), 8).unwrap();
        assert_eq!(without_clock.hlc, None);
        assert_eq!(
            value,
            document_json(
                &revision.doc_id,
                revision.rev(),
                revision.deleted,
                &revision.parse_body().unwrap(),
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

    /// A document read as text (the session, `_bulk_get`) and as a tree (HTTP) meets the
    /// same rules with the same errors, and gives the same revision.
    #[test]
    fn reading_text_and_reading_a_tree_agree() {
        let documents = [
            r#"{"_id":"a","_rev":"2-b","_revisions":{"start":2,"ids":["b","a"]},"v":{"w":[1,2]}}"#,
            r#"{"v":1,"_rev":"1-a","_id":"a","_conflicts":["1-x"],"_ferry":{"hlc":77}}"#,
            r#"{"_id":"a","_rev":"1-a","_deleted":true}"#,
            r#"{"_id":"a","_rev":"1-a","\u005fsecret":1}"#,
            r#"{"_id":"a","_rev":"1-a","k\u00e9y":"\u00e9"}"#,
            r#"{"_id":"a","_rev":"x"}"#,
            r#"{"_id":7,"_rev":"1-a"}"#,
            r#"{"_rev":"1-a"}"#,
            r#"{"_id":"a"}"#,
            r#"{"_id":"a","_rev":"1-a","_deleted":"yes"}"#,
            r#"{"_id":"a","_rev":"2-b","_revisions":{"start":2,"ids":["c"]}}"#,
            r#"{"_id":"a","_rev":"1-a","_attachments":{"f":{"data":"eA=="}}}"#,
            r#"{"_id":"a","_rev":"1-a","_attachments":{}}"#,
            r#"[1]"#,
        ];
        for document in documents {
            let text = RawJson::from_text(document.to_owned()).unwrap();
            let from_text = revision_from_text(&text, 8);
            let from_tree =
                CouchDoc::parse(serde_json::from_str(document).unwrap()).and_then(|doc| {
                    Ok(Revision {
                        path: doc.path().ok_or(CouchDocError::BadRev)?,
                        doc_id: doc.id.ok_or(CouchDocError::BadId)?,
                        deleted: doc.deleted,
                        body: RawJson::canonical_object(&doc.body),
                        hlc: doc.hlc,
                    })
                });
            match (from_text, from_tree) {
                (Ok(text), Ok(tree)) => {
                    assert_eq!(text.parse_body(), tree.parse_body(), "{document}");
                    assert_eq!(
                        (text.doc_id, text.path, text.deleted, text.hlc),
                        (tree.doc_id, tree.path, tree.deleted, tree.hlc),
                        "{document}"
                    );
                }
                (text, tree) => assert_eq!(text.map(drop), tree.map(drop), "{document}"),
            }
        }
    }

    /// The body of a document read as text is its members' text, escapes and spacing kept,
    /// and what the text path refuses to check is refused before anything is read.
    #[test]
    fn a_body_read_as_text_keeps_its_members_as_sent() {
        let text = RawJson::from_text(
            r#"{"b": [1, 2], "_id":"a", "_rev":"1-a", "k\"ey": {"x" : "\u00e9"}}"#.to_owned(),
        )
        .unwrap();
        let revision = revision_from_text(&text, 8).unwrap();
        assert_eq!(
            revision.body.get(),
            r#"{"b":[1, 2],"k\"ey":{"x" : "\u00e9"}}"#
        );
        let duplicate = RawJson::from_text(r#"{"_id":"a","_rev":"1-a","v":1,"v":2}"#.to_owned());
        assert!(matches!(
            revision_from_text(&duplicate.unwrap(), 8),
            Err(CouchDocError::Json(JsonError::DuplicateKey(_)))
        ));
        let deep = RawJson::from_text(r#"{"_id":"a","_rev":"1-a","v":[[1]]}"#.to_owned());
        assert!(matches!(
            revision_from_text(&deep.unwrap(), 2),
            Err(CouchDocError::Json(JsonError::TooDeep(2)))
        ));
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
