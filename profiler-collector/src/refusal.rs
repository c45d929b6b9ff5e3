//! Answers tonic gives before the ingest service runs, made like the
//! service's own: a message over the size limit (tonic's `OUT_OF_RANGE`, or
//! `RESOURCE_EXHAUSTED` when it only grows past the limit while being
//! decompressed) becomes `RESOURCE_EXHAUSTED` with reason `too_large`; a
//! message that does not decode (not protobuf, a frame flagged compressed
//! that is not, a truncated body: tonic's `INTERNAL`) becomes
//! `INVALID_ARGUMENT` with reason `undecodable`. Each is counted on
//! `/metrics` under its reason and logged with the peer's address.
//!
//! Every status the service and the other layers build carries a
//! `profiler-reason` entry, so a status without one is tonic's.
use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use profiler_proto::metadata::{Reason, REASON};
use tonic::{codegen::http, transport::server::TcpConnectInfo, Code, Status};

use crate::metrics::{Metrics, Reject};

/// The [`Refusals`] layer, around the gRPC services.
#[derive(Clone)]
pub struct RefusalsLayer {
    metrics: Arc<Metrics>,
}

impl RefusalsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RefusalsLayer {
    type Service = Refusals<S>;
    fn layer(&self, inner: S) -> Refusals<S> {
        Refusals {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Refusals<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Refusals<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let peer = request
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|info| info.remote_addr());
        let path = request.uri().path().to_string();
        let response = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = response.await?;
            Ok(match tonic_refusal(&response) {
                Some((reason, status)) => refuse(reason, &status, peer, &path, &metrics),
                None => response,
            })
        })
    }
}

/// The reason of a status tonic answered with itself, and that status.
fn tonic_refusal(response: &http::Response<tonic::body::Body>) -> Option<(Reason, Status)> {
    let headers = response.headers();
    if headers.contains_key(REASON) {
        return None;
    }
    let status = Status::from_header_map(headers)?;
    let reason = match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => Reason::TooLarge,
        Code::Internal => Reason::Undecodable,
        _ => return None,
    };
    Some((reason, status))
}

fn refuse(
    reason: Reason,
    status: &Status,
    peer: Option<SocketAddr>,
    path: &str,
    metrics: &Metrics,
) -> http::Response<tonic::body::Body> {
    metrics.reject(match reason {
        Reason::TooLarge => Reject::TooLarge,
        _ => Reject::Undecodable,
    });
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    match reason {
        Reason::TooLarge => tracing::warn!(
            %peer,
            "batch rejected: larger than the message size limit ({})",
            status.message()
        ),
        _ => tracing::warn!(
            %peer,
            %path,
            reason = reason.as_str(),
            "request rejected: it does not decode as a batch ({})",
            status.message()
        ),
    }
    reason.status(status.message()).into_http()
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// A service answering every request with `status`.
    fn answering(
        status: Status,
    ) -> impl tower::Service<
        http::Request<()>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |_: http::Request<()>| {
            let status = status.clone();
            async move { Ok::<_, Infallible>(status.into_http()) }
        })
    }

    async fn through(status: Status, metrics: &Arc<Metrics>) -> Status {
        let mut svc = RefusalsLayer::new(metrics.clone()).layer(answering(status));
        let mut request = http::Request::new(());
        request.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(([192, 0, 2, 7], 4242).into()),
        });
        let response = svc.ready().await.unwrap().call(request).await.unwrap();
        Status::from_header_map(response.headers()).unwrap()
    }

    #[tokio::test]
    async fn tonic_statuses_get_the_code_and_reason_agents_expect() {
        let metrics = Arc::new(Metrics::default());
        let s = through(
            Status::internal("failed to decode Protobuf message: invalid wire type"),
            &metrics,
        )
        .await;
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(Reason::of(&s), Some(Reason::Undecodable));
        assert!(s.message().contains("failed to decode"), "{s:?}");
        assert_eq!(metrics.rejected(Reject::Undecodable), 1);

        let s = through(
            Status::out_of_range("Error, decoded message length too large"),
            &metrics,
        )
        .await;
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(Reason::of(&s), Some(Reason::TooLarge));
        let s = through(
            Status::resource_exhausted("Error decompressing: size limit exceeded"),
            &metrics,
        )
        .await;
        assert_eq!(Reason::of(&s), Some(Reason::TooLarge));
        assert_eq!(metrics.rejected(Reject::TooLarge), 2);
    }

    #[tokio::test]
    async fn the_services_own_statuses_pass_unchanged() {
        let metrics = Arc::new(Metrics::default());
        for status in [
            Reason::StoreUnavailable.status("store failed"),
            Reason::Overloaded.push_back("busy", std::time::Duration::from_secs(1)),
            Reason::InvalidBatch.status("empty stack"),
            Status::unimplemented("no such method"),
        ] {
            let s = through(status.clone(), &metrics).await;
            assert_eq!((s.code(), s.message()), (status.code(), status.message()));
            assert_eq!(Reason::of(&s), Reason::of(&status));
        }
        for reason in Reject::ALL {
            assert_eq!(metrics.rejected(reason), 0, "{reason:?}");
        }
    }
}
