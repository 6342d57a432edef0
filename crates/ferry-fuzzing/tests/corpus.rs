//! Replays every committed fuzz input (`fuzz/corpus/<target>/`, seeds and what fuzzing kept,
//! and `fuzz/regressions/<target>/`, inputs that once broke a property) through its check,
//! so the corpora guard every change on the stable toolchain, without `cargo fuzz`.

use std::path::Path;

#[test]
fn every_committed_fuzz_input_passes_its_check() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    for (target, check) in ferry_fuzzing::TARGETS {
        let mut replayed = 0;
        for folder in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(folder).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let input = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| check(&input));
                assert!(outcome.is_ok(), "{target}: {} breaks it", path.display());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "{target} has a corpus");
    }
}

/// The frame target is not vacuous: its corpus holds requests of every op, which reach the
/// server's handler.
#[test]
fn the_frame_corpus_reaches_the_session_handler_with_every_op() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/protocol_frame");
    let mut ops = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(corpus).unwrap() {
        let input = std::fs::read(entry.unwrap().path()).unwrap();
        if let Ok(ferry_core::protocol::ClientFrame::Request { op, .. }) =
            ferry_core::protocol::ClientFrame::decode(&input, 64)
        {
            ops.insert(op.name());
        }
    }
    assert_eq!(
        ops.into_iter().collect::<Vec<_>>(),
        [
            "bulk_docs",
            "bulk_get",
            "changes",
            "get_checkpoint",
            "put_checkpoint",
            "revs_diff"
        ]
    );
}

/// The HTTP target is not vacuous: its corpus reaches the handlers of the database, its
/// documents and its feeds (answers other than 404 and 405), not only the router's refusals.
#[test]
fn the_http_corpus_reaches_the_route_handlers() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/http_request");
    let mut reached = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(corpus).unwrap() {
        let input = std::fs::read(entry.unwrap().path()).unwrap();
        let status = ferry_fuzzing::http_status(&input);
        if let Some(status) = status.filter(|status| *status != 404 && *status != 405) {
            let text = String::from_utf8_lossy(&input);
            let route = text.split_whitespace().nth(1).unwrap_or_default();
            let route = route.split('?').next().unwrap_or_default().to_owned();
            reached.insert(route);
            assert!(status < 500, "{text} answered {status}");
        }
    }
    for route in [
        "/",
        "/db",
        "/db/_changes",
        "/db/_bulk_docs",
        "/db/_bulk_get",
        "/db/todos:a",
    ] {
        assert!(
            reached.contains(route),
            "{route} is not reached: {reached:?}"
        );
    }
}
