//! A private ClickHouse server for the store tests and the collector
//! benchmark: Debian's `clickhouse-server` (18.16.1, installed by
//! `cargo xtask setup`) on free loopback ports, with its own config, data and logs in a fresh temp dir, so
//! it never touches /var/lib/clickhouse or the default ports and several can
//! run at once. Tests can kill and restart it on the same ports and data, or
//! stop it with SIGSTOP to simulate a stalled server. Root is not needed.
use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{net::Reserved, Server};

/// How long a start or restart may take until HTTP answers `SELECT 1`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restart waits for the ports of the killed server to be free.
const PORT_FREE_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries of [`ClickHouse::start`] when another process took a picked port first.
const START_TRIES: usize = 3;

pub struct ClickHouse {
    child: Option<Child>,
    dir: tempfile::TempDir,
    http_port: u16,
    tcp_port: u16,
}

impl ClickHouse {
    /// Starts a private clickhouse-server on free loopback ports with its data
    /// in a fresh temp dir; waits (at most 60 s) until HTTP answers `SELECT 1`.
    /// Panics with the tail of its logs if it cannot start or the binary is
    /// missing.
    pub fn start() -> ClickHouse {
        let binary = server_binary();
        let dir = tempfile::Builder::new()
            .prefix("clickhouse-test-")
            .tempdir()
            .expect("cannot create a temp dir for ClickHouse");
        let mut server = ClickHouse {
            child: None,
            dir,
            http_port: 0,
            tcp_port: 0,
        };
        for attempt in 1..=START_TRIES {
            // ClickHouse binds its ports itself: they are held until just
            // before it starts, and a start that lost one is retried.
            let (http, tcp) = (Reserved::new(), Reserved::new());
            server.http_port = http.port();
            server.tcp_port = tcp.port();
            server.write_config();
            http.release();
            tcp.release();
            server.spawn(&binary);
            match server.wait_ready() {
                Ok(()) => return server,
                // Another process bound a port between picking and binding it.
                Err(why) if attempt < START_TRIES && why.contains("Address already in use") => {
                    server.kill();
                }
                Err(why) => panic!("{why}"),
            }
        }
        unreachable!("the last try returns or panics")
    }

    /// The server's process id (for its CPU time in /proc/PID/stat); `None`
    /// after [`kill`](Self::kill).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The native protocol port (clickhouse-client --port).
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// The server's data dir (kept across kill and restart).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// SIGKILLs the server and waits for it to exit; the data dir is kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a stopped (paused) process.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data dir (killing it
    /// first if it runs) and waits until it is ready.
    pub fn restart(&mut self) {
        self.kill();
        for port in [self.http_port, self.tcp_port] {
            wait_port_free(port);
        }
        self.spawn(&server_binary());
        if let Err(why) = self.wait_ready() {
            panic!("{why}");
        }
    }

    /// SIGSTOP: the server keeps its ports (connections are accepted by the
    /// kernel) but answers nothing, like a stalled server.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("ClickHouse is not running");
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}): {}",
            child.id(),
            std::io::Error::last_os_error()
        );
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// Writes config.xml and users.xml: only the HTTP and native ports, on
    /// loopback, and every path inside the temp dir.
    fn write_config(&self) {
        let root = self.dir.path();
        let data = self.data_dir();
        let log = self.log_dir();
        fs::create_dir_all(&data).unwrap();
        fs::create_dir_all(&log).unwrap();
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{log}/server.log</log>
        <errorlog>{log}/error.log</errorlog>
        <console>0</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <path>{data}/</path>
    <tmp_path>{data}/tmp/</tmp_path>
    <user_files_path>{data}/user_files/</user_files_path>
    <format_schema_path>{data}/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
</yandex>
"#,
            log = log.display(),
            data = data.display(),
            http = self.http_port,
            tcp = self.tcp_port,
        );
        let users = r#"<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
"#;
        fs::write(root.join("config.xml"), config).unwrap();
        fs::write(root.join("users.xml"), users).unwrap();
    }

    fn spawn(&mut self, binary: &Path) {
        let console = fs::File::create(self.log_dir().join("console.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!(
                "--config-file={}",
                self.dir.path().join("config.xml").display()
            ))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        self.child = Some(child);
    }

    /// Polls `SELECT 1` until it answers; on exit or timeout, says why with
    /// the tail of the logs.
    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "clickhouse-server (HTTP port {}, TCP port {}) exited with {status} while starting\n{}",
                    self.http_port,
                    self.tcp_port,
                    self.log_tails()
                ));
            }
            if self
                .try_query("SELECT 1", Duration::from_secs(1))
                .is_ok_and(|body| body.trim() == "1")
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "clickhouse-server (HTTP port {}) did not answer SELECT 1 within {READY_TIMEOUT:?}\n{}",
                    self.http_port,
                    self.log_tails()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tails(&self) -> String {
        ["console.log", "error.log"]
            .iter()
            .map(|name| log_tail(&self.log_dir().join(name)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl crate::Server for ClickHouse {
    fn http_port(&self) -> u16 {
        self.http_port
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.kill();
        // The temp dir is removed when `dir` drops.
    }
}

/// The last 20 lines of a log file, headed by its path.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!("--- last lines of {} ---\n{tail}", path.display())
}

/// POSTs `body` to the ClickHouse HTTP interface on loopback `port`, with
/// `query` (if any) as the `query` URL parameter, to which ClickHouse appends
/// the body (`INSERT … FORMAT RowBinary` and its rows); returns the answer's
/// body, or what went wrong (HTTP status and ClickHouse's message).
pub(crate) fn http_post(
    port: u16,
    query: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into();
    let mut request = agent.post(&format!("http://127.0.0.1:{port}/"));
    if let Some(query) = query {
        request = request.query("query", query);
    }
    let mut resp = request.send(body).map_err(|e| format!("no answer: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("HTTP {status}: {}", body.trim_end()))
    }
}

/// clickhouse-server from PATH, else Debian's /usr/sbin (not on every PATH).
fn server_binary() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("clickhouse-server"))
        .find(|path| path.is_file())
        .expect(
            "clickhouse-server is missing: install Debian's clickhouse-server \
             (`cargo xtask setup` does)",
        )
}

fn wait_port_free(port: u16) {
    let started = Instant::now();
    while TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < PORT_FREE_TIMEOUT,
            "port {port} of the killed ClickHouse is still taken after {PORT_FREE_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
