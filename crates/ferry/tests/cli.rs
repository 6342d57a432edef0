//! The `ferry` command end to end: the README's walkthrough (two replicas, offline edits,
//! sync, a conflict, its resolution) against a real `ferry serve` process, readable errors, and
//! a server killed with SIGKILL that comes back with everything it acknowledged.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{ServerProcess, ferry, ferry_json, wait_until};

/// How often the live-sync test looks again.
const POLL: Duration = Duration::from_millis(20);

fn path(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_str().unwrap().to_owned()
}

#[test]
fn the_readme_walkthrough_two_replicas_offline_edits_and_a_conflict() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(server_dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let (alice, bob) = (path(&work, "alice.ferry"), path(&work, "bob.ferry"));
    let url = format!("{}/groceries", server.url);

    ferry_json(&["init", &alice]);
    ferry_json(&["init", &bob]);
    ferry_json(&[
        "put",
        &alice,
        "todos",
        "milk",
        "-d",
        r#"{"title": "buy milk", "done": false}"#,
    ]);
    let first = ferry_json(&["sync", &alice, &url]);
    assert_eq!(first["push"]["docs_written"], json!(1));
    let second = ferry_json(&["sync", &bob, &url]);
    assert_eq!(second["pull"]["docs_written"], json!(1));
    let listed = ferry_json(&["list", &bob, "todos"]);
    assert_eq!(listed[0]["title"], json!("buy milk"));
    assert_eq!(
        ferry_json(&["collections", &bob]),
        json!([{"collection": "todos", "documents": 1}])
    );

    ferry_json(&[
        "put",
        &alice,
        "todos",
        "milk",
        "-d",
        r#"{"title": "buy oat milk", "done": false}"#,
    ]);
    ferry_json(&[
        "put",
        &bob,
        "todos",
        "milk",
        "-d",
        r#"{"title": "buy milk", "done": true}"#,
    ]);
    ferry_json(&["sync", &alice, &url]);
    ferry_json(&["sync", &bob, &url]);
    ferry_json(&["sync", &alice, &url]);

    let on_alice = ferry_json(&["conflicts", &alice]);
    let on_bob = ferry_json(&["conflicts", &bob]);
    assert_eq!(on_alice, on_bob, "both replicas see the same conflict");
    let versions = on_alice[0]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "nothing was lost: {on_alice}");
    let titles: Vec<&str> = versions
        .iter()
        .map(|v| v["body"]["title"].as_str().unwrap())
        .collect();
    assert!(titles.contains(&"buy oat milk") && titles.contains(&"buy milk"));

    // Bob resolves with a merged version; after syncing, nobody has a conflict.
    let resolved = ferry_json(&[
        "resolve",
        &bob,
        "todos",
        "milk",
        "-d",
        r#"{"title": "buy oat milk", "done": true}"#,
    ]);
    assert_eq!(resolved["conflicts"], json!(0));
    ferry_json(&["sync", &bob, &url]);
    ferry_json(&["sync", &alice, &url]);
    assert_eq!(ferry_json(&["conflicts", &alice]), json!([]));
    let merged = ferry_json(&["get", &alice, "todos", "milk"]);
    assert_eq!(
        (merged["title"].clone(), merged["done"].clone()),
        (json!("buy oat milk"), json!(true))
    );
}

#[test]
fn errors_are_readable_and_exit_non_zero() {
    let work = tempfile::tempdir().unwrap();
    let missing = path(&work, "missing.ferry");
    let output = ferry(&["get", &missing, "todos", "x"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("does not exist") && stderr.contains("ferry init"),
        "{stderr}"
    );

    let replica = path(&work, "r.ferry");
    ferry_json(&["init", &replica]);
    let output = ferry(&["put", &replica, "todos", "x", "-d", r#"{"a": 1, "a": 2}"#]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("duplicate key"));

    let output = ferry(&["sync", &replica, "http://127.0.0.1:9/db"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach"));
}

#[test]
fn users_are_managed_from_the_cli_and_sync_needs_their_credentials() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(server_dir.path(), &[]);
    let data_dir = server_dir.path().to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let replica = path(&work, "r.ferry");
    ferry_json(&["init", &replica]);
    ferry_json(&["put", &replica, "todos", "a", "-d", r#"{"title": "milk"}"#]);

    // No credentials, then a wrong password: refused with the server's reason.
    let bare = format!("{}/notes", server.bare_url);
    let output = ferry(&["sync", &replica, &bare]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unauthorized"), "{stderr}");
    let wrong = bare.replacen("http://", "http://ann:wrong-password@", 1);
    assert!(!ferry(&["sync", &replica, &wrong]).status.success());

    // A new user (password from standard input) syncs; it is listed, then deleted.
    let mut add = std::process::Command::new(support::ferry_bin())
        .args(["--json", "users", "add", "ann", "--data-dir", data_dir])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    add.stdin
        .take()
        .unwrap()
        .write_all(b"ann's long password\n")
        .unwrap();
    assert!(add.wait_with_output().unwrap().status.success());
    let users = ferry_json(&["users", "list", "--data-dir", data_dir]);
    assert_eq!(
        users,
        json!([{"user": "ann", "admin": false}, {"user": support::TEST_USER, "admin": true}])
    );
    let ann = bare.replacen("http://", "http://ann:ann's%20long%20password@", 1);
    let synced = ferry_json(&["sync", &replica, &ann]);
    assert_eq!(synced["push"]["docs_written"], json!(1), "{synced}");
    let short = ferry(&["users", "add", "bob", "--data-dir", data_dir]);
    assert!(!short.status.success(), "empty password accepted");
    ferry_json(&["users", "delete", "ann", "--data-dir", data_dir]);
    assert!(!ferry(&["sync", &replica, &ann]).status.success());
}

#[test]
fn acknowledged_writes_survive_a_sigkill_of_the_server() {
    let server_dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(server_dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let replica = path(&work, "r.ferry");
    ferry_json(&["init", &replica]);
    for n in 0..50 {
        ferry_json(&[
            "put",
            &replica,
            "todos",
            &format!("t{n}"),
            "-d",
            &format!(r#"{{"n": {n}}}"#),
        ]);
    }
    let url = format!("{}/crash", server.url);
    let pushed = ferry_json(&["sync", &replica, &url, "--push-only"]);
    assert_eq!(pushed["push"]["docs_written"], json!(50));
    server.kill();

    let restarted = ServerProcess::start(server_dir.path(), &[]);
    let fresh = path(&work, "fresh.ferry");
    ferry_json(&["init", &fresh]);
    let pulled = ferry_json(&[
        "sync",
        &fresh,
        &format!("{}/crash", restarted.url),
        "--pull-only",
    ]);
    assert_eq!(pulled["pull"]["docs_written"], json!(50));
    let listed = ferry_json(&["list", &fresh, "todos", "--limit", "1000"]);
    assert_eq!(listed.as_array().unwrap().len(), 50);
}

#[test]
fn live_sync_carries_changes_both_ways_while_another_process_writes() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(server_dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let replica = path(&work, "live.ferry");
    ferry_json(&["init", &replica]);
    let url = format!("{}/live", server.url);
    let mut live = std::process::Command::new(support::ferry_bin())
        .args(["--json", "sync", &replica, &url, "--live"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let status = |path: String| {
        runtime.block_on(async {
            client
                .get(&path)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        })
    };
    // The live push creates the database on the server.
    wait_until(Duration::from_secs(20), POLL, "the database", || {
        status(url.clone()) == 200
    });
    let created = runtime.block_on(async {
        client
            .put(format!("{url}/todos:from-server"))
            .body(r#"{"title": "written on the server"}"#)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(created, 201);
    wait_until(
        Duration::from_secs(20),
        POLL,
        "the server's change in the replica",
        || {
            ferry(&["get", &replica, "todos", "from-server"])
                .status
                .success()
        },
    );
    // A write by another process on the same replica file is pushed too.
    ferry_json(&[
        "put",
        &replica,
        "todos",
        "from-cli",
        "-d",
        r#"{"title": "written locally"}"#,
    ]);
    wait_until(
        Duration::from_secs(20),
        POLL,
        "the local change on the server",
        || status(format!("{url}/todos:from-cli")) == 200,
    );
    live.kill().unwrap();
    live.wait().unwrap();
}

/// A replica written from the command line is the SDK's: its edits wait in the outbox until a
/// `ferry sync` push acknowledges them, a document the server refuses is recorded as rejected
/// while the rest syncs, and a document breaks the same rules as in an app.
#[test]
fn cli_edits_wait_in_the_outbox_until_a_sync_acknowledges_them() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(server_dir.path(), &["--max-document-bytes", "200"]);
    let work = tempfile::tempdir().unwrap();
    let replica = path(&work, "r.ferry");
    ferry_json(&["init", &replica]);
    ferry_json(&["put", &replica, "todos", "small", "-d", r#"{"n": 1}"#]);
    let big = json!({"text": "x".repeat(500)}).to_string();
    ferry_json(&["put", &replica, "todos", "big", "-d", &big]);
    let outbox = || {
        let status = ferry_client::Ferry::initialize_offline(&replica, "test")
            .unwrap()
            .status()
            .unwrap();
        (status.pending, status.rejected)
    };
    assert_eq!(outbox(), (2, 0), "both edits wait");

    let synced = ferry_json(&["sync", &replica, &format!("{}/outbox", server.url)]);
    assert_eq!(synced["push"]["docs_written"], json!(1), "{synced}");
    assert_eq!(outbox(), (0, 1), "one acknowledged, one refused");

    let output = ferry(&["put", &replica, "todos", "x", "-d", r#"{"_mine": 1}"#]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reserved"), "{stderr}");
    assert_eq!(outbox(), (0, 1), "nothing stored");

    ferry_json(&["put", &replica, "todos", "more", "-d", r#"{"n": 2}"#]);
    let newest_first = ferry_json(&["list", &replica, "todos", "--sort", "-n"]);
    let ns: Vec<&Value> = newest_first
        .as_array()
        .unwrap()
        .iter()
        .map(|document| &document["n"])
        .collect();
    // Descending by `n`; the document without it comes last.
    assert_eq!(ns, [&json!(2), &json!(1), &Value::Null], "{newest_first}");
}
