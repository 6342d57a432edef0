//! Property tests of the revision tree: the same revisions in any order, any number of times,
//! give the same tree; identical edits on two replicas give identical revision ids; stemming
//! never drops a leaf.

use ferry_core::json::canonical;
use ferry_core::rev::Rev;
use ferry_core::tree::RevTree;
use proptest::prelude::*;
use serde_json::json;

/// A history: a set of revisions, each a path (newest first) ending at a first revision, made
/// by random edits and deletions of random leaves.
fn arb_history() -> impl Strategy<Value = Vec<(Vec<Rev>, bool)>> {
    // Each step: which existing path to extend (or start anew), the body value, deleted.
    prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<bool>()), 1..25).prop_map(
        |steps| {
            let mut paths: Vec<(Vec<Rev>, bool)> = Vec::new();
            for (pick, value, deleted) in steps {
                let parent_path = if paths.is_empty() || value == 0 {
                    Vec::new()
                } else {
                    paths[pick.index(paths.len())].0.clone()
                };
                let body = canonical(&json!({ "v": value }));
                let rev = Rev::compute(parent_path.first(), deleted, &body).unwrap();
                let mut path = vec![rev];
                path.extend(parent_path);
                paths.push((path, deleted));
            }
            paths
        },
    )
}

fn build(paths: &[(Vec<Rev>, bool)]) -> RevTree {
    let mut tree = RevTree::new();
    for (path, deleted) in paths {
        tree.merge_path(path, *deleted).unwrap();
    }
    tree
}

proptest! {
    #[test]
    fn any_order_and_repetition_gives_the_same_tree(
        history in arb_history(),
        seed in any::<u64>(),
        repeats in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let reference = build(&history);
        let mut shuffled = history.clone();
        // A deterministic shuffle driven by the seed, plus some repeated deliveries.
        let mut state = seed | 1;
        for index in (1..shuffled.len()).rev() {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            let other = usize::try_from(state % (index as u64 + 1)).unwrap();
            shuffled.swap(index, other);
        }
        for repeat in repeats {
            shuffled.push(history[repeat.index(history.len())].clone());
        }
        let other = build(&shuffled);
        prop_assert_eq!(&other, &reference);
        prop_assert_eq!(other.winner(), reference.winner());
        prop_assert_eq!(other.conflicts(), reference.conflicts());
        prop_assert_eq!(RevTree::decode(&other.encode()).unwrap(), reference);
    }

    #[test]
    fn partial_paths_converge_once_full_history_arrives(history in arb_history()) {
        // Send every revision with only its own id first (no ancestry), then the full paths.
        let mut tree = RevTree::new();
        for (path, deleted) in &history {
            tree.merge_path(&path[..1], *deleted).unwrap();
        }
        for (path, deleted) in &history {
            tree.merge_path(path, *deleted).unwrap();
        }
        prop_assert_eq!(tree, build(&history));
    }

    #[test]
    fn identical_edits_on_two_replicas_give_identical_revisions(
        history in arb_history(),
        value in any::<u32>(),
        deleted in any::<bool>(),
    ) {
        let mut first = build(&history);
        let mut second = build(&history);
        let body = canonical(&json!({"edited": value}));
        let parent_first = first.winner().map(|leaf| leaf.rev);
        let parent_second = second.winner().map(|leaf| leaf.rev);
        let rev_first = Rev::compute(parent_first.as_ref(), deleted, &body).unwrap();
        let rev_second = Rev::compute(parent_second.as_ref(), deleted, &body).unwrap();
        prop_assert_eq!(&rev_first, &rev_second);
        first.add_child(parent_first.as_ref(), rev_first, deleted);
        second.add_child(parent_second.as_ref(), rev_second, deleted);
        prop_assert_eq!(first, second);
    }

    #[test]
    fn stemming_never_drops_a_leaf(history in arb_history(), limit in 0usize..6) {
        let mut tree = build(&history);
        let leaves_before = tree.leaves();
        let winner_before = tree.winner();
        tree.stem(limit);
        prop_assert_eq!(tree.leaves(), leaves_before);
        prop_assert_eq!(tree.winner(), winner_before);
        // Every revision kept is within the limit of some leaf (a revision shared by two
        // branches can make one leaf's ancestry longer than the limit, as in CouchDB).
        let distances = tree.leaf_distances();
        for rev in tree.revs() {
            prop_assert!(distances[rev] < limit.max(1));
        }
    }
}
