//! Runs the collector: the gRPC ingest server and the HTTP server, over one
//! store, until shut down.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use profiler_proto::{
    otlp::collector::profiles_service_server::ProfilesServiceServer,
    v1::ingest_server::IngestServer,
};
use profiler_security::{
    accept::{spawn_acceptor, Accepted, ServerTlsStream},
    door::{spawn_door, Admitted},
    rustls,
    tls::server_config,
    AllowList, ServerTlsFiles, TokenFile,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::StreamExt as _;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::{
    auth::{require_http_token, GrpcTokenCheck, HttpTokenCheck, PeerAddr},
    clock::now_ns,
    http::{ingest_router, router, AppState},
    import::OtlpLimits,
    ingest::{IngestCore, IngestService},
    metrics::{Metrics, NOT_ALLOWED_NETWORK},
    overload::{RateLimiter, ShedLayer},
    receivers::{HttpIngest, OtherOtlpVersion, OtlpService},
    refusal::RefusalsLayer,
    scrape::ScrapeConfig,
    store::{
        clickhouse::{ClickHouseStore, ClickHouseUrl},
        sqlite::SqliteStore,
        SharedStore, Store, StoreError,
    },
    validate::Limits,
    writer::StoreWriter,
};

/// Default gRPC ingest address.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:7070";
/// Default HTTP (API and UI) address.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7080";

/// Where the data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    /// A ClickHouse server shared by any number of collectors.
    ClickHouse(ClickHouseUrl),
}

impl std::str::FromStr for StoreLocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("sqlite", path)) if !path.is_empty() => Ok(StoreLocation::Sqlite(path.into())),
            Some(("clickhouse", _)) => s.parse().map(StoreLocation::ClickHouse),
            _ => Err(format!(
                "unknown store {s:?}: use sqlite:PATH or clickhouse://[USER@]HOST[:PORT]/DATABASE"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CollectorConfig {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub store: StoreLocation,
    /// Data older than this is deleted.
    pub retention: Duration,
    /// Largest accepted batch, encoded, in bytes.
    pub max_message_bytes: usize,
    pub limits: Limits,
    /// TLS on both servers (client certificates on gRPC when `client_ca`
    /// is set). `None`: plain text, with a warning; the command line and
    /// the configuration file only allow that when asked explicitly.
    pub tls: Option<ServerTlsFiles>,
    /// Bearer tokens agents must send; re-read when the file changes.
    pub token_file: Option<PathBuf>,
    /// Bearer tokens the HTTP API and UI require (not `/healthz`).
    pub http_token_file: Option<PathBuf>,
    /// Client networks allowed to connect to either port (empty: any),
    /// checked before TLS and tokens.
    pub allow: AllowList,
    /// Batches per second one agent may send (0: no limit); past the burst,
    /// it is pushed back with a retry hint.
    pub agent_rate_limit: f64,
    pub agent_rate_burst: u32,
    /// Go services to scrape (pull mode), see [`crate::scrape`].
    pub scrape: ScrapeConfig,
    /// Batches decoded and stored at once; more wait briefly, then are
    /// pushed back. `None`: the store's default
    /// ([`Store::default_in_flight`]: SQLite 8, ClickHouse 64).
    pub max_concurrent_batches: Option<usize>,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            grpc_listen: DEFAULT_GRPC_LISTEN.parse().expect("valid address"),
            http_listen: DEFAULT_HTTP_LISTEN.parse().expect("valid address"),
            store: StoreLocation::Sqlite("profiles.db".into()),
            retention: Duration::from_secs(7 * 24 * 3600),
            max_message_bytes: 16 << 20,
            limits: Limits::default(),
            tls: None,
            token_file: None,
            http_token_file: None,
            allow: AllowList::default(),
            agent_rate_limit: 10.0,
            agent_rate_burst: 60,
            max_concurrent_batches: None,
            scrape: ScrapeConfig::default(),
        }
    }
}

/// Why the collector could not start, or stopped on its own. Each variant
/// names what failed; its text carries the cause.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("opening the store {location}: {error}")]
    OpenStore { location: String, error: StoreError },
    #[error("TLS configuration: {0}")]
    Tls(profiler_security::TlsError),
    #[error("the {what} token file: {error}")]
    TokenFile {
        what: &'static str,
        error: profiler_security::token::TokenError,
    },
    #[error("binding the {what} port {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("starting the store writer thread: {0}")]
    WriterThread(std::io::Error),
    #[error("{what} server: {error}")]
    Serve {
        what: &'static str,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the {0} server stopped")]
    Stopped(&'static str),
    #[error("a collector task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the store writer thread panicked")]
    WriterPanicked,
}

/// A running collector; [`RunningCollector::shutdown`] stops it gracefully
/// (in-flight batches finish).
pub struct RunningCollector {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<(), ServerError>>>,
}

impl RunningCollector {
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }

    /// Serves until `signal` resolves (then shuts down gracefully), or until
    /// a server stops on its own (an error, returned).
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let (grpc, http) = (self.tasks.remove(0), self.tasks.remove(0));
        tokio::pin!(signal, grpc, http);
        let stopped_alone = |r: Result<Result<(), ServerError>, tokio::task::JoinError>,
                             what: &'static str| match r {
            Ok(Err(e)) => e,
            Err(e) => ServerError::Task(e),
            Ok(Ok(())) => ServerError::Stopped(what),
        };
        tokio::select! {
            _ = &mut signal => {}
            r = &mut grpc => return Err(stopped_alone(r, "gRPC")),
            r = &mut http => return Err(stopped_alone(r, "HTTP")),
        }
        let _ = self.stop.send(true);
        grpc.await??;
        http.await??;
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}

fn open_store(
    location: &StoreLocation,
    retention: Duration,
) -> Result<Box<dyn Store>, ServerError> {
    let opened: Result<Box<dyn Store>, StoreError> = match location {
        StoreLocation::ClickHouse(url) => {
            ClickHouseStore::open(url, retention).map(|s| Box::new(s) as Box<dyn Store>)
        }
        StoreLocation::Sqlite(path) => {
            SqliteStore::open(path).map(|s| Box::new(s) as Box<dyn Store>)
        }
    };
    opened.map_err(|error| ServerError::OpenStore {
        location: match location {
            StoreLocation::ClickHouse(url) => format!("ClickHouse {url}"),
            StoreLocation::Sqlite(path) => path.display().to_string(),
        },
        error,
    })
}

/// A TLS connection as tonic sees it: its peer address is the TCP one.
struct TlsConn(ServerTlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The HTTP server's TLS listener: connections already through the handshake.
struct TlsListener {
    accepted: mpsc::Receiver<Accepted>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = ServerTlsStream<TcpStream>;
    type Addr = SocketAddr;
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// Starts the TLS handshakes of a port's admitted connections, counting
/// each rejected client.
fn tls_acceptor(
    admitted: Admitted,
    config: Arc<rustls::ServerConfig>,
    server: &'static str,
    metrics: &Arc<Metrics>,
) -> mpsc::Receiver<Accepted> {
    let metrics = metrics.clone();
    spawn_acceptor(admitted, config, server, move |failure| {
        metrics.reject_connection(server, failure.reason())
    })
}

/// The first check of a port: connections from outside `allow` are closed,
/// logged with the peer and counted (`reason="not_allowed_network"`).
fn door(
    listener: TcpListener,
    allow: &AllowList,
    server: &'static str,
    metrics: &Arc<Metrics>,
) -> Admitted {
    let metrics = metrics.clone();
    spawn_door(listener, allow.clone(), server, move |peer| {
        metrics.reject_connection(server, NOT_ALLOWED_NETWORK);
        tracing::warn!(
            %peer,
            reason = NOT_ALLOWED_NETWORK,
            "{server}: connection refused: the client's address is outside --allow-cidr"
        );
    })
}

/// The plain-text HTTP listener: connections the door let in.
struct AdmittedListener {
    admitted: Admitted,
    local: SocketAddr,
}

impl axum::serve::Listener for AdmittedListener {
    type Io = TcpStream;
    type Addr = SocketAddr;
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.admitted.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, AdmittedListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, AdmittedListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// The TLS configurations of the gRPC port (client certificates when a
/// client CA is set) and of the HTTP port (none: browsers use the token).
type PortsTls = (Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>);

fn ports_tls(files: &ServerTlsFiles) -> Result<PortsTls, ServerError> {
    let grpc = server_config(files, &[b"h2"]).map_err(ServerError::Tls)?;
    let http_files = ServerTlsFiles {
        client_ca: None,
        ..files.clone()
    };
    let http = server_config(&http_files, &[b"h2", b"http/1.1"]).map_err(ServerError::Tls)?;
    Ok((grpc, http))
}

fn open_tokens(
    path: Option<&PathBuf>,
    what: &'static str,
) -> Result<Option<Arc<TokenFile>>, ServerError> {
    path.map(|p| TokenFile::open(p).map(Arc::new))
        .transpose()
        .map_err(|error| ServerError::TokenFile { what, error })
}

/// Opens the store, binds both ports and starts serving.
pub async fn start(config: CollectorConfig) -> Result<RunningCollector, ServerError> {
    let agent_tokens = open_tokens(config.token_file.as_ref(), "agent")?;
    let http_tokens = open_tokens(config.http_token_file.as_ref(), "HTTP")?;
    // Read now: a bad file fails start-up, not the first connection.
    let tls = config.tls.as_ref().map(ports_tls).transpose()?;
    if tls.is_none() {
        tracing::warn!("TLS is off: agents and browsers talk to this collector in plain text");
    }
    let (grpc_tls, http_tls) = tls.unzip();
    if agent_tokens.is_none() {
        tracing::warn!("no agent token file: any client that reaches the gRPC port can send data");
    }
    let store = open_store(&config.store, config.retention)?;
    // Batches older than the retention period are refused by the store.
    store.retention().set_period(config.retention);
    let store: SharedStore = Arc::new(Mutex::new(store));
    // Queries on their own handle where the store has one (ClickHouse), so
    // a long query does not hold up the writer.
    let reader = store.lock().unwrap_or_else(|e| e.into_inner()).reader();
    let query_store: SharedStore = match reader {
        Some(reader) => Arc::new(Mutex::new(reader)),
        None => store.clone(),
    };
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);

    let bind = |addr: SocketAddr| async move {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok((listener, local))
    };
    let (grpc_listener, grpc_addr) =
        bind(config.grpc_listen)
            .await
            .map_err(|error| ServerError::Bind {
                what: "gRPC",
                addr: config.grpc_listen,
                error,
            })?;
    let (http_listener, http_addr) =
        bind(config.http_listen)
            .await
            .map_err(|error| ServerError::Bind {
                what: "HTTP",
                addr: config.http_listen,
                error,
            })?;

    let retention_ns = config.retention.as_nanos().min(i64::MAX as u128) as i64;
    let in_flight = config
        .max_concurrent_batches
        .unwrap_or_else(|| {
            store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .default_in_flight()
        })
        .max(1);
    // One writer thread stores every batch, in groups (group commit).
    let (writer, writer_thread) = StoreWriter::spawn(store.clone(), in_flight, metrics.clone())
        .map_err(ServerError::WriterThread)?;
    let core = IngestCore {
        writer,
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        max_message_bytes: config.max_message_bytes,
        rate: Arc::new(RateLimiter::new(
            config.agent_rate_limit,
            config.agent_rate_burst,
        )),
    };
    let service = IngestServer::new(IngestService { core: core.clone() })
        // tonic refuses a larger message before buffering it; `RefusalsLayer`
        // gives that answer the code and reason agents expect.
        .max_decoding_message_size(config.max_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd);
    let token_check = GrpcTokenCheck {
        tokens: agent_tokens,
        metrics: metrics.clone(),
    };
    // The token is checked on the headers, before the body is read.
    let service =
        tonic::service::interceptor::InterceptedService::new(service, token_check.clone());
    let otlp_limits = OtlpLimits::default();
    let otlp = ProfilesServiceServer::new(OtlpService {
        core: core.clone(),
        limits: otlp_limits.clone(),
    })
    .max_decoding_message_size(config.max_message_bytes)
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Zstd);
    let otlp = tonic::service::interceptor::InterceptedService::new(otlp, token_check);

    let grpc_router = tonic::transport::Server::builder()
        // Bounds the batches decoded at once, so their memory is bounded;
        // past it, agents are told to come back later.
        .layer(ShedLayer::new(in_flight, metrics.clone()))
        // Too large or undecodable messages, refused by tonic before the
        // service runs: counted, logged, and answered with their reason.
        .layer(RefusalsLayer::new(metrics.clone()))
        .add_service(service)
        .add_service(otlp)
        .add_service(OtherOtlpVersion);
    let mut grpc_stop = stopped.clone();
    let grpc_stopped = async move {
        let _ = grpc_stop.wait_for(|s| *s).await;
    };
    let grpc_admitted = door(grpc_listener, &config.allow, "gRPC", &metrics);
    let grpc = match grpc_tls {
        None => tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::ReceiverStream::new(grpc_admitted)
                .map(|(tcp, _)| Ok::<_, std::io::Error>(tcp));
            grpc_router
                .serve_with_incoming_shutdown(incoming, grpc_stopped)
                .await
                .map_err(|e| ServerError::Serve {
                    what: "gRPC",
                    error: Box::new(e),
                })
        }),
        Some(tls) => {
            let accepted = tls_acceptor(grpc_admitted, tls, "gRPC", &metrics);
            let incoming = tokio_stream::wrappers::ReceiverStream::new(accepted)
                .map(|(conn, _)| Ok::<_, std::io::Error>(TlsConn(conn)));
            tokio::spawn(async move {
                grpc_router
                    .serve_with_incoming_shutdown(incoming, grpc_stopped)
                    .await
                    .map_err(|e| ServerError::Serve {
                        what: "gRPC",
                        error: Box::new(e),
                    })
            })
        }
    };

    let mut app = router(AppState {
        store: query_store.clone(),
        metrics: metrics.clone(),
    })
    .merge(ingest_router(
        HttpIngest {
            core: core.clone(),
            limits: otlp_limits,
        },
        config.max_message_bytes,
    ));
    if let Some(tokens) = http_tokens {
        app = app.layer(axum::middleware::from_fn_with_state(
            HttpTokenCheck {
                tokens,
                metrics: metrics.clone(),
            },
            require_http_token,
        ));
    }
    let app = app.into_make_service_with_connect_info::<PeerAddr>();
    let mut http_stop = stopped.clone();
    let http_stopped = async move {
        let _ = http_stop.wait_for(|s| *s).await;
    };
    let http_admitted = door(http_listener, &config.allow, "HTTP", &metrics);
    let http = match http_tls {
        None => tokio::spawn(async move {
            let listener = AdmittedListener {
                admitted: http_admitted,
                local: http_addr,
            };
            axum::serve(listener, app)
                .with_graceful_shutdown(http_stopped)
                .await
                .map_err(|e| ServerError::Serve {
                    what: "HTTP",
                    error: Box::new(e),
                })
        }),
        Some(tls) => {
            let listener = TlsListener {
                accepted: tls_acceptor(http_admitted, tls, "HTTP", &metrics),
                local: http_addr,
            };
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(http_stopped)
                    .await
                    .map_err(|e| ServerError::Serve {
                        what: "HTTP",
                        error: Box::new(e),
                    })
            })
        }
    };

    let mut tasks_after = Vec::new();
    if !config.scrape.is_empty() {
        let scrapes = crate::scrape::spawn(config.scrape.clone(), core.clone(), stopped.clone());
        tasks_after.push(tokio::spawn(async move {
            let _ = scrapes.await;
            Ok(())
        }));
    }
    drop(core);

    let mut retention_stop = stopped.clone();
    // On the query handle where there is one (ClickHouse: dropping old
    // days must not hold up writes; the cutoff is shared with the writer).
    let retention_store = query_store;
    let retention = tokio::spawn(async move {
        loop {
            let cutoff = now_ns() - retention_ns;
            let store = retention_store.clone();
            match tokio::task::spawn_blocking(move || {
                store
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(cutoff)
            })
            .await
            {
                Ok(Ok(n)) if n > 0 => tracing::info!(rows = n, "retention deleted old samples"),
                Ok(Err(e)) => tracing::warn!("retention failed: {e}"),
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                _ = retention_stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    });

    // Ends once the gRPC server (holding the writer's handles) has stopped
    // and the last group is written.
    let writer = tokio::task::spawn_blocking(move || {
        writer_thread
            .join()
            .map_err(|_| ServerError::WriterPanicked)
    });

    tracing::info!(%grpc_addr, %http_addr, "collector serving");
    Ok(RunningCollector {
        grpc_addr,
        http_addr,
        metrics,
        stop,
        tasks: [grpc, http, retention]
            .into_iter()
            .chain(tasks_after)
            .chain([writer])
            .collect(),
    })
}
