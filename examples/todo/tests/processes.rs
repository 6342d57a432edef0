//! Two `ferry-todo` processes on one replica file, syncing with a real server on loopback:
//! exactly one runs the sync loop, the other sees its writes and those from the server, its
//! own writes are synced by the leader, and it takes over when the leader is killed
//! (SIGKILL). Also the README's "run it twice" scenario with two replicas.

use ferry_client::{Credentials, Ferry, SyncOptions};
use serde_json::Value;
use support::{PASSWORD, Server, TodoProcess, USER, start_server};

mod support;

/// The titles on the server, read by a fresh replica.
fn server_titles(server: &Server, dir: &std::path::Path, name: &str) -> Vec<String> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let reader = Ferry::initialize_offline(dir.join(format!("{name}.ferry")), USER).unwrap();
        let options =
            SyncOptions::new(&server.url).credentials(Credentials::password(USER, PASSWORD));
        reader.sync_once(&options).await.unwrap();
        let mut titles: Vec<String> = reader
            .collection::<Value>("todos")
            .query()
            .run()
            .unwrap()
            .into_iter()
            .map(|doc| doc.value["title"].as_str().unwrap().to_owned())
            .collect();
        titles.sort();
        titles
    })
}

/// Writes a todo on the server through another replica.
fn write_on_server(server: &Server, dir: &std::path::Path, title: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let writer = Ferry::initialize_offline(dir.join("writer.ferry"), USER).unwrap();
        writer
            .collection::<Value>("todos")
            .insert(&serde_json::json!({"title": title, "done": false}))
            .unwrap();
        let options =
            SyncOptions::new(&server.url).credentials(Credentials::password(USER, PASSWORD));
        writer.sync_once(&options).await.unwrap();
    });
}

#[test]
fn two_processes_share_a_replica_with_one_sync_loop_and_take_over() {
    let server = start_server();
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("shared.ferry");

    let mut leader = TodoProcess::start(&replica, &server.url);
    leader.expect_connection("connected");
    let mut follower = TodoProcess::start(&replica, &server.url);
    follower.expect_connection("synced by another process");

    // The follower writes; the leader's watcher sees it and its loop pushes it.
    follower.send("add written by the follower");
    leader.expect_todo("written by the follower");
    follower.expect_all_acknowledged();
    assert_eq!(
        server_titles(&server, dir.path(), "check1"),
        ["written by the follower"]
    );

    // A change from the server is pulled by the leader and seen by both.
    write_on_server(&server, dir.path(), "written on the server");
    leader.expect_todo("written on the server");
    follower.expect_todo("written on the server");

    // The leader dies; the follower takes over the sync loop.
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    follower.expect_connection("connected");
    follower.send("add after the takeover");
    follower.expect_all_acknowledged();
    write_on_server(&server, dir.path(), "second from the server");
    follower.expect_todo("second from the server");
    assert_eq!(
        server_titles(&server, dir.path(), "check2"),
        [
            "after the takeover",
            "second from the server",
            "written by the follower",
            "written on the server"
        ]
    );
    follower.send("quit");
    assert!(follower.child.wait().unwrap().success());
}

#[test]
fn two_replicas_edit_offline_and_converge_live() {
    let server = start_server();
    let dir = tempfile::tempdir().unwrap();
    let mut a = TodoProcess::start(&dir.path().join("a.ferry"), &server.url);
    let mut b = TodoProcess::start(&dir.path().join("b.ferry"), &server.url);
    a.expect_connection("connected");
    b.expect_connection("connected");
    a.send("add buy milk");
    b.expect_todo("buy milk");

    b.send("offline");
    b.expect_connection("offline");
    b.send("add call the plumber");
    a.send("add water the plants");
    b.expect_todo("call the plumber");
    b.send("online");
    a.expect_todo("call the plumber");
    b.expect_todo("water the plants");
    a.expect_all_acknowledged();
    b.expect_all_acknowledged();
}
