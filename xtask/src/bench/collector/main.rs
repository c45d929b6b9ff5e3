//! `collector-bench`: the collector's ingest rate through the real gRPC
//! server into the embedded SQLite store and into ClickHouse, flame graph
//! query latency over the HTTP API, and store size per million samples, for
//! a realistic mix of batches. `--store sqlite|clickhouse|both` (default
//! both); ClickHouse is a private `clickhouse-server` started for the run
//! (profiler-testkit), whose CPU is counted too, since it does the store's
//! work.
//!
//! Each simulated agent profiles an 8-CPU node at 19 Hz and sends one batch
//! per 10 s window (`workload`); the loaded hours give the ingest figures
//! (`ingest`); to query 24 h of 100 agents without loading 788 M samples, the
//! loaded hour is replicated inside the store, shifted back hour by hour
//! (`query`, `clickhouse`). Each store's run and report section is in
//! `sqlite` and `clickhouse`; `report` writes the section `cargo xtask bench`
//! includes in docs/benchmarks.md.
//!
//! ```text
//! cargo build --release -p xtask --features collector-bench --bin collector-bench
//! target/release/collector-bench --report target/bench/collector-bench.md   # full, both stores
//! target/release/collector-bench --quick                                    # smoke: every part once
//! ```
//! What the figures mean and what follows from them:
//! docs/collector-benchmarks.md (the full suite is `cargo xtask bench`).
mod clickhouse;
mod ingest;
mod query;
mod report;
mod sqlite;
mod workload;

use std::{path::PathBuf, sync::Arc, time::Instant};

use clap::Parser;
use profiler_collector::{
    clock::now_ns,
    model::{Selector, Stored, ValidBatch},
    server::{self, CollectorConfig, RunningCollector, StoreLocation},
    store::{
        clickhouse::{ClickHouseStore, ClickHouseUrl},
        sqlite::{plan, Part, SqliteStore, ROLLUP_H, ROLLUP_STACK_H, ROLLUP_STACK_M},
        Store,
    },
    validate::{validate, Limits},
};
use profiler_proto::v1::{ingest_client::IngestClient, Batch, Label, LabelSet, Sample, Stack};
use profiler_testkit::{clickhouse::ClickHouse, Server};
use tokio::sync::{mpsc, Mutex};
use tonic::{codec::CompressionEncoding, transport::Channel, Code};

#[allow(unused_imports)]
use {
    clickhouse::*, ingest::*, profiler_testkit::median_duration, query::*, report::*, sqlite::*,
    workload::*,
};

pub(crate) const WINDOW_NS: i64 = 10_000_000_000;
pub(crate) const HOUR_NS: i64 = 3600 * 1_000_000_000;
pub(crate) const APPS: usize = 40;
pub(crate) const STACKS_PER_APP: usize = 12;

#[derive(Parser, Debug, Clone)]
#[command(about = "Collector ingest, query and store-size benchmark")]
pub(crate) struct Args {
    /// Simulated agents (nodes).
    #[arg(long, default_value_t = 100)]
    pub(crate) agents: usize,
    /// Whole hours of data to load through gRPC (10 s windows), ending now.
    #[arg(long, default_value_t = 1)]
    pub(crate) hours: u32,
    /// Batches sent by a single client first, for the one-client rate.
    #[arg(long, default_value_t = 2000)]
    pub(crate) single_client_batches: usize,
    /// Batches sent through gRPC in all (the one-client ones included); the
    /// rest of the loaded hours is written straight into the store with
    /// `Store::insert_many` (same store code, no network), to fit the time
    /// budget. 0: everything through gRPC.
    #[arg(long, default_value_t = 10000)]
    pub(crate) grpc_batches: usize,
    /// Concurrent clients for the rest of the load.
    #[arg(long, default_value_t = 16)]
    pub(crate) clients: usize,
    /// Busy share of the node's 8 CPUs (samples per batch = 8 * 19 * 10 * util).
    #[arg(long, default_value_t = 0.6)]
    pub(crate) cpu_util: f64,
    /// Processes per node.
    #[arg(long, default_value_t = 30)]
    pub(crate) processes: usize,
    /// Of those, short-lived processes whose pid changes every minute.
    #[arg(long, default_value_t = 3)]
    pub(crate) short_lived: usize,
    /// Hours of data the queries see: the loaded hours are replicated,
    /// shifted back in time, inside the store (see `materialize`).
    #[arg(long, default_value_t = 24)]
    pub(crate) span_hours: u32,
    /// Query ranges in hours (those longer than the span are skipped).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 24.0])]
    pub(crate) ranges: Vec<f64>,
    /// Most runs of each query (fewer when one run takes over 10 s).
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Database file (kept); default: target/bench/collector-bench/bench.db,
    /// deleted at the end.
    #[arg(long)]
    pub(crate) db: Option<PathBuf>,
    /// Write a markdown section with the figures to this file.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// A smoke-sized run, to show every part works (the figures mean
    /// little): 2 agents, one hour loaded, few batches through gRPC, each
    /// query once.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Stores to measure: `clickhouse` starts a private clickhouse-server
    /// (profiler-testkit) for the run.
    #[arg(long, value_enum, default_value_t = StoreChoice::Both)]
    pub(crate) store: StoreChoice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreChoice {
    Sqlite,
    Clickhouse,
    Both,
}

pub(crate) fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.agents = 2;
        args.hours = 1;
        args.single_client_batches = 50;
        args.grpc_batches = 100;
        args.clients = 4;
        args.runs = 1;
    }
    let args = Arc::new(args);
    // The collector runs on a runtime of its own, so its threads (and CPU
    // time) are told apart from the clients'.
    let collector_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("collector")
        .enable_all()
        .build()?;
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()?;
    let started = Instant::now();
    let result = clients_rt.block_on(async {
        let mut outcomes = Vec::new();
        if args.store != StoreChoice::Clickhouse {
            outcomes.push(run_sqlite(args.clone(), &collector_rt).await?);
            println!(
                "sqlite run done at {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        if args.store != StoreChoice::Sqlite {
            outcomes.push(run_clickhouse(args.clone(), &collector_rt).await?);
            println!(
                "clickhouse run done at {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        write_report(&args, &outcomes, started.elapsed().as_secs_f64())
    });
    collector_rt.shutdown_background();
    let secs = started.elapsed().as_secs_f64();
    println!("collector-bench: {secs:.0} s in all");
    result
}
