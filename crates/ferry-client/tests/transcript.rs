//! What the SDK and the server say to each other, frame by frame: one sync that pushes two
//! documents and one that pulls them, recorded by a WebSocket relay between a real client and
//! a real server on loopback, compared with the transcripts committed in `tests/transcripts/`
//! (values that differ on every run, such as clocks, tokens and replica ids, masked). A change
//! to the protocol shows up here as a diff to read; `FERRY_UPDATE_TRANSCRIPTS=1 cargo test`
//! rewrites the files after a deliberate change.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

mod support;
use support::{client, options};

/// The frames one connection carried, `>` from the client and `<` from the server.
type Transcript = Arc<Mutex<Vec<String>>>;

/// Relays every WebSocket connection made to it to the server's sync endpoint, recording each
/// text frame but the heartbeats (whose moments depend on the machine's speed).
async fn relay(server: SocketAddr) -> (SocketAddr, Transcript) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let transcript: Transcript = Arc::default();
    let record = transcript.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let client = tokio_tungstenite::accept_async(stream).await.unwrap();
                let url = format!("ws://{server}/_ferry/sync");
                let (upstream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                let (mut to_client, mut from_client) = client.split();
                let (mut to_server, mut from_server) = upstream.split();
                let up = {
                    let record = record.clone();
                    async move {
                        while let Some(Ok(message)) = from_client.next().await {
                            if let Message::Text(text) = &message
                                && let Some(frame) = masked(text)
                            {
                                record.lock().unwrap().push(format!("> {frame}"));
                            }
                            if to_server.send(message).await.is_err() {
                                break;
                            }
                        }
                    }
                };
                let down = async move {
                    while let Some(Ok(message)) = from_server.next().await {
                        if let Message::Text(text) = &message
                            && let Some(frame) = masked(text)
                        {
                            record.lock().unwrap().push(format!("< {frame}"));
                        }
                        if to_client.send(message).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! { () = up => {}, () = down => {} }
            });
        }
    });
    (address, transcript)
}

/// The frame with what differs between runs replaced by placeholders, keys sorted; `None`
/// for a heartbeat.
fn masked(text: &str) -> Option<String> {
    fn mask(value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, value) in map.iter_mut() {
                    let placeholder = match key.as_str() {
                        "hlc" => "<clock>",
                        "session_id" => "<session>",
                        "server" => "<server uuid>",
                        "replica_id" => "<replica>",
                        "checkpoint_id" => "<replication id>",
                        "reconnect_token" => "<token>",
                        "reconnect_expires_at" => "<expiry>",
                        "server_time_ms" => "<server time>",
                        "password" => "<password>",
                        _ => {
                            mask(value);
                            continue;
                        }
                    };
                    *value = json!(placeholder);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(mask),
            _ => {}
        }
    }
    let mut value: Value = serde_json::from_str(text).expect("frames are JSON");
    if matches!(value["type"].as_str(), Some("ping" | "pong")) {
        return None;
    }
    mask(&mut value);
    Some(value.to_string())
}

/// Compares the transcript with `tests/transcripts/{name}.txt` (or rewrites it).
fn assert_transcript(name: &str, transcript: &Transcript) {
    let actual = transcript.lock().unwrap().join("\n") + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/transcripts")
        .join(format!("{name}.txt"));
    if std::env::var_os("FERRY_UPDATE_TRANSCRIPTS").is_some() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "the {name} transcript changed (FERRY_UPDATE_TRANSCRIPTS=1 rewrites {}):\n{actual}",
        path.display()
    );
}

#[tokio::test]
async fn a_push_and_a_pull_say_what_the_committed_transcripts_say() {
    let server = support::start();
    let dir = tempfile::tempdir().unwrap();

    let (address, pushed) = relay(server.address()).await;
    let url = format!("http://{address}/groceries");
    let writer = client(dir.path(), "writer");
    let todos = writer.collection::<Value>("todos");
    todos
        .insert_with_id("milk", &json!({"title": "milk", "done": false}))
        .unwrap();
    todos
        .insert_with_id("eggs", &json!({"title": "eggs", "done": true}))
        .unwrap();
    writer.sync_once(&options(&url)).await.unwrap();
    assert_transcript("push", &pushed);

    let (address, pulled) = relay(server.address()).await;
    let url = format!("http://{address}/groceries");
    let reader = client(dir.path(), "reader");
    reader.sync_once(&options(&url)).await.unwrap();
    let milk = reader.collection::<Value>("todos").get("milk").unwrap();
    assert_eq!(milk.unwrap().value["title"], json!("milk"));
    assert_transcript("pull", &pulled);
}
