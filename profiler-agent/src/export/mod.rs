//! Shipping windows to the collector: each drained window becomes one
//! `profiler.v1.Batch` per sample type, sent with `PushBatch` and kept
//! until acknowledged.
//!
//! - [`batch`]: building a batch (strings, stacks and label sets sent once).
//! - `queue`: unacknowledged batches in memory, bounded in bytes; the
//!   overflow goes to the spill directory or is dropped and counted.
//! - [`spill`]: the spill directory, checksummed records replayed oldest
//!   first, also by the next run.
//! - `upload`: the sending loop; the collector's answer (its typed reason,
//!   see [`profiler_proto::metadata`]) says whether a batch is retried with
//!   backoff, sent again after a push-back, or dropped as rejected.
//! - [`stats`]: the counters, and [`DropReason`], the one list of ways the
//!   export stage loses a batch.
//!
//! The collector stores a batch once per (agent id, sequence), so a re-send
//! after a lost acknowledgement is harmless.
pub mod batch;
pub mod otlp;
mod queue;
pub mod spill;
pub mod stats;
mod upload;

use std::{
    sync::{atomic::Ordering, Arc},
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use prost::Message;
use tokio::sync::mpsc;

pub use batch::{batch_samples, BatchBuilder, BatchHeader};
pub use stats::{DropCount, DropReason, ExportStats, SpillStats};

use self::{
    batch::unix_nanos,
    spill::Spill,
    upload::{upload_loop, Msg, Uploader},
};
use crate::{
    transport::{Security, Transport},
    Error, Result,
};

/// Where and how to ship batches.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// gRPC address of the collector, e.g. `http://127.0.0.1:7070`.
    pub collector: String,
    /// The `node` label and the node of every batch.
    pub node: String,
    /// Bound of the queue of unacknowledged batches, in bytes.
    pub queue_bytes: usize,
    /// How long to wait at exit for the queue to be acknowledged.
    pub flush_timeout: Duration,
    /// Where batches go when the memory queue is full (and at exit, if the
    /// collector is unreachable); `None`: they are dropped and counted.
    pub spill_dir: Option<std::path::PathBuf>,
    /// Cap of the spill directory, in bytes; past it the oldest are dropped.
    pub spill_bytes: u64,
    /// TLS files and bearer token for the collector.
    pub security: Security,
    /// What the destination speaks.
    pub protocol: Protocol,
    /// Headers sent with every request (`--otlp-header NAME=VALUE`).
    pub headers: Vec<String>,
}

/// The protocol of a destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// The collector's `profiler.v1.Ingest`.
    #[default]
    Collector,
    /// OTLP profiles (`ProfilesService/Export`, v1development): one
    /// profile per window, sample type and resource.
    Otlp,
}

impl Protocol {
    /// What logs and the summary call the destination.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Collector => "collector",
            Protocol::Otlp => "OTLP endpoint",
        }
    }
}

/// The sending side: a thread with a small runtime that owns the queue.
pub struct Exporter {
    tx: mpsc::UnboundedSender<Msg>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<ExportStats>,
    agent_id: String,
    next_sequence: u64,
    options: ExportOptions,
}

/// `host:port` becomes `http://host:port`.
pub fn collector_url(text: &str) -> String {
    if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    }
}

impl Exporter {
    /// Starts the sender. Connecting is lazy: a collector that is down now
    /// is retried, and batches wait in the queue meanwhile.
    pub fn start(options: ExportOptions) -> Result<Self> {
        let url = collector_url(&options.collector);
        let headers = options
            .headers
            .iter()
            .map(|h| crate::transport::parse_header(h))
            .collect::<Result<Vec<_>>>()?;
        let transport = Transport::new(&url, &options.security)?.with_headers(headers);
        let protocol = options.protocol;
        // An id per agent run, so sequences never repeat under one id.
        let started = unix_nanos(SystemTime::now());
        let agent_id = format!("{}-{}-{:x}", options.node, std::process::id(), started);
        let stats = Arc::new(ExportStats::default());
        let spill = options
            .spill_dir
            .as_deref()
            .map(|dir| Spill::open(dir, options.spill_bytes))
            .transpose()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = {
            let stats = stats.clone();
            let queue_bytes = options.queue_bytes;
            let flush_timeout = options.flush_timeout;
            std::thread::Builder::new()
                .name("exporter".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a tokio runtime for the exporter");
                    runtime.block_on(upload_loop(
                        Uploader {
                            transport,
                            protocol,
                            stats,
                            queue_bytes,
                            spill,
                            flush_timeout,
                        },
                        rx,
                    ));
                })
                .map_err(|e| Error::io("starting the exporter thread", e))?
        };
        tracing::info!(destination = %url, %agent_id, "exporting to the {}", protocol.name());
        Ok(Self {
            tx,
            thread: Some(thread),
            stats,
            agent_id,
            next_sequence: 1,
            options,
        })
    }

    pub fn stats(&self) -> &Arc<ExportStats> {
        &self.stats
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    pub fn node(&self) -> &str {
        &self.options.node
    }

    /// Queues a window's batch (even an empty window: the collector learns
    /// the agent is alive). Returns its encoded size.
    pub fn send(
        &mut self,
        builder: BatchBuilder,
        window_start: SystemTime,
        window_end: SystemTime,
        frequency_hz: u32,
    ) -> usize {
        let batch = builder.finish(BatchHeader {
            agent_id: self.agent_id.clone(),
            sequence: self.next_sequence,
            node: self.options.node.clone(),
            window_start,
            window_end,
            frequency_hz,
        });
        self.next_sequence += 1;
        // The bytes the destination is sent: the batch, or its OTLP request.
        let encoded = match self.options.protocol {
            Protocol::Collector => batch.encode_to_vec(),
            Protocol::Otlp => otlp::to_otlp(&batch)
                .map(|r| r.encode_to_vec())
                .unwrap_or_else(|_| batch.encode_to_vec()),
        };
        let size = encoded.len();
        let largest = self
            .stats
            .largest_batch_bytes
            .fetch_max(size as u64, Ordering::Relaxed)
            < size as u64;
        // One window a drain interval: measuring the compressed size is cheap
        // (zstd for the collector, gzip for OTLP, as they are sent).
        if largest {
            let wire = match self.options.protocol {
                Protocol::Collector => zstd::bulk::compress(&encoded, 0).ok(),
                Protocol::Otlp => gzipped(&encoded),
            };
            if let Some(wire) = wire {
                self.stats
                    .largest_batch_wire_bytes
                    .store(wire.len() as u64, Ordering::Relaxed);
            }
        }
        ExportStats::bump(&self.stats.batches_queued);
        self.stats
            .bytes_queued
            .fetch_add(size as u64, Ordering::Relaxed);
        self.stats
            .samples_queued
            .fetch_add(batch_samples(&batch), Ordering::Relaxed);
        let _ = self.tx.send(Msg::Batch(Box::new(batch)));
        size
    }

    /// Asks the sender to empty its memory queue (the memory watchdog's
    /// first step) and waits at most `wait` for it to be done; a sender
    /// busy with a send does it right after.
    pub fn park_queue(&self, wait: Duration) {
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(Msg::Shed(done)).is_ok() {
            let _ = answer.recv_timeout(wait);
        }
    }

    /// Waits (at most the flush timeout) for every queued batch to be
    /// acknowledged, then stops. What is left is counted as dropped.
    pub fn finish(mut self) {
        let _ = self.tx.send(Msg::Flush);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `bytes` gzipped.
fn gzipped(bytes: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).ok()?;
    gz.finish().ok()
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.tx.send(Msg::Flush);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_urls() {
        assert_eq!(collector_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(collector_url("https://c:443"), "https://c:443");
    }
}
