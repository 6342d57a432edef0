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
