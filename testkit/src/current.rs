//! A current ClickHouse engine for the store tests, beside Debian's 18.16 of
//! [`clickhouse`](crate::clickhouse): `testkit/chdb_shim.py` serves
//! ClickHouse's HTTP interface from chdb (PyPI `chdb-core` 26.9, ClickHouse's
//! engine embedded in Python, installed for `python3` by `cargo xtask setup`),
//! so the store's SQL is checked against today's ClickHouse without a server
//! package. Each instance has its own free loopback port and its data in a
//! fresh temp dir; root is not needed. The shim serves one request at a time
//! and only what the store sends (see its docstring).
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    clickhouse::{http_post, log_tail},
    Server,
};

/// The HTTP shim, run by `python3`.
const SHIM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/chdb_shim.py");
/// How long the shim may take to load chdb and listen.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct CurrentClickHouse {
    child: Child,
    dir: tempfile::TempDir,
    http_port: u16,
}

impl CurrentClickHouse {
    /// Starts the shim on a free loopback port with its data in a fresh temp
    /// dir; waits (at most 60 s) until it listens. Panics with the tail of its
    /// stderr if it cannot start, e.g. when python3 has no chdb.
    pub fn start() -> CurrentClickHouse {
        let dir = tempfile::Builder::new()
            .prefix("clickhouse-current-test-")
            .tempdir()
            .expect("cannot create a temp dir for the chdb shim");
        let data = dir.path().join("data");
        let stdout = fs::File::create(dir.path().join("stdout")).unwrap();
        let stderr = fs::File::create(dir.path().join("stderr")).unwrap();
        let child = Command::new("python3")
            .arg(SHIM)
            .arg("--path")
            .arg(&data)
            .args(["--port", "0"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start python3 {SHIM}: {e} (`cargo xtask setup` installs python3's chdb-core)")
            });
        let mut server = CurrentClickHouse {
            child,
            dir,
            http_port: 0,
        };
        server.http_port = server.wait_listening();
        server
    }

    /// Runs `query` (the `query` URL parameter) with `body` appended, as the
    /// store sends `INSERT INTO t FORMAT RowBinary` and its rows; panics like
    /// [`query`](Self::query).
    pub fn query_with_body(&self, query: &str, body: &[u8]) -> String {
        http_post(self.http_port, Some(query), body, crate::QUERY_TIMEOUT)
            .unwrap_or_else(|why| panic!("chdb query {query:?} with a body: {why}"))
    }

    /// The engine's `version()`, e.g. `26.9.2.1`.
    pub fn version(&self) -> String {
        self.query("SELECT version()").trim().to_string()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for the shim's `LISTENING <port>` line and returns the port.
    fn wait_listening(&mut self) -> u16 {
        let started = Instant::now();
        loop {
            let stdout = fs::read_to_string(self.file("stdout")).unwrap_or_default();
            if let Some(port) = stdout
                .lines()
                .find_map(|line| line.strip_prefix("LISTENING "))
            {
                return port
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("the chdb shim printed a bad port: {stdout:?}"));
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the chdb shim ({SHIM}) exited with {status} while starting; \
                     `cargo xtask setup` installs python3's chdb-core\n{}",
                    self.stderr_tail()
                );
            }
            if started.elapsed() > READY_TIMEOUT {
                panic!(
                    "the chdb shim ({SHIM}) did not listen within {READY_TIMEOUT:?}\n{}",
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr_tail(&self) -> String {
        log_tail(&self.file("stderr"))
    }
}

impl crate::Server for CurrentClickHouse {
    fn http_port(&self) -> u16 {
        self.http_port
    }
}

impl Drop for CurrentClickHouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The temp dir is removed when `dir` drops.
    }
}
