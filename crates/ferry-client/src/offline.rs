//! Offline subscriptions: which server documents a replica downloads and keeps current when it
//! does not mirror the whole database ([`crate::SyncOptions::only_subscribed`]).
//!
//! Subscriptions are stored in the replica (a local document), so they survive restarts and
//! every process on the replica sees the same ones. The pull replication's filter is the
//! union of their selectors; changing them restarts the pull with the new filter, which
//! downloads what newly matches (documents already present are skipped by revs-diff).

use ferry_core::selector::Selector;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{ClientError, Ferry};

/// The local document listing the subscriptions.
const SUBSCRIPTIONS_DOC: &str = "ferry-offline-subscriptions";

/// What to keep downloaded.
///
/// ```
/// use ferry_client::OfflineSubscription;
/// let everything_in_todos = OfflineSubscription::collection("todos");
/// let open_todos = OfflineSubscription::query("todos", serde_json::json!({"done": false})).unwrap();
/// assert_ne!(everything_in_todos, open_todos);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum OfflineSubscription {
    /// Every document of a collection, deletions included.
    Collection {
        /// The collection.
        collection: String,
    },
    /// The documents of a collection matching a Mango selector, and deletions of any document
    /// of the collection. A document that stops matching is not updated any more (as with
    /// CouchDB's selector replication); subscribe to the collection to follow every change.
    Query {
        /// The collection.
        collection: String,
        /// The Mango selector.
        selector: Value,
    },
}

impl OfflineSubscription {
    /// Every document of `collection`.
    pub fn collection(collection: impl Into<String>) -> OfflineSubscription {
        OfflineSubscription::Collection {
            collection: collection.into(),
        }
    }

    /// The documents of `collection` that match `selector`.
    pub fn query(
        collection: impl Into<String>,
        selector: Value,
    ) -> Result<OfflineSubscription, ClientError> {
        Selector::parse(&selector).map_err(|error| ClientError::InvalidQuery(error.to_string()))?;
        Ok(OfflineSubscription::Query {
            collection: collection.into(),
            selector,
        })
    }

    /// The selector the server evaluates for this subscription (with `_id` in the document).
    fn selector(&self) -> Value {
        match self {
            OfflineSubscription::Collection { collection } => {
                ferry_core::filter::collection_selector(collection)
            }
            OfflineSubscription::Query {
                collection,
                selector,
            } => ferry_core::filter::query_selector(collection, selector.clone()),
        }
    }
}

/// The union of `subscriptions` as one selector; `None` when there are none.
pub(crate) fn pull_selector(
    subscriptions: &[OfflineSubscription],
) -> Option<ferry_core::filter::ChangesFilter> {
    if subscriptions.is_empty() {
        return None;
    }
    let json =
        json!({"$or": subscriptions.iter().map(OfflineSubscription::selector).collect::<Vec<_>>()});
    Some(
        ferry_core::filter::ChangesFilter::selector(json)
            .expect("subscription selectors were checked"),
    )
}

impl Ferry {
    /// The replica's offline subscriptions, and the local document's revision (to notice
    /// changes made by other processes).
    pub(crate) fn subscriptions_with_rev(
        &self,
    ) -> Result<(Vec<OfflineSubscription>, u64), ClientError> {
        let Some(doc) = self.database().get_local(SUBSCRIPTIONS_DOC)? else {
            return Ok((Vec::new(), 0));
        };
        let list = doc
            .body
            .get("subscriptions")
            .cloned()
            .unwrap_or(Value::Null);
        let subscriptions = serde_json::from_value(list).unwrap_or_default();
        Ok((subscriptions, doc.rev))
    }

    /// What this replica keeps downloaded when it syncs with
    /// [`crate::SyncOptions::only_subscribed`].
    pub fn offline_subscriptions(&self) -> Result<Vec<OfflineSubscription>, ClientError> {
        Ok(self.subscriptions_with_rev()?.0)
    }

    /// Downloads the documents `subscription` matches at the next sync (at once if a sync is
    /// running) and keeps them current while connected, so they are readable offline. Returns
    /// whether the subscription is new.
    pub fn subscribe_offline(
        &self,
        subscription: OfflineSubscription,
    ) -> Result<bool, ClientError> {
        self.update_subscriptions(|subscriptions| {
            if subscriptions.contains(&subscription) {
                return false;
            }
            subscriptions.push(subscription.clone());
            true
        })
    }

    /// Stops keeping `subscription`'s documents current. Documents already downloaded stay
    /// readable (and local edits to them still sync); returns whether it was subscribed.
    pub fn unsubscribe_offline(
        &self,
        subscription: &OfflineSubscription,
    ) -> Result<bool, ClientError> {
        self.update_subscriptions(|subscriptions| {
            let before = subscriptions.len();
            subscriptions.retain(|existing| existing != subscription);
            subscriptions.len() != before
        })
    }

    fn update_subscriptions(
        &self,
        change: impl Fn(&mut Vec<OfflineSubscription>) -> bool,
    ) -> Result<bool, ClientError> {
        let changed = self.update_local(SUBSCRIPTIONS_DOC, |body| {
            let mut subscriptions: Vec<OfflineSubscription> = body
                .get("subscriptions")
                .cloned()
                .and_then(|list| serde_json::from_value(list).ok())
                .unwrap_or_default();
            if !change(&mut subscriptions) {
                return Ok(false);
            }
            body.insert(
                "subscriptions".into(),
                serde_json::to_value(&subscriptions)?,
            );
            Ok(true)
        })?;
        if changed {
            self.inner
                .subscriptions_changed
                .send_modify(|count| *count += 1);
        }
        Ok(changed)
    }
}
