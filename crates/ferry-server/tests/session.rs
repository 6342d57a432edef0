//! The WebSocket sync session (`docs/protocol.md`) spoken by hand over a real socket: opening,
//! versioning, requests with per-revision acknowledgements, all-or-nothing writes, live
//! notifications, heartbeats and limits; authentication in `hello` and reconnect tokens
//! (rotation, binding to the replica, revocation, expiry).

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_core::model::Limits;
use ferry_server::auth::{Auth, AuthConfig};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use ferry_test_support::TestServer;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

type Server = TestServer;

const USER: &str = "ann";
const PASSWORD: &str = "ann's password";
const REPLICA: &str = "replica-1";

async fn start(limits: Limits) -> Server {
    start_with(limits, AuthConfig::default()).await
}

async fn start_with(limits: Limits, auth: AuthConfig) -> Server {
    start_configured(
        limits,
        auth,
        ferry_server::ServerConfig::default().max_sessions,
    )
    .await
}

async fn start_configured(limits: Limits, auth: AuthConfig, max_sessions: usize) -> Server {
    let config = ferry_server::ServerConfig {
        limits,
        auth,
        max_sessions,
        ..ferry_server::ServerConfig::default()
    };
    TestServer::start(config, &[(USER, PASSWORD, false)])
}

async fn connect(server: &Server) -> Socket {
    let url = format!("ws://{}/_ferry/sync", server.address());
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn send(socket: &mut Socket, frame: Value) {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON frame, or None if the server closed the session.
async fn receive(socket: &mut Socket) -> Option<Value> {
    receive_text(socket)
        .await
        .map(|text| serde_json::from_str(&text).unwrap())
}

/// The next frame's text as the server wrote it, or None if it closed the session.
async fn receive_text(socket: &mut Socket) -> Option<String> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("the server answered in time")?;
        match message {
            Ok(Message::Text(text)) => return Some(text.to_string()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// A hello for `db` from `REPLICA`, logging in with a password.
fn hello(db: &str) -> Value {
    json!({
        "type": "hello", "versions": [1], "db": db, "create": true, "replica_id": REPLICA,
        "auth": {"name": USER, "password": PASSWORD},
    })
}

/// Sends `hello` and returns the session and the server's answer.
async fn say_hello(server: &Server, hello: Value) -> (Socket, Value) {
    let mut socket = connect(server).await;
    send(&mut socket, hello).await;
    let answer = receive(&mut socket).await.unwrap();
    (socket, answer)
}

async fn open(server: &Server, db: &str) -> Socket {
    let (socket, welcome) = say_hello(server, hello(db)).await;
    assert_eq!(welcome["type"], json!("welcome"), "{welcome}");
    assert_eq!(welcome["version"], json!(1));
    assert_eq!(welcome["user"], json!(USER));
    socket
}

/// The ids in the database's changes feed, read with request `id`.
async fn changed_ids(socket: &mut Socket, id: u64) -> Vec<String> {
    send(
        socket,
        json!({"type": "request", "id": id, "op": "changes", "since": 0, "limit": 10}),
    )
    .await;
    let changes = receive(socket).await.unwrap();
    changes["result"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_str().unwrap().to_owned())
        .collect()
}

fn revision(id: &str, rev: &str, value: Value) -> Value {
    let (start, hash) = rev.split_once('-').unwrap();
    json!({"_id": id, "_rev": rev, "_revisions": {"start": start.parse::<u64>().unwrap(), "ids": [hash]}, "v": value})
}

#[tokio::test]
async fn opening_a_session_checks_hello_version_and_database() {
    let server = start(Limits::default()).await;
    let with = |changes: Value| {
        let mut hello = hello("x");
        hello["create"] = json!(false);
        for (key, value) in changes.as_object().unwrap() {
            hello[key] = value.clone();
        }
        hello
    };
    for (hello, error) in [
        (json!({"type": "request", "op": "changes"}), "bad_request"),
        (with(json!({"versions": [7]})), "unsupported_version"),
        (with(json!({"db": "missing"})), "not_found"),
        (with(json!({"db": null})), "bad_request"),
        (with(json!({"replica_id": null})), "bad_request"),
        (with(json!({"auth": null})), "unauthorized"),
        (
            with(json!({"auth": {"name": USER, "password": "wrong"}})),
            "unauthorized",
        ),
        (
            with(json!({"auth": {"token": "fa_not-a-token"}})),
            "unauthorized",
        ),
    ] {
        let mut socket = connect(&server).await;
        send(&mut socket, hello.clone()).await;
        let answer = receive(&mut socket).await.unwrap();
        assert_eq!(
            (answer["type"].clone(), answer["error"].clone()),
            (json!("error"), json!(error)),
            "{hello}"
        );
        assert!(
            receive(&mut socket).await.is_none(),
            "the session is closed after an error"
        );
    }
    let _ = open(&server, "created-by-hello").await;
}

#[tokio::test]
async fn writes_are_acknowledged_per_revision_or_refused_whole() {
    let server = start(Limits::default()).await;
    let mut socket = open(&server, "acks").await;
    let docs = json!([
        revision("a", "1-aa", json!(1)),
        revision("b", "1-bb", json!(2))
    ]);
    send(
        &mut socket,
        json!({"type": "request", "id": 1, "op": "bulk_docs", "docs": docs}),
    )
    .await;
    let response = receive(&mut socket).await.unwrap();
    assert_eq!(response["id"], json!(1));
    assert_eq!(
        response["result"]["acks"],
        json!([{"id": "a", "rev": "1-aa", "ok": true}, {"id": "b", "rev": "1-bb", "ok": true}])
    );
    // One malformed revision refuses the whole batch; the good one is not stored either.
    let docs = json!([revision("c", "1-cc", json!(3)), {"_id": "d", "_rev": "nope"}]);
    send(
        &mut socket,
        json!({"type": "request", "id": 2, "op": "bulk_docs", "docs": docs}),
    )
    .await;
    let refused = receive(&mut socket).await.unwrap();
    assert_eq!(refused["id"], json!(2));
    assert_eq!(refused["error"]["error"], json!("bad_request"));
    // The status the same failure has over HTTP, so clients know 4xx from 5xx.
    assert_eq!(refused["error"]["status"], json!(400));
    assert_eq!(changed_ids(&mut socket, 3).await, ["a", "b"]);
    // Pipelined requests are all answered, each with its id, in whatever order they finish;
    // unknown operations are errors, not closes.
    send(
        &mut socket,
        json!({"type": "request", "id": 4, "op": "revs_diff", "revs": {"a": ["1-aa", "2-zz"]}}),
    )
    .await;
    send(
        &mut socket,
        json!({"type": "request", "id": 5, "op": "frobnicate"}),
    )
    .await;
    send(&mut socket, json!({"type": "ping"})).await;
    let mut answers = BTreeMap::new();
    for _ in 0..3 {
        let frame = receive(&mut socket).await.unwrap();
        let key = frame["id"]
            .as_u64()
            .map_or("pong".to_owned(), |id| id.to_string());
        answers.insert(key, frame);
    }
    assert_eq!(answers["4"]["result"], json!({"a": ["2-zz"]}));
    assert_eq!(answers["5"]["error"]["error"], json!("bad_request"));
    assert_eq!(answers["pong"]["type"], json!("pong"));
}

#[tokio::test]
async fn more_pipelined_requests_than_a_session_answers_at_once_are_all_answered() {
    let server = start(Limits::default()).await;
    let mut socket = open(&server, "pipelined").await;
    // Writes and reads interleaved, far more than the session works on at once: the session
    // stops reading until it has answered some, and every request gets its own answer.
    for id in 0..40_u64 {
        let frame = if id % 2 == 0 {
            let docs = json!([revision(&format!("doc{id}"), "1-aa", json!(id))]);
            json!({"type": "request", "id": id, "op": "bulk_docs", "docs": docs})
        } else {
            json!({"type": "request", "id": id, "op": "revs_diff", "revs": {format!("doc{}", id - 1): ["1-aa"]}})
        };
        send(&mut socket, frame).await;
    }
    let mut answered = BTreeMap::new();
    while answered.len() < 40 {
        let response = receive(&mut socket).await.unwrap();
        let id = response["id"].as_u64().unwrap();
        assert!(
            answered.insert(id, response).is_none(),
            "{id} answered twice"
        );
    }
    for (id, response) in &answered {
        if id % 2 == 0 {
            assert_eq!(
                response["result"]["acks"][0]["ok"],
                json!(true),
                "{response}"
            );
        } else {
            // The write before it may or may not have been stored yet: either answer is right.
            let missing = &response["result"];
            let doc = format!("doc{}", id - 1);
            assert!(
                *missing == json!({}) || *missing == json!({ (doc.clone()): ["1-aa"] }),
                "{response}"
            );
        }
    }
    let ids = changed_ids(&mut socket, 100).await;
    assert_eq!(ids.len(), 10, "the first page of 20 writes");
}

#[tokio::test]
async fn subscribed_sessions_are_told_about_changes() {
    let server = start(Limits::default()).await;
    let mut watcher = open(&server, "live").await;
    send(&mut watcher, json!({"type": "subscribe", "since": 0})).await;
    let mut writer = open(&server, "live").await;
    send(&mut writer, json!({"type": "request", "id": 1, "op": "bulk_docs", "docs": [revision("x", "1-ab", json!(1))]})).await;
    assert!(receive(&mut writer).await.unwrap()["result"]["acks"].is_array());
    let notice = receive(&mut watcher).await.unwrap();
    assert_eq!(notice, json!({"type": "changed", "seq": 1}));

    // Until the watcher reads changes, further writes announce nothing more.
    send(&mut writer, json!({"type": "request", "id": 2, "op": "bulk_docs", "docs": [revision("y", "1-cd", json!(2))]})).await;
    receive(&mut writer).await.unwrap();
    // The server looks at notifications before frames, so a (wrong) `changed` for the second
    // write, known before its ack was sent, would come before the pong.
    send(&mut watcher, json!({"type": "ping"})).await;
    assert_eq!(
        receive(&mut watcher).await.unwrap(),
        json!({"type": "pong"}),
        "no second `changed` before a `changes` request"
    );
    // Reading re-arms. What the read returned is not announced again (a wake-up for nothing
    // that would disarm the session before the next write), the next write is.
    send(
        &mut watcher,
        json!({"type": "request", "id": 3, "op": "changes", "since": 0}),
    )
    .await;
    let read = receive(&mut watcher).await.unwrap();
    assert_eq!(
        (read["id"].clone(), read["result"]["last_seq"].clone()),
        (json!(3), json!(2))
    );
    send(&mut writer, json!({"type": "request", "id": 4, "op": "bulk_docs", "docs": [revision("z", "1-ef", json!(3))]})).await;
    receive(&mut writer).await.unwrap();
    assert_eq!(
        receive(&mut watcher).await.unwrap(),
        json!({"type": "changed", "seq": 3}),
        "the write after the read is announced, and nothing before it"
    );
}

#[tokio::test]
async fn a_frame_over_the_request_limit_closes_the_session() {
    let limits = Limits {
        max_request_bytes: 4_096,
        ..Limits::default()
    };
    let server = start(limits).await;
    let mut socket = open(&server, "limits").await;
    let skeleton = json!({"type": "ping", "pad": ""}).to_string().len();
    let padded =
        |size: usize| json!({"type": "ping", "pad": "x".repeat(size - skeleton)}).to_string();
    let at_limit = padded(4_096);
    assert_eq!(at_limit.len(), 4_096);
    socket.send(Message::Text(at_limit.into())).await.unwrap();
    assert_eq!(receive(&mut socket).await.unwrap()["type"], json!("pong"));
    let past = padded(4_097);
    socket.send(Message::Text(past.into())).await.unwrap();
    let refused = receive(&mut socket).await.unwrap();
    assert_eq!(refused["type"], json!("error"), "{refused}");
    assert_eq!(refused["error"], json!("too_large"), "{refused}");
    assert!(
        receive(&mut socket).await.is_none(),
        "the oversized frame ended the session"
    );
}

/// Every JSON value in `value`: scalars, arrays and objects, as the server counts them.
fn values_in(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(values_in).sum(),
        Value::Object(map) => map.values().map(values_in).sum(),
        _ => 0,
    }
}

/// The session reads a frame's documents as text, checked by a scan of the whole frame
/// against the JSON limits: a frame of tiny values, a duplicate key inside a document, or a
/// document nested past the limit ends the session before anything of it is stored, while a
/// frame at each limit is stored.
#[tokio::test]
async fn a_frame_past_the_json_limits_ends_the_session_and_stores_nothing() {
    let limits = Limits {
        max_json_values: 1_000,
        max_json_depth: 4,
        ..Limits::default()
    };
    let server = start(limits).await;
    let bulk_docs =
        |docs: Value| json!({"type": "request", "id": 1, "op": "bulk_docs", "docs": docs});
    // A frame of exactly `values` values, its document's `v` an array of zeros.
    let with_values = |doc_id: &str, values: usize| {
        let skeleton = values_in(&bulk_docs(json!([revision(doc_id, "1-aa", json!([]))])));
        bulk_docs(json!([revision(
            doc_id,
            "1-aa",
            json!(vec![0; values - skeleton])
        )]))
    };
    // A document whose `v` nests `depth` containers below the document (the frame adds 2).
    let nested = |doc_id: &str, depth: usize| {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!([v]);
        }
        bulk_docs(json!([revision(doc_id, "1-aa", v)]))
    };

    let mut socket = open(&server, "json-limits").await;
    for at_limit in [with_values("values", 1_000), nested("deep", 3)] {
        send(&mut socket, at_limit).await;
        let stored = receive(&mut socket).await.unwrap();
        assert_eq!(stored["result"]["acks"][0]["ok"], json!(true), "{stored}");
    }
    let duplicate = r#"{"type":"request","id":1,"op":"bulk_docs","docs":[{"_id":"twice","_rev":"1-aa","_revisions":{"start":1,"ids":["aa"]},"v":1,"v":2}]}"#;
    for (past, reason) in [
        (
            with_values("values-past", 1_001).to_string(),
            "1000 JSON values",
        ),
        (nested("deep-past", 4).to_string(), "deeper than 6"),
        (duplicate.to_owned(), "duplicate key \"v\""),
    ] {
        let mut socket = open(&server, "json-limits").await;
        socket.send(Message::Text(past.into())).await.unwrap();
        let refused = receive(&mut socket).await.unwrap();
        assert_eq!(refused["type"], json!("error"), "{refused}");
        assert_eq!(refused["error"], json!("bad_request"), "{refused}");
        let said = refused["reason"].as_str().unwrap();
        assert!(said.contains(reason), "{said}");
        assert!(receive(&mut socket).await.is_none(), "the session ended");
    }
    assert_eq!(changed_ids(&mut socket, 9).await, ["values", "deep"]);
}

#[tokio::test]
async fn reconnect_tokens_rotate_on_every_resume_and_are_bound_to_the_replica() {
    let server = start(Limits::default()).await;
    let (_first, welcome) = say_hello(&server, hello("tokens")).await;
    let first_token = welcome["reconnect_token"].as_str().unwrap().to_owned();
    let expires_at = welcome["reconnect_expires_at"].as_u64().unwrap();
    let resume = |token: &str, replica: &str| {
        let mut hello = hello("tokens");
        hello["auth"] = json!({"reconnect_token": token});
        hello["replica_id"] = json!(replica);
        hello
    };

    // Another replica cannot use it.
    let (_, refused) = say_hello(&server, resume(&first_token, "replica-2")).await;
    assert_eq!(refused["error"], json!("unauthorized"), "{refused}");

    // Resuming returns the next token of the chain, with the same absolute expiry.
    let (_, resumed) = say_hello(&server, resume(&first_token, REPLICA)).await;
    assert_eq!(resumed["type"], json!("welcome"), "{resumed}");
    assert_eq!(resumed["user"], json!(USER));
    let second_token = resumed["reconnect_token"].as_str().unwrap().to_owned();
    assert_ne!(second_token, first_token);
    assert_eq!(resumed["reconnect_expires_at"], json!(expires_at));

    // Once the second is used, the first is retired.
    let (_, third) = say_hello(&server, resume(&second_token, REPLICA)).await;
    assert_eq!(third["type"], json!("welcome"), "{third}");
    let (_, retired) = say_hello(&server, resume(&first_token, REPLICA)).await;
    assert_eq!(retired["error"], json!("unauthorized"), "{retired}");

    // Revoked: refused.
    let auth = Auth::open(server.data_dir(), AuthConfig::default()).unwrap();
    auth.accounts().revoke_tokens(USER, None).unwrap();
    let latest = third["reconnect_token"].as_str().unwrap();
    let (_, revoked) = say_hello(&server, resume(latest, REPLICA)).await;
    assert_eq!(revoked["error"], json!("unauthorized"), "{revoked}");
}

#[tokio::test]
async fn reconnect_tokens_expire_absolutely() {
    let server = start_with(
        Limits::default(),
        AuthConfig {
            reconnect_token_ttl: Duration::from_millis(300),
            ..AuthConfig::default()
        },
    )
    .await;
    let (_, welcome) = say_hello(&server, hello("expiry")).await;
    let mut token = welcome["reconnect_token"].as_str().unwrap().to_owned();
    let expires_at = welcome["reconnect_expires_at"].as_u64().unwrap();
    // Rotation does not extend the chain's life.
    for _ in 0..3 {
        let mut resume = hello("expiry");
        resume["auth"] = json!({"reconnect_token": token});
        let (_, resumed) = say_hello(&server, resume).await;
        assert_eq!(resumed["reconnect_expires_at"], json!(expires_at));
        token = resumed["reconnect_token"].as_str().unwrap().to_owned();
    }
    ferry_test_support::wait_until_past(expires_at).await;
    let mut resume = hello("expiry");
    resume["auth"] = json!({"reconnect_token": token});
    let (_, expired) = say_hello(&server, resume).await;
    assert_eq!(expired["error"], json!("unauthorized"), "{expired}");
}

#[tokio::test]
async fn sessions_are_limited_at_the_limit_and_one_past() {
    let server = start_configured(Limits::default(), AuthConfig::default(), 2).await;
    let mut first = open(&server, "limited").await;
    let _second = open(&server, "limited").await;
    let url = format!("ws://{}/_ferry/sync", server.address());
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
        }
        other => panic!("a third session was not refused: {other:?}"),
    }
    // Closing one frees its place.
    first.close(None).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio_tungstenite::connect_async(&url).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_revision_over_a_limit_is_refused_alone_and_the_rest_is_stored() {
    let server = start(Limits::default()).await;
    let mut socket = open(&server, "partial").await;
    let long_id = "x".repeat(Limits::default().max_doc_id_bytes + 1);
    let mut from_the_future = revision("future", "1-cc", json!(3));
    let in_a_day = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
        + 86_400_000;
    from_the_future["_ferry"] =
        json!({"hlc": ferry_core::hlc::Timestamp::new(in_a_day, 0).as_u64()});
    let docs = json!([
        revision("fine", "1-aa", json!(1)),
        revision(&long_id, "1-bb", json!(2)),
        from_the_future,
    ]);
    send(
        &mut socket,
        json!({"type": "request", "id": 1, "op": "bulk_docs", "docs": docs}),
    )
    .await;
    let response = receive(&mut socket).await.unwrap();
    let acks = response["result"]["acks"].as_array().unwrap();
    assert_eq!(acks[0], json!({"id": "fine", "rev": "1-aa", "ok": true}));
    assert_eq!(acks[1]["error"], json!("illegal_docid"), "{response}");
    assert_eq!(acks[1]["rev"], json!("1-bb"));
    // A clock a day ahead would win every last-write-wins conflict: refused.
    assert_eq!(acks[2]["error"], json!("clock_ahead"), "{response}");
    assert_eq!(changed_ids(&mut socket, 2).await, ["fine"]);
}

/// The session stores a replicated body as its sender wrote it (a careless client's spacing
/// included) and serves it back byte for byte; the size limit counts that text, at the limit
/// and one past; a reserved member written with an escape is still a reserved member.
#[tokio::test]
async fn a_body_is_stored_as_sent_and_its_size_is_the_text_sent() {
    let limits = Limits {
        max_document_bytes: 64,
        ..Limits::default()
    };
    let server = start(limits).await;
    let mut socket = open(&server, "as-sent").await;
    // `{"v":[1]}` is 9 bytes; spaces inside the array make the body's text `9 + pad` bytes,
    // while its canonical form stays 9.
    let spaced = |doc_id: &str, rev_hash: &str, pad: usize| {
        format!(
            r#"{{"_id":"{doc_id}","_rev":"1-{rev_hash}","_revisions":{{"start":1,"ids":["{rev_hash}"]}},"v":[{}1]}}"#,
            " ".repeat(pad)
        )
    };
    let frame = format!(
        r#"{{"type":"request","id":1,"op":"bulk_docs","docs":[{},{}]}}"#,
        spaced("at", "aa", 64 - 9),
        spaced("past", "bb", 64 - 9 + 1)
    );
    socket.send(Message::Text(frame.into())).await.unwrap();
    let response = receive(&mut socket).await.unwrap();
    let acks = &response["result"]["acks"];
    assert_eq!(
        acks[0],
        json!({"id": "at", "rev": "1-aa", "ok": true}),
        "{response}"
    );
    assert_eq!(acks[1]["error"], json!("document_too_large"), "{response}");
    assert_eq!(changed_ids(&mut socket, 2).await, ["at"]);

    send(
        &mut socket,
        json!({"type": "request", "id": 3, "op": "bulk_get", "docs": [{"id": "at", "rev": "1-aa"}]}),
    )
    .await;
    let answer = receive_text(&mut socket).await.expect("an answer");
    let body = format!(r#""v":[{}1]}}"#, " ".repeat(64 - 9));
    assert!(answer.contains(&body), "the body as sent: {answer}");

    let escaped = r#"{"type":"request","id":4,"op":"bulk_docs","docs":[{"_id":"sly","_rev":"1-cc","_revisions":{"start":1,"ids":["cc"]},"\u005fsecret":1}]}"#;
    socket.send(Message::Text(escaped.into())).await.unwrap();
    let refused = receive(&mut socket).await.unwrap();
    assert_eq!(refused["id"], json!(4), "{refused}");
    assert_eq!(refused["error"]["error"], json!("bad_request"), "{refused}");
    assert!(
        refused["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("_secret"),
        "{refused}"
    );
    assert_eq!(changed_ids(&mut socket, 5).await, ["at"]);
}
