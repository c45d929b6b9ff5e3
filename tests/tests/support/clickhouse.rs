//! The private ClickHouse server of the store tests lives in the
//! `profiler-testkit` crate (shared with the collector benchmark).
pub use profiler_testkit::clickhouse::*;
