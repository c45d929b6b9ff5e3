//! The ClickHouse harness of the store tests works: a private server keeps a
//! MergeTree row across SIGKILL and restart on the same ports, answers
//! nothing while paused, and answers again once resumed.
mod support;

use std::time::{Duration, Instant};

use support::clickhouse::ClickHouse;

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
