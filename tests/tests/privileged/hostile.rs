//! Hostile input. The real agent against hostile conditions for
//! symbolization: a binary deleted while its process runs, and a window
//! with no time left to name frames (needs root, see
//! `crate::support::privileged`); corrupt, truncated and huge ELF files are
//! covered without BPF in `profiler-agent/tests/hostile_binaries.rs`. The
//! real collector against gRPC messages no agent sends: bytes that are not
//! a batch, and frames flagged compressed that are not.

use std::time::Duration;

use crate::support::{collector::*, *};
use profiler_proto::metadata::{Reason, REASON};
use prost::Message as _;

/// The workload runs from a copy that is deleted once it started: its
/// frames are still named, through the binary the agent opened.
#[test]
fn deleted_binary_is_still_named() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("chain");
    std::fs::copy(workload("chain"), &copy).unwrap();
    let w = Workload::spawn(&copy, &["6"]);
    // Exec has mapped the image before the file goes.
    wait_for_exec(w.pid(), "chain");
    std::fs::remove_file(&copy).unwrap();
    let (rec, _) = record_with(&options(vec![w.pid()], 3.0, 99), || ());
    let (matching, total) = count_where(&rec.profile, "chain", |f| {
        has_chain(f, &["main", "outer", "inner_hot"])
    });
    assert!(total >= 200, "too few samples: {total}");
    assert!(
        matching * 100 >= total * 90,
        "main;outer;inner_hot in {matching} of {total} samples\n{}",
        dump(&rec.profile, "chain")
    );
    assert_eq!(
        rec.symbolizer_stats[profiler_agent::loss::SymbolizerDegrade::Panics],
        0
    );
}

/// A zero budget: no user frame is looked up, every sample is still in the
/// profile with its frames as `module+0xOFFSET`, and the cut is counted.
#[test]
fn zero_budget_keeps_every_sample_unnamed_and_counted() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let w = Workload::spawn(&workload("chain"), &["6"]);
    let mut opts = options(vec![w.pid()], 3.0, 99);
    opts.symbolize.budget = Duration::ZERO;
    let (rec, _) = record_with(&opts, || ());
    let stacks = stacks_of(&rec.profile, "chain");
    let total: u64 = stacks.iter().map(|(_, c)| c).sum();
    assert!(total >= 200, "too few samples: {total}");
    assert_eq!(rec.profile.total(), rec.samples, "no sample dropped");
    for (frames, _) in &stacks {
        for frame in frames {
            assert!(
                frame.ends_with("_[k]") || frame.contains("+0x") || *frame == "[unknown]",
                "user frame named despite a zero budget: {frame}\n{}",
                dump(&rec.profile, "chain")
            );
        }
    }
    let (leaf_in_chain, _) = count_where(&rec.profile, "chain", |f| {
        f.iter().any(|frame| frame.starts_with("chain+0x"))
    });
    assert!(
        leaf_in_chain * 100 >= total * 90,
        "chain+0x... frames in {leaf_in_chain} of {total} samples\n{}",
        dump(&rec.profile, "chain")
    );
    let s = &rec.symbolizer_stats;
    assert!(
        s[profiler_agent::loss::SymbolizerDegrade::WindowsOverBudget] >= 1,
        "{s:?}"
    );
    assert!(
        s[profiler_agent::loss::SymbolizerDegrade::FramesOverBudget] > 0,
        "{s:?}"
    );
}

/// The answer to one `PushBatch` call whose body is the gRPC frame `flag,
/// length, payload` (with `grpc-encoding: encoding`), sent over a raw
/// HTTP/2 connection.
fn push_raw(
    addr: std::net::SocketAddr,
    encoding: Option<&str>,
    flag: u8,
    payload: &[u8],
) -> tonic::Status {
    let mut frame = vec![flag];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let mut request = tonic::codegen::http::Request::post(format!(
            "http://{addr}/profiler.v1.Ingest/PushBatch"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
        if let Some(e) = encoding {
            request = request.header("grpc-encoding", e);
        }
        let (response, mut body) = client
            .send_request(request.body(()).unwrap(), false)
            .unwrap();
        body.send_data(bytes::Bytes::from(frame), true).unwrap();
        let response = response.await.unwrap();
        let mut headers = response.headers().clone();
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        if let Some(trailers) = body.trailers().await.unwrap() {
            headers.extend(trailers);
        }
        tonic::Status::from_header_map(&headers).expect("a grpc-status in the answer")
    })
}

/// Bytes that are not a batch, and batches in frames flagged gzip or zstd
/// that are not compressed: each is `INVALID_ARGUMENT` with reason
/// `undecodable`, counted, logged with the peer, and nothing is stored;
/// a real agent's batch is stored after them.
#[test]
fn undecodable_messages_are_invalid_argument_counted_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let c = CollectorProcess::start(
        &dir.path().join("p.db"),
        0,
        0,
        &dir.path().join("collector.log"),
    );
    // A fixed xorshift sequence, checked not to decode as a batch.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    assert!(profiler_proto::v1::Batch::decode(&random[..]).is_err());
    let plain = synthetic_batch("hostile", 1, 5).encode_to_vec();
    let cases: [(&str, Option<&str>, u8, &[u8]); 3] = [
        ("random bytes", None, 0, &random),
        ("flagged gzip, not compressed", Some("gzip"), 1, &plain),
        ("flagged zstd, not compressed", Some("zstd"), 1, &plain),
    ];
    for (what, encoding, flag, payload) in cases {
        let status = push_raw(c.grpc, encoding, flag, payload);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert_eq!(
            Reason::of(&status),
            Some(Reason::Undecodable),
            "{what}: {:?}",
            status.metadata().get(REASON)
        );
    }
    let counted = "profiler_batches_rejected_total{reason=\"undecodable\"} 3";
    wait_until(
        Duration::from_secs(10),
        "the collector counted the three",
        || c.metrics().contains(counted),
    );
    wait_until(
        Duration::from_secs(10),
        "the collector logged the three",
        || c.log().matches("does not decode as a batch").count() == 3,
    );
    let log = c.log();
    for line in log.lines().filter(|l| l.contains("does not decode")) {
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
    }
    assert!(c.metrics().contains("profiler_batches_stored_total 0"));

    synthetic_agent(c.grpc.port(), "after", 1, 5);
    wait_until(
        Duration::from_secs(10),
        "the collector stored the real batch",
        || c.metrics().contains("profiler_batches_stored_total 1"),
    );
}
