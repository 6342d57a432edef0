//! Automatic resolution across several replicas: random concurrent edits, random sync order,
//! every policy. Every replica resolves each conflict it sees on its own; afterwards all
//! replicas must hold the same tree, winner, body and conflicts, and a further round of syncing
//! must change nothing (no resolution ping-pong), with no edit lost from any tree.

use std::collections::BTreeMap;

use ferry_core::hlc::Timestamp;
use ferry_core::json::canonical_object;
use ferry_core::model::Body;
use ferry_core::resolve::{Conflict, Policy, Resolution, Version, resolve, resolve_with};
use ferry_core::rev::Rev;
use ferry_core::tree::RevTree;
use proptest::prelude::*;
use serde_json::{Value, json};

/// How a test replica resolves.
#[derive(Clone, Copy, Debug)]
enum Resolver {
    Policy(Policy),
    /// Merge asked, but no ancestor body is ever available (the fallback path).
    MergeWithoutAncestors,
    /// An application function: every field takes the largest value any version has.
    Custom,
}

/// One document on one replica: its tree, and every revision's deleted flag, body and clock.
#[derive(Clone, Debug, Default, PartialEq)]
struct Replica {
    tree: RevTree,
    revs: BTreeMap<Rev, (bool, Body, Timestamp)>,
}

impl Replica {
    fn add(&mut self, parent: Option<&Rev>, deleted: bool, body: Body, hlc: Timestamp) -> Rev {
        let rev = Rev::compute(parent, deleted, &canonical_object(&body)).unwrap();
        self.tree.add_child(parent, rev.clone(), deleted);
        self.revs.entry(rev.clone()).or_insert((deleted, body, hlc));
        rev
    }

    fn edit(&mut self, field: u8, value: u8, hlc: Timestamp) -> Rev {
        let winner = self.tree.winner();
        let (parent, mut body) = match &winner {
            Some(leaf) if !leaf.deleted => (Some(leaf.rev.clone()), self.revs[&leaf.rev].1.clone()),
            Some(leaf) => (Some(leaf.rev.clone()), Body::new()),
            None => (None, Body::new()),
        };
        body.insert(format!("f{field}"), json!(value));
        self.add(parent.as_ref(), false, body, hlc)
    }

    fn delete(&mut self, hlc: Timestamp) -> Option<Rev> {
        let winner = self.tree.winner().filter(|leaf| !leaf.deleted)?;
        Some(self.add(Some(&winner.rev), true, Body::new(), hlc))
    }

    /// Copies every revision `other` has and this replica lacks, with its ancestry.
    fn receive(&mut self, other: &Replica) -> bool {
        let mut changed = false;
        for (rev, (deleted, body, hlc)) in &other.revs {
            if self.revs.contains_key(rev) {
                continue;
            }
            let path = other.tree.ancestry(rev, usize::MAX);
            self.tree.merge_path(&path, *deleted).unwrap();
            self.revs
                .insert(rev.clone(), (*deleted, body.clone(), *hlc));
            changed = true;
        }
        changed
    }

    fn conflict(&self, resolver: Resolver) -> Option<Conflict> {
        let live: Vec<Rev> = self.tree.live_leaves();
        if live.len() < 2 {
            return None;
        }
        let versions = live
            .iter()
            .map(|rev| Version {
                rev: rev.clone(),
                hlc: self.revs[rev].2,
                body: self.revs[rev].1.clone(),
            })
            .collect();
        let ancestor = match resolver {
            Resolver::MergeWithoutAncestors => None,
            _ => self.tree.common_ancestor(&live).map(|rev| {
                let body = self.revs[&rev].1.clone();
                (rev, Some(body))
            }),
        };
        Some(Conflict { versions, ancestor })
    }

    /// Resolves every conflict this replica sees, as a replica would after receiving.
    fn resolve_all(&mut self, resolver: Resolver) {
        for _ in 0..10 {
            let Some(conflict) = self.conflict(resolver) else {
                return;
            };
            let resolution = match resolver {
                Resolver::Policy(policy) => match resolve(policy, &conflict) {
                    Some(resolution) => resolution,
                    None => return,
                },
                Resolver::MergeWithoutAncestors => resolve(Policy::Merge, &conflict).unwrap(),
                Resolver::Custom => resolve_with(&conflict, largest_values(&conflict)).unwrap(),
            };
            self.apply(&resolution);
        }
        panic!("a resolution did not end the conflict");
    }

    fn apply(&mut self, resolution: &Resolution) {
        let written = self.add(
            Some(&resolution.parent),
            false,
            resolution.body.clone(),
            resolution.hlc,
        );
        assert_eq!(written, resolution.rev());
        for leaf in &resolution.superseded {
            let tombstone = self.add(Some(leaf), true, Body::new(), resolution.hlc);
            assert_eq!(tombstone, Resolution::tombstone(leaf).unwrap());
        }
    }

    /// What must be identical on every replica.
    fn digest(&self) -> (RevTree, Option<(Rev, bool, Body)>, Vec<Rev>) {
        let winner = self.tree.winner().map(|leaf| {
            (
                leaf.rev.clone(),
                leaf.deleted,
                self.revs[&leaf.rev].1.clone(),
            )
        });
        (self.tree.clone(), winner, self.tree.conflicts())
    }
}

fn largest_values(conflict: &Conflict) -> Body {
    let mut body = Body::new();
    for version in &conflict.versions {
        for (key, value) in &version.body {
            let keep = match body.get(key) {
                Some(Value::Number(current)) => value.as_u64() > current.as_u64(),
                _ => true,
            };
            if keep {
                body.insert(key.clone(), value.clone());
            }
        }
    }
    body
}

#[derive(Clone, Debug)]
enum Op {
    Edit {
        replica: usize,
        field: u8,
        value: u8,
    },
    Delete {
        replica: usize,
    },
    Sync {
        from: usize,
        to: usize,
    },
}

fn ops(replicas: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => (0..replicas, 0u8..3, 0u8..5).prop_map(|(replica, field, value)| Op::Edit { replica, field, value }),
        1 => (0..replicas).prop_map(|replica| Op::Delete { replica }),
        4 => (0..replicas, 0..replicas).prop_map(|(from, to)| Op::Sync { from, to }),
    ];
    proptest::collection::vec(op, 1..60)
}

fn resolvers() -> impl Strategy<Value = Resolver> {
    prop_oneof![
        Just(Resolver::Policy(Policy::Keep)),
        Just(Resolver::Policy(Policy::LastWriteWins)),
        Just(Resolver::Policy(Policy::Merge)),
        Just(Resolver::MergeWithoutAncestors),
        Just(Resolver::Custom),
    ]
}

/// Syncs every pair until nothing changes; returns how many full rounds it took.
fn sync_to_fixpoint(replicas: &mut [Replica], resolver: Resolver) -> usize {
    for round in 1..=20 {
        let mut changed = false;
        for from in 0..replicas.len() {
            for to in 0..replicas.len() {
                if from != to {
                    let source = replicas[from].clone();
                    changed |= replicas[to].receive(&source);
                    replicas[to].resolve_all(resolver);
                }
            }
        }
        if !changed {
            return round;
        }
    }
    panic!("replicas kept changing: resolutions ping-pong");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_policy_converges_on_every_replica(
        replica_count in 3usize..6,
        resolver in resolvers(),
        operations in ops(5),
        skews in proptest::collection::vec(0u64..50, 5),
    ) {
        let mut replicas = vec![Replica::default(); replica_count];
        let mut clock = 1_000u64;
        let mut written = Vec::new();
        for op in operations {
            clock += 1;
            match op {
                Op::Edit { replica, field, value } => {
                    let replica = replica % replica_count;
                    // Clocks differ per replica, so last-write-wins has real decisions to make.
                    let hlc = Timestamp::new(clock + skews[replica], 0);
                    written.push(replicas[replica].edit(field, value, hlc));
                }
                Op::Delete { replica } => {
                    let replica = replica % replica_count;
                    let hlc = Timestamp::new(clock + skews[replica], 0);
                    written.extend(replicas[replica].delete(hlc));
                }
                Op::Sync { from, to } => {
                    let (from, to) = (from % replica_count, to % replica_count);
                    if from != to {
                        let source = replicas[from].clone();
                        replicas[to].receive(&source);
                        replicas[to].resolve_all(resolver);
                    }
                }
            }
        }
        sync_to_fixpoint(&mut replicas, resolver);
        // Once converged, one more round writes nothing anywhere.
        prop_assert_eq!(sync_to_fixpoint(&mut replicas, resolver), 1);
        let digest = replicas[0].digest();
        for replica in &replicas[1..] {
            prop_assert_eq!(&replica.digest(), &digest);
        }
        if !matches!(resolver, Resolver::Policy(Policy::Keep)) {
            prop_assert!(digest.2.is_empty(), "conflicts left: {:?}", digest.2);
        }
        // Nothing is lost: every revision ever written is still in every tree.
        for rev in &written {
            for replica in &replicas {
                prop_assert!(replica.tree.contains(rev));
            }
        }
    }
}
