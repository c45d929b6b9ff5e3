//! The profiler agent as a library: one [`pipeline`] of stages (a sample
//! source, a symbolizer, a label step, sinks) with the eBPF [`kernel`]
//! source, process metadata, blazesym symbolization, local flame graphs and
//! the collector exporter.
//!
//! `main.rs` is a thin clap front end over [`record::record`]; the privileged
//! end-to-end tests drive the same functions, and the pipeline's unit tests
//! run it with the in-memory stages of [`pipeline::testing`].
pub mod cgroup;
pub mod config;
pub mod drain;
pub mod error;
pub mod export;
pub mod fold;
pub mod kernel;
pub mod kube;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod pipeline;
pub mod privileges;
pub mod process;
pub mod python;
pub mod record;
pub mod render;
pub mod retry;
pub mod sample_type;
pub mod sigbus;
pub mod summary;
pub mod symbolize;
pub mod transport;
pub mod unwind;

pub use error::{Error, Result};
/// The spill directory, part of the export stage.
pub use export::spill;
