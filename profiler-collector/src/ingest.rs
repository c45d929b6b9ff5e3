//! Storing what clients send: native batches over gRPC ([`IngestService`])
//! and profiles in other formats converted to batches (OTLP, pprof; see
//! [`crate::import`]). Both go through [`IngestCore`]: size limit, rate
//! limit per sender, validation, then the group-commit [`StoreWriter`]
//! (where the store checks the retention cutoff), acknowledged after the
//! commit. Every refusal carries its typed reason ([`Reason`]) as metadata,
//! so agents need not read the message. A batch whose sample type the store
//! holds in another unit is rejected like an invalid one.
use std::{sync::Arc, time::Duration};

use profiler_proto::{
    metadata::Reason,
    v1::{ingest_server::Ingest, Ack, Batch},
};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::{
    metrics::{Metrics, Reject},
    model::{Stored, ValidBatch, CPU},
    overload::RateLimiter,
    store::StoreError,
    validate::{validate, Limits},
    writer::StoreWriter,
};

pub use crate::clock::now_ns;

/// Why batches were not stored: the reason the client is given, the
/// message, and the wait to ask for when it is a push-back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: Reason,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl Refused {
    fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The gRPC answer.
    pub fn status(&self) -> Status {
        match self.retry_after {
            Some(wait) => self.reason.push_back(self.message.clone(), wait),
            None => self.reason.status(self.message.clone()),
        }
    }
}

/// What storing a set of batches did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredCount {
    /// Batches stored now.
    pub new: usize,
    /// Batches stored before (a re-send), not stored again.
    pub duplicate: usize,
    /// The sum of the values stored now (samples for `cpu`).
    pub samples: u64,
}

/// The shared path of every way data comes in.
#[derive(Clone)]
pub struct IngestCore {
    pub writer: StoreWriter,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Largest accepted message, encoded, in bytes.
    pub max_message_bytes: usize,
    pub rate: Arc<RateLimiter>,
}

impl IngestCore {
    /// Checks the size and the sender's rate, then validates `batch`.
    fn admit(&self, batch: &Batch, peer: &str) -> Result<ValidBatch, Refused> {
        self.check_size(batch, peer)?;
        self.check_rate(&batch.agent_id, peer)?;
        self.check(batch, peer)
    }

    fn check_size(&self, batch: &Batch, peer: &str) -> Result<(), Refused> {
        let size = batch.encoded_len();
        if size > self.max_message_bytes {
            self.metrics.reject(Reject::TooLarge);
            tracing::warn!(%peer, size, "batch rejected: too large");
            return Err(Refused::new(
                Reason::TooLarge,
                format!(
                    "batch too large: {size} bytes, the limit is {} bytes",
                    self.max_message_bytes
                ),
            ));
        }
        Ok(())
    }

    /// One message of `agent_id` against its rate limit.
    fn check_rate(&self, agent_id: &str, peer: &str) -> Result<(), Refused> {
        if let Err(wait) = self.rate.admit(agent_id, std::time::Instant::now()) {
            self.metrics.reject(Reject::RateLimited);
            tracing::info!(%peer, agent = %agent_id, "pushed back: sender over its rate limit");
            return Err(Refused {
                retry_after: Some(wait),
                ..Refused::new(
                    Reason::RateLimited,
                    format!("agent {agent_id:?} is over its rate limit"),
                )
            });
        }
        Ok(())
    }

    fn check(&self, batch: &Batch, peer: &str) -> Result<ValidBatch, Refused> {
        validate(batch, &self.limits, now_ns()).map_err(|r| {
            self.metrics.reject(r.kind());
            tracing::warn!(%peer, agent = %batch.agent_id, seq = batch.sequence, "batch rejected: {r}");
            Refused::new(Reason::InvalidBatch, r.to_string())
        })
    }

    /// Stores one validated batch.
    async fn store(&self, valid: ValidBatch, peer: &str) -> Result<Stored, Refused> {
        let (agent_id, sequence) = (valid.agent_id.clone(), valid.sequence);
        // Only `cpu` values are numbers of samples.
        let counts_samples = valid.sample_type.name == CPU;
        match self.writer.insert(valid).await {
            Ok(stored @ Stored::New { samples }) => {
                self.metrics.batches_stored.inc();
                if counts_samples {
                    self.metrics.samples_stored.inc_by(samples);
                }
                Ok(stored)
            }
            Ok(Stored::Duplicate) => {
                self.metrics.batches_duplicate.inc();
                Ok(Stored::Duplicate)
            }
            Err(e @ StoreError::TooOld) => {
                self.metrics.reject(Reject::OlderThanRetention);
                tracing::warn!(%peer, agent = %agent_id, seq = sequence, "batch rejected: older than the retention period");
                Err(Refused::new(Reason::OlderThanRetention, e.to_string()))
            }
            Err(e @ StoreError::UnitMismatch { .. }) => {
                self.metrics.reject(Reject::UnitMismatch);
                tracing::warn!(%peer, agent = %agent_id, seq = sequence, "batch rejected: {e}");
                Err(Refused::new(Reason::InvalidBatch, e.to_string()))
            }
            Err(e) => {
                self.metrics.reject(Reject::StoreError);
                tracing::error!("store failed: {e}");
                Err(Refused::new(
                    Reason::StoreUnavailable,
                    format!("store failed, try again: {e}"),
                ))
            }
        }
    }

    /// Stores one native batch.
    pub async fn store_batch(&self, batch: &Batch, peer: &str) -> Result<Stored, Refused> {
        let valid = self.admit(batch, peer)?;
        self.store(valid, peer).await
    }

    /// Stores the batches a converted message made (one request, one
    /// upload, one scrape: one message against the sender's rate limit):
    /// all are checked before any is stored, so an invalid one refuses the
    /// whole profile. Their sequences are hashes of their content, so a
    /// re-sent profile is counted as a duplicate rather than stored twice,
    /// and a profile cut short by a store failure is completed by sending
    /// it again.
    pub async fn store_all(&self, batches: &[Batch], peer: &str) -> Result<StoredCount, Refused> {
        for b in batches {
            self.check_size(b, peer)?;
        }
        if let Some(first) = batches.first() {
            self.check_rate(&first.agent_id, peer)?;
        }
        let valid = batches
            .iter()
            .map(|b| self.check(b, peer))
            .collect::<Result<Vec<_>, _>>()?;
        let mut count = StoredCount::default();
        for v in valid {
            match self.store(v, peer).await? {
                Stored::New { samples } => {
                    count.new += 1;
                    count.samples = count.samples.saturating_add(samples);
                }
                Stored::Duplicate => count.duplicate += 1,
            }
        }
        Ok(count)
    }
}

/// The native gRPC service (`profiler.v1.Ingest`).
pub struct IngestService {
    pub core: IngestCore,
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn push_batch(&self, request: Request<Batch>) -> Result<Response<Ack>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let batch = request.into_inner();
        let (agent_id, sequence) = (batch.agent_id.clone(), batch.sequence);
        match self.core.store_batch(&batch, &peer).await {
            Ok(Stored::New { samples }) => Ok(Response::new(Ack {
                agent_id,
                sequence,
                newly_stored: true,
                samples,
            })),
            Ok(Stored::Duplicate) => Ok(Response::new(Ack {
                agent_id,
                sequence,
                newly_stored: false,
                samples: 0,
            })),
            Err(refused) => Err(refused.status()),
        }
    }
}
