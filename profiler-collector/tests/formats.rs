//! Profiles in other formats end to end, as a user would send them: pprof
//! uploads and OTLP profiles (gRPC and HTTP) into a collector on loopback
//! with a real SQLite file, read back through the HTTP API; hostile inputs
//! refused whole with their reason; and the `--allow-cidr` door on both
//! ports, with a client bound to another loopback address.
use std::{
    collections::HashMap,
    future::Future,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use profiler_collector::server::{self, CollectorConfig, RunningCollector, StoreLocation};
use profiler_proto::{
    otlp::{
        collector::{
            profiles_service_client::ProfilesServiceClient, ExportProfilesServiceRequest,
            ExportProfilesServiceResponse,
        },
        common::{any_value::Value, AnyValue, InstrumentationScope, KeyValue},
        profiles::{
            Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile, ProfilesDictionary,
            ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
        },
        resource::Resource,
    },
    pprof,
    v1::{self, ingest_client::IngestClient, Batch, LabelSet},
};
use profiler_security::AllowList;
use prost::Message;
use tonic::{
    codegen::http,
    transport::{Channel, Endpoint, Uri},
    Code,
};

/// Every test ends within this, or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a counter may take to show an event that has happened.
const SETTLE: Duration = Duration::from_secs(10);
const SECOND: i64 = 1_000_000_000;
/// A plain body just over the collector's 1 MiB limit (and the 1 KiB the
/// routes allow for a gzip header): small enough that the client has sent
/// it before the collector answers 413 and closes.
const OVER_THE_LIMIT: usize = (1 << 20) + (2 << 10);

fn now_ns() -> i64 {
    profiler_collector::clock::now_ns()
}

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test did not finish in time")
}

async fn start(db: &Path, allow: &[&str]) -> RunningCollector {
    server::start(CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreLocation::Sqlite(db.to_path_buf()),
        max_message_bytes: 1 << 20,
        allow: AllowList::parse(allow).unwrap(),
        ..CollectorConfig::default()
    })
    .await
    .unwrap()
}

// --- HTTP -----------------------------------------------------------------

/// An HTTP answer: status, `Content-Type`, body.
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `{"error", "reason"}` of a refusal.
    fn refusal(&self) -> (String, String) {
        let v: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()));
        (
            v["error"].as_str().unwrap_or_default().to_string(),
            v["reason"].as_str().unwrap_or_default().to_string(),
        )
    }
}

/// A request to the HTTP port from 127.0.0.1 (GET without a body).
async fn http(
    c: &RunningCollector,
    method: &'static str,
    path: &str,
    headers: &[(&'static str, &'static str)],
    body: Vec<u8>,
) -> Answer {
    let url = format!("http://{}{}", c.http_addr, path);
    let headers = headers.to_vec();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        let response = match method {
            "GET" => {
                let mut request = agent.get(&url);
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                request.call()
            }
            "POST" => {
                let mut request = agent.post(&url);
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                request.send(&body[..])
            }
            _ => unreachable!("{method}"),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap();
        Answer {
            status: response.status().as_u16(),
            content_type,
            body,
        }
    })
    .await
    .unwrap()
}

/// GET answered 200: the body as text.
async fn text(c: &RunningCollector, path: &str) -> String {
    let answer = http(c, "GET", path, &[], Vec::new()).await;
    assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    answer.text()
}

async fn json(c: &RunningCollector, path: &str) -> serde_json::Value {
    serde_json::from_str(&text(c, path).await).unwrap()
}

/// A pprof upload with the labels `query` (`NAME=VALUE&...`).
async fn upload(c: &RunningCollector, query: &str, body: Vec<u8>) -> Answer {
    let path = format!("/api/v1/ingest/pprof?{query}");
    http(c, "POST", &path, &[], body).await
}

/// An OTLP/HTTP export, gzipped when `gzip`.
async fn otlp_http(
    c: &RunningCollector,
    request: &ExportProfilesServiceRequest,
    gzip: bool,
) -> Answer {
    let mut headers = vec![("content-type", "application/x-protobuf")];
    let mut body = request.encode_to_vec();
    if gzip {
        headers.push(("content-encoding", "gzip"));
        body = gzipped(&body);
    }
    http(c, "POST", "/v1development/profiles", &headers, body).await
}

/// The value of one series of `/metrics` (0 when absent).
async fn metric(c: &RunningCollector, series: &str) -> f64 {
    let metrics = text(c, "/metrics").await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits until `series` is at least `at_least`; its value.
async fn metric_reaches(c: &RunningCollector, series: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + SETTLE;
    loop {
        let value = metric(c, series).await;
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {value}, not {at_least} or more, after {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rejected(format: &str, reason: &str) -> String {
    format!("profiler_imports_rejected_total{{format=\"{format}\",reason=\"{reason}\"}}")
}

fn imports(format: &str, outcome: &str) -> String {
    format!("profiler_imports_total{{format=\"{format}\",outcome=\"{outcome}\"}}")
}

fn not_allowed(server: &str) -> String {
    format!(
        "profiler_connections_rejected_total{{server=\"{server}\",reason=\"not_allowed_network\"}}"
    )
}

/// `query={NAME="VALUE"}` URL-encoded.
fn select(name: &str, value: &str) -> String {
    format!("query=%7B{name}%3D%22{value}%22%7D")
}

fn gzipped(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

// --- pprof ----------------------------------------------------------------

/// Builds a pprof profile the way Go's runtime/pprof writes one.
struct GoProfile {
    p: pprof::Profile,
    strings: HashMap<String, i64>,
}

impl GoProfile {
    fn new(time_nanos: i64, duration_nanos: i64) -> Self {
        let mut g = GoProfile {
            p: pprof::Profile {
                time_nanos,
                duration_nanos,
                ..Default::default()
            },
            strings: HashMap::new(),
        };
        g.s("");
        let filename = g.s("/usr/local/bin/checkout");
        g.p.mapping.push(pprof::Mapping {
            id: 1,
            memory_start: 0x400000,
            memory_limit: 0x800000,
            filename,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
            ..Default::default()
        });
        g
    }

    fn s(&mut self, s: &str) -> i64 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.p.string_table.len() as i64;
        self.p.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn value_type(&mut self, t: &str, u: &str) -> pprof::ValueType {
        pprof::ValueType {
            r#type: self.s(t),
            unit: self.s(u),
        }
    }

    /// A location whose lines are the functions `names`, innermost first
    /// (all but the last inlined into the last).
    fn location(&mut self, names: &[&str]) -> u64 {
        let mut line = Vec::new();
        for name in names {
            let id = self.p.function.len() as u64 + 1;
            let (name, filename) = (self.s(name), self.s("/src/checkout/main.go"));
            self.p.function.push(pprof::Function {
                id,
                name,
                system_name: name,
                filename,
                start_line: 1,
            });
            line.push(pprof::Line {
                function_id: id,
                line: 10 + id as i64,
            });
        }
        let id = self.p.location.len() as u64 + 1;
        self.p.location.push(pprof::Location {
            id,
            mapping_id: 1,
            address: 0x401000 + id * 0x10,
            line,
            is_folded: false,
        });
        id
    }

    /// A sample of `locations` (leaf first).
    fn sample(&mut self, locations: &[u64], values: &[i64]) {
        self.p.sample.push(pprof::Sample {
            location_id: locations.to_vec(),
            value: values.to_vec(),
            label: Vec::new(),
        });
    }
}

/// A Go CPU profile: samples/count and cpu/nanoseconds at 100 Hz for 10 s,
/// collected 30 s ago; `main.parse` is inlined into `main.handle`. Two
/// stacks, 3:1.
fn go_cpu() -> pprof::Profile {
    let mut g = GoProfile::new(now_ns() - 30 * SECOND, 10 * SECOND);
    g.p.sample_type = vec![
        g.value_type("samples", "count"),
        g.value_type("cpu", "nanoseconds"),
    ];
    g.p.period_type = Some(g.value_type("cpu", "nanoseconds"));
    g.p.period = 10_000_000;
    let goexit = g.location(&["runtime.goexit"]);
    let main = g.location(&["main.main"]);
    let handle = g.location(&["main.parse", "main.handle"]);
    let malloc = g.location(&["runtime.mallocgc"]);
    g.sample(&[handle, main, goexit], &[3, 30_000_000]);
    g.sample(&[malloc, handle, main, goexit], &[1, 10_000_000]);
    g.p
}

/// A Go mutex profile: contentions/count and delay/nanoseconds; one
/// contention was not timed.
fn go_mutex() -> pprof::Profile {
    let mut g = GoProfile::new(now_ns() - 30 * SECOND, 0);
    g.p.sample_type = vec![
        g.value_type("contentions", "count"),
        g.value_type("delay", "nanoseconds"),
    ];
    g.p.period_type = Some(g.value_type("contentions", "count"));
    g.p.period = 1;
    let goexit = g.location(&["runtime.goexit"]);
    let handle = g.location(&["main.handle"]);
    let unlock = g.location(&["sync.(*Mutex).Unlock"]);
    g.sample(&[unlock, handle, goexit], &[3, 1_500_000]);
    g.sample(&[handle, goexit], &[1, 0]);
    g.p
}

const HOT: &str = "checkout;runtime.goexit;main.main;main.handle;main.parse_[i]";

// --- OTLP -----------------------------------------------------------------

/// A request's dictionary, each table's zero value at index 0.
struct Dict(ProfilesDictionary);

impl Dict {
    fn new() -> Self {
        Dict(ProfilesDictionary {
            mapping_table: vec![Mapping::default()],
            location_table: vec![Location::default()],
            function_table: vec![Function::default()],
            link_table: vec![Link::default()],
            string_table: vec![String::new()],
            attribute_table: vec![KeyValueAndUnit::default()],
            stack_table: vec![Stack::default()],
        })
    }

    fn s(&mut self, s: &str) -> i32 {
        let table = &mut self.0.string_table;
        match table.iter().position(|x| x == s) {
            Some(i) => i as i32,
            None => {
                table.push(s.to_string());
                table.len() as i32 - 1
            }
        }
    }

    fn value_type(&mut self, t: &str, u: &str) -> ValueType {
        ValueType {
            type_strindex: self.s(t),
            unit_strindex: self.s(u),
        }
    }

    /// A location of the functions `names`, innermost first.
    fn location(&mut self, names: &[&str]) -> i32 {
        let mut lines = Vec::new();
        for name in names {
            let name_strindex = self.s(name);
            self.0.function_table.push(Function {
                name_strindex,
                ..Default::default()
            });
            lines.push(Line {
                function_index: self.0.function_table.len() as i32 - 1,
                line: 7,
                column: 0,
            });
        }
        self.0.location_table.push(Location {
            lines,
            ..Default::default()
        });
        self.0.location_table.len() as i32 - 1
    }

    /// A stack of `locations`, leaf first.
    fn stack(&mut self, locations: &[i32]) -> i32 {
        self.0.stack_table.push(Stack {
            location_indices: locations.to_vec(),
        });
        self.0.stack_table.len() as i32 - 1
    }
}

fn attribute(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        key_strindex: 0,
    }
}

fn sample(stack_index: i32, value: i64, attribute_indices: &[i32]) -> Sample {
    Sample {
        stack_index,
        attribute_indices: attribute_indices.to_vec(),
        link_index: 0,
        values: vec![value],
        timestamps_unix_nano: Vec::new(),
    }
}

/// One resource (node-7, service checkout, process app, pid 4242) with one
/// CPU profile (cpu/samples every 10101010 ns: 99 Hz) of 10 s that started
/// at `start`: `main;handle;parse_[i]` 3 + 2, and `...;write` 2 on thread
/// worker-1.
fn otlp_request(start: i64) -> ExportProfilesServiceRequest {
    let mut d = Dict::new();
    let main = d.location(&["main"]);
    let handle = d.location(&["parse", "handle"]);
    let write = d.location(&["write"]);
    let hot = d.stack(&[handle, main]);
    let sys = d.stack(&[write, handle, main]);
    let key_strindex = d.s("thread.name");
    d.0.attribute_table.push(KeyValueAndUnit {
        key_strindex,
        value: Some(AnyValue {
            value: Some(Value::StringValue("worker-1".into())),
        }),
        unit_strindex: 0,
    });
    let worker = d.0.attribute_table.len() as i32 - 1;
    let profile = Profile {
        sample_type: Some(d.value_type("cpu", "samples")),
        samples: vec![
            sample(hot, 3, &[]),
            sample(sys, 2, &[worker]),
            sample(hot, 2, &[]),
        ],
        time_unix_nano: start as u64,
        duration_nano: 10 * SECOND as u64,
        period_type: Some(d.value_type("cpu", "nanoseconds")),
        period: 10_101_010,
        ..Default::default()
    };
    ExportProfilesServiceRequest {
        resource_profiles: vec![ResourceProfiles {
            resource: Some(Resource {
                attributes: vec![
                    attribute("host.name", Value::StringValue("node-7".into())),
                    attribute("service.name", Value::StringValue("checkout".into())),
                    attribute("process.executable.name", Value::StringValue("app".into())),
                    attribute("process.pid", Value::IntValue(4242)),
                ],
                ..Default::default()
            }),
            scope_profiles: vec![ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: "formats-test".into(),
                    version: "1.0.0".into(),
                    ..Default::default()
                }),
                profiles: vec![profile],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
        dictionary: Some(d.0),
    }
}

fn first_profile(request: &mut ExportProfilesServiceRequest) -> &mut Profile {
    &mut request.resource_profiles[0].scope_profiles[0].profiles[0]
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap()
}

async fn otlp_grpc(c: &RunningCollector) -> ProfilesServiceClient<Channel> {
    ProfilesServiceClient::new(channel(c.grpc_addr).await)
}

// --- native batches and other source addresses ----------------------------

/// A native batch of `process` (pid 42): main;hot x3, main;cold x1.
fn native_batch(agent: &str, process: &str, seq: u64) -> Batch {
    let strings = ["", process, "main", "hot", "cold", "process", "pid", "42"];
    let end = now_ns() - 5 * SECOND;
    Batch {
        agent_id: agent.into(),
        sequence: seq,
        node: "n1".into(),
        agent_version: "test".into(),
        window_start_unix_nanos: end - 10 * SECOND,
        window_end_unix_nanos: end,
        frequency_hz: 99,
        strings: strings.iter().map(|s| s.as_bytes().to_vec()).collect(),
        stacks: vec![
            v1::Stack {
                frames: vec![1, 2, 3],
            },
            v1::Stack {
                frames: vec![1, 2, 4],
            },
        ],
        label_sets: vec![LabelSet {
            labels: vec![
                v1::Label { name: 5, value: 1 },
                v1::Label { name: 6, value: 7 },
            ],
        }],
        samples: vec![
            v1::Sample {
                label_set: 0,
                stack: 0,
                value: 3,
            },
            v1::Sample {
                label_set: 0,
                stack: 1,
                value: 1,
            },
        ],
        sample_type: None,
    }
}

const INTRUDER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

/// A TCP connection to `addr` from a socket bound to `source`.
async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// A gRPC channel whose connections come from `source`.
async fn channel_from(
    source: IpAddr,
    addr: SocketAddr,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |uri: Uri| async move {
            let addr: SocketAddr = format!(
                "{}:{}",
                uri.host().unwrap_or_default(),
                uri.port_u16().unwrap_or(80)
            )
            .parse()
            .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(TokioIo::new(connect_from(source, addr).await?))
        }))
        .await
}

/// Writes a raw HTTP/1.1 `request` on a connection from `source`; what
/// came back before the server closed it (a reset counts as closed).
async fn raw_http_from(source: IpAddr, addr: SocketAddr, request: Vec<u8>) -> Vec<u8> {
    let tcp = connect_from(source, addr)
        .await
        .unwrap()
        .into_std()
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let mut tcp = tcp;
        tcp.set_nonblocking(false).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A closed connection may refuse the request already.
        let _ = tcp.write_all(&request);
        let mut got = Vec::new();
        match tcp.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!(
                "reading the answer from {addr}: {e} (got {} bytes)",
                got.len()
            ),
        }
        got
    })
    .await
    .unwrap()
}

fn raw_request(
    method: &str,
    path: &str,
    addr: SocketAddr,
    content_type: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

// --- the tests ------------------------------------------------------------

#[tokio::test]
async fn a_go_pprof_upload_is_stored_once_with_its_types_and_units() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let c = start(&dir.path().join("p.db"), &[]).await;
        let cpu = gzipped(&go_cpu().encode_to_vec());

        let answer = upload(&c, "service=checkout&process=checkout", cpu.clone()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let stored: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(
            stored,
            serde_json::json!({"batches_stored": 2, "batches_duplicate": 0})
        );

        let types = json(&c, "/api/v1/types?start=now-1h&end=now").await;
        assert_eq!(
            types,
            serde_json::json!([
                {"type": "cpu_nanoseconds", "unit": "nanoseconds"},
                {"type": "samples", "unit": "count"},
            ])
        );
        let checkout = select("service", "checkout");
        let folded_cpu =
            format!("/api/v1/folded?type=cpu_nanoseconds&{checkout}&start=now-1h&end=now");
        let expected_cpu = format!("{HOT} 30000000\n{HOT};runtime.mallocgc 10000000\n");
        assert_eq!(text(&c, &folded_cpu).await, expected_cpu);
        let folded_samples = format!("/api/v1/folded?type=samples&{checkout}");
        let expected_samples = format!("{HOT} 3\n{HOT};runtime.mallocgc 1\n");
        assert_eq!(text(&c, &folded_samples).await, expected_samples);
        let top = json(&c, "/api/v1/top?type=cpu_nanoseconds&n=1").await;
        assert_eq!(top["unit"], "nanoseconds");
        assert_eq!(top["total"], 40_000_000);
        assert_eq!(top["functions"][0]["function"], "main.parse_[i]");
        let labels = json(&c, "/api/v1/labels?type=cpu_nanoseconds").await;
        assert_eq!(labels, serde_json::json!(["process", "service"]));

        // The same bytes again: acknowledged, stored once.
        let again = upload(&c, "service=checkout&process=checkout", cpu).await;
        assert_eq!(again.status, 200, "{}", again.text());
        let again: serde_json::Value = serde_json::from_slice(&again.body).unwrap();
        assert_eq!(
            again,
            serde_json::json!({"batches_stored": 0, "batches_duplicate": 2})
        );
        assert_eq!(text(&c, &folded_cpu).await, expected_cpu);
        assert_eq!(text(&c, &folded_samples).await, expected_samples);
        assert_eq!(metric(&c, &imports("pprof", "stored")).await, 1.0);
        assert_eq!(metric(&c, &imports("pprof", "duplicate")).await, 1.0);
        assert_eq!(metric(&c, "profiler_batches_duplicate_total").await, 2.0);

        // A mutex profile, plain (not gzipped): its own types and units.
        let answer = upload(
            &c,
            "service=checkout&process=checkout",
            go_mutex().encode_to_vec(),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let types = json(&c, "/api/v1/types?start=now-1h&end=now").await;
        assert_eq!(
            types,
            serde_json::json!([
                {"type": "contentions", "unit": "count"},
                {"type": "cpu_nanoseconds", "unit": "nanoseconds"},
                {"type": "delay", "unit": "nanoseconds"},
                {"type": "samples", "unit": "count"},
            ])
        );
        let lock = "checkout;runtime.goexit;main.handle";
        assert_eq!(
            text(&c, &format!("/api/v1/folded?type=contentions&{checkout}")).await,
            format!("{lock} 1\n{lock};sync.(*Mutex).Unlock 3\n")
        );
        assert_eq!(
            text(&c, "/api/v1/folded?type=delay").await,
            format!("{lock};sync.(*Mutex).Unlock 1500000\n"),
            "the untimed contention has no delay"
        );
        let top = json(&c, "/api/v1/top?type=delay").await;
        assert_eq!(
            (&top["unit"], &top["total"]),
            (&"nanoseconds".into(), &1_500_000.into())
        );
        assert_eq!(
            text(&c, &folded_cpu).await,
            expected_cpu,
            "the CPU profile is untouched"
        );
        c.shutdown().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn otlp_over_grpc_and_http_is_stored_once_with_its_labels() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let c = start(&dir.path().join("p.db"), &[]).await;
        let first = otlp_request(now_ns() - 40 * SECOND);
        let second = otlp_request(now_ns() - 25 * SECOND);
        let app = select("process", "app");
        let folded = format!("/api/v1/folded?type=cpu&{app}&start=now-1h&end=now");
        let hot = "app;main;handle;parse_[i]";

        let answer = otlp_grpc(&c).await.export(first.clone()).await.unwrap();
        assert_eq!(
            answer.into_inner(),
            ExportProfilesServiceResponse::default()
        );
        assert_eq!(text(&c, &folded).await, format!("{hot} 5\n{hot};write 2\n"));

        // Another window, over HTTP, gzipped.
        let answer = otlp_http(&c, &second, true).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.content_type, "application/x-protobuf");
        assert_eq!(
            ExportProfilesServiceResponse::decode(answer.body.as_slice()).unwrap(),
            ExportProfilesServiceResponse::default()
        );
        let both = format!("{hot} 10\n{hot};write 4\n");
        assert_eq!(text(&c, &folded).await, both);

        let types = json(&c, "/api/v1/types").await;
        assert_eq!(
            types,
            serde_json::json!([{"type": "cpu", "unit": "samples"}])
        );
        let labels = json(&c, "/api/v1/labels").await;
        assert_eq!(
            labels,
            serde_json::json!(["node", "pid", "process", "service", "thread"])
        );
        for (label, value) in [
            ("node", "node-7"),
            ("service", "checkout"),
            ("process", "app"),
            ("pid", "4242"),
        ] {
            let values = json(&c, &format!("/api/v1/labels/{label}/values")).await;
            assert_eq!(values, serde_json::json!([value]), "{label}");
        }
        let worker = format!("/api/v1/folded?{}", select("thread", "worker-1"));
        assert_eq!(text(&c, &worker).await, format!("{hot};write 4\n"));

        // Re-sent, each the other way: no double count.
        otlp_grpc(&c).await.export(second.clone()).await.unwrap();
        let answer = otlp_http(&c, &first, false).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(text(&c, &folded).await, both);
        assert_eq!(metric(&c, &imports("otlp", "stored")).await, 2.0);
        assert_eq!(metric(&c, &imports("otlp", "duplicate")).await, 2.0);
        assert_eq!(metric(&c, "profiler_samples_stored_total").await, 14.0);

        // The earlier version of the format is told which one is spoken.
        let answer = http(
            &c,
            "POST",
            "/v1experimental/profiles",
            &[("content-type", "application/x-protobuf")],
            first.encode_to_vec(),
        )
        .await;
        assert_eq!(answer.status, 404, "{}", answer.text());
        let (error, reason) = answer.refusal();
        assert_eq!(reason, "unsupported_version");
        assert!(error.contains("v1development"), "{error}");
        let experimental = tower::ServiceExt::map_request(
            channel(c.grpc_addr).await,
            |mut request: http::Request<tonic::body::Body>| {
                let path = request
                    .uri()
                    .path()
                    .replace("v1development", "v1experimental");
                *request.uri_mut() = path.parse().unwrap();
                request
            },
        );
        let status = ProfilesServiceClient::new(experimental)
            .export(first)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert!(status.message().contains("v1development"), "{status:?}");
        assert_eq!(text(&c, &folded).await, both);
        c.shutdown().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn hostile_profiles_are_refused_whole_and_the_collector_keeps_serving() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        // max_message_bytes: 1 MiB.
        let c = start(&dir.path().join("p.db"), &[]).await;

        let cpu = gzipped(&go_cpu().encode_to_vec());
        let mut bad_location = go_cpu();
        bad_location.sample[1].location_id[0] = 99;
        // 64 MiB of zeros, about 64 KiB gzipped.
        let bomb = gzipped(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        let pprof_cases: [(&str, Vec<u8>, u16, &str, &str); 5] = [
            (
                "garbage",
                b"\x0a\xff\xff\xff\xff\xff garbage".to_vec(),
                400,
                "undecodable",
                "undecodable profile",
            ),
            (
                "truncated gzip",
                cpu[..cpu.len() / 2].to_vec(),
                400,
                "bad_gzip",
                "bad gzip",
            ),
            ("zip bomb", bomb, 413, "too_large", "1048576 bytes"),
            (
                "plain body over the limit",
                vec![0x0a; OVER_THE_LIMIT],
                413,
                "too_large",
                "1048576 bytes",
            ),
            (
                "unknown location id",
                gzipped(&bad_location.encode_to_vec()),
                400,
                "bad_index",
                "sample[1].location_id[0] 99 is not the id of any location entry",
            ),
        ];
        for (what, body, status, reason, message) in pprof_cases {
            let answer = upload(&c, "service=checkout&process=checkout", body).await;
            assert_eq!(answer.status, status, "{what}: {}", answer.text());
            let (error, got) = answer.refusal();
            assert_eq!(got, reason, "{what}: {error}");
            assert!(error.contains(message), "{what}: {error}");
        }

        let mut bad_stack = otlp_request(now_ns() - 40 * SECOND);
        first_profile(&mut bad_stack).samples[1].stack_index = 99;
        let mut not_zero = otlp_request(now_ns() - 40 * SECOND);
        not_zero.dictionary.as_mut().unwrap().string_table[0] = "x".into();
        let mut no_dictionary = otlp_request(now_ns() - 40 * SECOND);
        no_dictionary.dictionary = None;
        let otlp_cases = [
            (
                "stack_index out of range",
                bad_stack,
                "bad_index",
                "profiles[0].samples[1].stack_index 99 out of range (stack_table has 3 entries)",
            ),
            (
                "string_table[0] not empty",
                not_zero,
                "zero_value_rule",
                "dictionary.string_table[0] must be the zero value \"\"",
            ),
            (
                "no dictionary",
                no_dictionary,
                "unsupported_version",
                "opentelemetry.proto.profiles.v1development as of OTLP 1.10.0",
            ),
        ];
        let mut grpc = otlp_grpc(&c).await;
        for (what, request, reason, message) in otlp_cases {
            let status = grpc.export(request.clone()).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            assert!(status.message().contains(message), "{what}: {status:?}");
            let answer = otlp_http(&c, &request, false).await;
            assert_eq!(answer.status, 400, "{what}: {}", answer.text());
            let (error, got) = answer.refusal();
            assert_eq!(got, reason, "{what}: {error}");
            assert!(error.contains(message), "{what}: {error}");
        }
        let answer = http(
            &c,
            "POST",
            "/v1development/profiles",
            &[("content-type", "application/x-protobuf")],
            b"\x0a\xff\xff\xff\xff\xff garbage".to_vec(),
        )
        .await;
        assert_eq!(answer.status, 400, "{}", answer.text());
        assert_eq!(answer.refusal().1, "undecodable");
        let answer = http(
            &c,
            "POST",
            "/v1development/profiles",
            &[("content-type", "application/x-protobuf")],
            vec![0x0a; OVER_THE_LIMIT],
        )
        .await;
        assert_eq!(answer.status, 413, "{}", answer.text());
        assert_eq!(answer.refusal().1, "too_large");

        // Nothing stored, each reason counted.
        let types = json(&c, "/api/v1/types?start=now-1h&end=now").await;
        assert_eq!(types, serde_json::json!([]));
        assert_eq!(metric(&c, "profiler_batches_stored_total").await, 0.0);
        for (format, reason, n) in [
            ("pprof", "undecodable", 1.0),
            ("pprof", "bad_gzip", 1.0),
            ("pprof", "too_large", 2.0),
            ("pprof", "bad_index", 1.0),
            ("otlp", "bad_index", 2.0),
            ("otlp", "zero_value_rule", 2.0),
            ("otlp", "unsupported_version", 2.0),
            ("otlp", "undecodable", 1.0),
            ("otlp", "too_large", 1.0),
        ] {
            assert_eq!(
                metric(&c, &rejected(format, reason)).await,
                n,
                "{format} {reason}"
            );
        }
        assert_eq!(metric(&c, &imports("pprof", "rejected")).await, 5.0);
        assert_eq!(metric(&c, &imports("otlp", "rejected")).await, 8.0);

        // Still serving, on the same connections too.
        assert_eq!(text(&c, "/healthz").await, "ok\n");
        let answer = upload(&c, "service=checkout&process=checkout", cpu).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        grpc.export(otlp_request(now_ns() - 40 * SECOND))
            .await
            .unwrap();
        let types = json(&c, "/api/v1/types?start=now-1h&end=now").await;
        assert_eq!(types.as_array().unwrap().len(), 3, "{types}");
        c.shutdown().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn the_door_lets_in_allowed_networks_only_on_every_path() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let c = start(&dir.path().join("p.db"), &["127.0.0.1/32"]).await;
        let (grpc_addr, http_addr) = (c.grpc_addr, c.http_addr);

        // From 127.0.0.1, every path works.
        let ack = IngestClient::new(channel_from(LOCAL, grpc_addr).await.unwrap())
            .push_batch(native_batch("agent-a", "app", 1))
            .await
            .unwrap()
            .into_inner();
        assert!(ack.newly_stored);
        otlp_grpc(&c)
            .await
            .export(otlp_request(now_ns() - 40 * SECOND))
            .await
            .unwrap();
        let answer = otlp_http(&c, &otlp_request(now_ns() - 25 * SECOND), false).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let answer = upload(
            &c,
            "service=checkout&process=checkout",
            go_cpu().encode_to_vec(),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let labels = json(&c, "/api/v1/labels").await;
        assert_eq!(
            labels,
            serde_json::json!(["node", "pid", "process", "service", "thread"])
        );
        let raw = raw_http_from(
            LOCAL,
            http_addr,
            raw_request("GET", "/api/v1/labels", http_addr, "text/plain", b""),
        )
        .await;
        let raw = String::from_utf8_lossy(&raw);
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
        assert!(
            raw.ends_with(r#"["node","pid","process","service","thread"]"#),
            "{raw}"
        );
        assert_eq!(metric(&c, &not_allowed("gRPC")).await, 0.0);
        assert_eq!(metric(&c, &not_allowed("HTTP")).await, 0.0);

        // From 127.0.0.2, none does: the connection is closed unanswered.
        // Refused by the transport (the connection closed), not answered by
        // a service.
        let refused = |result: Result<(), (Code, String)>, what: &str| match result {
            Ok(()) => panic!("{what} from {INTRUDER} went through"),
            Err((code, e)) => assert!(
                matches!(code, Code::Cancelled | Code::Unavailable | Code::Unknown),
                "{what} from {INTRUDER} was answered: {e}"
            ),
        };
        let native = tokio::time::timeout(Duration::from_secs(20), async {
            let channel = channel_from(INTRUDER, grpc_addr)
                .await
                .map_err(|e| (Code::Unavailable, format!("{e:?}")))?;
            IngestClient::new(channel)
                .push_batch(native_batch("intruder", "evil", 1))
                .await
                .map(drop)
                .map_err(|s| (s.code(), format!("{s:?}")))
        })
        .await
        .expect("native gRPC from 127.0.0.2 hung");
        refused(native, "PushBatch");
        let otlp = tokio::time::timeout(Duration::from_secs(20), async {
            let channel = channel_from(INTRUDER, grpc_addr)
                .await
                .map_err(|e| (Code::Unavailable, format!("{e:?}")))?;
            let mut request = otlp_request(now_ns() - 40 * SECOND);
            request.resource_profiles[0]
                .resource
                .as_mut()
                .unwrap()
                .attributes[1] = attribute("service.name", Value::StringValue("intruder".into()));
            ProfilesServiceClient::new(channel)
                .export(request)
                .await
                .map(drop)
                .map_err(|s| (s.code(), format!("{s:?}")))
        })
        .await
        .expect("OTLP gRPC from 127.0.0.2 hung");
        refused(otlp, "OTLP Export");

        let mut otlp = otlp_request(now_ns() - 55 * SECOND);
        otlp.resource_profiles[0]
            .resource
            .as_mut()
            .unwrap()
            .attributes[1] = attribute("service.name", Value::StringValue("intruder".into()));
        let http_cases = [
            (
                "OTLP/HTTP",
                raw_request(
                    "POST",
                    "/v1development/profiles",
                    http_addr,
                    "application/x-protobuf",
                    &otlp.encode_to_vec(),
                ),
            ),
            (
                "pprof upload",
                raw_request(
                    "POST",
                    "/api/v1/ingest/pprof?service=intruder&process=evil",
                    http_addr,
                    "application/octet-stream",
                    &go_mutex().encode_to_vec(),
                ),
            ),
            (
                "GET /api/v1/labels",
                raw_request("GET", "/api/v1/labels", http_addr, "text/plain", b""),
            ),
        ];
        for (what, request) in http_cases {
            let answer = raw_http_from(INTRUDER, http_addr, request).await;
            assert!(
                answer.is_empty(),
                "{what} from {INTRUDER} was answered: {}",
                String::from_utf8_lossy(&answer)
            );
        }

        // Each refusal is counted (after the close the client saw).
        assert!(metric_reaches(&c, &not_allowed("gRPC"), 2.0).await >= 2.0);
        assert_eq!(metric_reaches(&c, &not_allowed("HTTP"), 3.0).await, 3.0);
        // And nothing of theirs was stored.
        let services = json(&c, "/api/v1/labels/service/values").await;
        assert_eq!(services, serde_json::json!(["checkout"]));
        let processes = json(&c, "/api/v1/labels/process/values").await;
        assert_eq!(processes, serde_json::json!(["app", "checkout"]));
        let types = json(&c, "/api/v1/types").await;
        assert_eq!(
            types,
            serde_json::json!([
                {"type": "cpu", "unit": "samples"},
                {"type": "cpu_nanoseconds", "unit": "nanoseconds"},
                {"type": "samples", "unit": "count"},
            ])
        );
        c.shutdown().await.unwrap();
    })
    .await
}

/// The tokens on every way in: OTLP over gRPC needs an agent token, pprof
/// uploads and OTLP over HTTP the HTTP port's token; without one (or with
/// a wrong one) nothing is stored and the refusal is counted.
#[tokio::test]
async fn tokens_guard_otlp_and_pprof_like_the_native_batches() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agents"), "agent-token\n").unwrap();
        std::fs::write(dir.path().join("ui"), "ui-token\n").unwrap();
        let c = server::start(CollectorConfig {
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            store: StoreLocation::Sqlite(dir.path().join("p.db")),
            token_file: Some(dir.path().join("agents")),
            http_token_file: Some(dir.path().join("ui")),
            ..CollectorConfig::default()
        })
        .await
        .unwrap();

        // OTLP over gRPC: refused without the agent token, stored with it.
        let mut client = otlp_grpc(&c).await;
        let refused = client
            .export(otlp_request(now_ns() - 60 * SECOND))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let mut request = tonic::Request::new(otlp_request(now_ns() - 60 * SECOND));
        request
            .metadata_mut()
            .insert("authorization", "Bearer agent-token".parse().unwrap());
        client.export(request).await.unwrap();

        // pprof and OTLP over HTTP: 401 without the HTTP token, 200 with it.
        let body = gzipped(&go_cpu().encode_to_vec());
        let path = "/api/v1/ingest/pprof?service=checkout";
        let answer = http(&c, "POST", path, &[], body.clone()).await;
        assert_eq!(answer.status, 401, "{}", answer.text());
        let answer = http(
            &c,
            "POST",
            path,
            &[("authorization", "Bearer agent-token")],
            body.clone(),
        )
        .await;
        assert_eq!(answer.status, 401, "an agent token is not the HTTP port's");
        let answer = http(
            &c,
            "POST",
            path,
            &[("authorization", "Bearer ui-token")],
            body,
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let otlp = otlp_request(now_ns() - 30 * SECOND).encode_to_vec();
        let answer = http(
            &c,
            "POST",
            "/v1development/profiles",
            &[("content-type", "application/x-protobuf")],
            otlp.clone(),
        )
        .await;
        assert_eq!(answer.status, 401, "{}", answer.text());
        let answer = http(
            &c,
            "POST",
            "/v1development/profiles",
            &[
                ("content-type", "application/x-protobuf"),
                ("authorization", "Bearer ui-token"),
            ],
            otlp,
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());

        let metrics = http(
            &c,
            "GET",
            "/metrics",
            &[("authorization", "Bearer ui-token")],
            vec![],
        )
        .await
        .text();
        let value = |series: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        assert_eq!(value(&imports("otlp", "stored")), 2.0, "{metrics}");
        assert_eq!(value(&imports("pprof", "stored")), 1.0, "{metrics}");
        assert_eq!(
            value("profiler_http_requests_rejected_total{reason=\"missing_token\"}"),
            2.0
        );
        assert_eq!(
            value("profiler_http_requests_rejected_total{reason=\"wrong_token\"}"),
            1.0
        );
        assert_eq!(
            value("profiler_batches_rejected_total{reason=\"missing_token\"}"),
            1.0
        );
        c.shutdown().await.unwrap();
    })
    .await;
}

/// One OTLP request of a busy node (a profile for each of 200 processes)
/// is one message against the sender's rate limit, not 200.
#[tokio::test]
async fn a_request_of_many_processes_counts_once_against_the_rate_limit() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let c = start(&dir.path().join("p.db"), &[]).await;
        let mut request = otlp_request(now_ns() - 60 * SECOND);
        let one = request.resource_profiles[0].clone();
        request.resource_profiles = (0..200)
            .map(|pid| {
                let mut r = one.clone();
                let attributes = &mut r.resource.as_mut().unwrap().attributes;
                for a in attributes.iter_mut() {
                    if a.key == "process.pid" {
                        a.value = Some(AnyValue {
                            value: Some(Value::IntValue(1000 + pid)),
                        });
                    }
                }
                r
            })
            .collect();
        otlp_grpc(&c).await.export(request).await.unwrap();
        let pids = json(&c, "/api/v1/labels/pid/values?start=now-1h").await;
        assert_eq!(pids.as_array().unwrap().len(), 200, "{pids}");
        c.shutdown().await.unwrap();
    })
    .await;
}
