//! Fault injection between the real agent and a real collector on loopback:
//! a proxy that cuts and stalls connections mid-stream, a spill directory on
//! a full disk, and a corrupted spill file. In each, every sample the kernel
//! recorded is either stored once or counted as dropped with its reason.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use crate::support::{collector::*, *};
use profiler_agent::{
    export::{batch_samples, DropReason, ExportOptions, ExportStats},
    record::{Recorder, Recording},
    spill::Spill,
};
use profiler_common::Counter;

/// A TCP proxy to `upstream` that can cut every connection it carries, or
/// stall them (bytes are held, not forwarded, until it stops stalling).
struct Proxy {
    addr: SocketAddr,
    stalled: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, socks) = (stalled.clone(), sockets.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let mut all = socks.lock().unwrap();
                all.push(client.try_clone().unwrap());
                all.push(server.try_clone().unwrap());
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client.try_clone().unwrap()),
                ] {
                    let stalled = s.clone();
                    std::thread::spawn(move || pump(from, to, &stalled));
                }
            }
        });
        Self {
            addr,
            stalled,
            sockets,
        }
    }

    /// Closes every connection, both ways, mid-stream.
    fn cut(&self) {
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, stalled: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Stalled: the bytes are held until the stall ends.
        while stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// The agent's totals: samples recorded by the kernel, and those counted
/// dropped on the way (by any reason).
fn recorded_and_dropped(rec: &Recording) -> (u64, u64) {
    let stats = rec.export.as_ref().expect("export stats");
    (rec.counters.get(Counter::Recorded), stats.samples_dropped())
}

fn stored_total(c: &profiler_collector::server::RunningCollector) -> u64 {
    folded(c.http_addr, "%7B%7D").total()
}

/// Connections cut twice mid-stream, and stalled for 2.5 s then cut, while
/// 250 ms windows stream: the agent retries through all of it; every
/// sample arrives once, nothing is dropped.
#[test]
fn a_proxy_that_cuts_and_stalls_connections_loses_and_doubles_nothing() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let proxy = Proxy::start(c.grpc_addr);
    let chain = Workload::spawn(&workload("chain"), &["12"]);
    let mut opts = options(vec![chain.pid()], 7.0, 99);
    opts.drain_interval = Duration::from_millis(250);
    opts.export = Some(ExportOptions {
        collector: format!("http://{}", proxy.addr),
        ..export_to(&c)
    });

    let recorder = Recorder::start(&opts).expect("profiler attaches");
    let http = c.http_addr;
    let faults = std::thread::spawn(move || {
        // Each cut hits a stream that carries batches: it comes once the
        // collector has stored more through the proxy.
        let stored = wait_for_batches_stored(http, 0);
        proxy.cut();
        let stored = wait_for_batches_stored(http, stored);
        proxy.stall(true);
        // The stall itself: bytes are held for 2.5 s, past the drains.
        std::thread::sleep(Duration::from_millis(2500));
        proxy.cut();
        proxy.stall(false);
        wait_for_batches_stored(http, stored);
        proxy.cut();
        proxy
    });
    let rec = recorder.run(&AtomicBool::new(false)).unwrap();
    let _proxy = faults.join().unwrap();

    let stats = rec.export.as_ref().unwrap();
    assert!(
        stats.send_failures.load(Ordering::Relaxed) > 0,
        "the cuts were seen"
    );
    assert_all_delivered(stats);
    let (recorded, _) = recorded_and_dropped(&rec);
    assert!(recorded > 100, "{recorded} samples");
    assert_eq!(stored_total(&c), recorded, "stored vs recorded samples");
    rt.block_on(c.shutdown()).unwrap();
}

/// The OTLP sink keeps the collector sink's guarantees: with only an OTLP
/// endpoint (the collector's OTLP receiver), behind a proxy that cuts
/// connections and stalls for 2.5 s, and a memory queue that holds one
/// window (the others wait in the spill directory), every window arrives
/// once and nothing is dropped.
#[test]
fn an_otlp_endpoint_behind_cut_connections_gets_every_window_once() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let proxy = Proxy::start(c.grpc_addr);
    let chain = Workload::spawn(&workload("chain"), &["12"]);
    let mut opts = options(vec![chain.pid()], 6.0, 99);
    opts.drain_interval = Duration::from_millis(250);
    opts.otlp = Some(ExportOptions {
        protocol: profiler_agent::export::Protocol::Otlp,
        ..spill_first(format!("http://{}", proxy.addr), &dir.path().join("spill"))
    });
    let recorder = Recorder::start(&opts).expect("profiler attaches");
    let metrics = {
        let c_http = c.http_addr;
        move || String::from_utf8(http_get(c_http, "/metrics")).unwrap()
    };
    let otlp_stored = move || {
        metric(
            &metrics(),
            "profiler_imports_total{format=\"otlp\",outcome=\"stored\"}",
        )
    };
    let faults = std::thread::spawn(move || {
        let arrive = |before: u64| {
            within(Duration::from_secs(30), || {
                (otlp_stored() > before).then_some(())
            })
            .expect("OTLP profiles arrive");
        };
        arrive(0);
        proxy.cut();
        arrive(otlp_stored());
        // Held for 2.5 s, then cut: the windows of meanwhile wait in the
        // spill directory (the memory queue holds one).
        proxy.stall(true);
        std::thread::sleep(Duration::from_millis(2500));
        proxy.cut();
        proxy.stall(false);
        arrive(otlp_stored());
        proxy
    });
    let rec = recorder.run(&AtomicBool::new(false)).unwrap();
    let _proxy = faults.join().unwrap();
    assert!(rec.export.is_none(), "no collector sink");
    let stats = rec.otlp_export.as_ref().expect("OTLP export stats");
    assert!(
        stats.spill.spilled.load(Ordering::Relaxed) > 0,
        "the windows went through the spill directory"
    );
    assert_all_delivered(stats);
    let recorded = rec.counters.get(Counter::Recorded);
    assert!(recorded > 100, "{recorded} samples");
    assert_eq!(stored_total(&c), recorded, "stored vs recorded samples");
    rt.block_on(c.shutdown()).unwrap();
}

/// A memory queue that holds only the newest batch, so that everything
/// waiting goes through the spill directory.
fn spill_first(collector: String, spill_dir: &Path) -> ExportOptions {
    ExportOptions {
        collector,
        node: "test-node".into(),
        queue_bytes: 1,
        flush_timeout: Duration::from_secs(20),
        spill_dir: Some(spill_dir.to_path_buf()),
        spill_bytes: 16 << 20,
        security: Default::default(),
        protocol: Default::default(),
        headers: Vec::new(),
    }
}

/// Mounts a tmpfs of `kib` KiB at `dir` (unmounted on drop).
struct TinyDisk<'a>(&'a Path);

impl<'a> TinyDisk<'a> {
    fn mount(dir: &'a Path, kib: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs at {}", dir.display());
        Self(dir)
    }
}

impl Drop for TinyDisk<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

/// The collector is down for 3 s and the spill directory is a 16 KiB
/// disk: batches that do not fit are counted `spill_write_error` with their
/// samples; everything else arrives once the collector is up.
#[test]
fn a_full_spill_disk_counts_what_did_not_fit_and_delivers_the_rest() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let spill_dir = dir.path().join("spill");
    let _disk = TinyDisk::mount(&spill_dir, 16);
    // Held (connections refused) until the collector binds it.
    let grpc_port = profiler_testkit::net::Reserved::new();
    let grpc = grpc_port.addr().to_string();
    let chain = Workload::spawn(&workload("chain"), &["12"]);
    let mut opts = options(vec![chain.pid()], 6.0, 99);
    opts.drain_interval = Duration::from_millis(250);
    opts.export = Some(spill_first(format!("http://{grpc}"), &spill_dir));

    let recorder = Recorder::start(&opts).expect("profiler attaches");
    let handle = rt.handle().clone();
    let db = dir.path().join("p.db");
    let starter = std::thread::spawn(move || {
        // The outage itself, which must last: the agent records and spills
        // for 3 s.
        std::thread::sleep(Duration::from_millis(3000));
        grpc_port.release();
        handle
            .block_on(profiler_collector::server::start(collector_config(
                &db,
                &grpc,
                "127.0.0.1:0",
            )))
            .expect("collector starts")
    });
    let rec = recorder.run(&AtomicBool::new(false)).unwrap();
    let c = starter.join().unwrap();

    let stats = rec.export.as_ref().unwrap();
    let write_errors = stats.dropped(DropReason::SpillWriteError).batches;
    assert!(write_errors > 0, "the disk filled up");
    let drops = stats.nonzero_drops();
    assert!(
        drops
            .iter()
            .all(|(reason, _)| reason.contains("write_error")),
        "only write errors: {drops:?}"
    );
    let replayed = stats.spill.replayed.load(Ordering::Relaxed);
    assert!(replayed > 0, "what fitted was replayed");
    let (recorded, dropped) = recorded_and_dropped(&rec);
    assert!(dropped > 0);
    assert_eq!(
        stored_total(&c),
        recorded - dropped,
        "stored = recorded - counted drops ({write_errors} batches, {dropped} samples)"
    );
    rt.block_on(c.shutdown()).unwrap();
}

/// A first run with the collector down leaves its batches in the spill
/// directory; one file is then corrupted. The next run replays the rest:
/// the bad record is detected, skipped and counted, and the collector holds
/// both runs' samples except that batch's.
#[test]
fn a_corrupted_spill_file_is_skipped_and_counted_and_the_rest_replays() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let spill_dir = dir.path().join("spill");
    let chain = Workload::spawn(&workload("chain"), &["12"]);

    // Run 1: nobody listens (a port held, not listening); everything ends up
    // in the spill directory.
    let nobody = profiler_testkit::net::Reserved::new();
    let mut opts = options(vec![chain.pid()], 2.0, 99);
    opts.drain_interval = Duration::from_millis(250);
    opts.export = Some(ExportOptions {
        flush_timeout: Duration::from_secs(1),
        ..spill_first(format!("http://{}", nobody.addr()), &spill_dir)
    });
    let first = Recorder::start(&opts)
        .expect("profiler attaches")
        .run(&AtomicBool::new(false))
        .unwrap();
    let (recorded_first, dropped_first) = recorded_and_dropped(&first);
    assert_eq!(dropped_first, 0, "parked, not dropped");

    // Corrupt the oldest record, noting how many samples it held.
    let oldest_samples = {
        let mut spill = Spill::open(&spill_dir, 16 << 20).unwrap();
        assert!(spill.len() > 2, "{} spilled batches", spill.len());
        batch_samples(&spill.front(&ExportStats::default()).unwrap())
    };
    let mut files: Vec<_> = std::fs::read_dir(&spill_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&files[0], bytes).unwrap();

    // Run 2: the collector is up; the spill directory replays.
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let mut opts = options(vec![chain.pid()], 2.0, 99);
    opts.drain_interval = Duration::from_millis(250);
    opts.export = Some(spill_first(format!("http://{}", c.grpc_addr), &spill_dir));
    let second = Recorder::start(&opts)
        .expect("profiler attaches")
        .run(&AtomicBool::new(false))
        .unwrap();
    let stats = second.export.as_ref().unwrap();
    assert_eq!(stats.dropped(DropReason::SpillCorrupt).batches, 1);
    assert_eq!(
        stats.spill.replayed.load(Ordering::Relaxed) as usize,
        files.len() - 1,
        "every other spilled batch replayed"
    );
    let (recorded_second, dropped_second) = recorded_and_dropped(&second);
    assert_eq!(dropped_second, 0);
    assert_eq!(
        stored_total(&c),
        recorded_first - oldest_samples + recorded_second,
        "both runs' samples but the corrupted batch's"
    );
    assert_eq!(std::fs::read_dir(&spill_dir).unwrap().count(), 0);
    rt.block_on(c.shutdown()).unwrap();
}

/// The collector allows this agent 2 batches a second while it drains every
/// 100 ms: the agent is pushed back, waits as told, and in the end every
/// sample is stored once and nothing is dropped.
#[test]
fn an_agent_pushed_back_by_the_rate_limit_waits_and_delivers_everything() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = rt
        .block_on(profiler_collector::server::start(
            profiler_collector::server::CollectorConfig {
                agent_rate_limit: 2.0,
                agent_rate_burst: 2,
                ..collector_config(&dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0")
            },
        ))
        .expect("collector starts");
    let chain = Workload::spawn(&workload("chain"), &["8"]);
    let mut opts = options(vec![chain.pid()], 2.0, 99);
    opts.drain_interval = Duration::from_millis(100);
    opts.export = Some(ExportOptions {
        flush_timeout: Duration::from_secs(30),
        ..export_to(&c)
    });
    let rec = Recorder::start(&opts)
        .expect("profiler attaches")
        .run(&AtomicBool::new(false))
        .unwrap();
    let stats = rec.export.as_ref().unwrap();
    assert!(stats.pushed_back.load(Ordering::Relaxed) > 0, "pushed back");
    assert_all_delivered(stats);
    assert!(
        c.metrics
            .rejected(profiler_collector::metrics::Reject::RateLimited)
            > 0
    );
    let (recorded, _) = recorded_and_dropped(&rec);
    assert_eq!(stored_total(&c), recorded, "stored vs recorded samples");
    rt.block_on(c.shutdown()).unwrap();
}
