//! The simulator in the test suite: every seed of the regression list, then a hundred more
//! (debug builds are slow; CI runs 20,000 seeds of the release build, see docs/testing.md).

#[test]
fn every_regression_seed_passes() {
    let list = include_str!("../regressions.txt");
    let seeds: Vec<u64> = list
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| line.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(!seeds.is_empty());
    for seed in seeds {
        if let Err(failure) = ferry_sim::run(seed) {
            panic!("{failure}");
        }
    }
}

#[test]
fn a_hundred_seeds_pass() {
    let mut conflicted = 0;
    let mut faults = 0;
    for seed in 0..100 {
        match ferry_sim::run(seed) {
            Ok(outcome) => {
                conflicted += outcome.conflicted;
                faults += outcome.faults;
            }
            Err(failure) => panic!("{failure}"),
        }
    }
    // The runs did meet trouble: faults were injected and conflicts kept.
    assert!(faults > 500, "{faults} faults");
    assert!(conflicted > 0, "no conflict was kept by any seed");
}

#[test]
fn the_small_scope_with_one_operation_each_is_explored_whole() {
    let exploration = ferry_sim::explore(1, 1).unwrap_or_else(|failure| panic!("{failure}"));
    // Every interleaving of one operation per client with the syncs' messages and one fault.
    assert!(exploration.schedules > 30, "{exploration:?}");
    assert!(exploration.states > 500, "{exploration:?}");
}
