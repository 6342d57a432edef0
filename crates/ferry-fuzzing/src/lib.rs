//! The properties the fuzz targets check (`fuzz/`, run with `cargo fuzz`), kept here so that
//! the committed corpora replay as ordinary tests (`tests/corpus.rs`) on the stable toolchain.
//!
//! Every check takes raw fuzzer bytes, must never panic on input it rejects, and panics (the
//! fuzzer's signal) when a property breaks. `docs/testing.md` says what each one proves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use ferry_core::couch::{parse_revisions, revision_from_text, revision_text, revisions_json};
use ferry_core::hlc::Timestamp;
use ferry_core::json::{canonical, parse_strict};
use ferry_core::model::Body;
use ferry_core::protocol::{ClientFrame, Op};
use ferry_core::resolve::{Version, merge};
use ferry_core::rev::Rev;
use ferry_core::tree::RevTree;
use ferry_store::clock::{ManualClock, ReplicaClock};
use ferry_store::endpoint::{Endpoint, EndpointConfig, NoFanout};
use ferry_store::memory::MemoryDatabase;
use ferry_store::{Database, StoreConfig};
use serde_json::{Map, Value};

/// The depth the server accepts for a sync frame (documents nest one level below it).
const FRAME_DEPTH: usize = 64;

/// A check over one fuzz input.
pub type Check = fn(&[u8]);

/// The checks by name, as the fuzz targets and their corpus directories are named.
pub const TARGETS: &[(&str, Check)] = &[
    ("protocol_frame", protocol_frame),
    ("revision_ids", revision_ids),
    ("tree_insert", tree_insert),
    ("merge_laws", merge_laws),
    ("canonical_json", canonical_json),
    ("query_params", query_params),
    ("http_request", http_request),
];

/// A sync-session frame through the server's own decoder (`ClientFrame::decode`) and, when it
/// is a request, the server's own handler (`ferry_server::session::handle_request`) on a fresh
/// in-memory replica: nothing panics; whatever decodes encodes and decodes to the same frame;
/// every revision of a `bulk_docs` round-trips through the CouchDB form; what the handler
/// stores is in the replica's changes feed.
pub fn protocol_frame(data: &[u8]) {
    let Ok(frame) = ClientFrame::decode(data, FRAME_DEPTH) else {
        return;
    };
    let text = frame.encode();
    let again =
        ClientFrame::decode(text.as_bytes(), FRAME_DEPTH).expect("an encoded frame decodes");
    assert_eq!(again, frame, "frame round trip: {text}");
    let ClientFrame::Request { op, .. } = frame else {
        return;
    };
    if let Op::BulkDocs { docs } = &op {
        for document in docs {
            let Ok(revision) = revision_from_text(document, FRAME_DEPTH) else {
                continue;
            };
            for with_hlc in [true, false] {
                let encoded = revision_text(&revision, with_hlc);
                let decoded =
                    revision_from_text(&encoded, FRAME_DEPTH).expect("an encoded revision decodes");
                assert_eq!(decoded.doc_id, revision.doc_id);
                assert_eq!(decoded.path, revision.path);
                assert_eq!(decoded.deleted, revision.deleted);
                assert_eq!(decoded.body, revision.body);
                if with_hlc {
                    assert_eq!(decoded.hlc, revision.hlc);
                }
            }
        }
    }
    let db = MemoryDatabase::new("fuzz", "server", StoreConfig::default());
    let config = EndpointConfig {
        refuse_clocks_ahead: true,
        ..EndpointConfig::default()
    };
    let clock = ReplicaClock::new(std::sync::Arc::new(ManualClock::new(1_000_000)), 60_000);
    let endpoint = Endpoint::new(&db, &config, &clock, &NoFanout);
    let stored = match &op {
        Op::BulkDocs { .. } => Some(()),
        _ => None,
    };
    let Ok(result) = ferry_server::session::handle_request(&endpoint, op) else {
        return;
    };
    if stored.is_some() {
        let result: Value = serde_json::from_str(result.result.get()).expect("a result is JSON");
        let acks = result["acks"].as_array().expect("bulk_docs answers acks");
        let changed: BTreeSet<String> = db
            .changes(0, usize::MAX, false)
            .expect("changes")
            .into_iter()
            .map(|change| change.doc_id)
            .collect();
        for ack in acks {
            if ack["ok"] == Value::Bool(true) {
                let id = ack["id"].as_str().expect("acks name their document");
                assert!(changed.contains(id), "{id} acknowledged but not stored");
            }
        }
    }
}

/// Revision ids (`N-hash`) and `_revisions` ancestries: what parses prints back to itself.
pub fn revision_ids(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(rev) = text.parse::<Rev>()
    {
        let printed = rev.to_string();
        assert_eq!(printed.parse::<Rev>().as_ref(), Ok(&rev), "{printed}");
        assert_eq!(
            rev.generation().to_string(),
            printed.split('-').next().unwrap()
        );
    }
    if let Ok(value) = parse_strict(data, FRAME_DEPTH)
        && let Ok(path) = parse_revisions(&value)
    {
        for pair in path.windows(2) {
            assert_eq!(pair[0].generation(), pair[1].generation() + 1);
        }
        let again = parse_revisions(&revisions_json(&path)).expect("printed ancestry parses");
        assert_eq!(again, path);
    }
}

/// A node of the fuzzed revision forest: the choices leading to it from a root. Its id is a
/// function of them, so one id always has one parent, as content-addressed revisions do.
fn rev_of(choices: &[u8]) -> Rev {
    let mut hash = String::new();
    for choice in choices {
        write!(hash, "{:02x}", choice % 4).expect("writing to a String");
    }
    let hash = format!("{hash:0>32}");
    Rev::new(choices.len() as u64, &hash[hash.len() - 32..]).expect("a valid revision id")
}

/// One path merged into a tree: the leaf's choices from the root, how many of its newest
/// revisions the path carries (stemmed paths lose their oldest ones), and whether the leaf is a
/// deletion.
#[derive(Arbitrary, Debug)]
struct PathInput {
    choices: Vec<u8>,
    keep: u8,
    deleted: bool,
}

/// Revision-tree insertion against a naive model: a map from revision to parent, leaves
/// computed by scanning for children, the winner by CouchDB's rule.
pub fn tree_insert(data: &[u8]) {
    let Ok(inputs) = Vec::<PathInput>::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let mut tree = RevTree::new();
    let mut parents: BTreeMap<Rev, Option<Rev>> = BTreeMap::new();
    let mut deleted: BTreeSet<Rev> = BTreeSet::new();
    for input in inputs.iter().take(64) {
        let choices: Vec<u8> = input.choices.iter().take(12).copied().collect();
        if choices.is_empty() {
            continue;
        }
        let keep = usize::from(input.keep).clamp(1, choices.len());
        let path: Vec<Rev> = (0..keep)
            .map(|back| rev_of(&choices[..choices.len() - back]))
            .collect();
        tree.merge_path(&path, input.deleted)
            .expect("consecutive paths merge");
        for (index, rev) in path.iter().enumerate() {
            let parent = path.get(index + 1).cloned();
            let known = parents.entry(rev.clone()).or_insert(None);
            if known.is_none() {
                *known = parent;
            }
        }
        if input.deleted {
            deleted.insert(path[0].clone());
        }
    }
    let revs: Vec<&Rev> = tree.revs().collect();
    assert_eq!(revs, parents.keys().collect::<Vec<_>>());
    for (rev, parent) in &parents {
        assert_eq!(tree.parent(rev), parent.as_ref(), "parent of {rev}");
        assert_eq!(tree.is_deleted(rev), deleted.contains(rev), "{rev} deleted");
    }
    let with_children: BTreeSet<&Rev> = parents.values().flatten().collect();
    let leaves: Vec<(Rev, bool)> = parents
        .keys()
        .filter(|rev| !with_children.contains(rev))
        .map(|rev| (rev.clone(), deleted.contains(rev)))
        .collect();
    let tree_leaves: Vec<(Rev, bool)> = tree
        .leaves()
        .into_iter()
        .map(|leaf| (leaf.rev, leaf.deleted))
        .collect();
    assert_eq!(tree_leaves, leaves);
    // CouchDB's winner: live before deleted, then the longest branch, then the highest id.
    let winner = leaves
        .iter()
        .max_by_key(|(rev, is_deleted)| (!is_deleted, rev.generation(), rev.hash().to_owned()))
        .map(|(rev, _)| rev.clone());
    assert_eq!(tree.winner().map(|leaf| leaf.rev), winner);
    let decoded = RevTree::decode(&tree.encode()).expect("an encoded tree decodes");
    assert_eq!(decoded, tree);
}

/// A small JSON value drawn from the fuzzer's bytes.
fn arbitrary_value(input: &mut Unstructured<'_>, depth: usize) -> arbitrary::Result<Value> {
    let kind = if depth == 0 {
        input.int_in_range(0..=3)?
    } else {
        input.int_in_range(0..=5)?
    };
    Ok(match kind {
        0 => Value::Null,
        1 => Value::Bool(input.arbitrary()?),
        2 => Value::from(input.int_in_range(-3..=3)?),
        3 => Value::String(["a", "b", "", "é"][input.choose_index(4)?].to_owned()),
        4 => {
            let len = input.int_in_range(0..=3)?;
            Value::Array(
                (0..len)
                    .map(|_| arbitrary_value(input, depth - 1))
                    .collect::<arbitrary::Result<_>>()?,
            )
        }
        _ => Value::Object(arbitrary_object(input, depth - 1)?),
    })
}

fn arbitrary_object(input: &mut Unstructured<'_>, depth: usize) -> arbitrary::Result<Body> {
    let len = input.int_in_range(0..=4)?;
    let mut map = Map::new();
    for _ in 0..len {
        let key = ["x", "y", "z", "w"][input.choose_index(4)?].to_owned();
        map.insert(key, arbitrary_value(input, depth)?);
    }
    Ok(map)
}

/// Version number `index` of a conflict: the versions of a conflict are distinct leaves, so
/// their revision ids differ (the clocks, drawn from few values, often tie).
fn version(input: &mut Unstructured<'_>, index: u8, body: Body) -> arbitrary::Result<Version> {
    let hash = format!("{:030x}{index:02x}", input.arbitrary::<u128>()? >> 8);
    Ok(Version {
        rev: Rev::new(input.int_in_range(1..=4)?, &hash).expect("valid"),
        hlc: Timestamp::new(input.int_in_range(0..=3)?, input.int_in_range(0..=2)?),
        body,
    })
}

/// The laws of the three-way merge: unchanged sides change nothing (`merge(b, b, x) = x`),
/// identical changes are one change (`merge(b, a, a) = a`), and the order of the versions does
/// not matter.
pub fn merge_laws(data: &[u8]) {
    let mut input = Unstructured::new(data);
    let draw = |input: &mut Unstructured<'_>| -> arbitrary::Result<_> {
        let base = arbitrary_object(input, 3)?;
        let a = arbitrary_object(input, 3)?;
        let x = arbitrary_object(input, 3)?;
        let versions = [
            version(input, 0, a.clone())?,
            version(input, 1, a.clone())?,
            version(input, 2, base.clone())?,
            version(input, 3, x.clone())?,
        ];
        Ok((base, a, x, versions))
    };
    let Ok((base, a, x, [a1, a2, unchanged, changed])) = draw(&mut input) else {
        return;
    };
    assert_eq!(merge(&base, &[a1.clone(), a2]).0, a, "merge(b, a, a) = a");
    assert_eq!(
        merge(&base, &[unchanged.clone(), changed.clone()]).0,
        x,
        "merge(b, b, x) = x"
    );
    assert_eq!(
        merge(&base, &[changed.clone(), a1.clone()]),
        merge(&base, &[a1, changed]),
        "symmetry"
    );
}

/// Writes `value` with keys in reverse order and whitespace everywhere it is allowed.
fn write_scrambled(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            out.push_str("{ \n");
            for (index, (key, value)) in map.iter().rev().enumerate() {
                if index > 0 {
                    out.push_str(" ,\t");
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push_str(" :\r\n ");
                write_scrambled(value, out);
            }
            out.push_str("\n}");
        }
        Value::Array(items) => {
            out.push_str("[ ");
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push_str(" , ");
                }
                write_scrambled(item, out);
            }
            out.push_str(" ]");
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Canonical JSON, and so revision ids: any key order or whitespace gives the same bytes.
pub fn canonical_json(data: &[u8]) {
    let Ok(value) = parse_strict(data, FRAME_DEPTH) else {
        return;
    };
    let mut scrambled = String::new();
    write_scrambled(&value, &mut scrambled);
    let reread = parse_strict(scrambled.as_bytes(), FRAME_DEPTH).expect("scrambled JSON parses");
    let bytes = canonical(&value);
    assert_eq!(canonical(&reread), bytes, "{scrambled}");
    let pretty = serde_json::to_string_pretty(&value).expect("serializes");
    let reread = parse_strict(pretty.as_bytes(), FRAME_DEPTH).expect("pretty JSON parses");
    assert_eq!(canonical(&reread), bytes);
    // Canonical bytes are JSON for the same value, and canonical again.
    let back = parse_strict(&bytes, FRAME_DEPTH).expect("canonical JSON parses");
    assert_eq!(back, value);
    assert_eq!(canonical(&back), bytes);
    if let Value::Object(body) = &value {
        let canonical_body = ferry_core::json::canonical_object(body);
        let rev =
            Rev::compute(None, false, &canonical_body).expect("a generation far below the largest");
        let reread_body = parse_strict(scrambled.as_bytes(), FRAME_DEPTH)
            .ok()
            .and_then(|value| value.as_object().cloned())
            .expect("an object");
        let again = Rev::compute(
            None,
            false,
            &ferry_core::json::canonical_object(&reread_body),
        )
        .expect("a generation far below the largest");
        assert_eq!(rev, again);
    }
}

/// CouchDB query parameters as the server reads them: every value either parses or is refused
/// with a 400, never a panic or a 500.
pub fn query_params(data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(map) = serde_urlencoded::from_str::<HashMap<String, String>>(query) else {
        return;
    };
    let params = ferry_server::params::Params(map);
    let bad_request = |status: u16| assert_eq!(status, 400);
    for name in [
        "descending",
        "include_docs",
        "conflicts",
        "revs",
        "inclusive_end",
    ] {
        if let Err(error) = params.flag(name, false) {
            bad_request(error.status.as_u16());
        }
    }
    for name in ["limit", "skip", "since", "heartbeat", "timeout"] {
        if let Err(error) = params.number(name) {
            bad_request(error.status.as_u16());
        }
    }
    for names in [
        &["key"][..],
        &["startkey", "start_key"],
        &["endkey", "end_key"],
    ] {
        if let Err(error) = params.json(names) {
            bad_request(error.status.as_u16());
        }
        if let Err(error) = params.key(names) {
            bad_request(error.status.as_u16());
        }
    }
    if let Err(error) = params.rev("rev") {
        bad_request(error.status.as_u16());
    }
}

/// What an HTTP request may answer: a 5xx other than 503 (busy) and 507 (disk full) is a
/// server bug, whatever the request.
fn acceptable(status: u16) -> bool {
    status < 500 || status == 503 || status == 507
}

/// The server every `http_request` input is sent to: the real router over a fresh in-memory
/// backend holding database `db` (a document in conflict and a local document), without
/// authentication so every route is reachable.
fn fuzz_router() -> axum::Router {
    use ferry_store::Backend;
    use ferry_store::memory::MemoryBackend;
    static AUTH: std::sync::OnceLock<std::sync::Arc<ferry_server::auth::Auth>> =
        std::sync::OnceLock::new();
    let config = ferry_server::ServerConfig {
        auth: ferry_server::auth::AuthConfig {
            required: false,
            ..ferry_server::auth::AuthConfig::default()
        },
        default_feed_timeout: Duration::from_millis(20),
        ..ferry_server::ServerConfig::default()
    };
    let auth = AUTH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-fuzz-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the fuzz accounts");
        std::sync::Arc::new(
            ferry_server::auth::Auth::open(&dir, config.auth.clone()).expect("accounts"),
        )
    });
    let backend = MemoryBackend::new(StoreConfig::default());
    let db = backend.create_database("db").expect("a database");
    let branch = |rev: &str, value: &str| ferry_core::model::Revision {
        doc_id: "todos:a".into(),
        path: vec![
            rev.parse().expect("a revision"),
            "1-aa".parse().expect("a revision"),
        ],
        deleted: false,
        body: ferry_core::json::RawJson::of(&serde_json::json!({"title": value})),
        hlc: Some(Timestamp::new(1_000, 0)),
    };
    db.write_revisions(
        vec![branch("2-bb", "b"), branch("2-cc", "c")],
        Timestamp::new(1_000, 0),
    )
    .expect("two branches");
    db.put_local("checkpoint", None, Some(Map::new()))
        .expect("a local document");
    let state = ferry_server::AppState::new(
        std::sync::Arc::new(backend),
        auth.clone(),
        "fuzz".into(),
        &config,
    );
    ferry_server::router(state)
}

/// An HTTP request through the server's real router (`ferry_server::router`): nothing panics
/// and nothing answers a 5xx but 503 or 507. The input is a request as text: a request line
/// (`METHOD TARGET`), header lines (`name: value`), an empty line, then the body; the
/// corpus seeds every route that way. Basic credentials are dropped (each costs a password
/// hash: `ferry-server`'s tests cover them).
pub fn http_request(data: &[u8]) {
    if let Some(status) = http_status(data) {
        assert!(acceptable(status), "answered {status}");
    }
}

/// The status the router answers the request `data` (see [`http_request`]) with; `None` when
/// the input is not a request, or the answer is a feed still running after a moment.
pub fn http_status(data: &[u8]) -> Option<u16> {
    use tower::ServiceExt;
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let request_line = lines.next()?;
    let (method, target) = request_line.split_once(' ').unwrap_or((request_line, "/"));
    let method = axum::http::Method::from_bytes(method.trim().as_bytes()).ok()?;
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(target.trim());
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("authorization")
            && value.len() >= 5
            && value[..5].eq_ignore_ascii_case("basic")
        {
            continue;
        }
        request = request.header(name.trim(), value);
    }
    let request = request
        .body(axum::body::Body::from(body.as_bytes().to_vec()))
        .ok()?;
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    });
    runtime.block_on(async {
        // Feeds wait for changes and continuous ones never end: a request still running
        // after a moment is a feed doing its job.
        let exchange = async {
            let response = fuzz_router()
                .oneshot(request)
                .await
                .expect("the router is infallible");
            let status = response.status().as_u16();
            let body = axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024).await;
            (status, body.map(|bytes| bytes.len()).unwrap_or(0))
        };
        let (status, _length) = tokio::time::timeout(Duration::from_millis(200), exchange)
            .await
            .ok()?;
        Some(status)
    })
}
