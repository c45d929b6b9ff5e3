//! Profiles in other formats, received and stored as batches:
//!
//! - OTLP profiles over gRPC ([`OtlpService`], `ProfilesService/Export` on
//!   the gRPC port) and over HTTP (`POST /v1development/profiles`, protobuf);
//! - pprof uploads (`POST /api/v1/ingest/pprof`, gzipped or plain
//!   `profile.proto`, labels as query parameters).
//!
//! Each is converted by [`crate::import`], then stored through the same
//! [`IngestCore`] as native batches (size, rate, validation, retention). A
//! profile is refused whole, with a reason the client is told, that is
//! logged with the peer and counted (`profiler_imports_rejected_total`).
//! Converted batches are keyed by a hash of their content, so a profile
//! sent twice is stored once.
use std::collections::HashMap;

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use profiler_proto::{
    metadata::Reason,
    otlp::{
        collector::{
            profiles_service_server::ProfilesService, ExportProfilesServiceRequest,
            ExportProfilesServiceResponse,
        },
        OTLP_VERSION, PROFILES_PACKAGE,
    },
    v1::Batch,
};
use prost::Message;
use tonic::{Request, Response as GrpcResponse, Status};

use crate::{
    auth::PeerAddr,
    import::{self, ImportError, OtlpLimits, Source},
    ingest::{IngestCore, Refused, StoredCount},
};

/// The HTTP path of OTLP profiles (OTLP/HTTP, protobuf).
pub const OTLP_HTTP_PATH: &str = "/v1development/profiles";

/// What the version check tells a client whose request has no dictionary.
fn version_hint() -> String {
    format!(
        "this collector speaks OTLP profiles {PROFILES_PACKAGE} as of OTLP {OTLP_VERSION} \
         (tables in ProfilesData.dictionary); other versions are refused"
    )
}

/// Why a received profile was not stored.
enum Failure {
    Import(ImportError),
    Refused(Refused),
}

impl Failure {
    fn grpc(&self) -> Status {
        match self {
            Failure::Import(e) => Reason::InvalidBatch.status(e.to_string()),
            Failure::Refused(r) => r.status(),
        }
    }

    fn http(&self) -> Response {
        let (status, message) = match self {
            Failure::Import(ImportError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, self.message())
            }
            Failure::Import(_) => (StatusCode::BAD_REQUEST, self.message()),
            Failure::Refused(r) => (
                match r.reason {
                    Reason::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                    Reason::RateLimited | Reason::Overloaded => StatusCode::TOO_MANY_REQUESTS,
                    Reason::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_REQUEST,
                },
                self.message(),
            ),
        };
        let mut response = (
            status,
            axum::Json(serde_json::json!({ "error": message, "reason": self.reason() })),
        )
            .into_response();
        if let Failure::Refused(Refused {
            retry_after: Some(wait),
            ..
        }) = self
        {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = secs.to_string().parse() {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }

    fn message(&self) -> String {
        match self {
            Failure::Import(e) => e.to_string(),
            Failure::Refused(r) => r.message.clone(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Failure::Import(e) => e.reason(),
            Failure::Refused(r) => r.reason.as_str(),
        }
    }
}

/// Stores converted batches, counting the outcome under `format`.
async fn store(
    core: &IngestCore,
    format: &'static str,
    converted: Result<Vec<Batch>, ImportError>,
    peer: &str,
) -> Result<StoredCount, Failure> {
    let result = match converted {
        Ok(batches) => core
            .store_all(&batches, peer)
            .await
            .map_err(Failure::Refused),
        Err(e) => Err(Failure::Import(e)),
    };
    match &result {
        Ok(count) => {
            let outcome = if count.new == 0 && count.duplicate > 0 {
                "duplicate"
            } else {
                "stored"
            };
            core.metrics.import(format, outcome);
            tracing::debug!(%peer, format, batches = count.new, duplicates = count.duplicate, "profile stored");
        }
        Err(f) => {
            core.metrics.import_rejected(format, f.reason());
            tracing::warn!(%peer, format, reason = f.reason(), "profile refused: {}", f.message());
        }
    }
    result
}

/// Converts an OTLP request after the version check.
fn convert_otlp(
    request: &ExportProfilesServiceRequest,
    limits: &OtlpLimits,
    peer_ip: &str,
) -> Result<Vec<Batch>, ImportError> {
    let has_samples = request
        .resource_profiles
        .iter()
        .flat_map(|r| &r.scope_profiles)
        .flat_map(|s| &s.profiles)
        .any(|p| !p.samples.is_empty());
    if has_samples
        && request
            .dictionary
            .as_ref()
            .is_none_or(|d| d.string_table.is_empty())
    {
        return Err(ImportError::Version(version_hint()));
    }
    import::otlp::to_batches(
        request,
        limits,
        &Source {
            agent_id: format!("otlp/{peer_ip}"),
            node: String::new(),
        },
    )
}

/// `opentelemetry.proto.collector.profiles.v1development.ProfilesService`.
pub struct OtlpService {
    pub core: IngestCore,
    pub limits: OtlpLimits,
}

#[tonic::async_trait]
impl ProfilesService for OtlpService {
    async fn export(
        &self,
        request: Request<ExportProfilesServiceRequest>,
    ) -> Result<GrpcResponse<ExportProfilesServiceResponse>, Status> {
        let peer = request.remote_addr();
        let peer_ip = peer.map(|a| a.ip().to_string()).unwrap_or_default();
        let peer = peer.map(|a| a.to_string()).unwrap_or_default();
        let request = request.into_inner();
        let converted = convert_otlp(&request, &self.limits, &peer_ip);
        store(&self.core, "otlp", converted, &peer)
            .await
            .map(|_| GrpcResponse::new(ExportProfilesServiceResponse::default()))
            .map_err(|f| f.grpc())
    }
}

/// The state of the HTTP ingest routes.
#[derive(Clone)]
pub struct HttpIngest {
    pub core: IngestCore,
    pub limits: OtlpLimits,
}

/// The request body, inflated when `Content-Encoding: gzip`, at most
/// `max` bytes either way. A body past the route's limit
/// ([`axum::extract::DefaultBodyLimit`]) is refused like any too large
/// profile: with its reason, logged and counted.
fn body_bytes(
    headers: &HeaderMap,
    body: &Result<Bytes, BytesRejection>,
    max: usize,
) -> Result<Vec<u8>, ImportError> {
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ImportError::TooLarge { limit: max })
        }
        Err(e) => return Err(ImportError::Undecodable(e.body_text())),
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if gzip {
        import::inflate(body, max)
    } else if body.len() > max {
        Err(ImportError::TooLarge { limit: max })
    } else {
        Ok(body.to_vec())
    }
}

/// `POST /v1development/profiles`: an OTLP `ExportProfilesServiceRequest`
/// in protobuf (`Content-Type: application/x-protobuf`); answered with an
/// `ExportProfilesServiceResponse`.
pub async fn otlp_http(
    State(state): State<HttpIngest>,
    axum::extract::ConnectInfo(PeerAddr(peer)): axum::extract::ConnectInfo<PeerAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let converted = if content_type.starts_with("application/json") {
        Err(ImportError::Undecodable(
            "OTLP/JSON is not accepted: send application/x-protobuf".into(),
        ))
    } else {
        body_bytes(&headers, &body, state.core.max_message_bytes).and_then(|raw| {
            let request = ExportProfilesServiceRequest::decode(raw.as_slice())
                .map_err(|e| ImportError::Undecodable(e.to_string()))?;
            convert_otlp(&request, &state.limits, &peer.ip().to_string())
        })
    };
    match store(&state.core, "otlp", converted, &peer.to_string()).await {
        Ok(_) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportProfilesServiceResponse::default().encode_to_vec(),
        )
            .into_response(),
        Err(f) => f.http(),
    }
}

/// `POST /api/v1/ingest/pprof?NAME=VALUE...`: a pprof `profile.proto`,
/// gzipped or plain; every query parameter is a label of its samples.
pub async fn pprof_upload(
    State(state): State<HttpIngest>,
    axum::extract::ConnectInfo(PeerAddr(peer)): axum::extract::ConnectInfo<PeerAddr>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let max = state.core.max_message_bytes;
    let labels: Vec<(String, String)> = {
        let mut l: Vec<_> = params.into_iter().collect();
        l.sort();
        l
    };
    let converted = body_bytes(&headers, &body, max)
        .and_then(|raw| import::pprof::decode(&raw, max))
        .and_then(|profile| {
            let labels = import::pprof::with_process(labels, &profile);
            import::pprof::to_batches(&profile, &labels, &upload_source(&labels, &peer))
        });
    match store(&state.core, "pprof", converted, &peer.to_string()).await {
        Ok(count) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({
                "batches_stored": count.new,
                "batches_duplicate": count.duplicate,
            })),
        )
            .into_response(),
        Err(f) => f.http(),
    }
}

/// Who sent an upload, for rate limits and de-duplication: the `service`
/// (or `job`) label when given, else the client's address.
pub fn upload_source(labels: &[(String, String)], peer: &std::net::SocketAddr) -> Source {
    let named = labels
        .iter()
        .find(|(k, _)| k == "service")
        .or_else(|| labels.iter().find(|(k, _)| k == "job"))
        .map(|(_, v)| v.clone());
    Source {
        agent_id: format!("pprof/{}", named.unwrap_or_else(|| peer.ip().to_string())),
        node: labels
            .iter()
            .find(|(k, _)| k == "node")
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
    }
}

/// The gRPC service of the earlier profiles package
/// (`v1experimental`): every call is refused with the version this
/// collector speaks, rather than a bare `UNIMPLEMENTED`.
#[derive(Clone, Copy, Debug, Default)]
pub struct OtherOtlpVersion;

impl tonic::server::NamedService for OtherOtlpVersion {
    const NAME: &'static str =
        "opentelemetry.proto.collector.profiles.v1experimental.ProfilesService";
}

impl<B> tower::Service<axum::http::Request<B>> for OtherOtlpVersion {
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: axum::http::Request<B>) -> Self::Future {
        std::future::ready(Ok(Status::unimplemented(version_hint()).into_http()))
    }
}

/// `POST` of OTLP profiles to the path of another version
/// (`/v1experimental/profiles`, `/v1/profiles`): refused, naming the one
/// spoken.
pub async fn otlp_other_version() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({
            "error": format!("{}; send to {OTLP_HTTP_PATH}", version_hint()),
            "reason": "unsupported_version",
        })),
    )
        .into_response()
}
