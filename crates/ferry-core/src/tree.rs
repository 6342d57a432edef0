//! The revision tree of one document.
//!
//! Every edit adds a child revision to a leaf; replication adds whole paths of revisions made
//! elsewhere. Nothing is ever overwritten: two edits of the same leaf become two leaves, and the
//! document is then in conflict. The **winner** is chosen exactly as CouchDB does, so that Ferry,
//! CouchDB and PouchDB replicas agree: leaves that are not deleted first, then the highest
//! generation, then the highest hash (bytes). The other live leaves are the **conflicts**.
//!
//! Architecture Invariant: inserting the same set of revisions, in any order and any number of
//! times, yields the same tree (see the `tree_props` property tests). Stemming (the revs limit)
//! is the only operation that removes revisions, and it never removes a leaf.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Deserialize;

use crate::rev::Rev;

/// The revision tree of one document: every known revision with its parent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevTree {
    nodes: BTreeMap<Rev, Node>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    /// `None` for a first revision, or when the parent was stemmed or never received.
    parent: Option<Rev>,
    /// Whether this revision is a deletion (tombstone). Ancestors received only by id are
    /// recorded as not deleted; the flag only matters while a revision is a leaf.
    deleted: bool,
}

/// A leaf of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The leaf revision.
    pub rev: Rev,
    /// Whether it is a tombstone.
    pub deleted: bool,
}

/// Why an edit was refused: the edit's base is not the revision the writer believes it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    /// The base revision is not a leaf of the tree (it was updated meanwhile, or never existed).
    #[error("document update conflict: {0} is not a current revision")]
    StaleBase(Rev),
    /// No base was given but the document exists and is not deleted.
    #[error("document update conflict: the document exists, give its current revision")]
    MissingBase,
    /// A base was given but the document does not exist.
    #[error("document update conflict: the document does not exist")]
    NoSuchDocument,
    /// The base is at the largest generation: no revision can follow it.
    #[error(transparent)]
    Exhausted(#[from] crate::rev::GenerationExhausted),
}

/// Why a path of revisions was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// An empty path.
    #[error("a revision path must name at least one revision")]
    Empty,
    /// Generations must decrease by exactly one from the leaf to the oldest ancestor.
    #[error("revision path is not consecutive at {0}")]
    NotConsecutive(Rev),
}

/// What an edit or a merge did to the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The revision was new.
    Added,
    /// The revision was already in the tree; nothing changed.
    AlreadyPresent,
}

impl RevTree {
    /// An empty tree (a document that does not exist yet).
    pub fn new() -> RevTree {
        RevTree::default()
    }

    /// Whether the tree has no revision at all.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The number of revisions in the tree.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether `rev` is in the tree (as a leaf or an ancestor).
    pub fn contains(&self, rev: &Rev) -> bool {
        self.nodes.contains_key(rev)
    }

    /// The parent of `rev`, if both are known.
    pub fn parent(&self, rev: &Rev) -> Option<&Rev> {
        self.nodes.get(rev).and_then(|node| node.parent.as_ref())
    }

    /// Whether `rev` is known and recorded as a deletion.
    pub fn is_deleted(&self, rev: &Rev) -> bool {
        self.nodes.get(rev).is_some_and(|node| node.deleted)
    }

    /// Every revision in the tree, in revision order.
    pub fn revs(&self) -> impl Iterator<Item = &Rev> {
        self.nodes.keys()
    }

    /// The leaves, in revision order.
    pub fn leaves(&self) -> Vec<Leaf> {
        let parents: BTreeSet<&Rev> = self
            .nodes
            .values()
            .filter_map(|node| node.parent.as_ref())
            .collect();
        self.nodes
            .iter()
            .filter(|(rev, _)| !parents.contains(rev))
            .map(|(rev, node)| Leaf {
                rev: rev.clone(),
                deleted: node.deleted,
            })
            .collect()
    }

    /// The revisions of the leaves that are not deleted, in revision order: the versions of the
    /// document (more than one is a conflict).
    pub fn live_leaves(&self) -> Vec<Rev> {
        self.leaves()
            .into_iter()
            .filter(|leaf| !leaf.deleted)
            .map(|leaf| leaf.rev)
            .collect()
    }

    /// Whether `rev` is a leaf.
    pub fn is_leaf(&self, rev: &Rev) -> bool {
        self.contains(rev)
            && !self
                .nodes
                .values()
                .any(|node| node.parent.as_ref() == Some(rev))
    }

    /// The winning leaf, or `None` for an empty tree.
    pub fn winner(&self) -> Option<Leaf> {
        self.leaves().into_iter().max_by(winner_order)
    }

    /// The live leaves other than the winner, highest first. Empty when the winner is deleted.
    pub fn conflicts(&self) -> Vec<Rev> {
        let Some(winner) = self.winner() else {
            return Vec::new();
        };
        let mut conflicts: Vec<Rev> = self
            .leaves()
            .into_iter()
            .filter(|leaf| !leaf.deleted && leaf.rev != winner.rev)
            .map(|leaf| leaf.rev)
            .collect();
        conflicts.sort_by(|a, b| b.cmp(a));
        conflicts
    }

    /// The deleted leaves other than the winner, highest first.
    pub fn deleted_conflicts(&self) -> Vec<Rev> {
        let Some(winner) = self.winner() else {
            return Vec::new();
        };
        let mut deleted: Vec<Rev> = self
            .leaves()
            .into_iter()
            .filter(|leaf| leaf.deleted && leaf.rev != winner.rev)
            .map(|leaf| leaf.rev)
            .collect();
        deleted.sort_by(|a, b| b.cmp(a));
        deleted
    }

    /// Checks an edit by the local application and returns the parent the new revision gets.
    ///
    /// With a `base`, it must be a leaf (any leaf: extending a losing branch is how a conflict
    /// is resolved). Without one, the document must not exist, or its winner must be deleted: a
    /// recreated document then continues the tombstone's branch, so its history shows the
    /// deletion and it is never confused with the document that was deleted.
    pub fn edit_parent(&self, base: Option<&Rev>) -> Result<Option<Rev>, EditError> {
        match base {
            Some(base) if self.is_empty() => {
                let _ = base;
                Err(EditError::NoSuchDocument)
            }
            Some(base) if self.is_leaf(base) => exhaustion(base.clone()).map(Some),
            Some(base) => Err(EditError::StaleBase(base.clone())),
            None => match self.winner() {
                None => Ok(None),
                Some(winner) if winner.deleted => exhaustion(winner.rev).map(Some),
                Some(_) => Err(EditError::MissingBase),
            },
        }
    }

    /// Adds the revision `rev` (made locally as a child of `parent`, as returned by
    /// [`RevTree::edit_parent`]).
    pub fn add_child(&mut self, parent: Option<&Rev>, rev: Rev, deleted: bool) -> Applied {
        self.merge_node(rev, parent.cloned(), deleted)
    }

    /// Merges a path of revisions made elsewhere, newest first (`path[0]` is the leaf, each
    /// next one its parent), as CouchDB's `new_edits=false` does. Revisions already present are
    /// kept; missing ones are added; a known revision whose parent was unknown (stemmed, or
    /// received without history) gets its parent back.
    pub fn merge_path(&mut self, path: &[Rev], leaf_deleted: bool) -> Result<Applied, PathError> {
        let (leaf, _) = path.split_first().ok_or(PathError::Empty)?;
        for pair in path.windows(2) {
            if pair[0].generation() != pair[1].generation() + 1 {
                return Err(PathError::NotConsecutive(pair[1].clone()));
            }
        }
        let was_present = self.contains(leaf);
        for (index, rev) in path.iter().enumerate() {
            let parent = path.get(index + 1).cloned();
            let deleted = index == 0 && leaf_deleted;
            self.merge_node(rev.clone(), parent, deleted);
        }
        Ok(if was_present {
            Applied::AlreadyPresent
        } else {
            Applied::Added
        })
    }

    fn merge_node(&mut self, rev: Rev, parent: Option<Rev>, deleted: bool) -> Applied {
        match self.nodes.get_mut(&rev) {
            Some(node) => {
                // A revision id names one parent. Filling in a parent that was unknown, or a
                // deleted flag that was unknown, only adds information, so the result does not
                // depend on the order in which paths arrive.
                if node.parent.is_none() {
                    node.parent = parent;
                }
                node.deleted |= deleted;
                Applied::AlreadyPresent
            }
            None => {
                self.nodes.insert(rev, Node { parent, deleted });
                Applied::Added
            }
        }
    }

    /// The path from `rev` back to its oldest known consecutive ancestor, newest first, with at
    /// most `limit` entries. Empty if `rev` is not in the tree.
    pub fn ancestry(&self, rev: &Rev, limit: usize) -> Vec<Rev> {
        let mut path = Vec::new();
        let mut current = self.nodes.get_key_value(rev);
        while let Some((rev, node)) = current {
            if path.len() == limit {
                break;
            }
            path.push(rev.clone());
            current = node
                .parent
                .as_ref()
                .filter(|parent| parent.generation() + 1 == rev.generation())
                .and_then(|parent| self.nodes.get_key_value(parent));
        }
        path
    }

    /// The deepest revision that is `revs`' common ancestor (or one of them itself), if their
    /// known histories meet. Ties at the same depth cannot happen: a revision has one parent.
    pub fn common_ancestor(&self, revs: &[Rev]) -> Option<Rev> {
        let (first, others) = revs.split_first()?;
        self.ancestry(first, usize::MAX)
            .into_iter()
            .find(|candidate| {
                others
                    .iter()
                    .all(|rev| self.is_ancestor_or_self(candidate, rev))
            })
    }

    /// The leaves that descend from `rev` (CouchDB's `latest=true`): `rev` itself when it is a
    /// leaf or not in the tree, otherwise every leaf below it, in [`RevTree::leaves`] order.
    ///
    /// ```
    /// use ferry_core::tree::RevTree;
    /// use ferry_core::rev::Rev;
    /// let rev = |text: &str| text.parse::<Rev>().unwrap();
    /// let mut tree = RevTree::default();
    /// tree.merge_path(&[rev("2-b"), rev("1-a")], false).unwrap();
    /// tree.merge_path(&[rev("2-c"), rev("1-a")], false).unwrap();
    /// assert_eq!(tree.latest_leaves(&rev("1-a")).len(), 2);
    /// assert_eq!(tree.latest_leaves(&rev("2-b")), vec![rev("2-b")]);
    /// ```
    pub fn latest_leaves(&self, rev: &Rev) -> Vec<Rev> {
        if !self.contains(rev) || self.is_leaf(rev) {
            return vec![rev.clone()];
        }
        self.leaves()
            .into_iter()
            .map(|leaf| leaf.rev)
            .filter(|leaf| self.is_ancestor_or_self(rev, leaf))
            .collect()
    }

    /// Whether `ancestor` is `rev` or one of its ancestors.
    pub fn is_ancestor_or_self(&self, ancestor: &Rev, rev: &Rev) -> bool {
        let mut current = Some(rev);
        while let Some(rev) = current {
            if rev == ancestor {
                return true;
            }
            if rev.generation() <= ancestor.generation() {
                return false;
            }
            current = self.parent(rev);
        }
        false
    }

    /// The revisions of `revs` that this tree does not hold, and for them the leaves that could
    /// be their ancestors (lower generation), as CouchDB's `_revs_diff` reports.
    pub fn revs_diff<'a>(&self, revs: impl IntoIterator<Item = &'a Rev>) -> RevsDiff {
        let mut missing: Vec<Rev> = revs
            .into_iter()
            .filter(|rev| !self.contains(rev))
            .cloned()
            .collect();
        missing.sort();
        missing.dedup();
        let possible_ancestors = match missing.iter().map(Rev::generation).max() {
            Some(highest) => self
                .leaves()
                .into_iter()
                .filter(|leaf| leaf.rev.generation() < highest)
                .map(|leaf| leaf.rev)
                .collect(),
            None => Vec::new(),
        };
        RevsDiff {
            missing,
            possible_ancestors,
        }
    }

    /// For every revision, how far it is from the nearest leaf below it (a leaf is 0).
    pub fn leaf_distances(&self) -> HashMap<&Rev, usize> {
        let mut distance: HashMap<&Rev, usize> = HashMap::with_capacity(self.nodes.len());
        for leaf in self.leaves() {
            let (mut rev, _) = self.nodes.get_key_value(&leaf.rev).expect("leaf is a node");
            let mut steps = 0;
            loop {
                match distance.get(rev) {
                    Some(&known) if known <= steps => break,
                    _ => {
                        distance.insert(rev, steps);
                    }
                }
                let Some(parent) = self.nodes[rev].parent.as_ref() else {
                    break;
                };
                let Some((parent, _)) = self.nodes.get_key_value(parent) else {
                    break;
                };
                rev = parent;
                steps += 1;
            }
        }
        distance
    }

    /// The revisions at most `depth` steps above some leaf: the ones whose bodies a store
    /// keeps (leaves are depth 0), so that three-way merges find recent common ancestors.
    pub fn body_window(&self, depth: usize) -> BTreeSet<Rev> {
        // No revision is further from a leaf than the tree has revisions: a small tree is all
        // inside the window (the common case, which then skips the walk).
        if self.nodes.len() <= depth.saturating_add(1) {
            return self.nodes.keys().cloned().collect();
        }
        self.leaf_distances()
            .into_iter()
            .filter(|(_, distance)| *distance <= depth)
            .map(|(rev, _)| rev.clone())
            .collect()
    }

    /// What compaction keeps: every leaf, and the revisions at most `depth` steps above a live
    /// (not deleted) leaf. Versions superseded by a resolution hang below tombstones; they stay
    /// in [`RevTree::body_window`] (readable after the resolution) but not in this one.
    pub fn compaction_window(&self, depth: usize) -> BTreeSet<Rev> {
        let mut keep = BTreeSet::new();
        for leaf in self.leaves() {
            if leaf.deleted {
                keep.insert(leaf.rev);
            } else {
                keep.extend(self.ancestry(&leaf.rev, depth.saturating_add(1)));
            }
        }
        keep
    }

    /// Drops every revision more than `limit - 1` steps above all leaves (CouchDB's revs
    /// limit), and returns the dropped revisions. Leaves are never dropped; a `limit` of 0 is
    /// treated as 1.
    pub fn stem(&mut self, limit: usize) -> Vec<Rev> {
        let keep_depth = limit.max(1) - 1;
        if self.nodes.len() <= limit.max(1) {
            return Vec::new();
        }
        let distances = self.leaf_distances();
        let dropped: Vec<Rev> = self
            .nodes
            .keys()
            .filter(|rev| {
                distances
                    .get(rev)
                    .is_none_or(|distance| *distance > keep_depth)
            })
            .cloned()
            .collect();
        if dropped.is_empty() {
            return dropped;
        }
        for rev in &dropped {
            self.nodes.remove(rev);
        }
        for node in self.nodes.values_mut() {
            if node
                .parent
                .as_ref()
                .is_some_and(|parent| dropped.binary_search(parent).is_ok())
            {
                node.parent = None;
            }
        }
        dropped
    }

    /// Encodes the tree for storage: nodes in revision order separated by spaces, each its
    /// revision, then `<` and its parent's position in that order if it has one, then `!` if
    /// it is a tombstone: `1-a 2-b<0 3-c<1!`. Revision ids never contain these characters.
    /// (Version 1 was JSON; [`RevTree::decode`] reads both.)
    pub fn encode(&self) -> String {
        use std::fmt::Write;
        let order: Vec<&Rev> = self.nodes.keys().collect();
        let mut text = String::with_capacity(self.nodes.len() * 40);
        for (rev, node) in &self.nodes {
            if !text.is_empty() {
                text.push(' ');
            }
            write!(text, "{rev}").expect("writing to a String");
            if let Some(parent) = &node.parent {
                let position = order
                    .binary_search(&parent)
                    .expect("a parent is a node of its tree");
                write!(text, "<{position}").expect("writing to a String");
            }
            if node.deleted {
                text.push('!');
            }
        }
        text
    }

    /// Decodes a tree written by [`RevTree::encode`] (or by version 1, as JSON).
    pub fn decode(text: &str) -> Result<RevTree, TreeDecodeError> {
        if text.starts_with('{') {
            return RevTree::decode_json(text);
        }
        let mut parsed = Vec::new();
        for token in text.split(' ').filter(|token| !token.is_empty()) {
            let (token, deleted) = match token.strip_suffix('!') {
                Some(token) => (token, true),
                None => (token, false),
            };
            let (rev, parent) = match token.split_once('<') {
                Some((rev, parent)) => {
                    let position: usize = parent.parse().map_err(|_| {
                        TreeDecodeError(format!("parent position {parent:?} is not a number"))
                    })?;
                    (rev, Some(position))
                }
                None => (token, None),
            };
            let rev: Rev = rev
                .parse()
                .map_err(|error: crate::rev::RevParseError| TreeDecodeError(error.to_string()))?;
            parsed.push((rev, parent, deleted));
        }
        RevTree::from_positions(parsed)
    }

    fn decode_json(text: &str) -> Result<RevTree, TreeDecodeError> {
        let encoded: EncodedTree =
            serde_json::from_str(text).map_err(|err| TreeDecodeError(err.to_string()))?;
        if encoded.version != 1 {
            return Err(TreeDecodeError(format!(
                "unknown tree encoding version {}",
                encoded.version
            )));
        }
        RevTree::from_positions(
            encoded
                .nodes
                .into_iter()
                .map(|node| (node.rev, node.parent, node.deleted))
                .collect(),
        )
    }

    /// A tree from its nodes, each with its parent's position in the list.
    fn from_positions(parsed: Vec<(Rev, Option<usize>, bool)>) -> Result<RevTree, TreeDecodeError> {
        let revs: Vec<Rev> = parsed.iter().map(|(rev, _, _)| rev.clone()).collect();
        let mut nodes = BTreeMap::new();
        for (rev, parent, deleted) in parsed {
            let parent = match parent {
                Some(position) => Some(revs.get(position).cloned().ok_or_else(|| {
                    TreeDecodeError(format!("parent index {position} out of range"))
                })?),
                None => None,
            };
            nodes.insert(rev, Node { parent, deleted });
        }
        Ok(RevTree { nodes })
    }
}

/// The answer to a revs-diff question about one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevsDiff {
    /// Revisions the tree does not hold, sorted.
    pub missing: Vec<Rev>,
    /// Leaves the missing revisions may descend from.
    pub possible_ancestors: Vec<Rev>,
}

/// A stored tree could not be decoded (a corrupted or future-format row).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode revision tree: {0}")]
pub struct TreeDecodeError(String);

/// Version 1 of the stored form of a tree (JSON), still read from older files.
#[derive(Deserialize)]
struct EncodedTree {
    #[serde(rename = "v")]
    version: u32,
    #[serde(rename = "n")]
    nodes: Vec<EncodedNode>,
}

#[derive(Deserialize)]
struct EncodedNode {
    rev: Rev,
    parent: Option<usize>,
    deleted: bool,
}

/// Orders leaves so that the maximum is the winner.
fn winner_order(a: &Leaf, b: &Leaf) -> std::cmp::Ordering {
    (!a.deleted)
        .cmp(&!b.deleted)
        .then_with(|| a.rev.cmp(&b.rev))
}

/// `parent` as the base of an edit, unless it is at the largest generation.
fn exhaustion(parent: Rev) -> Result<Rev, EditError> {
    if parent.generation() >= crate::rev::MAX_GENERATION {
        return Err(crate::rev::GenerationExhausted { parent }.into());
    }
    Ok(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(text: &str) -> Rev {
        text.parse().unwrap()
    }

    fn path(texts: &[&str]) -> Vec<Rev> {
        texts.iter().map(|text| rev(text)).collect()
    }

    #[test]
    fn a_revision_at_the_largest_generation_is_no_base_for_an_edit() {
        let largest: Rev = format!("{}-aa", crate::rev::MAX_GENERATION)
            .parse()
            .unwrap();
        for deleted in [false, true] {
            let mut tree = RevTree::new();
            tree.merge_path(std::slice::from_ref(&largest), deleted)
                .unwrap();
            let base = (!deleted).then_some(&largest);
            assert!(
                matches!(tree.edit_parent(base), Err(EditError::Exhausted(_))),
                "deleted: {deleted}"
            );
        }
    }

    #[test]
    fn concurrent_edits_become_conflicts_and_the_winner_is_couchdb_s() {
        let mut tree = RevTree::new();
        tree.merge_path(&path(&["2-b", "1-a"]), false).unwrap();
        tree.merge_path(&path(&["2-c", "1-a"]), false).unwrap();
        assert_eq!(tree.winner().unwrap().rev, rev("2-c"));
        assert_eq!(tree.conflicts(), path(&["2-b"]));
        // A deleted leaf never beats a live one, whatever its generation.
        tree.merge_path(&path(&["3-z", "2-c", "1-a"]), true)
            .unwrap();
        assert_eq!(tree.winner().unwrap().rev, rev("2-b"));
        assert!(tree.conflicts().is_empty());
        assert_eq!(tree.deleted_conflicts(), path(&["3-z"]));
    }

    #[test]
    fn the_stored_form_is_compact_and_version_1_still_reads() {
        let mut tree = RevTree::new();
        tree.merge_path(&path(&["2-b", "1-a"]), false).unwrap();
        tree.merge_path(&path(&["3-c", "2-c", "1-a"]), true)
            .unwrap();
        let text = tree.encode();
        assert_eq!(text, "1-a 2-b<0 2-c<0 3-c<2!");
        assert_eq!(RevTree::decode(&text).unwrap(), tree);
        // A stemmed tree: several roots.
        let mut stemmed = RevTree::new();
        stemmed.merge_path(&path(&["5-e", "4-d"]), false).unwrap();
        stemmed.merge_path(&path(&["9-x"]), true).unwrap();
        assert_eq!(RevTree::decode(&stemmed.encode()).unwrap(), stemmed);
        let version_1 = r#"{"v":1,"n":[{"rev":"1-a","parent":null,"deleted":false},
            {"rev":"2-b","parent":0,"deleted":false},{"rev":"2-c","parent":0,"deleted":false},
            {"rev":"3-c","parent":2,"deleted":true}]}"#;
        assert_eq!(RevTree::decode(version_1).unwrap(), tree);
        for bad in ["1-a<1", "1-a<x", "zz", r#"{"v":7,"n":[]}"#] {
            assert!(RevTree::decode(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn all_deleted_picks_the_highest_tombstone() {
        let mut tree = RevTree::new();
        tree.merge_path(&path(&["2-a", "1-a"]), true).unwrap();
        tree.merge_path(&path(&["3-b", "2-b", "1-a"]), true)
            .unwrap();
        let winner = tree.winner().unwrap();
        assert!(winner.deleted);
        assert_eq!(winner.rev, rev("3-b"));
    }

    #[test]
    fn edits_need_the_current_leaf() {
        let mut tree = RevTree::new();
        assert_eq!(tree.edit_parent(None), Ok(None));
        assert_eq!(
            tree.edit_parent(Some(&rev("1-a"))),
            Err(EditError::NoSuchDocument)
        );
        tree.add_child(None, rev("1-a"), false);
        assert_eq!(tree.edit_parent(None), Err(EditError::MissingBase));
        tree.add_child(Some(&rev("1-a")), rev("2-a"), false);
        assert_eq!(
            tree.edit_parent(Some(&rev("1-a"))),
            Err(EditError::StaleBase(rev("1-a")))
        );
        assert_eq!(tree.edit_parent(Some(&rev("2-a"))), Ok(Some(rev("2-a"))));
    }

    #[test]
    fn recreating_a_deleted_document_continues_the_tombstone_branch() {
        let mut tree = RevTree::new();
        tree.add_child(None, rev("1-a"), false);
        tree.add_child(Some(&rev("1-a")), rev("2-d"), true);
        let parent = tree.edit_parent(None).unwrap();
        assert_eq!(parent, Some(rev("2-d")));
        tree.add_child(parent.as_ref(), rev("3-n"), false);
        assert_eq!(tree.winner().unwrap().rev, rev("3-n"));
        assert_eq!(tree.ancestry(&rev("3-n"), 10), path(&["3-n", "2-d", "1-a"]));
        assert!(tree.is_deleted(&rev("2-d")));
    }

    #[test]
    fn merging_is_idempotent_and_reattaches_parents() {
        let mut tree = RevTree::new();
        assert_eq!(
            tree.merge_path(&path(&["3-c"]), false).unwrap(),
            Applied::Added
        );
        assert_eq!(tree.ancestry(&rev("3-c"), 10), path(&["3-c"]));
        assert_eq!(
            tree.merge_path(&path(&["3-c", "2-b", "1-a"]), false)
                .unwrap(),
            Applied::AlreadyPresent
        );
        assert_eq!(tree.ancestry(&rev("3-c"), 10), path(&["3-c", "2-b", "1-a"]));
        assert_eq!(tree.leaves().len(), 1);
        assert_eq!(
            tree.merge_path(&path(&["3-c", "1-a"]), false),
            Err(PathError::NotConsecutive(rev("1-a")))
        );
    }

    #[test]
    fn stemming_keeps_leaves_and_recent_history() {
        let mut tree = RevTree::new();
        tree.merge_path(&path(&["4-d", "3-c", "2-b", "1-a"]), false)
            .unwrap();
        tree.merge_path(&path(&["2-x", "1-a"]), false).unwrap();
        // 1-a is two steps above 4-d but only one above 2-x, so it stays.
        let dropped = tree.stem(2);
        assert_eq!(dropped, path(&["2-b"]));
        let leaves: Vec<Rev> = tree.leaves().into_iter().map(|leaf| leaf.rev).collect();
        assert_eq!(leaves, path(&["2-x", "4-d"]));
        assert_eq!(tree.ancestry(&rev("4-d"), 10), path(&["4-d", "3-c"]));
        assert_eq!(tree.ancestry(&rev("2-x"), 10), path(&["2-x", "1-a"]));
        assert_eq!(tree.stem(0), path(&["1-a", "3-c"]));
        assert_eq!(tree.len(), 2);
    }

    #[test]
    fn revs_diff_reports_missing_and_possible_ancestors() {
        let mut tree = RevTree::new();
        tree.merge_path(&path(&["2-b", "1-a"]), false).unwrap();
        let asked = path(&["1-a", "3-c", "2-b", "3-c"]);
        let diff = tree.revs_diff(&asked);
        assert_eq!(diff.missing, path(&["3-c"]));
        assert_eq!(diff.possible_ancestors, path(&["2-b"]));
    }

    #[test]
    fn encoding_round_trips() {
        let mut tree = RevTree::new();
        tree.merge_path(&path(&["3-c", "2-b", "1-a"]), true)
            .unwrap();
        tree.merge_path(&path(&["2-x", "1-a"]), false).unwrap();
        tree.merge_path(&path(&["9-q"]), false).unwrap();
        let decoded = RevTree::decode(&tree.encode()).unwrap();
        assert_eq!(decoded, tree);
        assert!(RevTree::decode(r#"{"v":2,"n":[]}"#).is_err());
        assert!(RevTree::decode(r#"{"v":1,"n":[["1-a",5,false]]}"#).is_err());
    }

    #[test]
    fn body_window_counts_steps_from_the_nearest_leaf() {
        let mut tree = RevTree::new();
        tree.merge_path(&path(&["4-d", "3-c", "2-b", "1-a"]), false)
            .unwrap();
        tree.merge_path(&path(&["2-x", "1-a"]), false).unwrap();
        let window: Vec<Rev> = tree.body_window(1).into_iter().collect();
        assert_eq!(window, path(&["1-a", "2-x", "3-c", "4-d"]));
    }
}
