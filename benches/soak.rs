//! The randomized fault test of `tests/faults.rs`, long: three nodes (one on memory) on one
//! backend under a seeded schedule of faults, every call recorded and checked against the
//! documented invariants at the end. Exits 1 on a violation; the report names the seed that
//! replays the schedule.
//!
//! `cargo bench --bench soak -- [--backend tiered] [--seconds 600] [--seed S]`
//! (backends: memory, redis, postgres, tiered, redis_cluster; the seed is random unless given)

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::backends::Backend;
use support::faults::{Options, run};

fn main() {
    let mut options = Options::from_env(Backend::Tiered, rand::random(), 600);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--backend" => {
                options.backend = match value().as_str() {
                    "memory" => Backend::Memory,
                    "redis" => Backend::Redis,
                    "postgres" => Backend::Postgres,
                    "tiered" => Backend::Tiered,
                    "redis_cluster" => Backend::RedisCluster,
                    other => panic!("unknown backend {other}"),
                };
                options.nodes = if options.backend == Backend::Memory {
                    1
                } else {
                    3
                };
            }
            "--seconds" => options.duration = Duration::from_secs(value().parse().unwrap()),
            "--seed" => options.seed = value().parse().unwrap(),
            "--nodes" => options.nodes = value().parse().unwrap(),
            // What cargo bench passes to every bench target.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(run(options));
    println!("{report}");
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
}
