//! Push-back instead of unbounded growth.
//!
//! - [`ShedLayer`]: at most `permits` batches are decoded and stored at
//!   once; a batch that cannot get a permit within a short wait is answered
//!   `RESOURCE_EXHAUSTED` with a retry hint, before its body is read.
//! - [`RateLimiter`]: a token bucket per agent (batches per second, with a
//!   burst), so one agent replaying a long outage cannot crowd out the rest.
//!
//! A push-back is `RESOURCE_EXHAUSTED` with the typed reason (`overloaded`
//! or `rate_limited`) and the retry hint (`retry-after-ms`) as metadata
//! ([`profiler_proto::metadata`]); agents wait that long, then send the
//! same batch again.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;
use tonic::codegen::http;

use crate::metrics::{Metrics, Reject};

use profiler_proto::metadata::Reason;
pub use profiler_proto::metadata::RETRY_AFTER_MS;

/// How long a batch may wait for a permit before it is pushed back.
const PERMIT_WAIT: Duration = Duration::from_millis(250);
/// The retry hint given when every permit is taken.
const OVERLOADED_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl ShedLayer {
    pub fn new(permits: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(permits)),
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Shed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readiness is decided per call, by the permit.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        let ShedLayer { permits, metrics } = self.layer.clone();
        Box::pin(async move {
            match tokio::time::timeout(PERMIT_WAIT, permits.acquire_owned()).await {
                Ok(Ok(permit)) => {
                    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                    let response = inner.call(request).await;
                    drop(permit);
                    response
                }
                _ => {
                    metrics.reject(Reject::Overloaded);
                    tracing::warn!("overloaded: batch pushed back");
                    Ok(Reason::Overloaded
                        .push_back("collector overloaded: retry later", OVERLOADED_RETRY)
                        .into_http())
                }
            }
        })
    }
}

/// Agents tracked at most; past it, idle agents are forgotten first.
const MAX_AGENTS: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Batches per second per agent id, with a burst.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `per_second` ≤ 0 turns the limit off.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one batch's worth from `agent`'s bucket, or says how long until
    /// there is one.
    pub fn admit(&self, agent: &str, now: Instant) -> Result<(), Duration> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_AGENTS && !buckets.contains_key(agent) {
            let full = self.burst;
            let rate = self.per_second;
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < full
            });
            if buckets.len() >= MAX_AGENTS {
                // Every tracked agent is busy: admit rather than grow.
                return Ok(());
            }
        }
        let bucket = buckets.entry(agent.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_steady_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.admit("a", t0), Ok(()));
        }
        let wait = limiter.admit("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Other agents have their own bucket.
        assert_eq!(limiter.admit("b", t0), Ok(()));
        // Half a second later one more batch is allowed, then not.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.admit("a", t1), Ok(()));
        assert!(limiter.admit("a", t1).is_err());
        // The bucket never holds more than the burst.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limiter.admit("a", t2), Ok(()));
        }
        assert!(limiter.admit("a", t2).is_err());
    }

    #[test]
    fn zero_means_no_limit() {
        let limiter = RateLimiter::new(0.0, 1);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(limiter.admit("a", t0), Ok(()));
        }
    }

    /// With one slot busy, a second batch waits briefly, then is answered
    /// `RESOURCE_EXHAUSTED` with the hint, without reaching the service.
    #[tokio::test]
    async fn a_full_house_pushes_back() {
        use tower::{Layer, Service, ServiceExt};
        let metrics = Arc::new(Metrics::default());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        let slow = tower::service_fn(move |_: http::Request<()>| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
            }
        });
        let mut shed = ShedLayer::new(1, metrics.clone()).layer(slow);
        let first = shed.ready().await.unwrap().call(http::Request::new(()));
        let first = tokio::spawn(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = shed
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(second.headers()["grpc-status"], "8");
        assert_eq!(second.headers()[RETRY_AFTER_MS], "1000");
        assert_eq!(second.headers()["profiler-reason"], "overloaded");
        assert_eq!(metrics.rejected(Reject::Overloaded), 1);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
    }
}
