//! The short report printed at the end of a recording.
use std::{fmt::Write as _, path::PathBuf};

use crate::{
    loss::{DrainLoss, ProcessLoss, SymbolizerDegrade},
    record::Recording,
};

/// Output files of a recording, for the summary.
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    pub svg: Option<PathBuf>,
    pub folded: Option<PathBuf>,
}

/// Every drop counter that is not zero, kernel and userspace, by the
/// summary name of its reason.
pub fn nonzero_drops(recording: &Recording) -> Vec<(&'static str, u64)> {
    let mut drops = recording.counters.nonzero_drops();
    let p = &recording.process_stats;
    let s = &recording.symbolizer_stats;
    let drain = [
        (DrainLoss::StackMissingAtDrain, recording.missing_stacks),
        (DrainLoss::StackTruncated, recording.truncated_stacks),
    ];
    let rest = drain
        .into_iter()
        .map(|(r, v)| (r.summary_name(), v))
        .chain(ProcessLoss::ALL.iter().map(|r| (r.summary_name(), p[*r])))
        .chain(
            SymbolizerDegrade::ALL
                .iter()
                .map(|r| (r.summary_name(), s[*r])),
        );
    drops.extend(rest.filter(|(_, v)| *v > 0));
    if let Some(export) = &recording.export {
        drops.extend(export.nonzero_drops());
    }
    drops
}

/// Renders the summary: samples, top functions, non-zero drops, outputs.
pub fn render(recording: &Recording, outputs: &Outputs, top: usize) -> String {
    let mut s = String::new();
    let total = recording.samples;
    let secs = recording.duration.as_secs_f64();
    let _ = writeln!(
        s,
        "Recorded {total} samples in {secs:.1} s at {} Hz on {} CPUs ({} distinct stacks, {} processes seen).",
        recording.frequency,
        recording.cpus,
        recording.profile.len(),
        recording.processes_seen,
    );
    if recording.profile.total() > 0 {
        let _ = writeln!(s, "Top functions by self samples:");
        for (name, count) in recording.profile.top_self(top) {
            let pct = 100.0 * count as f64 / total as f64;
            let _ = writeln!(s, "  {pct:5.1}%  {count:>7}  {name}");
        }
    }
    if let Some(e) = &recording.export {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let _ = writeln!(
            s,
            "Collector: {} batches sent, {} acknowledged ({} re-sends already stored), {} samples stored, {} send failures retried, {} pushed back; largest batch {} bytes ({} with zstd).",
            load(&e.batches_queued),
            load(&e.batches_acked),
            load(&e.batches_duplicate),
            load(&e.samples_acked),
            load(&e.send_failures),
            load(&e.pushed_back),
            load(&e.largest_batch_bytes),
            load(&e.largest_batch_wire_bytes),
        );
    }
    let drops = nonzero_drops(recording);
    if drops.is_empty() {
        let _ = writeln!(s, "Drops: none.");
    } else {
        let _ = writeln!(s, "Drops (samples lost or degraded):");
        for (name, value) in drops {
            let _ = writeln!(s, "  {name}: {value}");
        }
    }
    if let Some(path) = &outputs.folded {
        let _ = writeln!(s, "Folded stacks: {}", path.display());
    }
    if let Some(path) = &outputs.svg {
        let _ = writeln!(s, "Flame graph:   {}", path.display());
    }
    s
}
