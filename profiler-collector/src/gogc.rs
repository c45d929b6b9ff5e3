//! Go's GC tax: for each Go process of a CPU profile, the share of its CPU
//! spent marking (background workers, idle marking apart), allocating,
//! assisting, sweeping and in write barriers, flagged against thresholds,
//! with the call sites that allocate the most.
//!
//! Shares are inclusive, as `go tool pprof -top -cum` shows them: a sample
//! counts for every figure whose function is on its stack, so figures
//! overlap (an assist or a sweep done while allocating is also
//! allocation). Go processes are those the agent labelled `runtime=go`
//! from their build info; the caller selects them.
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::model::Profile;

/// `runtime.mallocgc` above this share of a process's CPU is flagged.
pub const ALLOC_THRESHOLD: f64 = 0.15;
/// `runtime.gcAssistAlloc` above this share of a process's CPU is flagged.
pub const ASSIST_THRESHOLD: f64 = 0.05;

/// One figure: samples and their share of the process's CPU samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Figure {
    pub samples: u64,
    pub share: f64,
}

/// The GC figures of one Go process.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GoProcessGc {
    /// The process name (the stacks' root frame).
    pub process: String,
    /// All its CPU samples.
    pub samples: u64,
    /// Everything the collector does: marking, assists, sweeping, write
    /// barriers, and the start and end of a cycle.
    pub gc_total: Figure,
    /// The background mark workers (`runtime.gcBgMarkWorker`), idle
    /// marking included.
    pub mark_background: Figure,
    /// Of which idle marking (`runtime.gcDrainMarkWorkerIdle`): CPU that
    /// had nothing else to run.
    pub mark_idle: Figure,
    /// Mark assists (`runtime.gcAssistAlloc`): goroutines made to mark
    /// because they allocate faster than the workers mark.
    pub assist: Figure,
    /// Allocation (`runtime.mallocgc`), assists included: they happen
    /// only inside it.
    pub alloc: Figure,
    /// Sweeping (`runtime.bgsweep`, `runtime.sweepone`, span sweeps).
    pub sweep: Figure,
    /// Write barriers (`runtime.gcWriteBarrier*`, `runtime.wbBufFlush*`,
    /// bulk barriers).
    pub write_barrier: Figure,
    /// Figures over their thresholds.
    pub flags: Vec<Flag>,
    /// The call sites that allocate the most: the innermost function
    /// outside the runtime that called into `runtime.mallocgc`.
    pub alloc_sites: Vec<AllocSite>,
}

/// A figure over its threshold, with what it usually means.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Flag {
    pub figure: &'static str,
    pub share: f64,
    pub threshold: f64,
    pub advice: &'static str,
}

/// A call site and the CPU it spent allocating.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AllocSite {
    pub function: String,
    pub samples: u64,
    /// Of the process's CPU samples.
    pub share: f64,
}

/// A frame's function name: inlined frames (`_[i]`) count as their
/// function.
fn function(frame: &str) -> &str {
    frame.strip_suffix("_[i]").unwrap_or(frame)
}

/// `name` or one of its closures (`name.func2`): the closures run on the
/// system stack, where a walk ends at `runtime.systemstack` without the
/// function that called it.
fn is_or_closure_of(f: &str, name: &str) -> bool {
    f.strip_prefix(name)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(".func"))
}

fn is_mark_worker(f: &str) -> bool {
    is_or_closure_of(f, "runtime.gcBgMarkWorker") || f.starts_with("runtime.gcDrainMarkWorker")
}

fn is_idle_mark(f: &str) -> bool {
    f == "runtime.gcDrainMarkWorkerIdle"
}

fn is_assist(f: &str) -> bool {
    is_or_closure_of(f, "runtime.gcAssistAlloc") || f == "runtime.gcAssistAlloc1"
}

/// `runtime.mallocgc`, or the heap's span allocation it calls, which runs
/// on the system stack (`runtime.(*mheap).alloc.func1`), where the walk
/// ends above it.
fn is_alloc(f: &str) -> bool {
    f == "runtime.mallocgc" || is_or_closure_of(f, "runtime.(*mheap).alloc")
}

fn is_sweep(f: &str) -> bool {
    matches!(
        f,
        "runtime.bgsweep"
            | "runtime.sweepone"
            | "runtime.(*sweepLocked).sweep"
            | "runtime.(*mspan).sweep"
            | "runtime.sweepLocked.sweep"
    )
}

fn is_write_barrier(f: &str) -> bool {
    f.starts_with("runtime.gcWriteBarrier")
        || f.starts_with("runtime.wbBufFlush")
        || f == "runtime.bulkBarrierPreWrite"
        || f == "runtime.bulkBarrierPreWriteSrcOnly"
}

/// The rest of a GC cycle's own work.
fn is_cycle(f: &str) -> bool {
    matches!(
        f,
        "runtime.gcStart" | "runtime.gcMarkDone" | "runtime.gcMarkTermination" | "runtime.gcSweep"
    )
}

#[derive(Default)]
struct Tally {
    samples: u64,
    gc_total: u64,
    mark_background: u64,
    mark_idle: u64,
    assist: u64,
    alloc: u64,
    sweep: u64,
    write_barrier: u64,
    sites: HashMap<String, u64>,
}

/// The GC figures of every process of `profile` (a CPU profile of Go
/// processes), most samples first, with `n` allocation sites each.
pub fn go_gc(profile: &Profile, n: usize) -> Vec<GoProcessGc> {
    let mut by_process: BTreeMap<&str, Tally> = BTreeMap::new();
    for (stack, &value) in &profile.stacks {
        let mut frames = stack.split(';');
        let Some(process) = frames.next() else {
            continue;
        };
        let frames: Vec<&str> = frames.map(function).collect();
        let t = by_process.entry(process).or_default();
        t.samples = t.samples.saturating_add(value);
        let has = |p: fn(&str) -> bool| frames.iter().any(|f| p(f));
        let add = |x: &mut u64, yes: bool| {
            if yes {
                *x = x.saturating_add(value);
            }
        };
        let (mark, idle, assist) = (has(is_mark_worker), has(is_idle_mark), has(is_assist));
        let (sweep, barrier, cycle) = (has(is_sweep), has(is_write_barrier), has(is_cycle));
        add(&mut t.mark_background, mark);
        add(&mut t.mark_idle, idle);
        add(&mut t.assist, assist);
        add(&mut t.sweep, sweep);
        add(&mut t.write_barrier, barrier);
        add(
            &mut t.gc_total,
            mark || idle || assist || sweep || barrier || cycle,
        );
        // Assists happen only inside mallocgc (its stack may end at
        // runtime.systemstack above the assist).
        add(&mut t.alloc, assist || frames.iter().any(|f| is_alloc(f)));
        if let Some(at) = frames.iter().position(|f| *f == "runtime.mallocgc") {
            let site = frames[..at]
                .iter()
                .rev()
                .find(|f| !f.starts_with("runtime.") && !f.starts_with('['))
                .copied()
                .unwrap_or("runtime");
            let entry = t.sites.entry(site.to_string()).or_default();
            *entry = entry.saturating_add(value);
        }
    }
    let mut out: Vec<GoProcessGc> = by_process
        .into_iter()
        .map(|(process, t)| {
            let figure = |samples: u64| Figure {
                samples,
                share: if t.samples == 0 {
                    0.0
                } else {
                    samples as f64 / t.samples as f64
                },
            };
            let alloc = figure(t.alloc);
            let assist = figure(t.assist);
            let mut flags = Vec::new();
            if alloc.share > ALLOC_THRESHOLD {
                flags.push(Flag {
                    figure: "alloc",
                    share: alloc.share,
                    threshold: ALLOC_THRESHOLD,
                    advice: "allocation costs more CPU than it should: allocate less at the \
                             top sites (reuse buffers, preallocate slices and maps, sync.Pool)",
                });
            }
            if assist.share > ASSIST_THRESHOLD {
                flags.push(Flag {
                    figure: "assist",
                    share: assist.share,
                    threshold: ASSIST_THRESHOLD,
                    advice: "goroutines are made to mark because they allocate faster than \
                             the background workers mark: allocate less, or give the heap \
                             more room (GOGC, GOMEMLIMIT)",
                });
            }
            let mut sites: Vec<AllocSite> = t
                .sites
                .iter()
                .map(|(function, &samples)| AllocSite {
                    function: function.clone(),
                    samples,
                    share: figure(samples).share,
                })
                .collect();
            sites.sort_by(|a, b| {
                b.samples
                    .cmp(&a.samples)
                    .then_with(|| a.function.cmp(&b.function))
            });
            sites.truncate(n);
            GoProcessGc {
                process: process.to_string(),
                samples: t.samples,
                gc_total: figure(t.gc_total),
                mark_background: figure(t.mark_background),
                mark_idle: figure(t.mark_idle),
                assist,
                alloc,
                sweep: figure(t.sweep),
                write_barrier: figure(t.write_barrier),
                flags,
                alloc_sites: sites,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.samples
            .cmp(&a.samples)
            .then_with(|| a.process.cmp(&b.process))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(stacks: &[(&str, u64)]) -> Profile {
        Profile::of(stacks.iter().copied())
    }

    #[test]
    fn shares_are_inclusive_per_process_with_idle_marking_apart() {
        let p = profile(&[
            ("api;runtime.goexit;main.main;main.work", 50),
            (
                "api;runtime.goexit;main.main;main.build;runtime.makeslice;runtime.mallocgc;runtime.memclrNoHeapPointers",
                20,
            ),
            (
                "api;runtime.goexit;main.main;main.build;runtime.newobject;runtime.mallocgc;runtime.gcAssistAlloc;runtime.systemstack;runtime.gcAssistAlloc1;runtime.gcDrainN",
                10,
            ),
            (
                "api;runtime.goexit;runtime.gcBgMarkWorker;runtime.systemstack;runtime.gcDrainMarkWorkerIdle;runtime.gcDrain;runtime.scanobject",
                8,
            ),
            (
                "api;runtime.goexit;runtime.gcBgMarkWorker;runtime.systemstack;runtime.gcDrainMarkWorkerDedicated;runtime.gcDrain",
                6,
            ),
            ("api;runtime.goexit;runtime.bgsweep;runtime.sweepone", 4),
            ("api;runtime.goexit;main.link;runtime.gcWriteBarrier2_[i];runtime.wbBufFlush", 2),
            ("other;runtime.goexit;main.main", 7),
        ]);
        let gc = go_gc(&p, 5);
        assert_eq!(gc.len(), 2);
        let api = &gc[0];
        assert_eq!(api.process, "api");
        assert_eq!(api.samples, 100);
        assert_eq!(api.alloc.samples, 30, "mallocgc with the assist under it");
        assert_eq!(api.assist.samples, 10);
        assert_eq!(api.mark_background.samples, 14);
        assert_eq!(api.mark_idle.samples, 8);
        assert_eq!(api.sweep.samples, 4);
        assert_eq!(api.write_barrier.samples, 2);
        assert_eq!(api.gc_total.samples, 10 + 14 + 4 + 2);
        assert!((api.alloc.share - 0.30).abs() < 1e-9);
        let flagged: Vec<&str> = api.flags.iter().map(|f| f.figure).collect();
        assert_eq!(flagged, ["alloc", "assist"]);
        assert_eq!(api.alloc_sites[0].function, "main.build");
        assert_eq!(api.alloc_sites[0].samples, 30);
        assert_eq!(gc[1].process, "other");
        assert!(gc[1].flags.is_empty());
        assert_eq!(gc[1].alloc.samples, 0);
    }

    #[test]
    fn stacks_that_end_at_the_system_stack_still_count() {
        // The walk ends at runtime.systemstack: the closure names the work,
        // and an assist is allocation even without mallocgc above it.
        let p = profile(&[
            ("api;runtime.systemstack;runtime.gcBgMarkWorker.func2;runtime.gcDrain", 4),
            (
                "api;runtime.systemstack;runtime.gcAssistAlloc.func1;runtime.gcAssistAlloc1;runtime.gcDrainN",
                3,
            ),
            ("api;runtime.goexit;main.main", 3),
            ("api;runtime.gcBgMarkWorkerX", 0),
            ("api;runtime.systemstack;runtime.(*mheap).alloc.func1;runtime.(*mheap).allocSpan", 2),
        ]);
        let api = &go_gc(&p, 5)[0];
        assert_eq!(api.mark_background.samples, 4);
        assert_eq!(api.assist.samples, 3);
        assert_eq!(api.alloc.samples, 5, "assists and span allocation");
        assert_eq!(api.gc_total.samples, 7);
        assert!(!is_mark_worker("runtime.gcBgMarkWorkerX"));
    }

    #[test]
    fn an_allocation_without_a_caller_outside_the_runtime_is_the_runtimes() {
        let p = profile(&[("api;runtime.mstart;runtime.malg;runtime.mallocgc", 3)]);
        let gc = go_gc(&p, 5);
        assert_eq!(gc[0].alloc_sites[0].function, "runtime");
        assert_eq!(go_gc(&p, 0)[0].alloc_sites.len(), 0);
    }
}
