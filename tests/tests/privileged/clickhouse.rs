//! The ClickHouse store against a real server (Debian's `clickhouse-server`,
//! started privately on loopback by the harness; `cargo xtask setup`
//! installs it): the conformance suite shared with SQLite, two collectors
//! writing one batch at once, and a ClickHouse restarted or stalled
//! mid-ingest. The store only, no eBPF: `cargo xtask test` runs these tests
//! two at a time (the agent moved between replicas is in `replicas.rs`).

use std::time::Duration;

use crate::support::{clickhouse::ClickHouse, collector::*};
use profiler_collector::{
    server::{self, CollectorConfig, RunningCollector, StoreLocation},
    store::{
        clickhouse::{ClickHouseStore, ClickHouseUrl},
        conformance, Store,
    },
};
use profiler_testkit::{current::CurrentClickHouse, Server};

const WEEK: Duration = Duration::from_secs(7 * 86400);

fn open(ch: &dyn Server, db: &str) -> ClickHouseStore {
    let url: ClickHouseUrl = ch.store_url(db).parse().unwrap();
    ClickHouseStore::open(&url, WEEK).expect("the ClickHouse store opens")
}

/// A collector on `db` of `ch`; `in_flight`: its `--max-concurrent-batches`
/// (`None`: the store's default).
fn start_on(
    rt: &tokio::runtime::Runtime,
    ch: &dyn Server,
    db: &str,
    in_flight: Option<usize>,
) -> RunningCollector {
    let config = CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreLocation::ClickHouse(ch.store_url(db).parse().unwrap()),
        max_concurrent_batches: in_flight,
        ..CollectorConfig::default()
    };
    rt.block_on(server::start(config))
        .expect("a collector starts on ClickHouse")
}

#[test]
fn conformance_suite_passes_on_clickhouse_18() {
    let ch = ClickHouse::start();
    conformance_suite(&ch);
    assert!(!ch
        .query("SELECT engine_full FROM system.tables WHERE database = 'conformance_1' AND name = 'samples'")
        .contains("TTL"));
}

/// The same SQL on the current engine, which takes the paths of servers
/// 19.6 and later (table TTL).
#[test]
fn conformance_suite_passes_on_current_clickhouse() {
    let ch = CurrentClickHouse::start();
    assert!(ch.version().starts_with("26."), "{}", ch.version());
    conformance_suite(&ch);
    let engine = ch.query(
        "SELECT engine_full FROM system.tables WHERE database = 'conformance_1' AND name = 'samples'",
    );
    assert!(engine.contains("TTL"), "{engine}");
}

/// The tables of ClickHouse schema version 1 (before sample types), as
/// collectors of that version created them (`{db}`: the database).
const SCHEMA_1: [&str; 3] = [
    "CREATE TABLE {db}.samples (
        hour Int64,
        label_set_id UInt64,
        window_end Int64,
        stack_id UInt64,
        count UInt64,
        write_id UInt64,
        window_start Int64,
        agent_id String,
        sequence UInt64,
        node String,
        agent_version String,
        frequency_hz UInt32
    ) ENGINE = MergeTree
    PARTITION BY intDiv(hour, 24)
    ORDER BY (hour, label_set_id, window_end, stack_id)",
    "CREATE TABLE {db}.stacks (day Int64, stack_id UInt64, folded String)
    ENGINE = ReplacingMergeTree PARTITION BY day ORDER BY stack_id",
    "CREATE TABLE {db}.label_sets (
        day Int64, label_set_id UInt64, names Array(String), values Array(String)
    ) ENGINE = ReplacingMergeTree PARTITION BY day ORDER BY label_set_id",
];

/// A database of schema 1 with two batches in it, opened by this
/// collector: migrated, every row is `cpu`/`samples`, the totals and
/// labels are the same, a re-sent old batch is a duplicate, and an
/// `off_cpu` batch goes beside the old rows.
fn schema_1_migrates(ch: &dyn Server) {
    use profiler_collector::model::SampleType;
    let db = "schema_1";
    ch.query(&format!("CREATE DATABASE {db}"));
    for ddl in SCHEMA_1 {
        ch.query(&ddl.replace("{db}", db));
    }
    ch.query(&format!(
        "CREATE TABLE {db}.schema_version (version UInt32, applied_ns Int64)
         ENGINE = MergeTree ORDER BY version"
    ));
    ch.query(&format!("INSERT INTO {db}.schema_version VALUES (1, 0)"));
    let (end1, end2) = (conformance::at(100), conformance::at(200));
    let hour = (end1 - 1).div_euclid(conformance::HOUR_NS);
    assert_eq!(hour, (end2 - 1).div_euclid(conformance::HOUR_NS));
    let day = hour.div_euclid(24);
    ch.query(&format!(
        "INSERT INTO {db}.stacks VALUES ({day}, 11, 'main;hot'), ({day}, 12, 'main;cold')"
    ));
    ch.query(&format!(
        "INSERT INTO {db}.label_sets VALUES ({day}, 21, ['node', 'process'], ['n1', 'app'])"
    ));
    let s = 10_000_000_000i64;
    ch.query(&format!(
        "INSERT INTO {db}.samples VALUES
         ({hour}, 0, {end1}, 0, 0, 1, {start1}, 'a1', 1, 'n1', '0', 99),
         ({hour}, 21, {end1}, 11, 3, 1, {start1}, '', 0, '', '', 99),
         ({hour}, 21, {end1}, 12, 1, 1, {start1}, '', 0, '', '', 99),
         ({hour}, 0, {end2}, 0, 0, 2, {start2}, 'a1', 2, 'n1', '0', 99),
         ({hour}, 21, {end2}, 11, 5, 2, {start2}, '', 0, '', '', 99)",
        start1 = end1 - s,
        start2 = end2 - s,
    ));

    let mut store = open(ch, db);
    assert_eq!(store.schema_version().unwrap(), 2);
    let all = conformance::all(0, 300, &[]);
    assert_eq!(
        store.profile(&all).unwrap().folded(),
        "main;cold 1\nmain;hot 8\n",
        "nothing lost"
    );
    assert_eq!(
        store
            .profile(&conformance::all(0, 300, &[("process", "app")]))
            .unwrap()
            .total(),
        9
    );
    assert_eq!(store.stats().unwrap().batches, 2);
    assert_eq!(
        store.sample_types(all.start_ns, all.end_ns).unwrap(),
        vec![SampleType::cpu()]
    );
    assert_eq!(
        store
            .label_values("process", Some("cpu"), all.start_ns, all.end_ns)
            .unwrap(),
        vec!["app"]
    );
    let off = conformance::of_type("off_cpu", 0, 300, &[]);
    assert_eq!(store.profile(&off).unwrap().total(), 0);
    assert_eq!(
        store
            .insert(&conformance::batch(1, 100, "app", "main;hot", 3))
            .unwrap(),
        profiler_collector::model::Stored::Duplicate,
        "an old batch re-sent is known"
    );
    store
        .insert(&conformance::typed_batch(
            SampleType::off_cpu(),
            3,
            250,
            "app",
            "main;hot",
            7_000_000_001,
        ))
        .unwrap();
    assert_eq!(
        store.profile(&off).unwrap().folded(),
        "main;hot 7000000001\n"
    );
    assert_eq!(
        store.profile(&all).unwrap().folded(),
        "main;cold 1\nmain;hot 8\n"
    );
    assert_eq!(
        store.sample_types(all.start_ns, all.end_ns).unwrap(),
        vec![SampleType::cpu(), SampleType::off_cpu()]
    );
    // A second collector opening the migrated database changes nothing.
    let again = open(ch, db);
    assert_eq!(again.schema_version().unwrap(), 2);
    assert_eq!(again.profile(&all).unwrap().total(), 9);
}

#[test]
fn schema_1_migrates_on_clickhouse_18() {
    schema_1_migrates(&ClickHouse::start());
}

#[test]
fn schema_1_migrates_on_current_clickhouse() {
    schema_1_migrates(&CurrentClickHouse::start());
}

/// An `off_cpu` batch sent over gRPC to a collector on ClickHouse reads
/// back exact, in nanoseconds, from the folded, types, labels and pprof
/// routes, beside the `cpu` batch of the same agent.
fn off_cpu_through_the_api(ch: &dyn Server) {
    let rt = runtime();
    let c = start_on(&rt, ch, "typed", None);
    let mut off = synthetic_batch("n1", 2, 0);
    off.sample_type = Some(profiler_proto::v1::SampleType {
        r#type: "off_cpu".into(),
        unit: "nanoseconds".into(),
    });
    off.frequency_hz = 0;
    off.samples[0].value = 2_500_000_001;
    let acks = rt.block_on(async {
        let mut cl = profiler_proto::v1::ingest_client::IngestClient::connect(format!(
            "http://{}",
            c.grpc_addr
        ))
        .await
        .unwrap();
        let cpu = cl
            .push_batch(synthetic_batch("n1", 1, 7))
            .await
            .unwrap()
            .into_inner();
        let off = cl.push_batch(off).await.unwrap().into_inner();
        (cpu.samples, off.samples)
    });
    assert_eq!(acks, (7, 2_500_000_001));
    let text = |path: &str| String::from_utf8(http_get(c.http_addr, path)).unwrap();
    assert_eq!(
        text("/api/v1/folded?type=off_cpu&start=now-1h"),
        "synthetic;main;work 2500000001\n"
    );
    assert_eq!(
        text("/api/v1/folded?start=now-1h"),
        "synthetic;main;work 7\n"
    );
    // The wall view: 7 samples at 99 Hz as the time they stand for, plus
    // the wait.
    assert_eq!(
        text("/api/v1/folded?type=wall&start=now-1h"),
        "synthetic;main;work 2570707071\n"
    );
    assert_eq!(text("/api/v1/folded?type=heap_live&start=now-1h"), "");
    let types: serde_json::Value =
        serde_json::from_str(&text("/api/v1/types?start=now-1h&end=now")).unwrap();
    assert_eq!(
        types,
        serde_json::json!([
            {"type": "cpu", "unit": "samples"},
            {"type": "off_cpu", "unit": "nanoseconds"},
            {"type": "wall", "unit": "nanoseconds"}
        ])
    );
    let labels: Vec<String> =
        serde_json::from_str(&text("/api/v1/labels?type=off_cpu&start=now-1h")).unwrap();
    assert_eq!(labels, ["node", "process"]);
    let values: Vec<String> = serde_json::from_str(&text(
        "/api/v1/labels/process/values?type=off_cpu&start=now-1h",
    ))
    .unwrap();
    assert_eq!(values, ["synthetic"]);
    let top: serde_json::Value =
        serde_json::from_str(&text("/api/v1/top?type=off_cpu&start=now-1h")).unwrap();
    assert_eq!(
        (top["unit"].as_str(), top["total"].as_u64()),
        (Some("nanoseconds"), Some(2_500_000_001))
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("off_cpu.pb.gz");
    std::fs::write(
        &file,
        http_get(c.http_addr, "/api/v1/pprof?type=off_cpu&start=now-1h"),
    )
    .unwrap();
    let out = std::process::Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(&file)
        .env("HOME", dir.path())
        .output()
        .expect("`go` (installed by `cargo xtask setup`) must be on PATH");
    let raw = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(raw.contains("PeriodType: off_cpu nanoseconds"), "{raw}");
    assert!(
        raw.lines().any(|l| l.trim().starts_with("2500000001:")),
        "{raw}"
    );
    rt.block_on(c.shutdown()).unwrap();
}

#[test]
fn an_off_cpu_batch_reads_back_exact_on_clickhouse_18() {
    off_cpu_through_the_api(&ClickHouse::start());
}

#[test]
fn an_off_cpu_batch_reads_back_exact_on_current_clickhouse() {
    off_cpu_through_the_api(&CurrentClickHouse::start());
}

/// Stack quality (`/api/v1/quality`) of a collector on ClickHouse answers
/// exactly like one on SQLite given the same batch, for every selection:
/// it reads the stored stacks' `[stack cut: REASON]` frames.
fn quality_through_the_api(ch: &dyn Server) {
    use profiler_proto::v1::{ingest_client::IngestClient, Sample, Stack};
    let rt = runtime();
    let on_clickhouse = start_on(&rt, ch, "quality", None);
    let dir = tempfile::tempdir().unwrap();
    let on_sqlite = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    // synthetic;main;work x5, synthetic;[stack cut: no_table];work x3,
    // synthetic;[stack cut: depth_limit];main;work x2.
    let mut batch = synthetic_batch("n1", 1, 5);
    let cut = batch.strings.len() as u32;
    batch.strings.push(b"[stack cut: no_table]".to_vec());
    batch.strings.push(b"[stack cut: depth_limit]".to_vec());
    batch.stacks.push(Stack {
        frames: vec![4, cut, 6],
    });
    batch.stacks.push(Stack {
        frames: vec![4, cut + 1, 5, 6],
    });
    for (stack, value) in [(1, 3), (2, 2)] {
        batch.samples.push(Sample {
            label_set: 0,
            stack,
            value,
        });
    }
    for c in [&on_clickhouse, &on_sqlite] {
        let batch = batch.clone();
        rt.block_on(async {
            IngestClient::connect(format!("http://{}", c.grpc_addr))
                .await
                .unwrap()
                .push_batch(batch)
                .await
                .unwrap()
        });
    }
    let quality = |c: &RunningCollector, selection: &str| -> serde_json::Value {
        serde_json::from_slice(&http_get(
            c.http_addr,
            &format!("/api/v1/quality?{selection}"),
        ))
        .unwrap()
    };
    let all = quality(&on_clickhouse, "start=now-1h");
    assert_eq!(
        (&all["total"], &all["complete"], &all["cut"]),
        (
            &serde_json::json!(10),
            &serde_json::json!(5),
            &serde_json::json!(5)
        )
    );
    assert_eq!(
        all["cut_by_reason"],
        serde_json::json!([
            {"reason": "no_table", "value": 3, "share": 0.3},
            {"reason": "depth_limit", "value": 2, "share": 0.2},
        ])
    );
    for selection in [
        "start=now-1h",
        "start=now-1h&query=%7Bprocess%3D%22synthetic%22%7D",
        "start=now-1h&query=%7Bnode%3D%22elsewhere%22%7D",
        "start=now-3h&end=now-2h",
        "type=off_cpu&start=now-1h",
    ] {
        assert_eq!(
            quality(&on_clickhouse, selection),
            quality(&on_sqlite, selection),
            "{selection}"
        );
    }
    rt.block_on(on_clickhouse.shutdown()).unwrap();
    rt.block_on(on_sqlite.shutdown()).unwrap();
}

#[test]
fn stack_quality_on_clickhouse_answers_like_sqlite() {
    quality_through_the_api(&ClickHouse::start());
}

fn conformance_suite(ch: &dyn Server) {
    let mut n = 0;
    conformance::check_all(&mut || {
        n += 1;
        Box::new(open(ch, &format!("conformance_{n}")))
    });
    // The schema is recorded, and a second collector starting on the same
    // database finds it ready.
    let again = open(ch, "conformance_1");
    assert_eq!(again.schema_version().unwrap(), 2);
    // A database migrated by a newer collector is refused, not written.
    ch.query("INSERT INTO conformance_1.schema_version VALUES (99, 0)");
    let url: ClickHouseUrl = ch.store_url("conformance_1").parse().unwrap();
    let err = ClickHouseStore::open(&url, WEEK).err().unwrap().to_string();
    assert!(err.contains("newer than this collector supports"), "{err}");
    // An unreachable server is named in the error.
    // A port held and not listening: connections are refused.
    let nobody = profiler_testkit::net::Reserved::new();
    let url: ClickHouseUrl = format!("clickhouse://127.0.0.1:{}/x", nobody.port())
        .parse()
        .unwrap();
    let err = ClickHouseStore::open(&url, WEEK).err().unwrap().to_string();
    assert!(err.contains("unreachable"), "{err}");
}

/// Two collectors (two stores on one database): the second is told a batch
/// the first stored is a duplicate; when both write it at once (neither
/// sees the other's write first), every answer still counts it once.
#[test]
fn one_batch_written_through_two_collectors_counts_once() {
    two_collectors_count_once(&ClickHouse::start());
    two_collectors_count_once(&CurrentClickHouse::start());
}

fn two_collectors_count_once(ch: &dyn Server) {
    let (mut a, mut b) = (open(ch, "race"), open(ch, "race"));
    // An hour after the suite's base (recent: a TTL keeps it).
    let t = conformance::at(3600);
    let batch = |seq, end| {
        let mut rng = conformance::Rng::new(seq);
        conformance::random_batch(&mut rng, 1, seq, end)
    };
    let first = batch(1, t + 10 * conformance::S);
    a.insert(&first).unwrap();
    assert_eq!(
        b.insert(&first).unwrap(),
        profiler_collector::model::Stored::Duplicate
    );
    // Races: the same batch written by both, and by one of them twice.
    let raced = batch(2, t + 20 * conformance::S);
    a.insert_unchecked(&raced).unwrap();
    b.insert_unchecked(&raced).unwrap();
    b.insert_unchecked(&first).unwrap();
    let selector = conformance::all(3600 - 60, 3600 + 60, &[]);
    let want = first.total() + raced.total();
    for store in [&a, &b] {
        assert_eq!(store.profile(&selector).unwrap().total(), want);
        assert_eq!(store.stats().unwrap().batches, 2);
        let one_process = conformance::all(3600 - 60, 3600 + 60, &[("process", "p1")]);
        let raw: u64 = [&first, &raced]
            .iter()
            .flat_map(|b| {
                b.samples
                    .iter()
                    .filter(|s| {
                        b.label_sets[s.label_set].contains(&("process".into(), "p1".into()))
                    })
                    .map(|s| s.value)
            })
            .sum();
        assert_eq!(store.profile(&one_process).unwrap().total(), raw);
    }
    let rows = ch.query("SELECT count() FROM race.samples WHERE label_set_id = 0");
    assert_eq!(
        rows.trim(),
        "4",
        "the racing writes are stored, and skipped by queries"
    );
}

/// ClickHouse killed with SIGKILL while two agents stream, and started
/// again: the collector answers `UNAVAILABLE` meanwhile, the agents retry,
/// and in the end every acknowledged batch is there, once.
#[test]
fn clickhouse_restart_mid_ingest_loses_nothing_acknowledged() {
    let mut ch = ClickHouse::start();
    let rt = runtime();
    let c = start_on(&rt, &ch, "profiles", None);
    let port = c.grpc_addr.port();
    let pushers: Vec<_> = ["restart-1", "restart-2"]
        .into_iter()
        .map(|node| {
            std::thread::spawn(move || (node, push_batches(&[port], node, 50, 3, |_| vec![0])))
        })
        .collect();
    // Killed mid-ingest: once the collector has stored the first batches.
    wait_for_batches_stored(c.http_addr, 10);
    ch.kill();
    // The outage itself, which must last: the collector answers UNAVAILABLE
    // and the agents retry meanwhile.
    std::thread::sleep(Duration::from_millis(2000));
    ch.restart();
    let mut errors = Vec::new();
    for p in pushers {
        let (node, pushed) = p.join().unwrap();
        assert_eq!(pushed.acked, 50 * 3, "{node}: every batch acknowledged");
        assert_eq!(
            node_total(c.http_addr, node),
            50 * 3,
            "{node}: stored vs sent"
        );
        errors.extend(pushed.errors);
    }
    assert!(
        errors.contains(&tonic::Code::Unavailable),
        "the outage reached the agents as UNAVAILABLE: {errors:?}"
    );
    // The flame graph and UI are served as with SQLite.
    let svg = String::from_utf8(http_get(
        c.http_addr,
        "/api/v1/flamegraph.svg?start=now-1h&query=%7Bnode%3D%22restart-1%22%7D",
    ))
    .unwrap();
    assert!(svg.contains("<svg") && svg.contains("work"), "{svg}");
    assert!(String::from_utf8(http_get(c.http_addr, "/"))
        .unwrap()
        .contains("<html"));
    rt.block_on(c.shutdown()).unwrap();
}

/// A stalled ClickHouse (SIGSTOP): batches beyond the collector's in-flight
/// limit (4 here) are pushed back at once with RESOURCE_EXHAUSTED, the ones waiting
/// on ClickHouse fail with UNAVAILABLE when the write times out; nothing is
/// stored twice once ClickHouse runs again and the agents resend.
#[test]
fn a_stalled_clickhouse_pushes_back_on_agents() {
    let ch = ClickHouse::start();
    let rt = runtime();
    let c = start_on(&rt, &ch, "profiles", Some(4));
    let port = c.grpc_addr.port();
    // Warm: the schema and a first batch.
    assert_eq!(push_batches(&[port], "warm", 1, 1, |_| vec![0]).acked, 1);
    ch.pause();
    let codes: Vec<tonic::Code> = rt.block_on(async {
        let tasks: Vec<_> = (0..12)
            .map(|i| tokio::spawn(push_once(port, format!("stalled-{i}"))))
            .collect();
        let mut codes = Vec::new();
        for t in tasks {
            codes.push(t.await.unwrap());
        }
        codes
    });
    ch.resume();
    assert!(
        codes.contains(&tonic::Code::ResourceExhausted),
        "pushed back: {codes:?}"
    );
    assert!(
        codes.contains(&tonic::Code::Unavailable),
        "write timed out: {codes:?}"
    );
    assert!(
        !codes.contains(&tonic::Code::Ok),
        "nothing stored while stalled: {codes:?}"
    );
    for i in 0..12 {
        let node = format!("stalled-{i}");
        assert_eq!(push_batches(&[port], &node, 1, 5, |_| vec![0]).acked, 5);
        assert_eq!(node_total(c.http_addr, &node), 5, "{node}");
    }
    rt.block_on(c.shutdown()).unwrap();
}

/// One attempt to push batch 1 of `node` (5 samples); the answer's code.
async fn push_once(port: u16, node: String) -> tonic::Code {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .timeout(Duration::from_secs(40));
    let mut client = profiler_proto::v1::ingest_client::IngestClient::new(endpoint.connect_lazy());
    let batch = synthetic_batch(&node, 1, 5);
    match client.push_batch(batch).await {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    }
}

/// A group whose write fails: every copy of a batch in it fails too (none
/// may be acknowledged as "already stored"), and a later resend stores it.
#[test]
fn copies_of_a_batch_in_a_failed_group_all_fail() {
    let mut ch = ClickHouse::start();
    let mut store = open(&ch, "failed");
    let mut rng = conformance::Rng::new(5);
    let b = conformance::random_batch(&mut rng, 1, 1, conformance::at(60));
    ch.kill();
    for outcome in store.insert_many(&[b.clone(), b.clone(), b.clone()]) {
        assert!(outcome.is_err(), "{outcome:?}");
    }
    ch.restart();
    let outcomes: Vec<_> = store
        .insert_many(&[b.clone(), b.clone()])
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        outcomes,
        vec![
            profiler_collector::model::Stored::New { samples: b.total() },
            profiler_collector::model::Stored::Duplicate
        ]
    );
}
