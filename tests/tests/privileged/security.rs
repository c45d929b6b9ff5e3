//! TLS, mutual TLS and bearer tokens between the real agent and the real
//! collector (both binaries, on loopback), with certificates made for the
//! test: the good set is accepted, and an unknown CA, a missing or foreign
//! client certificate, an expired certificate and a wrong or rotated-out
//! token are each refused with their own message, on both sides.

use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Arc,
    time::Duration,
};

use crate::support::{agent_binary, collector_binary, privileged, serial, within};
use profiler_security::{
    rustls::pki_types::ServerName, tls::client_config, tokio_rustls::TlsConnector, ClientTlsFiles,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA that signs server and client certificates into `dir`.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// Writes `NAME.crt` and `NAME.key`; `expired` makes one that ended in 2020.
    fn sign(&self, dir: &Path, name: &str, server: bool, expired: bool) -> (PathBuf, PathBuf) {
        let sans = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            vec![]
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (crt, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (crt, key_path)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

/// A child process whose stderr goes to a file (stdout to another),
/// killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
    out: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        let out = log.with_extension("out");
        let child = cmd
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the process");
        Self { child, log, out }
    }

    /// Stops the process with SIGTERM and waits (30 s at most) for it to
    /// exit: its log and what it printed.
    fn stop(mut self) -> (String, String) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signals our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        if within(Duration::from_secs(30), || self.child.try_wait().unwrap()).is_none() {
            panic!("did not exit after SIGTERM:\n{}", self.log());
        }
        let out = std::fs::read_to_string(&self.out).unwrap_or_default();
        (self.log(), out)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle`; fails with the log otherwise.
    fn wait_for_log(&self, needle: &str) -> String {
        within(Duration::from_secs(30), || {
            let log = self.log();
            log.contains(needle).then_some(log)
        })
        .unwrap_or_else(|| {
            panic!(
                "{needle:?} never appeared in {}:\n{}",
                self.log.display(),
                self.log()
            )
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Collector {
    proc: Proc,
    grpc: u16,
    http: SocketAddr,
}

fn start_collector(
    dir: &Path,
    name: &str,
    cert: &(PathBuf, PathBuf),
    client_ca: &Path,
) -> Collector {
    // Ports it chooses, read back from its `collector serving` log line.
    let proc = Proc::spawn(
        Command::new(collector_binary())
            .arg("--store")
            .arg(format!(
                "sqlite:{}",
                dir.join(format!("{name}.db")).display()
            ))
            .args(["--grpc-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&cert.0)
            .arg("--tls-key")
            .arg(&cert.1)
            .arg("--tls-client-ca")
            .arg(client_ca)
            .arg("--token-file")
            .arg(dir.join("collector-tokens"))
            .arg("--http-token-file")
            .arg(dir.join("ui-tokens"))
            .env("RUST_LOG", "warn,profiler_collector=info")
            .env("NO_COLOR", "1"),
        dir.join(format!("{name}.log")),
    );
    let (grpc, http) = within(Duration::from_secs(10), || {
        proc.log()
            .lines()
            .find_map(profiler_testkit::net::serving_addrs)
    })
    .unwrap_or_else(|| panic!("the collector did not come up:\n{}", proc.log()));
    Collector {
        proc,
        grpc: grpc.port(),
        http,
    }
}

/// The agent in run mode against `collector`, with extra flags.
fn start_agent(dir: &Path, name: &str, grpc: u16, flags: &[&std::ffi::OsStr]) -> Proc {
    Proc::spawn(
        Command::new(agent_binary())
            .args(["run", "--no-kube", "--no-progress", "-F", "49"])
            .args(["--drain-interval", "300ms", "--node", name])
            .args(["--collector", &format!("https://127.0.0.1:{grpc}")])
            .args(flags)
            .env("RUST_LOG", "warn,profiler_agent=info")
            .env("NO_COLOR", "1"),
        dir.join(format!("{name}.log")),
    )
}

/// An HTTPS GET with an optional `authorization` header: (status, body).
fn https_get(addr: SocketAddr, ca: &Path, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut config = (*client_config(&ClientTlsFiles {
        ca: Some(ca.to_path_buf()),
        ..Default::default()
    })
    .unwrap())
    .clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        let text = String::from_utf8_lossy(&response).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_string())
    })
}

/// `profiler_samples_stored_total` of the collector, over HTTPS with the token.
fn samples_stored(c: &Collector, ca: &Path) -> u64 {
    let (status, body) = https_get(c.http, ca, "/metrics", Some("Bearer ui-token"));
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("profiler_samples_stored_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("samples stored in /metrics")
}

fn wait_for_samples(c: &Collector, ca: &Path, more_than: u64) -> u64 {
    within(Duration::from_secs(30), || {
        Some(samples_stored(c, ca)).filter(|&n| n > more_than)
    })
    .unwrap_or_else(|| panic!("no samples arrived:\n{}", c.proc.log()))
}

/// Replaces a token file the way Secret volumes do (a new file renamed over).
fn write_tokens(path: &Path, tokens: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, tokens).unwrap();
    std::fs::rename(&next, path).unwrap();
}

#[test]
fn tls_mutual_tls_and_tokens_accept_the_right_peers_and_name_every_refusal() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("profiler test CA");
    let rogue = Ca::new("someone else's CA");
    let ca_pem = ca.write(dir, "ca");
    let rogue_pem = rogue.write(dir, "rogue-ca");
    let server = ca.sign(dir, "collector", true, false);
    let expired_server = ca.sign(dir, "collector-expired", true, true);
    let agent = ca.sign(dir, "agent", false, false);
    let foreign_agent = rogue.sign(dir, "foreign-agent", false, false);
    write_tokens(&dir.join("collector-tokens"), "agent-token-1\n");
    write_tokens(&dir.join("ui-tokens"), "ui-token\n");
    write_tokens(&dir.join("agent-token"), "agent-token-1\n");
    write_tokens(&dir.join("wrong-token"), "agent-token-2\n");

    let c = start_collector(dir, "collector", &server, &ca_pem);
    let os = |p: &Path| p.as_os_str().to_owned();
    let good_identity = [
        "--tls-cert".into(),
        os(&agent.0),
        "--tls-key".into(),
        os(&agent.1),
    ];

    // The web API: TLS always, the token on every route but /healthz.
    assert_eq!(https_get(c.http, &ca_pem, "/healthz", None).0, 200);
    let (status, body) = https_get(c.http, &ca_pem, "/api/v1/labels", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("no bearer token"), "{body}");
    let (status, body) = https_get(c.http, &ca_pem, "/api/v1/labels", Some("Bearer nope"));
    assert_eq!(status, 401);
    assert!(body.contains("wrong bearer token"), "{body}");
    // A browser's Basic credentials: any user, the token as password ("u:ui-token").
    let (status, _) = https_get(
        c.http,
        &ca_pem,
        "/api/v1/labels",
        Some("Basic dTp1aS10b2tlbg=="),
    );
    assert_eq!(status, 200);
    // Plain HTTP on the TLS port is refused, and logged as such.
    let mut plain = std::net::TcpStream::connect(c.http).unwrap();
    std::io::Write::write_all(&mut plain, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    c.proc.wait_for_log("does not speak TLS");

    // 1. The good set: CA, client certificate, token. Samples arrive.
    {
        let mut flags = vec!["--tls-ca".into(), os(&ca_pem)];
        flags.extend(good_identity.iter().cloned());
        flags.extend(["--token-file".into(), os(&dir.join("agent-token"))]);
        let refs: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
        let a = start_agent(dir, "good", c.grpc, &refs);
        let stored = wait_for_samples(&c, &ca_pem, 0);
        assert!(stored > 0);
        assert!(!a.log().contains("failed"), "{}", a.log());
    }

    // 2. The agent does not trust the collector's CA.
    {
        let mut flags = vec!["--tls-ca".into(), os(&rogue_pem)];
        flags.extend(good_identity.iter().cloned());
        let refs: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
        let a = start_agent(dir, "wrong-ca", c.grpc, &refs);
        let log = a.wait_for_log("presented a certificate signed by an unknown CA");
        assert!(log.contains("--tls-ca"), "{log}");
        c.proc
            .wait_for_log("does not trust our certificate (unknown CA)");
    }

    // 3. No client certificate.
    {
        let flags = ["--tls-ca".into(), os(&ca_pem)];
        let refs: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
        let a = start_agent(dir, "no-cert", c.grpc, &refs);
        a.wait_for_log("the collector requires a client certificate");
        c.proc.wait_for_log("sent no client certificate");
    }

    // 4. A client certificate from a CA the collector does not trust.
    {
        let flags = [
            "--tls-ca".into(),
            os(&ca_pem),
            "--tls-cert".into(),
            os(&foreign_agent.0),
            "--tls-key".into(),
            os(&foreign_agent.1),
        ];
        let refs: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
        let a = start_agent(dir, "foreign-cert", c.grpc, &refs);
        a.wait_for_log("the collector does not trust our certificate (unknown CA)");
        c.proc
            .wait_for_log("presented a certificate signed by an unknown CA");
    }

    // 5. A wrong token, then the collector's file rotated to accept it
    //    (no restart on either side), then the old token rotated out.
    {
        let before = samples_stored(&c, &ca_pem);
        let mut flags = vec!["--tls-ca".into(), os(&ca_pem)];
        flags.extend(good_identity.iter().cloned());
        flags.extend(["--token-file".into(), os(&dir.join("wrong-token"))]);
        let refs: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
        let a = start_agent(dir, "wrong-token", c.grpc, &refs);
        let log = a.wait_for_log("the collector refused our bearer token");
        assert!(log.contains("wrong bearer token"), "{log}");
        let clog = c.proc.wait_for_log("wrong_token");
        assert!(clog.contains("peer=127.0.0.1:"), "{clog}");
        assert_eq!(samples_stored(&c, &ca_pem), before, "nothing stored");

        write_tokens(&dir.join("collector-tokens"), "agent-token-2\n");
        wait_for_samples(&c, &ca_pem, before);
        drop(a);

        // agent-token-1 is no longer accepted.
        let mut flags = vec!["--tls-ca".into(), os(&ca_pem)];
        flags.extend(good_identity.iter().cloned());
        flags.extend(["--token-file".into(), os(&dir.join("agent-token"))]);
        let refs: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
        let a = start_agent(dir, "rotated-out", c.grpc, &refs);
        a.wait_for_log("the collector refused our bearer token");
        // At exit, what was not delivered is put down to the refusal, not
        // to an unreachable collector: in the log and in the summary.
        let (log, out) = a.stop();
        let refused = "collector refused the agent's credentials (UNAUTHENTICATED) at exit: ";
        assert!(
            log.contains(refused) && log.contains("batches not delivered"),
            "{log}"
        );
        assert!(!log.contains("unreachable"), "{log}");
        assert!(out.contains(&format!("Undelivered: {refused}")), "{out}");
        assert!(out.contains("batches_unsent_at_exit: "), "{out}");
    }
    let (status, metrics) = https_get(c.http, &ca_pem, "/metrics", Some("Bearer ui-token"));
    assert_eq!(status, 200);
    for line in [
        "profiler_batches_rejected_total{reason=\"wrong_token\"}",
        "profiler_http_requests_rejected_total{reason=\"missing_token\"} 1",
        "profiler_connections_rejected_total{server=\"gRPC\",reason=\"no_client_certificate\"}",
        "profiler_connections_rejected_total{server=\"gRPC\",reason=\"unknown_ca\"}",
        "profiler_connections_rejected_total{server=\"HTTP\",reason=\"not_tls\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    drop(c);

    // 6. The collector's certificate has expired.
    let c = start_collector(dir, "collector-expired", &expired_server, &ca_pem);
    let mut flags = vec!["--tls-ca".into(), os(&ca_pem)];
    flags.extend(good_identity.iter().cloned());
    let refs: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
    let a = start_agent(dir, "expired", c.grpc, &refs);
    a.wait_for_log("the collector presented an expired certificate");
    c.proc.wait_for_log("says our certificate has expired");
}

/// The OTLP sink to an endpoint that wants mutual TLS and a token (this
/// collector's OTLP receiver): with its own CA, client certificate and an
/// `authorization` header it delivers; with another header it is refused
/// and says so.
#[test]
fn otlp_sink_speaks_mutual_tls_and_sends_its_headers() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("profiler test CA");
    let ca_pem = ca.write(dir, "ca");
    let server = ca.sign(dir, "collector", true, false);
    let agent = ca.sign(dir, "agent", false, false);
    write_tokens(&dir.join("collector-tokens"), "otlp-token\n");
    write_tokens(&dir.join("ui-tokens"), "ui-token\n");
    let c = start_collector(dir, "collector", &server, &ca_pem);
    let otlp_agent = |name: &str, header: &str| {
        Proc::spawn(
            Command::new(agent_binary())
                .args(["run", "--no-kube", "--no-progress", "-F", "49"])
                .args(["--drain-interval", "300ms", "--node", name])
                .args(["--otlp-endpoint", &format!("https://127.0.0.1:{}", c.grpc)])
                .arg("--otlp-tls-ca")
                .arg(&ca_pem)
                .arg("--otlp-tls-cert")
                .arg(&agent.0)
                .arg("--otlp-tls-key")
                .arg(&agent.1)
                .args(["--otlp-header", header])
                .env("RUST_LOG", "warn,profiler_agent=info")
                .env("NO_COLOR", "1"),
            dir.join(format!("{name}.log")),
        )
    };
    {
        let a = otlp_agent("otlp-good", "authorization=Bearer otlp-token");
        let stored = wait_for_samples(&c, &ca_pem, 0);
        assert!(stored > 0);
        assert!(!a.log().contains("failed"), "{}", a.log());
    }
    let before = samples_stored(&c, &ca_pem);
    let a = otlp_agent("otlp-wrong-token", "authorization=Bearer nope");
    let log = a.wait_for_log("refused our bearer token");
    assert!(log.contains("wrong bearer token"), "{log}");
    c.proc.wait_for_log("wrong_token");
    assert_eq!(samples_stored(&c, &ca_pem), before, "nothing stored");
}

#[test]
fn plain_text_must_be_asked_for_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(collector_binary())
        .arg("--store")
        .arg(format!("sqlite:{}", tmp.path().join("p.db").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--plaintext") && err.contains("--tls-cert"),
        "{err}"
    );

    let out = Command::new(agent_binary())
        .args(["run", "--collector", "http://127.0.0.1:1", "-d", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plain text") && err.contains("--plaintext"),
        "{err}"
    );
}
