//! Helpers shared by the end-to-end tests (`tests/`), the benchmarks
//! (`xtask/src/bench/`) and the examples, so each starts external servers,
//! picks ports, draws random data and waits the same way.
//!
//! - [`clickhouse`]: a private `clickhouse-server` on free loopback ports.
//! - [`current`]: the current ClickHouse engine (chdb) behind an HTTP shim.
//! - [`elf`]: where an ELF file's loaded part ends, for tests that cut one.
//! - [`net`]: loopback ports bound before they are handed over.
//! - [`rng`]: a seeded random generator and Zipf weights.
//! - [`stats`]: the median of measurements.
//! - [`wait`]: waiting for an observable state with a deadline.
//!
//! Both ClickHouse servers speak its HTTP interface: [`Server`].
pub mod clickhouse;
pub mod current;
pub mod elf;
pub mod net;
pub mod pyenv;
pub mod rng;
pub mod stats;
pub mod wait;

pub use pyenv::pyenv_python;
pub use rng::Rng;
pub use stats::{median, median_duration};
pub use wait::{wait_for, wait_until, within};

use std::time::Duration;

/// Each request's timeout in [`Server::query`].
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A ClickHouse HTTP endpoint on loopback.
pub trait Server {
    fn http_port(&self) -> u16;

    /// `clickhouse://127.0.0.1:PORT/DATABASE` for the collector's --store flag.
    fn store_url(&self, database: &str) -> String {
        format!("clickhouse://127.0.0.1:{}/{database}", self.http_port())
    }

    /// Runs one SQL statement over HTTP and returns the body; panics on a
    /// non-200 answer (with the body) or when there is no answer within 30 s.
    fn query(&self, sql: &str) -> String {
        self.try_query(sql, QUERY_TIMEOUT)
            .unwrap_or_else(|why| panic!("ClickHouse query {sql:?}: {why}"))
    }

    /// Like [`query`](Self::query), with a timeout for the whole exchange,
    /// and returning what went wrong instead of panicking.
    fn try_query(&self, sql: &str, timeout: Duration) -> Result<String, String> {
        clickhouse::http_post(self.http_port(), None, sql.as_bytes(), timeout)
    }
}
