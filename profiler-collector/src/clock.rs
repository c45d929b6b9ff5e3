//! The wall clock, in nanoseconds since the Unix epoch: the time scale of
//! batch windows, query ranges and the retention cutoff.
use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix nanoseconds (0 for a clock set before 1970).
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
