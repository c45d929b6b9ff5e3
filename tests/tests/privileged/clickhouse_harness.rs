//! The ClickHouse harness of the store tests works: a private server keeps a
//! MergeTree row across SIGKILL and restart on the same ports, answers
//! nothing while paused, and answers again once resumed. The current engine
//! (chdb behind testkit/chdb_shim.py) answers as ClickHouse 26, takes
//! RowBinary rows in an INSERT's body and applies a table's TTL.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::clickhouse::ClickHouse;
use profiler_testkit::{current::CurrentClickHouse, Server};

#[test]
fn clickhouse_survives_kill_and_restart_and_pauses() {
    let started = Instant::now();
    let mut ch = ClickHouse::start();
    let port = ch.http_port();
    assert_eq!(
        ch.store_url("profiles"),
        format!("clickhouse://127.0.0.1:{port}/profiles")
    );
    ch.query("CREATE TABLE t (id UInt64, name String) ENGINE = MergeTree ORDER BY id");
    ch.query("INSERT INTO t VALUES (7, 'seven')");

    ch.kill();
    assert!(
        ch.try_query("SELECT 1", Duration::from_secs(1)).is_err(),
        "a killed server answers"
    );
    ch.restart();
    assert_eq!(ch.http_port(), port, "restart keeps the port");
    assert_eq!(ch.query("SELECT id, name FROM t"), "7\tseven\n");

    ch.pause();
    let err = ch
        .try_query("SELECT count() FROM t", Duration::from_millis(500))
        .expect_err("a paused server answers");
    eprintln!("while paused: {err}");
    ch.resume();
    assert_eq!(
        ch.try_query("SELECT count() FROM t", Duration::from_secs(10)),
        Ok("1\n".to_string())
    );

    // A bad statement panics with ClickHouse's message.
    let bad = ch.try_query("SELECT * FROM missing", Duration::from_secs(10));
    assert!(
        bad.as_ref()
            .is_err_and(|e| e.contains("HTTP 404") || e.contains("missing")),
        "{bad:?}"
    );
    // Two servers at once, on their own ports.
    let other = ClickHouse::start();
    assert_ne!(other.http_port(), ch.http_port());
    assert_eq!(
        other.query("SELECT count() FROM system.tables WHERE name = 't'"),
        "0\n"
    );
    eprintln!("harness test took {:.1} s", started.elapsed().as_secs_f64());
}

/// One RowBinary row of `(ts DateTime, id UInt64, name String)`.
fn row_binary(ts: u32, id: u64, name: &str) -> Vec<u8> {
    let mut row = Vec::new();
    row.extend_from_slice(&ts.to_le_bytes());
    row.extend_from_slice(&id.to_le_bytes());
    // The length is a LEB128 varint: one byte below 128.
    assert!(name.len() < 128);
    row.push(name.len() as u8);
    row.extend_from_slice(name.as_bytes());
    row
}

#[test]
fn current_clickhouse_takes_row_binary_and_applies_ttl() {
    let started = Instant::now();
    let ch = CurrentClickHouse::start();
    let version = ch.version();
    assert!(version.starts_with("26."), "version {version:?}");
    let port = ch.http_port();
    assert_eq!(
        ch.store_url("profiles"),
        format!("clickhouse://127.0.0.1:{port}/profiles")
    );

    ch.query("CREATE DATABASE h");
    ch.query(
        "CREATE TABLE h.t (ts DateTime, id UInt64, name String) \
         ENGINE = MergeTree ORDER BY id TTL ts + INTERVAL 1 DAY",
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32;
    let mut rows = row_binary(now, 7, "seven");
    rows.extend(row_binary(now - 2 * 86_400, 8, "expired"));
    rows.extend(row_binary(now, 9, "nine"));
    assert_eq!(
        ch.query_with_body("INSERT INTO h.t FORMAT RowBinary", &rows),
        ""
    );
    // A merge drops the row past the TTL (a background one may have already).
    ch.query("OPTIMIZE TABLE h.t FINAL");
    assert_eq!(
        ch.query(&format!(
            "SELECT id, name, ts = toDateTime({now}) FROM h.t ORDER BY id"
        )),
        "7\tseven\t1\n9\tnine\t1\n"
    );

    // A bad statement fails with the engine's message.
    let bad = ch.try_query("SELECT * FROM h.missing", Duration::from_secs(10));
    assert!(
        bad.as_ref()
            .is_err_and(|e| e.contains("HTTP 500") && e.contains("missing")),
        "{bad:?}"
    );
    eprintln!(
        "current ClickHouse {version}: harness test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
