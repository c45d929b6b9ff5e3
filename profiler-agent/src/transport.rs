//! The connection to the collector: plain text or TLS (with an optional
//! client certificate), a bearer token on every request, and failures told
//! in words an operator can act on.
//!
//! TLS is done here rather than inside tonic so that a failed handshake
//! keeps its cause (unknown CA, expired certificate, client certificate
//! required) all the way to the log line.
use std::{
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use profiler_proto::{
    metadata::{retry_after, Reason},
    otlp::collector::profiles_service_client::ProfilesServiceClient,
    v1::ingest_client::IngestClient,
};
use profiler_security::{
    rustls::{pki_types::ServerName, ClientConfig},
    tls::client_config,
    tokio_rustls::TlsConnector,
    ClientTlsFiles, TlsFailure, TokenFile,
};
use tonic::{
    codegen::http::Uri,
    metadata::{Ascii, MetadataKey, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
    Code, Status,
};

use crate::{Error, Result};

/// How to reach the collector securely.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// CA, client certificate and key for an `https://` collector.
    pub tls: ClientTlsFiles,
    /// Bearer token file (its first token is sent; re-read when it changes).
    pub token_file: Option<PathBuf>,
}

/// Why a send failed, in the kinds an operator acts on differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No answer: connection refused or lost, timeout, unknown host.
    Unreachable,
    /// The TLS handshake failed (certificate not trusted, expired, wrong
    /// name, client certificate refused).
    Tls,
    /// The collector refused the agent's bearer token.
    CredentialsRefused,
    /// The collector asked the agent to come back later (overloaded, or
    /// over this agent's rate limit).
    PushedBack,
    /// The collector's store failed to write.
    StoreFailed,
    /// The collector answered with another error.
    Failed(Code),
}

impl FailureKind {
    /// The kind, in words, for the exit warning and summary.
    pub fn describe(self) -> String {
        match self {
            FailureKind::Unreachable => "collector unreachable".into(),
            FailureKind::Tls => "TLS handshake with the collector failed".into(),
            FailureKind::CredentialsRefused => {
                "collector refused the agent's credentials (UNAUTHENTICATED)".into()
            }
            FailureKind::PushedBack => {
                "collector pushing back (overloaded, or this agent over its rate limit)".into()
            }
            FailureKind::StoreFailed => "collector's store failing to write".into(),
            FailureKind::Failed(code) => format!("collector failing the sends ({code:?})"),
        }
    }
}

pub type Client = IngestClient<InterceptedService<Channel, AddToken>>;

/// Adds `authorization: Bearer TOKEN` to each request.
#[derive(Clone)]
pub struct AddToken {
    token: Option<Arc<TokenFile>>,
    /// Fixed headers (OTLP's `--otlp-header`), sent with every request.
    headers: Arc<Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>>,
}

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        for (key, value) in self.headers.iter() {
            request.metadata_mut().insert(key.clone(), value.clone());
        }
        if let Some(token) = self.token.as_ref().and_then(|t| t.current()) {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| Status::unauthenticated("the token file holds an unusable token"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// The OTLP `ProfilesService` client.
pub type OtlpClient = ProfilesServiceClient<InterceptedService<Channel, AddToken>>;

/// A header of `--otlp-header NAME=VALUE`, checked now so a bad one is an
/// error at start-up.
pub fn parse_header(text: &str) -> Result<(MetadataKey<Ascii>, MetadataValue<Ascii>)> {
    let bad = |why: &str| Error::InvalidArgument(format!("header {text:?}: {why}"));
    let (name, value) = text.split_once('=').ok_or_else(|| bad("use NAME=VALUE"))?;
    let key = MetadataKey::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| bad("not a valid header name"))?;
    let value = MetadataValue::try_from(value.trim()).map_err(|_| bad("not a valid value"))?;
    Ok((key, value))
}

/// The last TLS failure seen on a connection after its handshake, and
/// when. With TLS 1.3 the collector refuses a client certificate only after
/// the agent's side of the handshake is over, so the refusal arrives as a
/// read error that HTTP/2 reports only as "connection closed".
type LastFailure = Arc<Mutex<Option<(Instant, TlsFailure)>>>;

/// A TLS stream that remembers the TLS failure behind a read error.
struct Observed<S> {
    inner: S,
    last_failure: LastFailure,
}

impl<S> Observed<S> {
    fn note<T>(&self, result: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(e)) = &result {
            if let Some(failure) = TlsFailure::find(e) {
                *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), failure));
            }
        }
        result
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Observed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note(result)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Observed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(result)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(result)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A collector address with what is needed to talk to it.
pub struct Transport {
    endpoint: Endpoint,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    token: Option<Arc<TokenFile>>,
    last_failure: LastFailure,
    headers: Arc<Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>>,
    pub url: String,
}

impl Transport {
    /// `url` is `https://host:port` (TLS) or `http://host:port` (plain text).
    /// Certificates and the token file are read now, so a bad file is an
    /// error at start-up, naming the file.
    pub fn new(url: &str, security: &Security) -> Result<Self> {
        let invalid = |what: String| Error::InvalidArgument(format!("collector {url:?}: {what}"));
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .tcp_keepalive(Some(Duration::from_secs(30)));
        let uri = endpoint.uri().clone();
        let tls = match uri.scheme_str() {
            Some("https") => {
                let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| invalid(format!("host name {host:?}: {e}")))?;
                let config = client_config(&security.tls)
                    .map_err(|e| Error::InvalidArgument(format!("TLS: {e}")))?;
                Some((config, name))
            }
            Some("http") => {
                if security.tls != ClientTlsFiles::default() {
                    return Err(invalid(
                        "TLS files given for a plain-text (http://) address: use https://".into(),
                    ));
                }
                tracing::warn!(collector = url, "sending profiles in plain text (no TLS)");
                None
            }
            other => return Err(invalid(format!("unsupported scheme {other:?}"))),
        };
        let token = security
            .token_file
            .as_deref()
            .map(TokenFile::open)
            .transpose()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?
            .map(Arc::new);
        Ok(Self {
            endpoint,
            tls,
            token,
            last_failure: LastFailure::default(),
            headers: Arc::default(),
            url: url.to_string(),
        })
    }

    /// A client that connects on first use and reconnects by itself (needs
    /// a tokio runtime).
    pub fn client(&self) -> Client {
        IngestClient::with_interceptor(self.channel(), self.interceptor())
    }

    /// An OTLP `ProfilesService` client, like [`Self::client`].
    pub fn otlp_client(&self) -> OtlpClient {
        ProfilesServiceClient::with_interceptor(self.channel(), self.interceptor())
    }

    /// Sends `headers` with every request too.
    pub fn with_headers(
        mut self,
        headers: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
    ) -> Self {
        self.headers = Arc::new(headers);
        self
    }

    fn interceptor(&self) -> AddToken {
        AddToken {
            token: self.token.clone(),
            headers: self.headers.clone(),
        }
    }

    fn channel(&self) -> Channel {
        let channel = match &self.tls {
            None => self.endpoint.connect_lazy(),
            Some((config, name)) => {
                let (connector, name) = (TlsConnector::from(config.clone()), name.clone());
                let last_failure = self.last_failure.clone();
                self.endpoint
                    .connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
                        let (connector, name) = (connector.clone(), name.clone());
                        let last_failure = last_failure.clone();
                        async move {
                            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                            let port = uri.port_u16().unwrap_or(443);
                            let tcp = tokio::net::TcpStream::connect((host, port)).await?;
                            tcp.set_nodelay(true)?;
                            let tls = connector.connect(name, tcp).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(Observed {
                                inner: tls,
                                last_failure,
                            }))
                        }
                    }))
            }
        };
        channel
    }

    /// Why a send failed: its kind, and in words; a refused token makes
    /// the token file be looked at again before the next try (it may have
    /// been rotated).
    pub fn explain(&self, status: &Status) -> (FailureKind, String) {
        if status.code() == Code::Unauthenticated {
            if let Some(t) = &self.token {
                t.recheck();
            }
            return (
                FailureKind::CredentialsRefused,
                format!(
                    "the collector refused our bearer token ({}): check --token-file",
                    status.message()
                ),
            );
        }
        if retry_after(status).is_some() {
            return (FailureKind::PushedBack, status.message().to_string());
        }
        let recent = || {
            let mut last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
            match last.take() {
                Some((at, failure)) if at.elapsed() < Duration::from_secs(60) => Some(failure),
                _ => None,
            }
        };
        let answered = Reason::of(status);
        let tls = match answered {
            // The collector answered: the handshake worked.
            Some(_) => None,
            None => find_tls_failure(status).or_else(recent),
        };
        if let Some(failure) = tls {
            let hint = match failure {
                TlsFailure::UnknownCa => ": check --tls-ca",
                TlsFailure::Expired | TlsFailure::NotYetValid => {
                    ": the collector needs a new certificate"
                }
                TlsFailure::WrongName => ": connect by a name the certificate lists",
                TlsFailure::PeerRequiresCertificate => ": set --tls-cert and --tls-key",
                TlsFailure::PeerSaysUnknownCa => {
                    ": --tls-cert must be signed by the collector's client CA"
                }
                TlsFailure::PeerSaysExpired => ": renew --tls-cert",
                _ => "",
            };
            return (
                FailureKind::Tls,
                format!("TLS: {}{hint}", failure.describe("the collector")),
            );
        }
        let kind = match (answered, status.code()) {
            (Some(Reason::StoreUnavailable), _) => FailureKind::StoreFailed,
            (Some(_), code) => FailureKind::Failed(code),
            (
                None,
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown,
            ) => FailureKind::Unreachable,
            (None, code) => FailureKind::Failed(code),
        };
        (kind, status.message().to_string())
    }
}

/// The TLS failure behind a failed call, through tonic's and hyper's errors;
/// by its message where a layer kept only that.
fn find_tls_failure(status: &Status) -> Option<TlsFailure> {
    if let Some(f) = TlsFailure::find(status) {
        return Some(f);
    }
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    [
        ("CertificateRequired", TlsFailure::PeerRequiresCertificate),
        ("UnknownCA", TlsFailure::PeerSaysUnknownCa),
        ("CertificateExpired", TlsFailure::PeerSaysExpired),
        ("UnknownIssuer", TlsFailure::UnknownCa),
    ]
    .into_iter()
    .find(|(needle, _)| text.contains(needle))
    .map(|(_, f)| f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_and_tls_addresses() {
        assert!(Transport::new("http://127.0.0.1:7070", &Security::default()).is_ok());
        assert!(Transport::new("https://127.0.0.1:7070", &Security::default()).is_ok());
        let e = Transport::new("ftp://x:1", &Security::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("scheme"), "{e}");
        let with_files = Security {
            tls: ClientTlsFiles {
                ca: Some("/nonexistent/ca.pem".into()),
                ..Default::default()
            },
            token_file: None,
        };
        let e = Transport::new("http://127.0.0.1:7070", &with_files)
            .err()
            .unwrap();
        assert!(e.to_string().contains("https://"), "{e}");
        let e = Transport::new("https://127.0.0.1:7070", &with_files)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let no_token = Security {
            token_file: Some("/nonexistent/token".into()),
            ..Default::default()
        };
        let e = Transport::new("http://127.0.0.1:7070", &no_token)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/token"), "{e}");
    }

    #[test]
    fn auth_failures_are_told_apart() {
        let t = Transport::new("http://127.0.0.1:7070", &Security::default()).unwrap();
        let (kind, m) = t.explain(&Status::unauthenticated("wrong bearer token"));
        assert!(
            m.contains("bearer token") && m.contains("--token-file"),
            "{m}"
        );
        assert_eq!(kind, FailureKind::CredentialsRefused);
        let (kind, m) = t.explain(&Status::unavailable(
            "tcp connect error: received fatal alert: CertificateRequired",
        ));
        assert!(m.contains("requires a client certificate"), "{m}");
        assert_eq!(kind, FailureKind::Tls);
    }

    #[test]
    fn failures_are_classified_by_who_answered() {
        let t = Transport::new("http://127.0.0.1:7070", &Security::default()).unwrap();
        let kind = |s: Status| t.explain(&s).0;
        assert_eq!(
            kind(Status::unavailable("tcp connect error: Connection refused")),
            FailureKind::Unreachable
        );
        assert_eq!(
            kind(Status::deadline_exceeded("timeout")),
            FailureKind::Unreachable
        );
        assert_eq!(
            kind(Reason::StoreUnavailable.status("store failed")),
            FailureKind::StoreFailed
        );
        assert_eq!(
            kind(Reason::RateLimited.push_back("slow down", Duration::from_secs(1))),
            FailureKind::PushedBack
        );
        assert_eq!(
            kind(Reason::Unauthenticated.status("wrong bearer token")),
            FailureKind::CredentialsRefused
        );
        assert_eq!(
            kind(Status::internal("?")),
            FailureKind::Failed(Code::Internal)
        );
        assert!(FailureKind::CredentialsRefused
            .describe()
            .contains("refused the agent's credentials (UNAUTHENTICATED)"));
    }
}
