//! `ferry-sim`: replays one seed, or soaks through a range of them on every core.
//!
//! ```text
//! cargo run -p ferry-sim --release -- --seed 1234                 # replay one seed
//! SIM_TRACE=1 cargo run -p ferry-sim --release -- --seed 1234     # ... printing every step
//! cargo run -p ferry-sim --release -- --from 0 --seeds 1000000    # soak
//! ```

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use ferry_sim::Failure;

// The simulation allocates small trees and maps all the time; mimalloc runs it about a third
// faster than glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ferry-sim",
    about = "Deterministic simulation of Ferry sync through faults"
)]
struct Cli {
    /// Replay this one seed.
    #[arg(long, conflicts_with_all = ["from", "seeds"])]
    seed: Option<u64>,
    /// The first seed of a soak.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// How many seeds to run.
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// Explore the small scope exhaustively instead: 2 clients, 1 document, up to this many
    /// operations each.
    #[arg(long, conflicts_with_all = ["seed", "from", "seeds"])]
    exhaustive: Option<usize>,
    /// Faults per schedule in the exhaustive exploration.
    #[arg(long, default_value_t = 1)]
    faults: usize,
}

/// What one thread of a soak saw.
#[derive(Default)]
struct Tally {
    failed: Vec<Failure>,
    operations: usize,
    delivered: u64,
    faults: u64,
}

/// Runs every `step`-th seed of `from..end`, starting at `first`.
fn soak(first: u64, end: u64, step: u64) -> Tally {
    let mut tally = Tally::default();
    let mut seed = first;
    while seed < end {
        match ferry_sim::run(seed) {
            Ok(outcome) => {
                tally.operations += outcome.operations;
                tally.delivered += outcome.delivered;
                tally.faults += outcome.faults;
            }
            Err(failure) => tally.failed.push(failure),
        }
        seed += step;
    }
    tally
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(operations) = cli.exhaustive {
        let started = Instant::now();
        return match ferry_sim::explore(operations, cli.faults) {
            Ok(exploration) => {
                println!(
                    "small scope, {operations} operations per client, {} fault(s): {exploration:?} in {:.1} s",
                    cli.faults,
                    started.elapsed().as_secs_f64()
                );
                ExitCode::SUCCESS
            }
            Err(failure) => {
                eprintln!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(seed) = cli.seed {
        return match ferry_sim::run(seed) {
            Ok(outcome) => {
                println!("seed {seed}: ok {outcome:?}");
                ExitCode::SUCCESS
            }
            Err(failure) => {
                eprintln!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    let started = Instant::now();
    let end = cli.from + cli.seeds;
    // Seeds are independent: each core takes every n-th one.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|worker| scope.spawn(move || soak(cli.from + worker, end, threads)))
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a simulation thread panicked"))
            .collect()
    });
    let mut total = Tally::default();
    for tally in tallies {
        total.failed.extend(tally.failed);
        total.operations += tally.operations;
        total.delivered += tally.delivered;
        total.faults += tally.faults;
    }
    total.failed.sort_by_key(|failure| failure.seed);
    for failure in &total.failed {
        eprintln!("{failure}");
    }
    println!(
        "{} seeds from {} in {:.1} s on {threads} threads: {} failed; {} operations, {} messages, {} faults",
        cli.seeds,
        cli.from,
        started.elapsed().as_secs_f64(),
        total.failed.len(),
        total.operations,
        total.delivered,
        total.faults,
    );
    if total.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
