//! Automatic conflict resolution: policies, the field-level merge, and the resolution a replica
//! writes.
//!
//! A conflict is a document with several live leaves. Resolving it writes, in one transaction,
//! a new revision on top of the winning leaf (CouchDB's winner, which every replica agrees on)
//! holding the resolved body, and a tombstone on top of every other live leaf. Everything in a
//! [`Resolution`] is a pure function of the conflict's versions (revisions, bodies, clocks) and
//! their common ancestor, and revision ids are hashes of parent and body: two replicas that
//! resolve the same conflict independently write the *same* revisions, which replicate into
//! each other as no-ops. No new conflict appears and nothing ping-pongs.
//!
//! Policies:
//! - [`Policy::Keep`]: nothing automatic; the application resolves.
//! - [`Policy::LastWriteWins`]: the version with the latest hybrid logical clock wins whole;
//!   equal clocks are broken by the higher revision (generation, then hash), as the winner rule.
//! - [`Policy::Merge`]: a field-level three-way merge against the common ancestor body. Fields
//!   changed on one side only keep that change; objects merge recursively; a field changed
//!   differently on several sides takes the value of the version with the latest clock (and the
//!   record lists what was overridden); arrays and other values are whole values. Without the
//!   ancestor's body (compacted, or never received), the merge falls back to last-write-wins
//!   and the record says so.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::hlc::Timestamp;
use crate::json::canonical_object;
use crate::model::Body;
use crate::rev::{GenerationExhausted, Rev};
use crate::tree::RevTree;

/// How a collection's conflicts are resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Conflicts stay until the application resolves them.
    #[default]
    Keep,
    /// The latest write (by hybrid logical clock) wins whole.
    LastWriteWins,
    /// Field-level three-way merge; last write wins per field when both sides changed it.
    Merge,
}

impl Policy {
    /// The policy's name as configured (`keep`, `last-write-wins`, `merge`).
    pub fn name(self) -> &'static str {
        match self {
            Policy::Keep => "keep",
            Policy::LastWriteWins => "last-write-wins",
            Policy::Merge => "merge",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// An unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown conflict policy {0:?}: use keep, last-write-wins (lww) or merge")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(text: &str) -> Result<Policy, UnknownPolicy> {
        match text {
            "keep" | "manual" => Ok(Policy::Keep),
            "last-write-wins" | "lww" => Ok(Policy::LastWriteWins),
            "merge" => Ok(Policy::Merge),
            other => Err(UnknownPolicy(other.to_owned())),
        }
    }
}

/// The policy of every collection: a default and per-collection choices.
///
/// ```
/// use ferry_core::resolve::{Policies, Policy};
/// let policies = Policies::default().with("todos", Policy::Merge);
/// assert_eq!(policies.for_doc("todos:1"), Policy::Merge);
/// assert_eq!(policies.for_doc("notes:1"), Policy::Keep);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policies {
    /// For collections not listed.
    pub default: Policy,
    /// Per collection.
    pub collections: std::collections::BTreeMap<String, Policy>,
}

impl Policies {
    /// These policies with `collection` resolved by `policy`.
    #[must_use]
    pub fn with(mut self, collection: &str, policy: Policy) -> Policies {
        self.collections.insert(collection.to_owned(), policy);
        self
    }

    /// The policy of `collection`.
    pub fn for_collection(&self, collection: &str) -> Policy {
        self.collections
            .get(collection)
            .copied()
            .unwrap_or(self.default)
    }

    /// The policy of the document `doc_id` (by its collection).
    pub fn for_doc(&self, doc_id: &str) -> Policy {
        self.for_collection(crate::model::collection_of(doc_id))
    }

    /// Whether any collection resolves automatically.
    pub fn any_automatic(&self) -> bool {
        self.default != Policy::Keep || self.collections.values().any(|p| *p != Policy::Keep)
    }
}

/// One live version of a conflicted document.
#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    /// Its revision (a live leaf).
    pub rev: Rev,
    /// Its clock.
    pub hlc: Timestamp,
    /// Its body.
    pub body: Body,
}

impl Version {
    /// The order last-write-wins uses: clock, then revision.
    fn recency(&self) -> (Timestamp, &Rev) {
        (self.hlc, &self.rev)
    }
}

/// A conflict as the resolver sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// Every live leaf, at least two, in any order.
    pub versions: Vec<Version>,
    /// The deepest common ancestor of the versions and its body, if known and still stored.
    pub ancestor: Option<(Rev, Option<Body>)>,
}

/// How a resolution was reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum Method {
    /// One version won whole.
    LastWriteWins {
        /// The version kept.
        chosen: Rev,
    },
    /// The versions were merged field by field.
    Merged,
    /// A merge was asked for but the common ancestor's body is gone: last write won whole.
    LastWriteWinsWithoutAncestor {
        /// The version kept.
        chosen: Rev,
    },
    /// The application chose or wrote the body.
    Application,
}

/// A value a resolution did not keep: a field changed on several sides, or a whole version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overridden {
    /// The version whose value was not kept.
    pub rev: Rev,
    /// The field (dotted path), or empty for the whole version.
    pub field: String,
}

/// What a resolution did, kept by the replica that wrote it (nothing is lost silently).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolutionRecord {
    /// The policy that resolved, or `application`.
    pub policy: String,
    /// How.
    #[serde(flatten)]
    pub method: Method,
    /// The revision written with the resolved body.
    pub resolved: Rev,
    /// Every version that was in conflict.
    pub versions: Vec<Rev>,
    /// The values not kept. Their versions stay readable (as ancestors of the tombstones) until
    /// compaction drops old bodies.
    pub overridden: Vec<Overridden>,
}

/// The revisions a replica writes to resolve a conflict.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    /// The leaf the resolved body is written on: the winner of the conflict.
    pub parent: Rev,
    /// The resolved body.
    pub body: Body,
    /// The clock of every revision written: the latest of the versions' (deterministic).
    pub hlc: Timestamp,
    /// The other live leaves, each ended by a tombstone.
    pub superseded: Vec<Rev>,
    /// What happened, for the record.
    pub record: ResolutionRecord,
}

impl Resolution {
    /// The revision holding the resolved body.
    pub fn rev(&self) -> Rev {
        self.record.resolved.clone()
    }

    /// The tombstone written on top of a superseded leaf.
    pub fn tombstone(leaf: &Rev) -> Result<Rev, GenerationExhausted> {
        Rev::compute(Some(leaf), true, &canonical_object(&Map::new()))
    }

    /// Whether `tree` still has the conflict this resolves: its parent and every superseded
    /// leaf are live leaves. A store writes nothing otherwise (the document changed since).
    pub fn applies_to(&self, tree: &RevTree) -> bool {
        let live: BTreeSet<Rev> = tree.live_leaves().into_iter().collect();
        live.contains(&self.parent) && self.superseded.iter().all(|leaf| live.contains(leaf))
    }

    /// The children a store adds, in order, as (parent, deleted, body): the resolved body on
    /// the parent, then an empty tombstone on each superseded leaf.
    pub fn children<'a>(
        &'a self,
        tombstone: &'a Body,
    ) -> impl Iterator<Item = (&'a Rev, bool, &'a Body)> {
        std::iter::once((&self.parent, false, &self.body)).chain(
            self.superseded
                .iter()
                .map(move |leaf| (leaf, true, tombstone)),
        )
    }
}

/// The winner rule for live leaves: the highest revision.
fn winner(versions: &[Version]) -> &Version {
    versions
        .iter()
        .max_by(|a, b| a.rev.cmp(&b.rev))
        .expect("a conflict has versions")
}

fn latest(versions: &[Version]) -> &Version {
    versions
        .iter()
        .max_by(|a, b| a.recency().cmp(&b.recency()))
        .expect("a conflict has versions")
}

/// Resolves `conflict` by `policy`; `None` for [`Policy::Keep`], when there is no conflict, or
/// when a version is at [`MAX_GENERATION`](crate::rev::MAX_GENERATION) (no revision can be
/// written on it, so the conflict is kept).
pub fn resolve(policy: Policy, conflict: &Conflict) -> Option<Resolution> {
    if conflict.versions.len() < 2 {
        return None;
    }
    let (method, body, overridden) = match policy {
        Policy::Keep => return None,
        Policy::LastWriteWins => last_write_wins(conflict, false),
        Policy::Merge => match &conflict.ancestor {
            Some((_, Some(base))) => {
                let (body, overridden) = merge(base, &conflict.versions);
                (Method::Merged, body, overridden)
            }
            _ => last_write_wins(conflict, true),
        },
    };
    resolution_of(conflict, policy.name(), method, body, overridden).ok()
}

/// The resolution writing `body` (chosen or written by the application) over `conflict`; an
/// error when a version is at [`MAX_GENERATION`](crate::rev::MAX_GENERATION).
pub fn resolve_with(conflict: &Conflict, body: Body) -> Result<Resolution, GenerationExhausted> {
    resolution_of(
        conflict,
        "application",
        Method::Application,
        body,
        Vec::new(),
    )
}

fn resolution_of(
    conflict: &Conflict,
    policy: &str,
    method: Method,
    body: Body,
    overridden: Vec<Overridden>,
) -> Result<Resolution, GenerationExhausted> {
    // Every version gets a child (the resolved body or a tombstone): none may be exhausted.
    if let Some(exhausted) = conflict
        .versions
        .iter()
        .find(|version| version.rev.generation() >= crate::rev::MAX_GENERATION)
    {
        return Err(GenerationExhausted {
            parent: exhausted.rev.clone(),
        });
    }
    let parent = winner(&conflict.versions).rev.clone();
    let mut superseded: Vec<Rev> = conflict
        .versions
        .iter()
        .map(|version| version.rev.clone())
        .filter(|rev| *rev != parent)
        .collect();
    superseded.sort();
    let hlc = latest(&conflict.versions).hlc;
    let mut versions: Vec<Rev> = conflict.versions.iter().map(|v| v.rev.clone()).collect();
    versions.sort();
    let resolved = Rev::compute(Some(&parent), false, &canonical_object(&body))?;
    Ok(Resolution {
        parent,
        body,
        hlc,
        superseded,
        record: ResolutionRecord {
            policy: policy.to_owned(),
            method,
            resolved,
            versions,
            overridden,
        },
    })
}

fn last_write_wins(conflict: &Conflict, without_ancestor: bool) -> (Method, Body, Vec<Overridden>) {
    let chosen = latest(&conflict.versions);
    let mut overridden: Vec<Overridden> = conflict
        .versions
        .iter()
        .filter(|version| version.rev != chosen.rev && version.body != chosen.body)
        .map(|version| Overridden {
            rev: version.rev.clone(),
            field: String::new(),
        })
        .collect();
    overridden.sort_by(|a, b| a.rev.cmp(&b.rev));
    let method = if without_ancestor {
        Method::LastWriteWinsWithoutAncestor {
            chosen: chosen.rev.clone(),
        }
    } else {
        Method::LastWriteWins {
            chosen: chosen.rev.clone(),
        }
    };
    (method, chosen.body.clone(), overridden)
}

/// Merges `versions` field by field against their common ancestor `base`. The result does not
/// depend on the order of `versions`.
pub fn merge(base: &Body, versions: &[Version]) -> (Body, Vec<Overridden>) {
    let base = Value::Object(base.clone());
    let values: Vec<(Value, &Version)> = versions
        .iter()
        .map(|version| (Value::Object(version.body.clone()), version))
        .collect();
    let sides: Vec<(Option<&Value>, &Version)> = values
        .iter()
        .map(|(value, version)| (Some(value), *version))
        .collect();
    let mut overridden = Vec::new();
    let merged = merge_value(Some(&base), &sides, &mut Vec::new(), &mut overridden);
    overridden.sort_by(|a: &Overridden, b| (&a.field, &a.rev).cmp(&(&b.field, &b.rev)));
    overridden.dedup();
    let body = match merged {
        Some(Value::Object(map)) => map,
        // Every side is an object at the top, so the merge is one too.
        _ => Map::new(),
    };
    (body, overridden)
}

/// One field (or the whole document, at the top): `None` means absent.
fn merge_value(
    base: Option<&Value>,
    sides: &[(Option<&Value>, &Version)],
    path: &mut Vec<String>,
    overridden: &mut Vec<Overridden>,
) -> Option<Value> {
    let changed: Vec<&(Option<&Value>, &Version)> =
        sides.iter().filter(|(value, _)| *value != base).collect();
    let Some((first, _)) = changed.first() else {
        return base.cloned();
    };
    if changed.iter().all(|(value, _)| value == first) {
        return first.cloned();
    }
    // Objects on every changed side (and at the base, or absent there): merge their fields.
    let objects = changed
        .iter()
        .all(|(value, _)| matches!(value, Some(Value::Object(_))))
        && matches!(base, None | Some(Value::Object(_)));
    if objects {
        let empty = Map::new();
        let base_map = match base {
            Some(Value::Object(map)) => map,
            _ => &empty,
        };
        let keys: BTreeSet<&String> = base_map
            .keys()
            .chain(sides.iter().flat_map(|(value, _)| match value {
                Some(Value::Object(map)) => map.keys().collect::<Vec<_>>(),
                _ => Vec::new(),
            }))
            .collect();
        let mut merged = Map::new();
        for key in keys {
            let field_sides: Vec<(Option<&Value>, &Version)> = sides
                .iter()
                .map(|(value, version)| {
                    let field = match value {
                        Some(Value::Object(map)) => map.get(key),
                        // A side that left the object as it was at the base.
                        _ => base_map.get(key),
                    };
                    (field, *version)
                })
                .collect();
            path.push(key.clone());
            if let Some(value) = merge_value(base_map.get(key), &field_sides, path, overridden) {
                merged.insert(key.clone(), value);
            }
            path.pop();
        }
        return Some(Value::Object(merged));
    }
    // Changed differently on several sides: the latest write wins this field.
    let (winning_value, winning_version) = changed
        .iter()
        .max_by(|(_, a), (_, b)| a.recency().cmp(&b.recency()))
        .map(|(value, version)| (*value, *version))
        .expect("changed is not empty");
    for (value, version) in &changed {
        if *value != winning_value && version.rev != winning_version.rev {
            overridden.push(Overridden {
                rev: version.rev.clone(),
                field: path.join("."),
            });
        }
    }
    winning_value.cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Body {
        value.as_object().unwrap().clone()
    }

    fn version(rev: &str, hlc: u64, value: Value) -> Version {
        Version {
            rev: rev.parse().unwrap(),
            hlc: Timestamp::new(hlc, 0),
            body: body(value),
        }
    }

    fn conflict(base: Option<Value>, versions: Vec<Version>) -> Conflict {
        Conflict {
            versions,
            ancestor: base.map(|base| ("1-aa".parse().unwrap(), Some(body(base)))),
        }
    }

    /// Every resolution writes a child on each version: with one at the largest generation
    /// there is none to write, so policies keep the conflict and an application's choice is
    /// an error (before, the child's generation overflowed).
    #[test]
    fn a_conflict_at_the_largest_generation_is_kept() {
        let largest = crate::rev::MAX_GENERATION;
        let exhausted = conflict(
            Some(json!({"n": 0})),
            vec![
                version(&format!("{largest}-bb"), 1, json!({"n": 1})),
                version(&format!("{}-cc", largest - 5), 2, json!({"n": 2})),
            ],
        );
        for policy in [Policy::LastWriteWins, Policy::Merge] {
            assert_eq!(resolve(policy, &exhausted), None, "{policy:?}");
        }
        let error = resolve_with(&exhausted, body(json!({"n": 3}))).unwrap_err();
        assert_eq!(error.parent.generation(), largest);
        let below = conflict(
            None,
            vec![
                version(&format!("{}-bb", largest - 1), 1, json!({"n": 1})),
                version(&format!("{}-cc", largest - 1), 2, json!({"n": 2})),
            ],
        );
        let resolution = resolve(Policy::LastWriteWins, &below).unwrap();
        assert_eq!(resolution.rev().generation(), largest);
    }

    #[test]
    fn merge_keeps_changes_to_different_fields_and_recurses_into_objects() {
        let base = json!({"title": "milk", "done": false, "meta": {"by": "ann", "tags": ["a"]}});
        let a = version(
            "2-aa",
            10,
            json!({"title": "oat milk", "done": false, "meta": {"by": "ann", "tags": ["a"]}}),
        );
        let b = version(
            "2-bb",
            5,
            json!({"title": "milk", "done": true, "meta": {"by": "bob", "tags": ["a"]}}),
        );
        let resolution = resolve(Policy::Merge, &conflict(Some(base), vec![a, b])).unwrap();
        assert_eq!(
            Value::Object(resolution.body),
            json!({"title": "oat milk", "done": true, "meta": {"by": "bob", "tags": ["a"]}})
        );
        assert!(resolution.record.overridden.is_empty());
        assert_eq!(resolution.record.method, Method::Merged);
    }

    #[test]
    fn the_same_field_changed_on_both_sides_goes_to_the_latest_write() {
        let base = json!({"title": "milk", "n": 1});
        let a = version("2-aa", 10, json!({"title": "oat milk", "n": 1}));
        let b = version("2-bb", 20, json!({"title": "soy milk", "n": 2}));
        let resolution = resolve(Policy::Merge, &conflict(Some(base), vec![a, b])).unwrap();
        assert_eq!(
            Value::Object(resolution.body),
            json!({"title": "soy milk", "n": 2})
        );
        assert_eq!(
            resolution.record.overridden,
            [Overridden {
                rev: "2-aa".parse().unwrap(),
                field: "title".into()
            }]
        );
    }

    #[test]
    fn fields_removed_on_one_side_stay_removed_and_arrays_are_whole_values() {
        let base = json!({"a": 1, "list": [1, 2], "gone": true});
        let a = version("2-aa", 10, json!({"a": 1, "list": [1, 2, 3], "gone": true}));
        let b = version("2-bb", 20, json!({"a": 2, "list": [0, 1, 2]}));
        let resolution = resolve(Policy::Merge, &conflict(Some(base), vec![a, b])).unwrap();
        assert_eq!(
            Value::Object(resolution.body),
            json!({"a": 2, "list": [0, 1, 2]})
        );
    }

    #[test]
    fn last_write_wins_by_clock_then_revision_and_without_ancestor() {
        let a = version("2-aa", 30, json!({"v": "a"}));
        let b = version("3-bb", 20, json!({"v": "b"}));
        let lww = resolve(
            Policy::LastWriteWins,
            &conflict(None, vec![a.clone(), b.clone()]),
        )
        .unwrap();
        assert_eq!(Value::Object(lww.body.clone()), json!({"v": "a"}));
        // The new revision sits on the winner (3-bb) whatever the clocks say.
        assert_eq!(lww.parent, "3-bb".parse().unwrap());
        assert_eq!(lww.superseded, ["2-aa".parse().unwrap()]);
        assert_eq!(lww.hlc, Timestamp::new(30, 0));
        // Equal clocks: the higher revision wins.
        let tie = resolve(
            Policy::LastWriteWins,
            &conflict(
                None,
                vec![
                    version("2-aa", 5, json!({"v": "a"})),
                    version("2-bb", 5, json!({"v": "b"})),
                ],
            ),
        )
        .unwrap();
        assert_eq!(Value::Object(tie.body), json!({"v": "b"}));
        // Merge without the ancestor's body says it fell back.
        let fallback = resolve(Policy::Merge, &conflict(None, vec![a, b])).unwrap();
        assert!(matches!(
            fallback.record.method,
            Method::LastWriteWinsWithoutAncestor { .. }
        ));
        assert!(
            resolve(
                Policy::Keep,
                &conflict(None, vec![version("2-aa", 1, json!({}))])
            )
            .is_none()
        );
    }

    #[test]
    fn resolutions_do_not_depend_on_the_order_of_versions() {
        let base = json!({"x": 0, "y": 0, "z": {"k": 0}});
        let versions = vec![
            version("2-aa", 10, json!({"x": 1, "y": 0, "z": {"k": 1}})),
            version("2-bb", 30, json!({"x": 2, "y": 5, "z": {"k": 0}})),
            version(
                "3-cc",
                20,
                json!({"x": 0, "y": 6, "z": {"k": 2, "new": true}}),
            ),
        ];
        let mut reversed = versions.clone();
        reversed.reverse();
        for policy in [Policy::Merge, Policy::LastWriteWins] {
            let one = resolve(policy, &conflict(Some(base.clone()), versions.clone())).unwrap();
            let other = resolve(policy, &conflict(Some(base.clone()), reversed.clone())).unwrap();
            assert_eq!(one, other);
            assert_eq!(one.rev(), other.rev());
        }
        let merged = resolve(Policy::Merge, &conflict(Some(base), versions)).unwrap();
        assert_eq!(
            Value::Object(merged.body),
            json!({"x": 2, "y": 5, "z": {"k": 2, "new": true}})
        );
    }

    #[test]
    fn policies_parse_from_their_names() {
        assert_eq!("lww".parse::<Policy>().unwrap(), Policy::LastWriteWins);
        assert_eq!("merge".parse::<Policy>().unwrap(), Policy::Merge);
        assert!("magic".parse::<Policy>().is_err());
        assert_eq!(Policy::LastWriteWins.to_string(), "last-write-wins");
    }
}
