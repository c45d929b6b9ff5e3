//! Options of a profiling session, validated when they are parsed.
use std::{path::PathBuf, time::Duration};

use crate::{Error, Result};

/// Lowest sampling frequency accepted, in Hz.
pub const MIN_FREQUENCY: u64 = 1;
/// Highest sampling frequency accepted, in Hz.
pub const MAX_FREQUENCY: u64 = 10_000;
/// Default sampling frequency of `record`, in Hz (like `perf record -F 99`).
pub const DEFAULT_FREQUENCY: u64 = 99;

/// Settings of the sampler (kernel side).
#[derive(Clone, Debug)]
pub struct SamplerOptions {
    /// Samples per second per CPU.
    pub frequency: u64,
    /// Only sample these processes (empty: every process).
    pub pids: Vec<u32>,
    /// Keep samples of the idle task.
    pub include_idle: bool,
    /// Capacity of each stack-trace map.
    pub stack_map_entries: u32,
    /// Capacity of each count map.
    pub count_map_entries: u32,
    /// Time between flipping the active map set and reading the idle one.
    pub grace_period: Duration,
    /// How user stacks are walked.
    pub unwind: UnwindMode,
    /// Kernel memory for unwind tables, in MiB (`--unwind-table-mib`).
    pub unwind_table_mib: u32,
    /// Walk CPython's frames (`--no-python-frames` turns it off).
    pub python_frames: bool,
    /// Off-CPU time, when recorded.
    pub off_cpu: Option<OffCpuOptions>,
}

/// How off-CPU time is recorded (`--off-cpu-*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OffCpuOptions {
    /// Times off the CPU shorter than this are not recorded (counted as
    /// `off_cpu_short`): they cost a stack walk each and add little.
    pub min_block: Duration,
    /// Share of switch-outs timed, in (0, 1]; the times kept are scaled by
    /// its inverse, so totals stay unbiased.
    pub sample: f64,
    /// Recording pauses while the host switches context more often than
    /// this a second (`--off-cpu-max-switches`); `None`: never.
    pub max_switches_per_sec: Option<u64>,
}

/// Default `--off-cpu-min`.
pub const DEFAULT_OFF_CPU_MIN: Duration = Duration::from_micros(500);
/// `run`'s default `--off-cpu-sample`: 1 % of context switches timed. A
/// timed switch costs a kernel stack read and a user stack walk (about 5 µs
/// on the benchmark machine), an untimed one about 0.4 µs, a wake-up 0.15
/// µs: about 0.05 % of a core per 1,000 switches a second in all
/// (docs/benchmarks.md).
pub const RUN_OFF_CPU_SAMPLE: f64 = 0.01;
/// `run`'s default `--off-cpu-max-switches`: at `run`'s share, 15,000
/// switches a second cost the off-CPU programs about 0.75 % of one core
/// (0.76 % measured at 14,000/s).
pub const RUN_OFF_CPU_MAX_SWITCHES: u64 = 15_000;

impl Default for OffCpuOptions {
    fn default() -> Self {
        Self {
            min_block: DEFAULT_OFF_CPU_MIN,
            sample: 1.0,
            max_switches_per_sec: None,
        }
    }
}

impl OffCpuOptions {
    /// The program's `Config::off_cpu_keep`: the share in 1/65536ths.
    pub fn keep(&self) -> u32 {
        let all = profiler_common::OFF_CPU_KEEP_ALL;
        ((self.sample * all as f64).round() as u32).clamp(1, all)
    }

    /// Entries of the program's `OFF_CPU_START` (threads away with a timed
    /// wait): only the drawn share of waiting threads is in it, so it is
    /// sized for that share of [`profiler_common::OFF_CPU_THREADS`], four
    /// times over, at least 1,024. Every context switch looks its incoming
    /// thread up there, and a small table stays in the CPU's caches.
    pub fn threads_map_entries(&self) -> u32 {
        let all = profiler_common::OFF_CPU_THREADS;
        let wanted = (f64::from(all) * self.sample * 4.0).ceil() as u32;
        wanted.next_power_of_two().clamp(1024, all)
    }

    /// What a time the program kept stands for: `value * 65536 / keep`.
    pub fn scale(&self, ns: u64) -> u64 {
        let keep = u64::from(self.keep());
        let all = u64::from(profiler_common::OFF_CPU_KEEP_ALL);
        ((u128::from(ns) * u128::from(all)) / u128::from(keep)).min(u64::MAX as u128) as u64
    }

    fn validate(&self) -> Result<()> {
        if !(self.sample > 0.0 && self.sample <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "--off-cpu-sample must be above 0 and at most 1, got {}",
                self.sample
            )));
        }
        if self.min_block > Duration::from_secs(10) {
            return Err(Error::InvalidArgument(format!(
                "--off-cpu-min must be at most 10s, got {:?}",
                self.min_block
            )));
        }
        Ok(())
    }
}

/// Parses `--off-cpu-min`: a duration such as `500us`, `1ms`; `0` keeps
/// every time.
pub fn parse_min_block(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration like 1ms: {e}"))
}

/// How the program walks user stacks (`--unwind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UnwindMode {
    /// Call-frame information (`.eh_frame`, `.debug_frame`) where the agent
    /// built a table, checked frame pointers elsewhere.
    #[default]
    Cfi,
    /// Checked frame pointers only: for diagnosis.
    FramePointers,
}

impl UnwindMode {
    /// The program's `Config::unwind_mode` value.
    pub fn config_value(self) -> u32 {
        match self {
            UnwindMode::Cfi => profiler_common::unwind_mode::CFI,
            UnwindMode::FramePointers => profiler_common::unwind_mode::FRAME_POINTERS,
        }
    }
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            frequency: DEFAULT_FREQUENCY,
            pids: Vec::new(),
            include_idle: false,
            stack_map_entries: profiler_common::DEFAULT_STACK_MAP_ENTRIES,
            count_map_entries: profiler_common::DEFAULT_COUNT_MAP_ENTRIES,
            grace_period: Duration::from_millis(50),
            unwind: UnwindMode::Cfi,
            unwind_table_mib: profiler_common::unwind::DEFAULT_UNWIND_TABLE_MIB,
            python_frames: true,
            off_cpu: None,
        }
    }
}

impl SamplerOptions {
    /// Checks ranges and that every requested process exists.
    pub fn validate(&self) -> Result<()> {
        check_frequency(self.frequency)?;
        for (name, value) in [
            ("stack map entries", self.stack_map_entries),
            ("count map entries", self.count_map_entries),
        ] {
            if !(64..=1 << 20).contains(&value) {
                return Err(Error::InvalidArgument(format!(
                    "{name} must be between 64 and 1048576, got {value}"
                )));
            }
        }
        if !(1..=4096).contains(&self.unwind_table_mib) {
            return Err(Error::InvalidArgument(format!(
                "--unwind-table-mib must be between 1 and 4096, got {}",
                self.unwind_table_mib
            )));
        }
        if let Some(off_cpu) = &self.off_cpu {
            off_cpu.validate()?;
        }
        if self.pids.len() > profiler_common::MAX_FILTER_PIDS as usize {
            return Err(Error::InvalidArgument(format!(
                "at most {} pids can be given, got {}",
                profiler_common::MAX_FILTER_PIDS,
                self.pids.len()
            )));
        }
        for pid in &self.pids {
            if *pid == 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(Error::InvalidArgument(format!("no process with pid {pid}")));
            }
        }
        Ok(())
    }
}

/// Rejects a sampling frequency outside 1–10000 Hz.
pub fn check_frequency(hz: u64) -> Result<u64> {
    if (MIN_FREQUENCY..=MAX_FREQUENCY).contains(&hz) {
        Ok(hz)
    } else {
        Err(Error::InvalidArgument(format!(
            "frequency must be between {MIN_FREQUENCY} and {MAX_FREQUENCY} Hz, got {hz}"
        )))
    }
}

/// Parses `-F` for clap.
pub fn parse_frequency(s: &str) -> Result<u64, String> {
    let hz: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of Hz"))?;
    check_frequency(hz).map_err(|e| e.to_string())
}

/// Parses a duration such as `10s`, `1m30s` or `500ms`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("`{s}` is not a duration like 10s or 1m: {e}"))?,
    };
    if d.is_zero() {
        return Err("duration must be greater than zero".into());
    }
    Ok(d)
}

/// Parses a size in MiB, fractions allowed (`0.25` is 256 KiB), to bytes.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let mib: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of MiB"))?;
    if !mib.is_finite() || mib <= 0.0 || mib > (1u64 << 24) as f64 {
        return Err(format!(
            "{s} MiB is out of range (more than 0, at most 16 TiB)"
        ));
    }
    Ok(((mib * (1u64 << 20) as f64) as u64).max(1))
}

/// Everything `record` needs.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub sampler: SamplerOptions,
    /// Stop after this long; `None`: until Ctrl-C.
    pub duration: Option<Duration>,
    /// Time between two drains of the kernel maps.
    pub drain_interval: Duration,
    /// Flame graph output.
    pub svg: Option<PathBuf>,
    /// Folded stacks output.
    pub folded: Option<PathBuf>,
    /// Show a progress line on stderr.
    pub progress: bool,
    /// Ship every window to a collector (`run` mode).
    pub export: Option<crate::export::ExportOptions>,
    /// Ship every window to an OTLP endpoint too, or instead (`run` mode).
    pub otlp: Option<crate::export::ExportOptions>,
    /// Label samples with their pods' metadata from this API server.
    pub kube: Option<crate::kube::KubeConfig>,
    /// Drop the capabilities no longer needed once attached (the agent
    /// binary does; tests that load the program again in-process do not).
    pub drop_capabilities: bool,
    /// Serve the agent's metrics (Prometheus text) at `/metrics` here.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// RSS ceiling: near it the memory watchdog sheds memory (`run` mode).
    pub memory_limit_bytes: Option<u64>,
    /// Time budget per window and DWARF size limit of the symbolizer.
    pub symbolize: crate::symbolize::SymbolizeLimits,
}

impl Default for RecordOptions {
    fn default() -> Self {
        Self {
            sampler: SamplerOptions::default(),
            duration: None,
            drain_interval: Duration::from_secs(10),
            svg: None,
            folded: None,
            progress: false,
            export: None,
            otlp: None,
            kube: None,
            drop_capabilities: false,
            metrics_listen: None,
            memory_limit_bytes: None,
            symbolize: crate::symbolize::SymbolizeLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_range_is_enforced() {
        assert_eq!(parse_frequency("99"), Ok(99));
        assert_eq!(parse_frequency("1"), Ok(1));
        assert_eq!(parse_frequency("10000"), Ok(10000));
        let err = parse_frequency("0").unwrap_err();
        assert!(err.contains("between 1 and 10000"), "{err}");
        assert!(parse_frequency("10001").is_err());
        assert!(parse_frequency("fast")
            .unwrap_err()
            .contains("not a whole number"));
    }

    #[test]
    fn the_threads_map_is_sized_for_the_share_drawn() {
        let share = |sample| OffCpuOptions {
            sample,
            ..Default::default()
        };
        assert_eq!(share(1.0).threads_map_entries(), 32_768);
        assert_eq!(share(0.05).threads_map_entries(), 8_192);
        assert_eq!(share(0.01).threads_map_entries(), 2_048);
        assert_eq!(share(1e-6).threads_map_entries(), 1_024);
    }

    #[test]
    fn off_cpu_sampling_scales_kept_times_back() {
        let all = OffCpuOptions::default();
        assert_eq!(all.keep(), profiler_common::OFF_CPU_KEEP_ALL);
        assert_eq!(all.scale(1_000), 1_000);
        let tenth = OffCpuOptions {
            sample: 0.1,
            ..Default::default()
        };
        // 6554/65536 of the switches: each kept time stands for ~10.
        assert_eq!(tenth.keep(), 6554);
        assert_eq!(tenth.scale(6554), 65_536);
        let tiny = OffCpuOptions {
            sample: 1e-9,
            ..Default::default()
        };
        assert_eq!(tiny.keep(), 1);
        assert!(OffCpuOptions {
            sample: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--off-cpu-sample"));
        assert_eq!(parse_min_block("0"), Ok(Duration::ZERO));
        assert_eq!(parse_min_block("2ms"), Ok(Duration::from_millis(2)));
        assert!(parse_min_block("soon").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes_in_mib_parse() {
        assert_eq!(parse_mib("64"), Ok(64 << 20));
        assert_eq!(parse_mib("0.25"), Ok(256 << 10));
        assert!(parse_mib("0").is_err());
        assert!(parse_mib("-1").is_err());
        assert!(parse_mib("lots").is_err());
        assert!(parse_mib("inf").is_err());
    }

    #[test]
    fn unknown_pid_is_rejected() {
        let opts = SamplerOptions {
            pids: vec![u32::MAX - 1],
            ..Default::default()
        };
        let err = opts.validate().unwrap_err().to_string();
        assert!(err.contains("no process with pid"), "{err}");
    }

    #[test]
    fn own_pid_is_accepted() {
        let opts = SamplerOptions {
            pids: vec![std::process::id()],
            ..Default::default()
        };
        opts.validate().unwrap();
    }

    #[test]
    fn map_sizes_are_checked() {
        let opts = SamplerOptions {
            count_map_entries: 1,
            ..Default::default()
        };
        assert!(opts
            .validate()
            .unwrap_err()
            .to_string()
            .contains("count map entries"));
    }
}
