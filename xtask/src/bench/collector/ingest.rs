//! Loading the stores: batches through the collector's gRPC server (one
//! client, then many), or straight into the store with `Store::insert_many`,
//! with the CPU time of the collector's threads.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

#[allow(unused_imports)]
use super::*;

#[derive(Default, Clone, Copy)]
pub(crate) struct Sent {
    pub(crate) batches: u64,
    pub(crate) samples: u64,
    pub(crate) rows: u64,
    pub(crate) retries: u64,
}

/// Sends batches from `rx` until it is closed, retrying push-back.
pub(crate) async fn client(
    mut grpc: IngestClient<Channel>,
    rx: Arc<Mutex<mpsc::Receiver<Batch>>>,
) -> anyhow::Result<Sent> {
    let mut sent = Sent::default();
    loop {
        let Some(b) = rx.lock().await.recv().await else {
            return Ok(sent);
        };
        let rows = b.samples.len() as u64;
        loop {
            match grpc.push_batch(b.clone()).await {
                Ok(ack) => {
                    sent.samples += ack.into_inner().samples;
                    break;
                }
                Err(s) if matches!(s.code(), Code::ResourceExhausted | Code::Unavailable) => {
                    sent.retries += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(s) => anyhow::bail!("batch rejected: {s}"),
            }
        }
        sent.batches += 1;
        sent.rows += rows;
    }
}

/// CPU seconds (user + system) of process `pid` so far (the ClickHouse
/// server; its merges and inserts run in its own threads).
pub(crate) fn pid_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// CPU seconds (user + system) of this process so far, and of each of the
/// collector's threads (its runtime's threads are named `collector`, its
/// writer `store-writer`) by thread id: a thread that ends between two
/// readings (an idle blocking-pool thread of an earlier run) must not take
/// its earlier CPU time out of the sum, see [`collector_cpu`].
pub(crate) fn cpu_seconds() -> (f64, HashMap<String, f64>) {
    let ticks = |stat: &str| -> (String, f64) {
        let (head, rest) = stat.rsplit_once(')').unwrap_or(("", ""));
        let name = head
            .split_once('(')
            .map(|(_, n)| n)
            .unwrap_or("")
            .to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15; 11 and 12 after the ')'.
        let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        (name, (t(11) + t(12)) / 100.0)
    };
    let process = ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default()).1;
    let mut collector = HashMap::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let (name, secs) = ticks(&stat);
            if name.starts_with("collector") || name.starts_with("store-writer") {
                collector.insert(t.file_name().to_string_lossy().into_owned(), secs);
            }
        }
    }
    (process, collector)
}

/// CPU seconds the collector's threads used between two readings of
/// [`cpu_seconds`]: per thread, so threads that ended count nothing.
pub(crate) fn collector_cpu(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> f64 {
    after
        .iter()
        .map(|(tid, secs)| secs - before.get(tid).copied().unwrap_or(0.0))
        .sum()
}

pub(crate) struct Load {
    /// Commits (groups) and time spent writing them, in seconds.
    pub(crate) commits: u64,
    pub(crate) write_secs: f64,
    pub(crate) sent: Sent,
    pub(crate) secs: f64,
    pub(crate) process_cpu: f64,
    pub(crate) collector_cpu: f64,
    /// CPU of the ClickHouse server over the same time (0 for SQLite).
    pub(crate) server_cpu: f64,
}

/// Loads windows `[from, to)` of every agent with `clients` clients.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn load(
    addr: std::net::SocketAddr,
    clients: usize,
    windows: std::ops::Range<u64>,
    first_agent_window: (usize, u64),
    limit: Option<usize>,
    args: Arc<Args>,
    nodes: Arc<Vec<Node>>,
    apps: Arc<Vec<App>>,
    now: i64,
    total_windows: u64,
    server_pid: Option<u32>,
) -> anyhow::Result<(Load, (usize, u64))> {
    let (tx, rx) = mpsc::channel::<Batch>(256);
    let rx = Arc::new(Mutex::new(rx));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let grpc = IngestClient::connect(format!("http://{addr}"))
            .await?
            .send_compressed(CompressionEncoding::Zstd);
        tasks.push(tokio::spawn(client(grpc, rx.clone())));
    }
    // Batches are generated on a thread of their own, ahead of the clients.
    let producer = tokio::task::spawn_blocking(move || {
        let (mut a0, w0) = first_agent_window;
        let mut made = 0usize;
        for w in w0.max(windows.start)..windows.end {
            let end = now - (total_windows - 1 - w) as i64 * WINDOW_NS;
            for a in a0..args.agents {
                if limit.is_some_and(|l| made >= l) {
                    return (a, w);
                }
                let b = batch(&nodes[a], a, &apps, w, end, &args);
                if tx.blocking_send(b).is_err() {
                    return (a, w);
                }
                made += 1;
            }
            a0 = 0;
        }
        (0, windows.end)
    });
    // Fill the queue before timing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t0, (p0, c0)) = (Instant::now(), cpu_seconds());
    let s0 = server_pid.map(pid_cpu).unwrap_or(0.0);
    let mut total = Sent::default();
    for t in tasks {
        let s = t.await??;
        total.batches += s.batches;
        total.samples += s.samples;
        total.rows += s.rows;
        total.retries += s.retries;
    }
    let next = producer.await?;
    let (p1, c1) = cpu_seconds();
    let s1 = server_pid.map(pid_cpu).unwrap_or(0.0);
    Ok((
        Load {
            commits: 0,
            write_secs: 0.0,
            sent: total,
            secs: t0.elapsed().as_secs_f64(),
            process_cpu: p1 - p0,
            collector_cpu: collector_cpu(&c0, &c1),
            server_cpu: s1 - s0,
        },
        next,
    ))
}

impl Load {
    pub(crate) fn rate(&self) -> f64 {
        self.sent.samples as f64 / self.secs.max(1e-9)
    }
    pub(crate) fn per_cpu(&self) -> f64 {
        self.sent.samples as f64 / self.collector_cpu.max(1e-9)
    }
    pub(crate) fn print(&self, what: &str) {
        let s = self.sent;
        println!(
            "ingest, {what}: {} batches, {} samples ({} rows) in {:.1} s: {:.0} samples/s, {:.0} batches/s; \
             collector CPU {:.1} s = {:.0} samples per CPU-second (whole process {:.1} s); {} push-backs; \
             {} commits: {:.1} batches and {:.1} ms of writing each",
            s.batches,
            s.samples,
            s.rows,
            self.secs,
            self.rate(),
            s.batches as f64 / self.secs.max(1e-9),
            self.collector_cpu,
            self.per_cpu(),
            self.process_cpu,
            s.retries,
            self.commits,
            s.batches as f64 / self.commits.max(1) as f64,
            1e3 * self.write_secs / self.commits.max(1) as f64
        );
    }
}

/// Batches written straight into the store.
pub(crate) struct Direct {
    pub(crate) batches: u64,
    pub(crate) samples: u64,
    pub(crate) commits: u64,
    pub(crate) secs: f64,
    /// CPU of the writing thread alone.
    pub(crate) cpu: f64,
    /// CPU of the ClickHouse server meanwhile (0 for SQLite).
    pub(crate) server_cpu: f64,
}

/// Opens the store `load_direct` writes with, on its writing thread.
pub(crate) type OpenStore = Box<dyn FnOnce() -> anyhow::Result<Box<dyn Store>> + Send>;

pub(crate) const DIRECT_GROUP: usize = 64;

/// CPU seconds of the calling thread.
pub(crate) fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// Writes the remaining windows (from `from`) of every agent with
/// `Store::insert_many`, in groups of what is waiting (up to
/// `DIRECT_GROUP`), as the collector's writer does; batches are generated
/// and validated on another thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_direct(
    open: OpenStore,
    server_pid: Option<u32>,
    from: (usize, u64),
    windows: u64,
    args: Arc<Args>,
    nodes: Arc<Vec<Node>>,
    apps: Arc<Vec<App>>,
    now: i64,
) -> anyhow::Result<Direct> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<ValidBatch>(512);
    let generator = std::thread::spawn(move || {
        let limits = Limits::default();
        let (mut a0, w0) = from;
        for w in w0..windows {
            let end = now - (windows - 1 - w) as i64 * WINDOW_NS;
            for a in a0..args.agents {
                let b = batch(&nodes[a], a, &apps, w, end, &args);
                let valid = validate(&b, &limits, now_ns()).expect("bench batches are valid");
                if tx.send(valid).is_err() {
                    return;
                }
            }
            a0 = 0;
        }
    });
    let t0 = Instant::now();
    let s0 = server_pid.map(pid_cpu).unwrap_or(0.0);
    let writer = std::thread::Builder::new()
        .name("direct-store".into())
        .spawn(move || -> anyhow::Result<Direct> {
            let cpu0 = thread_cpu();
            let mut store = open()?;
            let mut d = Direct {
                batches: 0,
                samples: 0,
                commits: 0,
                secs: 0.0,
                cpu: 0.0,
                server_cpu: 0.0,
            };
            let mut group = Vec::with_capacity(DIRECT_GROUP);
            while let Ok(first) = rx.recv() {
                group.push(first);
                while group.len() < DIRECT_GROUP {
                    match rx.try_recv() {
                        Ok(b) => group.push(b),
                        Err(_) => break,
                    }
                }
                for r in store.insert_many(&group) {
                    if let Stored::New { samples } = r? {
                        d.samples += samples;
                        d.batches += 1;
                    }
                }
                d.commits += 1;
                group.clear();
            }
            d.cpu = thread_cpu() - cpu0;
            Ok(d)
        })?;
    generator
        .join()
        .map_err(|_| anyhow::anyhow!("generator panicked"))?;
    let mut d = writer
        .join()
        .map_err(|_| anyhow::anyhow!("direct writer panicked"))??;
    d.secs = t0.elapsed().as_secs_f64();
    d.server_cpu = server_pid.map(pid_cpu).unwrap_or(0.0) - s0;
    Ok(d)
}

/// Ingest through the collector's gRPC server: `args.single_client_batches`
/// from one client, then up to `args.grpc_batches` in all from
/// `args.clients` clients. Returns both loads and the (agent, window) the
/// rest of the loaded hours starts at.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn grpc_ingest(
    c: &RunningCollector,
    args: &Arc<Args>,
    nodes: &Arc<Vec<Node>>,
    apps: &Arc<Vec<App>>,
    now: i64,
    windows: u64,
    server_pid: Option<u32>,
) -> anyhow::Result<(Load, Load, (usize, u64))> {
    let writes = || {
        (
            c.metrics.store_commits.get(),
            c.metrics.store_write_seconds(),
        )
    };
    let w0 = writes();
    let (mut one, next) = load(
        c.grpc_addr,
        1,
        0..windows,
        (0, 0),
        Some(args.single_client_batches),
        args.clone(),
        nodes.clone(),
        apps.clone(),
        now,
        windows,
        server_pid,
    )
    .await?;
    let w1 = writes();
    (one.commits, one.write_secs) = (w1.0 - w0.0, w1.1 - w0.1);
    one.print("1 client");
    let total_batches = args.agents * windows as usize;
    let grpc_batches = if args.grpc_batches == 0 {
        total_batches
    } else {
        args.grpc_batches.min(total_batches)
    };
    let (mut many, next) = load(
        c.grpc_addr,
        args.clients,
        0..windows,
        next,
        Some(grpc_batches.saturating_sub(args.single_client_batches)),
        args.clone(),
        nodes.clone(),
        apps.clone(),
        now,
        windows,
        server_pid,
    )
    .await?;
    let w2 = writes();
    (many.commits, many.write_secs) = (w2.0 - w1.0, w2.1 - w1.1);
    many.print(&format!("{} clients", args.clients));
    Ok((one, many, next))
}
