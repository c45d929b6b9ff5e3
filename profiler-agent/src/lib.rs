//! The profiler agent as a library: sampling with eBPF, loss-free draining,
//! process metadata, symbolization, folding and local flame graphs.
//!
//! `main.rs` is a thin clap front end over [`record::record`]; the privileged
//! end-to-end tests drive the same functions.
pub mod cgroup;
pub mod config;
pub mod drain;
pub mod error;
pub mod export;
pub mod fold;
pub mod kube;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod privileges;
pub mod process;
pub mod record;
pub mod render;
pub mod sample_type;
pub mod sampler;
pub mod spill;
pub mod summary;
pub mod symbolize;
pub mod transport;

pub use error::{Error, Result};
