//! The in-memory store passes the same conformance suite as the SQLite one, so what the
//! simulator finds with it holds for the real store.

use ferry_store::StoreConfig;
use ferry_store::memory::MemoryBackend;

fn fresh() -> Box<MemoryBackend> {
    Box::new(MemoryBackend::new(StoreConfig::default()))
}

ferry_store::conformance_tests!(fresh);

fn fresh_replica() -> Box<ferry_store::memory::MemoryDatabase> {
    let config = StoreConfig {
        track_pending: true,
        ..StoreConfig::default()
    };
    Box::new(ferry_store::memory::MemoryDatabase::new(
        "local", "replica", config,
    ))
}

ferry_store::outbox_conformance_tests!(fresh_replica);
