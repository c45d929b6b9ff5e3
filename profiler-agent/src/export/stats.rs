//! The exporter's counters, and its one list of ways to lose a batch:
//! [`DropReason`]. The `reason` labels on `/metrics`, the periodic log
//! summary and the exit summary all take their names from it.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

/// Why the export stage dropped a batch (and the samples in it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The memory queue overflowed and there is no spill directory.
    QueueFull,
    /// The collector refused the batch; retrying cannot help.
    RejectedByCollector,
    /// Not acknowledged by the exit deadline, and no spill directory.
    UnsentAtExit,
    /// The memory watchdog emptied the queue and there is no spill directory.
    MemoryLimit,
    /// The spill directory reached its cap: the oldest records go first.
    SpillCap,
    /// A spilled record failed its checksum (its samples are unknown).
    SpillCorrupt,
    /// A batch could not be written to the spill directory.
    SpillWriteError,
}

/// The names one reason goes by.
struct Names {
    /// The `reason` label on `/metrics`.
    label: &'static str,
    /// The summary's name of the batches dropped.
    batches: &'static str,
    /// The summary's name of the samples in them (`None`: unknown).
    samples: Option<&'static str>,
}

impl DropReason {
    /// Every reason, in the order `/metrics` and the summaries list them.
    pub const ALL: [DropReason; 7] = [
        DropReason::QueueFull,
        DropReason::RejectedByCollector,
        DropReason::UnsentAtExit,
        DropReason::MemoryLimit,
        DropReason::SpillCap,
        DropReason::SpillCorrupt,
        DropReason::SpillWriteError,
    ];

    const fn names(self) -> Names {
        const fn n(
            label: &'static str,
            batches: &'static str,
            samples: Option<&'static str>,
        ) -> Names {
            Names {
                label,
                batches,
                samples,
            }
        }
        match self {
            DropReason::QueueFull => n(
                "queue_full",
                "batches_dropped_queue_full",
                Some("samples_dropped_queue_full"),
            ),
            DropReason::RejectedByCollector => n(
                "rejected_by_collector",
                "batches_rejected_by_collector",
                Some("samples_rejected_by_collector"),
            ),
            DropReason::UnsentAtExit => n(
                "unsent_at_exit",
                "batches_unsent_at_exit",
                Some("samples_unsent_at_exit"),
            ),
            DropReason::MemoryLimit => n(
                "memory_limit",
                "batches_dropped_memory_limit",
                Some("samples_dropped_memory_limit"),
            ),
            DropReason::SpillCap => n(
                "spill_cap",
                "batches_dropped_spill_cap",
                Some("samples_dropped_spill_cap"),
            ),
            DropReason::SpillCorrupt => n("spill_corrupt", "batches_dropped_spill_corrupt", None),
            DropReason::SpillWriteError => n(
                "spill_write_error",
                "batches_dropped_spill_write_error",
                Some("samples_dropped_spill_write_error"),
            ),
        }
    }

    /// The `reason` label on `/metrics`.
    pub const fn label(self) -> &'static str {
        self.names().label
    }

    /// Whether the samples of the dropped batches are known (not for
    /// corrupt spill records).
    pub const fn samples_known(self) -> bool {
        self.names().samples.is_some()
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Batches (and the samples in them) dropped for one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropCount {
    /// The `reason` label ([`DropReason::label`]).
    pub reason: &'static str,
    pub kind: DropReason,
    pub batches: u64,
    /// 0 where unknown (see [`Self::samples_known`]).
    pub samples: u64,
    pub samples_known: bool,
}

/// Drop counters, one pair a reason.
#[derive(Debug, Default)]
pub struct Drops {
    batches: [AtomicU64; DropReason::ALL.len()],
    samples: [AtomicU64; DropReason::ALL.len()],
}

impl Drops {
    pub fn add(&self, reason: DropReason, batches: u64, samples: u64) {
        self.batches[reason.index()].fetch_add(batches, Ordering::Relaxed);
        self.samples[reason.index()].fetch_add(samples, Ordering::Relaxed);
    }

    pub fn get(&self, reason: DropReason) -> DropCount {
        DropCount {
            reason: reason.label(),
            kind: reason,
            batches: self.batches[reason.index()].load(Ordering::Relaxed),
            samples: if reason.samples_known() {
                self.samples[reason.index()].load(Ordering::Relaxed)
            } else {
                0
            },
            samples_known: reason.samples_known(),
        }
    }
}

/// Counters of the spill directory (totals since start, and gauges).
#[derive(Debug, Default)]
pub struct SpillStats {
    pub spilled: AtomicU64,
    pub replayed: AtomicU64,
    /// Records on disk now, and their bytes (gauges).
    pub records: AtomicU64,
    pub bytes: AtomicU64,
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
    /// Batches and samples dropped, by reason.
    pub drops: Drops,
    /// What was left undelivered at exit and why, in words.
    undelivered_at_exit: Mutex<Option<String>>,
}

impl ExportStats {
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `batches` dropped for `reason`, holding `samples`.
    pub fn count_drop(&self, reason: DropReason, batches: u64, samples: u64) {
        self.drops.add(reason, batches, samples);
    }

    /// The drops of one reason.
    pub fn dropped(&self, reason: DropReason) -> DropCount {
        self.drops.get(reason)
    }

    /// Every drop reason with its batches and samples (zeros included):
    /// the `reason` labels on `/metrics`.
    pub fn drops(&self) -> [DropCount; DropReason::ALL.len()] {
        DropReason::ALL.map(|r| self.drops.get(r))
    }

    /// Batch drops (`batches_dropped_queue_full`, ...) and the samples in
    /// them (`samples_dropped_queue_full`, ...), the non-zero ones: the
    /// exit summary's names.
    pub fn nonzero_drops(&self) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        for reason in DropReason::ALL {
            let names = reason.names();
            let d = self.drops.get(reason);
            if d.batches > 0 {
                out.push((names.batches, d.batches));
            }
            if let Some(samples) = names.samples.filter(|_| d.samples > 0) {
                out.push((samples, d.samples));
            }
        }
        out
    }

    /// Samples in all dropped batches.
    pub fn samples_dropped(&self) -> u64 {
        self.drops().iter().map(|d| d.samples).sum()
    }

    pub(super) fn set_undelivered_at_exit(&self, note: String) {
        *self
            .undelivered_at_exit
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(note);
    }

    /// Why batches were left undelivered at exit, and how many (as the
    /// exit warning says it); `None` when everything was acknowledged.
    pub fn undelivered_at_exit(&self) -> Option<String> {
        self.undelivered_at_exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_names() {
        let mut labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "queue_full",
                "rejected_by_collector",
                "unsent_at_exit",
                "memory_limit",
                "spill_cap",
                "spill_corrupt",
                "spill_write_error"
            ]
        );
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}: ALL is in declaration order");
        }
    }

    #[test]
    fn the_summary_names_each_reason_apart() {
        let stats = ExportStats::default();
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            stats.count_drop(reason, 1 + i as u64, 10);
        }
        assert_eq!(
            stats.nonzero_drops(),
            vec![
                ("batches_dropped_queue_full", 1),
                ("samples_dropped_queue_full", 10),
                ("batches_rejected_by_collector", 2),
                ("samples_rejected_by_collector", 10),
                ("batches_unsent_at_exit", 3),
                ("samples_unsent_at_exit", 10),
                ("batches_dropped_memory_limit", 4),
                ("samples_dropped_memory_limit", 10),
                ("batches_dropped_spill_cap", 5),
                ("samples_dropped_spill_cap", 10),
                ("batches_dropped_spill_corrupt", 6),
                ("batches_dropped_spill_write_error", 7),
                ("samples_dropped_spill_write_error", 10),
            ]
        );
        let d = stats.dropped(DropReason::SpillWriteError);
        assert_eq!(
            (d.reason, d.batches, d.samples),
            ("spill_write_error", 7, 10)
        );
        assert!(!stats.dropped(DropReason::SpillCorrupt).samples_known);
    }
}
