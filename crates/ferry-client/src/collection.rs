//! Collections: typed (serde) or raw (`serde_json::Value`) access to documents, queries and
//! watch streams.

use std::marker::PhantomData;

use ferry_core::json::merge_patch;
use ferry_core::model::{Body, Document, doc_id_in};
use ferry_core::rev::Rev;
use ferry_core::selector::Selector;
use ferry_store::Edit;
use ferry_store::endpoint::{Batch, Refusal};
use futures_util::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{ClientError, Ferry};

/// A document read from a collection.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Doc<T> {
    /// The document's id within its collection.
    pub id: String,
    /// The winning revision.
    pub rev: Rev,
    /// The winning version's content.
    pub value: T,
    /// Revisions of concurrent versions that lost (the document is in conflict if any).
    pub conflicts: Vec<Rev>,
}

/// The documents of one collection, as values of type `T`.
///
/// ```
/// # fn main() -> Result<(), ferry_client::ClientError> {
/// # let dir = tempfile::tempdir().unwrap();
/// let ferry = ferry_client::Ferry::initialize_offline(dir.path().join("a.ferry"), "ann")?;
/// let notes = ferry.collection::<serde_json::Value>("notes");
/// let note = notes.insert_with_id("first", &serde_json::json!({"text": "hello"}))?;
/// assert_eq!(notes.get("first")?.unwrap().rev, note.rev);
/// notes.delete("first")?;
/// assert!(notes.get("first")?.is_none());
/// # Ok(())
/// # }
/// ```
pub struct Collection<T> {
    ferry: Ferry,
    name: String,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Collection<T> {
    fn clone(&self) -> Self {
        Collection {
            ferry: self.ferry.clone(),
            name: self.name.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> Collection<T> {
    pub(crate) fn new(ferry: Ferry, name: &str) -> Collection<T> {
        Collection {
            ferry,
            name: name.to_owned(),
            _type: PhantomData,
        }
    }

    /// The collection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn ferry(&self) -> &Ferry {
        &self.ferry
    }
}

impl<T: Serialize + DeserializeOwned> Collection<T> {
    fn doc_id(&self, id: &str) -> String {
        doc_id_in(&self.name, id)
    }

    /// The value as a document body. The rules a body must follow are checked where every
    /// write enters the store (`ferry_store::endpoint`).
    pub(crate) fn to_body(value: &T) -> Result<Body, ClientError> {
        match serde_json::to_value(value)? {
            Value::Object(body) => Ok(body),
            _ => Err(ClientError::InvalidDocument(
                "a document must serialize to a JSON object".into(),
            )),
        }
    }

    fn to_doc(&self, document: Document) -> Result<Doc<T>, ClientError> {
        let id = document
            .doc_id
            .strip_prefix(&format!("{}:", self.name))
            .unwrap_or(&document.doc_id)
            .to_owned();
        Ok(Doc {
            id,
            rev: document.rev,
            value: serde_json::from_value(Value::Object(document.body))?,
            conflicts: document.conflicts,
        })
    }

    fn write(&self, edit: Edit) -> Result<Rev, ClientError> {
        let doc_id = edit.doc_id.clone();
        let base = edit.base.clone();
        let result = self
            .ferry
            .endpoint(|endpoint| endpoint.write_edits(vec![edit]))?
            .remove(0);
        result.map_err(|refusal| match refusal {
            Refusal::Conflict(_) => ClientError::Conflict {
                collection: self.name.clone(),
                id: doc_id
                    .split_once(':')
                    .map_or(doc_id.as_str(), |(_, id)| id)
                    .to_owned(),
                expected: base.map_or_else(|| "none".to_owned(), |rev| rev.to_string()),
            },
            other => ClientError::InvalidDocument(other.to_string()),
        })
    }

    fn current(&self, id: &str) -> Result<Option<Document>, ClientError> {
        Ok(self
            .ferry
            .database()
            .get_document(&self.doc_id(id))?
            .filter(|document| !document.deleted))
    }

    fn not_found(&self, id: &str) -> ClientError {
        ClientError::NotFound {
            collection: self.name.clone(),
            id: id.to_owned(),
        }
    }

    /// Stores a new document under a fresh UUIDv7 id (time-ordered, unique without a server).
    pub fn insert(&self, value: &T) -> Result<Doc<T>, ClientError> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        self.insert_with_id(&id, value)
    }

    /// Stores a new document under `id`; fails if a live document has that id. An id whose
    /// document was deleted can be used again: the new document's history starts after the
    /// deletion, so every replica can tell it from the old one.
    pub fn insert_with_id(&self, id: &str, value: &T) -> Result<Doc<T>, ClientError> {
        let doc_id = self.doc_id(id);
        let body = Self::to_body(value)?;
        // The returned value is read back from what was stored, so it is exactly what every
        // replica will see (serde round trip included), and `T` need not be `Clone`.
        let stored = T::deserialize(&body)?;
        let rev = self
            .write(Edit::put(doc_id, None, body))
            .map_err(|error| match error {
                ClientError::Conflict { collection, id, .. } => {
                    ClientError::AlreadyExists { collection, id }
                }
                other => other,
            })?;
        Ok(Doc {
            id: id.to_owned(),
            rev,
            value: stored,
            conflicts: Vec::new(),
        })
    }

    /// Stores many new documents (fresh UUIDv7 ids) in one transaction: one disk flush for
    /// the whole batch instead of one per document. All are stored, or none (on any invalid
    /// value).
    ///
    /// ```
    /// # let ferry = ferry_client::Ferry::temporary("ann").unwrap();
    /// let notes = ferry.collection::<serde_json::Value>("notes");
    /// let values: Vec<_> = (0..3).map(|n| serde_json::json!({"n": n})).collect();
    /// assert_eq!(notes.insert_many(&values).unwrap().len(), 3);
    /// assert_eq!(ferry.status().unwrap().pending, 3);
    /// ```
    pub fn insert_many(&self, values: &[T]) -> Result<Vec<Doc<T>>, ClientError> {
        let mut edits = Vec::with_capacity(values.len());
        let mut docs = Vec::with_capacity(values.len());
        for value in values {
            let id = uuid::Uuid::now_v7().simple().to_string();
            let doc_id = self.doc_id(&id);
            let body = Self::to_body(value)?;
            let stored = T::deserialize(&body)?;
            edits.push(Edit::put(doc_id, None, body));
            docs.push((id, stored));
        }
        let results = self
            .ferry
            .endpoint(|endpoint| endpoint.write_edit_batch(edits, Batch::AllOrNothing))?;
        docs.into_iter()
            .zip(results)
            .map(|((id, value), result)| {
                let rev = result.map_err(|_| ClientError::AlreadyExists {
                    collection: self.name.clone(),
                    id: id.clone(),
                })?;
                Ok(Doc {
                    id,
                    rev,
                    value,
                    conflicts: Vec::new(),
                })
            })
            .collect()
    }

    /// The current version of a document, or `None` if it does not exist or was deleted.
    pub fn get(&self, id: &str) -> Result<Option<Doc<T>>, ClientError> {
        self.current(id)?
            .map(|document| self.to_doc(document))
            .transpose()
    }

    /// Replaces the current version of a document with `value`.
    pub fn replace(&self, id: &str, value: &T) -> Result<Doc<T>, ClientError> {
        let current = self.current(id)?.ok_or_else(|| self.not_found(id))?;
        self.replace_at(id, &current.rev, value)
    }

    /// Replaces revision `rev` of a document, failing with [`ClientError::Conflict`] if the
    /// document changed since (optimistic concurrency). Writing on a conflicting revision is
    /// allowed: that is how a losing version is carried on.
    pub fn replace_at(&self, id: &str, rev: &Rev, value: &T) -> Result<Doc<T>, ClientError> {
        let doc_id = self.doc_id(id);
        let body = Self::to_body(value)?;
        self.write(Edit::put(doc_id, Some(rev.clone()), body))?;
        self.get(id)?.ok_or_else(|| self.not_found(id))
    }

    /// Applies a JSON merge patch (RFC 7396) to the current version: fields in `patch` are
    /// set, `null` removes a field, nested objects merge.
    pub fn patch(&self, id: &str, patch: &Value) -> Result<Doc<T>, ClientError> {
        let current = self.current(id)?.ok_or_else(|| self.not_found(id))?;
        let mut merged = Value::Object(current.body);
        merge_patch(&mut merged, patch);
        // Check the result against the type before storing it.
        let value: T = serde_json::from_value(merged)?;
        self.replace_at(id, &current.rev, &value)
    }

    /// Deletes a document; returns false if there was nothing to delete.
    pub fn delete(&self, id: &str) -> Result<bool, ClientError> {
        let Some(current) = self.current(id)? else {
            return Ok(false);
        };
        self.write(Edit::delete(self.doc_id(id), current.rev))?;
        Ok(true)
    }

    /// Creates (if missing) an index on a field, so queries filtering or sorting on it are
    /// fast.
    pub fn ensure_index(&self, field: &str) -> Result<(), ClientError> {
        Ok(self.ferry.database().ensure_index(&self.name, field)?)
    }

    /// A query over this collection, matching everything until filtered.
    pub fn query(&self) -> Query<T> {
        Query {
            collection: self.clone(),
            selector: Selector::everything(),
            sort: Vec::new(),
            limit: usize::MAX,
        }
    }

    /// A stream of a document's versions: the current one first (`None` if absent), then a
    /// new item each time it changes, from any writer.
    pub fn watch(
        &self,
        id: &str,
    ) -> impl Stream<Item = Result<Option<Doc<T>>, ClientError>> + use<T>
    where
        T: Send + 'static,
    {
        let collection = self.clone();
        let id = id.to_owned();
        watch_values(self.ferry.clone(), move || {
            let current = collection.current(&id)?;
            let key = current
                .as_ref()
                .map(|document| (document.rev.clone(), document.conflicts.clone()));
            Ok((
                key,
                current
                    .map(|document| collection.to_doc(document))
                    .transpose()?,
            ))
        })
    }
}

/// A query over one collection: a Mango selector, sort fields and a limit.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir().unwrap();
/// # let ferry = ferry_client::Ferry::initialize_offline(dir.path().join("a.ferry"), "ann")?;
/// use serde_json::json;
/// let todos = ferry.collection::<serde_json::Value>("todos");
/// for n in 0..5 {
///     todos.insert_with_id(&n.to_string(), &json!({"n": n, "done": n % 2 == 0}))?;
/// }
/// let open = todos.query().filter(&json!({"done": false}))?.sort_desc("n").run()?;
/// let ns: Vec<_> = open.iter().map(|doc| doc.value["n"].clone()).collect();
/// assert_eq!(ns, [json!(3), json!(1)]);
/// # Ok(())
/// # }
/// ```
pub struct Query<T> {
    collection: Collection<T>,
    selector: Selector,
    sort: Vec<(String, bool)>,
    limit: usize,
}

impl<T> Clone for Query<T> {
    fn clone(&self) -> Self {
        Query {
            collection: self.collection.clone(),
            selector: self.selector.clone(),
            sort: self.sort.clone(),
            limit: self.limit,
        }
    }
}

impl<T: Serialize + DeserializeOwned> Query<T> {
    /// Keeps documents matching a Mango selector (`{"done": false, "n": {"$gt": 3}}`).
    pub fn filter(mut self, selector: &Value) -> Result<Query<T>, ClientError> {
        let parsed = Selector::parse(selector)
            .map_err(|error| ClientError::InvalidQuery(error.to_string()))?;
        self.selector = match self.selector {
            Selector::And(mut parts) if !parts.is_empty() => {
                parts.push(parsed);
                Selector::And(parts)
            }
            Selector::And(_) => parsed,
            existing => Selector::And(vec![existing, parsed]),
        };
        Ok(self)
    }

    /// Sorts by a field (dotted path), ascending.
    pub fn sort(mut self, field: &str) -> Query<T> {
        self.sort.push((field.to_owned(), false));
        self
    }

    /// Sorts by a field (dotted path), descending.
    pub fn sort_desc(mut self, field: &str) -> Query<T> {
        self.sort.push((field.to_owned(), true));
        self
    }

    /// Returns at most `limit` documents.
    pub fn limit(mut self, limit: usize) -> Query<T> {
        self.limit = limit;
        self
    }

    /// Runs the query on the local replica.
    pub fn run(&self) -> Result<Vec<Doc<T>>, ClientError> {
        let documents = self
            .collection
            .ferry
            .database()
            .query(&ferry_store::Query {
                collection: self.collection.name.clone(),
                selector: self.selector.clone(),
                sort: self.sort.clone(),
                skip: 0,
                limit: self.limit,
            })?;
        documents
            .into_iter()
            .map(|document| self.collection.to_doc(document))
            .collect()
    }

    /// A live query: the results now, then again each time a change alters them.
    pub fn watch(&self) -> impl Stream<Item = Result<Vec<Doc<T>>, ClientError>> + use<T>
    where
        T: Send + 'static,
    {
        let query = self.clone();
        watch_values(self.collection.ferry.clone(), move || {
            let results = query.run()?;
            let key: Vec<(String, Rev, usize)> = results
                .iter()
                .map(|doc| (doc.id.clone(), doc.rev.clone(), doc.conflicts.len()))
                .collect();
            Ok((key, results))
        })
    }
}

/// A stream that reads a value now and after every change of the replica, and yields it
/// whenever its `key` (what identifies the version shown) differs from the last one yielded.
/// The reads are store calls: they run on tokio's blocking threads, not on the executor.
pub(crate) fn watch_values<K: PartialEq + Send + 'static, V: Send + 'static>(
    ferry: Ferry,
    read: impl Fn() -> Result<(K, V), ClientError> + Send + Sync + 'static,
) -> impl Stream<Item = Result<V, ClientError>> {
    let changes = ferry.subscribe();
    let read = std::sync::Arc::new(read);
    futures_util::stream::unfold(
        (changes, None::<K>, true),
        move |(mut changes, last, first)| {
            let (ferry, read) = (ferry.clone(), read.clone());
            async move {
                // A stream made outside a runtime starts the cross-process poller here.
                ferry.ensure_poller();
                let mut last = last;
                let mut first = first;
                loop {
                    if !first && changes.changed().await.is_err() {
                        return None;
                    }
                    first = false;
                    let read = read.clone();
                    let outcome = match ferry.blocking(move |_| read()).await {
                        Ok(outcome) => outcome,
                        Err(error) => Err(ClientError::Sync(error)),
                    };
                    match outcome {
                        Ok((key, value)) => {
                            if last.as_ref() != Some(&key) {
                                return Some((Ok(value), (changes, Some(key), false)));
                            }
                            last = Some(key);
                        }
                        Err(error) => return Some((Err(error), (changes, last, false))),
                    }
                }
            }
        },
    )
}
