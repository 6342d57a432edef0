//! The exhaustive small scope: two clients, one document, up to three operations each (edit,
//! delete or recreate, sync), and every order in which the operations and the messages of the
//! syncs can happen, with every cut point: any one message lost, or either client or the
//! server crashing, at any moment. For each of the three conflict policies.
//!
//! The exploration is a depth-first search over states: from each state, every possible next
//! event (an operation of either client, with each kind of operation; the delivery of any
//! message in flight; any one fault) is applied to a copy of the world. A state reached before
//! (the same stores, runs, messages, clocks and remaining budget) is not explored again:
//! whatever follows it was explored the first time. Every state with nothing left to do is
//! healed (every client syncs to quiescence) and checked like a simulation run.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use ferry_core::model::Body;
use ferry_core::protocol::{ClientFrame, ServerFrame};
use ferry_core::resolve::{Policies, Policy};
use ferry_store::{Database, Edit};
use serde_json::json;

use crate::{Direction, EXHAUSTIVE, Failure, Payload, Reply, Request, World};

/// What an exploration covered.
#[derive(Clone, Debug, Default)]
pub struct Exploration {
    /// Schedules run to the end and checked.
    pub schedules: u64,
    /// Schedules cut short because they reached a state explored before.
    pub pruned: u64,
    /// Distinct states seen.
    pub states: usize,
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Operate(usize, usize),
    Deliver(usize),
    Lose(usize),
    CrashClient(usize),
    CrashServer,
}

/// Budgets of one schedule.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Budget {
    operations: [usize; 2],
    faults: usize,
}

impl World {
    fn small(policy: Policy) -> World {
        let mut world = World::new(0);
        world.clients.truncate(2);
        world.outcome.clients = 2;
        world.docs = vec!["a:0".to_owned()];
        world.policies = Policies::default().with("a", policy);
        world.faults_on = false;
        world.reorder = false;
        world.exhaustive = true;
        for client in &mut world.clients {
            client.live = None;
            client.pull_filter = ferry_core::filter::ChangesFilter::all();
        }
        world
    }

    /// Everything the rest of a schedule depends on, hashed.
    fn fingerprint(&self, budget: Budget) -> u64 {
        let mut hasher = DefaultHasher::new();
        budget.hash(&mut hasher);
        // The server's store, not its clock: every revision carries its own clock, so the
        // server's (a default for clockless revisions) decides nothing here.
        format!("{:?}", self.server.db).hash(&mut hasher);
        for client in &self.clients {
            format!("{:?}", client.replica.db).hash(&mut hasher);
            format!("{:?}", client.replica.clock).hash(&mut hasher);
            format!("{:?}", client.shown).hash(&mut hasher);
            (client.online, client.edits, client.runs_started).hash(&mut hasher);
            for run in [&client.push, &client.pull] {
                match run {
                    None => "idle".hash(&mut hasher),
                    Some(run) => {
                        format!("{:?}", run.machine).hash(&mut hasher);
                        format!("{:?}", run.waiting.as_ref().map(|(_, waiting, _)| waiting))
                            .hash(&mut hasher);
                    }
                }
            }
        }
        for message in &self.network {
            let current = [Direction::Push, Direction::Pull]
                .into_iter()
                .any(|direction| {
                    let run = match direction {
                        Direction::Push => &self.clients[message.client].push,
                        Direction::Pull => &self.clients[message.client].pull,
                    };
                    run.as_ref()
                        .and_then(|run| run.waiting.as_ref())
                        .is_some_and(|(id, _, _)| *id == message.request)
                });
            (message.client, message.to_server, current).hash(&mut hasher);
            payload_shape(&message.payload).hash(&mut hasher);
        }
        format!("{:?}", self.oracle).hash(&mut hasher);
        let mut acknowledged = self.acknowledged.clone();
        acknowledged.sort();
        acknowledged.dedup();
        format!("{acknowledged:?}").hash(&mut hasher);
        hasher.finish()
    }

    /// One of the small scope's operations on `client`: 0 edits, 1 deletes (or recreates a
    /// deleted document), 2 syncs.
    fn small_operation(&mut self, client: usize, kind: usize) -> Result<(), Failure> {
        let doc_id = self.docs[0].clone();
        let current = self.clients[client]
            .replica
            .db
            .get_document(&doc_id)
            .map_err(|e| self.fail(e.to_string()))?;
        let body = |n: u64| -> Body {
            json!({"by": client, "n": n})
                .as_object()
                .expect("an object")
                .clone()
        };
        let edits = self.clients[client].edits;
        match (kind, current) {
            (0, Some(document)) if !document.deleted => {
                self.edit(client, Edit::put(doc_id, Some(document.rev), body(edits)))
            }
            (1, Some(document)) if !document.deleted => {
                self.edit(client, Edit::delete(doc_id, document.rev))
            }
            (0 | 1, _) => self.edit(client, Edit::put(doc_id, None, body(edits))),
            _ => {
                self.start_sync(client);
                self.advance(client)
            }
        }
    }

    /// The events possible from this state.
    fn events(&self, budget: Budget) -> Vec<Event> {
        let mut events = Vec::new();
        for client in 0..2 {
            if budget.operations[client] > 0 {
                events.extend((0..3).map(|kind| Event::Operate(client, kind)));
            }
        }
        events.extend((0..self.network.len()).map(Event::Deliver));
        if budget.faults > 0 {
            events.extend((0..self.network.len()).map(Event::Lose));
            events.extend([Event::CrashClient(0), Event::CrashClient(1)]);
            events.push(Event::CrashServer);
        }
        events
    }

    /// Applies one event; returns the budget left.
    fn apply(&mut self, event: Event, mut budget: Budget) -> Result<Budget, Failure> {
        match event {
            Event::Operate(client, kind) => {
                budget.operations[client] -= 1;
                self.small_operation(client, kind)?;
            }
            Event::Deliver(index) => self.deliver_message(index)?,
            Event::Lose(index) => {
                budget.faults -= 1;
                let lost = self.network.remove(index);
                // The run waiting for it gives up, as after a timeout.
                let client = &mut self.clients[lost.client];
                for run in [&mut client.push, &mut client.pull] {
                    if run
                        .as_ref()
                        .and_then(|run| run.waiting.as_ref())
                        .is_some_and(|(id, _, _)| *id == lost.request)
                    {
                        *run = None;
                    }
                }
            }
            Event::CrashClient(client) => {
                budget.faults -= 1;
                self.crash_client(client);
            }
            Event::CrashServer => {
                budget.faults -= 1;
                self.crash_server()?;
            }
        }
        self.check_acknowledged()?;
        Ok(budget)
    }
}

/// Explores every schedule of the small scope with up to `operations` operations per client
/// and up to `faults` faults, for every conflict policy (one thread each), and checks each one
/// to the end.
pub fn explore(operations: usize, faults: usize) -> Result<Exploration, Failure> {
    let policies = [Policy::Keep, Policy::LastWriteWins, Policy::Merge];
    let results: Vec<Result<Exploration, Failure>> = std::thread::scope(|scope| {
        let workers: Vec<_> = policies
            .into_iter()
            .map(|policy| scope.spawn(move || explore_policy(policy, operations, faults)))
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("an exploration thread panicked"))
            .collect()
    });
    let mut total = Exploration::default();
    for result in results {
        let exploration = result?;
        total.schedules += exploration.schedules;
        total.pruned += exploration.pruned;
        total.states += exploration.states;
    }
    Ok(total)
}

fn explore_policy(
    policy: Policy,
    operations: usize,
    faults: usize,
) -> Result<Exploration, Failure> {
    let mut exploration = Exploration::default();
    let mut visited = HashSet::new();
    let budget = Budget {
        operations: [operations; 2],
        faults,
    };
    let failed = |path: &[Event], failure: Failure| Failure {
        seed: EXHAUSTIVE,
        message: format!(
            "{policy:?}, {operations} operation(s) per client and {faults} fault(s), after {path:?}: {}",
            failure.message
        ),
    };
    // Depth-first, with the events that led to each state to describe a failure.
    let mut stack = vec![(World::small(policy), budget, Vec::<Event>::new())];
    while let Some((world, budget, path)) = stack.pop() {
        if !visited.insert(world.fingerprint(budget)) {
            exploration.pruned += 1;
            continue;
        }
        if budget.operations == [0, 0] && world.network.is_empty() {
            let mut end = world;
            end.heal()
                .and_then(|()| end.check_converged())
                .map_err(|failure| failed(&path, failure))?;
            exploration.schedules += 1;
            continue;
        }
        for event in world.events(budget) {
            let mut next_path = path.clone();
            next_path.push(event);
            let mut next = world.clone();
            let left = next
                .apply(event, budget)
                .map_err(|failure| failed(&next_path, failure))?;
            stack.push((next, left, next_path));
        }
    }
    exploration.states = visited.len();
    Ok(exploration)
}

/// What a message carries, without the request id inside its frame: the id is the message's
/// own (left out of the fingerprint), and two states that differ only by it are the same.
fn payload_shape(payload: &Payload) -> String {
    match payload {
        Payload::Request(Request::Frame(text)) => {
            match ClientFrame::decode(text.as_bytes(), ferry_core::json::PARSER_HARD_DEPTH_LIMIT) {
                Ok(ClientFrame::Request { op, .. }) => format!("{op:?}"),
                other => format!("{other:?}"),
            }
        }
        Payload::Reply(Reply::Frame(text)) => match ServerFrame::decode(text.as_bytes()) {
            Ok(ServerFrame::Response { result, error, .. }) => format!("{result:?} {error:?}"),
            other => format!("{other:?}"),
        },
        other => format!("{other:?}"),
    }
}
