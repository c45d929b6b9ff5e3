//! Collector replicas on one ClickHouse behind a switch, as behind a
//! Kubernetes Service: the real agent is moved from one to the other
//! mid-request and replays what it spilled; every sample is stored once.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU16, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use crate::support::{clickhouse::ClickHouse, collector::*, *};
use profiler_agent::export::ExportOptions;
use profiler_collector::server::StoreLocation;
use profiler_testkit::Server;

/// A TCP proxy in front of collector replicas, like a Kubernetes Service:
/// new connections go to the current target; `switch_to` changes it and
/// cuts every open connection. Armed with `lose_next_answer`, it cuts the
/// connection instead of passing on the first answer to a request (a
/// batch stored by one replica, the agent never hearing of it).
struct Switch {
    port: u16,
    target: Arc<AtomicU16>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    lose: Arc<Lose>,
}

/// The "lose the next answer" trap: armed, then a request passes, then the
/// answer to it is dropped with the connection.
#[derive(Default)]
struct Lose {
    armed: AtomicBool,
    request_seen: AtomicBool,
    sprung: AtomicBool,
}

impl Switch {
    fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = Self {
            port,
            target: Arc::new(AtomicU16::new(target)),
            open: Arc::default(),
            stop: Arc::default(),
            lose: Arc::default(),
        };
        let (target, open, stop, lose) = (
            s.target.clone(),
            s.open.clone(),
            s.stop.clone(),
            s.lose.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target.load(Ordering::Relaxed)))
                else {
                    continue;
                };
                let mut open = open.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    lose.clone(),
                    true,
                );
                pipe(server, client, lose.clone(), false);
            }
        });
        s
    }

    /// Loses the answer to the next request (waits up to 3 s for one);
    /// whether it did.
    fn lose_next_answer(&self) -> bool {
        self.lose.sprung.store(false, Ordering::SeqCst);
        self.lose.request_seen.store(false, Ordering::SeqCst);
        self.lose.armed.store(true, Ordering::SeqCst);
        let sprung = within(Duration::from_secs(3), || {
            self.lose.sprung.load(Ordering::SeqCst).then_some(())
        })
        .is_some();
        if !sprung {
            self.lose.armed.store(false, Ordering::SeqCst);
        }
        sprung
    }

    fn switch_to(&self, target: u16) {
        self.target.store(target, Ordering::Relaxed);
        for conn in self.open.lock().unwrap().drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.switch_to(0);
    }
}

/// Copies `from` to `to` (`upstream`: agent to collector) until either
/// closes or the trap springs.
fn pipe(mut from: TcpStream, mut to: TcpStream, lose: Arc<Lose>, upstream: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if lose.armed.load(Ordering::SeqCst) {
                // A batch is hundreds of bytes; HTTP/2 housekeeping less.
                if upstream && n > 200 {
                    lose.request_seen.store(true, Ordering::SeqCst);
                } else if !upstream
                    && lose.request_seen.load(Ordering::SeqCst)
                    && lose.armed.swap(false, Ordering::SeqCst)
                {
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    lose.sprung.store(true, Ordering::SeqCst);
                    break;
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

/// Two collectors on one ClickHouse. The real agent reaches them through a
/// switch that moves it from one to the other every 0.7 s, cutting its
/// connection mid-request; it retries and replays its spilled batches to
/// whichever it reaches. A synthetic agent sends every third batch to both.
/// Both collectors then serve exactly what was sampled, once.
#[test]
fn agent_switching_between_two_collectors_with_replays_keeps_totals_exact() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let ch = ClickHouse::start();
    let rt = runtime();
    let store = || StoreLocation::ClickHouse(ch.store_url("profiles").parse().unwrap());
    let a = start_collector_on(&rt, store());
    let b = start_collector_on(&rt, store());
    let (a_port, b_port) = (a.grpc_addr.port(), b.grpc_addr.port());
    let switch = Switch::start(a_port);

    let synthetic = std::thread::spawn(move || {
        push_batches(&[a_port, b_port], "syn", 45, 7, |seq| match seq % 3 {
            0 => vec![0, 1],
            1 => vec![0],
            _ => vec![1],
        })
    });
    let chain = Workload::spawn(&workload("chain"), &["12"]);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(vec![chain.pid()], 6.0, 99);
    opts.export = Some(ExportOptions {
        collector: format!("http://127.0.0.1:{}", switch.port),
        node: "switching-agent".into(),
        queue_bytes: 1,
        flush_timeout: Duration::from_secs(30),
        spill_dir: Some(dir.path().join("spill")),
        spill_bytes: 16 << 20,
        security: Default::default(),
        protocol: Default::default(),
        headers: Vec::new(),
    });
    // Every 0.7 s: the answer to a batch is lost, then the agent is moved
    // to the other collector, where it resends that batch.
    let switching = Arc::new(AtomicBool::new(true));
    let switch = Arc::new(switch);
    let switcher = {
        let (switching, switch) = (switching.clone(), switch.clone());
        std::thread::spawn(move || {
            let (mut to_b, mut switches, mut lost) = (true, 0, 0);
            while switching.load(Ordering::Relaxed) {
                // The workload's pace: a switch every 0.7 s.
                std::thread::sleep(Duration::from_millis(700));
                lost += u32::from(switch.lose_next_answer());
                switch.switch_to(if to_b { b_port } else { a_port });
                to_b = !to_b;
                switches += 1;
            }
            (switches, lost)
        })
    };
    let (rec, _) = record_with(&opts, || ());
    switching.store(false, Ordering::Relaxed);
    let (switches, lost) = switcher.join().unwrap();
    let pushed = synthetic.join().unwrap();

    let stats = rec.export.as_ref().unwrap();
    assert_all_delivered(stats);
    assert!(switches >= 5, "the agent was moved {switches} times");
    assert!(
        stats.send_failures.load(Ordering::Relaxed) > 0,
        "the cut connections reached the agent"
    );
    assert!(lost >= 2, "answers lost: {lost}");
    for c in [&a, &b] {
        assert!(
            c.metrics.batches_stored.get() > 5,
            "both collectors stored batches"
        );
    }
    let resent_elsewhere: u64 = [&a, &b]
        .iter()
        .map(|c| c.metrics.batches_duplicate.get())
        .sum();
    assert!(
        resent_elsewhere > 15,
        "batches stored by one collector were resent to the other: {resent_elsewhere} \
         (15 by the synthetic agent; the real agent's answers lost: {lost})"
    );
    let recorded = rec.counters.get(profiler_common::Counter::Recorded);
    assert!(recorded > 100, "only {recorded} samples recorded");
    assert_eq!(pushed.acked, 45 * 7);
    assert!(
        pushed.duplicates >= 15,
        "every third batch was stored by one collector and acknowledged as stored by the other ({} duplicates)",
        pushed.duplicates
    );
    for c in [&a, &b] {
        assert_eq!(
            node_total(c.http_addr, "switching-agent"),
            recorded,
            "stored vs recorded, as served by {}",
            c.http_addr
        );
        assert_eq!(node_total(c.http_addr, "syn"), 45 * 7);
    }
    rt.block_on(a.shutdown()).unwrap();
    rt.block_on(b.shutdown()).unwrap();
}
