//! Waiting for an observable state (a metric, a log line, a file, a port)
//! with a deadline, instead of sleeping for a guessed time.
use std::time::{Duration, Instant};

/// How often a condition is checked.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it returns `Some`, and returns that value; `None` once
/// `timeout` has passed (for a state that may legitimately not come, or a
/// caller that must not panic, such as a `Drop`).
pub fn within<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = cond() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `cond` until it returns `Some`, and returns that value; panics with
/// `what` (what was awaited) once `timeout` has passed.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, cond: impl FnMut() -> Option<T>) -> T {
    match within(timeout, cond) {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting until {what}"),
    }
}

/// Polls `cond` until it holds; panics with `what` once `timeout` has passed.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_the_condition_holds() {
        let started = Instant::now();
        let mut n = 0;
        let got = wait_for(Duration::from_secs(5), "three polls", || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(got, 3);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn within_gives_up_at_the_deadline() {
        let started = Instant::now();
        assert_eq!(within(Duration::from_millis(50), || None::<()>), None);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    #[should_panic(expected = "waiting until never")]
    fn fails_at_the_deadline() {
        wait_until(Duration::from_millis(50), "never", || false);
    }
}
