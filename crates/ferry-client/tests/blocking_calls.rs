//! The SDK's async work makes its store calls on tokio's blocking threads, at most
//! `FerryBuilder::max_blocking_calls` at once, so the application's runtime does not grow a
//! blocking thread per waiting call; and the builder's bounds on that and on the page cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_client::{ConflictPolicy, ErrorKind, Ferry, PageCache};
use futures_util::StreamExt;
use serde_json::{Value, json};

mod support;

/// The names of this process's threads, as the kernel has them (15 characters at most).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .collect()
}

#[test]
fn sync_watchers_and_resolution_take_no_more_blocking_threads_than_the_bound() {
    const WORKERS: usize = 2;
    const BOUND: usize = 3;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name("app-runtime")
        .enable_all()
        .build()
        .unwrap();
    let server = support::start();
    let url = server.url("threads");
    let dir = tempfile::tempdir().unwrap();
    let resolved = Arc::new(AtomicUsize::new(0));
    runtime.block_on(async {
        let one = Ferry::builder("one")
            .max_blocking_calls(BOUND)
            .open(dir.path().join("one.ferry"))
            .unwrap();
        let two = Ferry::builder("two")
            .max_blocking_calls(1)
            .open(dir.path().join("two.ferry"))
            .unwrap();
        let seen = resolved.clone();
        one.set_conflict_policy(
            "todos",
            ConflictPolicy::custom(move |conflict| {
                seen.fetch_add(1, Ordering::SeqCst);
                conflict
                    .versions
                    .first()
                    .map(|version| version.value.clone())
            }),
        )
        .unwrap();
        // Twenty live queries re-run on every change, all at once.
        let watchers: Vec<_> = (0..20)
            .map(|_| {
                let mut stream = Box::pin(one.collection::<Value>("todos").query().watch());
                tokio::spawn(async move { while stream.next().await.is_some() {} })
            })
            .collect();
        let sync = support::options(&url);
        for (ferry, title) in [(&one, "one's"), (&two, "two's")] {
            ferry
                .collection::<Value>("todos")
                .insert_with_id("x", &json!({"title": title}))
                .unwrap();
            for n in 0..50 {
                ferry
                    .collection::<Value>("todos")
                    .insert(&json!({"n": n}))
                    .unwrap();
            }
        }
        two.sync_once(&sync).await.unwrap();
        // One pushes its version of x and pulls two's: a conflict its policy resolves.
        one.sync_once(&sync).await.unwrap();
        assert!(
            one.collection::<Value>("todos")
                .get("x")
                .unwrap()
                .unwrap()
                .conflicts
                .is_empty(),
            "the pulled conflict was resolved"
        );
        for watcher in watchers {
            watcher.abort();
        }
    });
    assert!(resolved.load(Ordering::SeqCst) > 0, "the policy ran");
    // tokio keeps an idle blocking thread for ten seconds, so those the test made are all
    // still there: the workers, and one per call at once at most (one's three, two's one).
    let threads = thread_names()
        .into_iter()
        .filter(|name| name == "app-runtime")
        .count();
    assert!(
        threads <= WORKERS + BOUND + 1,
        "{threads} runtime threads for {WORKERS} workers and {BOUND} calls at once"
    );
}

#[test]
fn the_builder_bounds_blocking_calls_and_page_caches() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, builder: ferry_client::FerryBuilder| {
        builder.open(dir.path().join(format!("{name}.ferry")))
    };
    let threads = |count| Ferry::builder("ann").max_blocking_calls(count);
    assert!(open("threads-1", threads(1)).is_ok());
    assert!(open("threads-max", threads(16)).is_ok());
    for (name, count) in [("threads-0", 0), ("threads-past", 17)] {
        let error = open(name, threads(count)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Usage, "{error}");
        assert!(error.to_string().contains("max_blocking_calls"), "{error}");
    }
    let cache = |writer_kib, reader_kib| {
        Ferry::builder("ann").page_cache(PageCache {
            writer_kib,
            reader_kib,
        })
    };
    assert!(open("cache-min", cache(PageCache::MIN_KIB, PageCache::MIN_KIB)).is_ok());
    assert!(open("cache-max", cache(PageCache::MAX_KIB, PageCache::MAX_KIB)).is_ok());
    let refused = [
        ("writer-below", PageCache::MIN_KIB - 1, 256),
        ("reader-below", 1024, PageCache::MIN_KIB - 1),
        ("writer-past", PageCache::MAX_KIB + 1, 256),
        ("reader-past", 1024, PageCache::MAX_KIB + 1),
    ];
    for (name, writer, reader) in refused {
        let error = open(name, cache(writer, reader)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Usage, "{name}: {error}");
        assert!(error.to_string().contains("page cache"), "{name}: {error}");
        assert!(
            !dir.path().join(format!("{name}.ferry")).exists(),
            "{name}: a refused replica leaves no file"
        );
    }
}
