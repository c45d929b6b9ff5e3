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

use profiler_proto::v1::{ingest_client::IngestClient, Batch, Label, LabelSet, Sample, Stack};
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tonic::{codec::CompressionEncoding, transport::Endpoint, Code};

use crate::{
    spill::{Spill, SpillStats},
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
    pub dropped_queue_full: AtomicU64,
    pub dropped_rejected: AtomicU64,
    pub dropped_at_exit: AtomicU64,
    /// Encoded size of the largest batch, before compression.
    pub largest_batch_bytes: AtomicU64,
    /// Size of the largest batch compressed with zstd, as on the wire.
    pub largest_batch_wire_bytes: AtomicU64,
    /// The spill directory's counters.
    pub spill: SpillStats,
}

impl ExportStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Batch drops by reason, the non-zero ones.
    pub fn nonzero_drops(&self) -> Vec<(&'static str, u64)> {
        [
            ("batches_dropped_queue_full", &self.dropped_queue_full),
            ("batches_rejected_by_collector", &self.dropped_rejected),
            ("batches_unsent_at_exit", &self.dropped_at_exit),
            ("batches_dropped_spill_cap", &self.spill.dropped_cap),
            ("batches_dropped_spill_corrupt", &self.spill.dropped_corrupt),
            (
                "batches_dropped_spill_write_error",
                &self.spill.dropped_write_error,
            ),
        ]
        .into_iter()
        .map(|(n, c)| (n, c.load(Ordering::Relaxed)))
        .filter(|(_, v)| *v > 0)
        .collect()
    }
}

/// Builds one batch, interning strings, stacks and label sets.
#[derive(Default)]
pub struct BatchBuilder {
    strings: Vec<Vec<u8>>,
    string_ids: HashMap<String, u32>,
    stacks: Vec<Stack>,
    stack_ids: HashMap<Vec<u32>, u32>,
    label_sets: Vec<LabelSet>,
    label_set_ids: HashMap<Vec<(u32, u32)>, u32>,
    samples: Vec<Sample>,
}

impl BatchBuilder {
    pub fn new() -> Self {
        let mut b = Self::default();
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

    /// Adds `count` samples of `frames` (root first) with `labels`.
    pub fn add(&mut self, labels: &[(&str, &str)], frames: &[String], count: u64) {
        if frames.is_empty() || count == 0 {
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
            count: count.min(i64::MAX as u64) as i64,
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
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::InvalidArgument(format!("collector address {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .tcp_keepalive(Some(Duration::from_secs(30)));
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
                        endpoint,
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
        let _ = self.tx.send(Msg::Batch(batch));
        size
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
/// invalid, or larger than it accepts. Anything else is retried.
fn is_rejection(status: &tonic::Status) -> bool {
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => true,
        Code::ResourceExhausted => {
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
}

impl Queue {
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
        match &mut self.spill {
            Some(spill) => spill.push(&batch, &stats.spill),
            None => {
                ExportStats::bump(&stats.dropped_queue_full);
                tracing::warn!(
                    sequence = batch.sequence,
                    "export queue full: dropped the oldest batch"
                );
            }
        }
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
    }

    /// At exit: what memory holds goes to disk when there is a spill
    /// directory (the next run sends it); returns what is lost.
    fn park(&mut self, stats: &ExportStats) -> u64 {
        if self.spill.is_none() {
            return self.batches.len() as u64;
        }
        while let Some((batch, size)) = self.batches.pop_front() {
            self.bytes -= size;
            self.overflow(batch, stats);
        }
        0
    }
}

async fn upload_loop(
    endpoint: Endpoint,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    stats: Arc<ExportStats>,
    queue_bytes: usize,
    spill: Option<Spill>,
    flush_timeout: Duration,
) {
    let mut client = IngestClient::new(endpoint.connect_lazy())
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd);
    let mut queue = Queue {
        batches: VecDeque::new(),
        bytes: 0,
        limit: queue_bytes,
        spill,
    };
    let mut flush_deadline: Option<Instant> = None;
    let mut attempt = 0u32;
    let accept = |msg: Option<Msg>, queue: &mut Queue, deadline: &mut Option<Instant>| match msg {
        Some(Msg::Batch(b)) => queue.push(b, &stats),
        Some(Msg::Flush) | None => {
            deadline.get_or_insert_with(|| Instant::now() + flush_timeout);
        }
    };
    loop {
        while let Ok(msg) = rx.try_recv() {
            accept(Some(msg), &mut queue, &mut flush_deadline);
        }
        if flush_deadline.is_some_and(|d| Instant::now() >= d) {
            let lost = queue.park(&stats);
            if lost > 0 {
                stats.dropped_at_exit.fetch_add(lost, Ordering::Relaxed);
                tracing::warn!(
                    batches = lost,
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
        match client.push_batch(batch).await {
            Ok(ack) => {
                let ack = ack.into_inner();
                attempt = 0;
                ExportStats::bump(&stats.batches_acked);
                if !ack.newly_stored {
                    ExportStats::bump(&stats.batches_duplicate);
                }
                stats
                    .samples_acked
                    .fetch_add(ack.samples, Ordering::Relaxed);
                queue.pop(spilled, &stats);
            }
            Err(status) if is_rejection(&status) => {
                ExportStats::bump(&stats.dropped_rejected);
                tracing::error!("collector rejected a batch: {}", status.message());
                queue.pop(spilled, &stats);
            }
            Err(status) => {
                attempt += 1;
                ExportStats::bump(&stats.send_failures);
                let wait = backoff(attempt);
                tracing::warn!(
                    code = ?status.code(),
                    "sending to the collector failed ({}); retrying in {wait:?}",
                    status.message()
                );
                let sleep = tokio::time::sleep(match flush_deadline {
                    Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
                    None => wait,
                });
                tokio::pin!(sleep);
                // Keep accepting batches while waiting.
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        msg = rx.recv(), if flush_deadline.is_none() => {
                            accept(msg, &mut queue, &mut flush_deadline);
                        }
                    }
                }
            }
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
        let mut q = Queue {
            batches: VecDeque::new(),
            bytes: 0,
            limit: one * 2,
            spill: None,
        };
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
            1,
            "without a spill directory the rest is lost at exit"
        );
    }

    #[test]
    fn overflow_spills_and_replays_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let stats = ExportStats::default();
        let one = batch(1).encoded_len();
        let mut q = Queue {
            batches: VecDeque::new(),
            bytes: 0,
            limit: one * 2,
            spill: Some(Spill::open(dir.path(), 1 << 20).unwrap()),
        };
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
        assert_eq!(q.park(&stats), 0);
        assert_eq!(Spill::open(dir.path(), 1 << 20).unwrap().len(), 1);
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
