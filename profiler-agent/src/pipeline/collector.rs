//! The collector sink: each window of each sample type becomes one batch
//! handed to the [`Exporter`] (queue, spill directory, upload with retries).
//! The `cpu` window is sent even when empty, so the collector learns the
//! agent is alive.
use std::sync::Arc;

use super::sink::{LabelledWindow, RunEnd, Sink};
use crate::{
    export::{BatchBuilder, ExportStats, Exporter},
    Result,
};

/// Ships windows to a collector.
pub struct CollectorSink {
    exporter: Option<Exporter>,
    stats: Arc<ExportStats>,
}

impl CollectorSink {
    pub fn new(exporter: Exporter) -> Self {
        Self {
            stats: exporter.stats().clone(),
            exporter: Some(exporter),
        }
    }

    /// What was shipped, live.
    pub fn stats(&self) -> &Arc<ExportStats> {
        &self.stats
    }
}

impl Sink for CollectorSink {
    fn window(&mut self, window: &LabelledWindow) {
        let Some(exporter) = self.exporter.as_mut() else {
            return;
        };
        let mut batch = BatchBuilder::for_type(window.sample_type);
        for sample in &window.samples {
            batch.add(
                &sample.labels.as_pairs(),
                &sample.full_stack(),
                sample.value,
            );
        }
        let size = exporter.send(batch, window.start, window.end, window.frequency_hz);
        tracing::debug!(
            bytes = size,
            sample_type = %window.sample_type,
            total = window.total(),
            "window queued for the collector"
        );
    }

    /// Waits (at most the flush timeout) for the queue to be acknowledged;
    /// what is left is counted as dropped at exit.
    fn finish(&mut self, _end: &RunEnd) -> Result<()> {
        if let Some(exporter) = self.exporter.take() {
            exporter.finish();
        }
        Ok(())
    }

    fn shed_memory(&mut self) {
        if let Some(exporter) = &self.exporter {
            exporter.park_queue(std::time::Duration::from_secs(2));
        }
    }
}
