//! A deterministic simulation of one server and 2 to 8 clients syncing through faults.
//!
//! One seed decides everything: how many clients, which documents, which conflict policies,
//! every operation (edits, deletions, recreations, manual resolutions, compactions, going
//! offline and online, syncing, live mode, clock skew) and every fault (dropped, duplicated,
//! delayed and reordered messages, one-way and two-way partitions, client and server crashes
//! that lose what was in flight and keep what was committed). The replication is the real
//! `ferry_core::replicate::Replication` state machine; replicas are `ferry_store` in-memory
//! databases (the same conformance suite as SQLite); conflicts are resolved by the real
//! `ferry_store::resolve_conflict`; a client's local steps are `ferry_sync::local`'s, and its
//! requests travel as session frames made by `ferry_sync::session` and answered by the server's
//! own decoder and `handle_request`. There is no thread, no clock but a counter, no I/O: the
//! same seed replays exactly.
//!
//! While it runs, and once faults stop and every replica has synced to quiescence, it checks:
//! - no acknowledged write is lost: a document a client no longer counts as pending has all
//!   its leaves on the server (checked after every step);
//! - reads never go backwards: a client never shows, as a document's winner, an ancestor of a
//!   winner it showed before;
//! - liveness: once faults stop, every outbox empties and syncing reaches quiescence within a
//!   bounded number of rounds (a stuck queue fails the run);
//! - convergence: every replica has the same documents, trees, winners, bodies and conflicts;
//! - no silent loss: every tree equals the oracle, the union of every revision any replica
//!   ever held;
//! - nothing applied twice: the server's changes feed lists each document once.
//!
//! `docs/testing.md` says how to replay a seed and how to soak.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use ferry_core::connection::{
    Command, Connection, ConnectionState, Event, FailureKind, Jitter, ReconnectPolicy,
};
use ferry_core::filter::ChangesFilter;
use ferry_core::json::RawJson;
use ferry_core::model::{Body, Limits, Revision};
use ferry_core::protocol::{
    BulkDocsResult, BulkGetResult, ChangesResult, ClientFrame, FRAME_ENVELOPE_DEPTH, Op,
    ServerFrame, result_as,
};
use ferry_core::replicate::{Action, Checkpoint, Replication, ReplicationConfig, Response, Stats};
use ferry_core::resolve::{Policies, Policy};
use ferry_core::rev::Rev;
use ferry_core::tree::RevTree;
use ferry_server::session::handle_request;
use ferry_store::clock::{ManualClock, ReplicaClock, WallClock};
use ferry_store::endpoint::{Endpoint, EndpointConfig, NoFanout};
use ferry_store::memory::MemoryDatabase;
use ferry_store::{Database, Edit, Replica as _, StoreConfig};
use ferry_sync::session;
use serde_json::{Value, json};

mod exhaustive;

pub use exhaustive::{Exploration, explore};

/// A run that broke an invariant, with what replays it.
#[derive(Debug)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// What broke.
    pub message: String,
}

/// The `seed` of a failure found by the exhaustive exploration, which has none.
pub const EXHAUSTIVE: u64 = u64::MAX;

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.seed == EXHAUSTIVE {
            return write!(
                f,
                "exhaustive small scope: {} (replay: cargo run -p ferry-sim --release -- --exhaustive N --faults F)",
                self.message
            );
        }
        write!(
            f,
            "seed {}: {} (replay: cargo run -p ferry-sim --release -- --seed {})",
            self.seed, self.message, self.seed
        )
    }
}

/// What a run did, for soak statistics.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Clients simulated.
    pub clients: usize,
    /// Operations applied.
    pub operations: usize,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages dropped, duplicated or cut by a crash.
    pub faults: u64,
    /// Documents in conflict at the end (kept by the `keep` policy).
    pub conflicted: usize,
    /// Sync rounds the healing phase needed.
    pub healing_rounds: usize,
}

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).unwrap_or(0)
    }

    fn chance(&mut self, per_thousand: u64) -> bool {
        self.below(1000) < per_thousand
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Push,
    Pull,
}

/// A request a client sends the server: a session frame's text, as `WsPeer` sends it.
#[derive(Clone, Debug)]
enum Request {
    Frame(String),
    /// Opens a live session.
    Hello,
}

/// The server's answer: the text of the frame the server's session handler answered with.
#[derive(Clone, Debug)]
enum Reply {
    Frame(String),
    Welcome,
}

#[derive(Clone, Debug)]
enum Payload {
    Request(Request),
    Reply(Reply),
}

#[derive(Clone, Debug)]
struct Message {
    client: usize,
    to_server: bool,
    /// Identifies the request, and the replication run waiting for the reply.
    request: u64,
    deliver_at: u64,
    payload: Payload,
}

/// What a replication run waits for from the server.
#[derive(Clone, Debug)]
enum Waiting {
    Checkpoints {
        local: Option<Checkpoint>,
    },
    Changes,
    Missing,
    /// A `bulk_get` of `asked` revisions, after those already `fetched` (an answer bounded
    /// by bytes serves a prefix, and the rest is asked for again).
    Revisions {
        fetched: Vec<Revision>,
        asked: usize,
    },
    Written {
        sent: Vec<(String, Rev)>,
    },
    TargetCheckpoint {
        checkpoint: Checkpoint,
    },
    SourceCheckpoint,
}

#[derive(Clone)]
struct Run {
    machine: Replication,
    replication_id: String,
    waiting: Option<(u64, Waiting, u64)>,
    stats: Stats,
}

/// A replica as the shipping code runs one: a store, the wall clock it reads, its one hybrid
/// logical clock over that wall, and its endpoint's rules.
struct Replica {
    db: Arc<MemoryDatabase>,
    wall: Arc<ManualClock>,
    clock: ReplicaClock,
    config: EndpointConfig,
}

impl Replica {
    fn new(db: MemoryDatabase, config: EndpointConfig) -> Replica {
        let wall = Arc::new(ManualClock::new(0));
        Replica {
            db: Arc::new(db),
            clock: ReplicaClock::new(wall.clone(), MAX_CLOCK_DRIFT_MS),
            wall,
            config,
        }
    }

    /// The replica's endpoint (`ferry_store::endpoint`, the code every transport calls), its
    /// wall clock showing `wall_ms`.
    fn at<'a>(&'a self, wall_ms: u64, policies: &'a Policies) -> Endpoint<'a> {
        self.wall.set(wall_ms);
        Endpoint::new(&*self.db, &self.config, &self.clock, &NoFanout).resolving_by(policies)
    }
}

impl fmt::Debug for Replica {
    /// What the rest of a run depends on: the store and the clock (the wall is set before
    /// every use).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("db", &self.db)
            .field("clock", &self.clock)
            .finish()
    }
}

impl Clone for Replica {
    /// A copy with a store and clocks of its own.
    fn clone(&self) -> Replica {
        let wall = Arc::new(ManualClock::new(self.wall.now_ms()));
        Replica {
            db: Arc::new(self.db.snapshot()),
            clock: ReplicaClock::resumed(wall.clone(), MAX_CLOCK_DRIFT_MS, self.clock.last()),
            wall,
            config: self.config.clone(),
        }
    }
}

/// A live client's sync connection: the shipping connection machine (`ferry_core::connection`,
/// which the SDK's sync loop drives too) and the driver's side of its last command.
#[derive(Clone, Debug)]
struct Live {
    machine: Connection,
    command: Command,
    /// The `Hello` in flight while opening a session: its request id and when it was sent.
    hello: Option<(u64, u64)>,
    /// When a `Command::Pause` ends.
    pause_until: u64,
}

impl Live {
    fn new(online: bool, jitter: u64) -> Live {
        let mut machine = Connection::new(reconnect_policy(), Jitter::seeded(jitter));
        let command = machine.start(online).command;
        Live {
            machine,
            command,
            hello: None,
            pause_until: 0,
        }
    }
}

/// Reconnecting as the SDK does, scaled to the simulation's timeouts.
fn reconnect_policy() -> ReconnectPolicy {
    ReconnectPolicy {
        enabled: true,
        initial_delay: std::time::Duration::from_millis(50),
        max_delay: std::time::Duration::from_millis(RECONNECT_MAX_DELAY_MS),
    }
}

struct Client {
    replica: Replica,
    skew_ms: i64,
    /// What this client pulls (`SyncOptions::only_subscribed` pulls by a selector); pushes
    /// carry everything.
    pull_filter: ChangesFilter,
    online: bool,
    /// Syncing in the background (`Ferry::start_sync`), through the connection machine.
    live: Option<Live>,
    push: Option<Run>,
    pull: Option<Run>,
    /// Winners shown so far, per document (reads must not go backwards).
    shown: BTreeMap<String, BTreeSet<Rev>>,
    /// Partitions: messages to the server dropped until, and from it.
    cut_up_until: u64,
    cut_down_until: u64,
    /// Whether both directions finished a run that wrote nothing since the last local change.
    quiet: (bool, bool),
    /// Local edits made, and replications started per direction (they name the sessions, so
    /// the same history gives the same names whatever the interleaving).
    edits: u64,
    runs_started: [u64; 2],
}

struct World {
    seed: u64,
    rng: Rng,
    now: u64,
    server: Replica,
    policies: Policies,
    clients: Vec<Client>,
    network: Vec<Message>,
    next_request: u64,
    /// Every revision any replica ever held, per document.
    oracle: BTreeMap<String, RevTree>,
    /// Every revision the server acknowledged.
    acknowledged: Vec<(String, Rev)>,
    docs: Vec<String>,
    faults_on: bool,
    drop_rate: u64,
    dup_rate: u64,
    reorder: bool,
    /// Explored exhaustively (`exhaustive.rs`): no random faults or delays, and clocks that
    /// depend on each client's own history only.
    exhaustive: bool,
    outcome: Outcome,
}

impl Clone for Client {
    /// A copy with a store of its own.
    fn clone(&self) -> Client {
        Client {
            replica: self.replica.clone(),
            skew_ms: self.skew_ms,
            pull_filter: self.pull_filter.clone(),
            online: self.online,
            live: self.live.clone(),
            push: self.push.clone(),
            pull: self.pull.clone(),
            shown: self.shown.clone(),
            cut_up_until: self.cut_up_until,
            cut_down_until: self.cut_down_until,
            quiet: self.quiet,
            edits: self.edits,
            runs_started: self.runs_started,
        }
    }
}

impl Clone for World {
    /// A copy with stores of its own, which then goes its own way.
    fn clone(&self) -> World {
        World {
            seed: self.seed,
            rng: self.rng.clone(),
            now: self.now,
            server: self.server.clone(),
            policies: self.policies.clone(),
            clients: self.clients.clone(),
            network: self.network.clone(),
            next_request: self.next_request,
            oracle: self.oracle.clone(),
            acknowledged: self.acknowledged.clone(),
            docs: self.docs.clone(),
            faults_on: self.faults_on,
            drop_rate: self.drop_rate,
            dup_rate: self.dup_rate,
            reorder: self.reorder,
            exhaustive: self.exhaustive,
            outcome: self.outcome.clone(),
        }
    }
}

const BATCH: usize = 3;
/// Full batches between checkpoints: small enough that runs cut between two checkpoints
/// resume from an older one.
const CHECKPOINT_EVERY: usize = 2;
/// The server's default drift limit, also the SDK's: clock skews stay well inside it.
const MAX_CLOCK_DRIFT_MS: u64 = 60_000;
const REQUEST_TIMEOUT_MS: u64 = 2_000;
/// The longest pause between two attempts to open a live session.
const RECONNECT_MAX_DELAY_MS: u64 = 2_000;
const HEALING_ROUNDS: usize = 60;

/// What a client pulls: mostly everything; sometimes only what an offline subscription selects
/// (`SyncOptions::only_subscribed`), built by the same functions the SDK uses.
fn subscription_filter(rng: &mut Rng) -> ChangesFilter {
    let selector = match rng.below(4) {
        0 => ferry_core::filter::collection_selector("a"),
        1 => ferry_core::filter::query_selector("b", json!({"f": {"$gte": 2}})),
        _ => return ChangesFilter::all(),
    };
    ChangesFilter::selector(selector).expect("a valid selector")
}

fn limits() -> Limits {
    Limits {
        revs_limit: 10_000,
        ..Limits::default()
    }
}

fn fail(seed: u64, message: impl Into<String>) -> Failure {
    Failure {
        seed,
        message: message.into(),
    }
}

/// Prints a step when `SIM_TRACE` is set, to follow a failing seed.
fn trace(step: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("SIM_TRACE").is_some()) {
        eprintln!("{}", step());
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let client_count = 2 + rng.index(7);
        let doc_count = 1 + rng.index(5);
        let collections = ["a", "b"];
        let docs: Vec<String> = (0..doc_count)
            .map(|n| format!("{}:{n}", collections[n % 2]))
            .collect();
        let policy_of = |rng: &mut Rng| match rng.below(3) {
            0 => Policy::Keep,
            1 => Policy::LastWriteWins,
            _ => Policy::Merge,
        };
        let policies = Policies::default()
            .with("a", policy_of(&mut rng))
            .with("b", policy_of(&mut rng));
        let config = |track_pending| StoreConfig {
            limits: limits(),
            track_pending,
            ..StoreConfig::default()
        };
        // The server refuses clocks too far ahead, as `ferry serve` does; a client takes what
        // its server accepted, as the SDK does.
        let endpoint = |refuse_clocks_ahead| EndpointConfig {
            limits: limits(),
            refuse_clocks_ahead,
        };
        // Drawn from a stream of their own, so that adding them left every seed's other
        // choices as they were.
        let mut filters = Rng(seed ^ 0x0f11_7e12_50fc_0ffe);
        let mut jitters = Rng(seed ^ 0x5eed_0fba_c0ff_ee00);
        let clients = (0..client_count)
            .map(|n| Client {
                replica: Replica::new(
                    MemoryDatabase::new("local", &format!("client{n}"), config(true)),
                    endpoint(false),
                ),
                skew_ms: 0,
                pull_filter: subscription_filter(&mut filters),
                online: true,
                live: rng.chance(500).then(|| Live::new(true, jitters.next())),
                push: None,
                pull: None,
                shown: BTreeMap::new(),
                cut_up_until: 0,
                cut_down_until: 0,
                quiet: (false, false),
                edits: 0,
                runs_started: [0, 0],
            })
            .collect();
        World {
            seed,
            server: Replica::new(
                MemoryDatabase::new("db", "server", config(false)),
                endpoint(true),
            ),
            policies,
            clients,
            network: Vec::new(),
            next_request: 0,
            oracle: BTreeMap::new(),
            acknowledged: Vec::new(),
            docs,
            faults_on: true,
            drop_rate: rng.below(80),
            dup_rate: rng.below(80),
            reorder: rng.chance(500),
            exhaustive: false,
            rng,
            now: 1_000_000,
            outcome: Outcome {
                clients: client_count,
                ..Outcome::default()
            },
        }
    }

    fn fail(&self, message: impl Into<String>) -> Failure {
        fail(self.seed, message)
    }

    /// A client's replica endpoint, its wall clock set to the client's time.
    fn client_endpoint(&self, client: usize) -> Endpoint<'_> {
        self.clients[client]
            .replica
            .at(self.client_wall(client), &self.policies)
    }

    /// What `db` holds of `doc_id` (an empty tree for a document it lacks).
    fn tree_in(&self, db: &MemoryDatabase, doc_id: &str) -> Result<RevTree, Failure> {
        db.get_tree(doc_id)
            .map(Option::unwrap_or_default)
            .map_err(|e| self.fail(e.to_string()))
    }

    /// The server's replica endpoint, at the world's time.
    fn server_endpoint(&self) -> Endpoint<'_> {
        self.server.at(self.now, &self.policies)
    }

    fn client_wall(&self, client: usize) -> u64 {
        if self.exhaustive {
            return 1_000_000 + self.clients[client].edits * 1_000 + client as u64;
        }
        self.now.saturating_add_signed(self.clients[client].skew_ms)
    }

    /// Adds what `db` holds of `doc_id` to the oracle.
    fn observe(&mut self, db: &MemoryDatabase, doc_id: &str) -> Result<(), Failure> {
        let Some(tree) = db.get_tree(doc_id).map_err(|e| self.fail(e.to_string()))? else {
            return Ok(());
        };
        let oracle = self.oracle.entry(doc_id.to_owned()).or_default();
        let deleted_leaves: BTreeSet<Rev> = tree
            .leaves()
            .into_iter()
            .filter(|leaf| leaf.deleted)
            .map(|leaf| leaf.rev)
            .collect();
        // Each revision with its parent: the whole tree, one step per revision (merging each
        // leaf's whole ancestry would walk shared ancestors once per leaf).
        for rev in tree.revs() {
            let path: Vec<Rev> = std::iter::once(rev)
                .chain(tree.parent(rev))
                .cloned()
                .collect();
            oracle
                .merge_path(&path, deleted_leaves.contains(rev))
                .map_err(|e| fail(self.seed, e.to_string()))?;
        }
        Ok(())
    }

    // ---- operations ----------------------------------------------------------------------

    fn random_body(&mut self) -> Body {
        let mut body = Body::new();
        for field in ["f", "g", "h"] {
            if self.rng.chance(700) {
                body.insert(field.to_owned(), json!(self.rng.below(4)));
            }
        }
        body
    }

    fn edit(&mut self, client: usize, edit: Edit) -> Result<(), Failure> {
        let doc_id = edit.doc_id.clone();
        let result = self
            .client_endpoint(client)
            .write_edits(vec![edit])
            .map_err(|e| self.fail(format!("edit: {e}")))?;
        self.clients[client].edits += 1;
        let db = self.clients[client].replica.db.clone();
        trace(|| {
            format!(
                "t{} client {client} edit {doc_id} -> {:?} pending {:?}",
                self.now,
                result,
                db.pending().unwrap_or_default()
            )
        });
        self.clients[client].quiet = (false, false);
        self.observe(&db, &doc_id)
    }

    fn operate(&mut self) -> Result<(), Failure> {
        let client = self.rng.index(self.clients.len());
        let doc_id = self.docs[self.rng.index(self.docs.len())].clone();
        let db = self.clients[client].replica.db.clone();
        let current = db
            .get_document(&doc_id)
            .map_err(|e| self.fail(e.to_string()))?;
        match self.rng.below(100) {
            // Create, update, patch.
            0..=39 => {
                let (base, mut body) = match &current {
                    Some(document) if !document.deleted => {
                        (Some(document.rev.clone()), document.body.clone())
                    }
                    _ => (None, Body::new()),
                };
                if self.rng.chance(500) {
                    body = self.random_body();
                } else {
                    let field = ["f", "g", "h"][self.rng.index(3)];
                    body.insert(field.to_owned(), json!(self.rng.below(6)));
                }
                self.edit(client, Edit::put(doc_id, base, body))?;
            }
            // Delete, or recreate a deleted document.
            40..=49 => match &current {
                Some(document) if !document.deleted => {
                    self.edit(client, Edit::delete(doc_id, document.rev.clone()))?;
                }
                _ => {
                    let body = self.random_body();
                    self.edit(client, Edit::put(doc_id, None, body))?;
                }
            },
            // Resolve by hand with an automatic policy.
            50..=54 => {
                let policy = if self.rng.chance(500) {
                    Policy::LastWriteWins
                } else {
                    Policy::Merge
                };
                if ferry_store::resolve_conflict(&*db, &doc_id, policy)
                    .map_err(|e| self.fail(e.to_string()))?
                    .is_some()
                {
                    trace(|| {
                        format!(
                            "t{} client {client} resolved {doc_id} by hand; pending {:?}",
                            self.now,
                            db.pending().unwrap_or_default()
                        )
                    });
                    self.clients[client].quiet = (false, false);
                    self.observe(&db, &doc_id)?;
                }
            }
            55..=57 => {
                if self.rng.chance(300) {
                    self.server
                        .db
                        .compact()
                        .map_err(|e| self.fail(e.to_string()))?;
                } else {
                    db.compact().map_err(|e| self.fail(e.to_string()))?;
                }
            }
            58..=63 => {
                let online = !self.clients[client].online;
                self.clients[client].online = online;
                if !online {
                    self.disconnect(client);
                }
                self.tell_live(client, Event::Online(online))?;
            }
            64..=79 => self.start_sync(client),
            80..=82 => {
                // Starting the background sync, or stopping it (its runs finish on their own).
                let live = match self.clients[client].live {
                    Some(_) => None,
                    None => Some(Live::new(self.clients[client].online, self.rng.next())),
                };
                self.clients[client].live = live;
                if self.clients[client].live.is_some() {
                    self.drive_live(client)?;
                }
            }
            83..=85 => {
                self.clients[client].skew_ms = self.rng.below(60_000).cast_signed() - 30_000;
            }
            86..=88 => {
                // Partition: one way or both, for a while.
                let until = self.now + 100 + self.rng.below(3_000);
                match self.rng.below(3) {
                    0 => self.clients[client].cut_up_until = until,
                    1 => self.clients[client].cut_down_until = until,
                    _ => {
                        self.clients[client].cut_up_until = until;
                        self.clients[client].cut_down_until = until;
                    }
                }
            }
            89..=92 => self.crash_client(client),
            93..=94 => self.crash_server()?,
            _ => {
                // Let time pass.
                self.now += self.rng.below(500);
            }
        }
        Ok(())
    }

    /// Loses what the client held in memory: its replications and their requests.
    fn disconnect(&mut self, client: usize) {
        self.clients[client].push = None;
        self.clients[client].pull = None;
        let before = self.network.len();
        self.network.retain(|message| message.client != client);
        self.outcome.faults += (before - self.network.len()) as u64;
    }

    fn crash_client(&mut self, client: usize) {
        trace(|| format!("t{} client {client} crash", self.now));
        self.disconnect(client);
        self.clients[client].shown.clear();
        // The application starts again, and its background sync with it.
        if self.clients[client].live.is_some() {
            let online = self.clients[client].online;
            self.clients[client].live = Some(Live::new(online, self.rng.next()));
        }
    }

    /// The server loses every session and every message in flight; its store keeps what it
    /// committed.
    fn crash_server(&mut self) -> Result<(), Failure> {
        let before = self.network.len();
        self.network.clear();
        self.outcome.faults += before as u64;
        for client in &mut self.clients {
            client.push = None;
            client.pull = None;
        }
        for client in 0..self.clients.len() {
            let in_session = self.clients[client]
                .live
                .as_ref()
                .is_some_and(|live| matches!(live.command, Command::Open | Command::Await));
            if in_session {
                self.tell_live(client, transient("the server went away"))?;
            }
        }
        Ok(())
    }

    // ---- the background sync: the connection machine's driver -----------------------------

    /// Tells a live client's connection machine what happened, and does what it says.
    fn tell_live(&mut self, client: usize, event: Event) -> Result<(), Failure> {
        let Some(live) = self.clients[client].live.as_mut() else {
            return Ok(());
        };
        trace(|| format!("t{} client {client} connection: {event:?}", self.now));
        live.command = live.machine.handle(event).command;
        live.hello = None;
        live.pause_until = match live.command {
            Command::Pause(delay) => self
                .now
                .saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
            _ => 0,
        };
        self.drive_live(client)
    }

    /// Does what a live client's last command says, as far as it can now: sends the `Hello`
    /// of a session being opened, keeps an open session's replications running (restarting
    /// them when they finish, as continuous ones go on), ends a pause that is over.
    fn drive_live(&mut self, client: usize) -> Result<(), Failure> {
        let Some(live) = &self.clients[client].live else {
            return Ok(());
        };
        match &live.command {
            Command::Open if live.hello.is_none() => {
                let id = self.send(client, Request::Hello);
                let now = self.now;
                if let Some(live) = self.clients[client].live.as_mut() {
                    live.hello = Some((id, now));
                }
            }
            Command::Open | Command::AwaitOnline => {}
            Command::Await => self.start_sync(client),
            Command::Pause(_) if self.now >= live.pause_until => {
                return self.tell_live(client, Event::Elapsed);
            }
            Command::Pause(_) => {}
            Command::AskCredentials { reason, .. } => {
                return Err(self.fail(format!(
                    "client {client}'s connection asks for credentials ({reason}); nothing refuses any"
                )));
            }
        }
        Ok(())
    }

    fn start_sync(&mut self, client: usize) {
        self.start_run(client, Direction::Push);
        // The exhaustive scope syncs as `Ferry::sync_once` does: the pull after the push.
        if !self.exhaustive {
            self.start_run(client, Direction::Pull);
        }
    }

    /// Starts a replication in `direction`, unless one runs or the client is offline.
    fn start_run(&mut self, client: usize, direction: Direction) {
        if !self.clients[client].online || self.run_mut(client, direction).is_some() {
            return;
        }
        let started = &mut self.clients[client].runs_started[direction as usize];
        *started += 1;
        let session_id = format!("c{client}-{direction:?}-{started}");
        let replication_id = format!("client{client}-{direction:?}");
        let run = Run {
            machine: Replication::new(ReplicationConfig {
                replication_id: replication_id.clone(),
                session_id,
                batch_size: BATCH,
                max_write_bytes: ferry_core::replicate::DEFAULT_MAX_WRITE_BYTES,
                continuous: false,
                checkpoint_every: CHECKPOINT_EVERY,
            }),
            replication_id,
            waiting: None,
            stats: Stats::default(),
        };
        match direction {
            Direction::Push => self.clients[client].push = Some(run),
            Direction::Pull => self.clients[client].pull = Some(run),
        }
    }

    // ---- replication ---------------------------------------------------------------------

    fn run_mut(&mut self, client: usize, direction: Direction) -> Option<&mut Run> {
        match direction {
            Direction::Push => self.clients[client].push.as_mut(),
            Direction::Pull => self.clients[client].pull.as_mut(),
        }
    }

    fn send(&mut self, client: usize, request: Request) -> u64 {
        self.next_request += 1;
        let id = self.next_request;
        self.enqueue(Message {
            client,
            to_server: true,
            request: id,
            deliver_at: self.now,
            payload: Payload::Request(request),
        });
        id
    }

    /// Sends `op` as the request frame `WsPeer` would send.
    fn send_op(&mut self, client: usize, op: Op) -> u64 {
        let id = self.next_request + 1;
        let frame = ClientFrame::Request { id, op }.encode();
        let sent = self.send(client, Request::Frame(frame));
        debug_assert_eq!(sent, id);
        sent
    }

    /// Puts a message on the network, through the faults in force.
    fn enqueue(&mut self, mut message: Message) {
        if self.exhaustive {
            self.network.push(message);
            return;
        }
        let client = &self.clients[message.client];
        let cut = if message.to_server {
            client.cut_up_until > self.now
        } else {
            client.cut_down_until > self.now
        };
        if self.faults_on && (cut || self.rng.chance(self.drop_rate)) {
            self.outcome.faults += 1;
            return;
        }
        message.deliver_at = self.now + self.rng.below(if self.faults_on { 60 } else { 5 });
        if self.faults_on && self.rng.chance(self.dup_rate) {
            self.outcome.faults += 1;
            let mut copy = message.clone();
            copy.deliver_at += self.rng.below(100);
            self.network.push(copy);
        }
        self.network.push(message);
    }

    /// Moves every idle replication of `client` forward until it waits for the server or ends.
    fn advance(&mut self, client: usize) -> Result<(), Failure> {
        for direction in [Direction::Push, Direction::Pull] {
            while let Some(run) = self.run_mut(client, direction) {
                if run.waiting.is_some() {
                    break;
                }
                let action = run.machine.next_action();
                if !self.act(client, direction, action)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Carries out one action: locally (and hands the response back), or by sending a request.
    /// Returns whether the run can go on at once.
    fn act(
        &mut self,
        client: usize,
        direction: Direction,
        action: Action,
    ) -> Result<bool, Failure> {
        let local_is_source = direction == Direction::Push;
        let seed = self.seed;
        let local = |e: ferry_store::endpoint::EndpointError| fail(seed, format!("client: {e}"));
        let replication_id = self
            .run_mut(client, direction)
            .map(|run| run.replication_id.clone())
            .unwrap_or_default();
        let wait = |world: &mut World, op: Op, waiting: Waiting| {
            let id = world.send_op(client, op);
            let now = world.now;
            if let Some(run) = world.run_mut(client, direction) {
                run.waiting = Some((id, waiting, now));
            }
        };
        let response = match action {
            Action::ReadCheckpoints => {
                let local = self
                    .client_endpoint(client)
                    .checkpoint(&replication_id)
                    .map_err(|e| local(e.into()))?;
                wait(
                    self,
                    Op::GetCheckpoint {
                        checkpoint_id: replication_id,
                    },
                    Waiting::Checkpoints { local },
                );
                return Ok(false);
            }
            Action::ReadChanges { since, limit } => {
                let since = since.number().unwrap_or(0);
                if local_is_source {
                    let page = ferry_sync::local::changes(
                        &self.client_endpoint(client),
                        since,
                        limit,
                        &ChangesFilter::all(),
                    )
                    .map_err(local)?;
                    changes_response(page)
                } else {
                    let filter = &self.clients[client].pull_filter;
                    let op = session::changes_op(since, limit, filter);
                    wait(self, op, Waiting::Changes);
                    return Ok(false);
                }
            }
            Action::RevsDiff { revs } => {
                if local_is_source {
                    let op = Op::RevsDiff {
                        revs: revs.into_iter().collect(),
                    };
                    wait(self, op, Waiting::Missing);
                    return Ok(false);
                }
                let missing = ferry_sync::local::missing(&self.client_endpoint(client), &revs)
                    .map_err(local)?;
                Response::Missing(missing)
            }
            Action::FetchRevisions { wanted } => {
                if local_is_source {
                    let revisions = ferry_sync::local::fetch(&self.client_endpoint(client), wanted)
                        .map_err(local)?;
                    Response::Revisions(revisions)
                } else {
                    let wanted = session::wanted_refs(wanted);
                    let asked = wanted.len();
                    let waiting = Waiting::Revisions {
                        fetched: Vec::new(),
                        asked,
                    };
                    wait(self, session::bulk_get_op(wanted), waiting);
                    return Ok(false);
                }
            }
            Action::WriteRevisions { revisions } => {
                if local_is_source {
                    trace(|| {
                        format!(
                            "t{} client {client} pushes {:?}",
                            self.now,
                            listed(&revisions)
                        )
                    });
                    let (op, sent) = session::bulk_docs_op(&revisions);
                    wait(self, op, Waiting::Written { sent });
                    return Ok(false);
                }
                let rejected = self.pull_write(client, revisions)?;
                Response::Written { rejected }
            }
            Action::WriteCheckpoint { checkpoint } => {
                if local_is_source {
                    // The target's (the server's) first, then the source's.
                    let op = Op::PutCheckpoint {
                        checkpoint_id: replication_id,
                        checkpoint: checkpoint.clone(),
                    };
                    wait(self, op, Waiting::TargetCheckpoint { checkpoint });
                } else {
                    self.client_endpoint(client)
                        .put_checkpoint(&replication_id, &checkpoint)
                        .map_err(local)?;
                    let op = Op::PutCheckpoint {
                        checkpoint_id: replication_id,
                        checkpoint,
                    };
                    wait(self, op, Waiting::SourceCheckpoint);
                }
                return Ok(false);
            }
            Action::WaitForChanges { .. } => {
                return Err(self.fail("a one-shot replication asked to wait"));
            }
            Action::Finished(stats) => {
                self.finish(client, direction, &stats);
                return Ok(false);
            }
        };
        self.respond(client, direction, response)?;
        Ok(true)
    }

    fn respond(
        &mut self,
        client: usize,
        direction: Direction,
        response: Response,
    ) -> Result<(), Failure> {
        let seed = self.seed;
        let Some(run) = self.run_mut(client, direction) else {
            return Ok(());
        };
        let batches = run.machine.stats().batches;
        run.machine
            .handle(response)
            .map_err(|e| fail(seed, format!("replication: {e}")))?;
        run.stats = run.machine.stats().clone();
        if run.stats.batches > batches && direction == Direction::Push {
            // The SDK records acknowledgements after each committed batch.
            let through = run.machine.seq_on_target().number().unwrap_or(0);
            let n = self.clients[client]
                .replica
                .db
                .acknowledge_through(through)
                .unwrap_or_default();
            trace(|| {
                format!(
                    "t{} client {client} ack through {through}: {n} left the outbox; pending {:?}",
                    self.now,
                    self.clients[client]
                        .replica
                        .db
                        .pending()
                        .unwrap_or_default()
                )
            });
        }
        Ok(())
    }

    fn finish(&mut self, client: usize, direction: Direction, stats: &Stats) {
        let quiet = stats.docs_written == 0;
        let state = &mut self.clients[client];
        match direction {
            Direction::Push => {
                state.push = None;
                state.quiet.0 = quiet;
                if self.exhaustive {
                    self.start_run(client, Direction::Pull);
                }
            }
            Direction::Pull => {
                state.pull = None;
                state.quiet.1 = quiet;
            }
        }
    }

    /// A pull writes into the client through its endpoint, which resolves what conflicts by
    /// the client's policies; what the client shows must not go backwards. Returns how many
    /// revisions the client refused.
    fn pull_write(&mut self, client: usize, revisions: Vec<Revision>) -> Result<u64, Failure> {
        trace(|| {
            format!(
                "t{} client {client} pull write {:?}",
                self.now,
                listed(&revisions)
            )
        });
        let outcome = self
            .client_endpoint(client)
            .write_revisions(revisions)
            .map_err(|e| self.fail(format!("pull write: {e}")))?;
        let db = self.clients[client].replica.db.clone();
        if !outcome.resolved.is_empty() {
            trace(|| {
                format!(
                    "t{} client {client} auto-resolved {:?}; pending {:?}",
                    self.now,
                    outcome
                        .resolved
                        .iter()
                        .map(|(doc, _)| doc)
                        .collect::<Vec<_>>(),
                    db.pending().unwrap_or_default()
                )
            });
            self.clients[client].quiet = (false, false);
        }
        for doc_id in &outcome.written {
            self.observe(&db, doc_id)?;
            self.check_not_backwards(client, doc_id)?;
        }
        Ok(ferry_sync::local::refused(outcome).len() as u64)
    }

    fn check_not_backwards(&mut self, client: usize, doc_id: &str) -> Result<(), Failure> {
        let db = self.clients[client].replica.db.clone();
        let seed = self.seed;
        let (Some(document), Some(tree)) = (
            db.get_document(doc_id)
                .map_err(|e| fail(seed, e.to_string()))?,
            db.get_tree(doc_id).map_err(|e| fail(seed, e.to_string()))?,
        ) else {
            return Ok(());
        };
        let shown = self.clients[client]
            .shown
            .entry(doc_id.to_owned())
            .or_default();
        for earlier in shown.iter() {
            if *earlier != document.rev && tree.is_ancestor_or_self(&document.rev, earlier) {
                return Err(fail(
                    seed,
                    format!(
                        "client {client} read backwards on {doc_id}: {} after {earlier}",
                        document.rev
                    ),
                ));
            }
        }
        shown.insert(document.rev);
        Ok(())
    }

    // ---- the server ----------------------------------------------------------------------

    /// The server's session handler answers a request frame, as `ferry serve` does: the
    /// frame decoded by the server's decoder, carried out by `handle_request` on the server's
    /// endpoint, the answer encoded as the session sends it.
    fn serve(&mut self, request: Request) -> Result<Reply, Failure> {
        let text = match request {
            Request::Hello => return Ok(Reply::Welcome),
            Request::Frame(text) => text,
        };
        let limits = limits();
        let frame = ClientFrame::decode_within(
            text.as_bytes(),
            limits.max_json_depth + FRAME_ENVELOPE_DEPTH,
            limits.max_json_values,
        )
        .map_err(|e| self.fail(format!("the server could not decode {text}: {e}")))?;
        let ClientFrame::Request { id, op } = frame else {
            return Err(self.fail(format!("not a request: {text}")));
        };
        let writes = matches!(op, Op::BulkDocs { .. });
        let answered = handle_request(&self.server_endpoint(), op)
            .map_err(|e| self.fail(format!("server: {}: {}", e.error, e.reason)))?;
        if writes {
            let result: BulkDocsResult =
                result_as("bulk_docs", &answered.result).map_err(|e| self.fail(e.to_string()))?;
            if let Some(refused) = result.acks.iter().find(|ack| !ack.ok) {
                // Clock skews stay inside the server's drift limit and bodies inside its
                // limits: a refusal here is a bug the run must show.
                return Err(self.fail(format!("the server refused {refused:?}")));
            }
            let db = self.server.db.clone();
            for ack in &result.acks {
                self.observe(&db, &ack.id)?;
            }
        }
        let response = ServerFrame::Response {
            id,
            result: Some(answered.result),
            error: None,
        };
        Ok(Reply::Frame(response.encode()))
    }

    /// Delivers one message (the earliest due, or any due one when reordering).
    fn deliver(&mut self) -> Result<bool, Failure> {
        if self.network.is_empty() {
            return Ok(false);
        }
        let earliest = self
            .network
            .iter()
            .map(|message| message.deliver_at)
            .min()
            .unwrap_or(self.now);
        self.now = self.now.max(earliest);
        let due: Vec<usize> = (0..self.network.len())
            .filter(|&index| self.network[index].deliver_at <= self.now)
            .collect();
        let pick = if self.faults_on && self.reorder {
            due[self.rng.index(due.len())]
        } else {
            due[0]
        };
        self.deliver_message(pick)?;
        Ok(true)
    }

    /// Delivers the message at `index` of the network.
    fn deliver_message(&mut self, index: usize) -> Result<(), Failure> {
        let message = self.network.remove(index);
        self.outcome.delivered += 1;
        match message.payload {
            Payload::Request(request) => {
                trace(|| {
                    format!(
                        "t{} server gets from client {}: {}",
                        self.now,
                        message.client,
                        format!("{request:?}").chars().take(400).collect::<String>()
                    )
                });
                let reply = self.serve(request)?;
                self.enqueue(Message {
                    client: message.client,
                    to_server: false,
                    request: message.request,
                    deliver_at: self.now,
                    payload: Payload::Reply(reply),
                });
            }
            Payload::Reply(reply) => self.receive(message.client, message.request, reply)?,
        }
        Ok(())
    }

    /// A reply reaches a client: the run waiting for it goes on; anything else (a duplicate, a
    /// reply to a run that was lost) is ignored.
    fn receive(&mut self, client: usize, request: u64, reply: Reply) -> Result<(), Failure> {
        if let Reply::Welcome = reply {
            let welcomed = self.clients[client]
                .live
                .as_ref()
                .is_some_and(|live| live.hello.is_some_and(|(id, _)| id == request));
            if welcomed {
                self.tell_live(client, Event::Opened)?;
                self.advance(client)?;
            }
            return Ok(());
        }
        for direction in [Direction::Push, Direction::Pull] {
            let Some(run) = self.run_mut(client, direction) else {
                continue;
            };
            let matches = run
                .waiting
                .as_ref()
                .is_some_and(|(id, _, _)| *id == request);
            if !matches {
                continue;
            }
            let (_, waiting, _) = run.waiting.take().expect("matched");
            let Reply::Frame(text) = reply else {
                return Err(self.fail(format!("a welcome answered {waiting:?}")));
            };
            let result = match ServerFrame::decode(text.as_bytes()) {
                // A `null` result reads as none, as `WsPeer` reads it.
                Ok(ServerFrame::Response {
                    result,
                    error: None,
                    ..
                }) => result.unwrap_or_else(|| RawJson::of(&())),
                other => return Err(self.fail(format!("{waiting:?} answered {other:?}"))),
            };
            let invalid = |world: &World, e: String| world.fail(format!("{waiting:?}: {e}"));
            let response = match &waiting {
                Waiting::Checkpoints { local } => {
                    let remote: Option<Checkpoint> = result_as("get_checkpoint", &result)
                        .map_err(|e| invalid(self, e.to_string()))?;
                    let (source, target) = match direction {
                        Direction::Push => (local.clone(), remote),
                        Direction::Pull => (remote, local.clone()),
                    };
                    Response::Checkpoints { source, target }
                }
                Waiting::Changes => {
                    let result: ChangesResult =
                        result_as("changes", &result).map_err(|e| invalid(self, e.to_string()))?;
                    changes_response(session::changes_page(result))
                }
                Waiting::Missing => {
                    let missing: BTreeMap<String, Vec<Rev>> = result_as("revs_diff", &result)
                        .map_err(|e| invalid(self, e.to_string()))?;
                    Response::Missing(missing.into_iter().collect())
                }
                Waiting::Revisions { fetched, asked } => {
                    let result: BulkGetResult =
                        result_as("bulk_get", &result).map_err(|e| invalid(self, e.to_string()))?;
                    let (more, unserved) =
                        session::fetched(result, *asked).map_err(|e| invalid(self, e))?;
                    let mut fetched = fetched.clone();
                    fetched.extend(more);
                    if !unserved.is_empty() {
                        let asked = unserved.len();
                        let id = self.send_op(client, session::bulk_get_op(unserved));
                        let now = self.now;
                        if let Some(run) = self.run_mut(client, direction) {
                            run.waiting = Some((id, Waiting::Revisions { fetched, asked }, now));
                        }
                        return Ok(());
                    }
                    Response::Revisions(fetched)
                }
                Waiting::Written { sent } => {
                    let result: BulkDocsResult = result_as("bulk_docs", &result)
                        .map_err(|e| invalid(self, e.to_string()))?;
                    let rejected =
                        session::refused(result, sent.clone()).map_err(|e| invalid(self, e))?;
                    if !rejected.is_empty() {
                        return Err(invalid(self, format!("refused {rejected:?}")));
                    }
                    self.acknowledged.extend(sent.iter().cloned());
                    Response::Written { rejected: 0 }
                }
                Waiting::TargetCheckpoint { checkpoint } => {
                    let id = self
                        .run_mut(client, direction)
                        .map(|run| run.replication_id.clone())
                        .unwrap_or_default();
                    self.client_endpoint(client)
                        .put_checkpoint(&id, checkpoint)
                        .map_err(|e| self.fail(e.to_string()))?;
                    Response::CheckpointWritten
                }
                Waiting::SourceCheckpoint => Response::CheckpointWritten,
            };
            self.respond(client, direction, response)?;
            return self.advance(client);
        }
        Ok(())
    }

    /// Runs waiting too long for a reply are given up, as a client gives up a dead session.
    /// A live session whose request or hello timed out fails, and its connection machine
    /// decides when to try again.
    fn expire(&mut self) -> Result<(), Failure> {
        let now = self.now;
        let timed_out = |since: u64| now.saturating_sub(since) > REQUEST_TIMEOUT_MS;
        for index in 0..self.clients.len() {
            let client = &mut self.clients[index];
            let mut expired = false;
            for run in [&mut client.push, &mut client.pull] {
                if run
                    .as_ref()
                    .and_then(|run| run.waiting.as_ref())
                    .is_some_and(|&(_, _, since)| timed_out(since))
                {
                    *run = None;
                    expired = true;
                }
            }
            let failed = client.live.as_ref().is_some_and(|live| match live.command {
                Command::Open => live.hello.is_some_and(|(_, since)| timed_out(since)),
                Command::Await => expired,
                _ => false,
            });
            if failed {
                self.tell_live(index, transient("timed out"))?;
            }
        }
        Ok(())
    }

    // ---- checks --------------------------------------------------------------------------

    /// A document a client no longer counts as pending has all its leaves on the server.
    fn check_acknowledged(&self) -> Result<(), Failure> {
        for (index, client) in self.clients.iter().enumerate() {
            let pending: BTreeSet<String> = client
                .replica
                .db
                .pending()
                .unwrap_or_default()
                .into_iter()
                .map(|(doc, _)| doc)
                .collect();
            for doc_id in &self.docs {
                if pending.contains(doc_id) {
                    continue;
                }
                let Some(tree) = client
                    .replica
                    .db
                    .get_tree(doc_id)
                    .map_err(|e| self.fail(e.to_string()))?
                else {
                    continue;
                };
                let server = self.tree_in(&self.server.db, doc_id)?;
                for leaf in tree.leaves() {
                    if !server.contains(&leaf.rev) {
                        return Err(self.fail(format!(
                            "client {index} counts {doc_id} {} as acknowledged; the server lacks it",
                            leaf.rev
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every revision `client` holds of `doc_id` is on the server.
    fn check_subset_of_server(&self, client: usize, doc_id: &str) -> Result<(), Failure> {
        let tree = |db: &MemoryDatabase| self.tree_in(db, doc_id);
        let (here, server) = (
            tree(&self.clients[client].replica.db)?,
            tree(&self.server.db)?,
        );
        match here.revs().find(|rev| !server.contains(rev)) {
            Some(rev) => Err(self.fail(format!(
                "client {client} holds {doc_id} {rev}, which the server lacks"
            ))),
            None => Ok(()),
        }
    }

    fn digest(&self, db: &MemoryDatabase) -> Result<BTreeMap<String, Value>, Failure> {
        let mut all = BTreeMap::new();
        for doc_id in &self.docs {
            let (Some(document), Some(tree)) = (
                db.get_document(doc_id)
                    .map_err(|e| self.fail(e.to_string()))?,
                db.get_tree(doc_id).map_err(|e| self.fail(e.to_string()))?,
            ) else {
                continue;
            };
            all.insert(
                doc_id.clone(),
                json!({
                    "rev": document.rev.to_string(),
                    "deleted": document.deleted,
                    "body": document.body,
                    "conflicts": document.conflicts.iter().map(Rev::to_string).collect::<Vec<_>>(),
                    "tree": shape(&tree),
                }),
            );
        }
        Ok(all)
    }

    fn check_converged(&mut self) -> Result<(), Failure> {
        let server = self.digest(&self.server.db)?;
        for (index, client) in self.clients.iter().enumerate() {
            let mut digest = self.digest(&client.replica.db)?;
            let mut expected = server.clone();
            if !client.pull_filter.is_everything() {
                // A filtered pull carries the documents its filter selects on the server; the
                // others may be older here (a document that stopped matching), but hold
                // nothing the server lacks.
                for doc_id in &self.docs {
                    let on_server = self
                        .server
                        .db
                        .get_document(doc_id)
                        .map_err(|e| self.fail(e.to_string()))?;
                    let selected = on_server.is_some_and(|document| {
                        client
                            .pull_filter
                            .matches(doc_id, document.deleted, Some(&document.body))
                    });
                    if selected {
                        continue;
                    }
                    expected.remove(doc_id);
                    digest.remove(doc_id);
                    self.check_subset_of_server(index, doc_id)?;
                }
            }
            if digest != expected {
                let differing: Vec<&String> = expected
                    .keys()
                    .chain(digest.keys())
                    .filter(|doc| expected.get(*doc) != digest.get(*doc))
                    .collect();
                let doc = differing[0];
                return Err(self.fail(format!(
                    "client {index} did not converge with the server on {differing:?}: {doc} is {} there and {} here",
                    expected.get(doc).unwrap_or(&Value::Null),
                    digest.get(doc).unwrap_or(&Value::Null)
                )));
            }
        }
        for (doc_id, oracle) in &self.oracle {
            let tree = self.tree_in(&self.server.db, doc_id)?;
            if shape(&tree) != shape(oracle) {
                return Err(self.fail(format!(
                    "{doc_id}: the server's tree differs from every revision ever made"
                )));
            }
        }
        for (doc_id, rev) in &self.acknowledged {
            let tree = self.tree_in(&self.server.db, doc_id)?;
            if !tree.contains(rev) {
                return Err(self.fail(format!(
                    "the server acknowledged {doc_id} {rev} and lost it"
                )));
            }
        }
        let changes = self
            .server
            .db
            .changes(0, usize::MAX, false)
            .map_err(|e| self.fail(e.to_string()))?;
        let unique: BTreeSet<&String> = changes.iter().map(|change| &change.doc_id).collect();
        if unique.len() != changes.len() {
            return Err(self.fail("the server's changes feed lists a document twice"));
        }
        self.outcome.conflicted = server
            .values()
            .filter(|doc| doc["conflicts"].as_array().is_some_and(|c| !c.is_empty()))
            .count();
        Ok(())
    }

    /// Once faults stop, every live client's connection opens a session by itself, within the
    /// longest pause and a timeout, with nothing but time passing.
    fn reconnect_live_clients(&mut self) -> Result<(), Failure> {
        let deadline = self.now + RECONNECT_MAX_DELAY_MS + 2 * REQUEST_TIMEOUT_MS;
        loop {
            for client in 0..self.clients.len() {
                self.drive_live(client)?;
                self.advance(client)?;
            }
            while self.deliver()? {}
            let waiting = self.clients.iter().position(|client| {
                client
                    .live
                    .as_ref()
                    .is_some_and(|live| *live.machine.state() != ConnectionState::Connected)
            });
            let Some(client) = waiting else {
                return Ok(());
            };
            if self.now > deadline {
                let state = self.clients[client]
                    .live
                    .as_ref()
                    .map(|l| l.machine.state());
                return Err(self.fail(format!(
                    "live client {client} did not reconnect on its own: {state:?}"
                )));
            }
            self.now += 10;
            self.expire()?;
        }
    }

    /// Faults stop; every client comes online and syncs until nothing moves.
    fn heal(&mut self) -> Result<(), Failure> {
        self.faults_on = false;
        for client in 0..self.clients.len() {
            let was_online = std::mem::replace(&mut self.clients[client].online, true);
            if !was_online {
                self.tell_live(client, Event::Online(true))?;
            }
            let client = &mut self.clients[client];
            client.cut_up_until = 0;
            client.cut_down_until = 0;
            client.quiet = (false, false);
        }
        // What is still in flight arrives; runs whose replies were lost give up on them.
        while self.deliver()? {}
        self.now += REQUEST_TIMEOUT_MS + 1;
        self.expire()?;
        self.reconnect_live_clients()?;
        for round in 0..HEALING_ROUNDS {
            for client in 0..self.clients.len() {
                self.start_sync(client);
                self.advance(client)?;
                let mut steps = 0;
                while self.deliver()? {
                    steps += 1;
                    if steps > 100_000 {
                        return Err(self.fail("a replication never finished"));
                    }
                }
                if self.clients[client].push.is_some() || self.clients[client].pull.is_some() {
                    return Err(self.fail(format!(
                        "client {client}'s replication is stuck with nothing in flight"
                    )));
                }
                self.check_acknowledged()?;
            }
            let quiet = self
                .clients
                .iter()
                .all(|client| client.quiet == (true, true));
            let empty = self
                .clients
                .iter()
                .all(|client| client.replica.db.pending().unwrap_or_default().is_empty());
            if quiet && empty {
                self.outcome.healing_rounds = round + 1;
                return Ok(());
            }
        }
        let pending: Vec<usize> = self
            .clients
            .iter()
            .map(|client| client.replica.db.pending().unwrap_or_default().len())
            .collect();
        Err(self.fail(format!(
            "not quiescent after {HEALING_ROUNDS} rounds without faults (pending per client: {pending:?})"
        )))
    }
}

/// A session failure the network caused.
fn transient(reason: &str) -> Event {
    Event::Failed {
        kind: FailureKind::Transient,
        reason: reason.to_owned(),
    }
}

/// What replicas must agree on about a tree: every revision with its parent, and the leaves
/// with their deleted flags. (Whether an inner revision was a deletion is known only to the
/// replicas that had it as a leaf: `_revisions` ancestries do not carry it, as in CouchDB, and
/// nothing depends on it.)
fn shape(tree: &RevTree) -> Value {
    let nodes: Vec<Value> = tree
        .revs()
        .map(|rev| json!([rev.to_string(), tree.parent(rev).map(Rev::to_string)]))
        .collect();
    let leaves: Vec<Value> = tree
        .leaves()
        .into_iter()
        .map(|leaf| json!([leaf.rev.to_string(), leaf.deleted]))
        .collect();
    json!({"nodes": nodes, "leaves": leaves})
}

/// The document and revision of each of `revisions`, for the trace.
fn listed(revisions: &[Revision]) -> Vec<(&str, String)> {
    revisions
        .iter()
        .map(|revision| (revision.doc_id.as_str(), revision.rev().to_string()))
        .collect()
}

/// A page of changes as the replication state machine takes it.
fn changes_response(page: ferry_sync::ChangesPage) -> Response {
    Response::Changes {
        rows: page.rows,
        last_seq: page.last_seq,
        pending: page.pending,
    }
}

/// Runs the simulation for `seed` and checks every invariant.
pub fn run(seed: u64) -> Result<Outcome, Failure> {
    let mut world = World::new(seed);
    let operations = 50 + world.rng.index(351);
    for _ in 0..operations {
        world.operate()?;
        world.outcome.operations += 1;
        // The network and the live clients move between operations.
        for client in 0..world.clients.len() {
            world.drive_live(client)?;
            world.advance(client)?;
        }
        for _ in 0..world.rng.below(6) {
            if !world.deliver()? {
                break;
            }
        }
        world.now += world.rng.below(50);
        world.expire()?;
        world.check_acknowledged()?;
    }
    world.heal()?;
    world.check_converged()?;
    Ok(world.outcome)
}
