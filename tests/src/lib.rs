//! Privileged end-to-end tests of the profiler live in `tests/`; the
//! workloads they profile are in `workloads/`. Run them with
//! `cargo xtask test` (as root): they load the real eBPF program.
