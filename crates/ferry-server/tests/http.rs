//! The server over real HTTP on loopback: the CouchDB endpoints, every limit at the limit and
//! one past it, and bad input that must be refused with a clear error while nothing stored
//! changes.

use std::time::Duration;

use ferry_core::model::Limits;
use ferry_server::ServerConfig;
use ferry_server::auth::AuthConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

use ferry_test_support::TestServer;

struct Server {
    url: String,
    client: reqwest::Client,
    _server: TestServer,
}

async fn start(limits: Limits) -> Server {
    let config = ServerConfig {
        limits,
        default_feed_timeout: Duration::from_secs(5),
        // These tests are about the CouchDB endpoints; tests/auth.rs covers authentication.
        auth: AuthConfig {
            required: false,
            ..AuthConfig::default()
        },
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, &[]);
    Server {
        url: server.base_url(),
        client: reqwest::Client::new(),
        _server: server,
    }
}

impl Server {
    async fn call(&self, method: &str, path: &str, body: Option<String>) -> (StatusCode, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(text.trim()).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn json(&self, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(method, path, Some(body.to_string())).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call("GET", path, None).await
    }

    async fn update_seq(&self, db: &str) -> u64 {
        self.get(&format!("/{db}")).await.1["update_seq"]
            .as_u64()
            .unwrap()
    }
}

/// Asserts a CouchDB-shaped error.
fn assert_error(response: (StatusCode, Value), status: StatusCode, error: &str) {
    assert_eq!(response.0, status, "{}", response.1);
    assert_eq!(response.1["error"], json!(error), "{}", response.1);
    assert!(
        response.1["reason"]
            .as_str()
            .is_some_and(|reason| !reason.is_empty())
    );
}

#[tokio::test]
async fn document_lifecycle_and_conflicts_over_http() {
    let server = start(Limits::default()).await;
    assert_eq!(
        server.call("PUT", "/notes", None).await.0,
        StatusCode::CREATED
    );
    assert_error(
        server.call("PUT", "/notes", None).await,
        StatusCode::PRECONDITION_FAILED,
        "file_exists",
    );
    let (status, created) = server
        .json("PUT", "/notes/todos:1", json!({"title": "milk"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let rev1 = created["rev"].as_str().unwrap().to_owned();
    let (_, updated) = server
        .json(
            "PUT",
            "/notes/todos:1",
            json!({"_rev": rev1, "title": "oat milk"}),
        )
        .await;
    let rev2 = updated["rev"].as_str().unwrap().to_owned();
    assert!(rev2.starts_with("2-"));
    // Updating the old revision again is a conflict.
    assert_error(
        server
            .json("PUT", "/notes/todos:1", json!({"_rev": rev1, "title": "x"}))
            .await,
        StatusCode::CONFLICT,
        "conflict",
    );
    // A concurrent branch arrives by replication; both are kept.
    let (status, _) = server
        .json(
            "POST",
            "/notes/_bulk_docs",
            json!({"new_edits": false, "docs": [{"_id": "todos:1", "_rev": "2-zzzz", "_revisions": {"start": 2, "ids": ["zzzz", rev1.split_once('-').unwrap().1]}, "title": "almond milk"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, document) = server.get("/notes/todos:1?conflicts=true").await;
    assert_eq!(document["_rev"], json!("2-zzzz"), "the higher hash wins");
    assert_eq!(document["_conflicts"], json!([rev2]));
    let (_, changes) = server.get("/notes/_changes?style=all_docs").await;
    assert_eq!(
        changes["results"][0]["changes"].as_array().unwrap().len(),
        2
    );
    // Deleting the winner hands the win to the other branch.
    let (status, _) = server
        .call("DELETE", "/notes/todos:1?rev=2-zzzz", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, document) = server.get("/notes/todos:1").await;
    assert_eq!(document["title"], json!("oat milk"));
    assert_eq!(server.get("/_all_dbs").await.1, json!(["notes"]));
    assert_eq!(server.get("/health").await.1["status"], json!("ok"));
}

#[tokio::test]
async fn local_documents_and_checkpoint_revisions() {
    let server = start(Limits::default()).await;
    server.call("PUT", "/db", None).await;
    assert_error(
        server.get("/db/_local/cp").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let (_, first) = server
        .json("PUT", "/db/_local/cp", json!({"last_seq": 1}))
        .await;
    assert_eq!(first["rev"], json!("0-1"));
    assert_error(
        server
            .json("PUT", "/db/_local/cp", json!({"last_seq": 2}))
            .await,
        StatusCode::CONFLICT,
        "conflict",
    );
    let (_, second) = server
        .json(
            "PUT",
            "/db/_local/cp",
            json!({"_rev": "0-1", "last_seq": 2}),
        )
        .await;
    assert_eq!(second["rev"], json!("0-2"));
    assert_eq!(server.get("/db/_local/cp").await.1["last_seq"], json!(2));
    assert_eq!(
        server.update_seq("db").await,
        0,
        "local documents are not changes"
    );
}

#[tokio::test]
async fn longpoll_wakes_up_on_a_write() {
    let server = start(Limits::default()).await;
    server.call("PUT", "/db", None).await;
    let url = format!(
        "{}/db/_changes?feed=longpoll&since=0&heartbeat=100&timeout=4000",
        server.url
    );
    let waiting =
        tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await.unwrap() });
    // Give the request a chance to start waiting; the write below wakes it either way.
    tokio::task::yield_now().await;
    server.json("PUT", "/db/a", json!({"v": 1})).await;
    let body = waiting.await.unwrap();
    let page: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(page["results"][0]["id"], json!("a"));
}

#[tokio::test]
async fn continuous_feed_streams_rows_and_ends_with_last_seq() {
    let server = start(Limits::default()).await;
    server.call("PUT", "/db", None).await;
    for id in ["a", "b"] {
        server.json("PUT", &format!("/db/{id}"), json!({})).await;
    }
    let (_, body) = server.get("/db/_changes?feed=continuous&timeout=200").await;
    let lines: Vec<Value> = body
        .as_str()
        .unwrap()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2]["last_seq"], json!(2));
}

#[tokio::test]
async fn filtered_changes_by_doc_ids_and_selector() {
    let server = start(Limits::default()).await;
    server.call("PUT", "/db", None).await;
    for n in 0..10 {
        server
            .json("PUT", &format!("/db/d{n}"), json!({"n": n}))
            .await;
    }
    let (_, by_ids) = server
        .json(
            "POST",
            "/db/_changes?filter=_doc_ids",
            json!({"doc_ids": ["d3", "d7"]}),
        )
        .await;
    let ids: Vec<&str> = by_ids["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d3", "d7"]);
    assert_eq!(by_ids["last_seq"], json!(10));
    let (_, by_selector) = server
        .json(
            "POST",
            "/db/_changes?filter=_selector&limit=2",
            json!({"selector": {"n": {"$gte": 5}}}),
        )
        .await;
    let ids: Vec<&str> = by_selector["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d5", "d6"]);
    assert_eq!(by_selector["last_seq"], json!(7));

    // The body is read as its type: members of the wrong type are refused, others ignored.
    for wrong in [
        json!({"doc_ids": [3]}),
        json!({"doc_ids": "d3"}),
        json!({"doc_ids": [["d3"]]}),
    ] {
        let (status, refused) = server
            .json("POST", "/db/_changes?filter=_doc_ids", wrong)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(refused["error"], json!("bad_request"));
        let reason = refused["reason"].as_str().unwrap();
        assert!(reason.starts_with("Invalid _changes body"), "{reason}");
    }
    let (status, extra) = server
        .json(
            "POST",
            "/db/_changes?filter=_doc_ids",
            json!({"doc_ids": ["d3"], "style": "unknown member"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(extra["results"][0]["id"], json!("d3"));
}

#[tokio::test]
async fn limits_are_enforced_at_the_limit_and_one_past() {
    let limits = Limits {
        max_document_bytes: 200,
        max_request_bytes: 2_000,
        max_json_depth: 4,
        max_doc_id_bytes: 10,
        max_batch_docs: 3,
        max_page_rows: 2,
        ..Limits::default()
    };
    let server = start(limits).await;
    server.call("PUT", "/db", None).await;

    // Document size: canonical JSON of {"p":"xxx..."} is 8 bytes plus the padding.
    let sized = |size: usize| json!({ "p": "x".repeat(size - 8) });
    assert_eq!(
        server.json("PUT", "/db/at", sized(200)).await.0,
        StatusCode::CREATED
    );
    assert_error(
        server.json("PUT", "/db/past", sized(201)).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "document_too_large",
    );

    // Nesting depth of a document: {"a":{"a":{"a":{}}}} is 4 levels.
    let nested = |depth: usize| {
        let mut value = json!({});
        for _ in 1..depth {
            value = json!({ "a": value });
        }
        value
    };
    assert_eq!(
        server.json("PUT", "/db/deep4", nested(4)).await.0,
        StatusCode::CREATED
    );
    assert_error(
        server.json("PUT", "/db/deep5", nested(5)).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    let deep_bulk = json!({"docs": [nested(5)]});
    assert_error(
        server.json("POST", "/db/_bulk_docs", deep_bulk).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // Document id length.
    assert_eq!(
        server.json("PUT", "/db/0123456789", json!({})).await.0,
        StatusCode::CREATED
    );
    assert_error(
        server.json("PUT", "/db/0123456789a", json!({})).await,
        StatusCode::BAD_REQUEST,
        "illegal_docid",
    );

    // Batch size.
    let batch = |count: usize| json!({"docs": (0..count).map(|n| json!({"_id": format!("b{n}")})).collect::<Vec<_>>()});
    assert_eq!(
        server.json("POST", "/db/_bulk_docs", batch(3)).await.0,
        StatusCode::CREATED
    );
    assert_error(
        server.json("POST", "/db/_bulk_docs", batch(4)).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    let revs_diff = json!({"a": ["1-a"], "b": ["1-b"], "c": ["1-c"], "d": ["1-d"]});
    assert_error(
        server.json("POST", "/db/_revs_diff", revs_diff).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    let bulk_get = json!({"docs": [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "d"}]});
    assert_error(
        server.json("POST", "/db/_bulk_get", bulk_get).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );

    // Request size: pad a _local document body to exactly the limit, then one byte more.
    let padded = |size: usize| {
        let skeleton = json!({"p": ""}).to_string();
        format!("{{\"p\":\"{}\"}}", "y".repeat(size - skeleton.len()))
    };
    assert_eq!(padded(2_000).len(), 2_000);
    // The local document itself is over the document limit; the request limit answers first.
    let at_limit = server
        .call("PUT", "/db/_local/big", Some(padded(2_000)))
        .await;
    assert_error(
        at_limit,
        StatusCode::PAYLOAD_TOO_LARGE,
        "document_too_large",
    );
    assert_error(
        server
            .call("PUT", "/db/_local/big", Some(padded(2_001)))
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );

    // Page size: a larger limit is clamped to the maximum.
    let (_, page) = server.get("/db/_changes?limit=100").await;
    assert_eq!(page["results"].as_array().unwrap().len(), 2);
    let (_, all) = server.get("/db/_all_docs").await;
    assert_eq!(all["rows"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_stored_changes() {
    let server = start(Limits::default()).await;
    server.call("PUT", "/db", None).await;
    let (_, created) = server.json("PUT", "/db/keep", json!({"v": 1})).await;
    let rev = created["rev"].as_str().unwrap().to_owned();
    let seq = server.update_seq("db").await;

    for (method, path, body) in [
        ("PUT", "/db/keep", r#"{"v": 2"#),
        ("PUT", "/db/keep", r#"{"v": 2, "v": 3}"#),
        ("PUT", "/db/keep", "[1, 2]"),
        ("POST", "/db/_bulk_docs", r#"{"docs": {"a": 1}}"#),
        (
            "POST",
            "/db/_bulk_docs",
            r#"{"docs": [{"_id": "x", "_bad": 1}]}"#,
        ),
        (
            "POST",
            "/db/_bulk_docs",
            r#"{"new_edits": false, "docs": [{"_id": "x", "_rev": "banana"}]}"#,
        ),
        (
            "POST",
            "/db/_bulk_docs",
            r#"{"new_edits": false, "docs": [{"_id": "x", "_rev": "2-a", "_revisions": {"start": 2, "ids": ["b"]}}]}"#,
        ),
        (
            "POST",
            "/db/_bulk_docs",
            r#"{"new_edits": false, "docs": [{"_id": "ok1", "_rev": "1-a"}, {"_id": "x"}]}"#,
        ),
        ("POST", "/db/_revs_diff", r#"{"keep": ["not-a-rev"]}"#),
        (
            "POST",
            "/db/_bulk_get",
            r#"{"docs": [{"id": "keep", "rev": "0-x"}]}"#,
        ),
        ("PUT", "/db/_secret", r#"{"v": 1}"#),
        (
            "POST",
            "/db/_changes?filter=_selector",
            r#"{"selector": {"v": {"$regex": "x"}}}"#,
        ),
    ] {
        let (status, error) = server.call(method, path, Some(body.to_owned())).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {body}: {error}"
        );
        assert!(
            error["reason"]
                .as_str()
                .is_some_and(|reason| !reason.is_empty())
        );
    }
    for path in [
        "/db/keep?rev=xyz",
        "/db/_changes?since=-1",
        "/db/_changes?feed=eventsource",
        "/db/keep?revs=maybe",
    ] {
        assert_error(
            server.get(path).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
    }
    // A forged revision: well-formed but not in the tree.
    assert_error(
        server
            .json(
                "PUT",
                "/db/keep",
                json!({"_rev": "1-0123456789abcdef0123456789abcdef", "v": 9}),
            )
            .await,
        StatusCode::CONFLICT,
        "conflict",
    );
    assert_error(
        server.call("DELETE", "/db/keep?rev=5-abc", None).await,
        StatusCode::CONFLICT,
        "conflict",
    );
    assert_error(
        server.get("/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        server.get("/nope/_changes").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        server
            .json("POST", "/nope/_bulk_docs", json!({"docs": []}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        server.call("PUT", "/Bad%20Name", None).await,
        StatusCode::BAD_REQUEST,
        "illegal_database_name",
    );
    assert_error(
        server.get("/db/missing").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    assert_eq!(
        server.update_seq("db").await,
        seq,
        "no bad request changed anything"
    );
    let (_, document) = server.get("/db/keep").await;
    assert_eq!(
        (document["_rev"].as_str().unwrap(), &document["v"]),
        (rev.as_str(), &json!(1))
    );
    assert_error(
        server.get("/db/ok1").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

/// One rule on every path (`ferry_store::endpoint`): a document that breaks a limit or whose
/// clock is too far ahead is refused alone, with its reason, and the rest of the request is
/// stored; the same documents get the same answers from `_bulk_docs` (both modes) and from
/// `PUT ?new_edits=false`, as from a sync session (tests/session.rs).
#[tokio::test]
async fn a_bad_document_is_refused_alone_by_the_same_rule_on_every_http_path() {
    let limits = Limits {
        max_document_bytes: 100,
        ..Limits::default()
    };
    let server = start(limits).await;
    server.call("PUT", "/db", None).await;
    let in_a_day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 86_400_000;
    let future_clock = ferry_core::hlc::Timestamp::new(u64::try_from(in_a_day).unwrap(), 0);
    let revision = |id: &str, hash: &str, body: Value| {
        let mut doc = json!({"_id": id, "_rev": format!("1-{hash}")});
        for (key, value) in body.as_object().unwrap() {
            doc[key] = value.clone();
        }
        doc
    };
    let big = json!({"p": "x".repeat(200)});
    let mut from_the_future = revision("future", "cc", json!({"v": 3}));
    from_the_future["_ferry"] = json!({"hlc": future_clock.as_u64()});

    let (status, refused) = server
        .json(
            "POST",
            "/db/_bulk_docs",
            json!({"new_edits": false, "docs": [
                revision("fine", "aa", json!({"v": 1})),
                revision("big", "bb", big.clone()),
                from_the_future.clone(),
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{refused}");
    let errors: Vec<(&str, &str)> = refused
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["id"].as_str().unwrap(), row["error"].as_str().unwrap()))
        .collect();
    assert_eq!(
        errors,
        [("big", "document_too_large"), ("future", "clock_ahead")]
    );
    assert_eq!(server.get("/db/fine").await.0, StatusCode::OK);
    assert_eq!(server.get("/db/big").await.0, StatusCode::NOT_FOUND);

    // PUT with new_edits=false goes through the same checks (it once skipped the clock's).
    assert_error(
        server
            .json("PUT", "/db/future?new_edits=false", from_the_future)
            .await,
        StatusCode::BAD_REQUEST,
        "clock_ahead",
    );
    assert_eq!(server.get("/db/future").await.0, StatusCode::NOT_FOUND);

    // Local edits: the same rule, one result per document.
    let (status, rows) = server
        .json(
            "POST",
            "/db/_bulk_docs",
            json!({"docs": [{"_id": "small", "v": 1}, {"_id": "large", "p": big["p"]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rows}");
    assert_eq!(rows[0]["ok"], json!(true), "{rows}");
    assert_eq!(rows[1]["error"], json!("document_too_large"), "{rows}");
    assert_eq!(server.get("/db/small").await.0, StatusCode::OK);
    assert_eq!(server.get("/db/large").await.0, StatusCode::NOT_FOUND);
}

/// Ferry's `_bulk_get?max_bytes=N`: the answer's entries fit in N bytes (at least one is
/// served), the rest are listed in `unserved` as they were asked for, to be asked again, so a
/// client holds one bounded answer at a time; without it, everything is answered (CouchDB).
#[tokio::test]
async fn bulk_get_answers_within_max_bytes_and_lists_the_rest() {
    let server = start(Limits::default()).await;
    server.call("PUT", "/db", None).await;
    let docs: Vec<Value> = (0..40)
        .map(|n| json!({"_id": format!("d{n:02}"), "blob": "x".repeat(1000 + n)}))
        .collect();
    let (status, written) = server
        .json("POST", "/db/_bulk_docs", json!({ "docs": docs }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{written}");
    // Every other one by revision, the rest by id alone (the winner).
    let asked: Vec<Value> = written
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(n, row)| match n % 2 {
            0 => json!({"id": row["id"], "rev": row["rev"]}),
            _ => json!({"id": row["id"]}),
        })
        .collect();
    let (status, everything) = fetch_within(&server, &asked, None).await;
    assert_eq!(status, StatusCode::OK, "{everything}");
    let results = everything["results"].as_array().unwrap();
    assert_eq!(results.len(), 40);
    assert!(everything.get("unserved").is_none(), "{everything}");
    let sizes: Vec<usize> = results.iter().map(|row| row.to_string().len()).collect();
    let served_within = async |bytes: usize| {
        let (status, answer) = fetch_within(&server, &asked, Some(&bytes.to_string())).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let served = answer["results"].as_array().unwrap().clone();
        let unserved = answer["unserved"].as_array().cloned().unwrap_or_default();
        assert_eq!(served[..], results[..served.len()], "within {bytes}");
        assert_eq!(unserved[..], asked[served.len()..], "within {bytes}");
        served.len()
    };
    // At the limit and one past, within the first chunk of 16 and beyond it (the rest of the
    // first chunk and every later one unserved).
    let first_two: usize = sizes[..2].iter().sum();
    assert_eq!(served_within(first_two).await, 2);
    assert_eq!(served_within(first_two - 1).await, 1);
    let first_seventeen: usize = sizes[..17].iter().sum();
    assert_eq!(served_within(first_seventeen).await, 17);
    assert_eq!(served_within(first_seventeen - 1).await, 16);
    // However small the budget, one entry is served, so a client asking again always ends.
    assert_eq!(served_within(0).await, 1);
    assert_eq!(served_within(sizes.iter().sum()).await, 40);
    assert_error(
        fetch_within(&server, &asked, Some("lots")).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
}

async fn fetch_within(
    server: &Server,
    asked: &[Value],
    max_bytes: Option<&str>,
) -> (StatusCode, Value) {
    let path = match max_bytes {
        Some(bytes) => format!("/db/_bulk_get?max_bytes={bytes}"),
        None => "/db/_bulk_get".to_owned(),
    };
    server.json("POST", &path, json!({ "docs": asked })).await
}
