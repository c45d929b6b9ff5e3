//! Criterion micro-benchmarks of the agent's per-window userspace work:
//! decoding drained count-map entries, folding symbolized stacks, parsing
//! folded text and building/encoding a collector batch.
//!
//! One synthetic window stands for a busy host: 200 processes, 2,000
//! distinct stacks of 20-40 user frames (every fourth with 8 kernel frames
//! too). Inputs are deterministic. Figures: docs/microbenchmarks.md;
//! `cargo bench -p profiler-agent` reproduces them (not run in CI).
use std::{
    collections::HashMap,
    hint::black_box,
    time::{Duration, UNIX_EPOCH},
};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use profiler_agent::{
    drain::{decode_key, RawWindow, MAX_STACK_DEPTH},
    export::{BatchBuilder, BatchHeader},
    fold::{parse_folded, FoldedProfile, SymbolizedSample},
    sample_type::SampleType,
};
use profiler_common::{StackKey, COMM_LEN, NO_STACK};
use prost::Message;

const PROCESSES: usize = 200;
const STACKS: usize = 2_000;
/// Distinct function names frames are drawn from.
const FUNCTIONS: usize = 3_000;
/// Per-CPU values of each count-map entry (this machine has 2 CPUs).
const CPUS: usize = 2;

fn user_depth(s: usize) -> usize {
    20 + (s * 11) % 21
}

fn kernel_depth(s: usize) -> usize {
    if s.is_multiple_of(4) {
        8
    } else {
        0
    }
}

fn process_name(p: usize) -> String {
    format!("worker-{p:03}")
}

fn function_name(f: usize) -> String {
    format!(
        "service_{}::handlers::module_{}::Handler{}::process_request_{f}",
        f % 11,
        f % 37,
        f % 5
    )
}

/// The `f`-th function of stack `s` at depth `d`.
fn frame_index(s: usize, d: usize) -> usize {
    // Shared roots (main, runtime) and varied leaves, like real programs.
    if d < 4 {
        d
    } else {
        (s * 31 + d * 17 + (s % 13) * d) % FUNCTIONS
    }
}

/// What the eBPF maps hold after a window: count-map entries with their
/// per-CPU counts, and the stack-trace map (id -> addresses, leaf first).
struct MapsFixture {
    entries: Vec<(StackKey, Vec<u64>)>,
    stack_map: HashMap<u32, Vec<u64>>,
}

fn comm(name: &str) -> [u8; COMM_LEN] {
    let mut c = [0u8; COMM_LEN];
    let n = name.len().min(COMM_LEN - 1);
    c[..n].copy_from_slice(&name.as_bytes()[..n]);
    c
}

fn maps_fixture() -> MapsFixture {
    let mut stack_map = HashMap::new();
    let mut entries = Vec::with_capacity(STACKS);
    for s in 0..STACKS {
        let user_id = s as u32;
        let user: Vec<u64> = (0..user_depth(s))
            .map(|d| 0x5555_0000_0000 + (frame_index(s, d) as u64) * 64)
            .collect();
        stack_map.insert(user_id, user);
        let kernel_id = if kernel_depth(s) > 0 {
            // Few distinct kernel stacks, shared by many keys.
            let id = (STACKS + s % 16) as u32;
            stack_map.entry(id).or_insert_with(|| {
                (0..kernel_depth(s))
                    .map(|d| 0xffff_ffff_8100_0000 + ((s % 16) * 8 + d) as u64 * 32)
                    .collect()
            });
            id as i32
        } else {
            NO_STACK
        };
        let p = s % PROCESSES;
        let key = StackKey {
            tgid: 1000 + p as u32,
            // Key 0 means "no user stack".
            user_stack: user_id as u64 + 1,
            kernel_stack_id: kernel_id,
            comm: comm(&process_name(p)),
        };
        let per_cpu = (0..CPUS).map(|c| ((s + c) % 5) as u64).collect();
        entries.push((key, per_cpu));
    }
    MapsFixture { entries, stack_map }
}

/// The userspace half of `Sampler::read_and_clear`: sum per-CPU counts,
/// decode each key, look each stack id up once.
fn decode_window(maps: &MapsFixture) -> RawWindow {
    let mut window = RawWindow::default();
    let mut cache: HashMap<u32, Option<Vec<u64>>> = HashMap::new();
    for (key, values) in &maps.entries {
        let count: u64 = values.iter().sum();
        let mut lookup = |id: u32| {
            cache
                .entry(id)
                .or_insert_with(|| maps.stack_map.get(&id).cloned())
                .clone()
        };
        let user = lookup((key.user_stack - 1) as u32).map(|frames| (frames, None));
        let (sample, missing) = decode_key(key, count, &mut lookup, |_| user.clone());
        if missing {
            window.missing_stacks += count;
        }
        if sample.user.len() >= MAX_STACK_DEPTH || sample.kernel.len() >= MAX_STACK_DEPTH {
            window.truncated_stacks += count;
        }
        window.samples.push(sample);
    }
    window
}

/// A window after symbolization: frames root first, user then kernel.
fn symbolized() -> Vec<SymbolizedSample> {
    let names: Vec<String> = (0..FUNCTIONS).map(function_name).collect();
    (0..STACKS)
        .map(|s| {
            let mut frames: Vec<String> = (0..user_depth(s))
                .rev()
                .map(|d| names[frame_index(s, d)].clone())
                .collect();
            for d in (0..kernel_depth(s)).rev() {
                frames.push(format!("kernel_fn_{}", (s % 16) * 8 + d));
            }
            SymbolizedSample {
                thread_state: None,
                tgid: 1000 + (s % PROCESSES) as u32,
                process: process_name(s % PROCESSES),
                frames,
                sample_type: SampleType::Cpu,
                value: 1 + (s % 5) as u64,
            }
        })
        .collect()
}

fn total_frames(samples: &[SymbolizedSample]) -> usize {
    samples.iter().map(|s| s.frames.len()).sum()
}

fn fold(samples: &[SymbolizedSample]) -> FoldedProfile {
    let mut profile = FoldedProfile::default();
    for s in samples {
        profile.add(&s.process, &s.frames, s.value);
    }
    profile
}

/// Builds the batch as `record.rs` does for the collector: labels per
/// process, the process as the root frame.
fn build_batch(samples: &[SymbolizedSample]) -> BatchBuilder {
    let mut batch = BatchBuilder::new();
    let mut frames = Vec::new();
    for sample in samples {
        let pid = sample.tgid.to_string();
        let exe = format!("/usr/bin/{}", sample.process);
        let labels = [
            ("node", "bench-node"),
            ("process", sample.process.as_str()),
            ("pid", pid.as_str()),
            ("exe", exe.as_str()),
            ("service", sample.process.as_str()),
        ];
        frames.clear();
        frames.push(sample.process.clone());
        frames.extend(sample.frames.iter().cloned());
        batch.add(&labels, &frames, sample.value);
    }
    batch
}

fn header() -> BatchHeader {
    BatchHeader {
        agent_id: "bench-agent".into(),
        sequence: 1,
        node: "bench-node".into(),
        window_start: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        window_end: UNIX_EPOCH + Duration::from_secs(1_700_000_010),
        frequency_hz: 99,
    }
}

fn bench_decode(c: &mut Criterion) {
    let maps = maps_fixture();
    let mut group = c.benchmark_group("drain");
    group.throughput(Throughput::Elements(STACKS as u64));
    group.bench_function("decode_2000_keys", |b| {
        b.iter(|| decode_window(black_box(&maps)))
    });
    group.finish();
}

fn bench_fold(c: &mut Criterion) {
    let samples = symbolized();
    let frames = total_frames(&samples);
    let mut group = c.benchmark_group("fold");
    group.throughput(Throughput::Elements(frames as u64));
    group.bench_function("add_2000_stacks", |b| b.iter(|| fold(black_box(&samples))));
    let profile = fold(&samples);
    let mut text = Vec::new();
    profile.write_to(&mut text).expect("writing to a Vec");
    let text = String::from_utf8(text).expect("folded text is UTF-8");
    group.bench_function("write_2000_lines", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(text.len());
            black_box(&profile).write_to(&mut out).expect("Vec");
            out
        })
    });
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("parse_folded_2000_lines", |b| {
        b.iter(|| parse_folded(black_box(&text)))
    });
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let samples = symbolized();
    // The process root frame is added to every stack.
    let frames = total_frames(&samples) + samples.len();
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(frames as u64));
    group.bench_function("build_batch_2000_stacks", |b| {
        b.iter(|| build_batch(black_box(&samples)).finish(header()))
    });
    let batch = build_batch(&samples).finish(header());
    let encoded = batch.encode_to_vec();
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("prost_encode", |b| {
        b.iter(|| black_box(&batch).encode_to_vec())
    });
    // The wire size measurement the exporter does for its largest batch.
    group.bench_function("zstd_level0", |b| {
        b.iter(|| zstd::bulk::compress(black_box(&encoded), 0).expect("zstd"))
    });
    group.bench_function("build_and_encode", |b| {
        b.iter(|| {
            build_batch(black_box(&samples))
                .finish(header())
                .encode_to_vec()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_decode, bench_fold, bench_encode);
criterion_main!(benches);
