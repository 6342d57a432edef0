//! Ferry's pure core: the data model and the algorithms of an offline-first sync engine.
//!
//! Nothing here performs I/O, reads a clock or spawns a task: time is an argument
//! ([`hlc::HlcClock::now`] takes the wall-clock milliseconds) and transport belongs to the caller
//! ([`replicate::Replication`] says what to send and is told what came back). That is what lets
//! every algorithm here be tested exhaustively and simulated deterministically.
//!
//! - [`json`]: strict JSON parsing (no duplicate keys, bounded depth) and the canonical encoding.
//! - [`rev`]: revision ids `N-hash`, computed deterministically from parent, deleted flag and body.
//! - [`tree`]: a document's revision tree: edits, merging replicated paths, winner, conflicts,
//!   stemming.
//! - [`hlc`]: hybrid logical clock timestamps for last-write-wins decisions.
//! - [`model`]: documents, collections, ids and the limits every replica enforces.
//! - [`selector`]: Mango selectors for filtered changes and queries.
//! - [`couch`]: the CouchDB document format on the wire, converted explicitly.
//! - [`replicate`]: one-way replication (checkpoints, changes, revs-diff, fetch, write) as a
//!   state machine.
//! - [`connection`]: the sync connection (open, back off, ask for credentials) as a state
//!   machine.
//!
//! ```
//! use ferry_core::{json, rev::Rev, tree::RevTree};
//! let body = json::parse_object(br#"{"title":"buy milk"}"#, 64).unwrap();
//! let mut tree = RevTree::new();
//! let parent = tree.edit_parent(None).unwrap();
//! let rev = Rev::compute(parent.as_ref(), false, &json::canonical_object(&body)).unwrap();
//! tree.add_child(parent.as_ref(), rev.clone(), false);
//! assert_eq!(tree.winner().unwrap().rev, rev);
//! ```

pub mod connection;
pub mod couch;
pub mod filter;
pub mod hlc;
pub mod json;
pub mod model;
pub mod protocol;
pub mod replicate;
pub mod resolve;
pub mod rev;
pub mod selector;
pub mod tree;
