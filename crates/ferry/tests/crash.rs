//! `ferry serve` killed with SIGKILL 100 times while clients push to it: 80 times at a random
//! point of the pushes (once it has stored a random number of the cycle's documents), 10 times
//! frozen right after a batch's commit and before its acknowledgement, and 10 times when a
//! checkpoint arrives for a committed batch and is not stored yet. The clients
//! are two `ferry sync` processes (HTTP) and one SDK replica in this process (WebSocket
//! session, reconnecting by itself). After every kill the server's SQLite file passes the
//! integrity check, holds each document once (one sequence per document: no batch applied
//! twice), and holds every document its clients were told is stored. At the end everything
//! written anywhere is on the server exactly once.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_client::{Credentials, DocumentStatus, Ferry, ReconnectPolicy, SyncOptions};
use ferry_core::model::doc_id_in;
use ferry_store::failpoint::{AFTER_COMMIT_BEFORE_ACK, BEFORE_CHECKPOINT};
use ferry_store::sqlite::SqliteDatabase;
use ferry_store::{Database, Edit, StoreConfig};
use serde_json::{Value, json};
use support::{ServerProcess, TEST_PASSWORD, TEST_USER, ferry, ferry_bin, wait_until};

const CYCLES: u64 = 100;
const DOCS_PER_CLIENT: u64 = 8;
const DB: &str = "crashes";

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

/// A replica file of the `ferry` CLI, written to directly and pushed by `ferry sync`.
struct CliReplica {
    path: PathBuf,
    written: Vec<String>,
}

impl CliReplica {
    fn create(path: PathBuf) -> CliReplica {
        let created = ferry(&["init", path.to_str().unwrap()]);
        assert!(created.status.success(), "{created:?}");
        CliReplica {
            path,
            written: Vec::new(),
        }
    }

    fn write(&mut self, ids: impl Iterator<Item = String>) {
        let db = SqliteDatabase::open(&self.path, "replica", StoreConfig::default()).unwrap();
        let ids: Vec<String> = ids.collect();
        let edits = ids
            .iter()
            .map(|id| {
                let body = json!({"id": id}).as_object().unwrap().clone();
                Edit::put(id.clone(), None, body)
            })
            .collect();
        for result in db.write_edits(edits).unwrap() {
            result.unwrap();
        }
        self.written.extend(ids);
    }

    fn push(&self, server: &ServerProcess) -> Child {
        Command::new(ferry_bin())
            .args(["sync", self.path.to_str().unwrap()])
            .arg(format!("{}/{DB}", server.url))
            .args(["--push-only", "--batch-size", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

/// Waits for a `ferry sync` to end (it fails once the server is gone); whether it succeeded.
fn finish(mut push: Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = push.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() > deadline {
            let _ = push.kill();
            panic!("ferry sync did not end after the server was killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How many documents the server's file holds, read beside the running server (WAL allows it).
fn stored_documents(data_dir: &Path) -> u64 {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let Ok(connection) =
        rusqlite::Connection::open_with_flags(data_dir.join(format!("{DB}.sqlite")), flags)
    else {
        return 0;
    };
    connection
        .query_row("SELECT COUNT(*) FROM docs", [], |row| row.get(0))
        .unwrap_or(0)
}

/// Checks the server's file while the server is dead: integrity, each document stored once,
/// and `acknowledged` documents present with their revision (`None`: any revision).
fn check_server_files(data_dir: &Path, acknowledged: &[(String, Option<String>)], cycle: u64) {
    let path = data_dir.join(format!("{DB}.sqlite"));
    if !path.exists() {
        assert!(
            acknowledged.is_empty(),
            "cycle {cycle}: acknowledged, no database"
        );
        return;
    }
    let integrity: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok", "cycle {cycle}");
    let db = SqliteDatabase::open(&path, DB, StoreConfig::default()).unwrap();
    let info = db.info().unwrap();
    let changes = db.changes(0, usize::MAX, false).unwrap();
    assert_eq!(
        changes.len() as u64,
        info.doc_count,
        "cycle {cycle}: {info:?}"
    );
    assert_eq!(
        info.update_seq, info.doc_count,
        "cycle {cycle}: a document was stored twice ({info:?})"
    );
    for (doc_id, rev) in acknowledged {
        let stored = db.get_document(doc_id).unwrap();
        let Some(stored) = stored else {
            panic!("cycle {cycle}: {doc_id} was acknowledged and is not on the server");
        };
        if let Some(rev) = rev {
            assert_eq!(&stored.rev.to_string(), rev, "cycle {cycle}: {doc_id}");
        }
    }
}

/// The SDK replica's documents the server acknowledged, with their revisions.
fn acknowledged_by_the_server(app: &Ferry) -> Vec<(String, Option<String>)> {
    app.collection::<Value>("todos")
        .query()
        .run()
        .unwrap()
        .into_iter()
        .filter(|doc| {
            app.document_status("todos", &doc.id).unwrap() == Some(DocumentStatus::Acknowledged)
        })
        .map(|doc| (doc_id_in("todos", &doc.id), Some(doc.rev.to_string())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_anywhere_keeps_every_acknowledged_write_once() {
    let server_dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(server_dir.path(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut replicas: Vec<CliReplica> = (0..2)
        .map(|n| CliReplica::create(dir.path().join(format!("cli{n}.sqlite"))))
        .collect();
    let app = Ferry::initialize_offline(dir.path().join("app.ferry"), TEST_USER).unwrap();
    let options = SyncOptions::new(format!("{}/{DB}", server.bare_url))
        .credentials(Credentials::password(TEST_USER, TEST_PASSWORD))
        .batch_size(4)
        .reconnect(ReconnectPolicy {
            enabled: true,
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
        });
    let _sync = app.start_sync(options).unwrap();
    let todos = app.collection::<Value>("todos");
    let seed = 0xc4a5_u64;
    eprintln!("schedule seed {seed:#x}");
    let mut random = Lcg(seed);
    let mut app_written = 0;
    // How often the kill came after a push or acknowledgement (the checks had work to do).
    let (mut pushes_done, mut app_acknowledged) = (0, 0);

    for cycle in 0..CYCLES {
        let failpoint = match cycle % 10 {
            3 => Some(format!("{AFTER_COMMIT_BEFORE_ACK}:{}", 1 + random.below(4))),
            7 => Some(format!("{BEFORE_CHECKPOINT}:{}", 1 + random.below(4))),
            _ => None,
        };
        let stored_before = stored_documents(server_dir.path());
        let frozen = server.restart_armed(failpoint.as_deref());
        // What each CLI replica held when its push started: all of it is stored if it succeeds.
        let mut pushes = Vec::new();
        for (n, replica) in replicas.iter_mut().enumerate() {
            replica.write((0..DOCS_PER_CLIENT).map(|k| format!("cli{n}-{cycle:03}-{k}")));
            pushes.push((replica.push(&server), replica.written.clone()));
        }
        let batch: Vec<(String, Value)> = (0..DOCS_PER_CLIENT)
            .map(|k| (format!("app-{cycle:03}-{k}"), json!({"cycle": cycle})))
            .collect();
        for (id, value) in &batch {
            todos.insert_with_id(id, value).unwrap();
        }
        app_written += batch.len();

        // Every tenth cycle lets the pushes finish first, so a kill also comes after complete
        // pushes (each `ferry sync` process checks its password on every request).
        let mut finished = Vec::new();
        if cycle % 10 == 5 {
            for (push, held) in pushes.drain(..) {
                finished.push((finish(push), held));
            }
        }
        match &failpoint {
            Some(point) => frozen
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("cycle {cycle}: {point} was never reached")),
            // A random point of the cycle's progress: once the server has stored a random
            // number of its documents, while the rest are being pushed.
            None => {
                let new_documents = replicas.len() as u64 * DOCS_PER_CLIENT + DOCS_PER_CLIENT;
                let target = stored_before + random.below(new_documents + 1);
                // Polled often: the kill should land close to the chosen point.
                wait_until(
                    Duration::from_secs(60),
                    Duration::from_millis(2),
                    &format!("cycle {cycle}: the server storing {target} documents"),
                    || stored_documents(server_dir.path()) >= target,
                );
            }
        }
        server.kill();
        let mut acknowledged = acknowledged_by_the_server(&app);
        app_acknowledged += acknowledged.len();
        finished.extend(pushes.into_iter().map(|(push, held)| (finish(push), held)));
        for (succeeded, held) in finished {
            if succeeded {
                pushes_done += 1;
                acknowledged.extend(held.into_iter().map(|id| (id, None)));
            }
        }
        check_server_files(server_dir.path(), &acknowledged, cycle);
    }

    eprintln!(
        "{pushes_done} CLI pushes completed before a kill; {app_acknowledged} SDK documents \
         checked as acknowledged"
    );
    assert!(pushes_done > 0 && app_acknowledged > 0);

    // The server comes back for good: every client finishes its push.
    server.restart();
    for replica in &replicas {
        assert!(finish(replica.push(&server)), "a clean push succeeds");
    }
    assert!(
        app.wait_for_acknowledgement(Duration::from_secs(120))
            .await
            .unwrap()
    );
    let mut everything: BTreeSet<String> = replicas
        .iter()
        .flat_map(|replica| replica.written.iter().cloned())
        .collect();
    everything.extend(
        acknowledged_by_the_server(&app)
            .into_iter()
            .map(|(doc_id, _)| doc_id),
    );
    assert_eq!(
        everything.len(),
        replicas.len() * usize::try_from(CYCLES * DOCS_PER_CLIENT).unwrap() + app_written
    );
    server.kill();
    let all: Vec<(String, Option<String>)> =
        everything.iter().map(|id| (id.clone(), None)).collect();
    check_server_files(server_dir.path(), &all, CYCLES);
    let db = SqliteDatabase::open(
        &server_dir.path().join(format!("{DB}.sqlite")),
        DB,
        StoreConfig::default(),
    )
    .unwrap();
    assert_eq!(db.info().unwrap().doc_count, everything.len() as u64);
}

/// A batch of replicated revisions commits before the conflicts it created are resolved. A
/// server killed in between restarts with an unresolved conflict on its disk; it resolves it
/// by its policy after starting, without any client writing to the document again.
#[tokio::test]
async fn a_server_killed_between_a_batch_and_its_resolutions_resolves_them_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        ServerProcess::start(dir.path(), &["--conflict-policy", "todos=last-write-wins"]);
    let client = reqwest::Client::new();
    let base = server.bare_url.clone();
    let url = |path: &str| format!("{base}/{DB}{path}");
    let created = client
        .put(url(""))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{created:?}");
    let frozen = server.restart_armed(Some(ferry_store::failpoint::BEFORE_RESOLVING));
    // Two concurrent branches of one document in one batch: a conflict to resolve.
    let batch = json!({"new_edits": false, "docs": [
        {"_id": "todos:x", "_rev": "2-bb", "_revisions": {"start": 2, "ids": ["bb", "aa"]}, "v": "b"},
        {"_id": "todos:x", "_rev": "2-cc", "_revisions": {"start": 2, "ids": ["cc", "aa"]}, "v": "c"},
    ]});
    // A new client: the first one's pooled connection died with the first server process.
    let push = tokio::spawn(
        reqwest::Client::new()
            .post(url("/_bulk_docs"))
            .basic_auth(TEST_USER, Some(TEST_PASSWORD))
            .json(&batch)
            .send(),
    );
    let froze = tokio::task::spawn_blocking(move || frozen.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    if froze.is_err() {
        panic!(
            "the server did not freeze after the batch: {:?}",
            push.await
        );
    }
    server.kill();
    assert!(
        push.await.unwrap().is_err(),
        "the batch was never acknowledged"
    );

    let file = dir.path().join(format!("{DB}.sqlite"));
    let on_disk = || {
        SqliteDatabase::open(&file, DB, StoreConfig::default())
            .unwrap()
            .conflict("todos:x")
            .unwrap()
    };
    assert!(
        on_disk().is_some(),
        "the crash left the conflict unresolved"
    );
    server.restart();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        "the conflict resolved after restart",
        || on_disk().is_none(),
    );
    let records = SqliteDatabase::open(&file, DB, StoreConfig::default())
        .unwrap()
        .resolutions("todos:x")
        .unwrap();
    assert_eq!(
        records.len(),
        1,
        "resolved once, by the policy: {records:?}"
    );
}
