//! The off-CPU cost guard. The `sched_switch` program runs at every context
//! switch, timed or not (about 0.4 µs each on the benchmark machine), so the
//! kernel side of off-CPU recording costs in proportion to how often the
//! host switches: about 0.05 % of one core per 1,000 switches a second at
//! `run`'s default share. Lowering the share cannot bound that; detaching
//! the programs does. Once a window, the guard reads the host's context
//! switches (`ctxt` in `/proc/stat`, what `vmstat` shows as `cs`): above
//! `--off-cpu-max-switches` a second it pauses the recording, below 80 % of
//! it resumes.
use std::time::Instant;

/// Resume below this share of the limit, so a host near it does not flap.
const RESUME_BELOW: f64 = 0.8;

/// What the guard decided for a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    /// Detach the off-CPU programs: the host switched this often a second.
    Pause { rate: f64 },
    /// Attach them again.
    Resume { rate: f64 },
}

/// Pauses and resumes off-CPU recording by the host's context switch rate.
#[derive(Debug)]
pub struct OffCpuGuard {
    /// Switches a second above which recording pauses.
    max_per_sec: u64,
    paused: bool,
    /// The previous reading: when, and the switches since boot.
    last: Option<(Instant, u64)>,
    /// Pauses so far.
    pub pauses: u64,
}

impl OffCpuGuard {
    pub fn new(max_per_sec: u64) -> Self {
        Self {
            max_per_sec,
            paused: false,
            last: None,
            pauses: 0,
        }
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn max_per_sec(&self) -> u64 {
        self.max_per_sec
    }

    /// Takes a reading (`switches` since boot at `now`) and says whether
    /// recording should change state. The first reading only sets the
    /// baseline.
    pub fn observe(&mut self, now: Instant, switches: u64) -> Option<Change> {
        let previous = self.last.replace((now, switches));
        let (then, before) = previous?;
        let secs = now.saturating_duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let rate = switches.saturating_sub(before) as f64 / secs;
        let max = self.max_per_sec as f64;
        if !self.paused && rate > max {
            self.paused = true;
            self.pauses += 1;
            Some(Change::Pause { rate })
        } else if self.paused && rate < max * RESUME_BELOW {
            self.paused = false;
            Some(Change::Resume { rate })
        } else {
            None
        }
    }
}

/// Context switches since boot, from `/proc/stat`.
pub fn host_context_switches() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_ctxt(&stat)
}

fn parse_ctxt(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("ctxt ")?.trim().parse().ok())
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn pauses_above_the_limit_and_resumes_well_below_it() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut guard = OffCpuGuard::new(10_000);
        // The first reading is the baseline.
        assert_eq!(guard.observe(at(0), 1_000_000), None);
        // 5,000/s: recording goes on.
        assert_eq!(guard.observe(at(10), 1_050_000), None);
        // 12,000/s: paused.
        assert_eq!(
            guard.observe(at(20), 1_170_000),
            Some(Change::Pause { rate: 12_000.0 })
        );
        assert!(guard.paused());
        // 9,000/s: under the limit but not under 80 % of it: still paused.
        assert_eq!(guard.observe(at(30), 1_260_000), None);
        // 7,000/s: resumed.
        assert_eq!(
            guard.observe(at(40), 1_330_000),
            Some(Change::Resume { rate: 7_000.0 })
        );
        assert!(!guard.paused());
        assert_eq!(guard.pauses, 1);
    }

    #[test]
    fn reads_the_switch_counter_of_proc_stat() {
        let stat = "cpu  1 2 3 4\nintr 5 6\nctxt 987654321\nbtime 1700000000\n";
        assert_eq!(parse_ctxt(stat), Some(987_654_321));
        assert_eq!(parse_ctxt("cpu 1 2\n"), None);
        assert!(host_context_switches().is_some_and(|n| n > 0));
    }
}
