//! A client process (`ferry-todo live`, writing todos as fast as it reads them and pushing
//! them as it goes) killed with SIGKILL, 100 times: at a random point of its progress (after a
//! random number of the cycle's todos are on screen: during the next local write, or the push
//! of those before it) and, every third cycle, frozen at the named point between receiving the
//! server's acknowledgement and recording it. After every kill, the replica file passes
//! SQLite's integrity check, every todo the process had shown is still there, and every todo
//! the replica counts as acknowledged is on the server with the same revision. At the end one
//! clean sync leaves nothing pending, and the server holds each todo exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_client::{Credentials, DocumentStatus, Ferry, SyncOptions};
use ferry_core::model::doc_id_in;
use ferry_store::sqlite::SqliteDatabase;
use ferry_store::{Database, StoreConfig};
use serde_json::Value;
use support::{PASSWORD, Server, TodoProcess, USER, start_server};

mod support;

const CYCLES: u64 = 100;
const TODOS_PER_CYCLE: u64 = 15;

/// A small deterministic generator (the schedule replays from its seed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound
    }
}

/// The titles of the todos in the output lines `seen` (each line shows the whole list).
fn shown_titles(seen: &[Value]) -> Vec<String> {
    seen.iter()
        .filter_map(|line| line["todos"].as_array())
        .flatten()
        .filter_map(|todo| todo["title"].as_str().map(str::to_owned))
        .collect()
}

fn integrity(path: &std::path::Path) -> String {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap()
}

/// The todos of the replica at `path` (title -> (id, rev, status)).
fn replica_todos(path: &std::path::Path) -> BTreeMap<String, (String, String, DocumentStatus)> {
    let ferry = Ferry::initialize_offline(path, USER).unwrap();
    ferry
        .collection::<Value>("todos")
        .query()
        .run()
        .unwrap()
        .into_iter()
        .map(|doc| {
            let status = ferry.document_status("todos", &doc.id).unwrap().unwrap();
            let title = doc.value["title"].as_str().unwrap().to_owned();
            (title, (doc.id, doc.rev.to_string(), status))
        })
        .collect()
}

/// The server's database file, opened beside the running server (WAL allows it); `None`
/// before a client created it.
fn open_server_database(server: &Server) -> Option<SqliteDatabase> {
    let path = server.data_dir.join("todos.sqlite");
    path.exists()
        .then(|| SqliteDatabase::open(&path, "todos", StoreConfig::default()).unwrap())
}

#[test]
fn a_client_killed_anywhere_loses_nothing_and_its_server_gets_everything_once() {
    let server = start_server();
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("app.ferry");
    let seed = 0x5eed_u64;
    eprintln!("schedule seed {seed:#x}");
    let mut random = Lcg(seed);
    let mut frozen_kills = 0;

    for cycle in 0..CYCLES {
        let failpoint = (cycle % 3 == 2).then(|| {
            format!(
                "{}:{}",
                ferry_store::failpoint::BEFORE_RECORDING_ACK,
                1 + random.below(2)
            )
        });
        let mut client = TodoProcess::start_armed(&replica, &server.url, failpoint.as_deref());
        for n in 0..TODOS_PER_CYCLE {
            client.send(&format!("add c{cycle:03}-{n:02}"));
        }
        match &failpoint {
            Some(point) => {
                client
                    .frozen
                    .recv_timeout(Duration::from_secs(30))
                    .unwrap_or_else(|_| panic!("cycle {cycle}: {point} was never reached"));
                frozen_kills += 1;
            }
            None => {
                // A random point of the cycle's progress: once `shown` of its todos are on
                // screen, the process is writing the next one or pushing those before it.
                let shown = random.below(TODOS_PER_CYCLE + 1);
                let prefix = format!("c{cycle:03}-");
                let cycle_todos = |line: &Value| -> u64 {
                    line["todos"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|todo| todo["title"].as_str())
                        .filter(|title| title.starts_with(&prefix))
                        .count() as u64
                };
                if shown > 0 {
                    client.expect(&format!("{shown} todos of cycle {cycle}"), |line| {
                        cycle_todos(line) >= shown
                    });
                }
            }
        }
        client.child.kill().unwrap();
        client.child.wait().unwrap();
        let shown = shown_titles(client.drain());
        drop(client);

        assert_eq!(integrity(&replica), "ok", "cycle {cycle}");
        let todos = replica_todos(&replica);
        for title in &shown {
            assert!(
                todos.contains_key(title),
                "cycle {cycle}: {title} was shown, then lost"
            );
        }
        // Every todo the replica no longer counts as pending is on the server, same revision.
        let server_db = open_server_database(&server);
        for (title, (id, rev, status)) in &todos {
            if *status == DocumentStatus::Acknowledged {
                let server_db = server_db
                    .as_ref()
                    .expect("acknowledged by a server database");
                let stored = server_db.get_document(&doc_id_in("todos", id)).unwrap();
                assert_eq!(
                    stored.map(|document| document.rev.to_string()).as_ref(),
                    Some(rev),
                    "cycle {cycle}: {title} acknowledged but not on the server"
                );
            }
        }
    }
    assert_eq!(frozen_kills, CYCLES / 3);

    // One clean sync: nothing left pending, everything on the server exactly once.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = Ferry::initialize_offline(&replica, USER).unwrap();
    let pending = app.status().unwrap().pending;
    let options = SyncOptions::new(&server.url).credentials(Credentials::password(USER, PASSWORD));
    runtime.block_on(app.sync_once(&options)).unwrap();
    assert_eq!(app.status().unwrap().pending, 0);
    let todos = replica_todos(&replica);
    eprintln!(
        "{} todos written, {pending} of them pending before the clean sync",
        todos.len()
    );
    assert!(
        todos.len() as u64 > CYCLES,
        "the processes wrote before they were killed ({} todos)",
        todos.len()
    );
    let server_db = open_server_database(&server).expect("the server has the database");
    let info = server_db.info().unwrap();
    assert_eq!(info.doc_count, todos.len() as u64);
    assert_eq!(
        info.update_seq, info.doc_count,
        "each todo stored once: no batch applied twice"
    );
    for (title, (id, rev, _)) in &todos {
        let stored = server_db.get_document(&doc_id_in("todos", id)).unwrap();
        assert_eq!(
            stored.map(|document| document.rev.to_string()).as_ref(),
            Some(rev),
            "{title}"
        );
    }
}
