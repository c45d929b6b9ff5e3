//! Runs the collector: the gRPC ingest server and the HTTP server, over one
//! store, until shut down.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use profiler_proto::v1::ingest_server::IngestServer;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::codec::CompressionEncoding;
use tonic::codegen::http::{HeaderValue, Response};

use crate::{
    http::{router, AppState},
    ingest::{now_ns, IngestService, SharedStore},
    metrics::Metrics,
    store::{sqlite::SqliteStore, Store},
    validate::Limits,
};

/// Default gRPC ingest address.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:7070";
/// Default HTTP (API and UI) address.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7080";

/// Where the data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
}

impl std::str::FromStr for StoreLocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("sqlite", path)) if !path.is_empty() => Ok(StoreLocation::Sqlite(path.into())),
            _ => Err(format!("unknown store {s:?}: use sqlite:PATH")),
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
        }
    }
}

/// A running collector; [`RunningCollector::shutdown`] stops it gracefully
/// (in-flight batches finish).
pub struct RunningCollector {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl RunningCollector {
    pub async fn shutdown(self) -> anyhow::Result<()> {
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
    ) -> anyhow::Result<()> {
        let (grpc, http) = (self.tasks.remove(0), self.tasks.remove(0));
        tokio::pin!(signal, grpc, http);
        let stopped_alone =
            |r: Result<anyhow::Result<()>, tokio::task::JoinError>, what: &str| match r {
                Ok(Err(e)) => e,
                Err(e) => anyhow::Error::from(e),
                Ok(Ok(())) => anyhow::anyhow!("the {what} server stopped"),
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

fn open_store(location: &StoreLocation) -> anyhow::Result<Box<dyn Store>> {
    match location {
        StoreLocation::Sqlite(path) => {
            Ok(Box::new(SqliteStore::open(path).with_context(|| {
                format!("opening the store {}", path.display())
            })?))
        }
    }
}

/// Batches decoded and stored at the same time, at most.
const MAX_CONCURRENT_BATCHES: usize = 8;

/// tonic answers a message over the size limit with `OUT_OF_RANGE` (or,
/// when it only grows past the limit while being decompressed, with
/// `RESOURCE_EXHAUSTED`); gRPC says `RESOURCE_EXHAUSTED`, which agents treat
/// as "too large, drop it". Both are counted as `too_large`.
fn too_large_is_resource_exhausted(
    mut response: Response<tonic::body::Body>,
    metrics: &Metrics,
) -> Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let status = headers.get("grpc-status").map(|s| s.as_bytes().to_vec());
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("")
        .replace("%20", " ");
    let too_large = match status.as_deref() {
        Some(b"11") => message.contains("length too large"),
        Some(b"8") => message.contains("size limit"),
        _ => false,
    };
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        metrics.reject("too_large");
        tracing::warn!("batch rejected: larger than the message size limit");
    }
    response
}

/// Opens the store, binds both ports and starts serving.
pub async fn start(config: CollectorConfig) -> anyhow::Result<RunningCollector> {
    let store: SharedStore = Arc::new(Mutex::new(open_store(&config.store)?));
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);

    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding the gRPC port {}", config.grpc_listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding the HTTP port {}", config.http_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let retention_ns = config.retention.as_nanos().min(i64::MAX as u128) as i64;
    let service = IngestServer::new(IngestService {
        store: store.clone(),
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        max_message_bytes: config.max_message_bytes,
        retention_ns,
    })
    // tonic refuses a larger message before buffering it; see
    // `too_large_is_resource_exhausted` for the status the agent gets.
    .max_decoding_message_size(config.max_message_bytes)
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Zstd)
    .send_compressed(CompressionEncoding::Zstd);

    let size_metrics = metrics.clone();
    let mut grpc_stop = stopped.clone();
    let grpc = tokio::spawn(async move {
        tonic::transport::Server::builder()
            // Bounds the batches decoded at once, so their memory is bounded.
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                MAX_CONCURRENT_BATCHES,
            ))
            .layer(tower::util::MapResponseLayer::new(
                move |response: Response<tonic::body::Body>| {
                    too_large_is_resource_exhausted(response, &size_metrics)
                },
            ))
            .add_service(service)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener),
                async move {
                    let _ = grpc_stop.wait_for(|s| *s).await;
                },
            )
            .await
            .context("gRPC server")
    });

    let app = router(AppState {
        store: store.clone(),
        metrics: metrics.clone(),
    });
    let mut http_stop = stopped.clone();
    let http = tokio::spawn(async move {
        axum::serve(http_listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
            .context("HTTP server")
    });

    let mut retention_stop = stopped.clone();
    let retention_store = store.clone();
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

    tracing::info!(%grpc_addr, %http_addr, "collector serving");
    Ok(RunningCollector {
        grpc_addr,
        http_addr,
        metrics,
        stop,
        tasks: vec![grpc, http, retention],
    })
}
