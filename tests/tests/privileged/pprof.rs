//! Go's own profiles next to the agent's: a real Go service with
//! `net/http/pprof` (tests/workloads/gopprof.go) is profiled by the agent
//! while its own CPU profile of the same time is fetched and uploaded, and
//! the collector scrapes its other profiles. The uploaded CPU profile and
//! the eBPF one must agree on the top functions; the mutex profile must
//! name the contended function, the allocs profile the allocating one; bad
//! uploads are refused while the collector keeps serving. A second test
//! finds Go services from pod annotations (a fake API server) and scrapes
//! them, counting unreachable and oversize targets.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use profiler_collector::scrape::{GoProfile, ScrapeConfig, Target};

use crate::support::{collector::*, *};

/// (stack, value) lines of `/api/v1/folded` for a type and selector.
fn folded_of(addr: std::net::SocketAddr, type_: &str, query: &str) -> Vec<(Vec<String>, u64)> {
    let text = String::from_utf8(http_get(
        addr,
        &format!(
            "/api/v1/folded?start=now-1h&type={type_}&query={}",
            query
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace('=', "%3D")
        ),
    ))
    .unwrap();
    text.lines()
        .filter_map(|l| {
            let (stack, value) = l.rsplit_once(' ')?;
            Some((
                stack.split(';').map(str::to_string).collect(),
                value.parse().ok()?,
            ))
        })
        .collect()
}

/// Each function's share of the value as the leaf (self).
fn self_shares(stacks: &[(Vec<String>, u64)]) -> std::collections::HashMap<String, f64> {
    let total: u64 = stacks.iter().map(|(_, v)| v).sum();
    let mut out = std::collections::HashMap::new();
    for (frames, v) in stacks {
        // The user-space leaf: kernel frames (`_[k]`) under a Go function
        // are the time it spent in the kernel, which pprof puts on the Go
        // function itself. Go's profiler also puts the time of a goroutine
        // being preempted on `runtime.asyncPreempt` above the interrupted
        // function, where the kernel's sample sees that function.
        let leaf = frames
            .iter()
            .rev()
            .find(|f| !f.ends_with("_[k]") && f.as_str() != "runtime.asyncPreempt")
            .cloned()
            .unwrap_or_default();
        *out.entry(leaf).or_insert(0.0) += *v as f64 / total.max(1) as f64;
    }
    out
}

fn contains_frame(stacks: &[(Vec<String>, u64)], function: &str) -> u64 {
    stacks
        .iter()
        .filter(|(f, _)| f.iter().any(|x| x.trim_end_matches("_[i]") == function))
        .map(|(_, v)| v)
        .sum()
}

/// The heaviest stacks, for failure messages.
fn heaviest_of(stacks: &[(Vec<String>, u64)]) -> String {
    let mut sorted: Vec<_> = stacks.iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.1));
    sorted
        .iter()
        .take(15)
        .map(|(f, v)| format!("{} {v}", f.join(";")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn metrics_text(addr: std::net::SocketAddr) -> String {
    String::from_utf8(http_get(addr, "/metrics")).unwrap()
}

#[test]
fn go_service_scraped_and_profiled_by_the_agent_agree() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let bin = workload("gopprof");
    let mut child = Command::new(&bin)
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let child = Child(child);

    let mut config = collector_config(&dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    config.scrape = ScrapeConfig {
        targets: vec![Target {
            url: format!("http://{addr}/debug/pprof"),
            // `process` is named from the profile, as the agent names it.
            labels: vec![("service".into(), "gopprof".into())],
            // Go serves one CPU profile at a time: the test takes it.
            profiles: vec![
                GoProfile::Mutex,
                GoProfile::Block,
                GoProfile::Allocs,
                GoProfile::Heap,
                GoProfile::Goroutine,
            ],
        }],
        interval: Duration::from_secs(6),
        seconds: 5,
        kubernetes: None,
    };
    let c = rt
        .block_on(profiler_collector::server::start(config))
        .expect("collector starts");

    // The agent profiles the process while Go profiles itself, then the
    // Go profile is uploaded.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut opts = options(vec![pid], 12.0, 199);
    opts.export = Some(export_to(&c));
    let (_rec, cpu) = record_with(&opts, || {
        let (agent, addr) = (agent.clone(), addr.clone());
        std::thread::spawn(move || {
            let mut resp = agent
                .get(&format!("http://{addr}/debug/pprof/profile?seconds=10"))
                .call()
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_vec()
                .unwrap()
        })
    });
    let cpu = cpu.join().expect("Go's CPU profile of the run");
    let post = |body: &[u8], query: &str| {
        let mut resp = agent
            .post(&format!(
                "http://{}/api/v1/ingest/pprof?{query}",
                c.http_addr
            ))
            .send(body)
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap_or_default())
    };
    let (status, body) = post(&cpu, "service=gopprof");
    assert_eq!(status, 200, "{body}");
    let (status, again) = post(&cpu, "service=gopprof");
    assert_eq!(status, 200);
    assert!(
        again.contains("\"batches_stored\":0"),
        "sent twice, stored once: {again}"
    );
    let scraped = |profile: &str| {
        metric(
            &metrics_text(c.http_addr),
            &format!(
                "profiler_scrapes_total{{target=\"{addr}\",profile=\"{profile}\",outcome=\"stored\"}}"
            ),
        )
    };
    let all_scraped = within(Duration::from_secs(30), || {
        ["mutex", "block", "allocs", "heap", "goroutine"]
            .iter()
            .all(|p| scraped(p) >= 2)
            .then_some(())
    });
    assert!(
        all_scraped.is_some(),
        "scrapes missing:\n{}",
        metrics_text(c.http_addr)
    );

    // The eBPF profile and Go's own, of the same process.
    let ebpf = folded_of(c.http_addr, "cpu", &format!("{{pid=\"{pid}\"}}"));
    let go = folded_of(c.http_addr, "cpu_nanoseconds", "{service=\"gopprof\"}");
    assert!(!go.is_empty(), "no Go CPU profile stored");
    // The runtime's own view keeps its root: the process label.
    assert!(go.iter().all(|(f, _)| f[0] == "gopprof"), "{go:?}");
    let (ours, theirs) = (self_shares(&ebpf), self_shares(&go));
    let mut top: Vec<(&String, &f64)> = theirs.iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(a.1));
    for (function, share) in top.iter().take(3) {
        let mine = ours.get(*function).copied().unwrap_or(0.0);
        eprintln!(
            "{function}: Go's profile {:.1} %, eBPF {:.1} %",
            *share * 100.0,
            mine * 100.0
        );
        assert!(
            (mine - **share).abs() <= 0.05,
            "{function}: Go's profile {:.1} % but eBPF {:.1} %",
            *share * 100.0,
            mine * 100.0
        );
    }
    // The known split, inclusive: main.spinA 3 : main.spinB 1 of the spin
    // loop. Go's profiler, whose per-thread CPU timers fire on the kernel's
    // tick (4 ms at CONFIG_HZ=250), reads it less exactly than the
    // cpu-clock event: both must see it, the eBPF one within 5 points.
    let share = |stacks: &[(Vec<String>, u64)], f: &str| {
        contains_frame(stacks, f) as f64 / stacks.iter().map(|(_, v)| v).sum::<u64>().max(1) as f64
    };
    for function in ["main.spinA", "main.spinB", "main.contendedLock"] {
        eprintln!(
            "{function} (total): Go's profile {:.1} %, eBPF {:.1} %",
            share(&go, function) * 100.0,
            share(&ebpf, function) * 100.0
        );
    }
    let split = |stacks: &[(Vec<String>, u64)]| {
        let (a, b) = (share(stacks, "main.spinA"), share(stacks, "main.spinB"));
        a / (a + b).max(f64::MIN_POSITIVE)
    };
    let (ebpf_split, go_split) = (split(&ebpf), split(&go));
    eprintln!(
        "spinA : spinB, truth 75 : 25: eBPF {:.1} %, Go's profile {:.1} %",
        ebpf_split * 100.0,
        go_split * 100.0
    );
    assert!(
        (ebpf_split - 0.75).abs() <= 0.05,
        "eBPF split {ebpf_split:.3}\n{}",
        heaviest_of(&ebpf)
    );
    assert!(
        go_split > 0.6,
        "Go's split {go_split:.3}\n{}",
        heaviest_of(&go)
    );

    // Lock contention from Go's mutex profile: the contended function.
    let delay = folded_of(c.http_addr, "delay", "{profile=\"mutex\"}");
    let delay_total: u64 = delay.iter().map(|(_, v)| v).sum();
    let in_lock = contains_frame(&delay, "main.contendedLock");
    eprintln!(
        "mutex delay {:.1} ms, {:.1} % under main.contendedLock",
        delay_total as f64 / 1e6,
        100.0 * in_lock as f64 / delay_total.max(1) as f64
    );
    assert!(
        in_lock as f64 >= 0.9 * delay_total as f64 && delay_total > 0,
        "{delay:?}"
    );
    // Allocation sites from the allocs profile.
    let space = folded_of(c.http_addr, "alloc_space", "{service=\"gopprof\"}");
    let allocated: u64 = space.iter().map(|(_, v)| v).sum();
    assert!(
        contains_frame(&space, "main.allocate") as f64 >= 0.5 * allocated as f64,
        "{space:?}"
    );
    let goroutines = folded_of(c.http_addr, "goroutine", "{service=\"gopprof\"}");
    assert!(
        contains_frame(&goroutines, "main.contendedLock") > 0
            || contains_frame(&goroutines, "main.main.func2") > 0,
        "{goroutines:?}"
    );

    // Bad uploads: refused with their reason, nothing stored.
    let bomb = {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 64 << 20]).unwrap();
        gz.finish().unwrap()
    };
    let (status, body) = post(&bomb, "service=bad");
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("too_large"), "{body}");
    for (bad, reason) in [
        (b"not a profile at all".to_vec(), "undecodable"),
        (cpu[..cpu.len() / 2].to_vec(), "bad_gzip"),
    ] {
        let (status, body) = post(&bad, "service=bad");
        assert_eq!(status, 400, "{body}");
        assert!(body.contains(reason), "{body}");
    }
    assert!(folded_of(c.http_addr, "cpu_nanoseconds", "{service=\"bad\"}").is_empty());
    assert_eq!(http_get(c.http_addr, "/healthz"), b"ok\n");

    // Side by side: the differential flame graph of the agent's profile
    // against Go's own, and the UI's button for it.
    let svg = String::from_utf8(http_get(
        c.http_addr,
        "/api/v1/diff.svg?type=cpu&base_type=cpu_nanoseconds&start=now-1h&base_start=now-1h\
         &query=%7Bprocess%3D%22gopprof%22%7D",
    ))
    .unwrap();
    assert!(
        svg.contains("main.spinA") && svg.contains("main.contendedLock"),
        "{svg}"
    );
    let dom = chromium(
        &["--dump-dom"],
        &format!(
            "http://{}/?mode=diff&type=cpu&base_type=cpu_nanoseconds&process=gopprof&base_start=now-1h",
            c.http_addr
        ),
    );
    assert!(
        dom.contains("eBPF vs Go's own CPU profile</button>")
            && !dom.contains("id=\"vs-go\" type=\"button\" hidden"),
        "{dom}"
    );
    assert!(
        dom.contains("base_type=cpu_nanoseconds"),
        "the diff's baseline: {dom}"
    );
    assert!(
        dom.contains("than in the cpu_nanoseconds baseline"),
        "{dom}"
    );
    drop(child);
    rt.block_on(c.shutdown()).unwrap();
}

/// Kills the workload when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fake Kubernetes API listing `pods` (JSON, `{API}` replaced by its own
/// port) at `/api/v1/pods`; it also serves 2 MiB answers under
/// `/big/` (an oversize pprof endpoint).
fn fake_api(rt: &tokio::runtime::Runtime, pods: String) -> std::net::SocketAddr {
    use axum::{routing::get, Router};
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let pods = pods.replace("{API}", &port.to_string());
    let app = Router::new()
        .route("/api/v1/pods", get(move || async move { pods }))
        .route("/big/{profile}", get(|| async { vec![0u8; 2 << 20] }));
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[test]
fn pods_annotated_for_scraping_are_discovered_and_scraped() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(workload("gopprof"))
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let _child = Child(child);
    // A port nothing listens on: a pod whose service is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pods = format!(
        r#"{{"items": [
          {{"metadata": {{"name": "api-5f7c9-x2x", "namespace": "shop",
                         "labels": {{"app.kubernetes.io/name": "shop-api"}},
                         "annotations": {{"profiler.dev/scrape": "true", "profiler.dev/port": "{port}",
                                          "profiler.dev/profiles": "cpu,goroutine,heap"}}}},
            "spec": {{"nodeName": "n1"}}, "status": {{"phase": "Running", "podIP": "127.0.0.1"}}}},
          {{"metadata": {{"name": "gone", "namespace": "shop",
                         "annotations": {{"profiler.dev/scrape": "true", "profiler.dev/port": "{closed}",
                                          "profiler.dev/profiles": "goroutine"}}}},
            "status": {{"phase": "Running", "podIP": "127.0.0.1"}}}},
          {{"metadata": {{"name": "huge", "namespace": "shop",
                         "annotations": {{"profiler.dev/scrape": "true", "profiler.dev/port": "{{API}}",
                                          "profiler.dev/path": "/big", "profiler.dev/profiles": "goroutine"}}}},
            "status": {{"phase": "Running", "podIP": "127.0.0.1"}}}},
          {{"metadata": {{"name": "not-asked", "namespace": "shop"}},
            "status": {{"phase": "Running", "podIP": "127.0.0.1"}}}}
        ]}}"#
    );
    let api = fake_api(&rt, pods);
    let mut config = collector_config(&dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    config.max_message_bytes = 1 << 20;
    config.scrape = ScrapeConfig {
        targets: vec![],
        interval: Duration::from_secs(2),
        seconds: 1,
        kubernetes: Some(profiler_collector::scrape::kubernetes::Discovery {
            api_url: format!("http://{api}"),
            token_file: None,
            ca_pem: None,
            namespace: None,
        }),
    };
    let c = rt
        .block_on(profiler_collector::server::start(config))
        .expect("collector starts");
    let instance = format!("127.0.0.1:{port}");
    let stored = within(Duration::from_secs(30), || {
        let text = metrics_text(c.http_addr);
        let count = |target: &str, p: &str, outcome: &str| {
            metric(
                &text,
                &format!(
                    "profiler_scrapes_total{{target=\"{target}\",profile=\"{p}\",outcome=\"{outcome}\"}}"
                ),
            )
        };
        (["cpu", "goroutine", "heap"]
            .iter()
            .all(|p| count(&instance, p, "stored") >= 1)
            && count(&format!("127.0.0.1:{closed}"), "goroutine", "failed") >= 1
            && count(&api.to_string(), "goroutine", "oversize") >= 1)
            .then_some(())
    });
    assert!(stored.is_some(), "{}", metrics_text(c.http_addr));
    let goroutines = folded_of(
        c.http_addr,
        "goroutine",
        "{namespace=\"shop\",pod=\"api-5f7c9-x2x\",service=\"shop-api\",node=\"n1\",process=\"gopprof\"}",
    );
    assert!(
        contains_frame(&goroutines, "main.contendedLock") > 0
            || contains_frame(&goroutines, "main.main.func2") > 0,
        "{goroutines:?}"
    );
    let inuse = folded_of(c.http_addr, "inuse_space", "{service=\"shop-api\"}");
    assert!(!inuse.is_empty(), "no heap profile stored");
    let cpu = folded_of(c.http_addr, "cpu_nanoseconds", "{pod=\"api-5f7c9-x2x\"}");
    assert!(contains_frame(&cpu, "main.spinA") > 0, "{cpu:?}");
    // Nothing of the unreachable and oversize pods.
    let huge = String::from_utf8(http_get(
        c.http_addr,
        "/api/v1/labels/pod/values?start=now-1h",
    ))
    .unwrap();
    assert!(!huge.contains("huge") && !huge.contains("gone"), "{huge}");
    // Only the profiles the pod asked for.
    let types = String::from_utf8(http_get(c.http_addr, "/api/v1/types?start=now-1h")).unwrap();
    assert!(
        !types.contains("\"delay\"") && !types.contains("alloc_space"),
        "{types}"
    );
    rt.block_on(c.shutdown()).unwrap();
}
