//! Unwind tables: how the program finds a caller's frame in code built
//! without frame pointers.
//!
//! For each binary the agent builds one table from its call-frame
//! information (CFI: `.eh_frame`, and `.debug_frame` where present) with
//! [`build_table`]. A table is a sorted array of [`UnwindRow`]s, 12 bytes
//! each: from a row's `pc` (an address minus the table's `base`) up to the
//! next row's, how to find the canonical frame address (CFA) — `RSP` or
//! `RBP` plus an offset, the PLT's expression, a dereference, a signal
//! frame, or the outermost frame — and where the caller's `RBP` is. The
//! return address is always at `CFA - 8`; the caller's `RSP` is the CFA.
//!
//! The program finds the row of a frame by binary search: the last row
//! whose `pc` is at or below `address - base`, where the address is the
//! sampled `RIP` for the leaf frame and the return address − 1 for callers
//! (the call instruction, which still belongs to the caller's function).
//! [`UnwindTable::lookup`] is the same search, for tests and diagnostics.
//!
//! Limits:
//! - x86-64 ELF only: the rules name x86-64 registers.
//! - A row the program cannot apply (a return address not at `CFA - 8`, a
//!   CFA expression other than the PLT's and `*(RSP|RBP + n)`) becomes
//!   [`cfa::UNSUPPORTED`](profiler_common::unwind::cfa::UNSUPPORTED): the
//!   walk stops there and counts it, never guesses. [`TableStats`] counts
//!   them by [`Unsupported`] reason.
//! - An address no FDE covers (a gap between functions) finds a
//!   [`cfa::NONE`](profiler_common::unwind::cfa::NONE) row: the program
//!   tries a frame-pointer step.
//! - At most [`MAX_TABLE_ROWS`](profiler_common::unwind::MAX_TABLE_ROWS) rows
//!   after merging, and less than 4 GiB from the lowest to the highest
//!   covered address (row addresses are 32-bit).
//! - Files are passed as bytes the caller read, never mapped: a binary
//!   truncated while being read is an error, not a `SIGBUS`.
mod stats;
mod table;

pub use profiler_common::unwind::UnwindRow;
pub use stats::{UnwindStats, FAILURE_REASONS};
pub use table::{
    build_table, cfa_rule_name, FdeAt, SectionStats, TableError, TableStats, Unsupported,
    UnwindTable,
};
