//! The privileged end-to-end tests, one test binary (one build and link,
//! workloads built once, one `serial()` lock): the real agent, collector and
//! stores against real workloads. Needs root (see `support::privileged`).
//! `cargo xtask test` runs the modules that only talk to stores (no eBPF,
//! no CPU share measured: `clickhouse`, `clickhouse_harness`,
//! `sample_types`) two at a time, then the others one at a time
//! (`--test-threads=1`), as several measure CPU shares or run perf. Run one
//! file's tests with `cargo test -p profiler-tests --test privileged e2e::`.
mod support;

mod clickhouse;
mod clickhouse_harness;
mod collector;
mod deploy;
mod e2e;
mod faults;
mod go_gc;
mod hostile;
mod jit;
mod kubernetes;
mod off_cpu;
mod otlp;
mod outage;
mod pprof;
mod python;
mod replicas;
mod sample_types;
mod security;
mod short_lived;
mod stack_quality;
mod truncate;
mod unwind;
