//! `profiler-agent`: the command-line front end of the agent library.
use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use profiler_agent::{
    config::{self, RecordOptions, SamplerOptions},
    record, summary,
};

#[derive(Parser)]
#[command(version, about = "eBPF CPU profiler for Linux")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Profile the whole host (or some processes) once and write a flame graph,
    /// like `perf record -a -g` + `stackcollapse` + `flamegraph.pl` in one step.
    Record(RecordArgs),
}

#[derive(Args)]
struct RecordArgs {
    /// Only profile this process (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Stop after this long (e.g. 30s, 2m); default: until Ctrl-C.
    #[arg(short = 'd', long, value_parser = config::parse_duration)]
    duration: Option<Duration>,
    /// Samples per second on every CPU (1-10000).
    #[arg(short = 'F', long, default_value_t = config::DEFAULT_FREQUENCY, value_parser = config::parse_frequency)]
    frequency: u64,
    /// Flame graph SVG to write.
    #[arg(short = 'o', long, default_value = "profile.svg")]
    output: PathBuf,
    /// Also write the folded stacks here.
    #[arg(long, value_name = "OUT.txt")]
    folded: Option<PathBuf>,
    /// Keep samples of the idle task (CPU idle time).
    #[arg(long)]
    include_idle: bool,
    /// How often the kernel maps are drained.
    #[arg(long, default_value = "10s", value_parser = config::parse_duration)]
    drain_interval: Duration,
    /// Capacity of each stack-trace map (distinct stacks per drain interval).
    #[arg(long, default_value_t = profiler_common::DEFAULT_STACK_MAP_ENTRIES)]
    stack_map_entries: u32,
    /// Capacity of each count map (distinct process+stack keys per drain interval).
    #[arg(long, default_value_t = profiler_common::DEFAULT_COUNT_MAP_ENTRIES)]
    count_map_entries: u32,
    /// Do not show the progress line.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> ExitCode {
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
    match cli.command {
        Command::Record(args) => {
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, stop.clone())?;
            }
            let options = RecordOptions {
                sampler: SamplerOptions {
                    frequency: args.frequency,
                    pids: args.pids,
                    include_idle: args.include_idle,
                    stack_map_entries: args.stack_map_entries,
                    count_map_entries: args.count_map_entries,
                    ..SamplerOptions::default()
                },
                duration: args.duration,
                drain_interval: args.drain_interval,
                svg: Some(args.output.clone()),
                folded: args.folded.clone(),
                progress: !args.no_progress,
            };
            let recording = record::record(&options, &stop)?;
            let outputs = summary::Outputs {
                svg: Some(args.output),
                folded: args.folded,
            };
            print!("{}", summary::render(&recording, &outputs, 10));
            Ok(())
        }
    }
}
