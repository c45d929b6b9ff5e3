//! Criterion micro-benchmarks of the collector's per-batch work: decoding a
//! batch off the wire, validating it and inserting it into the SQLite store
//! (a temporary file, WAL, `synchronous=FULL` as in production).
//!
//! One synthetic batch stands for an agent's window on a busy host: 200
//! processes, 2,000 distinct stacks of 20-40 frames. Inputs are
//! deterministic. Figures: docs/microbenchmarks.md;
//! `cargo bench -p profiler-collector` reproduces them (not run in CI).
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use profiler_collector::{
    model::ValidBatch,
    store::{sqlite::SqliteStore, Store},
    validate::{validate, Limits},
};
use profiler_proto::v1::{Batch, Label, LabelSet, Sample, Stack};
use prost::Message;

const PROCESSES: usize = 200;
const STACKS: usize = 2_000;
const FUNCTIONS: usize = 3_000;
const WINDOW_END_NS: i64 = 1_700_000_010_000_000_000;

fn depth(s: usize) -> usize {
    20 + (s * 11) % 21
}

/// A batch as the agent builds it: interned strings, one label set per
/// process (node, process, pid, exe, service), the process as root frame.
fn batch(sequence: u64) -> Batch {
    let mut strings: Vec<String> = vec![String::new()];
    for name in ["node", "process", "pid", "exe", "service", "bench-node"] {
        strings.push(name.into());
    }
    let process_base = strings.len() as u32;
    for p in 0..PROCESSES {
        strings.push(format!("worker-{p:03}"));
        strings.push(format!("{}", 1000 + p));
        strings.push(format!("/usr/bin/worker-{p:03}"));
    }
    let function_base = strings.len() as u32;
    for f in 0..FUNCTIONS {
        strings.push(format!(
            "service_{}::handlers::module_{}::Handler{}::process_request_{f}",
            f % 11,
            f % 37,
            f % 5
        ));
    }
    let label = |name: u32, value: u32| Label { name, value };
    let label_sets = (0..PROCESSES as u32)
        .map(|p| {
            let v = process_base + 3 * p;
            LabelSet {
                labels: vec![
                    label(1, 6),
                    label(2, v),
                    label(3, v + 1),
                    label(4, v + 2),
                    label(5, v),
                ],
            }
        })
        .collect();
    let stacks = (0..STACKS)
        .map(|s| {
            let mut frames = vec![process_base + 3 * (s % PROCESSES) as u32];
            frames.extend((0..depth(s)).rev().map(|d| {
                let f = if d < 4 {
                    d
                } else {
                    (s * 31 + d * 17 + (s % 13) * d) % FUNCTIONS
                };
                function_base + f as u32
            }));
            Stack { frames }
        })
        .collect();
    let samples = (0..STACKS)
        .map(|s| Sample {
            label_set: (s % PROCESSES) as u32,
            stack: s as u32,
            value: 1 + (s % 5) as i64,
        })
        .collect();
    Batch {
        agent_id: "bench-agent".into(),
        sequence,
        node: "bench-node".into(),
        agent_version: "bench".into(),
        window_start_unix_nanos: WINDOW_END_NS - 10_000_000_000,
        window_end_unix_nanos: WINDOW_END_NS,
        frequency_hz: 99,
        strings: strings.into_iter().map(String::into_bytes).collect(),
        stacks,
        label_sets,
        samples,
        sample_type: None,
    }
}

fn valid(batch: &Batch) -> ValidBatch {
    validate(batch, &Limits::default(), WINDOW_END_NS).expect("the bench batch is valid")
}

fn bench_validate(c: &mut Criterion) {
    let batch = batch(1);
    let encoded = batch.encode_to_vec();
    let samples = valid(&batch).total();
    let mut group = c.benchmark_group("collector");
    group.throughput(Throughput::Elements(samples));
    group.bench_function("decode_batch", |b| {
        b.iter(|| Batch::decode(black_box(encoded.as_slice())).expect("decodes"))
    });
    group.bench_function("validate_batch", |b| {
        b.iter(|| validate(black_box(&batch), &Limits::default(), WINDOW_END_NS).expect("valid"))
    });
    group.finish();
}

fn bench_insert(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = SqliteStore::open(&dir.path().join("bench.db")).expect("store opens");
    let template = valid(&batch(0));
    let samples = template.total();
    let mut sequence = 0u64;
    let mut group = c.benchmark_group("collector");
    group.throughput(Throughput::Elements(samples));
    // Every batch is new (its own sequence); its stacks and label sets are
    // already stored after the first, as for an agent sending every window.
    group.bench_function("sqlite_insert_batch", |b| {
        b.iter_batched(
            || {
                sequence += 1;
                let mut batch = template.clone();
                batch.sequence = sequence;
                batch
            },
            |batch| store.insert(&batch).expect("insert"),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_validate, bench_insert);
criterion_main!(benches);
