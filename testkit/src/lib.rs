//! Helpers shared by the end-to-end tests (`tests/`) and the benchmarks
//! (`profiler-collector/examples/ingest_bench.rs`), so each starts
//! external servers the same way.
//!
//! - [`clickhouse`]: a private `clickhouse-server` on free loopback ports.
pub mod clickhouse;
pub mod current;
