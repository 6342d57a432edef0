//! Hostile and careless input against a real `ferry serve`: nothing a client sends may leave
//! a database that its feeds, listings or other clients cannot read (issue 13, "A database
//! can be poisoned for good"). Each test checks the refusal, that the rest of the database is
//! still served, and that nothing stored changed.

mod support;

use std::path::Path;

use ferry_client::{Credentials, Ferry, SyncOptions};
use ferry_store::sqlite::SqliteDatabase;
use ferry_store::{Database, Edit, StoreConfig};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use support::{ServerProcess, TEST_PASSWORD, TEST_USER, ferry_json};

const DB: &str = "hostile";
/// `ferry_core::rev::MAX_GENERATION`, written out as a client would send it.
const LARGEST: &str = "9007199254740991";

struct Http {
    client: Client,
    base: String,
}

impl Http {
    async fn new(server: &ServerProcess) -> Http {
        let http = Http {
            client: Client::new(),
            base: format!("{}/{DB}", server.bare_url),
        };
        let (status, body) = http.send(reqwest::Method::PUT, "", None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        http
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .basic_auth(TEST_USER, Some(TEST_PASSWORD));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status();
        let text = response.text().await.expect("a body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    /// The ids `_changes` lists, after asserting it answers 200.
    async fn changed_ids(&self) -> Vec<String> {
        let (status, changes) = self.get("/_changes?style=all_docs").await;
        assert_eq!(status, StatusCode::OK, "{changes}");
        let mut ids: Vec<String> = changes["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|row| row["id"].as_str().expect("an id").to_owned())
            .collect();
        ids.sort();
        ids
    }

    /// The ids `_all_docs` lists, after asserting it answers 200.
    async fn listed_ids(&self) -> Vec<String> {
        let (status, all) = self.get("/_all_docs").await;
        assert_eq!(status, StatusCode::OK, "{all}");
        all["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|row| row["id"].as_str().expect("an id").to_owned())
            .collect()
    }
}

/// A replica that pulls the whole database through the WebSocket session (`ferry sync`).
fn pulled_ids(server: &ServerProcess, dir: &Path) -> Vec<String> {
    let replica = dir.join("pull.ferry").display().to_string();
    ferry_json(&["init", &replica]);
    ferry_json(&["sync", &replica, &format!("{}/{DB}", server.url)]);
    let listed = ferry_json(&["list", &replica, "todos"]);
    let mut ids: Vec<String> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|doc| format!("todos:{}", doc["_id"].as_str().expect("an id")))
        .collect();
    ids.sort();
    ids
}

/// Before the fix, `18446744073709551615-aaaa` was accepted and its child wrapped to
/// generation 0, a revision no replica can read: every feed of the database answered 500 from
/// then on. Now a generation past 2^53 - 1 is refused on every path, a revision at it cannot
/// be edited, and the database keeps serving.
#[tokio::test]
async fn revision_generations_cannot_overflow_into_an_unreadable_database() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--default-conflict-policy", "last-write-wins"],
    );
    let http = Http::new(&server).await;
    let (status, _) = http.put("/todos:plain", json!({"title": "milk"})).await;
    assert_eq!(status, StatusCode::CREATED);

    // Past the largest generation: refused on every write path, stored nowhere.
    for beyond in ["18446744073709551615", "9007199254740992"] {
        let rev = format!("{beyond}-aaaa");
        let (status, refusal) = http
            .put("/todos:ovf?new_edits=false", json!({"_rev": rev}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{refusal}");
        assert_eq!(refusal["error"], json!("bad_request"), "{refusal}");
        let (status, answer) = http
            .post(
                "/_bulk_docs",
                json!({"new_edits": false, "docs": [{"_id": "todos:ovf", "_rev": rev}]}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let (status, _) = http.get("/todos:ovf").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    // At the largest generation: stored, readable, and an edit of it is refused alone.
    let top = format!("{LARGEST}-aaaa");
    let (status, stored) = http
        .put("/todos:top?new_edits=false", json!({"_rev": top, "v": 1}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    let (status, refusal) = http.put("/todos:top", json!({"_rev": top, "v": 2})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refusal}");
    assert!(
        refusal["reason"]
            .as_str()
            .unwrap()
            .contains("largest generation"),
        "{refusal}"
    );
    let (status, answer) = http
        .post(
            "/_bulk_docs",
            json!({"docs": [{"_id": "todos:top", "_rev": top, "v": 3}, {"_id": "todos:next", "v": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert!(answer[0]["error"].is_string(), "{answer}");
    assert_eq!(answer[1]["ok"], json!(true), "{answer}");

    // Two branches at the largest generation in one replicated batch: a conflict that no
    // policy can resolve (a resolution is a child of each), kept as it is, and the batch
    // answered (before the fix: 500 after the commit, so the client retried forever).
    let branches = json!({"new_edits": false, "docs": [
        {"_id": "todos:twins", "_rev": format!("{LARGEST}-bb"), "v": "b"},
        {"_id": "todos:twins", "_rev": format!("{LARGEST}-cc"), "v": "c"},
    ]});
    let (status, answer) = http.post("/_bulk_docs", branches).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (status, twins) = http.get("/todos:twins?conflicts=true").await;
    assert_eq!(status, StatusCode::OK, "{twins}");
    assert_eq!(twins["_rev"], json!(format!("{LARGEST}-cc")));
    assert_eq!(twins["_conflicts"], json!([format!("{LARGEST}-bb")]));

    let (status, kept) = http.get("/todos:top").await;
    assert_eq!(
        (status, kept["v"].clone()),
        (StatusCode::OK, json!(1)),
        "{kept}"
    );
    let everything = ["todos:next", "todos:plain", "todos:top", "todos:twins"];
    assert_eq!(http.changed_ids().await, everything);
    assert_eq!(http.listed_ids().await, everything);
    assert_eq!(pulled_ids(&server, dir.path()), everything);
}

/// A row whose stored data cannot be decoded (a damaged file, a bug of an older version):
/// reading that document is a clear error, and everything else is still listed, fed and
/// replicated. Before, `_changes`, `_all_docs` and every pull of the database answered 500.
#[tokio::test]
async fn one_unreadable_document_does_not_take_its_database_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let http = Http::new(&server).await;
    for id in ["todos:a", "todos:b", "todos:c"] {
        let (status, _) = http.put(&format!("/{id}"), json!({"title": id})).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    server.kill();
    let file = dir.path().join(format!("{DB}.sqlite"));
    let connection = rusqlite::Connection::open(&file).unwrap();
    let damaged = connection
        .execute(
            "UPDATE docs SET rev = '0-damaged', body = '{not json' WHERE doc_id = 'todos:b'",
            [],
        )
        .unwrap();
    assert_eq!(damaged, 1);
    drop(connection);
    server.restart();
    let http = Http {
        client: Client::new(),
        base: format!("{}/{DB}", server.bare_url),
    };

    let (status, error) = http.get("/todos:b").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{error}");
    assert_eq!(error["error"], json!("corrupt_data"), "{error}");
    let (status, a) = http.get("/todos:a").await;
    assert_eq!(
        (status, a["title"].clone()),
        (StatusCode::OK, json!("todos:a"))
    );
    assert_eq!(http.changed_ids().await, ["todos:a", "todos:c"]);
    assert_eq!(http.listed_ids().await, ["todos:a", "todos:c"]);
    let (status, listed) = http.get("/_all_docs?include_docs=true").await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(
        listed["rows"][1]["doc"]["title"],
        json!("todos:c"),
        "{listed}"
    );
    // Asked for by key, the damaged document's row alone says so.
    let (status, by_key) = http
        .post(
            "/_all_docs?include_docs=true",
            json!({"keys": ["todos:a", "todos:b"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{by_key}");
    assert_eq!(
        by_key["rows"][0]["doc"]["title"],
        json!("todos:a"),
        "{by_key}"
    );
    assert_eq!(
        by_key["rows"][1],
        json!({"key": "todos:b", "error": "corrupt_data"})
    );
    let (status, page) = http.get("/_changes?limit=1&since=1").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["results"][0]["id"], json!("todos:c"), "{page}");
    assert_eq!(pulled_ids(&server, dir.path()), ["todos:a", "todos:c"]);
}

/// Integers beyond 64 bits were silently rounded to doubles (and revision ids hashed the
/// changed body). They are refused with a clear error on every path; the same magnitude
/// written as a double is a double.
#[tokio::test]
async fn integers_beyond_64_bits_are_refused_not_rounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let http = Http::new(&server).await;
    let huge = "123456789012345678901234567890";
    let raw = |text: String| {
        http.client
            .put(format!("{}/todos:n", http.base))
            .basic_auth(TEST_USER, Some(TEST_PASSWORD))
            .header("content-type", "application/json")
            .body(text)
            .send()
    };
    let refused = raw(format!(r#"{{"n":{huge}}}"#)).await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let refusal: Value = refused.json().await.unwrap();
    assert!(
        refusal["reason"].as_str().unwrap().contains(huge),
        "{refusal}"
    );
    let bulk = http
        .client
        .post(format!("{}/_bulk_docs", http.base))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .header("content-type", "application/json")
        .body(format!(r#"{{"docs":[{{"_id":"todos:m","n":{huge}}}]}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(bulk.status(), StatusCode::BAD_REQUEST);
    let (status, _) = http.get("/todos:n").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = http.get("/todos:m").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let largest = raw(r#"{"n":18446744073709551615,"d":1.2345678901234568e29}"#.to_owned())
        .await
        .unwrap();
    assert_eq!(largest.status(), StatusCode::CREATED);
    let (_, stored) = http.get("/todos:n").await;
    assert_eq!(stored["n"], json!(u64::MAX), "{stored}");
    assert_eq!(stored["d"], json!(1.2345678901234568e29), "{stored}");
}

/// 40 documents of 900 KB each: every one within the 1 MiB document limit, 36 MB together,
/// more than one 32 MiB request or frame. Before, `ferry sync` got 413 on every try and the
/// SDK's sessions were cut for a 36 MB frame, and nothing synced. Now writes and session
/// fetches are bounded by bytes, in both directions, on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_within_the_limit_sync_however_large_their_batch() {
    const COUNT: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let http = Http::new(&server).await;
    let doc_count = || async {
        let (status, info) = http.get("").await;
        assert_eq!(status, StatusCode::OK, "{info}");
        info["doc_count"].as_u64().unwrap()
    };
    let large = |n: usize| json!({"n": n, "blob": "x".repeat(900_000)});
    let options = SyncOptions::new(format!("{}/{DB}", server.bare_url))
        .credentials(Credentials::password(TEST_USER, TEST_PASSWORD));

    // The SDK pushes over the session.
    let sdk = Ferry::initialize_offline(dir.path().join("sdk.ferry"), TEST_USER).unwrap();
    let photos = sdk.collection::<Value>("photos");
    for n in 0..COUNT {
        photos
            .insert_with_id(&format!("p{n:02}"), &large(n))
            .unwrap();
    }
    let stats = sdk.sync_once(&options).await.unwrap();
    assert_eq!(stats.push.docs_written, COUNT as u64, "{stats:?}");
    assert_eq!(doc_count().await, COUNT as u64);

    // A CLI replica pushes over HTTP (_bulk_docs).
    let cli = dir.path().join("cli.ferry");
    ferry_json(&["init", cli.to_str().unwrap()]);
    let db = SqliteDatabase::open(&cli, "replica", StoreConfig::default()).unwrap();
    let edits = (0..COUNT)
        .map(|n| {
            let body = large(n).as_object().unwrap().clone();
            Edit::put(format!("scans:s{n:02}"), None, body)
        })
        .collect();
    assert!(db.write_edits(edits).unwrap().iter().all(Result::is_ok));
    drop(db);
    let url = format!("{}/{DB}", server.url);
    let pushed = ferry_json(&["sync", cli.to_str().unwrap(), &url]);
    assert_eq!(pushed["push"]["docs_written"], json!(COUNT), "{pushed}");
    assert_eq!(doc_count().await, 2 * COUNT as u64);

    // A fresh SDK replica pulls all of it over the session, a fresh CLI one over HTTP.
    let puller = Ferry::initialize_offline(dir.path().join("pull.ferry"), TEST_USER).unwrap();
    let stats = puller.sync_once(&options).await.unwrap();
    assert_eq!(stats.pull.docs_written, 2 * COUNT as u64, "{stats:?}");
    let scan = puller
        .collection::<Value>("scans")
        .get("s39")
        .unwrap()
        .unwrap();
    assert_eq!(scan.value, large(39));
    let fresh = dir.path().join("fresh.ferry");
    ferry_json(&["init", fresh.to_str().unwrap()]);
    let pulled = ferry_json(&["sync", fresh.to_str().unwrap(), &url]);
    assert_eq!(pulled["pull"]["docs_written"], json!(2 * COUNT), "{pulled}");
}

/// A client creating databases in a loop exhausted the server's file descriptors after about
/// 200 (five each, never closed); creation and `/health` then answered 500 until restart. Now
/// creation stops at `--max-databases` with a clear 403, and open databases are a bounded
/// cache: the server's descriptors stay bounded however many databases are used.
#[tokio::test]
async fn databases_have_a_quota_and_open_ones_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--max-databases", "6", "--max-open-databases", "2"],
    );
    let client = Client::new();
    let base = server.bare_url.clone();
    let send = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut request = client
            .request(method, format!("{base}{path}"))
            .basic_auth(TEST_USER, Some(TEST_PASSWORD));
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.expect("the server answers");
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let descriptors = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .count()
    };
    let names: Vec<String> = (0..6).map(|n| format!("db{n}")).collect();
    let (status, _) = send(reqwest::Method::GET, "/health".into(), None).await;
    assert_eq!(status, StatusCode::OK);
    let before = descriptors();
    for name in &names {
        let (status, body) = send(reqwest::Method::PUT, format!("/{name}"), None).await;
        assert_eq!(status, StatusCode::CREATED, "{name}: {body}");
    }
    let (status, refusal) = send(reqwest::Method::PUT, "/db6".into(), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refusal}");
    assert_eq!(refusal["error"], json!("database_quota"), "{refusal}");
    let (status, _) = send(reqwest::Method::GET, "/db6".into(), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for round in 0..3 {
        for name in &names {
            let path = format!("/{name}/todos:r{round}");
            let (status, body) =
                send(reqwest::Method::PUT, path, Some(json!({"round": round}))).await;
            assert_eq!(status, StatusCode::CREATED, "{name}: {body}");
        }
    }
    // Each open database holds up to six descriptors, and two are open at most (four more
    // for connections opened meanwhile).
    let after = descriptors();
    assert!(
        after <= before + 2 * 6 + 4,
        "{after} descriptors, {before} before"
    );
    for name in &names {
        let (status, all) = send(reqwest::Method::GET, format!("/{name}/_all_docs"), None).await;
        assert_eq!(status, StatusCode::OK, "{all}");
        assert_eq!(all["total_rows"], json!(3), "{name}: {all}");
    }
    let (status, health) = send(reqwest::Method::GET, "/health".into(), None).await;
    assert_eq!(status, StatusCode::OK, "{health}");
}

/// The peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .expect("a size in kB");
    kib * 1024
}

/// One 32 MiB request of tiny values took the server from 207 to 1,011 MB: each value parsed
/// costs far more than its two bytes of text. A request holds at most `--max-json-values`
/// values (refused with 413 at one past), which bounds that memory.
#[tokio::test]
async fn a_request_of_tiny_values_is_bounded_by_their_count() {
    let dir = tempfile::tempdir().unwrap();
    let limited = ServerProcess::start(dir.path(), &["--max-json-values", "1000"]);
    let http = Http::new(&limited).await;
    // An object, an array and its items: 1000 values, then 1001.
    let with_values = |count: usize| json!({"v": vec![0; count - 2]});
    let (status, body) = http.put("/todos:at", with_values(1000)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = http.put("/todos:past", with_values(1001)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("1000 JSON values"),
        "{body}"
    );
    let (status, _) = http.get("/todos:past").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    drop(limited);

    // On the defaults: 16 million zeros in a 32 MiB request.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let http = Http::new(&server).await;
    let (status, _) = http.put("/todos:warm", json!({"title": "warm"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let before = peak_memory(server.pid());
    let mut text = String::with_capacity(32 * 1024 * 1024);
    text.push_str(r#"{"docs":["#);
    while text.len() < 32 * 1024 * 1024 - 16 {
        text.push_str("0,");
    }
    text.push_str("0]}");
    let response = http
        .client
        .post(format!("{}/_bulk_docs", http.base))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .header("content-type", "application/json")
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let grown = peak_memory(server.pid()).saturating_sub(before);
    // The body itself (32 MiB) and a million parsed values (about 100 bytes each at worst).
    assert!(
        grown < 200 * 1024 * 1024,
        "the server's peak memory grew by {} MiB",
        grown / (1024 * 1024)
    );
    assert_eq!(http.listed_ids().await, ["todos:warm"]);
}

/// A small request can ask for a large answer: `_bulk_get` of one 1 MB document 500 times is
/// a 500 MB response. It is written a few documents at a time as the client reads it, so the
/// server's memory does not grow with it.
#[tokio::test]
async fn a_large_bulk_get_answer_is_streamed_not_held() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let http = Http::new(&server).await;
    let (status, stored) = http
        .put("/todos:big", json!({"blob": "x".repeat(1_000_000)}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    let (status, _) = http.get("/todos:big").await;
    assert_eq!(status, StatusCode::OK);
    let before = peak_memory(server.pid());
    let asked: Vec<Value> = (0..500).map(|_| json!({"id": "todos:big"})).collect();
    let mut response = http
        .client
        .post(format!("{}/_bulk_get", http.base))
        .basic_auth(TEST_USER, Some(TEST_PASSWORD))
        .json(&json!({"docs": asked}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (mut length, mut head, mut tail) = (0usize, Vec::new(), Vec::new());
    while let Some(chunk) = response.chunk().await.unwrap() {
        if head.len() < 64 {
            head.extend_from_slice(&chunk[..chunk.len().min(64)]);
        }
        tail.extend_from_slice(&chunk[chunk.len().saturating_sub(64)..]);
        tail.drain(..tail.len().saturating_sub(64));
        length += chunk.len();
    }
    assert!(length > 500 * 1_000_000, "{length} bytes");
    assert!(
        // CouchDB's order: each result's id, then its docs.
        head.starts_with(br#"{"results":[{"id":"todos:big","docs":[{"ok":{"#),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    assert!(
        tail.ends_with(b"}]}"),
        "{:?}",
        String::from_utf8_lossy(&tail)
    );
    let grown = peak_memory(server.pid()).saturating_sub(before);
    assert!(
        grown < 150 * 1024 * 1024,
        "the server's peak memory grew by {} MiB",
        grown / (1024 * 1024)
    );
}

/// The same for every other answer that carries documents: 100 documents of 1 MB are a 100 MB
/// answer from a changes page (normal, longpoll, continuous, filtered by a selector) or from
/// `_all_docs` (by range or by keys), written a few rows at a time, and still one valid
/// CouchDB answer.
#[tokio::test]
async fn large_answers_with_documents_are_streamed_not_held() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let http = Http::new(&server).await;
    for batch in 0..10 {
        let docs: Vec<Value> = (0..10)
            .map(|n| json!({"_id": format!("todos:{batch}-{n}"), "blob": "x".repeat(1_000_000)}))
            .collect();
        let (status, answer) = http.post("/_bulk_docs", json!({"docs": docs})).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    let ids: Vec<String> = (0..10)
        .flat_map(|batch| (0..10).map(move |n| format!("todos:{batch}-{n}")))
        .collect();
    let selector = json!({"selector": {"blob": {"$gt": ""}}});
    let answers: [(&str, &str, Option<Value>); 6] = [
        (
            "normal changes",
            "/_changes?include_docs=true&since=0",
            None,
        ),
        (
            "longpoll",
            "/_changes?feed=longpoll&include_docs=true",
            None,
        ),
        (
            "continuous",
            "/_changes?feed=continuous&include_docs=true&limit=100",
            None,
        ),
        ("selector", "/_changes?filter=_selector", Some(selector)),
        ("all_docs", "/_all_docs?include_docs=true", None),
        (
            "all_docs keys",
            "/_all_docs?include_docs=true",
            Some(json!({"keys": ids})),
        ),
    ];
    for (name, path, body) in answers {
        // Each answer from a fresh process: memory freed after one is kept by the allocator and
        // would hide the next one's peak.
        server.restart();
        let http = Http {
            client: Client::new(),
            base: http.base.clone(),
        };
        let (status, _) = http.get("/_changes?limit=1&include_docs=true").await;
        assert_eq!(status, StatusCode::OK);
        let before = peak_memory(server.pid());
        let request = match &body {
            Some(body) => http.client.post(format!("{}{path}", http.base)).json(body),
            None => http.client.get(format!("{}{path}", http.base)),
        };
        let response = request
            .basic_auth(TEST_USER, Some(TEST_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}");
        let text = response.bytes().await.unwrap();
        let grown = peak_memory(server.pid()).saturating_sub(before);
        let rows: Vec<Value> = if name == "continuous" {
            let lines: Vec<Value> = text
                .split(|byte| *byte == b'\n')
                .filter(|line| !line.is_empty())
                .map(|line| serde_json::from_slice(line).unwrap())
                .collect();
            assert_eq!(lines[100], json!({"last_seq": 100, "pending": 0}));
            lines[..100].to_vec()
        } else {
            let answer: Value = serde_json::from_slice(&text).unwrap();
            let rows = if name.starts_with("all_docs") {
                "rows"
            } else {
                "results"
            };
            answer[rows].as_array().unwrap().clone()
        };
        assert_eq!(rows.len(), 100, "{name}");
        if name == "selector" {
            // Matched by reading every body; the rows carry none.
            assert_eq!(rows[99]["id"], json!("todos:9-9"), "{name}");
        } else {
            assert_eq!(
                rows[99]["doc"]["blob"].as_str().unwrap().len(),
                1_000_000,
                "{name}"
            );
        }
        // One chunk of 16 documents of 1 MB held a few times over (stored text, parsed body,
        // row, written chunk): about 70 MiB measured, whatever the answer's size; a selector
        // scan holds 16 bodies at a time and sends none (3 MiB). Held whole, they took 472
        // (longpoll), 130 (continuous), 94 (selector), 304 and 318 MiB (`_all_docs`).
        let bound = if name == "selector" { 50 } else { 110 };
        assert!(
            grown < bound * 1024 * 1024,
            "{name}: the server's peak memory grew by {} MiB",
            grown / (1024 * 1024)
        );
    }
    let (status, short) = http
        .get("/_changes?include_docs=true&since=95&limit=3")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(short["results"].as_array().unwrap().len(), 3);
    assert_eq!(
        (short["last_seq"].clone(), short["pending"].clone()),
        (json!(98), json!(2))
    );
}
