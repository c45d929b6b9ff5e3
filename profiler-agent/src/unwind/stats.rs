//! Figures of the unwind tables in the program's maps (the loader is
//! `crate::kernel::unwind`), for the exit summary and `/metrics`.
use std::{collections::BTreeMap, time::Duration};

/// Every reason a binary has no table (`/metrics` lists them all).
pub const FAILURE_REASONS: [&str; 10] = [
    "unreadable",
    "not_elf",
    "bad_elf",
    "not_x86_64",
    "no_cfi",
    "bad_cfi",
    "bad_compressed",
    "too_many_rows",
    "span_too_large",
    "map_write",
];

/// Counters of the table loader (exit summary, `/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    /// Tables built from binaries' CFI.
    pub tables_built: u64,
    /// Binaries whose CFI could not be used (no CFI, not ELF, unreadable),
    /// by the error's short name.
    pub build_failures: BTreeMap<&'static str, u64>,
    /// Tables evicted to make room (least recently used first).
    pub tables_evicted: u64,
    /// Tables that did not fit even after evicting every unused one: the
    /// binary unwinds with frame pointers.
    pub tables_not_fitting: u64,
    /// Processes whose mappings were loaded (first sight and refreshes).
    pub processes_loaded: u64,
    /// Processes with more executable mappings than the program searches
    /// ([`MAX_MAPPINGS`]); the rest unwind with frame pointers.
    pub processes_truncated: u64,
    /// Processes not loaded: the mapping array or the process map is full.
    pub processes_not_fitting: u64,
    /// Rows in use now, and the capacity.
    pub rows_used: u64,
    pub rows_capacity: u64,
    /// Tables loaded now.
    pub tables_loaded: u64,
    /// Total time spent building tables.
    pub build_time: Duration,
}
