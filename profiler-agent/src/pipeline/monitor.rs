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
    metrics::{AgentMetrics, LogSummary},
    symbolize::Symbolize,
};

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
        if let Some(stats) = source.unwind_stats() {
            self.metrics.set_unwind(stats);
        }
        if let Some(pauses) = source.off_cpu_pauses() {
            self.metrics.set_off_cpu_pauses(pauses);
        }
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
        self.metrics.set_symbolizer(symbolizer.stats());
        self.summary.tick(&self.metrics);
    }
}
