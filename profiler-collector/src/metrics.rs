//! Counters of the collector, served as Prometheus text on `/metrics`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use crate::store::StoreStats;

#[derive(Default)]
pub struct Metrics {
    pub batches_stored: AtomicU64,
    pub batches_duplicate: AtomicU64,
    pub samples_stored: AtomicU64,
    pub store_errors: AtomicU64,
    /// Groups of batches written (one transaction each), and the time spent
    /// writing them, in microseconds.
    pub store_commits: AtomicU64,
    pub store_write_micros: AtomicU64,
    pub queries: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// HTTP requests refused, by reason.
    http_rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// TLS handshakes refused, by server and reason.
    connections_rejected: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default() += 1;
}

impl Metrics {
    pub fn reject(&self, reason: &'static str) {
        bump(&self.rejected, reason);
    }

    pub fn reject_http(&self, reason: &'static str) {
        bump(&self.http_rejected, reason);
    }

    pub fn reject_connection(&self, server: &'static str, reason: &'static str) {
        bump(&self.connections_rejected, (server, reason));
    }

    /// TLS handshakes refused for `reason`, on either server.
    pub fn connections_rejected(&self, reason: &str) -> u64 {
        self.connections_rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((_, r), _)| *r == reason)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    /// Prometheus text exposition.
    pub fn render(&self, store: Option<&StoreStats>) -> String {
        let mut s = String::new();
        let counter = |s: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut s,
            "profiler_batches_stored_total",
            "Batches stored.",
            load(&self.batches_stored),
        );
        counter(
            &mut s,
            "profiler_batches_duplicate_total",
            "Batches received again and not stored twice.",
            load(&self.batches_duplicate),
        );
        counter(
            &mut s,
            "profiler_samples_stored_total",
            "Samples stored.",
            load(&self.samples_stored),
        );
        counter(
            &mut s,
            "profiler_store_errors_total",
            "Batches the store failed to write (answered UNAVAILABLE).",
            load(&self.store_errors),
        );
        counter(
            &mut s,
            "profiler_store_commits_total",
            "Groups of batches written, one transaction each (batches stored / commits = group size).",
            load(&self.store_commits),
        );
        let _ = writeln!(
            s,
            "# HELP profiler_store_write_seconds_total Time spent writing groups, commit included.\n# TYPE profiler_store_write_seconds_total counter\nprofiler_store_write_seconds_total {:.6}",
            load(&self.store_write_micros) as f64 / 1e6
        );
        counter(
            &mut s,
            "profiler_queries_total",
            "HTTP queries served.",
            load(&self.queries),
        );
        let _ = writeln!(
            s,
            "# HELP profiler_batches_rejected_total Batches rejected, by reason.\n# TYPE profiler_batches_rejected_total counter"
        );
        for (reason, n) in self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "profiler_batches_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP profiler_http_requests_rejected_total HTTP requests refused, by reason.\n# TYPE profiler_http_requests_rejected_total counter"
        );
        for (reason, n) in self
            .http_rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "profiler_http_requests_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP profiler_connections_rejected_total TLS handshakes refused, by server and reason.\n# TYPE profiler_connections_rejected_total counter"
        );
        for ((server, reason), n) in self
            .connections_rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "profiler_connections_rejected_total{{server=\"{server}\",reason=\"{reason}\"}} {n}"
            );
        }
        if let Some(st) = store {
            for (name, help, v) in [
                (
                    "profiler_store_bytes",
                    "Size of the store on disk.",
                    st.bytes,
                ),
                (
                    "profiler_store_batches",
                    "Batches in the store.",
                    st.batches,
                ),
                (
                    "profiler_store_sample_rows",
                    "Sample rows in the store.",
                    st.sample_rows,
                ),
                (
                    "profiler_store_stacks",
                    "Distinct stacks in the store.",
                    st.stacks,
                ),
            ] {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
        }
        s
    }
}
