//! The private ClickHouse server of the store tests lives in the
//! `profiler-testkit` crate (shared with the collector benchmark).
// Test files that do not use it compile this module too.
#[allow(unused_imports)]
pub use profiler_testkit::clickhouse::*;
