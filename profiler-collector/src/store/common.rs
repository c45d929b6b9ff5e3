//! What every store shares: the time buckets windows are filed in (a
//! window ending at `t` is in bucket `(t - 1) div grain`, so a window
//! belongs to exactly one of two adjacent ranges `(start, end]`), and the
//! retention cutoff every batch is checked against before it is written.
use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

pub const SECOND_NS: i64 = 1_000_000_000;
pub const MINUTE_NS: i64 = 60 * SECOND_NS;
pub const HOUR_NS: i64 = 60 * MINUTE_NS;
pub const DAY_NS: i64 = 24 * HOUR_NS;

/// The bucket of `grain` holding a window that ends at `window_end_ns`.
pub fn bucket(window_end_ns: i64, grain: i64) -> i64 {
    window_end_ns.saturating_sub(1).div_euclid(grain)
}

/// The buckets `[lo, hi]` of `grain` that hold some of the windows ending
/// in `(start, end]` (the first and last may hold others too).
pub fn touched_buckets(start: i64, end: i64, grain: i64) -> (i64, i64) {
    (start.div_euclid(grain), bucket(end, grain))
}

/// The whole buckets `[lo, hi)` of `grain` inside `(start, end]`: they hold
/// the windows ending in `(lo grain, hi grain]`.
pub fn whole_buckets(start: i64, end: i64, grain: i64) -> Option<(i64, i64)> {
    let lo = start.div_euclid(grain) + i64::from(start.rem_euclid(grain) != 0);
    let hi = end.div_euclid(grain);
    (lo < hi).then_some((lo, hi))
}

/// The retention cutoff of a store: a batch whose window ends before it is
/// refused ([`super::StoreError::TooOld`]). It is the later of `now -
/// period` and the last cutoff [`super::Store::retain`] deleted up to, so a
/// batch never lands in data retention has already deleted. Clones share
/// it (a store and its query handle).
#[derive(Clone, Debug)]
pub struct Retention(Arc<Cutoffs>);

#[derive(Debug)]
struct Cutoffs {
    period_ns: AtomicI64,
    retained_from: AtomicI64,
}

impl Default for Retention {
    /// No period, nothing deleted yet: every window is recent enough.
    fn default() -> Self {
        Self(Arc::new(Cutoffs {
            period_ns: AtomicI64::new(i64::MAX),
            retained_from: AtomicI64::new(i64::MIN),
        }))
    }
}

impl Retention {
    /// Keeps data for `period` (capped at `i64::MAX` nanoseconds).
    pub fn set_period(&self, period: Duration) {
        let ns = i64::try_from(period.as_nanos()).unwrap_or(i64::MAX);
        self.0.period_ns.store(ns, Ordering::Relaxed);
    }

    /// Windows ending before this were deleted by [`super::Store::retain`].
    pub fn retained_from(&self) -> i64 {
        self.0.retained_from.load(Ordering::Relaxed)
    }

    /// Records that data before `cutoff_ns` is deleted (never moves back).
    pub fn deleted_before(&self, cutoff_ns: i64) {
        self.0.retained_from.fetch_max(cutoff_ns, Ordering::Relaxed);
    }

    /// The cutoff at `now_ns`: windows ending before it are refused.
    pub fn cutoff(&self, now_ns: i64) -> i64 {
        let period = self.0.period_ns.load(Ordering::Relaxed);
        now_ns.saturating_sub(period).max(self.retained_from())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_fall_in_the_bucket_of_their_end() {
        assert_eq!(bucket(HOUR_NS, HOUR_NS), 0);
        assert_eq!(bucket(HOUR_NS + 1, HOUR_NS), 1);
        assert_eq!(bucket(0, HOUR_NS), -1);
        assert_eq!(touched_buckets(0, HOUR_NS, HOUR_NS), (0, 0));
        assert_eq!(touched_buckets(HOUR_NS, 3 * HOUR_NS + 1, HOUR_NS), (1, 3));
        assert_eq!(
            touched_buckets(DAY_NS - 1, DAY_NS + HOUR_NS, DAY_NS),
            (0, 1)
        );
        assert_eq!(whole_buckets(0, 2 * HOUR_NS, HOUR_NS), Some((0, 2)));
        assert_eq!(whole_buckets(1, 2 * HOUR_NS, HOUR_NS), Some((1, 2)));
        assert_eq!(whole_buckets(1, 2 * HOUR_NS - 1, HOUR_NS), None);
    }

    #[test]
    fn the_cutoff_is_the_later_of_the_period_and_what_was_deleted() {
        let r = Retention::default();
        assert!(r.cutoff(1_000) < 0, "no period, nothing deleted");
        r.set_period(Duration::from_nanos(100));
        assert_eq!(r.cutoff(1_000), 900);
        let shared = r.clone();
        shared.deleted_before(950);
        assert_eq!(r.cutoff(1_000), 950, "clones share the cutoff");
        shared.deleted_before(10);
        assert_eq!(r.retained_from(), 950, "the cutoff never moves back");
        assert_eq!(r.cutoff(2_000), 1_900);
    }
}
