//! Two sample types through the real agent → collector → store → API path:
//! the agent's pipeline (a scripted source and a table symbolizer in place of
//! the kernel; the real label step, collector sink and exporter) sends
//! windows holding `cpu` samples (counts) and `off_cpu` time (nanoseconds,
//! far above 2^32) to a real collector on SQLite and on ClickHouse (Debian's
//! 18.16 and the current engine), and to local folded files as `run -o`
//! does; the HTTP API serves back exactly what was sent, per type and with
//! its unit. Needs no root.

use std::{
    collections::BTreeMap,
    io::Read,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::support::{clickhouse::ClickHouse, collector::*};
use profiler_agent::{
    drain::{Counters, RawSample, RawWindow},
    export::Exporter,
    metrics::AgentMetrics,
    pipeline::{
        label::ProcessFacts,
        local::output_path,
        testing::{FakeProcesses, FakeSource, TableSymbolizer},
        CollectorSink, LocalSink, Pipeline, PipelineOptions, Stages,
    },
    sample_type::SampleType,
};
use profiler_collector::server::{RunningCollector, StoreLocation};
use profiler_testkit::{current::CurrentClickHouse, Server};

const NODE: &str = "types-node";

/// The stacks the scripted agent sends, per type, as the collector must
/// serve them (`process;root;...;leaf` → summed value).
fn expected(sample_type: SampleType) -> BTreeMap<String, u64> {
    let lines: &[(&str, u64)] = match sample_type {
        SampleType::Cpu => &[
            ("web;main;serve;handle", 40 + 5 + 2),
            ("db;main;vacuum", 7 + 1),
        ],
        SampleType::OffCpu => &[
            // One window's value alone is above 2^32.
            ("db;main;vacuum;futex_wait_[k]", 5_000_000_000_123),
            // Two threads and two windows of the same stack, summing above
            // 2^32.
            (
                "web;main;serve;read_[k]",
                3_000_000_007 + 2_000_000_003 + 1_500_000_002,
            ),
            // 2^32 + 1: cut to 32 bits, it reads as 1.
            ("worker;schedule_[k]", (1 << 32) + 1),
        ],
    };
    lines.iter().map(|(s, v)| (s.to_string(), *v)).collect()
}

fn total(sample_type: SampleType) -> u64 {
    expected(sample_type).values().sum()
}

fn sample(
    sample_type: SampleType,
    tgid: u32,
    comm: &str,
    user: &[u64],
    kernel: &[u64],
    value: u64,
) -> RawSample {
    RawSample {
        thread_state: None,
        waker: Vec::new(),
        tgid,
        comm: comm.into(),
        user: user.to_vec(),
        user_end: None,
        kernel: kernel.to_vec(),
        sample_type,
        value,
    }
}

fn window(samples: Vec<RawSample>) -> RawWindow {
    RawWindow {
        samples,
        ..RawWindow::default()
    }
}

/// Three drains (the third empty) and the final one: seven batches, a `cpu`
/// one per drain and an `off_cpu` one per drain that has such samples.
/// `web` (pid 100, threads named `tokio-rt` and `web`) and `db` (pid 200)
/// are known processes; `worker` (pid 300) exited before its first sight:
/// its labels come from the thread's name.
fn scripted_source(stop: Arc<AtomicBool>) -> FakeSource {
    use SampleType::{Cpu, OffCpu};
    FakeSource::new(
        vec![
            window(vec![
                sample(Cpu, 100, "tokio-rt", &[3, 2, 1], &[], 40),
                sample(Cpu, 200, "db", &[5, 1], &[], 7),
                sample(OffCpu, 100, "tokio-rt", &[2, 1], &[900], 3_000_000_007),
                // The same process and names from another thread and another
                // address in `serve`: the same labels and stack, summed.
                sample(OffCpu, 100, "web", &[4, 1], &[900], 2_000_000_003),
                sample(Cpu, 100, "web", &[6, 2, 1], &[], 5),
                sample(OffCpu, 200, "db", &[5, 1], &[901], 5_000_000_000_123),
            ]),
            window(vec![
                sample(OffCpu, 100, "tokio-rt", &[2, 1], &[900], 1_500_000_002),
                sample(Cpu, 100, "tokio-rt", &[3, 2, 1], &[], 2),
            ]),
            window(vec![]),
        ],
        window(vec![
            sample(Cpu, 200, "db", &[5, 1], &[], 1),
            sample(OffCpu, 300, "worker", &[], &[902], (1 << 32) + 1),
        ]),
        Counters::default(),
    )
    .stop_when_done(stop)
}

const BATCHES: u64 = 7;

fn symbolizer() -> TableSymbolizer {
    TableSymbolizer::default()
        .user(100, 1, "main")
        .user(100, 2, "serve")
        .user(100, 3, "handle")
        .user(100, 4, "serve")
        .user(100, 6, "handle")
        .user(200, 1, "main")
        .user(200, 5, "vacuum")
        .kernel(900, "read")
        .kernel(901, "futex_wait")
        .kernel(902, "schedule")
}

fn processes() -> FakeProcesses {
    FakeProcesses::default()
        .with(
            100,
            ProcessFacts {
                name: Some("web".into()),
                exe: Some("/srv/web".into()),
                cgroup: None,
                go_version: None,
            },
        )
        .with(
            200,
            ProcessFacts {
                name: Some("db".into()),
                exe: Some("/usr/bin/db".into()),
                cgroup: None,
                go_version: None,
            },
        )
}

/// Runs the agent's pipeline against the collector `c` until the scripted
/// windows are drained and every batch is acknowledged (or the flush
/// timeout passed), with the local sink too (as `run -o` does); checks the
/// agent's own accounting and the folded files it wrote.
fn run_agent(c: &RunningCollector) {
    let dir = tempfile::tempdir().unwrap();
    let stacks = dir.path().join("stacks.txt");
    let mut local = LocalSink::open(None, Some(&stacks), NODE).expect("the local outputs open");
    let mut export = export_to(c);
    export.node = NODE.into();
    let mut sink = CollectorSink::new(Exporter::start(export).expect("the exporter starts"));
    let stats = sink.stats().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let mut source = scripted_source(stop.clone());
    let mut symbolizer = symbolizer();
    let processes = processes();
    let metrics = Arc::new(AgentMetrics::new(Some(stats.clone()), Arc::default()));
    let options = PipelineOptions {
        node: NODE.into(),
        frequency: 99,
        drain_interval: Duration::from_millis(50),
        duration: Some(Duration::from_secs(30)),
        progress: false,
        memory_limit_bytes: None,
    };
    let report = Pipeline::new(options, metrics)
        .run(
            Stages {
                source: &mut source,
                symbolizer: &mut symbolizer,
                processes: &processes,
                pods: None,
                sinks: vec![&mut sink, &mut local],
            },
            &stop,
        )
        .expect("the pipeline runs");
    assert!(
        stop.load(Ordering::Relaxed),
        "the run ended by draining the script, not by its duration"
    );
    for sample_type in SampleType::ALL {
        let sent = total(sample_type);
        assert_eq!(
            report.drained.get(&sample_type),
            Some(&sent),
            "{sample_type}"
        );
        assert_eq!(
            report.delivered.get(&sample_type),
            Some(&sent),
            "{sample_type}: delivered to the sink = drained"
        );
    }
    for sample_type in SampleType::ALL {
        let path = output_path(&stacks, sample_type);
        let written =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            folded_lines(&written),
            expected(sample_type),
            "{}",
            path.display()
        );
    }
    // The sink's finish waited for the acknowledgements; what it reports is
    // the agent's last word on delivery.
    assert_eq!(stats.batches_queued.load(Ordering::Relaxed), BATCHES);
    assert_all_delivered(&stats);
    // Samples are CPU samples: off-CPU values are nanoseconds.
    assert_eq!(
        stats.samples_acked.load(Ordering::Relaxed),
        total(SampleType::Cpu),
        "the collector acknowledged every CPU sample"
    );
}

fn text(c: &RunningCollector, path: &str) -> String {
    String::from_utf8(http_get(c.http_addr, path)).unwrap()
}

fn json<T: serde::de::DeserializeOwned>(c: &RunningCollector, path: &str) -> T {
    let body = text(c, path);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// `/api/v1/folded` for the last hour, of `type_` (`""`: no `type=`) and
/// `query` (URL-encoded; `""`: none), as stack → value; every line must
/// parse.
fn folded_of(c: &RunningCollector, type_: &str, query: &str) -> BTreeMap<String, u64> {
    let mut path = "/api/v1/folded?start=now-1h".to_string();
    if !type_.is_empty() {
        path += &format!("&type={type_}");
    }
    if !query.is_empty() {
        path += &format!("&query={query}");
    }
    folded_lines(&text(c, &path))
}

/// Folded text as stack → value; every line must parse.
fn folded_lines(body: &str) -> BTreeMap<String, u64> {
    body.lines()
        .map(|line| {
            let (stack, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a folded line: {line:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|e| panic!("{line:?}: value: {e}"));
            (stack.to_string(), value)
        })
        .collect()
}

/// `n` with thousands separated by commas, as the flame graph writes it.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// `{name="value"}`, URL-encoded.
fn selector(name: &str, value: &str) -> String {
    format!("%7B{name}%3D%22{value}%22%7D")
}

/// The pprof profile served for `type_`: its sample types, period type and
/// stacks (`process;root;...;leaf` → value), read from the protobuf.
struct Pprof {
    sample_types: Vec<(String, String)>,
    period_type: (String, String),
    stacks: BTreeMap<String, u64>,
}

fn pprof_of(c: &RunningCollector, type_: &str) -> Pprof {
    use profiler_proto::pprof::Profile;
    use prost::Message;
    let gz = http_get(
        c.http_addr,
        &format!("/api/v1/pprof?type={type_}&start=now-1h"),
    );
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut raw)
        .expect("the pprof answer is gzipped");
    let p = Profile::decode(raw.as_slice()).expect("the pprof answer decodes");
    let s = |i: i64| p.string_table[i as usize].clone();
    let value_type = |v: &profiler_proto::pprof::ValueType| (s(v.r#type), s(v.unit));
    let function_name = |id: u64| {
        let f = p.function.iter().find(|f| f.id == id).expect("function");
        s(f.name)
    };
    let mut stacks = BTreeMap::new();
    for sample in &p.sample {
        assert_eq!(sample.value.len(), p.sample_type.len());
        // Leaf first; each location's lines innermost first.
        let mut frames: Vec<String> = sample
            .location_id
            .iter()
            .flat_map(|id| {
                let loc = p.location.iter().find(|l| l.id == *id).expect("location");
                loc.line.iter().map(|l| function_name(l.function_id))
            })
            .collect();
        frames.reverse();
        *stacks.entry(frames.join(";")).or_default() += sample.value[0] as u64;
    }
    Pprof {
        sample_types: p.sample_type.iter().map(value_type).collect(),
        period_type: p.period_type.as_ref().map(value_type).unwrap_or_default(),
        stacks,
    }
}

/// What a user reads back from the collector `c` after the agent ran: both
/// types with their units, each type's stacks and values exactly as sent and
/// only those, labels per type, selectors, pprof.
fn check_api(c: &RunningCollector) {
    let types: serde_json::Value = json(c, "/api/v1/types?start=now-1h&end=now");
    assert_eq!(
        types,
        serde_json::json!([
            {"type": "cpu", "unit": "samples"},
            {"type": "off_cpu", "unit": "nanoseconds"},
            {"type": "wall", "unit": "nanoseconds"}
        ])
    );

    // The wall view: CPU samples (at 99 Hz) as the time they stand for,
    // plus the waits, per stack; for one process's thread as for all.
    let mut wall = expected(SampleType::OffCpu);
    for (stack, samples) in expected(SampleType::Cpu) {
        *wall.entry(stack).or_default() += samples * 1_000_000_000 / 99;
    }
    assert_eq!(folded_of(c, "wall", ""), wall, "wall stacks");
    let web: BTreeMap<String, u64> = wall
        .into_iter()
        .filter(|(s, _)| s.starts_with("web;"))
        .collect();
    assert_eq!(folded_of(c, "wall", &selector("process", "web")), web);

    let off = folded_of(c, "off_cpu", "");
    assert_eq!(off, expected(SampleType::OffCpu), "off_cpu stacks");
    assert_eq!(off.values().sum::<u64>(), total(SampleType::OffCpu));
    let cpu = folded_of(c, "cpu", "");
    assert_eq!(cpu, expected(SampleType::Cpu), "cpu stacks");
    assert_eq!(cpu.values().sum::<u64>(), total(SampleType::Cpu));
    assert_eq!(
        folded_of(c, "", ""),
        expected(SampleType::Cpu),
        "the default type is cpu"
    );

    // Labels as the agent's label step set them, usable in selectors, per
    // type.
    let only = |sample_type, stack: &str| -> BTreeMap<String, u64> {
        expected(sample_type)
            .into_iter()
            .filter(|(s, _)| s == stack)
            .collect()
    };
    assert_eq!(
        folded_of(c, "off_cpu", &selector("process", "web")),
        only(SampleType::OffCpu, "web;main;serve;read_[k]")
    );
    assert_eq!(
        folded_of(c, "off_cpu", &selector("exe", "/usr/bin/db")),
        only(SampleType::OffCpu, "db;main;vacuum;futex_wait_[k]")
    );
    assert_eq!(
        folded_of(c, "off_cpu", &selector("pid", "300")),
        only(SampleType::OffCpu, "worker;schedule_[k]")
    );
    assert_eq!(
        folded_of(c, "off_cpu", &selector("node", NODE)),
        expected(SampleType::OffCpu)
    );
    assert_eq!(
        folded_of(c, "cpu", &selector("process", "web")),
        only(SampleType::Cpu, "web;main;serve;handle")
    );
    assert!(
        folded_of(c, "cpu", &selector("process", "worker")).is_empty(),
        "worker had only off-CPU time"
    );

    // `thread`: where a sampled thread's name is not its process's.
    let names: Vec<String> = json(c, "/api/v1/labels?type=off_cpu&start=now-1h");
    assert_eq!(names, ["exe", "node", "pid", "process", "thread"]);
    let values: Vec<String> = json(c, "/api/v1/labels/process/values?type=off_cpu&start=now-1h");
    assert_eq!(values, ["db", "web", "worker"]);
    let values: Vec<String> = json(c, "/api/v1/labels/process/values?type=cpu&start=now-1h");
    assert_eq!(values, ["db", "web"]);
    let values: Vec<String> = json(c, "/api/v1/labels/pid/values?type=off_cpu&start=now-1h");
    assert_eq!(values, ["100", "200", "300"]);

    let top: serde_json::Value = json(c, "/api/v1/top?type=off_cpu&start=now-1h");
    assert_eq!(
        (top["unit"].as_str(), top["total"].as_u64()),
        (Some("nanoseconds"), Some(total(SampleType::OffCpu))),
        "{top}"
    );

    let off = pprof_of(c, "off_cpu");
    let nanoseconds = ("off_cpu".to_string(), "nanoseconds".to_string());
    assert_eq!(off.period_type, nanoseconds);
    assert_eq!(off.sample_types, [nanoseconds]);
    assert_eq!(off.stacks, expected(SampleType::OffCpu));
    assert_eq!(
        off.stacks.values().sum::<u64>(),
        total(SampleType::OffCpu),
        "pprof total"
    );
    // The flame graph's root frame names the whole total, in the unit.
    let svg = text(c, "/api/v1/flamegraph.svg?type=off_cpu&start=now-1h");
    assert!(svg.contains(">off_cpu (nanoseconds): all"), "{svg}");
    let all = format!("all ({} ns, 100%)", grouped(total(SampleType::OffCpu)));
    assert!(svg.contains(&all), "{all} in {svg}");
    let svg = text(c, "/api/v1/flamegraph.svg?type=cpu&start=now-1h");
    let all = format!("all ({} samples, 100%)", total(SampleType::Cpu));
    assert!(svg.contains(&all), "{all} in {svg}");

    let cpu = pprof_of(c, "cpu");
    assert_eq!(cpu.sample_types, [("samples".into(), "count".into())]);
    assert_eq!(cpu.stacks, expected(SampleType::Cpu));
}

/// The agent's run against a collector on `store`, then the API checks.
fn through_the_collector(store: StoreLocation) {
    let rt = runtime();
    let c = start_collector_on(&rt, store);
    run_agent(&c);
    // Acknowledged means stored; the collector's `/metrics` says so too.
    assert_eq!(wait_for_batches_stored(c.http_addr, BATCHES - 1), BATCHES);
    check_api(&c);
    rt.block_on(c.shutdown()).unwrap();
}

#[test]
fn cpu_and_off_cpu_from_the_agent_read_back_exact_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    through_the_collector(StoreLocation::Sqlite(dir.path().join("profiles.db")));
}

#[test]
fn cpu_and_off_cpu_from_the_agent_read_back_exact_on_clickhouse_18() {
    let ch = ClickHouse::start();
    through_the_collector(StoreLocation::ClickHouse(
        ch.store_url("types").parse().unwrap(),
    ));
}

#[test]
fn cpu_and_off_cpu_from_the_agent_read_back_exact_on_current_clickhouse() {
    let ch = CurrentClickHouse::start();
    through_the_collector(StoreLocation::ClickHouse(
        ch.store_url("types").parse().unwrap(),
    ));
}
