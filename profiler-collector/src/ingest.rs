//! The gRPC ingest service: validate, store once (through the group-commit
//! [`StoreWriter`], where the store checks the retention cutoff),
//! acknowledge after the commit. Every refusal carries
//! its typed reason ([`Reason`]) as metadata, so agents need not read the
//! message. A batch whose sample type the store holds in another unit is
//! rejected like an invalid one.
use std::sync::Arc;

use profiler_proto::{
    metadata::Reason,
    v1::{ingest_server::Ingest, Ack, Batch},
};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::{
    metrics::{Metrics, Reject},
    model::{Stored, CPU},
    overload::RateLimiter,
    store::StoreError,
    validate::{validate, Limits},
    writer::StoreWriter,
};

pub use crate::clock::now_ns;

pub struct IngestService {
    pub writer: StoreWriter,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Largest accepted batch, encoded, in bytes.
    pub max_message_bytes: usize,
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
            self.metrics.reject(Reject::TooLarge);
            tracing::warn!(%peer, size, "batch rejected: too large");
            return Err(Reason::TooLarge.status(format!(
                "batch too large: {size} bytes, the limit is {} bytes",
                self.max_message_bytes
            )));
        }
        if let Err(wait) = self.rate.admit(&batch.agent_id, std::time::Instant::now()) {
            self.metrics.reject(Reject::RateLimited);
            tracing::info!(%peer, agent = %batch.agent_id, "batch pushed back: agent over its rate limit");
            return Err(Reason::RateLimited.push_back(
                format!("agent {:?} is over its rate limit", batch.agent_id),
                wait,
            ));
        }
        let now = now_ns();
        let valid = validate(&batch, &self.limits, now).map_err(|r| {
            self.metrics.reject(r.kind());
            tracing::warn!(%peer, agent = %batch.agent_id, seq = batch.sequence, "batch rejected: {r}");
            Reason::InvalidBatch.status(r.to_string())
        })?;
        let (agent_id, sequence) = (valid.agent_id.clone(), valid.sequence);
        // Only `cpu` values are numbers of samples.
        let counts_samples = valid.sample_type.name == CPU;
        match self.writer.insert(valid).await {
            Ok(Stored::New { samples }) => {
                self.metrics.batches_stored.inc();
                if counts_samples {
                    self.metrics.samples_stored.inc_by(samples);
                }
                Ok(Response::new(Ack {
                    agent_id,
                    sequence,
                    newly_stored: true,
                    samples,
                }))
            }
            Ok(Stored::Duplicate) => {
                self.metrics.batches_duplicate.inc();
                Ok(Response::new(Ack {
                    agent_id,
                    sequence,
                    newly_stored: false,
                    samples: 0,
                }))
            }
            Err(e @ StoreError::TooOld) => {
                self.metrics.reject(Reject::OlderThanRetention);
                tracing::warn!(%peer, agent = %agent_id, seq = sequence, "batch rejected: older than the retention period");
                Err(Reason::OlderThanRetention.status(e.to_string()))
            }
            Err(e @ StoreError::UnitMismatch { .. }) => {
                self.metrics.reject(Reject::UnitMismatch);
                tracing::warn!(%peer, agent = %agent_id, seq = sequence, "batch rejected: {e}");
                Err(Reason::InvalidBatch.status(e.to_string()))
            }
            Err(e) => {
                self.metrics.reject(Reject::StoreError);
                tracing::error!("store failed: {e}");
                Err(Reason::StoreUnavailable.status(format!("store failed, try again: {e}")))
            }
        }
    }
}
