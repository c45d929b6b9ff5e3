//! Once a window: the figures `/metrics` shows (kernel counters, process
//! cache, pods, symbolizer), the memory watchdog acting on the stages, and
//! the periodic log summary.
use std::sync::{atomic::Ordering, Arc};

use super::{
    label::{PodDirectory, ProcessTable},
    sink::Sink,
    source::SampleSource,
};
use crate::{
    memory::{SelfWatchdog, Shedder},
    metrics::{AgentMetrics, LogSummary, SymbolizerCounter},
    symbolize::{Symbolize, SymbolizerStats},
};

/// The symbolizer's counters as `/metrics` shows them
/// (`profiler_agent_symbolizer_NAME`).
pub fn symbolizer_metrics(s: &SymbolizerStats) -> Vec<SymbolizerCounter> {
    vec![
        (
            "lookups_total",
            "Addresses looked up with blazesym.",
            s.lookups,
        ),
        (
            "cache_hits_total",
            "Addresses named from the cache.",
            s.cache_hits,
        ),
        (
            "unnamed_frames_total",
            "Frames shown as module+0xOFFSET or [unknown].",
            s.unnamed_frames,
        ),
        (
            "cache_resets_total",
            "Times the name cache was emptied to stay within its bound.",
            s.cache_resets,
        ),
        // The symbolization budget (symbolize.rs).
        (
            "windows_over_budget_total",
            "Windows whose symbolization time budget ran out.",
            s.windows_over_budget,
        ),
        (
            "frames_over_budget_total",
            "Frames left unnamed because the window's budget was spent.",
            s.frames_over_budget,
        ),
        (
            "dwarf_skipped_large_total",
            "Binaries named without DWARF because of their size.",
            s.dwarf_skipped_large,
        ),
        (
            "binaries_unreadable_total",
            "Binaries blazesym could not read.",
            s.binaries_unreadable,
        ),
        ("panics_total", "Panics inside blazesym, caught.", s.panics),
    ]
}

/// What the memory watchdog acts on: the sinks' queues, the symbolizer's
/// caches.
struct StageShedder<'a, 'b> {
    sinks: &'a mut [&'b mut dyn Sink],
    symbolizer: &'a mut dyn Symbolize,
}

impl Shedder for StageShedder<'_, '_> {
    fn park_queue(&mut self) {
        for sink in self.sinks.iter_mut() {
            sink.shed_memory();
        }
    }

    fn evict_symbolizer(&mut self) {
        self.symbolizer.evict_caches();
    }
}

/// Publishes the figures of each window and runs the watchdog.
pub(super) struct Monitor {
    pub metrics: Arc<AgentMetrics>,
    pub watchdog: Option<SelfWatchdog>,
    pub summary: LogSummary,
}

impl Monitor {
    pub fn window(
        &mut self,
        source: &dyn SampleSource,
        processes: &dyn ProcessTable,
        symbolizer: &mut dyn Symbolize,
        pods: Option<&dyn PodDirectory>,
        sinks: &mut [&mut dyn Sink],
    ) {
        match source.counters() {
            Ok(counters) => self.metrics.set_kernel(counters),
            Err(e) => tracing::debug!("reading the kernel counters: {e}"),
        }
        self.metrics.set_processes(processes.gauges());
        if let Some(pods) = pods {
            self.metrics
                .pods
                .store(pods.pods_known() as u64, Ordering::Relaxed);
        }
        if let Some(watchdog) = &mut self.watchdog {
            watchdog.check(&mut StageShedder {
                sinks,
                symbolizer: &mut *symbolizer,
            });
        }
        self.metrics
            .set_symbolizer(symbolizer_metrics(&symbolizer.stats()));
        self.summary.tick(&self.metrics);
    }
}
