//! The short report printed at the end of a recording.
use std::{fmt::Write as _, path::PathBuf};

use crate::{
    loss::{DrainLoss, KernelLoss, ProcessLoss, SymbolizerDegrade},
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
    let mut drops = KernelLoss::nonzero(&recording.counters);
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

/// "User stacks: N of M reached the outermost frame (P %); stopped early: …"
pub fn user_stack_quality(recording: &Recording) -> Option<String> {
    let ends = &recording.user_stack_ends;
    let total: u64 = ends.values().sum();
    if total == 0 {
        return None;
    }
    let complete: u64 = ends
        .iter()
        .filter(|(e, _)| e.is_complete())
        .map(|(_, n)| n)
        .sum();
    let early: Vec<String> = ends
        .iter()
        .filter(|(e, n)| !e.is_complete() && **n > 0)
        .map(|(e, n)| format!("{} {n}", e.name()))
        .collect();
    let mut line = format!(
        "User stacks: {complete} of {total} reached the outermost frame ({:.1} %)",
        100.0 * complete as f64 / total as f64
    );
    if !early.is_empty() {
        line.push_str(&format!("; stopped early: {}", early.join(", ")));
    }
    line.push('.');
    Some(line)
}

/// "Off-CPU: 12.3 s of waiting recorded (N switches timed of M seen; …)"
pub fn off_cpu_line(recording: &Recording) -> Option<String> {
    use profiler_common::Counter;
    let profile = recording
        .other_profiles
        .get(&crate::sample_type::SampleType::OffCpu);
    let k = &recording.counters;
    let seen = k.get(Counter::OffCpuSwitches);
    if profile.is_none() && seen == 0 {
        return None;
    }
    // `run` keeps no whole-run profile: its windows went to the collector.
    let waited = profile.map_or(String::new(), |p| {
        format!("{:.2} s of waiting recorded, ", p.total() as f64 / 1e9)
    });
    Some(format!(
        "Off-CPU: {waited}{} waits timed of {} context switches \
         ({} shorter than the threshold, {} not sampled, {} of kernel threads).",
        k.get(Counter::OffCpuRecorded),
        seen,
        k.get(Counter::OffCpuShort),
        k.get(Counter::OffCpuNotSampled),
        k.get(Counter::OffCpuKernelThreads),
    ))
}

/// "Python: N samples walked (C cut, T on threads without a thread state);
/// U processes run a CPython whose frames are not read (see the log)."
pub fn python_line(recording: &Recording) -> Option<String> {
    use profiler_common::Counter;
    let k = &recording.counters;
    let walked = k.get(Counter::PythonStacks);
    let unsupported = crate::python::unsupported_processes();
    if walked == 0 && unsupported == 0 {
        return None;
    }
    let mut line = format!(
        "Python: {walked} samples with Python frames walked ({} cut, {} of threads without a \
         Python thread state)",
        k.get(Counter::PythonCut),
        k.get(Counter::PythonNoThreadState),
    );
    if unsupported > 0 {
        line.push_str(&format!(
            "; {unsupported} processes run a CPython whose frames are not read (see the log)"
        ));
    }
    line.push('.');
    Some(line)
}

/// Renders the summary: samples, top functions, non-zero drops, outputs.
pub fn render(recording: &Recording, outputs: &Outputs, top: usize) -> String {
    let mut s = String::new();
    let total = recording.samples;
    let secs = recording.duration.as_secs_f64();
    // Without a whole-run profile, only each window's stacks were known.
    let stacks = if recording.profile_kept {
        format!("{} distinct stacks", recording.profile.len())
    } else {
        format!(
            "up to {} distinct stacks per window",
            recording.max_window_stacks
        )
    };
    let _ = writeln!(
        s,
        "Recorded {total} samples in {secs:.1} s at {} Hz on {} CPUs ({stacks}, {} processes seen).",
        recording.frequency,
        recording.cpus,
        recording.processes_seen,
    );
    if let Some(line) = user_stack_quality(recording) {
        let _ = writeln!(s, "{line}");
    }
    if let Some(line) = python_line(recording) {
        let _ = writeln!(s, "{line}");
    }
    if let Some(u) = &recording.unwind {
        let mut line = format!(
            "Unwind tables: {} loaded ({} of {} rows), {} built in {:.0} ms, {} evicted",
            u.tables_loaded,
            u.rows_used,
            u.rows_capacity,
            u.tables_built,
            u.build_time.as_secs_f64() * 1e3,
            u.tables_evicted,
        );
        let failures: Vec<String> = u
            .build_failures
            .iter()
            .map(|(why, n)| format!("{why} {n}"))
            .collect();
        if !failures.is_empty() {
            line.push_str(&format!(
                "; binaries without a table: {}",
                failures.join(", ")
            ));
        }
        if u.tables_not_fitting > 0 {
            line.push_str(&format!("; {} did not fit", u.tables_not_fitting));
        }
        let _ = writeln!(s, "{line}.");
    }
    if let Some(line) = off_cpu_line(recording) {
        let _ = writeln!(s, "{line}");
    }
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
        if let Some(note) = e.undelivered_at_exit() {
            let _ = writeln!(s, "Undelivered: {note}.");
        }
    }
    if let Some(e) = &recording.otlp_export {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let drops: Vec<String> = e
            .nonzero_drops()
            .into_iter()
            .map(|(name, n)| format!("{name}: {n}"))
            .collect();
        let _ = writeln!(
            s,
            "OTLP endpoint: {} profiles requests sent, {} accepted ({} samples), {} send failures retried; dropped: {}.",
            load(&e.batches_queued),
            load(&e.batches_acked),
            load(&e.samples_acked),
            load(&e.send_failures),
            if drops.is_empty() { "none".to_string() } else { drops.join(", ") },
        );
        if let Some(note) = e.undelivered_at_exit() {
            let _ = writeln!(s, "Undelivered (OTLP): {note}.");
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn recording(profile_kept: bool) -> Recording {
        let mut profile = crate::fold::FoldedProfile::default();
        if profile_kept {
            profile.add("app", &["main".into(), "hot".into()], 30);
            profile.add("app", &["main".into(), "cold".into()], 10);
        }
        Recording {
            profile,
            other_profiles: Default::default(),
            profile_kept,
            samples: 40,
            counters: Default::default(),
            process_stats: Default::default(),
            symbolizer_stats: Default::default(),
            missing_stacks: 0,
            truncated_stacks: 0,
            user_stack_ends: Default::default(),
            unwind: None,
            max_window_stacks: 7,
            duration: std::time::Duration::from_secs(10),
            frequency: 19,
            cpus: 2,
            processes_seen: 3,
            program_info: None,
            host: "box".into(),
            export: None,
            otlp_export: None,
        }
    }

    #[test]
    fn the_whole_run_profile_gives_distinct_stacks_and_top_functions() {
        let text = render(&recording(true), &Outputs::default(), 10);
        assert!(
            text.starts_with(
                "Recorded 40 samples in 10.0 s at 19 Hz on 2 CPUs (2 distinct stacks, 3 processes seen).\n"
            ),
            "{text}"
        );
        assert!(text.contains("   75.0%       30  hot"), "{text}");
    }

    #[test]
    fn without_a_profile_the_stacks_seen_per_window_are_given() {
        let text = render(&recording(false), &Outputs::default(), 10);
        assert!(
            text.starts_with(
                "Recorded 40 samples in 10.0 s at 19 Hz on 2 CPUs (up to 7 distinct stacks per window, 3 processes seen).\n"
            ),
            "{text}"
        );
        assert!(!text.contains("0 distinct stacks"), "{text}");
        assert!(!text.contains("Top functions"), "{text}");
    }
}
