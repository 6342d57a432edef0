//! Conflicts as the application sees them: listing and reading every version, resolving by
//! hand, automatic policies per collection (including the application's own function), and
//! events when conflicts appear and are resolved.
//!
//! Automatic resolution on the client runs after every pulled batch and whenever
//! [`Ferry::resolve_conflicts`] is called: it scans the changes it has not looked at yet, so
//! conflicts made by another process on the same replica are caught too. Policies are
//! deterministic (see `ferry_core::resolve`), so a client and the server configured alike
//! write the same resolution revisions. A custom function must be deterministic as well
//! (depend only on the versions it is given) for replicas to agree.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_core::hlc::Timestamp;
use ferry_core::model::{Body, collection_of, doc_id_in};
use ferry_core::resolve::{self, Overridden, Policy, ResolutionRecord, resolve_with};
use ferry_core::rev::Rev;
use ferry_store::{Database, StoreError};
use futures_util::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::{ClientError, Collection, Doc, Ferry};

/// One version of a conflicted document.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Version<T> {
    /// Its revision.
    pub rev: Rev,
    /// When it was written (hybrid logical clock).
    pub hlc: Timestamp,
    /// Its content.
    pub value: T,
}

/// The last version every conflicting version descends from.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Ancestor<T> {
    /// Its revision.
    pub rev: Rev,
    /// Its content, unless old bodies were compacted away.
    pub value: Option<T>,
}

/// A document with concurrent versions.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Conflict<T> {
    /// The document's id in its collection.
    pub id: String,
    /// Every live version, the current winner first.
    pub versions: Vec<Version<T>>,
    /// Their common ancestor, if their histories meet in what this replica keeps.
    pub ancestor: Option<Ancestor<T>>,
}

/// How the application settles a conflict by hand.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Resolve<T> {
    /// Keep this version's content.
    Keep(Rev),
    /// Write this content (a merge the application made).
    Value(T),
}

/// A resolver function supplied by the application: given every version (as JSON), the
/// resolved content, or `None` to leave the conflict for later.
pub type CustomResolver = Arc<dyn Fn(&Conflict<Value>) -> Option<Value> + Send + Sync>;

/// How a collection's conflicts are resolved on this replica.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum ConflictPolicy {
    /// Left for the application ([`Collection::resolve`]). The default.
    #[default]
    Keep,
    /// The latest write wins whole (hybrid logical clock, then revision).
    LastWriteWins,
    /// Field-level three-way merge; last write wins per field changed on several sides.
    Merge,
    /// The application's function.
    Custom(CustomResolver),
}

impl ConflictPolicy {
    /// A policy running `resolver` on each conflict.
    ///
    /// ```
    /// use ferry_client::ConflictPolicy;
    /// // Keep the version with the most items in its list.
    /// let policy = ConflictPolicy::custom(|conflict| {
    ///     conflict
    ///         .versions
    ///         .iter()
    ///         .max_by_key(|v| v.value["items"].as_array().map_or(0, Vec::len))
    ///         .map(|v| v.value.clone())
    /// });
    /// ```
    pub fn custom(
        resolver: impl Fn(&Conflict<Value>) -> Option<Value> + Send + Sync + 'static,
    ) -> ConflictPolicy {
        ConflictPolicy::Custom(Arc::new(resolver))
    }

    fn name(&self) -> &'static str {
        match self {
            ConflictPolicy::Keep => "keep",
            ConflictPolicy::LastWriteWins => "last-write-wins",
            ConflictPolicy::Merge => "merge",
            ConflictPolicy::Custom(_) => "custom",
        }
    }
}

impl std::fmt::Debug for ConflictPolicy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

impl From<Policy> for ConflictPolicy {
    fn from(policy: Policy) -> ConflictPolicy {
        match policy {
            Policy::Keep => ConflictPolicy::Keep,
            Policy::LastWriteWins => ConflictPolicy::LastWriteWins,
            Policy::Merge => ConflictPolicy::Merge,
        }
    }
}

/// Something that happened to a conflict on this replica.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConflictEvent {
    /// A document got concurrent versions that no policy resolved.
    Appeared {
        /// The collection.
        collection: String,
        /// The document's id in it.
        id: String,
        /// Every live version.
        versions: Vec<Rev>,
    },
    /// A conflict was resolved here.
    Resolved {
        /// The collection.
        collection: String,
        /// The document's id in it.
        id: String,
        /// `keep`, `last-write-wins`, `merge`, `custom` or `application`.
        policy: String,
        /// The revision holding the resolved content.
        resolved: Rev,
        /// Values that were not kept (their versions stay readable until compaction).
        overridden: Vec<Overridden>,
    },
}

/// The local document holding the replica's named conflict policies, by collection.
const POLICIES_DOC: &str = "ferry-conflict-policies";

/// Conflict handling state shared by a replica's handles.
pub(crate) struct ConflictState {
    policies: Mutex<HashMap<String, ConflictPolicy>>,
    /// The replica sequence up to which changes were examined for conflicts.
    scanned: Mutex<u64>,
    events: broadcast::Sender<ConflictEvent>,
}

impl ConflictState {
    pub(crate) fn new() -> ConflictState {
        ConflictState {
            policies: Mutex::new(HashMap::new()),
            scanned: Mutex::new(0),
            events: broadcast::channel(1024).0,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn own_id(collection: &str, doc_id: &str) -> String {
    doc_id
        .strip_prefix(collection)
        .and_then(|rest| rest.strip_prefix(':'))
        .unwrap_or(doc_id)
        .to_owned()
}

fn typed_conflict<T: DeserializeOwned>(
    id: String,
    conflict: &resolve::Conflict,
) -> Result<Conflict<T>, ClientError> {
    let mut versions = conflict
        .versions
        .iter()
        .map(|version| {
            Ok(Version {
                rev: version.rev.clone(),
                hlc: version.hlc,
                value: T::deserialize(&version.body)?,
            })
        })
        .collect::<Result<Vec<_>, ClientError>>()?;
    versions.sort_by(|a, b| b.rev.cmp(&a.rev));
    let ancestor = match &conflict.ancestor {
        Some((rev, body)) => Some(Ancestor {
            rev: rev.clone(),
            value: body.as_ref().map(T::deserialize).transpose()?,
        }),
        None => None,
    };
    Ok(Conflict {
        id,
        versions,
        ancestor,
    })
}

impl Ferry {
    /// Resolves `collection`'s conflicts on this replica by `policy` from now on: those pulled
    /// revisions create as each batch is stored, and those already present at the next
    /// [`Ferry::resolve_conflicts`].
    ///
    /// A named policy (`Keep`, `LastWriteWins`, `Merge`) is kept in the replica: every process
    /// on the replica file (the one that syncs among them) and every later opening resolves by
    /// it. A [`ConflictPolicy::Custom`] function lives in this process only; elsewhere the
    /// collection's conflicts are kept for it ([`Ferry::resolve_conflicts`] here settles them).
    ///
    /// ```
    /// use ferry_client::{ConflictPolicy, Ferry};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("notes.ferry");
    /// let ferry = Ferry::initialize_offline(&path, "ann").unwrap();
    /// ferry.set_conflict_policy("todos", ConflictPolicy::Merge).unwrap();
    /// drop(ferry);
    /// let reopened = Ferry::initialize_offline(&path, "ann").unwrap();
    /// assert!(matches!(reopened.conflict_policy("todos").unwrap(), ConflictPolicy::Merge));
    /// ```
    pub fn set_conflict_policy(
        &self,
        collection: &str,
        policy: ConflictPolicy,
    ) -> Result<(), ClientError> {
        let name = policy.name();
        self.update_local(POLICIES_DOC, |body| {
            if body.get(collection).and_then(Value::as_str) == Some(name) {
                return Ok(false);
            }
            body.insert(collection.to_owned(), Value::from(name));
            Ok(true)
        })?;
        lock(&self.inner.conflicts.policies).insert(collection.to_owned(), policy);
        // Look at every document again: existing conflicts fall under the new policy.
        *lock(&self.inner.conflicts.scanned) = 0;
        Ok(())
    }

    /// The policy resolving `collection`'s conflicts in this process: the one it set, else
    /// the one kept in the replica (a custom function set by another process reads as
    /// [`ConflictPolicy::Keep`] here), else `Keep`.
    pub fn conflict_policy(&self, collection: &str) -> Result<ConflictPolicy, ClientError> {
        if let Some(policy) = lock(&self.inner.conflicts.policies).get(collection) {
            return Ok(policy.clone());
        }
        let stored = self.inner.db.get_local(POLICIES_DOC)?;
        let name = stored
            .as_ref()
            .and_then(|doc| doc.body.get(collection))
            .and_then(Value::as_str);
        Ok(match name {
            Some("last-write-wins") => ConflictPolicy::LastWriteWins,
            Some("merge") => ConflictPolicy::Merge,
            _ => ConflictPolicy::Keep,
        })
    }

    /// Compacts the local replica: drops the bodies of old ancestors and of versions superseded
    /// by resolutions (see `ferry_store::Database::compact`); returns how many were dropped.
    pub fn compact(&self) -> Result<u64, ClientError> {
        Ok(self.database().compact()?)
    }

    /// Conflict events from now on, as a stream (a subscriber more than 1,024 events behind
    /// skips the oldest).
    pub fn conflict_events(&self) -> impl Stream<Item = ConflictEvent> + Send + 'static {
        crate::broadcast_stream(self.inner.conflicts.events.subscribe())
    }

    /// Examines the changes not examined yet: resolves conflicts by their collection's policy
    /// and reports the others ([`ConflictEvent::Appeared`]). Sync resolves what each pulled
    /// batch brings as it stores it; call this after opening a replica or changing a policy to
    /// apply the policies to what is there. Returns how many conflicts were resolved.
    pub fn resolve_conflicts(&self) -> Result<usize, ClientError> {
        let since = *lock(&self.inner.conflicts.scanned);
        let (through, resolved) = self.endpoint(|endpoint| endpoint.settle_conflicts(since))?;
        let mut scanned = lock(&self.inner.conflicts.scanned);
        *scanned = (*scanned).max(through);
        Ok(resolved)
    }

    /// Tells conflict event subscribers about a resolution this replica wrote.
    fn announce_resolution(&self, collection: String, id: String, record: ResolutionRecord) {
        let _ = self.inner.conflicts.events.send(ConflictEvent::Resolved {
            collection,
            id,
            policy: record.policy,
            resolved: record.resolved,
            overridden: record.overridden,
        });
    }

    /// Resolves one conflicted document by its collection's policy, and tells conflict event
    /// subscribers what happened; the record of the resolution written.
    pub(crate) fn resolve_automatically(
        &self,
        doc_id: &str,
    ) -> Result<Option<ResolutionRecord>, ClientError> {
        let collection = collection_of(doc_id).to_owned();
        let policy = self.conflict_policy(&collection)?;
        let db = self.database();
        let record = match &policy {
            ConflictPolicy::Keep => None,
            ConflictPolicy::LastWriteWins => {
                ferry_store::resolve_conflict(db, doc_id, Policy::LastWriteWins)?
            }
            ConflictPolicy::Merge => ferry_store::resolve_conflict(db, doc_id, Policy::Merge)?,
            ConflictPolicy::Custom(resolver) => {
                let Some(conflict) = db.conflict(doc_id)? else {
                    return Ok(None);
                };
                let view = typed_conflict::<Value>(own_id(&collection, doc_id), &conflict)?;
                match resolver(&view) {
                    Some(Value::Object(body)) => match resolve_with(&conflict, body) {
                        Ok(mut resolution) => {
                            resolution.record.policy = "custom".into();
                            db.apply_resolution(doc_id, &resolution)?
                                .map(|_| resolution.record)
                        }
                        Err(error) => {
                            tracing::warn!(%doc_id, %error, "conflict kept");
                            None
                        }
                    },
                    Some(_) => {
                        tracing::warn!(%doc_id, "the custom resolver returned a non-object; conflict kept");
                        None
                    }
                    None => None,
                }
            }
        };
        let id = own_id(&collection, doc_id);
        match record {
            Some(record) => {
                self.announce_resolution(collection, id, record.clone());
                Ok(Some(record))
            }
            None => {
                if let Some(conflict) = db.conflict(doc_id)? {
                    let _ = self.inner.conflicts.events.send(ConflictEvent::Appeared {
                        collection,
                        id,
                        versions: conflict.versions.iter().map(|v| v.rev.clone()).collect(),
                    });
                }
                Ok(None)
            }
        }
    }
}

/// Resolves the conflicts pulled revisions create by the replica's policies, on the thread
/// that stored them (held weakly: a sync task must not keep a dropped replica alive).
pub(crate) struct PolicyResolver(pub(crate) std::sync::Weak<crate::Inner>);

impl ferry_store::endpoint::Resolver for PolicyResolver {
    fn resolve(
        &self,
        _db: &dyn Database,
        doc_id: &str,
    ) -> Result<Option<ResolutionRecord>, ferry_store::StoreError> {
        let Some(inner) = self.0.upgrade() else {
            return Ok(None);
        };
        match (Ferry { inner }).resolve_automatically(doc_id) {
            Ok(record) => Ok(record),
            Err(ClientError::Store(error)) => Err(error),
            Err(error) => {
                tracing::warn!(%doc_id, %error, "could not resolve a pulled conflict; it is kept");
                Ok(None)
            }
        }
    }
}

impl<T: Serialize + DeserializeOwned> Collection<T> {
    /// The ids of this collection's documents that are in conflict.
    pub fn conflicted(&self) -> Result<Vec<String>, ClientError> {
        Ok(self
            .query()
            .run()?
            .into_iter()
            .filter(|doc| !doc.conflicts.is_empty())
            .map(|doc| doc.id)
            .collect())
    }

    /// A live list of this collection's conflicted document ids: now, then on every change.
    pub fn watch_conflicted(&self) -> impl Stream<Item = Result<Vec<String>, ClientError>> + use<T>
    where
        T: Send + 'static,
    {
        let collection = self.clone();
        crate::collection::watch_values(self.ferry().clone(), move || {
            let ids = collection.conflicted()?;
            Ok((ids.clone(), ids))
        })
    }

    /// What this replica's resolutions of a document did, oldest first: the policy, the
    /// revision written, and the versions and fields not kept.
    pub fn resolutions(&self, id: &str) -> Result<Vec<ResolutionRecord>, ClientError> {
        Ok(self
            .ferry()
            .database()
            .resolutions(&doc_id_in(self.name(), id))?)
    }

    /// Every version of a conflicted document and their common ancestor; `None` if it is not
    /// in conflict.
    pub fn conflict(&self, id: &str) -> Result<Option<Conflict<T>>, ClientError> {
        let doc_id = doc_id_in(self.name(), id);
        match self.ferry().database().conflict(&doc_id)? {
            Some(conflict) => Ok(Some(typed_conflict(id.to_owned(), &conflict)?)),
            None => Ok(None),
        }
    }

    /// Settles a conflict: in one transaction, writes the kept or merged content on top of
    /// the winning version and ends every other version. Fails with [`ClientError::Conflict`]
    /// if the document changed since (read it again), [`ClientError::NotFound`] if it is not
    /// in conflict.
    pub fn resolve(&self, id: &str, choice: Resolve<T>) -> Result<Doc<T>, ClientError> {
        let doc_id = doc_id_in(self.name(), id);
        let db = self.ferry().database();
        let conflict = db.conflict(&doc_id)?.ok_or_else(|| ClientError::NotFound {
            collection: self.name().to_owned(),
            id: id.to_owned(),
        })?;
        let body: Body = match choice {
            Resolve::Keep(rev) => conflict
                .versions
                .iter()
                .find(|version| version.rev == rev)
                .map(|version| version.body.clone())
                .ok_or_else(|| ClientError::Conflict {
                    collection: self.name().to_owned(),
                    id: id.to_owned(),
                    expected: rev.to_string(),
                })?,
            Resolve::Value(value) => Self::to_body(&value)?,
        };
        let mut resolution =
            resolve_with(&conflict, body).map_err(|error| StoreError::InvalidRevision {
                doc_id: doc_id.clone(),
                reason: error.to_string(),
            })?;
        // The resolution is this replica's edit: a fresh clock, later than every version.
        resolution.hlc = resolution.hlc.max(self.ferry().now());
        let record = resolution.record.clone();
        let resolved = self
            .ferry()
            .endpoint(|endpoint| endpoint.apply_resolution(&doc_id, &resolution))?;
        if resolved.is_none() {
            return Err(ClientError::Conflict {
                collection: self.name().to_owned(),
                id: id.to_owned(),
                expected: record.resolved.to_string(),
            });
        }
        self.ferry()
            .announce_resolution(self.name().to_owned(), id.to_owned(), record);
        self.get(id)?.ok_or_else(|| ClientError::NotFound {
            collection: self.name().to_owned(),
            id: id.to_owned(),
        })
    }
}
