//! Shipping windows to the collector: each drained window becomes one
//! `profiler.v1.Batch` (strings, stacks and label sets de-duplicated), sent
//! with `PushBatch` and kept until acknowledged.
//!
//! Unacknowledged batches wait in a queue bounded in bytes; when it is full
//! the oldest batch is dropped and counted. Failed sends are retried with
//! exponential backoff and jitter (the channel reconnects by itself); a batch
//! the collector rejects as invalid is dropped and counted, never retried.
//! The collector stores a batch once per (agent id, sequence), so a re-send
//! after a lost acknowledgement is harmless.
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use profiler_proto::v1::{Batch, Label, LabelSet, Sample, Stack};
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tonic::{codec::CompressionEncoding, Code};

use crate::{
    sample_type::SampleType,
    spill::{Spill, SpillStats},
    transport::{retry_hint, Security, Transport},
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
}

/// Counters of the exporter (all totals since start).
#[derive(Debug, Default)]
pub struct ExportStats {
    pub batches_queued: AtomicU64,
    pub batches_acked: AtomicU64,
    /// Acknowledged as already stored (a re-send).
    pub batches_duplicate: AtomicU64,
    pub samples_acked: AtomicU64,
    pub send_failures: AtomicU64,
    /// Sends the collector pushed back (overloaded, or over this agent's
    /// rate limit): retried after the wait it asked for.
    pub pushed_back: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_rejected: AtomicU64,
    pub dropped_at_exit: AtomicU64,
    /// Encoded size of the largest batch, before compression.
    pub largest_batch_bytes: AtomicU64,
    /// Size of the largest batch compressed with zstd, as on the wire.
    pub largest_batch_wire_bytes: AtomicU64,
    /// The spill directory's counters.
    pub spill: SpillStats,
    /// Encoded bytes (before compression) of the batches queued.
    pub bytes_queued: AtomicU64,
    /// Encoded bytes of the batches acknowledged.
    pub bytes_acked: AtomicU64,
    /// Samples in the batches queued.
    pub samples_queued: AtomicU64,
    /// Batches waiting in memory now, and their encoded bytes (gauges).
    pub queue_batches: AtomicU64,
    pub queue_bytes: AtomicU64,
    /// 1 while the last send reached the collector, 0 after a failure.
    pub collector_up: AtomicU64,
    /// Batches the memory watchdog moved from memory to the spill directory.
    pub parked_memory_limit: AtomicU64,
    /// Batches the memory watchdog dropped (no spill directory).
    pub dropped_memory_limit: AtomicU64,
    /// Samples in the batches dropped, by reason (see [`Self::drops`]).
    pub samples_dropped_queue_full: AtomicU64,
    pub samples_dropped_rejected: AtomicU64,
    pub samples_dropped_at_exit: AtomicU64,
    pub samples_dropped_memory_limit: AtomicU64,
}

/// Batches (and the samples in them) dropped for one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropCount {
    pub reason: &'static str,
    pub batches: u64,
    /// Unknown (0) for corrupt spill records.
    pub samples: u64,
}

/// The sum of a batch's values (samples for `cpu`, nanoseconds for
/// `off_cpu`).
pub fn batch_samples(batch: &Batch) -> u64 {
    batch.samples.iter().map(|s| s.value.max(0) as u64).sum()
}

impl ExportStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Every drop reason with its batches and samples (zeros included):
    /// the `reason` labels on `/metrics`.
    pub fn drops(&self) -> [DropCount; 7] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let d = |reason, batches: &AtomicU64, samples: Option<&AtomicU64>| DropCount {
            reason,
            batches: load(batches),
            samples: samples.map_or(0, load),
        };
        let s = &self.spill;
        [
            d(
                "queue_full",
                &self.dropped_queue_full,
                Some(&self.samples_dropped_queue_full),
            ),
            d(
                "rejected_by_collector",
                &self.dropped_rejected,
                Some(&self.samples_dropped_rejected),
            ),
            d(
                "unsent_at_exit",
                &self.dropped_at_exit,
                Some(&self.samples_dropped_at_exit),
            ),
            d(
                "memory_limit",
                &self.dropped_memory_limit,
                Some(&self.samples_dropped_memory_limit),
            ),
            d("spill_cap", &s.dropped_cap, Some(&s.samples_dropped_cap)),
            d("spill_corrupt", &s.dropped_corrupt, None),
            d(
                "spill_write_error",
                &s.dropped_write_error,
                Some(&s.samples_dropped_write_error),
            ),
        ]
    }

    /// Batch drops (`batches_dropped_REASON`) and the samples in them
    /// (`samples_dropped_REASON`), the non-zero ones.
    pub fn nonzero_drops(&self) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        for d in self.drops() {
            let (batches, samples) = match d.reason {
                "queue_full" => ("batches_dropped_queue_full", "samples_dropped_queue_full"),
                "rejected_by_collector" => (
                    "batches_rejected_by_collector",
                    "samples_rejected_by_collector",
                ),
                "unsent_at_exit" => ("batches_unsent_at_exit", "samples_unsent_at_exit"),
                "memory_limit" => (
                    "batches_dropped_memory_limit",
                    "samples_dropped_memory_limit",
                ),
                "spill_cap" => ("batches_dropped_spill_cap", "samples_dropped_spill_cap"),
                "spill_corrupt" => ("batches_dropped_spill_corrupt", ""),
                _ => (
                    "batches_dropped_spill_write_error",
                    "samples_dropped_spill_write_error",
                ),
            };
            if d.batches > 0 {
                out.push((batches, d.batches));
            }
            if d.samples > 0 {
                out.push((samples, d.samples));
            }
        }
        out
    }

    /// Samples in all dropped batches.
    pub fn samples_dropped(&self) -> u64 {
        self.drops().iter().map(|d| d.samples).sum()
    }
}

/// Builds one batch of one sample type, interning strings, stacks and label
/// sets.
#[derive(Default)]
pub struct BatchBuilder {
    sample_type: SampleType,
    strings: Vec<Vec<u8>>,
    string_ids: HashMap<String, u32>,
    stacks: Vec<Stack>,
    stack_ids: HashMap<Vec<u32>, u32>,
    label_sets: Vec<LabelSet>,
    label_set_ids: HashMap<Vec<(u32, u32)>, u32>,
    samples: Vec<Sample>,
}

impl BatchBuilder {
    /// A batch of CPU samples.
    pub fn new() -> Self {
        Self::for_type(SampleType::Cpu)
    }

    /// A batch whose values are of `sample_type`.
    pub fn for_type(sample_type: SampleType) -> Self {
        let mut b = Self {
            sample_type,
            ..Self::default()
        };
        b.intern("");
        b
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(id) = self.string_ids.get(s) {
            return *id;
        }
        let id = self.strings.len() as u32;
        self.strings.push(s.as_bytes().to_vec());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    /// Adds `value` (in the batch type's unit) to `frames` (root first)
    /// with `labels`.
    pub fn add(&mut self, labels: &[(&str, &str)], frames: &[String], value: u64) {
        if frames.is_empty() || value == 0 {
            return;
        }
        let frame_ids: Vec<u32> = frames.iter().map(|f| self.intern(f)).collect();
        let stack = match self.stack_ids.get(&frame_ids) {
            Some(id) => *id,
            None => {
                let id = self.stacks.len() as u32;
                self.stacks.push(Stack {
                    frames: frame_ids.clone(),
                });
                self.stack_ids.insert(frame_ids, id);
                id
            }
        };
        let mut pairs: Vec<(u32, u32)> = labels
            .iter()
            .map(|(n, v)| (self.intern(n), self.intern(v)))
            .collect();
        pairs.sort_unstable();
        let label_set = match self.label_set_ids.get(&pairs) {
            Some(id) => *id,
            None => {
                let id = self.label_sets.len() as u32;
                self.label_sets.push(LabelSet {
                    labels: pairs
                        .iter()
                        .map(|(name, value)| Label {
                            name: *name,
                            value: *value,
                        })
                        .collect(),
                });
                self.label_set_ids.insert(pairs, id);
                id
            }
        };
        self.samples.push(Sample {
            label_set,
            stack,
            value: value.min(i64::MAX as u64) as i64,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The batch, with its header.
    pub fn finish(self, header: BatchHeader) -> Batch {
        Batch {
            agent_id: header.agent_id,
            sequence: header.sequence,
            node: header.node,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            window_start_unix_nanos: unix_nanos(header.window_start),
            window_end_unix_nanos: unix_nanos(header.window_end),
            frequency_hz: header.frequency_hz,
            strings: self.strings,
            stacks: self.stacks,
            label_sets: self.label_sets,
            samples: self.samples,
            sample_type: Some(self.sample_type.to_proto()),
        }
    }
}

/// What a batch says about itself.
pub struct BatchHeader {
    pub agent_id: String,
    pub sequence: u64,
    pub node: String,
    pub window_start: SystemTime,
    pub window_end: SystemTime,
    pub frequency_hz: u32,
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

enum Msg {
    Batch(Batch),
    Flush,
    /// From the memory watchdog: empty the memory queue (to the spill
    /// directory, or drop its oldest half); answered when done.
    Shed(std::sync::mpsc::SyncSender<()>),
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
        let transport = Transport::new(&url, &options.security)?;
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
                        transport,
                        rx,
                        stats,
                        queue_bytes,
                        spill,
                        flush_timeout,
                    ));
                })
                .map_err(|e| Error::io("starting the exporter thread", e))?
        };
        tracing::info!(collector = %url, %agent_id, "exporting to the collector");
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
        let encoded = batch.encode_to_vec();
        let size = encoded.len();
        let largest = self
            .stats
            .largest_batch_bytes
            .fetch_max(size as u64, Ordering::Relaxed)
            < size as u64;
        // One window a drain interval: measuring the compressed size is cheap.
        if largest {
            if let Ok(wire) = zstd::bulk::compress(&encoded, 0) {
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
        let _ = self.tx.send(Msg::Batch(batch));
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

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.tx.send(Msg::Flush);
            let _ = thread.join();
        }
    }
}

/// Backoff before retry `attempt` (1-based): 100 ms doubling to 10 s, with
/// ±50 % jitter so agents do not retry in step.
pub fn backoff(attempt: u32) -> Duration {
    let base = 100u64
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(10_000);
    let jitter = rand::rng().random_range(0.5..1.5);
    Duration::from_millis((base as f64 * jitter) as u64)
}

/// Whether the collector refused the batch itself (retrying cannot help):
/// invalid, or larger than it accepts. Anything else is retried; a push-back
/// (`RESOURCE_EXHAUSTED` with a retry hint) after the wait it asks for.
fn is_rejection(status: &tonic::Status) -> bool {
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => true,
        Code::ResourceExhausted if retry_hint(status).is_none() => {
            let m = status.message();
            m.contains("too large") || m.contains("size limit")
        }
        _ => false,
    }
}

/// Unacknowledged batches: in memory up to `limit` bytes; past that the
/// oldest go to the spill directory if there is one, else are dropped.
/// Spilled batches are always older than those in memory.
struct Queue {
    batches: VecDeque<(Batch, usize)>,
    bytes: usize,
    limit: usize,
    spill: Option<Spill>,
    /// Batches have overflowed memory since the queue was last empty (logs
    /// say so once, not for every batch).
    overflowing: bool,
}

impl Queue {
    fn new(limit: usize, spill: Option<Spill>) -> Self {
        Self {
            batches: VecDeque::new(),
            bytes: 0,
            limit,
            spill,
            overflowing: false,
        }
    }

    /// Updates the queue gauges.
    fn publish(&self, stats: &ExportStats) {
        stats
            .queue_batches
            .store(self.batches.len() as u64, Ordering::Relaxed);
        stats
            .queue_bytes
            .store(self.bytes as u64, Ordering::Relaxed);
        if let Some(spill) = &self.spill {
            spill.publish(&stats.spill);
        }
    }

    fn push(&mut self, batch: Batch, stats: &ExportStats) {
        let size = batch.encoded_len();
        self.batches.push_back((batch, size));
        self.bytes += size;
        // Keep the newest in memory (the one just queued stays even if it
        // alone is over the bound).
        while self.bytes > self.limit && self.batches.len() > 1 {
            if let Some((old, size)) = self.batches.pop_front() {
                self.bytes -= size;
                self.overflow(old, stats);
            }
        }
    }

    fn overflow(&mut self, batch: Batch, stats: &ExportStats) {
        if !self.overflowing {
            self.overflowing = true;
            match &self.spill {
                Some(_) => tracing::warn!(
                    limit_bytes = self.limit,
                    "export queue full: the oldest batches go to the spill directory"
                ),
                None => tracing::warn!(
                    limit_bytes = self.limit,
                    "export queue full and no spill directory: the oldest batches are dropped"
                ),
            }
        }
        match &mut self.spill {
            Some(spill) => spill.push(&batch, &stats.spill),
            None => {
                ExportStats::bump(&stats.dropped_queue_full);
                stats
                    .samples_dropped_queue_full
                    .fetch_add(batch_samples(&batch), Ordering::Relaxed);
                tracing::debug!(
                    sequence = batch.sequence,
                    "export queue full: dropped the oldest batch"
                );
            }
        }
    }

    /// The memory watchdog's request: every batch in memory goes to the
    /// spill directory; without one, the oldest half (in bytes) is dropped.
    fn shed(&mut self, stats: &ExportStats) {
        if self.spill.is_some() {
            let parked = self.batches.len() as u64;
            while let Some((batch, size)) = self.batches.pop_front() {
                self.bytes -= size;
                if let Some(spill) = &mut self.spill {
                    spill.push(&batch, &stats.spill);
                }
            }
            stats
                .parked_memory_limit
                .fetch_add(parked, Ordering::Relaxed);
            tracing::info!(
                batches = parked,
                "memory limit: export queue parked on disk"
            );
            return;
        }
        let keep = self.bytes / 2;
        let (mut batches, mut samples) = (0, 0);
        while self.bytes > keep {
            let Some((batch, size)) = self.batches.pop_front() else {
                break;
            };
            self.bytes -= size;
            batches += 1;
            samples += batch_samples(&batch);
        }
        stats
            .dropped_memory_limit
            .fetch_add(batches, Ordering::Relaxed);
        stats
            .samples_dropped_memory_limit
            .fetch_add(samples, Ordering::Relaxed);
        tracing::warn!(
            batches,
            samples,
            "memory limit: dropped the oldest half of the export queue"
        );
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.spill.as_ref().is_none_or(Spill::is_empty)
    }

    /// The oldest batch, and whether it comes from the spill directory.
    fn front(&mut self, stats: &ExportStats) -> Option<(Batch, bool)> {
        if let Some(spill) = &mut self.spill {
            if let Some(batch) = spill.front(&stats.spill) {
                return Some((batch, true));
            }
        }
        self.batches.front().map(|(b, _)| (b.clone(), false))
    }

    fn pop(&mut self, spilled: bool, stats: &ExportStats) {
        if spilled {
            if let Some(spill) = &mut self.spill {
                spill.pop();
                ExportStats::bump(&stats.spill.replayed);
            }
        } else if let Some((_, size)) = self.batches.pop_front() {
            self.bytes -= size;
        }
        if self.overflowing && self.is_empty() {
            self.overflowing = false;
            tracing::info!("export queue drained: every waiting batch was delivered");
        }
    }

    /// At exit: what memory holds goes to disk when there is a spill
    /// directory (the next run sends it); returns what is lost (batches,
    /// samples).
    fn park(&mut self, stats: &ExportStats) -> (u64, u64) {
        if self.spill.is_none() {
            let samples = self.batches.iter().map(|(b, _)| batch_samples(b)).sum();
            return (self.batches.len() as u64, samples);
        }
        while let Some((batch, size)) = self.batches.pop_front() {
            self.bytes -= size;
            self.overflow(batch, stats);
        }
        (0, 0)
    }
}

async fn upload_loop(
    transport: Transport,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    stats: Arc<ExportStats>,
    queue_bytes: usize,
    spill: Option<Spill>,
    flush_timeout: Duration,
) {
    let mut client = transport
        .client()
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd);
    let mut queue = Queue::new(queue_bytes, spill);
    let mut flush_deadline: Option<Instant> = None;
    let mut attempt = 0u32;
    // Why the last send failed: a new reason is a warning, a repeat is not.
    let mut last_failure = String::new();
    // Since when the collector is unreachable, and how many sends failed:
    // logged when the state changes, not at every retry.
    let mut outage: Option<(Instant, u64)> = None;
    let accept = |msg: Option<Msg>, queue: &mut Queue, deadline: &mut Option<Instant>| {
        match msg {
            Some(Msg::Batch(b)) => queue.push(b, &stats),
            Some(Msg::Shed(done)) => {
                queue.shed(&stats);
                let _ = done.try_send(());
            }
            Some(Msg::Flush) | None => {
                deadline.get_or_insert_with(|| Instant::now() + flush_timeout);
            }
        }
        queue.publish(&stats);
    };
    loop {
        while let Ok(msg) = rx.try_recv() {
            accept(Some(msg), &mut queue, &mut flush_deadline);
        }
        if flush_deadline.is_some_and(|d| Instant::now() >= d) {
            let (lost, samples) = queue.park(&stats);
            queue.publish(&stats);
            if lost > 0 {
                stats.dropped_at_exit.fetch_add(lost, Ordering::Relaxed);
                stats
                    .samples_dropped_at_exit
                    .fetch_add(samples, Ordering::Relaxed);
                tracing::warn!(
                    batches = lost,
                    samples,
                    "collector unreachable at exit: batches not delivered"
                );
            } else if !queue.is_empty() {
                tracing::warn!(
                    "collector unreachable at exit: batches kept in the spill directory"
                );
            }
            return;
        }
        let Some((batch, spilled)) = queue.front(&stats) else {
            if flush_deadline.is_some() {
                return;
            }
            let msg = rx.recv().await;
            accept(msg, &mut queue, &mut flush_deadline);
            continue;
        };
        let (size, samples) = (batch.encoded_len() as u64, batch_samples(&batch));
        let result = client.push_batch(batch).await;
        let reached = match &result {
            Ok(_) => true,
            Err(status) => is_rejection(status) || retry_hint(status).is_some(),
        };
        stats
            .collector_up
            .store(u64::from(reached), Ordering::Relaxed);
        match (&mut outage, reached) {
            (Some((since, failures)), true) => {
                tracing::info!(
                    failed_attempts = *failures,
                    "collector reachable again after {:.1?}",
                    since.elapsed()
                );
                outage = None;
            }
            (Some((_, failures)), false) => *failures += 1,
            (None, false) => outage = Some((Instant::now(), 1)),
            (None, true) => {}
        }
        match result {
            Ok(ack) => {
                let ack = ack.into_inner();
                attempt = 0;
                ExportStats::bump(&stats.batches_acked);
                stats.bytes_acked.fetch_add(size, Ordering::Relaxed);
                if !ack.newly_stored {
                    ExportStats::bump(&stats.batches_duplicate);
                }
                stats
                    .samples_acked
                    .fetch_add(ack.samples, Ordering::Relaxed);
                queue.pop(spilled, &stats);
                queue.publish(&stats);
            }
            Err(status) if is_rejection(&status) => {
                ExportStats::bump(&stats.dropped_rejected);
                stats
                    .samples_dropped_rejected
                    .fetch_add(samples, Ordering::Relaxed);
                tracing::error!(samples, "collector rejected a batch: {}", status.message());
                queue.pop(spilled, &stats);
                queue.publish(&stats);
            }
            Err(status) if retry_hint(&status).is_some() => {
                // Pushed back: the collector is up but busy, or this agent
                // is over its rate limit. Wait as asked (with jitter).
                ExportStats::bump(&stats.pushed_back);
                let wait = retry_hint(&status)
                    .unwrap_or_default()
                    .mul_f64(rand::rng().random_range(1.0..1.2));
                tracing::info!(
                    "collector pushed back ({}); sending again in {wait:.1?}",
                    status.message()
                );
                wait_accepting(wait, &mut rx, &mut queue, &mut flush_deadline, &accept).await;
            }
            Err(status) => {
                attempt += 1;
                ExportStats::bump(&stats.send_failures);
                let wait = backoff(attempt);
                // The first failure of an outage is a warning; the retries
                // are in the periodic summary and at debug level.
                let why = transport.explain(&status);
                if attempt == 1 || why != last_failure {
                    tracing::warn!(
                        code = ?status.code(),
                        "sending to the collector failed: {why}; batches wait in the queue, retrying with backoff"
                    );
                } else {
                    tracing::debug!(
                        code = ?status.code(),
                        attempt,
                        "sending to the collector failed: {why}; retrying in {wait:?}"
                    );
                }
                last_failure = why;
                wait_accepting(wait, &mut rx, &mut queue, &mut flush_deadline, &accept).await;
            }
        }
    }
}

/// Sleeps `wait` (cut short by the exit deadline), still taking batches in.
async fn wait_accepting(
    wait: Duration,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    queue: &mut Queue,
    flush_deadline: &mut Option<Instant>,
    accept: &impl Fn(Option<Msg>, &mut Queue, &mut Option<Instant>),
) {
    let sleep = tokio::time::sleep(match flush_deadline {
        Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
        None => wait,
    });
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => break,
            msg = rx.recv(), if flush_deadline.is_none() => accept(msg, queue, flush_deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_interns_strings_stacks_and_label_sets() {
        let mut b = BatchBuilder::new();
        let frames = vec!["main".to_string(), "hot".to_string()];
        let labels = [("node", "n1"), ("process", "app")];
        b.add(&labels, &frames, 3);
        b.add(&labels, &frames, 2);
        b.add(
            &[("node", "n1"), ("process", "db")],
            &["main".to_string()],
            1,
        );
        b.add(&labels, &[], 5);
        let batch = b.finish(BatchHeader {
            agent_id: "a".into(),
            sequence: 7,
            node: "n1".into(),
            window_start: UNIX_EPOCH + Duration::from_secs(10),
            window_end: UNIX_EPOCH + Duration::from_secs(20),
            frequency_hz: 99,
        });
        assert_eq!(batch.sequence, 7);
        assert_eq!(batch.window_end_unix_nanos, 20_000_000_000);
        assert_eq!(batch.stacks.len(), 2);
        assert_eq!(batch.label_sets.len(), 2);
        assert_eq!(batch.samples.len(), 3);
        let strings: Vec<&str> = batch
            .strings
            .iter()
            .map(|s| std::str::from_utf8(s).unwrap())
            .collect();
        assert_eq!(
            strings,
            ["", "main", "hot", "node", "n1", "process", "app", "db"]
        );
    }

    /// A batch of about 110 bytes.
    fn batch(seq: u64) -> Batch {
        Batch {
            sequence: seq,
            agent_id: "x".repeat(100),
            ..Default::default()
        }
    }

    #[test]
    fn queue_drops_oldest_when_full() {
        let stats = ExportStats::default();
        let one = batch(1).encoded_len();
        let mut q = Queue::new(one * 2, None);
        for seq in 1..=3 {
            q.push(batch(seq), &stats);
        }
        let seqs: Vec<u64> = q.batches.iter().map(|(b, _)| b.sequence).collect();
        assert_eq!(seqs, vec![2, 3]);
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.nonzero_drops(),
            vec![("batches_dropped_queue_full", 1)]
        );
        q.pop(false, &stats);
        assert_eq!(q.bytes, one);
        assert_eq!(
            q.park(&stats),
            (1, 0),
            "without a spill directory the rest is lost at exit"
        );
    }

    #[test]
    fn overflow_spills_and_replays_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let stats = ExportStats::default();
        let one = batch(1).encoded_len();
        let mut q = Queue::new(one * 2, Some(Spill::open(dir.path(), 1 << 20).unwrap()));
        for seq in 1..=5 {
            q.push(batch(seq), &stats);
        }
        assert!(q.bytes <= one * 2, "memory stays within its bound");
        assert_eq!(stats.spill.spilled.load(Ordering::Relaxed), 3);
        assert!(stats.nonzero_drops().is_empty());
        let mut order = Vec::new();
        while let Some((b, spilled)) = q.front(&stats) {
            order.push((b.sequence, spilled));
            q.pop(spilled, &stats);
        }
        assert_eq!(
            order,
            vec![(1, true), (2, true), (3, true), (4, false), (5, false)]
        );
        assert_eq!(stats.spill.replayed.load(Ordering::Relaxed), 3);
        // At exit, what memory holds is parked on disk for the next run.
        q.push(batch(6), &stats);
        assert_eq!(q.park(&stats), (0, 0));
        assert_eq!(Spill::open(dir.path(), 1 << 20).unwrap().len(), 1);
    }

    /// A batch of `samples` samples in one entry.
    fn batch_of(seq: u64, samples: i64) -> Batch {
        Batch {
            samples: vec![Sample {
                label_set: 0,
                stack: 0,
                value: samples,
            }],
            ..batch(seq)
        }
    }

    #[test]
    fn dropped_samples_are_counted_by_reason() {
        let stats = ExportStats::default();
        let one = batch_of(1, 5).encoded_len();
        let mut q = Queue::new(one * 2, None);
        for seq in 1..=3 {
            q.push(batch_of(seq, 5), &stats);
        }
        q.publish(&stats);
        assert_eq!(stats.queue_batches.load(Ordering::Relaxed), 2);
        assert_eq!(stats.queue_bytes.load(Ordering::Relaxed), 2 * one as u64);
        assert_eq!(
            stats.nonzero_drops(),
            vec![
                ("batches_dropped_queue_full", 1),
                ("samples_dropped_queue_full", 5)
            ]
        );
        assert_eq!(q.park(&stats), (2, 10));
        assert_eq!(stats.samples_dropped(), 5);
    }

    #[test]
    fn shedding_parks_the_queue_or_drops_its_oldest_half() {
        let stats = ExportStats::default();
        let mut q = Queue::new(1 << 20, None);
        for seq in 1..=4 {
            q.push(batch_of(seq, 3), &stats);
        }
        q.shed(&stats);
        let seqs: Vec<u64> = q.batches.iter().map(|(b, _)| b.sequence).collect();
        assert_eq!(seqs, vec![3, 4], "the oldest half is dropped");
        assert_eq!(stats.dropped_memory_limit.load(Ordering::Relaxed), 2);
        assert_eq!(stats.samples_dropped(), 6);

        let dir = tempfile::tempdir().unwrap();
        let stats = ExportStats::default();
        let mut q = Queue::new(1 << 20, Some(Spill::open(dir.path(), 1 << 20).unwrap()));
        for seq in 1..=4 {
            q.push(batch_of(seq, 3), &stats);
        }
        q.shed(&stats);
        assert!(q.batches.is_empty() && q.bytes == 0);
        assert_eq!(stats.parked_memory_limit.load(Ordering::Relaxed), 4);
        assert!(stats.nonzero_drops().is_empty());
        let mut order = Vec::new();
        while let Some((b, spilled)) = q.front(&stats) {
            order.push((b.sequence, spilled));
            q.pop(spilled, &stats);
        }
        assert_eq!(order, vec![(1, true), (2, true), (3, true), (4, true)]);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..30 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_millis(15_000), "{d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(150));
        // 10 s base, ±50 % jitter.
        assert!(backoff(8) >= Duration::from_millis(5_000));
    }

    #[test]
    fn rejections_are_not_retried() {
        use tonic::Status;
        assert!(is_rejection(&Status::invalid_argument("bad")));
        assert!(is_rejection(&Status::resource_exhausted(
            "batch too large: 20 bytes, the limit is 10 bytes"
        )));
        assert!(is_rejection(&Status::out_of_range(
            "decoded message length too large"
        )));
        assert!(!is_rejection(&Status::resource_exhausted(
            "overloaded, retry later"
        )));
        assert!(!is_rejection(&Status::unavailable("down")));
    }

    #[test]
    fn collector_urls() {
        assert_eq!(collector_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(collector_url("https://c:443"), "https://c:443");
    }
}
