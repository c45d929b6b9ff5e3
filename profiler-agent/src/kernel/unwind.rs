//! Where user-stack unwinding support lives on the agent's side.
//!
//! The kernel program walks user stacks with `bpf_get_stackid`, which
//! follows frame pointers only; code built without them (distro C/C++,
//! Rust release builds, CPython) gives stacks cut at the first such frame.
//! Unwinding without frame pointers works from tables the agent builds and
//! pushes into maps: for each binary (by build id) its CFI rows from
//! `.eh_frame`/`.debug_frame`, turned into compact (address → CFA rule,
//! return-address rule) rows the program looks up while it walks, loaded
//! when a process mapping the binary is first sampled and evicted when the
//! last one is gone, with every table that does not fit counted.
//!
//! This module owns those tables and their maps. The program reads none
//! today, so there is nothing to build or push yet: the kernel source in
//! [`super`] drains frame-pointer stacks only.
