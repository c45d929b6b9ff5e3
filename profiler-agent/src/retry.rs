//! Waiting between retries: exponential backoff with jitter and a cap, for
//! every retry loop of the agent (sends to the collector, the Kubernetes
//! pod watch), so none of them hammers a server that is down and agents
//! restarted together do not retry in step.
use std::time::Duration;

use rand::Rng;

/// How waits grow: `base` doubling each attempt up to `cap`, then scaled by
/// a random factor in `1 ± jitter`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    pub base: Duration,
    pub cap: Duration,
    /// Fraction of the wait drawn at random either way (0.5: ±50 %).
    pub jitter: f64,
}

impl Policy {
    /// 100 ms doubling to 10 s, ±50 % jitter.
    pub const DEFAULT: Policy = Policy {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(10),
        jitter: 0.5,
    };

    /// The wait before retry `attempt` (1-based) without jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// The wait before retry `attempt` with the jitter factor `factor`
    /// (from `1 - jitter` to `1 + jitter`).
    fn scaled(&self, attempt: u32, factor: f64) -> Duration {
        self.nominal(attempt).mul_f64(factor.max(0.0))
    }

    /// The wait before retry `attempt` (1-based), jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = if self.jitter > 0.0 {
            rand::rng().random_range(1.0 - self.jitter..1.0 + self.jitter)
        } else {
            1.0
        };
        self.scaled(attempt, factor)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The retries of one loop: each failure makes the next wait longer, a
/// success starts over.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    policy: Policy,
    attempt: u32,
}

impl Backoff {
    pub fn new(policy: Policy) -> Self {
        Self { policy, attempt: 0 }
    }

    /// Counts a failure and returns how long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.policy.delay(self.attempt)
    }

    /// Failures counted since the last [`Self::reset`].
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// After a success: the next failure waits the shortest time again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `wait` lengthened by a random share of up to `up_to` (0.2: up to 20 %),
/// for waits a server asked for: never shorter than asked.
pub fn stretch(wait: Duration, up_to: f64) -> Duration {
    if up_to <= 0.0 {
        return wait;
    }
    wait.mul_f64(rand::rng().random_range(1.0..1.0 + up_to))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let p = Policy::DEFAULT;
        let nominal: Vec<Duration> = (1..=9).map(|a| p.nominal(a)).collect();
        assert_eq!(
            nominal,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000].map(MS)
        );
        assert_eq!(p.nominal(0), MS(100));
        assert_eq!(p.nominal(u32::MAX), MS(10_000));
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let p = Policy::DEFAULT;
        assert_eq!(p.scaled(4, 0.5), MS(400));
        assert_eq!(p.scaled(4, 1.5), MS(1200));
        for attempt in 1..40 {
            let d = p.delay(attempt);
            let n = p.nominal(attempt);
            assert!(
                d >= n.mul_f64(0.5) && d <= n.mul_f64(1.5),
                "{attempt}: {d:?}"
            );
        }
        let fixed = Policy {
            jitter: 0.0,
            ..Policy::DEFAULT
        };
        assert_eq!(fixed.delay(3), MS(400));
    }

    #[test]
    fn backoff_grows_with_failures_and_resets_on_success() {
        let mut b = Backoff::new(Policy {
            jitter: 0.0,
            ..Policy::DEFAULT
        });
        assert_eq!(b.attempt(), 0);
        assert_eq!(
            [b.next_delay(), b.next_delay(), b.next_delay()],
            [100, 200, 400].map(MS)
        );
        assert_eq!(b.attempt(), 3);
        b.reset();
        assert_eq!(b.next_delay(), MS(100));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), MS(10_000), "capped");
    }

    #[test]
    fn stretched_waits_are_never_shorter() {
        for _ in 0..100 {
            let d = stretch(MS(1000), 0.2);
            assert!(d >= MS(1000) && d < MS(1200), "{d:?}");
        }
        assert_eq!(stretch(MS(1000), 0.0), MS(1000));
    }
}
