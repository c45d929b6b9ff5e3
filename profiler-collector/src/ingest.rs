//! The gRPC ingest service: validate, store once (through the group-commit
//! [`StoreWriter`]), acknowledge after the commit. A batch whose sample
//! type the store holds in another unit is rejected like an invalid one.
use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use profiler_proto::v1::{ingest_server::Ingest, Ack, Batch};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::{
    metrics::Metrics,
    model::{Stored, CPU},
    overload::{push_back, RateLimiter},
    store::{Store, StoreError},
    validate::{validate, Limits},
    writer::StoreWriter,
};

pub type SharedStore = Arc<Mutex<Box<dyn Store>>>;

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub struct IngestService {
    pub writer: StoreWriter,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Largest accepted batch, encoded, in bytes.
    pub max_message_bytes: usize,
    /// Batches whose window ended longer ago than this are refused.
    pub retention_ns: i64,
    pub rate: RateLimiter,
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn push_batch(&self, request: Request<Batch>) -> Result<Response<Ack>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let batch = request.into_inner();
        let size = batch.encoded_len();
        if size > self.max_message_bytes {
            self.metrics.reject("too_large");
            tracing::warn!(%peer, size, "batch rejected: too large");
            return Err(Status::resource_exhausted(format!(
                "batch too large: {size} bytes, the limit is {} bytes",
                self.max_message_bytes
            )));
        }
        if let Err(wait) = self.rate.admit(&batch.agent_id, std::time::Instant::now()) {
            self.metrics.reject("rate_limited");
            tracing::info!(%peer, agent = %batch.agent_id, "batch pushed back: agent over its rate limit");
            return Err(push_back(
                format!("agent {:?} is over its rate limit", batch.agent_id),
                wait,
            ));
        }
        let now = now_ns();
        let valid = validate(&batch, &self.limits, now).map_err(|r| {
            self.metrics.reject(r.reason());
            tracing::warn!(%peer, agent = %batch.agent_id, seq = batch.sequence, "batch rejected: {r}");
            Status::invalid_argument(r.to_string())
        })?;
        if valid.window_end_ns < now - self.retention_ns {
            self.metrics.reject("older_than_retention");
            tracing::warn!(%peer, agent = %valid.agent_id, seq = valid.sequence, "batch rejected: older than the retention period");
            return Err(Status::invalid_argument(
                "window ended before the retention period: not stored",
            ));
        }
        let (agent_id, sequence) = (valid.agent_id.clone(), valid.sequence);
        // Only `cpu` values are numbers of samples.
        let counts_samples = valid.sample_type.name == CPU;
        match self.writer.insert(valid).await {
            Ok(Stored::New { samples }) => {
                self.metrics.batches_stored.fetch_add(1, Ordering::Relaxed);
                if counts_samples {
                    self.metrics
                        .samples_stored
                        .fetch_add(samples, Ordering::Relaxed);
                }
                Ok(Response::new(Ack {
                    agent_id,
                    sequence,
                    newly_stored: true,
                    samples,
                }))
            }
            Ok(Stored::Duplicate) => {
                self.metrics
                    .batches_duplicate
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Response::new(Ack {
                    agent_id,
                    sequence,
                    newly_stored: false,
                    samples: 0,
                }))
            }
            Err(StoreError::TooOld) => {
                self.metrics.reject("older_than_retention");
                Err(Status::invalid_argument(
                    "window ended before the retention period",
                ))
            }
            Err(e @ StoreError::UnitMismatch { .. }) => {
                self.metrics.reject("unit_mismatch");
                tracing::warn!(%peer, agent = %agent_id, seq = sequence, "batch rejected: {e}");
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("store failed: {e}");
                Err(Status::unavailable(format!("store failed, try again: {e}")))
            }
        }
    }
}
