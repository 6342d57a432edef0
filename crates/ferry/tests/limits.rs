//! Hostile and careless clients against a real `ferry serve` (issue 13, `docs/limits.md`):
//! partial headers, short and unfinished bodies, idle connections, huge declared lengths,
//! connection floods, sessions that never say hello, login floods, oversized pre-authentication
//! bodies and frames, and frames the session cannot read. Each abuse gets a clear answer (a
//! status, or a close code and reason), a legitimate client is served while it lasts, and
//! nothing stored changes. Limits and timeouts are lowered by flags to keep the tests fast.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{ServerProcess, TEST_PASSWORD, TEST_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// `Authorization` for the test user (`tester:test-password` in base64).
const BASIC: &str = "Basic dGVzdGVyOnRlc3QtcGFzc3dvcmQ=";
const DB: &str = "limits";

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A server with `args`, holding one document (`kept`), and that document's revision.
async fn server(args: &[&str]) -> (tempfile::TempDir, ServerProcess, String) {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let path = dir.path().to_owned();
    let server = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProcess::start(&path, &args)
    })
    .await
    .unwrap();
    let client = client();
    let created = client
        .put(format!("{}/{DB}", server.bare_url))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let put: Value = client
        .put(format!("{}/{DB}/kept", server.bare_url))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .json(&json!({"v": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rev = put["rev"].as_str().unwrap().to_owned();
    (dir, server, rev)
}

/// A client on fresh connections, so each check is one more connection to the server.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// A legitimate client is served: the welcome, and an authenticated read of `kept`.
async fn still_served(server: &ServerProcess, rev: &str) {
    let client = client();
    let welcome = client
        .get(format!("{}/", server.bare_url))
        .send()
        .await
        .expect("GET / is answered");
    assert_eq!(welcome.status(), 200);
    let kept = client
        .get(format!("{}/{DB}/kept", server.bare_url))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .send()
        .await
        .expect("an authenticated read is answered");
    assert_eq!(kept.status(), 200);
    let kept: Value = kept.json().await.unwrap();
    assert_eq!(kept["_rev"], json!(rev), "{kept}");
    assert_eq!(kept["v"], json!(1), "{kept}");
}

/// Nothing stored changed: `kept` at `rev`, and no other document.
async fn nothing_changed(server: &ServerProcess, rev: &str) {
    still_served(server, rev).await;
    let all: Value = client()
        .get(format!("{}/{DB}/_all_docs", server.bare_url))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["total_rows"], json!(1), "{all}");
}

async fn raw(server: &ServerProcess) -> TcpStream {
    TcpStream::connect(&server.address).await.unwrap()
}

/// What the server sends until it closes the connection, and whether it did within `within`.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let deadline = Instant::now() + within;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), false),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&received).into_owned(), true),
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
        }
    }
}

/// Whether the server closed `stream` (checked for `within`, so an open one costs that).
async fn is_closed(stream: &mut TcpStream, within: Duration) -> bool {
    until_closed(stream, within).await.1
}

/// Reads from `stream` until what arrived is `enough`, each read within 5 s.
async fn read_until(stream: &mut TcpStream, what: &str, enough: impl Fn(&[u8]) -> bool) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !enough(&received) {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("no {what} within 5 s"))
            .unwrap();
        assert!(
            read > 0,
            "closed before {what}: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Once a response's head has arrived: where it ends, and the length its `content-length`
/// declares.
fn response_head(received: &[u8]) -> Option<(usize, Option<usize>)> {
    let end = received.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&received[..end]).to_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|value| value.trim().parse().unwrap());
    Some((end, length))
}

/// Reads until a response's head has arrived (what came with it included): the server is
/// working on that request.
async fn read_head(stream: &mut TcpStream) -> String {
    read_until(stream, "response head", |received| {
        response_head(received).is_some()
    })
    .await
}

/// Reads one response with a `content-length` body from a keep-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    read_until(stream, "whole response", |received| {
        response_head(received)
            .is_some_and(|(end, length)| received.len() >= end + 4 + length.unwrap_or(0))
    })
    .await
}

/// The server's side of its TCP connections, from the kernel's table: (remote address, state)
/// of each socket bound to `server` other than the listener. State 01 is ESTABLISHED, 06
/// TIME_WAIT (a connection already gone).
fn server_sockets(server: SocketAddr) -> Vec<(String, String)> {
    let entry = |address: SocketAddr| match address {
        SocketAddr::V4(address) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(address.ip().octets()),
            address.port()
        ),
        SocketAddr::V6(_) => panic!("the test server listens on IPv4"),
    };
    let local = entry(server);
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields[1] == local && fields[3] != "0A")
                .then(|| (fields[2].to_owned(), fields[3].to_owned()))
        })
        .collect()
}

/// Whether the server has closed its end of the connection from `client`: a client that does
/// not read sees nothing of a close until it reads (which would let the server write on), but
/// the server's socket leaves ESTABLISHED the moment the server closes it.
fn server_closed(server: SocketAddr, client: SocketAddr) -> bool {
    let SocketAddr::V4(client) = client else {
        panic!("the test client connects over IPv4")
    };
    let remote = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(client.ip().octets()),
        client.port()
    );
    !server_sockets(server)
        .iter()
        .any(|(peer, state)| *peer == remote && state == "01")
}

/// Waits (up to 10 s) until the server holds exactly `count` connections that are not gone.
async fn until_server_holds(server: SocketAddr, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = server_sockets(server)
            .iter()
            .filter(|(_, state)| state != "06")
            .count();
        if held == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server holds {held} connections, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const GET_WELCOME: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn partial_headers_are_cut_at_the_header_read_timeout() {
    let (_dir, server, rev) = server(&["--header-read-timeout", "1"]).await;
    // Within the timeout: a head trickled in two parts is served.
    let mut patient = raw(&server).await;
    patient.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    patient.write_all(b"Host: x\r\n\r\n").await.unwrap();
    assert!(
        read_response(&mut patient)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Past it: partial headers, and a connection that never sends a byte, are closed.
    let mut partial = raw(&server).await;
    partial
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut silent = raw(&server).await;
    still_served(&server, &rev).await;
    let started = Instant::now();
    let (answer, closed) = until_closed(&mut partial, Duration::from_secs(5)).await;
    assert!(closed, "partial headers still open after 5 s");
    assert!(answer.is_empty(), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(is_closed(&mut silent, Duration::from_secs(4)).await);
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_at_the_idle_timeout() {
    let (_dir, server, rev) = server(&["--idle-timeout", "1"]).await;
    let mut connection = raw(&server).await;
    connection.write_all(GET_WELCOME).await.unwrap();
    assert!(
        read_response(&mut connection)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Within the timeout, the connection is reused.
    tokio::time::sleep(Duration::from_millis(400)).await;
    connection.write_all(GET_WELCOME).await.unwrap();
    assert!(
        read_response(&mut connection)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Past it, the connection is closed.
    let started = Instant::now();
    assert!(
        is_closed(&mut connection, Duration::from_secs(5)).await,
        "an idle keep-alive connection still open after 5 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));
    still_served(&server, &rev).await;
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn a_response_read_slowly_is_served_whole_and_one_not_read_is_cut_at_the_idle_timeout() {
    // One 12 MB document: more than loopback's socket buffers hold.
    let (_dir, server, rev) =
        server(&["--idle-timeout", "2", "--max-document-bytes", "13000000"]).await;
    let put = client()
        .put(format!("{}/{DB}/big", server.bare_url))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .json(&json!({"pad": "x".repeat(12_000_000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let big_rev = put.json::<Value>().await.unwrap()["rev"]
        .as_str()
        .unwrap()
        .to_owned();
    let request = format!("GET /{DB}/big HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC}\r\n\r\n");
    // Read slowly, in pauses shorter than the idle timeout, for longer than it: served whole.
    let mut slow = raw(&server).await;
    slow.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let started = Instant::now();
    let length = loop {
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buffer))
            .await
            .expect("the response goes on")
            .unwrap();
        assert!(
            read > 0,
            "a slow reader was cut after {} bytes",
            received.len()
        );
        received.extend_from_slice(&buffer[..read]);
        if let Some((end, length)) = response_head(&received) {
            let length = length.expect("a content-length");
            if received.len() >= end + 4 + length {
                break length;
            }
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    };
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "not slow enough to tell"
    );
    // Stop reading altogether: the connection is closed a moment past the idle timeout, with
    // the response unfinished, and a legitimate client is served meanwhile; the same for a
    // streamed answer (chunked, written as the client reads), which the watchdog once missed:
    // it slept on the connection's first deadline through a request's blocked writes.
    let streamed = format!(
        "GET /{DB}/_changes?include_docs=true HTTP/1.1\r\nHost: x\r\n\
         Authorization: {BASIC}\r\n\r\n"
    );
    for request in [&request, &streamed] {
        // A small receive buffer, so that the kernel's buffers hold far less than the answer.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        let mut stalled = socket
            .connect(server.address.parse().unwrap())
            .await
            .unwrap();
        let stalled_since = Instant::now();
        stalled.write_all(request.as_bytes()).await.unwrap();
        still_served(&server, &rev).await;
        let (server_end, client_end) =
            (stalled.peer_addr().unwrap(), stalled.local_addr().unwrap());
        while !server_closed(server_end, client_end) {
            assert!(
                stalled_since.elapsed() < Duration::from_secs(10),
                "the server still holds a response nobody reads: {request}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Not before the idle timeout (2 s): the writes were blocked that long.
        assert!(stalled_since.elapsed() >= Duration::from_secs(2));
        let (answer, closed) = until_closed(&mut stalled, Duration::from_secs(10)).await;
        assert!(closed, "the stalled response's connection is still open");
        let (head, body) = answer.split_once("\r\n\r\n").expect("the response started");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // Both answers carry the whole document.
        assert!(
            body.len() < length,
            "the whole response arrived: {} bytes of {request}",
            body.len()
        );
    }
    let deleted = client()
        .delete(format!("{}/{DB}/big?rev={big_rev}", server.bare_url))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn short_and_unfinished_bodies_are_answered_408_at_the_body_timeout() {
    let (_dir, server, rev) = server(&["--request-body-timeout", "1"]).await;
    // Within the timeout: a body trickled in two parts is stored.
    let body = r#"{"v": 2}"#;
    let mut patient = raw(&server).await;
    let head = format!(
        "PUT /{DB}/patient HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    patient.write_all(head.as_bytes()).await.unwrap();
    patient.write_all(&body.as_bytes()[..3]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    patient.write_all(&body.as_bytes()[3..]).await.unwrap();
    assert!(
        read_response(&mut patient)
            .await
            .starts_with("HTTP/1.1 201")
    );
    let deleted = client()
        .delete(format!("{}/{DB}/patient", server.bare_url))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .query(&[(
            "rev",
            client()
                .get(format!("{}/{DB}/patient", server.bare_url))
                .basic_auth(TEST_USER, Some(TEST_PASSWORD))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["_rev"]
                .as_str()
                .unwrap(),
        )])
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);

    // Past it: a body shorter than its Content-Length, and an unfinished chunked one.
    let mut short = raw(&server).await;
    short
        .write_all(
            format!(
                "PUT /{DB}/short HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"v\": "
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut chunked = raw(&server).await;
    chunked
        .write_all(
            format!(
                "PUT /{DB}/chunked HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC}\r\n\
                 Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\n{{\"v\":\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    still_served(&server, &rev).await;
    for stream in [&mut short, &mut chunked] {
        let (answer, closed) = until_closed(stream, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(closed, "the connection stays open after the 408");
    }
    // `patient` was deleted: a tombstone, so `_all_docs` lists `kept` alone.
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn a_request_head_past_the_header_limit_is_answered_431() {
    let (_dir, server, rev) = server(&["--max-header-bytes", "16384"]).await;
    let head_of = |size: usize| {
        let skeleton = "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n".len();
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(size - skeleton)
        )
    };
    // At the limit: served.
    let mut at_limit = raw(&server).await;
    let head = head_of(16384);
    assert_eq!(head.len(), 16384);
    at_limit.write_all(head.as_bytes()).await.unwrap();
    let answer = read_response(&mut at_limit).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // One past it: 431, and the connection closed.
    let mut past = raw(&server).await;
    past.write_all(head_of(16385).as_bytes()).await.unwrap();
    let (answer, closed) = until_closed(&mut past, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(closed);
    still_served(&server, &rev).await;
}

#[tokio::test]
async fn a_declared_length_past_the_limit_is_refused_before_the_body() {
    let limit = 64 * 1024;
    let (_dir, server, rev) = server(&[
        "--max-request-bytes",
        &limit.to_string(),
        "--max-unauthenticated-bytes",
        "4096",
    ])
    .await;
    // At the limit: a body of exactly the limit is read and stored.
    let mut body = json!({"docs": [{"_id": "at-limit", "v": 1}]}).to_string();
    body.push_str(&" ".repeat(limit - body.len()));
    let stored = client()
        .post(format!("{}/{DB}/_bulk_docs", server.bare_url))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 201);
    let stored: Value = stored.json().await.unwrap();
    let at_limit_rev = stored[0]["rev"].as_str().unwrap().to_owned();
    // One past it, and 10^12, are refused at once, with no body sent at all.
    for (path, declared) in [
        (format!("/{DB}/_bulk_docs"), limit + 1),
        (format!("/{DB}/_bulk_docs"), 1_000_000_000_000),
        ("/_session".to_owned(), 4097),
    ] {
        let mut stream = raw(&server).await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {BASIC}\r\n\
             Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let (answer, _) = until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{declared}: {answer:?}");
        assert!(answer.contains("too_large"), "{answer}");
        // Well before the body timeout (60 s): nothing waited for the body.
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    let deleted = client()
        .delete(format!(
            "{}/{DB}/at-limit?rev={at_limit_rev}",
            server.bare_url
        ))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn login_bodies_are_small_before_authentication() {
    let (_dir, server, rev) = server(&["--max-unauthenticated-bytes", "4096"]).await;
    let login = |body: String| {
        client()
            .post(format!("{}/_session", server.bare_url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let mut at_limit = json!({"name": TEST_USER, "password": TEST_PASSWORD}).to_string();
    at_limit.push_str(&" ".repeat(4096 - at_limit.len()));
    assert_eq!(login(at_limit.clone()).await.unwrap().status(), 200);
    at_limit.push(' ');
    let past = login(at_limit).await.unwrap();
    assert_eq!(past.status(), 413);
    // Without a Content-Length (chunked), the limit holds while reading.
    let mut streamed = raw(&server).await;
    let mut request = b"POST /_session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
        Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..5 {
        request.extend_from_slice(format!("3e8\r\n{}\r\n", " ".repeat(1000)).as_bytes());
    }
    streamed.write_all(&request).await.unwrap();
    let (answer, _) = until_closed(&mut streamed, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn a_connection_flood_evicts_idle_connections_and_legitimate_clients_are_served() {
    let (_dir, server, rev) =
        server(&["--max-connections", "20", "--header-read-timeout", "60"]).await;
    let address: SocketAddr = server.address.parse().unwrap();
    // The setup's own connections are gone first, so that the flood is all the server holds.
    until_server_holds(address, 0).await;
    // At the limit: 20 connections that say nothing are all kept.
    let mut flood = Vec::new();
    for _ in 0..20 {
        flood.push(raw(&server).await);
    }
    until_server_holds(address, 20).await;
    for stream in &mut flood {
        assert!(!is_closed(stream, Duration::from_millis(20)).await);
    }
    // One past it: the connection idle longest makes room.
    flood.push(raw(&server).await);
    assert!(is_closed(&mut flood[0], Duration::from_secs(10)).await);
    // A flood many times the limit: legitimate clients are still served throughout.
    for round in 0..5 {
        for _ in 0..20 {
            flood.push(raw(&server).await);
        }
        still_served(&server, &rev).await;
        eprintln!("flood round {round}: {} connections opened", flood.len());
    }
    let mut open = 0;
    for stream in &mut flood {
        if !is_closed(stream, Duration::from_millis(20)).await {
            open += 1;
        }
    }
    assert!(
        open <= 20,
        "{open} idle connections open past the limit of 20"
    );
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn when_every_connection_is_busy_a_new_one_is_closed_at_once() {
    let (_dir, server, rev) = server(&["--max-connections", "2"]).await;
    // Two long polls: requests in progress, which nothing evicts.
    let mut polls = Vec::new();
    for _ in 0..2 {
        let mut stream = raw(&server).await;
        let head = format!(
            "GET /{DB}/_changes?feed=longpoll&since=now&timeout=6000&heartbeat=100 HTTP/1.1\r\n\
             Host: x\r\nAuthorization: {BASIC}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // Its heartbeats follow the head: the poll is in progress.
        assert!(read_head(&mut stream).await.starts_with("HTTP/1.1 200"));
        polls.push(stream);
    }
    let mut refused = raw(&server).await;
    let started = Instant::now();
    assert!(is_closed(&mut refused, Duration::from_secs(4)).await);
    // Before the long polls end: it was not kept waiting for a place.
    assert!(started.elapsed() < Duration::from_secs(4));
    for stream in &mut polls {
        let (_, closed) = until_closed(stream, Duration::from_millis(300)).await;
        assert!(!closed, "a long poll was cut");
    }
    // Once answered, they are idle, and make room again.
    for stream in &mut polls {
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        while !received.ends_with(b"0\r\n\r\n") {
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
                .await
                .expect("the long poll ends")
                .unwrap();
            assert!(read > 0, "the long poll was cut");
            received.extend_from_slice(&buffer[..read]);
        }
    }
    still_served(&server, &rev).await;
}

async fn connect(server: &ServerProcess) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let url = format!("ws://{}/_ferry/sync", server.address);
    tokio_tungstenite::connect_async(url)
        .await
        .map(|(socket, _)| socket)
}

fn hello(replica: &str) -> Value {
    json!({
        "type": "hello", "versions": [1], "db": DB, "replica_id": replica,
        "auth": {"name": TEST_USER, "password": TEST_PASSWORD},
    })
}

async fn send(socket: &mut Socket, frame: &Value) {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON frame; `None` when the session closed.
async fn receive(socket: &mut Socket) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a frame in time")?;
        match message {
            Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// The frames before the close, and the close frame's code and reason (`None`: the
/// connection dropped without one).
async fn closing(socket: &mut Socket) -> (Vec<Value>, Option<(u16, String)>) {
    let mut frames = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("the session ended in time");
        match message {
            Some(Ok(Message::Text(text))) => frames.push(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(Some(frame)))) => {
                return (
                    frames,
                    Some((u16::from(frame.code), frame.reason.to_string())),
                );
            }
            Some(Ok(Message::Close(None)) | Err(_)) | None => return (frames, None),
            Some(Ok(_)) => {}
        }
    }
}

/// An authenticated session, welcomed.
async fn open(server: &ServerProcess, replica: &str) -> Socket {
    let mut socket = connect(server).await.expect("the upgrade is accepted");
    send(&mut socket, &hello(replica)).await;
    let welcome = receive(&mut socket).await.expect("an answer to hello");
    assert_eq!(welcome["type"], json!("welcome"), "{welcome}");
    socket
}

#[tokio::test]
async fn sessions_that_never_say_hello_do_not_lock_users_out() {
    let (_dir, server, rev) = server(&[
        "--max-sessions",
        "3",
        "--max-unauthenticated-sessions",
        "5",
        "--hello-timeout",
        "1",
    ])
    .await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect(&server).await.unwrap());
    }
    // Three upgrades that never say hello take no session slot.
    let mut user = open(&server, "real-user").await;
    send(&mut user, &json!({"type": "ping"})).await;
    assert_eq!(receive(&mut user).await.unwrap()["type"], json!("pong"));
    // At the unauthenticated limit (five), and one past it.
    for _ in 0..2 {
        silent.push(connect(&server).await.unwrap());
    }
    match connect(&server).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert_eq!(response.headers()["retry-after"], "1");
            if let Some(body) = response.body() {
                let body = String::from_utf8_lossy(body);
                assert!(body.contains("too_many_unauthenticated_sessions"), "{body}");
            }
        }
        other => panic!("a sixth unauthenticated session was not refused: {other:?}"),
    }
    still_served(&server, &rev).await;
    // The hello deadline closes them with a reason, and frees their places.
    for socket in &mut silent {
        let (frames, close) = closing(socket).await;
        assert_eq!(frames[0]["error"], json!("timeout"), "{frames:?}");
        let (code, reason) = close.expect("a close frame");
        assert_eq!(code, 1008);
        assert!(reason.contains("hello"), "{reason}");
    }
    let mut later = open(&server, "later-user").await;
    send(&mut later, &json!({"type": "ping"})).await;
    assert_eq!(receive(&mut later).await.unwrap()["type"], json!("pong"));
    nothing_changed(&server, &rev).await;
}

/// `--session-idle-timeout`: a session that pings within it lives on, one silent past it is
/// closed with 1008 and the reason, and `welcome` tells clients the timeout and the frame limit.
#[tokio::test]
async fn a_silent_session_is_closed_at_the_session_idle_timeout() {
    let (_dir, server, rev) = server(&["--session-idle-timeout", "1"]).await;
    let mut pinging = connect(&server).await.unwrap();
    send(&mut pinging, &hello("pinging")).await;
    let welcome = receive(&mut pinging).await.unwrap();
    assert_eq!(welcome["idle_timeout_ms"], json!(1000), "{welcome}");
    assert_eq!(
        welcome["max_frame_bytes"],
        json!(32 * 1024 * 1024),
        "{welcome}"
    );
    // Timed from before the hello: the server's idle clock starts when it receives it, later.
    let started = Instant::now();
    let mut silent = open(&server, "silent").await;
    // One session pings every 0.6 s, inside the timeout, until the other one, silent since it
    // opened, is closed (`closing` gives it 5 s).
    let mut cadence = tokio::time::interval(Duration::from_millis(600));
    let keep_pinging = async {
        loop {
            cadence.tick().await;
            send(&mut pinging, &json!({"type": "ping"})).await;
            assert_eq!(receive(&mut pinging).await.unwrap()["type"], json!("pong"));
        }
    };
    let (frames, close) = tokio::select! {
        ended = closing(&mut silent) => ended,
        () = keep_pinging => unreachable!("pinging never ends"),
    };
    assert_eq!(frames[0]["error"], json!("timeout"), "{frames:?}");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1008);
    assert!(reason.contains("nothing received for 1 s"), "{reason}");
    // Closed past the timeout, well before the default of 60 s.
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(10));
    send(&mut pinging, &json!({"type": "ping"})).await;
    assert_eq!(receive(&mut pinging).await.unwrap()["type"], json!("pong"));
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn a_session_authenticated_when_every_place_is_taken_is_closed_1013() {
    let (_dir, server, rev) = server(&["--max-sessions", "1"]).await;
    // Both upgrades are accepted while no one holds the one place.
    let mut first = connect(&server).await.unwrap();
    let mut second = connect(&server).await.unwrap();
    send(&mut first, &hello("first")).await;
    assert_eq!(receive(&mut first).await.unwrap()["type"], json!("welcome"));
    send(&mut second, &hello("second")).await;
    let (frames, close) = closing(&mut second).await;
    assert_eq!(frames[0]["error"], json!("too_many_sessions"), "{frames:?}");
    assert_eq!(frames[0]["status"], json!(503), "{frames:?}");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1013, "{reason}");
    // The one in place is served.
    send(&mut first, &json!({"type": "ping"})).await;
    assert_eq!(receive(&mut first).await.unwrap()["type"], json!("pong"));
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn a_hello_frame_past_the_pre_authentication_limit_is_closed_1009_unread() {
    let (_dir, server, rev) = server(&["--max-unauthenticated-bytes", "4096"]).await;
    let padded = |size: usize| {
        let mut hello = hello("padded");
        hello["pad"] = json!("");
        let skeleton = hello.to_string().len();
        hello["pad"] = json!("x".repeat(size - skeleton));
        hello
    };
    // At the limit: welcomed.
    let mut socket = connect(&server).await.unwrap();
    let at_limit = padded(4096);
    assert_eq!(at_limit.to_string().len(), 4096);
    send(&mut socket, &at_limit).await;
    assert_eq!(
        receive(&mut socket).await.unwrap()["type"],
        json!("welcome")
    );
    // One past it, and far past it (more than the connection may send before hello).
    for size in [4097, 200_000] {
        let mut socket = connect(&server).await.unwrap();
        send(&mut socket, &padded(size)).await;
        let (frames, close) = closing(&mut socket).await;
        let (code, reason) = close.expect("a close frame");
        assert_eq!(code, 1009, "{size}: {reason}");
        assert!(
            frames.iter().any(|f| f["error"] == json!("too_large")),
            "{frames:?}"
        );
    }
    still_served(&server, &rev).await;
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn a_login_flood_waits_for_few_password_checks_and_the_rest_get_503() {
    let (_dir, server, rev) =
        server(&["--max-password-checks", "1", "--password-check-wait", "0"]).await;
    // At the limit: one check at a time is answered as usual.
    let wrong = || {
        client()
            .post(format!("{}/_session", server.bare_url))
            .json(&json!({"name": TEST_USER, "password": "not the password"}))
            .send()
    };
    assert_eq!(wrong().await.unwrap().status(), 401);
    // Past it: concurrent wrong passwords beyond the one running are told to retry.
    let flood: Vec<_> = (0..16).map(|_| tokio::spawn(wrong())).collect();
    // The test user's password was verified already (when seeding): still served from memory.
    still_served(&server, &rev).await;
    let mut statuses = Vec::new();
    for answer in flood {
        let answer = answer.await.unwrap().unwrap();
        let status = answer.status().as_u16();
        let retry_after = answer.headers().get("retry-after").cloned();
        let body: Value = answer.json().await.unwrap();
        if status == 503 {
            assert_eq!(body["error"], json!("too_many_logins"), "{body}");
            assert_eq!(retry_after.unwrap(), "1");
        }
        statuses.push(status);
    }
    assert!(
        statuses.iter().all(|status| [401, 503].contains(status)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&503),
        "no login was refused: {statuses:?}"
    );
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn logins_past_the_password_checks_wait_their_turn_within_the_wait() {
    let (_dir, server, rev) =
        server(&["--max-password-checks", "1", "--password-check-wait", "60"]).await;
    let wrong = || {
        client()
            .post(format!("{}/_session", server.bare_url))
            .json(&json!({"name": TEST_USER, "password": "not the password"}))
            .send()
    };
    let flood: Vec<_> = (0..4).map(|_| tokio::spawn(wrong())).collect();
    for answer in flood {
        assert_eq!(answer.await.unwrap().unwrap().status(), 401);
    }
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn frames_the_session_cannot_take_get_a_close_code_and_reason() {
    let limit = 64 * 1024;
    let (_dir, server, rev) = server(&["--max-request-bytes", &limit.to_string()]).await;
    let ping = |size: usize| {
        let skeleton = json!({"type": "ping", "pad": ""}).to_string().len();
        json!({"type": "ping", "pad": "x".repeat(size - skeleton)})
    };
    // At the limit: answered.
    let mut socket = open(&server, "frames").await;
    send(&mut socket, &ping(limit)).await;
    assert_eq!(receive(&mut socket).await.unwrap()["type"], json!("pong"));
    // One past it: 1009.
    send(&mut socket, &ping(limit + 1)).await;
    let (_, close) = closing(&mut socket).await;
    let (code, reason) = close.expect("a close frame for an oversized frame");
    assert_eq!(code, 1009, "{reason}");
    assert!(
        reason.contains("too large") || reason.contains("larger"),
        "{reason}"
    );

    let invalid_utf8 = Message::Frame(Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(Data::Text),
        true,
    ));
    for (frame, expected, error) in [
        (Message::Binary(b"{}".to_vec().into()), 1003, "bad_request"),
        (invalid_utf8, 1007, "bad_request"),
        (Message::Text("{not json".into()), 1008, "bad_request"),
        (
            Message::Text(r#"{"type":"gossip"}"#.into()),
            1008,
            "bad_request",
        ),
    ] {
        let mut socket = open(&server, "frames").await;
        socket.send(frame).await.unwrap();
        let (frames, close) = closing(&mut socket).await;
        let (code, reason) = close.expect("a close frame");
        assert_eq!(code, expected, "{reason}");
        assert!(!reason.is_empty());
        assert_eq!(frames[0]["type"], json!("error"), "{frames:?}");
        assert_eq!(frames[0]["error"], json!(error), "{frames:?}");
    }
    still_served(&server, &rev).await;
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn the_default_frame_limit_is_the_request_limit_not_16_mib() {
    let (_dir, server, rev) = server(&[]).await;
    let mut socket = open(&server, "big-frames").await;
    // 17 MiB: past the WebSocket library's default frame limit, under the 32 MiB requests.
    let size = 17 * 1024 * 1024;
    let skeleton = json!({"type": "ping", "pad": ""}).to_string().len();
    let frame = json!({"type": "ping", "pad": "x".repeat(size - skeleton)});
    send(&mut socket, &frame).await;
    let answer = tokio::time::timeout(Duration::from_secs(30), receive(&mut socket))
        .await
        .unwrap();
    assert_eq!(
        answer.expect("an answer, not a reset")["type"],
        json!("pong")
    );
    nothing_changed(&server, &rev).await;
}

#[tokio::test]
async fn shutdown_lets_requests_in_progress_finish_and_closes_idle_connections() {
    let (_dir, mut server, _rev) = server(&[]).await;
    let mut idle = raw(&server).await;
    idle.write_all(GET_WELCOME).await.unwrap();
    assert!(read_response(&mut idle).await.starts_with("HTTP/1.1 200"));
    let mut poll = raw(&server).await;
    let head = format!(
        "GET /{DB}/_changes?feed=longpoll&since=now&timeout=1500&heartbeat=100 HTTP/1.1\r\n\
         Host: x\r\nAuthorization: {BASIC}\r\n\r\n"
    );
    poll.write_all(head.as_bytes()).await.unwrap();
    let started = read_head(&mut poll).await;
    assert!(started.starts_with("HTTP/1.1 200"), "{started:?}");
    let mut session = open(&server, "shutdown").await;
    server.interrupt();
    assert!(
        is_closed(&mut idle, Duration::from_secs(5)).await,
        "an idle connection outlived the shutdown"
    );
    let (answer, _) = until_closed(&mut poll, Duration::from_secs(5)).await;
    assert!(
        answer.contains("last_seq"),
        "the long poll was cut: {answer:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = server.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "ferry serve did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert!(
        receive(&mut session).await.is_none(),
        "the session outlived the server"
    );
}

#[tokio::test]
async fn page_caches_are_bounded_and_applied_at_their_bounds() {
    let (min, max) = (
        ferry_store::PageCache::MIN_KIB.to_string(),
        ferry_store::PageCache::MAX_KIB.to_string(),
    );
    let (below, past) = (
        (ferry_store::PageCache::MIN_KIB - 1).to_string(),
        (ferry_store::PageCache::MAX_KIB + 1).to_string(),
    );
    for (flag, value) in [
        ("--page-cache-writer-kib", &below),
        ("--page-cache-reader-kib", &below),
        ("--page-cache-writer-kib", &past),
        ("--page-cache-reader-kib", &past),
    ] {
        let message = support::serve_refused(&[flag, value], &[]);
        assert!(
            message.contains("page cache") && message.contains(value.as_str()),
            "{flag} {value}: {message}"
        );
    }
    for value in [&min, &max] {
        let args = [
            "--page-cache-writer-kib",
            value,
            "--page-cache-reader-kib",
            value,
        ];
        let (_dir, server, rev) = server(&args).await;
        still_served(&server, &rev).await;
    }
}

#[tokio::test]
async fn the_server_starts_only_with_origins_that_are_origins() {
    for bad in ["*", "null", "https://app.example.com/path"] {
        let message = support::serve_refused(&["--allow-origin", bad], &[]);
        assert!(message.contains("invalid origin"), "{bad}: {message}");
    }
    let (_dir, server, rev) = server(&["--allow-origin", "https://app.example.com"]).await;
    still_served(&server, &rev).await;
    let from = |origin: &'static str| {
        client()
            .get(format!("{}/_session", server.bare_url))
            .header("origin", origin)
            .send()
    };
    let allowed = from("https://app.example.com").await.unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(
        from("https://evil.example.com").await.unwrap().status(),
        403
    );
}
