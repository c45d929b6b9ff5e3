//! The collector end to end, without root: gRPC ingest on loopback into a
//! real SQLite file, then the HTTP API, as a client would use them.
use std::{process::Command, time::Duration};

use profiler_collector::server::{self, CollectorConfig, RunningCollector, StoreLocation};
use profiler_proto::v1::{ingest_client::IngestClient, Batch, Label, LabelSet, Sample, Stack};
use tonic::{codec::CompressionEncoding, Code};

const NOW_MARGIN: i64 = 5_000_000_000;

fn now_ns() -> i64 {
    profiler_collector::clock::now_ns()
}

/// A batch of process `app` (pid 42): main;hot x3, main;cold x1.
fn batch(seq: u64) -> Batch {
    let strings = [
        "", "app", "main", "hot", "cold", "process", "node", "n1", "pid", "42",
    ];
    let end = now_ns() - NOW_MARGIN;
    Batch {
        agent_id: "agent-a".into(),
        sequence: seq,
        node: "n1".into(),
        agent_version: "test".into(),
        window_start_unix_nanos: end - 10_000_000_000,
        window_end_unix_nanos: end,
        frequency_hz: 99,
        strings: strings.iter().map(|s| s.as_bytes().to_vec()).collect(),
        stacks: vec![
            Stack {
                frames: vec![1, 2, 3],
            },
            Stack {
                frames: vec![1, 2, 4],
            },
        ],
        label_sets: vec![LabelSet {
            labels: vec![
                Label { name: 5, value: 1 },
                Label { name: 6, value: 7 },
                Label { name: 8, value: 9 },
            ],
        }],
        samples: vec![
            Sample {
                label_set: 0,
                stack: 0,
                value: 3,
            },
            Sample {
                label_set: 0,
                stack: 1,
                value: 1,
            },
        ],
        sample_type: None,
    }
}

async fn start(db: &std::path::Path) -> RunningCollector {
    server::start(CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreLocation::Sqlite(db.to_path_buf()),
        max_message_bytes: 1 << 20,
        ..CollectorConfig::default()
    })
    .await
    .unwrap()
}

async fn client(c: &RunningCollector) -> IngestClient<tonic::transport::Channel> {
    IngestClient::connect(format!("http://{}", c.grpc_addr))
        .await
        .unwrap()
        .send_compressed(CompressionEncoding::Zstd)
        .max_encoding_message_size(64 << 20)
}

/// GET on the HTTP API: (status, body).
async fn get(c: &RunningCollector, path: &str) -> (u16, Vec<u8>) {
    let url = format!("http://{}{}", c.http_addr, path);
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut resp = agent.get(&url).call().unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap();
        (status, body)
    })
    .await
    .unwrap()
}

async fn text(c: &RunningCollector, path: &str) -> String {
    let (status, body) = get(c, path).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
}

async fn total(c: &RunningCollector) -> u64 {
    let body = text(c, "/api/v1/top?start=now-1h&end=now").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["total"].as_u64().unwrap()
}

const APP: &str = "query=%7Bprocess%3D%22app%22%7D";

#[tokio::test]
async fn ingest_then_query_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("p.db")).await;
    let mut cl = client(&c).await;
    let ack = cl.push_batch(batch(1)).await.unwrap().into_inner();
    assert!(ack.newly_stored);
    assert_eq!(
        (ack.agent_id.as_str(), ack.sequence, ack.samples),
        ("agent-a", 1, 4)
    );

    // A batch received twice is stored once.
    let again = cl.push_batch(batch(1)).await.unwrap().into_inner();
    assert!(!again.newly_stored);
    assert_eq!(total(&c).await, 4);

    assert_eq!(
        text(&c, &format!("/api/v1/folded?{APP}")).await,
        "app;main;cold 1\napp;main;hot 3\n"
    );
    let labels: Vec<String> = serde_json::from_str(&text(&c, "/api/v1/labels").await).unwrap();
    assert_eq!(labels, ["node", "pid", "process"]);
    let values: Vec<String> =
        serde_json::from_str(&text(&c, "/api/v1/labels/process/values").await).unwrap();
    assert_eq!(values, ["app"]);

    let svg = text(
        &c,
        &format!("/api/v1/flamegraph.svg?{APP}&min_width=0&max_nodes=10"),
    )
    .await;
    assert!(svg.contains("hot (3 samples, 75.00%)"), "{svg}");

    let top: serde_json::Value =
        serde_json::from_str(&text(&c, &format!("/api/v1/top?n=2&{APP}")).await).unwrap();
    assert_eq!(top["functions"][0]["function"], "hot");
    assert_eq!(top["functions"][0]["self"], 3);
    assert_eq!(top["functions"][0]["total"], 3);
    assert_eq!(top["functions"][1]["function"], "cold");

    let diff = text(
        &c,
        &format!("/api/v1/diff.svg?{APP}&base_query=%7B%7D&base_start=now-2h&base_end=now-1h"),
    )
    .await;
    assert!(diff.contains("hot"));

    let metrics = text(&c, "/metrics").await;
    assert!(
        metrics.contains("profiler_batches_stored_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("profiler_batches_duplicate_total 1"));
    assert!(metrics.contains("profiler_samples_stored_total 4"));
    assert!(metrics.contains("profiler_store_bytes "));
    assert_eq!(text(&c, "/healthz").await, "ok\n");
    assert!(text(&c, "/").await.contains("<title>profiler"));
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn pprof_opens_in_go_tool_pprof() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("p.db")).await;
    client(&c).await.push_batch(batch(1)).await.unwrap();
    let (status, gz) = get(&c, &format!("/api/v1/pprof?{APP}")).await;
    assert_eq!(status, 200);
    let file = dir.path().join("profile.pb.gz");
    std::fs::write(&file, gz).unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(&file)
        .env("HOME", dir.path())
        .output()
        .expect("`go` (Debian's golang-go, installed by `cargo xtask setup`) must be on PATH");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Total samples = 4"), "{stdout}");
    let hot = stdout
        .lines()
        .find(|l| l.trim_end().ends_with(" hot"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(hot.trim_start().starts_with("3 75.00%"), "{hot}");
    assert!(stdout.lines().any(|l| l.trim_end().ends_with(" cold")));
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_batches_are_rejected_whole_and_the_collector_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("p.db")).await;
    let mut cl = client(&c).await;
    cl.push_batch(batch(1)).await.unwrap();
    let before = total(&c).await;

    let mut cases: Vec<(&str, Batch, Code, &str)> = Vec::new();
    let mut b = batch(10);
    b.samples[1].stack = 7;
    cases.push((
        "out-of-range table index",
        b,
        Code::InvalidArgument,
        "out of range",
    ));
    let mut b = batch(11);
    b.stacks[1].frames.clear();
    cases.push(("empty stack", b, Code::InvalidArgument, "empty"));
    let mut b = batch(12);
    b.stacks[0].frames = vec![2; 10_000];
    cases.push(("10,000-frame stack", b, Code::InvalidArgument, "frames"));
    let mut b = batch(13);
    b.samples[1].value = -1;
    cases.push(("negative count", b, Code::InvalidArgument, "not positive"));
    let mut b = batch(14);
    b.samples[0].value = i64::MAX;
    cases.push(("overflowing count", b, Code::InvalidArgument, "overflow"));
    let mut b = batch(15);
    b.window_end_unix_nanos = now_ns() + 24 * 3_600_000_000_000;
    cases.push((
        "window in the far future",
        b,
        Code::InvalidArgument,
        "future",
    ));
    let mut b = batch(16);
    b.strings[3] = vec![b'h', 0xff, 0xfe];
    cases.push(("invalid UTF-8", b, Code::InvalidArgument, "UTF-8"));
    // Over the 1 MiB limit (compressed, it only grows past it while being
    // decompressed), and far over it.
    let mut b = batch(17);
    b.strings.push(vec![b'x'; 2 << 20]);
    cases.push(("oversized message", b, Code::ResourceExhausted, "limit"));
    let mut b = batch(18);
    b.strings.push(vec![b'y'; 8 << 20]);
    cases.push(("message 8x the limit", b, Code::ResourceExhausted, "limit"));

    for (what, b, code, reason) in cases {
        let status = cl.push_batch(b).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(reason),
            "{what}: {}",
            status.message()
        );
        assert_eq!(total(&c).await, before, "{what} changed the stored totals");
    }
    // Uncompressed and 8x the limit: tonic refuses it before buffering it.
    let mut plain = IngestClient::connect(format!("http://{}", c.grpc_addr))
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    let mut b = batch(19);
    b.strings.push(vec![b'z'; 8 << 20]);
    let status = plain.push_batch(b).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );
    assert_eq!(total(&c).await, before);
    assert!(text(&c, "/metrics")
        .await
        .contains("profiler_batches_rejected_total{reason=\"too_large\"} 3"));
    // Still serving, and a good batch still goes in.
    cl.push_batch(batch(2)).await.unwrap();
    assert_eq!(total(&c).await, before + 4);
    let metrics = text(&c, "/metrics").await;
    for reason in [
        "index_out_of_range",
        "empty_stack",
        "stack_too_deep",
        "bad_count",
        "count_overflow",
        "bad_window",
        "invalid_utf8",
    ] {
        assert!(
            metrics.contains(&format!(
                "profiler_batches_rejected_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason} not counted:\n{metrics}"
        );
    }
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn query_parameters_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("p.db")).await;
    client(&c).await.push_batch(batch(1)).await.unwrap();
    // A hostile value is just a value that matches nothing.
    let hostile = "query=%7Bprocess%3D%22%27%3B%20DROP%20TABLE%20samples%3B%20--%22%7D";
    assert_eq!(text(&c, &format!("/api/v1/folded?{hostile}")).await, "");
    assert_eq!(total(&c).await, 4, "nothing was dropped");
    for bad in [
        "/api/v1/folded?query=%7Bprocess",
        "/api/v1/folded?start=yesterday",
        "/api/v1/folded?start=20&end=10",
        "/api/v1/top?n=0",
        "/api/v1/flamegraph.svg?min_width=abc",
        "/api/v1/diff.svg?query=%7B%7D",
    ] {
        let (status, body) = get(&c, bad).await;
        assert_eq!(status, 400, "{bad}: {}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{bad}");
    }
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn restart_keeps_acknowledged_batches_and_dedups_resends() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let c = start(&db).await;
    client(&c).await.push_batch(batch(1)).await.unwrap();
    c.shutdown().await.unwrap();

    let c = start(&db).await;
    let mut cl = client(&c).await;
    // The agent did not see the ack and re-sends: still stored once.
    let ack = cl.push_batch(batch(1)).await.unwrap().into_inner();
    assert!(!ack.newly_stored);
    cl.push_batch(batch(2)).await.unwrap();
    assert_eq!(total(&c).await, 8);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_agent_over_its_rate_limit_is_pushed_back_with_a_retry_hint() {
    let dir = tempfile::tempdir().unwrap();
    let c = server::start(CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreLocation::Sqlite(dir.path().join("p.db")),
        agent_rate_limit: 1.0,
        agent_rate_burst: 2,
        ..CollectorConfig::default()
    })
    .await
    .unwrap();
    let mut client = client(&c).await;
    for seq in 1..=2 {
        client.push_batch(batch(seq)).await.unwrap();
    }
    let pushed_back = client.push_batch(batch(3)).await.unwrap_err();
    assert_eq!(pushed_back.code(), Code::ResourceExhausted);
    assert!(
        pushed_back.message().contains("rate limit"),
        "{}",
        pushed_back.message()
    );
    let hint: u64 = pushed_back
        .metadata()
        .get("retry-after-ms")
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&hint), "{hint} ms");
    // Another agent has its own allowance.
    let mut other = batch(1);
    other.agent_id = "agent-b".into();
    client.push_batch(other).await.unwrap();
    // After the hinted wait the batch goes through.
    tokio::time::sleep(Duration::from_millis(hint + 50)).await;
    client.push_batch(batch(3)).await.unwrap();
    assert_eq!(total(&c).await, 4 * 4);
    let metrics = text(&c, "/metrics").await;
    assert!(
        metrics.contains("profiler_batches_rejected_total{reason=\"rate_limited\"} 1"),
        "{metrics}"
    );
    c.shutdown().await.unwrap();
}

/// [`batch`] of another sample type (frequency 0) with these two values.
fn typed_batch(seq: u64, name: &str, unit: &str, hot: i64, cold: i64) -> Batch {
    let mut b = batch(seq);
    b.sample_type = Some(profiler_proto::v1::SampleType {
        r#type: name.into(),
        unit: unit.into(),
    });
    b.frequency_hz = 0;
    b.samples[0].value = hot;
    b.samples[1].value = cold;
    b
}

#[tokio::test]
async fn an_off_cpu_batch_reads_back_exact_in_its_unit() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("p.db")).await;
    let mut cl = client(&c).await;
    cl.push_batch(batch(1)).await.unwrap();
    let ack = cl
        .push_batch(typed_batch(
            2,
            "off_cpu",
            "nanoseconds",
            3_000_000_007,
            1_500_000_000,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(ack.newly_stored);
    assert_eq!(ack.samples, 4_500_000_007, "the sum of the values");

    let off = "type=off_cpu&start=now-1h&end=now";
    assert_eq!(
        text(&c, &format!("/api/v1/folded?{off}&{APP}")).await,
        "app;main;cold 1500000000\napp;main;hot 3000000007\n"
    );
    assert_eq!(
        text(&c, "/api/v1/folded").await,
        "app;main;cold 1\napp;main;hot 3\n",
        "cpu by default, as before"
    );
    assert_eq!(
        text(&c, "/api/v1/folded?type=cpu").await,
        "app;main;cold 1\napp;main;hot 3\n"
    );
    assert_eq!(
        text(&c, "/api/v1/folded?type=heap_live").await,
        "",
        "a type with no data is an empty answer"
    );

    let types: serde_json::Value =
        serde_json::from_str(&text(&c, "/api/v1/types?start=now-1h&end=now").await).unwrap();
    assert_eq!(
        types,
        serde_json::json!([
            {"type": "cpu", "unit": "samples"},
            {"type": "off_cpu", "unit": "nanoseconds"},
            {"type": "wall", "unit": "nanoseconds"}
        ])
    );
    // The wall view: 3 and 1 samples at 99 Hz as the time they stand for,
    // plus the waits.
    assert_eq!(
        text(
            &c,
            &format!("/api/v1/folded?type=wall&start=now-1h&end=now&{APP}")
        )
        .await,
        "app;main;cold 1510101010\napp;main;hot 3030303037\n"
    );
    let types: serde_json::Value =
        serde_json::from_str(&text(&c, "/api/v1/types?start=now-3h&end=now-2h").await).unwrap();
    assert_eq!(types, serde_json::json!([]));

    let labels: Vec<String> =
        serde_json::from_str(&text(&c, &format!("/api/v1/labels?{off}")).await).unwrap();
    assert_eq!(labels, ["node", "pid", "process"]);
    let labels: Vec<String> =
        serde_json::from_str(&text(&c, "/api/v1/labels?type=heap_live").await).unwrap();
    assert!(labels.is_empty());
    let values: Vec<String> =
        serde_json::from_str(&text(&c, &format!("/api/v1/labels/process/values?{off}")).await)
            .unwrap();
    assert_eq!(values, ["app"]);

    let svg = text(
        &c,
        &format!("/api/v1/flamegraph.svg?{off}&{APP}&min_width=0"),
    )
    .await;
    assert!(svg.contains("hot (3,000,000,007 ns, 66.67%)"), "{svg}");
    assert!(
        svg.contains("off_cpu (nanoseconds)"),
        "the title names the type"
    );

    let top: serde_json::Value =
        serde_json::from_str(&text(&c, &format!("/api/v1/top?n=2&{off}")).await).unwrap();
    assert_eq!(top["unit"], "nanoseconds");
    assert_eq!(top["total"], 4_500_000_007u64);
    assert_eq!(top["functions"][0]["function"], "hot");
    assert_eq!(top["functions"][0]["self"], 3_000_000_007u64);

    let (status, gz) = get(&c, &format!("/api/v1/pprof?{off}")).await;
    assert_eq!(status, 200);
    let file = dir.path().join("off_cpu.pb.gz");
    std::fs::write(&file, gz).unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(&file)
        .env("HOME", dir.path())
        .output()
        .expect("`go` (Debian's golang-go, installed by `cargo xtask setup`) must be on PATH");
    let raw = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(raw.contains("PeriodType: off_cpu nanoseconds"), "{raw}");
    assert!(raw.contains("off_cpu/nanoseconds"), "{raw}");
    let mut values: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .filter(|v| v.len() > 3 && v.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    values.sort();
    assert_eq!(values, ["1500000000", "3000000007"], "{raw}");

    let metrics = text(&c, "/metrics").await;
    assert!(
        metrics.contains("profiler_samples_stored_total 4\n"),
        "only cpu values count as samples:\n{metrics}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_type_keeps_one_unit_and_bad_type_names_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("p.db")).await;
    let mut cl = client(&c).await;
    cl.push_batch(typed_batch(1, "delay", "nanoseconds", 5, 6))
        .await
        .unwrap();
    let cases = [
        (
            typed_batch(2, "delay", "seconds", 1, 1),
            r#"sample type "delay" is stored in unit "nanoseconds", not "seconds""#,
        ),
        (
            typed_batch(3, "cpu", "nanoseconds", 1, 1),
            r#"sample type "cpu" has unit "samples", not "nanoseconds""#,
        ),
        (
            typed_batch(4, "Off-CPU", "nanoseconds", 1, 1),
            r#"sample_type.type "Off-CPU" must be 1-64 lower-case ASCII letters"#,
        ),
        (
            typed_batch(5, "heap_live", "", 1, 1),
            r#"sample_type.unit "" must be"#,
        ),
        (
            typed_batch(6, "wall", "nanoseconds", 1, 1),
            r#"sample type "wall" is reserved"#,
        ),
    ];
    for (b, message) in cases {
        let status = cl.push_batch(b).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(message), "{}", status.message());
    }
    assert_eq!(
        text(&c, "/api/v1/folded?type=delay").await,
        "app;main;cold 6\napp;main;hot 5\n",
        "nothing of the refused batches was stored"
    );
    let metrics = text(&c, "/metrics").await;
    for (reason, n) in [("unit_mismatch", 2), ("bad_sample_type", 3)] {
        assert!(
            metrics.contains(&format!(
                "profiler_batches_rejected_total{{reason=\"{reason}\"}} {n}"
            )),
            "{reason}:\n{metrics}"
        );
    }
    let (status, body) = get(&c, "/api/v1/folded?type=Off-CPU").await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    c.shutdown().await.unwrap();
}

/// [`batch`] with two more stacks of `app` cut by the agent's unwinder:
/// `[stack cut: no_table];hot` x2 and `[stack cut: bad_read];cold` x1.
fn cut_batch(seq: u64) -> Batch {
    let mut b = batch(seq);
    let no_table = b.strings.len() as u32;
    b.strings.push(b"[stack cut: no_table]".to_vec());
    b.strings.push(b"[stack cut: bad_read]".to_vec());
    b.stacks.push(Stack {
        frames: vec![1, no_table, 3],
    });
    b.stacks.push(Stack {
        frames: vec![1, no_table + 1, 4],
    });
    b.samples.push(Sample {
        label_set: 0,
        stack: 2,
        value: 2,
    });
    b.samples.push(Sample {
        label_set: 0,
        stack: 3,
        value: 1,
    });
    b
}

#[tokio::test]
async fn quality_gives_the_share_of_complete_and_cut_stacks() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&dir.path().join("p.db")).await;
    let mut cl = client(&c).await;
    cl.push_batch(cut_batch(1)).await.unwrap();
    let json = |body: String| serde_json::from_str::<serde_json::Value>(&body).unwrap();

    let q = json(text(&c, &format!("/api/v1/quality?{APP}&start=now-1h&end=now")).await);
    assert_eq!(
        q,
        serde_json::json!({
            "type": "cpu",
            "unit": "samples",
            "total": 7,
            "complete": 4,
            "complete_share": 4.0 / 7.0,
            "cut": 3,
            "cut_share": 3.0 / 7.0,
            "cut_by_reason": [
                {"reason": "no_table", "value": 2, "share": 2.0 / 7.0},
                {"reason": "bad_read", "value": 1, "share": 1.0 / 7.0},
            ],
        })
    );
    // The marker is a frame of its own under the process: a tower of its own.
    assert_eq!(
        text(&c, &format!("/api/v1/folded?{APP}")).await,
        "app;[stack cut: bad_read];cold 1\napp;[stack cut: no_table];hot 2\n\
         app;main;cold 1\napp;main;hot 3\n"
    );

    // Stacks without a marker (stored before agents marked them) are complete.
    cl.push_batch(typed_batch(2, "off_cpu", "nanoseconds", 30, 10))
        .await
        .unwrap();
    let q = json(text(&c, "/api/v1/quality?type=off_cpu").await);
    assert_eq!(
        (&q["unit"], &q["total"], &q["complete_share"], &q["cut"]),
        (
            &serde_json::json!("nanoseconds"),
            &serde_json::json!(40),
            &serde_json::json!(1.0),
            &serde_json::json!(0)
        )
    );
    assert_eq!(q["cut_by_reason"], serde_json::json!([]));

    // An empty selection: zero, and no shares.
    for empty in [
        "/api/v1/quality?query=%7Bprocess%3D%22nobody%22%7D",
        "/api/v1/quality?start=now-3h&end=now-2h",
        "/api/v1/quality?type=heap_live",
    ] {
        let q = json(text(&c, empty).await);
        assert_eq!(q["total"], 0, "{empty}");
        assert_eq!(q["complete_share"], serde_json::Value::Null, "{empty}");
        assert_eq!(q["cut_share"], serde_json::Value::Null, "{empty}");
        assert_eq!(q["cut_by_reason"], serde_json::json!([]), "{empty}");
    }

    for bad in [
        "/api/v1/quality?query=%7Bprocess",
        "/api/v1/quality?start=yesterday",
        "/api/v1/quality?start=20&end=10",
        "/api/v1/quality?type=Off-CPU",
    ] {
        let (status, body) = get(&c, bad).await;
        assert_eq!(status, 400, "{bad}: {}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{bad}");
    }
    assert_eq!(total(&c).await, 7, "nothing was dropped");
    c.shutdown().await.unwrap();
}
