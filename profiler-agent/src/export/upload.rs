//! The upload loop: sends the oldest unacknowledged batch, and decides from
//! the collector's answer what happens to it — acknowledged (gone), pushed
//! back (sent again after the wait asked for), rejected (dropped and
//! counted), or failed (sent again with backoff). At exit it waits for the
//! queue to drain up to a deadline, then parks or counts what is left,
//! naming why it was not delivered.
use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use profiler_proto::{
    metadata::{disposition, retry_after, Disposition, Reason},
    v1::{Ack, Batch},
};
use prost::Message;
use tokio::sync::mpsc;
use tonic::{codec::CompressionEncoding, Status};

use super::{
    batch::{batch_samples, is_cpu_batch},
    otlp::to_otlp,
    queue::Queue,
    spill::Spill,
    stats::{DropReason, ExportStats},
    Protocol,
};
use crate::{
    retry::{self, Backoff},
    transport::{Client, FailureKind, OtlpClient, Transport},
};

/// Share of a push-back's wait added at random, so pushed-back agents do
/// not all come back at once.
const PUSH_BACK_JITTER: f64 = 0.2;

pub(super) enum Msg {
    Batch(Box<Batch>),
    Flush,
    /// From the memory watchdog: empty the memory queue (to the spill
    /// directory, or drop its oldest half); answered when done.
    Shed(std::sync::mpsc::SyncSender<()>),
}

/// What the loop needs besides its channel.
pub(super) struct Uploader {
    pub transport: Transport,
    pub protocol: Protocol,
    pub stats: Arc<ExportStats>,
    pub queue_bytes: usize,
    pub spill: Option<Spill>,
    pub flush_timeout: Duration,
}

/// A client of the destination's protocol.
enum Sender {
    /// `profiler.v1.Ingest/PushBatch`, zstd both ways.
    Collector(Client),
    /// OTLP `ProfilesService/Export`, gzip (what OTLP receivers accept).
    Otlp(OtlpClient),
}

impl Sender {
    fn new(transport: &Transport, protocol: Protocol) -> Self {
        match protocol {
            Protocol::Collector => Sender::Collector(
                transport
                    .client()
                    .send_compressed(CompressionEncoding::Zstd)
                    .accept_compressed(CompressionEncoding::Zstd),
            ),
            Protocol::Otlp => Sender::Otlp(
                transport
                    .otlp_client()
                    .send_compressed(CompressionEncoding::Gzip)
                    .accept_compressed(CompressionEncoding::Gzip),
            ),
        }
    }

    /// Sends a batch (of `samples`): the encoded size of what was sent,
    /// and the acknowledgement or why not. An OTLP receiver does not say
    /// whether it had the profile before, nor how much it stored: an
    /// accepted profile counts as newly stored, whole; one it rejects
    /// (partial success) is refused as invalid.
    async fn send(&mut self, batch: Batch, samples: u64) -> (usize, Result<Ack, Status>) {
        match self {
            Sender::Collector(client) => (
                batch.encoded_len(),
                client.push_batch(batch).await.map(|a| a.into_inner()),
            ),
            Sender::Otlp(client) => {
                let request = match to_otlp(&batch) {
                    Ok(r) => r,
                    Err(e) => {
                        let status =
                            Reason::InvalidBatch.status(format!("not convertible to OTLP: {e}"));
                        return (batch.encoded_len(), Err(status));
                    }
                };
                let size = request.encoded_len();
                let answer = match client.export(request).await {
                    Ok(a) => a.into_inner(),
                    Err(status) => return (size, Err(status)),
                };
                let acked = match answer.partial_success {
                    Some(p) if p.rejected_profiles > 0 => {
                        Err(Reason::InvalidBatch.status(format!(
                            "the OTLP receiver rejected {} profiles: {}",
                            p.rejected_profiles, p.error_message
                        )))
                    }
                    _ => Ok(Ack {
                        agent_id: batch.agent_id,
                        sequence: batch.sequence,
                        newly_stored: true,
                        samples,
                    }),
                };
                (size, acked)
            }
        }
    }
}

/// The exit warning, and the note the exit summary repeats: why batches
/// were left (the last failure's kind) and where they are.
fn undelivered_note(last_failure: Option<FailureKind>, lost: u64, kept_on_disk: bool) -> String {
    let why = match last_failure {
        Some(kind) => format!("{} at exit", kind.describe()),
        None => "collector did not acknowledge every batch before the exit deadline".into(),
    };
    if kept_on_disk {
        format!("{why}: batches kept in the spill directory")
    } else {
        format!("{why}: {lost} batches not delivered")
    }
}

pub(super) async fn upload_loop(up: Uploader, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let Uploader {
        transport,
        protocol,
        stats,
        queue_bytes,
        spill,
        flush_timeout,
    } = up;
    let mut client = Sender::new(&transport, protocol);
    let mut queue = Queue::new(queue_bytes, spill);
    let mut flush_deadline: Option<Instant> = None;
    let mut backoff = Backoff::new(retry::Policy::DEFAULT);
    // Why the last send failed: a new reason is a warning, a repeat is not.
    let mut last_failure = String::new();
    // The kind of the last failure since the last acknowledgement: what the
    // exit warning names when batches are left.
    let mut failing: Option<FailureKind> = None;
    let mut reach = Reachability::default();
    let accept = |msg: Option<Msg>, queue: &mut Queue, deadline: &mut Option<Instant>| {
        match msg {
            Some(Msg::Batch(b)) => queue.push(*b, &stats),
            Some(Msg::Shed(done)) => {
                queue.shed(&stats);
                let _ = done.try_send(());
            }
            Some(Msg::Flush) | None => {
                deadline.get_or_insert_with(|| Instant::now() + flush_timeout);
            }
        }
        queue.publish(&stats);
    };
    loop {
        while let Ok(msg) = rx.try_recv() {
            accept(Some(msg), &mut queue, &mut flush_deadline);
        }
        if flush_deadline.is_some_and(|d| Instant::now() >= d) {
            let (lost, samples) = queue.park(&stats);
            queue.publish(&stats);
            if lost > 0 {
                stats.count_drop(DropReason::UnsentAtExit, lost, samples);
                let note = undelivered_note(failing, lost, false);
                tracing::warn!(batches = lost, samples, "{note}");
                stats.set_undelivered_at_exit(note);
            } else if !queue.is_empty() {
                let note = undelivered_note(failing, 0, true);
                tracing::warn!("{note}");
                stats.set_undelivered_at_exit(note);
            }
            return;
        }
        let Some((batch, spilled)) = queue.front(&stats) else {
            if flush_deadline.is_some() {
                return;
            }
            let msg = rx.recv().await;
            accept(msg, &mut queue, &mut flush_deadline);
            continue;
        };
        let samples = batch_samples(&batch);
        // The collector acknowledges the sum of the values it stored: CPU
        // samples are counted, other types' values (nanoseconds) are not.
        let cpu = is_cpu_batch(&batch);
        let (size, sent) = client.send(batch, samples).await;
        let size = size as u64;
        let status = match sent {
            Ok(ack) => {
                reach.update(true, &stats);
                backoff.reset();
                failing = None;
                ExportStats::bump(&stats.batches_acked);
                stats.bytes_acked.fetch_add(size, Ordering::Relaxed);
                if !ack.newly_stored {
                    ExportStats::bump(&stats.batches_duplicate);
                }
                if cpu {
                    stats
                        .samples_acked
                        .fetch_add(ack.samples, Ordering::Relaxed);
                }
                queue.pop(spilled, &stats);
                queue.publish(&stats);
                continue;
            }
            Err(status) => status,
        };
        let action = disposition(&status);
        let (kind, why) = transport.explain(&status);
        reach.update(answered(action, kind), &stats);
        match action {
            Disposition::Rejected => {
                // The collector answered: the batch, not the link, is the
                // problem.
                backoff.reset();
                failing = None;
                stats.count_drop(DropReason::RejectedByCollector, 1, samples);
                tracing::error!(
                    samples,
                    code = ?status.code(),
                    "collector rejected a batch: {}",
                    status.message()
                );
                queue.pop(spilled, &stats);
                queue.publish(&stats);
            }
            Disposition::PushedBack => {
                // The collector is up but busy, or this agent is over its
                // rate limit. Wait as asked (never less).
                failing = Some(kind);
                ExportStats::bump(&stats.pushed_back);
                let wait =
                    retry::stretch(retry_after(&status).unwrap_or_default(), PUSH_BACK_JITTER);
                tracing::info!("collector pushed back ({why}); sending again in {wait:.1?}");
                wait_accepting(wait, &mut rx, &mut queue, &mut flush_deadline, &accept).await;
            }
            Disposition::Retry => {
                failing = Some(kind);
                ExportStats::bump(&stats.send_failures);
                let wait = backoff.next_delay();
                // The first failure of an outage is a warning; the retries
                // are in the periodic summary and at debug level.
                if backoff.attempt() == 1 || why != last_failure {
                    tracing::warn!(
                        code = ?status.code(),
                        "sending to the collector failed: {why}; batches wait in the queue, retrying with backoff"
                    );
                } else {
                    tracing::debug!(
                        code = ?status.code(),
                        attempt = backoff.attempt(),
                        "sending to the collector failed: {why}; retrying in {wait:?}"
                    );
                }
                last_failure = why;
                wait_accepting(wait, &mut rx, &mut queue, &mut flush_deadline, &accept).await;
            }
        }
    }
}

/// Whether the collector answered a send that failed this way (it is up,
/// whatever it said), rather than the send not reaching it.
fn answered(disposition: Disposition, kind: FailureKind) -> bool {
    match disposition {
        Disposition::Rejected | Disposition::PushedBack => true,
        Disposition::Retry => !matches!(
            kind,
            FailureKind::Unreachable | FailureKind::Tls | FailureKind::Failed(_)
        ),
    }
}

/// Whether the collector answers: the `collector_up` gauge, and a log line
/// when that changes (not at every retry).
#[derive(Default)]
struct Reachability {
    /// Since when the collector does not answer, and how many sends failed.
    outage: Option<(Instant, u64)>,
}

impl Reachability {
    fn update(&mut self, reached: bool, stats: &ExportStats) {
        stats
            .collector_up
            .store(u64::from(reached), Ordering::Relaxed);
        match (&mut self.outage, reached) {
            (Some((since, failures)), true) => {
                tracing::info!(
                    failed_attempts = *failures,
                    "collector reachable again after {:.1?}",
                    since.elapsed()
                );
                self.outage = None;
            }
            (Some((_, failures)), false) => *failures += 1,
            (None, false) => self.outage = Some((Instant::now(), 1)),
            (None, true) => {}
        }
    }
}

/// Sleeps `wait` (cut short by the exit deadline), still taking batches in.
async fn wait_accepting(
    wait: Duration,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    queue: &mut Queue,
    flush_deadline: &mut Option<Instant>,
    accept: &impl Fn(Option<Msg>, &mut Queue, &mut Option<Instant>),
) {
    let sleep = tokio::time::sleep(match flush_deadline {
        Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
        None => wait,
    });
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => break,
            msg = rx.recv(), if flush_deadline.is_none() => accept(msg, queue, flush_deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collector_that_refuses_is_up() {
        use tonic::Code;
        for kind in [FailureKind::CredentialsRefused, FailureKind::StoreFailed] {
            assert!(answered(Disposition::Retry, kind), "{kind:?}");
        }
        for kind in [
            FailureKind::Unreachable,
            FailureKind::Tls,
            FailureKind::Failed(Code::Internal),
        ] {
            assert!(!answered(Disposition::Retry, kind), "{kind:?}");
        }
        assert!(answered(
            Disposition::Rejected,
            FailureKind::Failed(Code::InvalidArgument)
        ));
        assert!(answered(Disposition::PushedBack, FailureKind::PushedBack));

        let stats = ExportStats::default();
        let mut reach = Reachability::default();
        reach.update(false, &stats);
        reach.update(false, &stats);
        assert_eq!(stats.collector_up.load(Ordering::Relaxed), 0);
        assert_eq!(reach.outage.map(|(_, n)| n), Some(2));
        reach.update(true, &stats);
        assert_eq!(stats.collector_up.load(Ordering::Relaxed), 1);
        assert!(reach.outage.is_none());
    }

    #[test]
    fn the_exit_note_names_the_last_failure() {
        assert_eq!(
            undelivered_note(Some(FailureKind::CredentialsRefused), 3, false),
            "collector refused the agent's credentials (UNAUTHENTICATED) at exit: 3 batches not delivered"
        );
        assert_eq!(
            undelivered_note(Some(FailureKind::Unreachable), 2, false),
            "collector unreachable at exit: 2 batches not delivered"
        );
        assert_eq!(
            undelivered_note(Some(FailureKind::Tls), 0, true),
            "TLS handshake with the collector failed at exit: batches kept in the spill directory"
        );
        assert!(undelivered_note(None, 1, false).contains("exit deadline"));
    }
}
