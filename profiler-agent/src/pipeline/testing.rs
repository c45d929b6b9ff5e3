//! In-memory stages, so the pipeline runs without root or a kernel: a
//! scripted source, a symbolizer that names addresses from a table, a
//! process table, a pod directory and a sink that keeps what it gets.
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use super::{
    label::{PodDirectory, ProcessFacts, ProcessTable},
    sink::{LabelledWindow, RunEnd, Sink},
    source::{SampleSource, SourceInfo},
};
use crate::{
    drain::{Counters, RawWindow},
    kube::ContainerMeta,
    metrics::ProcessGauges,
    process::Swept,
    symbolize::{kernel_frame, Symbolize, SymbolizerStats, UNKNOWN_FRAME},
    Error, Result,
};

/// What was asked of a [`FakeSource`], in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceCall {
    Drain,
    ForgetPids(Vec<u32>),
    Stop,
    DrainAll,
}

/// A source that yields scripted windows, one per drain (then empty ones),
/// and a last window at the final drain.
#[derive(Default)]
pub struct FakeSource {
    windows: VecDeque<RawWindow>,
    last: RawWindow,
    counters: Counters,
    /// Set once the scripted windows are drained: ends the run.
    stop_when_done: Option<Arc<AtomicBool>>,
    calls: Arc<Mutex<Vec<SourceCall>>>,
    stopped: bool,
    cpus: usize,
}

impl FakeSource {
    /// Drains yield `windows` in order, then empty windows; the final drain
    /// (after stop) yields `last`. `counters` are what the source reports.
    pub fn new(windows: Vec<RawWindow>, last: RawWindow, counters: Counters) -> Self {
        Self {
            windows: windows.into(),
            last,
            counters,
            cpus: 2,
            ..Self::default()
        }
    }

    /// Sets `stop` once every scripted window has been drained.
    pub fn stop_when_done(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop_when_done = Some(stop);
        self
    }

    /// The log of calls, shared.
    pub fn calls(&self) -> Arc<Mutex<Vec<SourceCall>>> {
        self.calls.clone()
    }

    fn log(&self, call: SourceCall) {
        self.calls.lock().unwrap().push(call);
    }
}

impl SampleSource for FakeSource {
    fn drain(&mut self) -> Result<RawWindow> {
        self.log(SourceCall::Drain);
        let window = self.windows.pop_front().unwrap_or_default();
        if self.windows.is_empty() {
            if let Some(stop) = &self.stop_when_done {
                stop.store(true, Ordering::Relaxed);
            }
        }
        Ok(window)
    }

    fn counters(&self) -> Result<Counters> {
        Ok(self.counters.clone())
    }

    fn forget_pids(&mut self, pids: &[u32]) {
        if !pids.is_empty() {
            self.log(SourceCall::ForgetPids(pids.to_vec()));
        }
    }

    fn stop(&mut self) -> Result<()> {
        self.log(SourceCall::Stop);
        self.stopped = true;
        Ok(())
    }

    fn drain_all(&mut self) -> Result<RawWindow> {
        self.log(SourceCall::DrainAll);
        if !self.stopped {
            return Err(Error::InvalidArgument(
                "the final drain came before sampling stopped".into(),
            ));
        }
        Ok(std::mem::take(&mut self.last))
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            cpus: self.cpus,
            program_info: None,
        }
    }
}

/// Names addresses from a table: user addresses by (pid, address), kernel
/// ones by address (`_[k]` added); anything else is `[unknown]`.
#[derive(Default)]
pub struct TableSymbolizer {
    pub user: HashMap<(u32, u64), String>,
    pub kernel: HashMap<u64, String>,
    /// Windows started.
    pub windows: u64,
    /// Caches evicted by the memory watchdog.
    pub evictions: u64,
}

impl TableSymbolizer {
    /// Names user address `ip` of `pid`.
    pub fn user(mut self, pid: u32, ip: u64, name: &str) -> Self {
        self.user.insert((pid, ip), name.to_string());
        self
    }

    /// Names kernel address `ip`.
    pub fn kernel(mut self, ip: u64, name: &str) -> Self {
        self.kernel.insert(ip, name.to_string());
        self
    }
}

impl Symbolize for TableSymbolizer {
    fn start_window(&mut self) {
        self.windows += 1;
    }

    fn user_stack(&mut self, pid: u32, ips: &[u64]) -> Vec<String> {
        ips.iter()
            .rev()
            .map(|ip| {
                self.user
                    .get(&(pid, *ip))
                    .cloned()
                    .unwrap_or_else(|| UNKNOWN_FRAME.to_string())
            })
            .collect()
    }

    fn kernel_stack(&mut self, ips: &[u64]) -> Vec<String> {
        ips.iter()
            .rev()
            .map(|ip| match self.kernel.get(ip) {
                Some(name) => kernel_frame(name),
                None => UNKNOWN_FRAME.to_string(),
            })
            .collect()
    }

    fn evict_caches(&mut self) {
        self.evictions += 1;
    }

    fn stats(&self) -> SymbolizerStats {
        SymbolizerStats::default()
    }
}

/// Process facts from a table; each sweep forgets the pids queued with
/// [`FakeProcesses::gone`].
#[derive(Default)]
pub struct FakeProcesses {
    pub facts: HashMap<u32, ProcessFacts>,
    gone: Mutex<Vec<u32>>,
}

impl FakeProcesses {
    pub fn with(mut self, pid: u32, facts: ProcessFacts) -> Self {
        self.facts.insert(pid, facts);
        self
    }

    /// `pid` has exited: the next sweep reports it.
    pub fn gone(&self, pid: u32) {
        self.gone.lock().unwrap().push(pid);
    }
}

impl ProcessTable for FakeProcesses {
    fn facts(&self, pid: u32) -> ProcessFacts {
        self.facts.get(&pid).cloned().unwrap_or_default()
    }

    fn sweep(&self) -> Swept {
        Swept {
            pids: std::mem::take(&mut *self.gone.lock().unwrap()),
            binaries: Vec::new(),
        }
    }

    fn gauges(&self) -> ProcessGauges {
        ProcessGauges {
            processes: self.facts.len() as u64,
            ..ProcessGauges::default()
        }
    }
}

/// Pods known by uid (any container of the pod).
#[derive(Default)]
pub struct FakePods(pub HashMap<String, ContainerMeta>);

impl PodDirectory for FakePods {
    fn lookup(&self, pod_uid: &str, _container_id: Option<&str>) -> Option<ContainerMeta> {
        self.0.get(pod_uid).cloned()
    }

    fn pods_known(&self) -> usize {
        self.0.len()
    }
}

/// A sink that keeps every window and counts `finish` calls.
#[derive(Default)]
pub struct CollectingSink {
    pub windows: Vec<LabelledWindow>,
    pub finished: u32,
    pub shed: u32,
}

impl CollectingSink {
    /// Sum of the values received of `sample_type`.
    pub fn total(&self, sample_type: crate::sample_type::SampleType) -> u64 {
        self.windows
            .iter()
            .filter(|w| w.sample_type == sample_type)
            .map(LabelledWindow::total)
            .sum()
    }
}

impl Sink for CollectingSink {
    fn window(&mut self, window: &LabelledWindow) {
        self.windows.push(window.clone());
    }

    fn finish(&mut self, _end: &RunEnd) -> Result<()> {
        self.finished += 1;
        Ok(())
    }

    fn shed_memory(&mut self) {
        self.shed += 1;
    }
}
