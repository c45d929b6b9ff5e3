//! Group commit: one writer thread owns the writing to the store. It takes
//! every batch waiting, stores them with one [`Store::insert_many`] (for
//! SQLite: one transaction, one sync), then answers each batch. A batch is
//! acknowledged only after the commit that holds it, so durability is that
//! of one transaction per batch, at a fraction of the syncs.
//!
//! The queue is bounded; the gRPC layer bounds the batches in flight
//! (`--max-concurrent-batches`), so a sender rarely waits on it.
use std::{sync::Arc, thread::JoinHandle, time::Instant};

use tokio::sync::{mpsc, oneshot};

use crate::{
    metrics::Metrics,
    model::{Stored, ValidBatch},
    store::{SharedStore, StoreError},
};

/// The outcome, and the batch handed back: it is freed by the request's
/// thread, which allocated it, not by the writer (cross-thread frees cost
/// the writer ~5 % of its time).
type Reply = oneshot::Sender<(Result<Stored, StoreError>, ValidBatch)>;

/// Most batches written in one group.
pub const MAX_GROUP: usize = 256;

/// The handle requests use to have a batch stored.
#[derive(Clone)]
pub struct StoreWriter {
    queue: mpsc::Sender<(ValidBatch, Reply)>,
}

impl StoreWriter {
    /// Starts the writer thread over `store`, with room for `queue`
    /// waiting batches. The thread ends when every handle is dropped.
    pub fn spawn(
        store: SharedStore,
        queue: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(store, rx, metrics))?;
        Ok((Self { queue: tx }, thread))
    }

    /// Stores `batch` (once per agent and sequence); returns after the
    /// commit that holds it.
    pub async fn insert(&self, batch: ValidBatch) -> Result<Stored, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::WriterStopped;
        self.queue
            .send((batch, reply))
            .await
            .map_err(|_| stopped())?;
        let (outcome, batch) = answer.await.map_err(|_| stopped())?;
        drop(batch);
        outcome
    }
}

fn run(store: SharedStore, mut rx: mpsc::Receiver<(ValidBatch, Reply)>, metrics: Arc<Metrics>) {
    let mut batches = Vec::new();
    let mut replies = Vec::new();
    let interval = store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .min_write_interval();
    let mut last_write: Option<Instant> = None;
    while let Some((batch, reply)) = rx.blocking_recv() {
        batches.push(batch);
        replies.push(reply);
        // Everything else already waiting joins the group; so does what
        // arrives until `interval` has passed since the last write.
        let due = last_write.map(|t| t + interval);
        while batches.len() < MAX_GROUP {
            let next = match rx.try_recv() {
                Ok(next) => Some(next),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => match due {
                    Some(due) if due > Instant::now() => {
                        let wait = due - Instant::now();
                        std::thread::sleep(wait.min(std::time::Duration::from_millis(5)));
                        continue;
                    }
                    _ => None,
                },
            };
            let Some((batch, reply)) = next else { break };
            batches.push(batch);
            replies.push(reply);
        }
        let started = Instant::now();
        last_write = Some(started);
        let outcomes = store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert_many(&batches);
        metrics.store_written(started.elapsed());
        for ((reply, outcome), batch) in replies.drain(..).zip(outcomes).zip(batches.drain(..)) {
            // The request may have gone (client hung up): nothing to tell.
            let _ = reply.send((outcome, batch));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{model::BatchSample, store::sqlite::SqliteStore};

    fn batch(seq: u64) -> ValidBatch {
        ValidBatch {
            agent_id: "a".into(),
            sequence: seq,
            node: "n".into(),
            agent_version: "0".into(),
            window_start_ns: 1_000_000_000_000,
            window_end_ns: 1_000_010_000_000,
            frequency_hz: 99,
            sample_type: crate::model::SampleType::cpu(),
            label_sets: vec![vec![("process".into(), "p".into())]],
            stacks: vec!["main;f".into()],
            samples: vec![BatchSample {
                label_set: 0,
                stack: 0,
                value: 2,
            }],
        }
    }

    /// Many concurrent senders, some sending the same batch: each batch is
    /// stored once, every sender is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_batches_are_grouped_and_stored_once() {
        let store: SharedStore = Arc::new(Mutex::new(Box::new(SqliteStore::in_memory().unwrap())));
        let metrics = Arc::new(Metrics::default());
        let (writer, thread) = StoreWriter::spawn(store.clone(), 8, metrics.clone()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move { w.insert(batch(i % 50)).await }));
        }
        let mut new = 0;
        for t in tasks {
            if let Stored::New { .. } = t.await.unwrap().unwrap() {
                new += 1;
            }
        }
        assert_eq!(new, 50);
        assert!(metrics.store_commits.get() <= 200);
        drop(writer);
        thread.join().unwrap();
        let stats = store.lock().unwrap().stats().unwrap();
        assert_eq!((stats.batches, stats.sample_rows), (50, 50));
    }
}
