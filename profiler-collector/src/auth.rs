//! Bearer tokens on both servers.
//!
//! gRPC: agents send `authorization: Bearer TOKEN`; a missing or wrong token
//! is `UNAUTHENTICATED` (reason `unauthenticated`) before the batch is even
//! decoded. HTTP: the same
//! header, or HTTP Basic with the token as the password, so a browser asks
//! for it once and the web UI works unchanged. `/healthz` stays open for
//! liveness probes.
use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use profiler_proto::metadata::Reason;
use profiler_security::TokenFile;

use crate::metrics::Metrics;
pub use crate::metrics::Refusal;

/// The HTTP client's address (axum connect info, TLS or not).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// The token in an `authorization` header: `Bearer TOKEN`, or `Basic` with
/// the token as the password (any user name).
pub fn presented_token(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text
            .split_once(':')
            .map(|(_, password)| password.to_string());
    }
    None
}

/// Checks an `authorization` header value against the token file.
pub fn check(tokens: &TokenFile, header: Option<&str>) -> Result<(), Refusal> {
    match header.and_then(presented_token) {
        None => Err(Refusal::MissingToken),
        Some(t) if tokens.accepts(&t) => Ok(()),
        Some(_) => Err(Refusal::WrongToken),
    }
}

/// The gRPC check, run on the request headers before the body is read.
#[derive(Clone)]
pub struct GrpcTokenCheck {
    pub tokens: Option<Arc<TokenFile>>,
    pub metrics: Arc<Metrics>,
}

impl tonic::service::Interceptor for GrpcTokenCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(request);
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match check(tokens, header) {
            Ok(()) => Ok(request),
            Err(refusal) => {
                self.metrics.reject(refusal.into());
                let peer = request
                    .remote_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::warn!(%peer, reason = refusal.reason(), "gRPC request refused: {}", refusal.message());
                Err(Reason::Unauthenticated.status(refusal.message()))
            }
        }
    }
}

/// State of the HTTP check.
#[derive(Clone)]
pub struct HttpTokenCheck {
    pub tokens: Arc<TokenFile>,
    pub metrics: Arc<Metrics>,
}

/// axum middleware: every route but `/healthz` needs the token.
pub async fn require_http_token(
    State(auth): State<HttpTokenCheck>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match check(&auth.tokens, header) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            auth.metrics.reject_http(refusal);
            let peer = request
                .extensions()
                .get::<axum::extract::ConnectInfo<PeerAddr>>()
                .map(|c| c.0 .0.to_string())
                .unwrap_or_default();
            tracing::warn!(%peer, reason = refusal.reason(), path = %request.uri().path(), "HTTP request refused: {}", refusal.message());
            let mut response =
                (StatusCode::UNAUTHORIZED, format!("{}\n", refusal.message())).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"profiler\", charset=\"UTF-8\""),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_carry_the_token() {
        assert_eq!(presented_token("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(presented_token("bearer  abc ").as_deref(), Some("abc"));
        // "user:s3cret"
        assert_eq!(
            presented_token("Basic dXNlcjpzM2NyZXQ=").as_deref(),
            Some("s3cret")
        );
        assert_eq!(presented_token("Basic !!!"), None);
        assert_eq!(presented_token("Digest x"), None);
        assert_eq!(presented_token("abc"), None);
    }

    #[test]
    fn missing_and_wrong_tokens_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "good\n").unwrap();
        let tokens = TokenFile::open(&path).unwrap();
        assert_eq!(check(&tokens, Some("Bearer good")), Ok(()));
        assert_eq!(check(&tokens, None), Err(Refusal::MissingToken));
        assert_eq!(check(&tokens, Some("Bearer bad")), Err(Refusal::WrongToken));
        assert_eq!(check(&tokens, Some("Token x")), Err(Refusal::MissingToken));
    }
}
