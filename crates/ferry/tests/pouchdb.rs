//! Interop with a real PouchDB 9 (Node, memory adapter) against a real `ferry serve` process:
//! 10,000 documents pushed, the same pulled back, live replication, conflicts on which PouchDB
//! and Ferry agree, and filtered replication. The scenarios and their assertions are in
//! `tests/interop/interop.js`; each prints a `RESULT` line that is checked again here.

mod support;

use serde_json::json;
use support::{ServerProcess, run_interop};

#[test]
fn pouchdb_pushes_and_pulls_ten_thousand_documents() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let pushed = run_interop("push", &server.bare_url, "bulk", &["--n", "10000"]);
    assert_eq!(pushed["docs"], json!(10_000), "{pushed}");
    let pulled = run_interop("pull", &server.bare_url, "bulk", &["--n", "10000"]);
    assert_eq!(pulled["docs"], json!(10_000), "{pulled}");
}

#[test]
fn pouchdb_live_replication_delivers_changes_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let live = run_interop("live", &server.bare_url, "live", &[]);
    assert!(live["server_to_local_ms"].is_number(), "{live}");
    assert!(live["local_to_server_ms"].is_number(), "{live}");
}

#[test]
fn pouchdb_and_ferry_agree_on_winners_and_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let result = run_interop("conflict", &server.bare_url, "conflicts", &[]);
    assert_eq!(result["agree"], result["docs"], "{result}");
    assert_eq!(result["docs_with_one_conflict"], result["docs"], "{result}");
}

#[test]
fn pouchdb_filtered_replication_by_doc_ids_and_selector() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let result = run_interop("filtered", &server.bare_url, "filtered", &[]);
    assert_eq!(result["ok"], json!(true), "{result}");
}

#[test]
fn pouchdb_logs_in_with_a_session_cookie_and_is_refused_without_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let result = run_interop("session", &server.bare_url, "sessions", &[]);
    assert_eq!(result["ok"], json!(true), "{result}");
    assert_eq!(result["user"], json!(support::TEST_USER), "{result}");
}

#[test]
fn pouchdb_conflicts_are_merged_by_the_server_policy() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--conflict-policy", "todos=merge"]);
    let result = run_interop("resolved", &server.bare_url, "resolved", &[]);
    assert_eq!(result["merged"], result["docs"], "{result}");
    assert_eq!(result["method"], json!("merged"), "{result}");
}
