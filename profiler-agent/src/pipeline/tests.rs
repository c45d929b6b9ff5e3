//! The whole pipeline with in-memory stages: windows, drain accounting,
//! labels, both sinks and exit behaviour, without root.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use profiler_common::Counter;
use profiler_proto::v1::{
    ingest_server::{Ingest, IngestServer},
    Ack, Batch,
};

use super::{
    label::ProcessFacts,
    testing::{CollectingSink, FakePods, FakeProcesses, FakeSource, SourceCall, TableSymbolizer},
    *,
};
use crate::{
    cgroup::CgroupInfo,
    drain::{Counters, RawSample, RawWindow},
    export::{ExportOptions, Exporter},
    kube::ContainerMeta,
    metrics::AgentMetrics,
};

const POD_UID: &str = "6a1f1e3c-2b4d-4e5f-8a9b-0c1d2e3f4a5b";
const CONTAINER: &str = "3f2b4e1c9a8d7f6e5d4c3b2a19080706f5e4d3c2b1a09f8e7d6c5b4a39281706";

fn sample(tgid: u32, comm: &str, user: &[u64], kernel: &[u64], value: u64) -> RawSample {
    RawSample {
        thread_state: None,
        waker: Vec::new(),
        tgid,
        comm: comm.into(),
        user: user.to_vec(),
        user_end: None,
        kernel: kernel.to_vec(),
        sample_type: SampleType::Cpu,
        value,
    }
}

fn window(samples: Vec<RawSample>) -> RawWindow {
    RawWindow {
        samples,
        ..RawWindow::default()
    }
}

/// Addresses 1..3 of pid 10 are `main`, `serve`, `parse`; 100 is the
/// kernel's `read`.
fn symbolizer() -> TableSymbolizer {
    TableSymbolizer::default()
        .user(10, 1, "main")
        .user(10, 2, "serve")
        .user(10, 3, "parse")
        .user(11, 1, "main")
        .user(11, 5, "vacuum")
        .kernel(100, "read")
}

fn options(drain_interval: Duration, duration: Option<Duration>) -> PipelineOptions {
    PipelineOptions {
        node: "n1".into(),
        frequency: 99,
        drain_interval,
        duration,
        progress: false,
        memory_limit_bytes: None,
    }
}

fn metrics() -> Arc<AgentMetrics> {
    Arc::new(AgentMetrics::new(None, Arc::default()))
}

/// Runs the pipeline with `source`, the table symbolizer and `sinks`.
fn run(
    source: &mut FakeSource,
    processes: &FakeProcesses,
    pods: Option<&FakePods>,
    sinks: Vec<&mut dyn Sink>,
    opts: PipelineOptions,
    stop: &AtomicBool,
) -> (Result<RunReport>, Arc<AgentMetrics>) {
    let metrics = metrics();
    let mut symbolizer = symbolizer();
    let report = Pipeline::new(opts, metrics.clone()).run(
        Stages {
            source,
            symbolizer: &mut symbolizer,
            processes,
            pods: pods.map(|p| p as &dyn PodDirectory),
            sinks,
        },
        stop,
    );
    (report, metrics)
}

/// The folded lines of every cpu window a sink got.
fn folded(sink: &CollectingSink) -> Vec<String> {
    let mut lines: Vec<String> = sink
        .windows
        .iter()
        .filter(|w| w.sample_type == SampleType::Cpu)
        .flat_map(|w| {
            w.samples
                .iter()
                .map(|s| format!("{} {}", s.full_stack().join(";"), s.value))
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn windows_are_drained_on_the_interval_then_once_more_after_stopping() {
    let stop = Arc::new(AtomicBool::new(false));
    let mut source = FakeSource::new(
        vec![
            window(vec![sample(10, "srv", &[3, 2, 1], &[], 5)]),
            window(vec![]),
            window(vec![sample(10, "srv", &[2, 1], &[100], 2)]),
        ],
        window(vec![sample(10, "srv", &[3, 2, 1], &[], 1)]),
        Counters::default(),
    )
    .stop_when_done(stop.clone());
    let calls = source.calls();
    let mut sink = CollectingSink::default();
    let (report, metrics) = run(
        &mut source,
        &FakeProcesses::default(),
        None,
        vec![&mut sink],
        options(Duration::from_millis(5), None),
        &stop,
    );
    let report = report.unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            SourceCall::Drain,
            SourceCall::Drain,
            SourceCall::Drain,
            SourceCall::Stop,
            SourceCall::DrainAll
        ]
    );
    assert_eq!(report.windows, 4);
    assert_eq!(metrics.windows.load(Ordering::Relaxed), 4);
    // One cpu window per drain, the empty one included, in drain order.
    let totals: Vec<u64> = sink.windows.iter().map(|w| w.total()).collect();
    assert_eq!(totals, vec![5, 0, 2, 1]);
    assert!(sink
        .windows
        .iter()
        .all(|w| w.sample_type == SampleType::Cpu && w.frequency_hz == 99));
    assert!(
        sink.windows.windows(2).all(|w| w[0].end == w[1].start),
        "windows follow each other without gaps"
    );
    assert_eq!(
        folded(&sink),
        vec![
            "srv;main;serve;parse 1",
            "srv;main;serve;parse 5",
            "srv;main;serve;read_[k] 2",
        ]
    );
    assert_eq!(sink.finished, 1, "finish is called once");
    assert_eq!(report.max_window_stacks, 1);
    assert_eq!(report.source.cpus, 2);
}

#[test]
fn every_sample_is_delivered_or_counted_under_a_reason() {
    // The kernel saw 130 samples: 100 recorded, 12 idle, 3 filtered out,
    // 10 lost to a full count map, 5 to other errors.
    let mut counters = Counters::default();
    for (counter, value) in [
        (Counter::Samples, 130),
        (Counter::Recorded, 100),
        (Counter::IdleSkipped, 12),
        (Counter::Filtered, 3),
        (Counter::CountMapFull, 10),
        (Counter::CountOtherError, 5),
    ] {
        counters.0.insert(counter, value);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut vanished = window(vec![
        sample(10, "srv", &[3, 2, 1], &[], 40),
        // Its stack id had vanished: kept, under `[no stack]`, and counted.
        sample(11, "db", &[], &[], 7),
    ]);
    vanished.missing_stacks = 7;
    let mut cut = window(vec![sample(11, "db", &[5, 1], &[100], 30)]);
    cut.truncated_stacks = 30;
    let mut source = FakeSource::new(
        vec![vanished, cut],
        window(vec![
            sample(10, "srv", &[2, 1], &[], 20),
            sample(12, "sh", &[9], &[], 3),
        ]),
        counters.clone(),
    )
    .stop_when_done(stop.clone());
    let mut first = CollectingSink::default();
    let mut second = CollectingSink::default();
    let (report, metrics) = run(
        &mut source,
        &FakeProcesses::default(),
        None,
        vec![&mut first, &mut second],
        options(Duration::from_millis(5), None),
        &stop,
    );
    let report = report.unwrap();

    let recorded = counters.get(Counter::Recorded);
    assert_eq!(counters.unaccounted(), 0);
    let lost: u64 = crate::loss::KernelLoss::nonzero(&counters)
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert_eq!(lost, 15);
    assert_eq!(
        recorded + lost + counters.get(Counter::IdleSkipped) + counters.get(Counter::Filtered),
        counters.get(Counter::Samples)
    );
    // Every recorded sample reached every sink, exactly once.
    assert_eq!(first.total(SampleType::Cpu), recorded);
    assert_eq!(second.total(SampleType::Cpu), recorded);
    assert_eq!(report.drained.get(&SampleType::Cpu), Some(&recorded));
    assert_eq!(report.delivered.get(&SampleType::Cpu), Some(&recorded));
    assert_eq!(metrics.samples_drained.load(Ordering::Relaxed), recorded);
    assert_eq!(report.counters, counters);
    // Degraded, not lost: counted, and delivered.
    assert_eq!(report.missing_stacks, 7);
    assert_eq!(report.truncated_stacks, 30);
    assert_eq!(metrics.missing_stacks.load(Ordering::Relaxed), 7);
    assert!(folded(&first).contains(&"db;[no stack] 7".to_string()));
    assert!(folded(&first).contains(&"sh;[unknown] 3".to_string()));
}

#[test]
fn samples_are_labelled_from_their_process_and_pod() {
    let processes = FakeProcesses::default()
        .with(
            10,
            ProcessFacts {
                name: Some("server".into()),
                exe: Some("/app/server".into()),
                cgroup: Some(CgroupInfo {
                    container_id: Some(CONTAINER.into()),
                    pod_uid: Some(POD_UID.into()),
                    systemd_unit: None,
                }),
                go_version: None,
            },
        )
        .with(
            11,
            ProcessFacts {
                name: Some("postgres".into()),
                exe: Some("/usr/lib/postgresql/bin/postgres".into()),
                cgroup: Some(CgroupInfo {
                    systemd_unit: Some("postgresql.service".into()),
                    ..CgroupInfo::default()
                }),
                go_version: None,
            },
        )
        .with(
            12,
            ProcessFacts {
                name: None,
                exe: Some("/app/new".into()),
                cgroup: Some(CgroupInfo {
                    pod_uid: Some("0000ffff-2b4d-4e5f-8a9b-0c1d2e3f4a5b".into()),
                    ..CgroupInfo::default()
                }),
                go_version: None,
            },
        );
    let pods = FakePods(HashMap::from([(
        POD_UID.to_string(),
        ContainerMeta {
            pod: "web-0".into(),
            namespace: "shop".into(),
            container: Some("app".into()),
            service: "web".into(),
        },
    )]));
    let stop = AtomicBool::new(true);
    let mut source = FakeSource::new(
        vec![],
        window(vec![
            sample(10, "tokio-worker", &[2, 1], &[], 4),
            sample(10, "tokio-worker", &[3, 2, 1], &[], 1),
            sample(11, "postgres: wal", &[5, 1], &[], 2),
            sample(12, "new", &[7], &[], 1),
        ]),
        Counters::default(),
    );
    let mut sink = CollectingSink::default();
    let (report, _) = run(
        &mut source,
        &processes,
        Some(&pods),
        vec![&mut sink],
        options(Duration::from_secs(10), None),
        &stop,
    );
    report.unwrap();
    let samples = &sink.windows[0].samples;
    let by_pid = |pid: &str| {
        samples
            .iter()
            .find(|s| s.labels.get("pid") == Some(pid))
            .unwrap()
            .labels
            .clone()
    };
    assert_eq!(
        by_pid("10").as_pairs(),
        vec![
            ("node", "n1"),
            ("process", "server"),
            ("pid", "10"),
            ("thread", "tokio-worker"),
            ("exe", "/app/server"),
            ("container_id", CONTAINER),
            ("pod", "web-0"),
            ("namespace", "shop"),
            ("container", "app"),
            ("service", "web"),
        ]
    );
    assert_eq!(by_pid("11").get("service"), Some("postgresql"));
    assert_eq!(by_pid("11").get("process"), Some("postgres"));
    // A pod the watch does not know: no pod labels, no made-up service.
    let unknown = by_pid("12");
    assert_eq!(unknown.get("process"), Some("new"));
    assert_eq!(unknown.get("pod"), None);
    assert_eq!(unknown.get("service"), None);
    // The process name at first sight is the root frame, for every thread.
    assert_eq!(
        folded(&sink),
        vec![
            "new;[unknown] 1",
            "postgres;main;vacuum 2",
            "server;main;serve 4",
            "server;main;serve;parse 1",
        ]
    );
    // The samples of one process share one label set.
    assert!(Arc::ptr_eq(&samples[0].labels, &samples[1].labels));
}

#[test]
fn each_sample_type_gets_its_own_window_and_cpu_is_always_sent() {
    let stop = AtomicBool::new(true);
    let mut off = sample(10, "srv", &[2, 1], &[], 2_500_000);
    off.sample_type = SampleType::OffCpu;
    let mut source = FakeSource::new(
        vec![],
        window(vec![off, {
            let mut s = sample(10, "srv", &[1], &[], 750_000);
            s.sample_type = SampleType::OffCpu;
            s
        }]),
        Counters::default(),
    );
    let mut sink = CollectingSink::default();
    let (report, metrics) = run(
        &mut source,
        &FakeProcesses::default(),
        None,
        vec![&mut sink],
        options(Duration::from_secs(10), None),
        &stop,
    );
    let report = report.unwrap();
    let kinds: Vec<(SampleType, u32, u64)> = sink
        .windows
        .iter()
        .map(|w| (w.sample_type, w.frequency_hz, w.total()))
        .collect();
    assert_eq!(
        kinds,
        vec![(SampleType::Cpu, 99, 0), (SampleType::OffCpu, 0, 3_250_000)]
    );
    assert_eq!(report.drained.get(&SampleType::OffCpu), Some(&3_250_000));
    assert_eq!(report.drained.get(&SampleType::Cpu), None);
    assert_eq!(
        metrics.samples_drained.load(Ordering::Relaxed),
        0,
        "nanoseconds are not samples"
    );
}

#[test]
fn off_cpu_samples_carry_their_thread_state_and_cpu_samples_none() {
    let stop = AtomicBool::new(true);
    let off = |state, ns| {
        let mut s = sample(10, "srv", &[1], &[], ns);
        s.sample_type = SampleType::OffCpu;
        s.thread_state = Some(state);
        s
    };
    let mut source = FakeSource::new(
        vec![],
        window(vec![
            sample(10, "srv", &[1], &[], 5),
            off("sleeping", 3_000),
            off("uninterruptible", 1_000),
            off("sleeping", 500),
        ]),
        Counters::default(),
    );
    let mut sink = CollectingSink::default();
    let (report, _) = run(
        &mut source,
        &FakeProcesses::default(),
        None,
        vec![&mut sink],
        options(Duration::from_secs(10), None),
        &stop,
    );
    report.unwrap();
    let by_state = |t: SampleType| -> Vec<(Option<String>, u64)> {
        let mut v: Vec<(Option<String>, u64)> = sink
            .windows
            .iter()
            .filter(|w| w.sample_type == t)
            .flat_map(|w| &w.samples)
            .map(|s| (s.labels.get("thread_state").map(String::from), s.value))
            .collect();
        v.sort();
        v
    };
    assert_eq!(by_state(SampleType::Cpu), vec![(None, 5)]);
    assert_eq!(
        by_state(SampleType::OffCpu),
        vec![
            (Some("sleeping".into()), 500),
            (Some("sleeping".into()), 3_000),
            (Some("uninterruptible".into()), 1_000),
        ]
    );
    // The process's other labels are the same for both types.
    let off = &sink
        .windows
        .iter()
        .find(|w| w.sample_type == SampleType::OffCpu)
        .unwrap()
        .samples[0];
    assert_eq!(off.labels.get("pid"), Some("10"));
    assert_eq!(off.labels.process, "srv");
}

#[test]
fn the_duration_ends_the_run() {
    let stop = AtomicBool::new(false);
    let mut source = FakeSource::new(vec![], window(vec![]), Counters::default());
    let calls = source.calls();
    let mut sink = CollectingSink::default();
    let started = Instant::now();
    let (report, _) = run(
        &mut source,
        &FakeProcesses::default(),
        None,
        vec![&mut sink],
        options(Duration::from_millis(20), Some(Duration::from_millis(150))),
        &stop,
    );
    let report = report.unwrap();
    assert!(report.duration >= Duration::from_millis(150));
    assert!(started.elapsed() < Duration::from_secs(5));
    let calls = calls.lock().unwrap();
    assert_eq!(
        calls[calls.len() - 2..],
        [SourceCall::Stop, SourceCall::DrainAll]
    );
    let drains = calls.iter().filter(|c| **c == SourceCall::Drain).count();
    assert!(
        (1..=8).contains(&drains),
        "{drains} drains in 150 ms at 20 ms"
    );
    assert_eq!(sink.windows.len(), drains + 1);
    assert_eq!(sink.finished, 1);
}

#[test]
fn a_stop_before_the_first_drain_still_delivers_everything_once() {
    let stop = AtomicBool::new(true);
    let mut source = FakeSource::new(
        vec![window(vec![sample(10, "srv", &[1], &[], 9)])],
        window(vec![sample(10, "srv", &[2, 1], &[], 3)]),
        Counters::default(),
    );
    let calls = source.calls();
    let mut sink = CollectingSink::default();
    let (report, _) = run(
        &mut source,
        &FakeProcesses::default(),
        None,
        vec![&mut sink],
        options(Duration::from_secs(10), None),
        &stop,
    );
    report.unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        vec![SourceCall::Stop, SourceCall::DrainAll]
    );
    assert_eq!(folded(&sink), vec!["srv;main;serve 3"]);
    assert_eq!(sink.finished, 1);
}

#[test]
fn gone_processes_are_forgotten_by_the_source_after_their_window() {
    let stop = Arc::new(AtomicBool::new(false));
    let processes = FakeProcesses::default();
    processes.gone(10);
    processes.gone(12);
    let mut source = FakeSource::new(
        vec![window(vec![sample(10, "srv", &[1], &[], 1)])],
        window(vec![]),
        Counters::default(),
    )
    .stop_when_done(stop.clone());
    let calls = source.calls();
    let mut sink = CollectingSink::default();
    let (report, _) = run(
        &mut source,
        &processes,
        None,
        vec![&mut sink],
        options(Duration::from_millis(5), None),
        &stop,
    );
    report.unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            SourceCall::Drain,
            SourceCall::ForgetPids(vec![10, 12]),
            SourceCall::Stop,
            SourceCall::DrainAll
        ]
    );
}

#[test]
fn a_failing_source_ends_the_run_with_its_error_and_writes_nothing() {
    struct Broken;
    impl SampleSource for Broken {
        fn drain(&mut self) -> Result<RawWindow> {
            Err(crate::Error::InvalidArgument("the maps are gone".into()))
        }
        fn counters(&self) -> Result<Counters> {
            Ok(Counters::default())
        }
        fn stop(&mut self) -> Result<()> {
            Ok(())
        }
    }
    let mut sink = CollectingSink::default();
    let mut symbolizer = symbolizer();
    let err = Pipeline::new(options(Duration::from_millis(1), None), metrics())
        .run(
            Stages {
                source: &mut Broken,
                symbolizer: &mut symbolizer,
                processes: &FakeProcesses::default(),
                pods: None,
                sinks: vec![&mut sink],
            },
            &AtomicBool::new(false),
        )
        .unwrap_err();
    assert!(err.to_string().contains("the maps are gone"), "{err}");
    assert_eq!(sink.finished, 0);
}

#[test]
fn the_local_sink_writes_folded_stacks_and_flame_graphs_once() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("flame.svg");
    let txt = dir.path().join("stacks.txt");
    std::fs::write(&txt, "old content that must go\n".repeat(100)).unwrap();
    let mut local = LocalSink::open(Some(&svg), Some(&txt), "box").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut off = sample(10, "srv", &[2, 1], &[], 1_000_000);
    off.sample_type = SampleType::OffCpu;
    let mut source = FakeSource::new(
        vec![
            window(vec![sample(10, "srv", &[3, 2, 1], &[], 6)]),
            window(vec![sample(10, "srv", &[3, 2, 1], &[], 4), off]),
        ],
        window(vec![sample(11, "db", &[5, 1], &[100], 2)]),
        Counters::default(),
    )
    .stop_when_done(stop.clone());
    let (report, _) = run(
        &mut source,
        &FakeProcesses::default(),
        None,
        vec![&mut local],
        options(Duration::from_millis(5), None),
        &stop,
    );
    let report = report.unwrap();
    assert_eq!(
        std::fs::read_to_string(&txt).unwrap(),
        "db;main;vacuum;read_[k] 2\nsrv;main;serve;parse 10\n"
    );
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg_text.contains(&format!(
            "CPU profile of box — {:.1} s at 99 Hz, 12 samples",
            report.duration.as_secs_f64()
        )),
        "{svg_text}"
    );
    assert!(
        svg_text.contains("parse (10 samples, 83.33%)"),
        "{svg_text}"
    );
    // The other type, next to the given files.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("stacks.off_cpu.txt")).unwrap(),
        "srv;main;serve 1000000\n"
    );
    assert!(
        std::fs::read_to_string(dir.path().join("flame.off_cpu.svg"))
            .unwrap()
            .contains("nanoseconds")
    );
    // Written once: a second finish leaves the files as they are.
    std::fs::write(&txt, "touched\n").unwrap();
    local
        .finish(&RunEnd {
            duration: Duration::from_secs(1),
            frequency: 99,
        })
        .unwrap();
    assert_eq!(std::fs::read_to_string(&txt).unwrap(), "touched\n");
    assert_eq!(
        local.profile(SampleType::Cpu).unwrap().total(),
        12,
        "the whole run's profile stays readable"
    );
}

/// A collector that acknowledges and keeps every batch.
#[derive(Clone, Default)]
struct KeepingCollector {
    batches: Arc<Mutex<Vec<Batch>>>,
    acked_samples: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Ingest for KeepingCollector {
    async fn push_batch(
        &self,
        request: tonic::Request<Batch>,
    ) -> std::result::Result<tonic::Response<Ack>, tonic::Status> {
        let batch = request.into_inner();
        self.acked_samples
            .fetch_add(crate::export::batch_samples(&batch), Ordering::Relaxed);
        // As the collector does: the sum of the values stored, whatever
        // their unit.
        let ack = Ack {
            agent_id: batch.agent_id.clone(),
            sequence: batch.sequence,
            newly_stored: true,
            samples: batch.samples.iter().map(|s| s.value.max(0) as u64).sum(),
        };
        self.batches.lock().unwrap().push(batch);
        Ok(tonic::Response::new(ack))
    }
}

/// Serves `collector` on a port bound here and handed to the server.
fn serve(rt: &tokio::runtime::Runtime, collector: KeepingCollector) -> std::net::SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let service = IngestServer::new(collector)
        .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
        .send_compressed(tonic::codec::CompressionEncoding::Zstd);
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

#[test]
fn the_collector_sink_sends_one_batch_per_window_and_type() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = KeepingCollector::default();
    let addr = serve(&rt, server.clone());
    let exporter = Exporter::start(ExportOptions {
        collector: format!("http://{addr}"),
        node: "n1".into(),
        queue_bytes: 1 << 20,
        flush_timeout: Duration::from_secs(20),
        spill_dir: None,
        spill_bytes: 0,
        security: Default::default(),
        protocol: Default::default(),
        headers: Vec::new(),
    })
    .unwrap();
    let mut collector = CollectorSink::new(exporter);
    let stats = collector.stats().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let mut off = sample(10, "srv", &[2, 1], &[], 5_000);
    off.sample_type = SampleType::OffCpu;
    let mut source = FakeSource::new(
        vec![
            window(vec![
                sample(10, "srv", &[3, 2, 1], &[], 6),
                sample(11, "db", &[], &[], 1),
            ]),
            window(vec![]),
        ],
        window(vec![sample(10, "srv", &[2, 1], &[100], 2), off]),
        Counters::default(),
    )
    .stop_when_done(stop.clone());
    let processes = FakeProcesses::default().with(
        10,
        ProcessFacts {
            name: Some("server".into()),
            exe: Some("/app/server".into()),
            cgroup: None,
            go_version: None,
        },
    );
    let (report, _) = run(
        &mut source,
        &processes,
        None,
        vec![&mut collector],
        options(Duration::from_millis(5), None),
        &stop,
    );
    report.unwrap();

    // `finish` waited for every acknowledgement.
    assert_eq!(stats.batches_queued.load(Ordering::Relaxed), 4);
    assert_eq!(stats.batches_acked.load(Ordering::Relaxed), 4);
    // CPU samples; the off-CPU batch's nanoseconds are not samples.
    assert_eq!(stats.samples_acked.load(Ordering::Relaxed), 9);
    assert_eq!(stats.samples_dropped(), 0);
    let batches = server.batches.lock().unwrap().clone();
    let summary: Vec<(u64, String, String, u32, u64)> = batches
        .iter()
        .map(|b| {
            let t = b.sample_type.clone().unwrap_or_default();
            (
                b.sequence,
                t.r#type,
                t.unit,
                b.frequency_hz,
                b.samples.iter().map(|s| s.value as u64).sum::<u64>(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "cpu".into(), "samples".into(), 99, 7),
            // The empty window still tells the collector the agent is alive.
            (2, "cpu".into(), "samples".into(), 99, 0),
            (3, "cpu".into(), "samples".into(), 99, 2),
            (4, "off_cpu".into(), "nanoseconds".into(), 0, 5_000),
        ]
    );
    // Stacks and labels as the collector decodes them.
    type Decoded = (Vec<(String, String)>, String, i64);
    let decoded = |b: &Batch| -> Vec<Decoded> {
        let s = |i: u32| String::from_utf8(b.strings[i as usize].clone()).unwrap();
        b.samples
            .iter()
            .map(|sample| {
                let mut labels: Vec<(String, String)> = b.label_sets[sample.label_set as usize]
                    .labels
                    .iter()
                    .map(|l| (s(l.name), s(l.value)))
                    .collect();
                labels.sort();
                let stack = b.stacks[sample.stack as usize]
                    .frames
                    .iter()
                    .map(|f| s(*f))
                    .collect::<Vec<_>>()
                    .join(";");
                (labels, stack, sample.value)
            })
            .collect()
    };
    let first = decoded(&batches[0]);
    let labels = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        v.sort();
        v
    };
    assert!(first.contains(&(
        labels(&[
            ("exe", "/app/server"),
            ("node", "n1"),
            ("pid", "10"),
            ("process", "server"),
            ("thread", "srv")
        ]),
        "server;main;serve;parse".into(),
        6
    )));
    assert!(first.contains(&(
        labels(&[("node", "n1"), ("pid", "11"), ("process", "db")]),
        "db;[no stack]".into(),
        1
    )));
    assert_eq!(
        decoded(&batches[3]),
        vec![(
            labels(&[
                ("exe", "/app/server"),
                ("node", "n1"),
                ("pid", "10"),
                ("process", "server"),
                ("thread", "srv")
            ]),
            "server;main;serve".into(),
            5_000
        )]
    );
}
