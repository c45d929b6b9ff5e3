//! Off-CPU time: where threads wait, in nanoseconds, from `sched_switch`
//! and `finish_task_switch`, with the same unwinder as CPU samples.

use std::time::Duration;

use crate::support::*;
use profiler_agent::{config::OffCpuOptions, sample_type::SampleType};

/// Nanoseconds of a process's off-CPU stacks that satisfy `pred`.
fn ns_where(
    profile: &profiler_agent::fold::FoldedProfile,
    process: &str,
    pred: impl Fn(&[&str]) -> bool,
) -> u64 {
    count_where(profile, process, pred).0
}

#[test]
fn sleeps_split_by_the_function_that_waited() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let bin = workload("offcpu");
    let w = Workload::spawn(&bin, &["sleep", "30"]);
    wait_for_exec(w.pid(), "offcpu");
    let mut opts = options(vec![w.pid()], 4.0, 99);
    opts.sampler.off_cpu = Some(OffCpuOptions::default());
    let (rec, ()) = record_with(&opts, || ());
    let off = rec
        .other_profiles
        .get(&SampleType::OffCpu)
        .unwrap_or_else(|| panic!("no off-CPU profile; counters: {:?}", rec.counters));
    let long = ns_where(off, "offcpu", |f| f.contains(&"sleep_long"));
    let short = ns_where(off, "offcpu", |f| f.contains(&"sleep_short"));
    let total = count_where(off, "offcpu", |_| true).1;
    let stacks = dump(off, "offcpu");
    // Whole stacks: from main through the waiting function into the
    // kernel's sleep (the scheduler's own frames are left out).
    let whole = ns_where(off, "offcpu", |f| {
        has_chain(f, &["main", "sleeper", "sleep_long"])
            && f.iter()
                .any(|k| k.ends_with("_[k]") && k.contains("nanosleep"))
    });
    assert!(
        whole * 100 >= long * 95,
        "sleep_long's time should have whole stacks into the kernel's nanosleep \
         ({whole} of {long} ns):\n{stacks}"
    );
    let share = long as f64 / (long + short).max(1) as f64;
    assert!(
        (0.70..=0.80).contains(&share),
        "sleep_long should have 3/4 of the sleeping time, has {:.1} % \
         ({long} vs {short} ns):\n{stacks}",
        share * 100.0
    );
    // One thread, off the CPU nearly all the time: its off-CPU total is
    // the wall time of the recording.
    let wall = rec.duration.as_nanos() as f64;
    let ratio = total as f64 / wall;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "off-CPU total {:.3} s for {:.3} s of wall time ({:.1} %):\n{stacks}",
        total as f64 / 1e9,
        wall / 1e9,
        ratio * 100.0
    );
    assert!(rec.counters.get(profiler_common::Counter::OffCpuRecorded) > 0);
    assert_eq!(rec.counters.get(profiler_common::Counter::OffCpuMapFull), 0);
    assert_eq!(
        rec.counters.get(profiler_common::Counter::OffCpuStartLost),
        0
    );
}

/// The stacks of `process` in the agent's profile, as the collector holds
/// them when a selection picks that process.
fn as_stored(
    profile: &profiler_agent::fold::FoldedProfile,
    process: &str,
) -> profiler_collector::model::Profile {
    let mut stored = profiler_collector::model::Profile::default();
    for (stack, value) in profile.iter() {
        if stack.split(';').next() == Some(process) {
            stored.add(stack, value);
        }
    }
    stored
}

#[test]
fn lock_waits_are_found_at_their_lock_site() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let bin = workload("offcpu");
    // A service already running when the agent starts, recorded by pid
    // (its mappings loaded at the start); its contention begins once the
    // agent is attached (a line on its stdin).
    let mut child = std::process::Command::new(&bin)
        .args(["mutex", "3", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for_exec(pid, "offcpu");
    let maps = format!("/proc/{pid}/maps");
    wait_until(
        std::time::Duration::from_secs(5),
        "the workload has mapped libc",
        || std::fs::read_to_string(&maps).is_ok_and(|m| m.contains("libc")),
    );
    let mut opts = options(vec![pid], 4.5, 99);
    // Every wait, however short: the total is compared with the workload's.
    opts.sampler.off_cpu = Some(OffCpuOptions {
        min_block: std::time::Duration::ZERO,
        sample: 1.0,
        max_switches_per_sec: None,
    });
    let (rec, out) = record_with(&opts, || {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    });
    assert!(out.status.success(), "workload failed: {out:?}");
    let measured: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let off = rec
        .other_profiles
        .get(&SampleType::OffCpu)
        .expect("an off-CPU profile");
    let view = profiler_collector::contention::contention(&as_stored(off, "offcpu"), 5);
    let stacks = dump(off, "offcpu");
    let top = view
        .functions
        .first()
        .unwrap_or_else(|| panic!("no futex waits found:\n{stacks}"));
    assert_eq!(top.0, "take_lock", "{view:?}\n{stacks}");
    let take_lock = top.1;
    let ratio = take_lock as f64 / measured as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "futex waits at take_lock {:.3} s, the workload measured {:.3} s of waiting \
         ({:.1} %):\n{stacks}",
        take_lock as f64 / 1e9,
        measured as f64 / 1e9,
        ratio * 100.0
    );
    assert!(
        view.sites[0]
            .stack
            .starts_with(&["start_thread".to_string()])
            || view.sites[0].stack.iter().any(|f| f == "contender"),
        "the lock site's stack reaches the thread's function: {:?}",
        view.sites[0].stack
    );
    // The holder's site: the lock is released (and the waiting threads
    // woken) in hold_lock, by threads of the same process.
    let holder = view.sites[0]
        .holders
        .first()
        .unwrap_or_else(|| panic!("no holder found for the lock site:\n{view:?}\n{stacks}"));
    assert_eq!(holder.site, "hold_lock", "{view:?}\n{stacks}");
    assert!(
        holder.stack.iter().any(|f| f == "contender"),
        "the holder's stack reaches the thread's function: {:?}",
        holder.stack
    );
    assert_eq!(
        view.holder_functions.first().map(|(f, _)| f.as_str()),
        Some("hold_lock"),
        "{view:?}"
    );
    let known = view.woken_known as f64 / view.futex_wait.max(1) as f64;
    assert!(
        known >= 0.9,
        "a waker is known for {:.1} % of the futex waits only:\n{stacks}",
        known * 100.0
    );
    assert!(
        rec.counters
            .get(profiler_common::Counter::OffCpuWakerStacks)
            > 0
    );
    eprintln!(
        "lock: {:.3} s waited at take_lock, {:.3} s measured by the workload; waker known \
         for {:.1} % of futex waits, {:.1} % of the site's wait released in {}",
        take_lock as f64 / 1e9,
        measured as f64 / 1e9,
        known * 100.0,
        holder.wait as f64 * 100.0 / view.sites[0].wait.max(1) as f64,
        holder.site
    );
}

/// Host context switches since boot (/proc/stat `ctxt`), as the agent's
/// off-CPU guard reads them.
fn context_switches() -> u64 {
    profiler_agent::kernel::guard::host_context_switches().expect("/proc/stat has a ctxt line")
}

/// User + system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Starts the release agent's `run` at 19 Hz sending to `grpc` (plain
/// text), with `args` added and `RUST_LOG=rust_log`: the agent, its
/// `/metrics` URL and the file its log goes to (in `dir`).
fn run_agent(
    grpc: &str,
    dir: &std::path::Path,
    node: &str,
    args: &[&str],
    rust_log: &str,
) -> (Workload, String, std::path::PathBuf) {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_path = dir.join("agent.log");
    let agent = Workload::spawn_command(
        std::process::Command::new(release_agent_binary())
            .args(["run", "--collector", &format!("http://{grpc}")])
            .args(["--plaintext", "--no-kube", "--no-progress", "--node", node])
            .args(["-F", "19"])
            .args(args)
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .env("RUST_LOG", rust_log)
            .stderr(std::fs::File::create(&log_path).unwrap()),
    );
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    (agent, url, log_path)
}

/// A host doing 50 k context switches a second or more for a minute, the
/// agent (its release build, as deployed) always on (`run` at its
/// defaults, off-CPU recording included, but never paused for the switch
/// rate, which the next test covers): every switch its
/// programs saw is accounted for by what became of it, the agent stays
/// within its memory ceiling, and the off-CPU time it reports for the
/// waiting threads is the time they waited.
#[test]
fn a_storm_of_context_switches_is_counted_and_bounded() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    use crate::support::collector::*;
    const THREADS: u64 = 60;
    const SECONDS: f64 = 60.0;
    const CEILING_MIB: u64 = 64;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    // 60 threads each waiting 1 ms in a loop: ~2 switches per wait.
    let storm = Workload::spawn(&workload("switch"), &[&THREADS.to_string(), "1000"]);
    wait_for_exec(storm.pid(), "switch");
    // Its defaults: off-CPU recording on, the 64 MiB ceiling; recording
    // kept on through the storm.
    let (mut agent, url, log_path) = run_agent(
        &c.grpc_addr.to_string(),
        dir.path(),
        "storm",
        &["--off-cpu-max-switches", "0"],
        "warn",
    );
    let pid = agent.pid();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Attached: its programs count switches.
    let first = within(Duration::from_secs(30), || {
        let text = scrape(&url)?;
        (metric(
            &text,
            "profiler_agent_off_cpu_switches_total{outcome=\"seen\"}",
        ) > 0)
            .then_some(text)
    })
    .unwrap_or_else(|| panic!("the agent never counted a switch:\n{}", log()));
    let (ctxt0, cpu0, t0) = (
        context_switches(),
        cpu_seconds(pid),
        std::time::Instant::now(),
    );
    let seen0 = metric(
        &first,
        "profiler_agent_off_cpu_switches_total{outcome=\"seen\"}",
    );
    // The storm lasts a minute; the agent's heap (anonymous memory) is
    // watched meanwhile.
    let mut peak = 0;
    while t0.elapsed().as_secs_f64() < SECONDS {
        assert!(
            agent.0.try_wait().unwrap().is_none(),
            "the agent exited:\n{}",
            log()
        );
        peak = peak.max(status_bytes(pid, "RssAnon:"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let text = scrape(&url).expect("metrics");
    let elapsed = t0.elapsed().as_secs_f64();
    let switches = (context_switches() - ctxt0) as f64 / elapsed;
    let agent_cpu = (cpu_seconds(pid) - cpu0) / elapsed;
    peak = peak.max(status_bytes(pid, "RssAnon:"));
    let hwm = status_bytes(pid, "VmHWM:");
    let m = |outcome: &str| {
        metric(
            &text,
            &format!("profiler_agent_off_cpu_switches_total{{outcome=\"{outcome}\"}}"),
        )
    };
    let dropped = |reason: &str| {
        metric(
            &text,
            &format!("profiler_agent_samples_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    let seen = m("seen");
    let accounted = m("recorded")
        + m("short")
        + m("not_sampled")
        + m("filtered_out")
        + m("kernel_thread")
        + dropped("off_cpu_start_lost")
        + dropped("off_cpu_map_full")
        + dropped("off_cpu_paused");
    eprintln!(
        "storm: {switches:.0} switches/s on the host; the agent's programs saw {:.0}/s; \
         agent CPU {:.2} % of one core; heap at most {:.1} MiB (peak RSS {:.1} MiB); \
         seen {seen}, accounted {accounted}; \
         recorded {}, short {}, not sampled {}, kernel threads {}, start lost {}, map full {}",
        (seen - seen0) as f64 / elapsed,
        agent_cpu * 100.0,
        peak as f64 / (1 << 20) as f64,
        hwm as f64 / (1 << 20) as f64,
        m("recorded"),
        m("short"),
        m("not_sampled"),
        m("kernel_thread"),
        dropped("off_cpu_start_lost"),
        dropped("off_cpu_map_full"),
    );
    assert!(
        switches >= 50_000.0,
        "the host did {switches:.0} switches a second, not a storm"
    );
    // Every switch seen is accounted for, but those of threads that are
    // off the CPU right now (each thread of the host at most once).
    let threads_on_host = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_dir(e.ok()?.path().join("task")).ok())
        .map(|t| t.count() as u64)
        .sum::<u64>();
    assert!(
        accounted <= seen && seen - accounted <= threads_on_host + 1000,
        "seen {seen}, accounted for {accounted} ({threads_on_host} threads on the host)\n{text}"
    );
    eprintln!(
        "memory shedding actions: {}",
        metric(&text, "profiler_agent_memory_shed_total")
    );
    assert_eq!(
        metric(&text, "profiler_agent_export_batches_dropped_total"),
        0,
        "windows were dropped:\n{text}"
    );
    assert!(
        peak <= CEILING_MIB << 20,
        "heap {:.1} MiB over the {CEILING_MIB} MiB ceiling",
        peak as f64 / (1 << 20) as f64
    );

    // Stopped, it flushes; the waits it reports are the threads' time off
    // the CPU (each waits almost all the time), scaled back from the 5 %
    // of switches it timed.
    // The programs were attached before `t0` (the metrics come up later):
    // for as long as the switches they had seen by then took at the rate
    // measured since.
    let rate = (seen - seen0) as f64 / elapsed;
    let attached_for = t0.elapsed().as_secs_f64() + seen0 as f64 / rate;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let stopped = within(Duration::from_secs(30), || agent.0.try_wait().unwrap());
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the agent did not stop cleanly: {stopped:?}\n{}",
        log()
    );
    let waited: u64 = serde_json::from_slice::<serde_json::Value>(&http_get(
        c.http_addr,
        "/api/v1/top?type=off_cpu&start=now-1h&n=1&query=%7Bprocess%3D%22switch%22%7D",
    ))
    .unwrap()["total"]
        .as_u64()
        .unwrap_or(0);
    let expected = THREADS as f64 * attached_for * 1e9;
    let ratio = waited as f64 / expected;
    eprintln!(
        "off-CPU time of the storm: {:.1} s, {:.1} % of {THREADS} threads × {attached_for:.1} s",
        waited as f64 / 1e9,
        ratio * 100.0
    );
    assert!(
        (0.85..=1.1).contains(&ratio),
        "the threads waited {:.1} s by the agent, about {:.1} s by the clock\n{}\n{}",
        waited as f64 / 1e9,
        expected / 1e9,
        text.lines()
            .filter(|l| l.contains("export") || l.contains("dropped") || l.contains("memory"))
            .collect::<Vec<_>>()
            .join("\n"),
        log()
    );
    rt.block_on(c.shutdown()).unwrap();
}

/// Above `--off-cpu-max-switches` context switches a second the agent
/// pauses off-CPU recording (its programs detached: no switch is seen), and
/// resumes below 80 % of it; a wait that spans the pause is counted as cut
/// (`off_cpu_paused`), never recorded with the pause in it.
#[test]
fn off_cpu_recording_pauses_while_the_host_switches_too_often() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    use crate::support::collector::*;
    const SLEEP_S: u64 = 12;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    // Every switch timed, so the long wait below surely is.
    let (mut agent, url, log_path) = run_agent(
        &c.grpc_addr.to_string(),
        dir.path(),
        "guard",
        &[
            "--drain-interval",
            "1s",
            "--off-cpu-sample",
            "1",
            "--off-cpu-max-switches",
            "20000",
        ],
        "warn,profiler_agent::kernel=info",
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let seen = |text: &str| {
        metric(
            text,
            "profiler_agent_off_cpu_switches_total{outcome=\"seen\"}",
        )
    };
    let url_ref: &str = &url;
    let paused_now = |want: u64| {
        move || {
            let text = scrape(url_ref)?;
            (text.contains("profiler_agent_off_cpu_paused ")
                && metric(&text, "profiler_agent_off_cpu_paused") == want)
                .then_some(text)
        }
    };
    within(Duration::from_secs(30), || {
        scrape(&url).filter(|t| seen(t) > 0)
    })
    .unwrap_or_else(|| panic!("the agent never counted a switch:\n{}", log()));
    // One thread that waits 12 s, timed before the pause and back after it.
    let sleeper = Workload::spawn(
        &workload("switch"),
        &["1", &(SLEEP_S * 1_000_000).to_string()],
    );
    wait_for_exec(sleeper.pid(), "switch");
    let slept_from = std::time::Instant::now();
    // About 65 k switches a second: over the limit.
    let storm = Workload::spawn(&workload("switch"), &["60", "1000"]);
    let paused = within(Duration::from_secs(15), paused_now(1))
        .unwrap_or_else(|| panic!("recording did not pause in the storm:\n{}", log()));
    assert!(
        log().contains("off-CPU recording paused"),
        "no warning logged:\n{}",
        log()
    );
    // Paused: the programs see no switch (two windows later, the same count).
    std::thread::sleep(Duration::from_millis(2500));
    let still = scrape(&url).expect("metrics");
    assert_eq!(metric(&still, "profiler_agent_off_cpu_paused"), 1);
    assert_eq!(seen(&still), seen(&paused), "switches seen while paused");
    drop(storm);
    let resumed = within(Duration::from_secs(15), paused_now(0))
        .unwrap_or_else(|| panic!("recording did not resume after the storm:\n{}", log()));
    assert_eq!(metric(&resumed, "profiler_agent_off_cpu_pauses_total"), 1);
    assert!(log().contains("off-CPU recording resumed"), "{}", log());
    assert!(
        slept_from.elapsed() < Duration::from_secs(SLEEP_S - 1),
        "resumed {:?} after the sleeper began its {SLEEP_S} s wait: the wait does not span \
         the pause",
        slept_from.elapsed()
    );
    // Waits that spanned the pause are cut, and counted.
    let cut = within(Duration::from_secs(SLEEP_S + 10), || {
        let text = scrape(&url)?;
        (metric(
            &text,
            "profiler_agent_samples_dropped_total{reason=\"off_cpu_paused\"}",
        ) > 0
            && seen(&text) > seen(&still))
        .then_some(text)
    })
    .unwrap_or_else(|| panic!("no wait was counted as cut by the pause:\n{}", log()));
    eprintln!(
        "guard: switches seen {} before the storm ended, {} after resuming; waits cut {}",
        seen(&still),
        seen(&cut),
        metric(
            &cut,
            "profiler_agent_samples_dropped_total{reason=\"off_cpu_paused\"}"
        )
    );
    // The sleeper's wait ends after the resume (it has left the CPU twice),
    // and two windows later it is drained.
    let switched_out = || {
        std::fs::read_to_string(format!("/proc/{}/status", sleeper.pid()))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
            .trim()
            .parse::<u64>()
            .ok()
    };
    within(Duration::from_secs(SLEEP_S + 5), || {
        switched_out().filter(|&n| n >= 2)
    })
    .expect("the sleeper's wait never ended");
    let windows = metric(
        &scrape(&url).expect("metrics"),
        "profiler_agent_windows_total",
    );
    within(Duration::from_secs(10), || {
        let text = scrape(&url)?;
        (metric(&text, "profiler_agent_windows_total") >= windows + 2).then_some(())
    })
    .expect("no window drained after the sleeper's wait");
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGINT) }, 0);
    let stopped = within(Duration::from_secs(30), || agent.0.try_wait().unwrap());
    assert!(stopped.is_some_and(|s| s.success()), "{}", log());
    // No wait of the sleeper was recorded with the pause in it: its first
    // wait is cut, its second has not ended.
    let query = format!("%7Bpid%3D%22{}%22%7D", sleeper.pid());
    let waited: u64 = serde_json::from_slice::<serde_json::Value>(&http_get(
        c.http_addr,
        &format!("/api/v1/top?type=off_cpu&start=now-1h&n=1&query={query}"),
    ))
    .unwrap()["total"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        waited < 1_000_000_000,
        "the sleeper's wait across the pause was recorded: {waited} ns"
    );
}
