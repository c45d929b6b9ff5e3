//! The queue of unacknowledged batches and its spill policy: batches wait
//! in memory up to a bound in bytes; past it the oldest go to the spill
//! directory when there is one, else are dropped and counted. At exit and
//! at the memory watchdog's request, memory is emptied the same way.
use std::{collections::VecDeque, sync::atomic::Ordering};

use profiler_proto::v1::Batch;
use prost::Message;

use super::{
    batch::batch_samples,
    spill::Spill,
    stats::{DropReason, ExportStats},
};

/// Unacknowledged batches: in memory up to `limit` bytes; past that the
/// oldest go to the spill directory if there is one, else are dropped.
/// Spilled batches are always older than those in memory.
pub(super) struct Queue {
    batches: VecDeque<(Batch, usize)>,
    bytes: usize,
    limit: usize,
    spill: Option<Spill>,
    /// Batches have overflowed memory since the queue was last empty (logs
    /// say so once, not for every batch).
    overflowing: bool,
}

impl Queue {
    pub(super) fn new(limit: usize, spill: Option<Spill>) -> Self {
        Self {
            batches: VecDeque::new(),
            bytes: 0,
            limit,
            spill,
            overflowing: false,
        }
    }

    /// Updates the queue gauges.
    pub(super) fn publish(&self, stats: &ExportStats) {
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

    pub(super) fn push(&mut self, batch: Batch, stats: &ExportStats) {
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
            Some(spill) => spill.push(&batch, stats),
            None => {
                stats.count_drop(DropReason::QueueFull, 1, batch_samples(&batch));
                tracing::debug!(
                    sequence = batch.sequence,
                    "export queue full: dropped the oldest batch"
                );
            }
        }
    }

    /// The memory watchdog's request: every batch in memory goes to the
    /// spill directory; without one, the oldest half (in bytes) is dropped.
    pub(super) fn shed(&mut self, stats: &ExportStats) {
        if self.spill.is_some() {
            let parked = self.batches.len() as u64;
            while let Some((batch, size)) = self.batches.pop_front() {
                self.bytes -= size;
                if let Some(spill) = &mut self.spill {
                    spill.push(&batch, stats);
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
        stats.count_drop(DropReason::MemoryLimit, batches, samples);
        tracing::warn!(
            batches,
            samples,
            "memory limit: dropped the oldest half of the export queue"
        );
    }

    pub(super) fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.spill.as_ref().is_none_or(Spill::is_empty)
    }

    /// The oldest batch, and whether it comes from the spill directory.
    pub(super) fn front(&mut self, stats: &ExportStats) -> Option<(Batch, bool)> {
        if let Some(spill) = &mut self.spill {
            if let Some(batch) = spill.front(stats) {
                return Some((batch, true));
            }
        }
        self.batches.front().map(|(b, _)| (b.clone(), false))
    }

    pub(super) fn pop(&mut self, spilled: bool, stats: &ExportStats) {
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
    /// samples), for the caller to count under its reason.
    pub(super) fn park(&mut self, stats: &ExportStats) -> (u64, u64) {
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

#[cfg(test)]
mod tests {
    use profiler_proto::v1::Sample;

    use super::*;

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
        assert_eq!(stats.dropped(DropReason::QueueFull).batches, 1);
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
        assert_eq!(stats.dropped(DropReason::MemoryLimit).batches, 2);
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
}
