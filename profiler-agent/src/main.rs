//! `profiler-agent`: the command-line front end of the agent library.
use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use profiler_agent::{
    config::{self, OffCpuOptions, RecordOptions, SamplerOptions},
    export::{self, ExportOptions, Protocol},
    kube::KubeConfig,
    record, summary,
    transport::Security,
};
use profiler_security::ClientTlsFiles;

#[derive(Parser)]
#[command(version, about = "eBPF CPU profiler for Linux")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the `Run` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Profile the whole host (or some processes) once and write a flame graph,
    /// like `perf record -a -g` + `stackcollapse` + `flamegraph.pl` in one step.
    Record {
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Flame graph SVG to write.
        #[arg(short = 'o', long, default_value = "profile.svg")]
        output: PathBuf,
        /// Sampling frequency on every CPU (1-10000 Hz).
        #[arg(short = 'F', long, default_value_t = config::DEFAULT_FREQUENCY, value_parser = config::parse_frequency)]
        frequency: u64,
        /// Also record where threads wait off the CPU (sleeps, locks, I/O):
        /// an off-CPU flame graph is written next to the CPU one
        /// (`NAME.off_cpu.svg`).
        #[arg(long)]
        off_cpu: bool,
    },
    /// Profile continuously and stream every window to a collector.
    Run {
        #[command(flatten)]
        sampling: SamplingArgs,
        /// gRPC address of the collector: https://HOST:PORT (TLS), or
        /// http://HOST:PORT with --plaintext.
        #[arg(long, required_unless_present = "otlp_endpoint")]
        collector: Option<String>,
        #[command(flatten)]
        security: SecurityArgs,
        #[command(flatten)]
        otlp: OtlpArgs,
        /// Node name for the `node` label (default: the host name).
        #[arg(long, env = "NODE_NAME")]
        node: Option<String>,
        /// Bound of the queue of batches not yet acknowledged, in MiB
        /// (fractions allowed: 0.25 is 256 KiB).
        #[arg(long = "queue-mib", default_value = "16", value_parser = config::parse_mib)]
        queue_bytes: u64,
        /// Directory for batches that overflow the queue while the collector
        /// is unreachable (replayed oldest first, also after a restart).
        #[arg(long)]
        spill_dir: Option<PathBuf>,
        /// Cap of the spill directory in MiB (fractions allowed); past it the
        /// oldest batches are dropped.
        #[arg(long = "spill-mib", default_value = "256", value_parser = config::parse_mib)]
        spill_bytes: u64,
        /// Serve the agent's metrics (Prometheus text) at http://ADDR/metrics,
        /// e.g. 127.0.0.1:9464. Off by default.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// RSS ceiling in MiB: past 90 % of it the agent parks its queue on
        /// disk, empties its symbolizer caches and trims its heap.
        #[arg(long = "memory-limit-mib", default_value = "64", value_parser = config::parse_mib)]
        memory_limit_bytes: u64,
        /// Kubernetes API server for pod labels (default: in-cluster, when
        /// KUBERNETES_SERVICE_HOST is set). Plain http:// is for tests.
        #[arg(long)]
        kube_api: Option<String>,
        /// Do not label samples with Kubernetes metadata.
        #[arg(long)]
        no_kube: bool,
        /// Also write a flame graph of the whole run at exit.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Sampling frequency on every CPU (1-10000 Hz); low by default, to be always on.
        #[arg(short = 'F', long, default_value_t = 19, value_parser = config::parse_frequency)]
        frequency: u64,
        /// Record where threads wait off the CPU: on by default in `run`, a
        /// share of context switches timed (--off-cpu-sample);
        /// docs/benchmarks.md gives what it costs.
        #[arg(long, overrides_with = "no_off_cpu")]
        off_cpu: bool,
        /// Do not record where threads wait off the CPU.
        #[arg(long, overrides_with = "off_cpu")]
        no_off_cpu: bool,
    },
}

/// Where OTLP profiles go, next to or instead of the collector.
#[derive(Args)]
struct OtlpArgs {
    /// Also (or, without --collector, only) send OTLP profiles
    /// (ProfilesService/Export, v1development of OTLP 1.10) over gRPC to
    /// https://HOST:PORT, or http://HOST:PORT with --plaintext: one profile
    /// per window, sample type and process.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// A header sent with every OTLP request, e.g. "authorization=Bearer T"
    /// (repeatable).
    #[arg(long = "otlp-header", value_name = "NAME=VALUE")]
    otlp_headers: Vec<String>,
    /// PEM CA bundle the OTLP endpoint's certificate must chain to (default:
    /// the public web PKI roots).
    #[arg(long, value_name = "FILE")]
    otlp_tls_ca: Option<PathBuf>,
    /// PEM client certificate for the OTLP endpoint (mutual TLS).
    #[arg(long, value_name = "FILE")]
    otlp_tls_cert: Option<PathBuf>,
    /// PEM private key of --otlp-tls-cert.
    #[arg(long, value_name = "FILE")]
    otlp_tls_key: Option<PathBuf>,
}

#[derive(Args)]
struct SecurityArgs {
    /// PEM CA bundle the collector's certificate must chain to (default: the
    /// public web PKI roots).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a collector that requires one (mutual TLS).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// File whose first line is the bearer token to send (re-read when it changes).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Allow a plain-text (http://) collector address; a warning is logged.
    #[arg(long)]
    plaintext: bool,
}

impl SecurityArgs {
    /// Plain text only when asked for.
    fn resolve(self, address: &str, what: &str) -> anyhow::Result<Security> {
        let url = export::collector_url(address);
        if url.starts_with("http://") && !self.plaintext {
            anyhow::bail!(
                "the {what} address {url} is plain text: use https:// (TLS), \
                 or pass --plaintext to send profiles unencrypted"
            );
        }
        if url.starts_with("https://") && self.plaintext {
            anyhow::bail!("--plaintext with an https:// {what} address: choose one");
        }
        Ok(Security {
            tls: ClientTlsFiles {
                ca: self.tls_ca,
                cert: self.tls_cert,
                key: self.tls_key,
            },
            token_file: self.token_file,
        })
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// Only profile this process (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Stop after this long (e.g. 30s, 2m); default: until Ctrl-C.
    #[arg(short = 'd', long, value_parser = config::parse_duration)]
    duration: Option<Duration>,
    /// Also write the folded stacks here.
    #[arg(long, value_name = "OUT.txt")]
    folded: Option<PathBuf>,
    /// Keep samples of the idle task (CPU idle time).
    #[arg(long)]
    include_idle: bool,
    /// How often the kernel maps are drained (and, in `run`, a batch is sent).
    #[arg(long, default_value = "10s", value_parser = config::parse_duration)]
    drain_interval: Duration,
    /// Capacity of each stack map (distinct kernel stacks, and distinct
    /// user stacks, per drain interval).
    #[arg(long, default_value_t = profiler_common::DEFAULT_STACK_MAP_ENTRIES)]
    stack_map_entries: u32,
    /// How user stacks are walked: `cfi` (call-frame information where a
    /// table was built, checked frame pointers elsewhere) or
    /// `frame-pointers` (for diagnosis).
    #[arg(long, value_enum, default_value_t = profiler_agent::config::UnwindMode::Cfi)]
    unwind: profiler_agent::config::UnwindMode,
    /// Kernel memory for unwind tables, in MiB (16 bytes a row; libc needs
    /// about 0.45 MiB); least recently used tables of exited processes are
    /// evicted when it is full.
    #[arg(long, default_value_t = profiler_common::unwind::DEFAULT_UNWIND_TABLE_MIB)]
    unwind_table_mib: u32,
    /// Do not walk CPython's frames (Python processes then show the
    /// interpreter's native frames only).
    #[arg(long)]
    no_python_frames: bool,
    /// Capacity of each count map (distinct process+stack keys per drain interval).
    #[arg(long, default_value_t = profiler_common::DEFAULT_COUNT_MAP_ENTRIES)]
    count_map_entries: u32,
    /// Do not show the progress line.
    #[arg(long)]
    no_progress: bool,
    /// Time each window may spend naming frames; past it, frames not yet
    /// named stay `module+0xOFFSET` for that window (and are counted).
    #[arg(long, default_value = "2s", value_parser = config::parse_duration)]
    symbolize_budget: Duration,
    /// Binaries larger than this (MiB) are named from ELF symbols only (no DWARF).
    #[arg(long, default_value_t = profiler_agent::symbolize::DEFAULT_MAX_DWARF_BYTES >> 20)]
    max_dwarf_mib: u64,
    /// Off-CPU: times off the CPU shorter than this are not recorded
    /// (counted); `0` keeps every one.
    #[arg(long, default_value = "500us", value_parser = config::parse_min_block)]
    off_cpu_min: Duration,
    /// Off-CPU: share of context switches timed, above 0 and at most 1;
    /// the times kept are scaled by its inverse. Default: 1 in `record`,
    /// the share `run` keeps always on (docs/agent.md).
    #[arg(long)]
    off_cpu_sample: Option<f64>,
    /// Off-CPU: recording pauses while the host switches context more
    /// often than this a second (its kernel cost grows with the switch
    /// rate), and resumes below 80 % of it; `0`: never pauses. Default:
    /// never in `record`, 15000 in `run` (docs/agent.md).
    #[arg(long)]
    off_cpu_max_switches: Option<u64>,
}

impl SamplingArgs {
    /// `off_cpu`: the share of switches timed and the switch rate that
    /// pauses recording (0: none) unless `--off-cpu-sample` and
    /// `--off-cpu-max-switches` say otherwise, or `None` for no off-CPU
    /// recording.
    fn options(
        self,
        frequency: u64,
        svg: Option<PathBuf>,
        off_cpu: Option<(f64, u64)>,
    ) -> RecordOptions {
        let off_cpu = off_cpu.map(|(sample, max_switches)| OffCpuOptions {
            min_block: self.off_cpu_min,
            sample: self.off_cpu_sample.unwrap_or(sample),
            max_switches_per_sec: Some(self.off_cpu_max_switches.unwrap_or(max_switches))
                .filter(|&n| n > 0),
        });
        RecordOptions {
            sampler: SamplerOptions {
                frequency,
                pids: self.pids,
                include_idle: self.include_idle,
                stack_map_entries: self.stack_map_entries,
                count_map_entries: self.count_map_entries,
                unwind: self.unwind,
                unwind_table_mib: self.unwind_table_mib,
                python_frames: !self.no_python_frames,
                off_cpu,
                ..SamplerOptions::default()
            },
            duration: self.duration,
            drain_interval: self.drain_interval,
            svg,
            folded: self.folded,
            progress: !self.no_progress,
            export: None,
            otlp: None,
            kube: None,
            drop_capabilities: true,
            metrics_listen: None,
            memory_limit_bytes: None,
            symbolize: profiler_agent::symbolize::SymbolizeLimits {
                budget: self.symbolize_budget,
                max_dwarf_bytes: self.max_dwarf_mib.saturating_mul(1 << 20),
            },
        }
    }
}

fn main() -> ExitCode {
    profiler_agent::memory::limit_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let options = match cli.command {
        Command::Record {
            sampling,
            output,
            frequency,
            off_cpu,
        } => sampling.options(frequency, Some(output), off_cpu.then_some((1.0, 0))),
        Command::Run {
            sampling,
            collector,
            security,
            otlp,
            node,
            queue_bytes,
            spill_dir,
            spill_bytes,
            metrics_listen,
            memory_limit_bytes,
            kube_api,
            no_kube,
            output,
            frequency,
            off_cpu: _,
            no_off_cpu,
        } => {
            if queue_bytes > 4096 << 20 {
                anyhow::bail!("--queue-mib must be at most 4096");
            }
            let mut options = sampling.options(
                frequency,
                output,
                (!no_off_cpu)
                    .then_some((config::RUN_OFF_CPU_SAMPLE, config::RUN_OFF_CPU_MAX_SWITCHES)),
            );
            options.metrics_listen = metrics_listen;
            options.memory_limit_bytes = Some(memory_limit_bytes);
            let node = node.unwrap_or_else(record::hostname);
            options.kube = match (no_kube, kube_api) {
                (true, _) => None,
                (false, Some(api_url)) => Some(KubeConfig {
                    api_url,
                    token: None,
                    token_file: None,
                    ca_pem: None,
                    node: node.clone(),
                }),
                (false, None) => KubeConfig::in_cluster(&node),
            };
            let destination =
                |url: String, security: Security, protocol, headers, spill_dir| ExportOptions {
                    collector: url,
                    security,
                    node: node.clone(),
                    queue_bytes: queue_bytes as usize,
                    flush_timeout: Duration::from_secs(10),
                    spill_dir,
                    spill_bytes,
                    protocol,
                    headers,
                };
            // Each destination keeps its own spill directory.
            let otlp_spill = spill_dir.as_ref().map(|d| {
                if collector.is_some() {
                    d.join("otlp")
                } else {
                    d.clone()
                }
            });
            if let Some(url) = otlp.otlp_endpoint {
                let otlp_security = SecurityArgs {
                    tls_ca: otlp.otlp_tls_ca,
                    tls_cert: otlp.otlp_tls_cert,
                    tls_key: otlp.otlp_tls_key,
                    token_file: None,
                    plaintext: security.plaintext,
                }
                .resolve(&url, "OTLP endpoint")?;
                options.otlp = Some(destination(
                    url,
                    otlp_security,
                    Protocol::Otlp,
                    otlp.otlp_headers,
                    otlp_spill,
                ));
            }
            if let Some(collector) = collector {
                let security = security.resolve(&collector, "collector")?;
                options.export = Some(destination(
                    collector,
                    security,
                    Protocol::Collector,
                    Vec::new(),
                    spill_dir,
                ));
            }
            options
        }
    };
    let recording = record::record(&options, &stop)?;
    let outputs = summary::Outputs {
        svg: options.svg.clone(),
        folded: options.folded.clone(),
    };
    print!("{}", summary::render(&recording, &outputs, 10));
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    /// Whether `run` with `args` records off-CPU time.
    fn run_records_off_cpu(args: &[&str]) -> bool {
        let argv = [
            &["profiler-agent", "run", "--collector", "http://c:1"],
            args,
        ]
        .concat();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run { no_off_cpu, .. } => !no_off_cpu,
            Command::Record { .. } => unreachable!("parsed `run`"),
        }
    }

    #[test]
    fn run_records_off_cpu_unless_told_not_to() {
        assert!(run_records_off_cpu(&[]));
        assert!(run_records_off_cpu(&["--off-cpu"]));
        assert!(!run_records_off_cpu(&["--no-off-cpu"]));
        // The last of the two flags wins.
        assert!(run_records_off_cpu(&["--no-off-cpu", "--off-cpu"]));
        assert!(!run_records_off_cpu(&["--off-cpu", "--no-off-cpu"]));
    }
}
