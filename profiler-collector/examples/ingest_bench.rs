//! Rough figures for the collector: ingest rate into SQLite and query latency
//! over one hour of data. `cargo run --release -p profiler-collector --example ingest_bench`
//! (the full benchmark suite is `cargo xtask bench`).
use std::time::Instant;

use profiler_collector::{
    ingest::now_ns,
    server::{self, CollectorConfig, StoreLocation},
};
use profiler_proto::v1::{ingest_client::IngestClient, Batch, Label, LabelSet, Sample, Stack};
use tonic::codec::CompressionEncoding;

/// A window of one agent: `processes` processes, `stacks` distinct stacks of
/// 20 frames, 2000 samples, ending at `end_ns`.
fn batch(agent: usize, seq: u64, end_ns: i64, processes: usize, stacks: usize) -> Batch {
    let mut strings = vec![String::new()];
    for name in ["node", "process", "pid", "exe"] {
        strings.push(name.into());
    }
    let base = strings.len() as u32;
    for f in 0..200 {
        strings.push(format!("module{}::function_{f}", f % 7));
    }
    let labels_base = strings.len() as u32;
    strings.push(format!("node-{agent}"));
    for p in 0..processes {
        strings.push(format!("proc{p}"));
        strings.push(format!("{}", 1000 + p));
        strings.push(format!("/usr/bin/proc{p}"));
    }
    let label_sets = (0..processes)
        .map(|p| {
            let v = labels_base + 1 + 3 * p as u32;
            LabelSet {
                labels: vec![
                    Label {
                        name: 1,
                        value: labels_base,
                    },
                    Label { name: 2, value: v },
                    Label {
                        name: 3,
                        value: v + 1,
                    },
                    Label {
                        name: 4,
                        value: v + 2,
                    },
                ],
            }
        })
        .collect();
    let stacks_v: Vec<Stack> = (0..stacks)
        .map(|s| Stack {
            frames: (0..20)
                .map(|d| base + ((s * 7 + d * 13) % 200) as u32)
                .collect(),
        })
        .collect();
    let samples = (0..stacks)
        .map(|s| Sample {
            label_set: (s % processes) as u32,
            stack: s as u32,
            count: (2000 / stacks).max(1) as i64,
        })
        .collect();
    Batch {
        agent_id: format!("bench-{agent}"),
        sequence: seq,
        node: format!("node-{agent}"),
        agent_version: "bench".into(),
        window_start_unix_nanos: end_ns - 10_000_000_000,
        window_end_unix_nanos: end_ns,
        frequency_hz: 99,
        strings: strings.into_iter().map(String::into_bytes).collect(),
        stacks: stacks_v,
        label_sets,
        samples,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = server::start(CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        store: StoreLocation::Sqlite(dir.path().join("bench.db")),
        ..CollectorConfig::default()
    })
    .await?;
    let mut client = IngestClient::connect(format!("http://{}", c.grpc_addr))
        .await?
        .send_compressed(CompressionEncoding::Zstd);
    // One hour of 10 s windows from 10 agents.
    let now = now_ns();
    let (agents, windows) = (10usize, 360u64);
    let mut samples = 0u64;
    let started = Instant::now();
    for w in 0..windows {
        let end = now - (windows - w) as i64 * 10_000_000_000;
        for a in 0..agents {
            let b = batch(a, w + 1, end, 20, 200);
            samples += client.push_batch(b).await?.into_inner().samples;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ingest: {} batches, {samples} samples in {secs:.1} s = {:.0} samples/s ({:.0} batches/s)",
        agents as u64 * windows,
        samples as f64 / secs,
        (agents as u64 * windows) as f64 / secs
    );
    let url = |q: &str| format!("http://{}{q}", c.http_addr);
    for (what, q) in [
        (
            "flame graph SVG, 1 h, all",
            "/api/v1/flamegraph.svg?start=now-1h",
        ),
        ("folded, 1 h, all", "/api/v1/folded?start=now-1h"),
        (
            "flame graph SVG, 1 h, one process",
            "/api/v1/flamegraph.svg?start=now-1h&query=%7Bprocess%3D%22proc3%22%7D",
        ),
        ("top 20, 1 h, all", "/api/v1/top?start=now-1h"),
    ] {
        let u = url(q);
        let t = Instant::now();
        let bytes = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
            let mut r = ureq::get(&u).call()?;
            Ok(r.body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_vec()?
                .len())
        })
        .await??;
        println!("query {what}: {:?} ({bytes} bytes)", t.elapsed());
    }
    let size = std::fs::metadata(dir.path().join("bench.db"))?.len();
    println!(
        "store: {:.1} MiB on disk for {samples} samples",
        size as f64 / (1 << 20) as f64
    );
    c.shutdown().await?;
    Ok(())
}
