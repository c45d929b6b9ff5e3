//! See `main.rs`: the eBPF program is the binary target of this crate.
#![no_std]
