//! A write that runs out of storage: a clear error, nothing half-written, the replica intact
//! and usable afterwards. Storage runs out through a file size limit (`ulimit -f`, with
//! SIGXFSZ ignored so the write fails with EFBIG instead of killing the process), which needs
//! no privileges; SQLite reports it as a failed write, as it reports ENOSPC as a full disk, and
//! the store treats both alike.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{ferry_bin, free_port};

/// Runs the `ferry` binary with `args`, its files limited to `limit_kib`, and `input` on its
/// standard input.
fn ferry_limited(limit_kib: u64, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    // POSIX sh counts the limit in 512-byte blocks.
    let script = format!(
        "ulimit -f {}; trap '' XFSZ; exec \"$0\" \"$@\"",
        limit_kib * 2
    );
    let mut child = Command::new("sh")
        .args(["-c", &script, ferry_bin()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn integrity(path: &Path) -> String {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap()
}

fn big_document(bytes: usize) -> String {
    json!({ "blob": "x".repeat(bytes) }).to_string()
}

#[test]
fn a_local_write_past_the_storage_limit_fails_clearly_and_the_replica_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica.sqlite");
    let path = replica.to_str().unwrap();
    assert!(support::ferry(&["init", path]).status.success());
    let put = |id: &str, body: &str| ferry_limited(400, &["put", path, "notes", id], body);
    assert!(put("small", r#"{"n": 1}"#).status.success());

    let refused = put("big", &big_document(600 * 1024));
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("cannot write to storage"),
        "a clear error: {message}"
    );

    assert_eq!(integrity(&replica), "ok");
    let listed = support::ferry_json(&["list", path, "notes"]);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|doc| doc["_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["small"], "nothing of the refused write is stored");
    // Under the same limit, writes that fit still work.
    assert!(put("after", r#"{"n": 2}"#).status.success());
    assert_eq!(integrity(&replica), "ok");
}

#[tokio::test]
async fn a_server_out_of_storage_answers_507_keeps_what_it_had_and_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let script = format!("ulimit -f {}; trap '' XFSZ; exec \"$0\" \"$@\"", 1024 * 2);
    let mut server = Command::new("sh")
        .args(["-c", &script, ferry_bin()])
        .args([
            "serve",
            "--insecure-no-auth",
            "--listen",
            &listen,
            "--data-dir",
        ])
        .arg(data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://{listen}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(&base).send().await.is_err() {
        assert!(Instant::now() < deadline, "the server came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = format!("{base}/full");
    assert!(client.put(&db).send().await.unwrap().status().is_success());
    let stored = client
        .put(format!("{db}/kept"))
        .json(&json!({"n": 1}))
        .send()
        .await
        .unwrap();
    assert!(stored.status().is_success());

    // 2 MiB in one request, past the 1 MiB the server may write: refused whole.
    let blob = "x".repeat(200 * 1024);
    let docs: Vec<Value> = (0..10)
        .map(|n| json!({"_id": format!("big{n}"), "blob": blob}))
        .collect();
    let refused = client
        .post(format!("{db}/_bulk_docs"))
        .json(&json!({ "docs": docs }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 507);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"], json!("insufficient_storage"), "{error}");

    // What it had is there; nothing of the refused batch is; writes that fit still work.
    let info: Value = client.get(&db).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["doc_count"], json!(1), "{info}");
    let kept = client.get(format!("{db}/kept")).send().await.unwrap();
    assert!(kept.status().is_success());
    let after = client
        .put(format!("{db}/after"))
        .json(&json!({"n": 2}))
        .send()
        .await
        .unwrap();
    assert!(
        after.status().is_success(),
        "{}",
        after.text().await.unwrap()
    );

    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(integrity(&data.path().join("full.sqlite")), "ok");
}
