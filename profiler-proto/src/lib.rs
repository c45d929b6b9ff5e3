//! The profiler's wire formats, generated at build time from `proto/`:
//! - [`v1`]: the agent → collector gRPC service (`profiler.v1.Ingest`);
//! - [`pprof`]: the pprof profile format the collector serves;
//! - [`metadata`]: the typed push-back and rejection reasons a collector
//!   sends as gRPC metadata, read by agents;
//! - [`frames`]: marker frames agents put in stacks (`[stack cut: REASON]`),
//!   read by the collector.

pub mod frames;
pub mod metadata;

/// `profiler.v1`: batches of folded stacks with labels, and their acks.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("profiler.v1");
}

/// The pprof `Profile` message (the subset the collector writes).
#[allow(clippy::all)]
pub mod pprof {
    tonic::include_proto!("pprof");
}
