//! What one drain of the kernel maps yields, and the seam to read it.
//!
//! [`SampleSource`] is implemented by the real eBPF [`crate::sampler::Sampler`]
//! and by in-memory fakes in unit tests.
use std::collections::BTreeMap;

use profiler_common::{Counter, StackKey, COMM_LEN, NO_STACK};

use crate::{loss::KernelLoss, Result};

/// One distinct (process, stacks) with the number of times it was sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSample {
    pub tgid: u32,
    /// `comm` of the sampled thread.
    pub comm: String,
    /// User stack, leaf first, as returned by the kernel (instruction
    /// pointer, then return addresses). Empty when absent.
    pub user: Vec<u64>,
    /// Kernel stack, leaf first. Empty when absent.
    pub kernel: Vec<u64>,
    pub count: u64,
}

/// Samples drained from the idle map set.
#[derive(Clone, Debug, Default)]
pub struct RawWindow {
    pub samples: Vec<RawSample>,
    /// Samples whose key named a stack id that was not in the stack map
    /// (should not happen; counted rather than guessed).
    pub missing_stacks: u64,
    /// Samples with a stack cut at the kernel's depth limit (root frames lost).
    pub truncated_stacks: u64,
}

/// Depth at which the kernel cuts stacks (`PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

impl RawWindow {
    /// Total number of samples in the window.
    pub fn total(&self) -> u64 {
        self.samples.iter().map(|s| s.count).sum()
    }

    /// Adds another window's samples and counts to this one.
    pub fn merge(&mut self, other: RawWindow) {
        self.samples.extend(other.samples);
        self.missing_stacks += other.missing_stacks;
        self.truncated_stacks += other.truncated_stacks;
    }
}

/// Totals of the kernel-side counters since the sampler started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<Counter, u64>);

impl Counters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0.get(&counter).copied().unwrap_or(0)
    }

    /// The kernel reasons whose count is not zero, by name.
    pub fn nonzero_drops(&self) -> Vec<(&'static str, u64)> {
        KernelLoss::all()
            .map(|r| (r.name(), r.value(self)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Samples that did not end recorded, skipped or in a drop counter of
    /// lost samples. Zero unless the program has a path that loses samples
    /// silently.
    pub fn unaccounted(&self) -> u64 {
        let accounted = [
            Counter::Recorded,
            Counter::IdleSkipped,
            Counter::Filtered,
            Counter::CountMapFull,
            Counter::CountOtherError,
        ]
        .iter()
        .map(|c| self.get(*c))
        .sum::<u64>();
        self.get(Counter::Samples).saturating_sub(accounted)
    }
}

/// Something that can be drained of samples: the eBPF maps, or a fake.
pub trait SampleSource {
    /// Moves new samples to the other map set and returns what the
    /// previously active set held. Nothing sampled is lost between drains.
    fn drain(&mut self) -> Result<RawWindow>;
    /// Current totals of the kernel counters.
    fn counters(&self) -> Result<Counters>;
    /// Processes are gone: let the kernel announce these pids again if reused.
    fn forget_pids(&mut self, _pids: &[u32]) {}
}

/// Turns a map key and its stacks into a [`RawSample`].
///
/// `lookup` returns the frames of a stack id, leaf first, or `None` when the
/// id is not in the stack map.
pub fn decode_key(
    key: &StackKey,
    count: u64,
    mut lookup: impl FnMut(u32) -> Option<Vec<u64>>,
) -> (RawSample, bool) {
    let mut missing = false;
    let mut stack = |id: i32| -> Vec<u64> {
        if id == NO_STACK || id < 0 {
            return Vec::new();
        }
        match lookup(id as u32) {
            Some(frames) => frames,
            None => {
                missing = true;
                Vec::new()
            }
        }
    };
    let user = stack(key.user_stack_id);
    let kernel = stack(key.kernel_stack_id);
    (
        RawSample {
            tgid: key.tgid,
            comm: comm_to_string(&key.comm),
            user,
            kernel,
            count,
        },
        missing,
    )
}

/// Decodes a NUL-padded `comm`; invalid UTF-8 is replaced, never dropped.
pub fn comm_to_string(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(s: &str) -> [u8; COMM_LEN] {
        let mut c = [0u8; COMM_LEN];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    #[test]
    fn decodes_both_stacks() {
        let key = StackKey {
            tgid: 42,
            user_stack_id: 3,
            kernel_stack_id: 7,
            comm: comm("worker"),
        };
        let (s, missing) = decode_key(&key, 5, |id| Some(vec![id as u64 * 100, 1]));
        assert!(!missing);
        assert_eq!(s.tgid, 42);
        assert_eq!(s.comm, "worker");
        assert_eq!(s.user, vec![300, 1]);
        assert_eq!(s.kernel, vec![700, 1]);
        assert_eq!(s.count, 5);
    }

    #[test]
    fn absent_stacks_are_empty_not_missing() {
        let key = StackKey {
            tgid: 1,
            user_stack_id: NO_STACK,
            kernel_stack_id: 2,
            comm: comm("kworker/0:1"),
        };
        let (s, missing) = decode_key(&key, 1, |_| Some(vec![9]));
        assert!(!missing);
        assert!(s.user.is_empty());
        assert_eq!(s.kernel, vec![9]);
    }

    #[test]
    fn vanished_stack_is_reported() {
        let key = StackKey {
            tgid: 1,
            user_stack_id: 4,
            kernel_stack_id: NO_STACK,
            comm: comm("x"),
        };
        let (_, missing) = decode_key(&key, 1, |_| None);
        assert!(missing);
    }

    #[test]
    fn comm_handles_full_length_and_bad_utf8() {
        assert_eq!(comm_to_string(&[b'a'; COMM_LEN]), "a".repeat(COMM_LEN));
        let mut c = comm("ab");
        c[2] = 0xff;
        assert_eq!(comm_to_string(&c), "ab\u{fffd}");
    }

    #[test]
    fn nonzero_drops_lists_only_drops() {
        let mut c = Counters::default();
        c.0.insert(Counter::Samples, 100);
        c.0.insert(Counter::CountMapFull, 2);
        c.0.insert(Counter::UserStackCollision, 0);
        c.0.insert(Counter::Recorded, 90);
        c.0.insert(Counter::IdleSkipped, 8);
        assert_eq!(c.nonzero_drops(), vec![("count_map_full", 2)]);
        c.0.insert(Counter::Samples, 105);
        assert_eq!(
            c.nonzero_drops(),
            vec![("count_map_full", 2), ("unaccounted", 5)]
        );
    }
}
