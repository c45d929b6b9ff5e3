//! The source stage: where raw samples come from (the kernel maps through
//! [`crate::kernel::KernelSource`], or [`super::testing::FakeSource`]).
use crate::{
    drain::{Counters, OffCpuPauses, RawWindow},
    Result,
};

/// What a source says about itself for the exit summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceInfo {
    /// CPUs sampled.
    pub cpus: usize,
    /// The kernel verifier's processed instruction count and the program's
    /// size in instructions, when known.
    pub program_info: Option<(u64, u64)>,
}

/// Something that can be drained of samples, window by window.
pub trait SampleSource {
    /// Returns what was sampled since the previous drain. Nothing sampled
    /// is lost between drains (the kernel source flips its A/B map sets).
    fn drain(&mut self) -> Result<RawWindow>;
    /// Current totals of the source's counters (samples seen, recorded,
    /// and every reason a sample was lost).
    fn counters(&self) -> Result<Counters>;
    /// Processes are gone: let the source announce these pids again if reused.
    fn forget_pids(&mut self, _pids: &[u32]) {}
    /// Stops sampling; what was sampled stays readable.
    fn stop(&mut self) -> Result<()>;
    /// After [`SampleSource::stop`]: everything still held, so nothing is
    /// left behind at exit.
    fn drain_all(&mut self) -> Result<RawWindow> {
        let mut window = self.drain()?;
        window.merge(self.drain()?);
        Ok(window)
    }
    /// CPUs and program size, for the summary.
    fn info(&self) -> SourceInfo {
        SourceInfo::default()
    }
    /// Off-CPU recording's pauses, for a source whose recording can pause.
    fn off_cpu_pauses(&self) -> Option<OffCpuPauses> {
        None
    }
    /// The unwind tables' figures, for a source that unwinds with them.
    fn unwind_stats(&self) -> Option<crate::unwind::UnwindStats> {
        None
    }
}
