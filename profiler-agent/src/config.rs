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
