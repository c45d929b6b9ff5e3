//! The gRPC metadata a collector puts on a push-back or a rejection, and
//! that agents read to decide what to do with the batch: the names of the
//! entries and the typed reason, defined once for both sides.
//!
//! - `profiler-reason`: why the collector did not store the batch, one of
//!   [`Reason::ALL`] by [`Reason::as_str`].
//! - `retry-after-ms`: on a push-back, how long to wait before sending the
//!   same batch again, in milliseconds.
//!
//! A status without `profiler-reason` (a collector that does not set it,
//! or tonic's own answers before the service runs) is classified by its
//! code alone, see [`Reason::of`].
use std::time::Duration;

use tonic::{metadata::MetadataValue, Code, Status};

/// The metadata key of the reason.
pub const REASON: &str = "profiler-reason";
/// The metadata key of the retry hint, in milliseconds.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
/// The longest wait a retry hint may ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Why a collector pushed a batch back or refused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Every ingest slot is busy: send again after the hint.
    Overloaded,
    /// This agent is over its rate limit: send again after the hint.
    RateLimited,
    /// The batch is over the collector's message size limit.
    TooLarge,
    /// The batch failed validation (the message says which rule).
    InvalidBatch,
    /// The batch's window ended before the collector's retention period.
    OlderThanRetention,
    /// The request did not decode as a batch (not protobuf, or a frame
    /// flagged compressed that is not).
    Undecodable,
    /// The bearer token is missing or not accepted.
    Unauthenticated,
    /// The store failed to write the batch; a later try may succeed.
    StoreUnavailable,
}

/// What an agent does with a batch the collector did not store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Wait as the retry hint says, then send the same batch again.
    PushedBack,
    /// Retrying cannot help: drop the batch and count it.
    Rejected,
    /// Send again with backoff.
    Retry,
}

impl Reason {
    /// Every reason, in a stable order.
    pub const ALL: [Reason; 8] = [
        Reason::Overloaded,
        Reason::RateLimited,
        Reason::TooLarge,
        Reason::InvalidBatch,
        Reason::OlderThanRetention,
        Reason::Undecodable,
        Reason::Unauthenticated,
        Reason::StoreUnavailable,
    ];

    /// The value of the `profiler-reason` entry.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Overloaded => "overloaded",
            Reason::RateLimited => "rate_limited",
            Reason::TooLarge => "too_large",
            Reason::InvalidBatch => "invalid_batch",
            Reason::OlderThanRetention => "older_than_retention",
            Reason::Undecodable => "undecodable",
            Reason::Unauthenticated => "unauthenticated",
            Reason::StoreUnavailable => "store_unavailable",
        }
    }

    /// The reason a `profiler-reason` value names; `None` for a value this
    /// build does not know.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// The gRPC code a status with this reason carries.
    pub const fn code(self) -> Code {
        match self {
            Reason::Overloaded | Reason::RateLimited | Reason::TooLarge => Code::ResourceExhausted,
            Reason::InvalidBatch | Reason::OlderThanRetention | Reason::Undecodable => {
                Code::InvalidArgument
            }
            Reason::Unauthenticated => Code::Unauthenticated,
            Reason::StoreUnavailable => Code::Unavailable,
        }
    }

    /// What the agent does with the batch.
    pub const fn disposition(self) -> Disposition {
        match self {
            Reason::Overloaded | Reason::RateLimited => Disposition::PushedBack,
            Reason::TooLarge
            | Reason::InvalidBatch
            | Reason::OlderThanRetention
            | Reason::Undecodable => Disposition::Rejected,
            // A rotated token file or a recovered store make a later try
            // succeed.
            Reason::Unauthenticated | Reason::StoreUnavailable => Disposition::Retry,
        }
    }

    /// A status with this reason's code, `message` and the reason entry.
    pub fn status(self, message: impl Into<String>) -> Status {
        let mut status = Status::new(self.code(), message);
        status
            .metadata_mut()
            .insert(REASON, MetadataValue::from_static(self.as_str()));
        status
    }

    /// A push-back: [`Self::status`] with the retry hint (clamped to 1 ms
    /// – [`MAX_RETRY_AFTER`]).
    pub fn push_back(self, message: impl Into<String>, retry_after: Duration) -> Status {
        let mut status = self.status(message);
        let ms = retry_after
            .as_millis()
            .clamp(1, MAX_RETRY_AFTER.as_millis());
        if let Ok(v) = MetadataValue::try_from(ms.to_string()) {
            status.metadata_mut().insert(RETRY_AFTER_MS, v);
        }
        status
    }

    /// The reason a status carries; `None` without the entry or with a
    /// value this build does not know.
    pub fn of(status: &Status) -> Option<Self> {
        Self::parse(status.metadata().get(REASON)?.to_str().ok()?)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The wait a push-back asks for: `RESOURCE_EXHAUSTED` with a
/// `retry-after-ms` entry (clamped to 1 ms – [`MAX_RETRY_AFTER`]).
pub fn retry_after(status: &Status) -> Option<Duration> {
    if status.code() != Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = status
        .metadata()
        .get(RETRY_AFTER_MS)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms).clamp(Duration::from_millis(1), MAX_RETRY_AFTER))
}

/// What to do with a batch the collector answered with `status`: by its
/// reason entry where it has a known one, else by its code. By code:
/// `RESOURCE_EXHAUSTED` with a retry hint is a push-back; without one it
/// is a message over the size limit (tonic's own answer and that of
/// collectors without the reason entry), as are `OUT_OF_RANGE` (tonic's
/// decoder over its limit) and `INVALID_ARGUMENT`; anything else is
/// retried.
pub fn disposition(status: &Status) -> Disposition {
    if let Some(reason) = Reason::of(status) {
        return match reason.disposition() {
            // A push-back without its hint cannot say how long to wait.
            Disposition::PushedBack if retry_after(status).is_none() => Disposition::Retry,
            d => d,
        };
    }
    match status.code() {
        Code::ResourceExhausted if retry_after(status).is_some() => Disposition::PushedBack,
        Code::ResourceExhausted | Code::InvalidArgument | Code::OutOfRange => Disposition::Rejected,
        _ => Disposition::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(Reason::parse("something_new"), None);
        assert_eq!(Reason::parse(""), None);
    }

    #[test]
    fn statuses_carry_the_reason_and_its_code() {
        let s = Reason::InvalidBatch.status("index out of range");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "index out of range");
        assert_eq!(Reason::of(&s), Some(Reason::InvalidBatch));
        assert_eq!(disposition(&s), Disposition::Rejected);

        let s = Reason::RateLimited.push_back("slow down", Duration::from_millis(1500));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(retry_after(&s), Some(Duration::from_millis(1500)));
        assert_eq!(disposition(&s), Disposition::PushedBack);

        let s = Reason::Overloaded.push_back("busy", Duration::from_secs(3600));
        assert_eq!(retry_after(&s), Some(MAX_RETRY_AFTER));

        let s = Reason::TooLarge.status("batch too large");
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(disposition(&s), Disposition::Rejected);

        for r in [Reason::Unauthenticated, Reason::StoreUnavailable] {
            assert_eq!(disposition(&r.status("x")), Disposition::Retry, "{r}");
        }
    }

    #[test]
    fn the_reason_decides_not_the_message() {
        // A message that reads like a size error on a push-back.
        let s = Reason::Overloaded.push_back("too large a queue", Duration::from_secs(1));
        assert_eq!(disposition(&s), Disposition::PushedBack);
        // A rejection reason on a code that alone would be retried.
        let mut s = Status::unavailable("x");
        s.metadata_mut()
            .insert(REASON, MetadataValue::from_static("undecodable"));
        assert_eq!(disposition(&s), Disposition::Rejected);
    }

    #[test]
    fn statuses_without_the_reason_go_by_code() {
        let mut hinted = Status::resource_exhausted("overloaded");
        hinted
            .metadata_mut()
            .insert(RETRY_AFTER_MS, MetadataValue::from_static("250"));
        assert_eq!(disposition(&hinted), Disposition::PushedBack);
        for s in [
            Status::resource_exhausted("any text"),
            Status::out_of_range("decoded message length too large"),
            Status::invalid_argument("bad"),
        ] {
            assert_eq!(disposition(&s), Disposition::Rejected, "{s:?}");
        }
        for s in [
            Status::unavailable("down"),
            Status::unauthenticated("wrong bearer token"),
            Status::internal("?"),
            Status::deadline_exceeded("slow"),
        ] {
            assert_eq!(disposition(&s), Disposition::Retry, "{s:?}");
        }
        // An unknown reason (a newer collector) falls back to the code.
        let mut s = Status::invalid_argument("x");
        s.metadata_mut()
            .insert(REASON, MetadataValue::from_static("something_new"));
        assert_eq!(disposition(&s), Disposition::Rejected);
        assert_eq!(retry_after(&Status::unavailable("down")), None);
    }
}
