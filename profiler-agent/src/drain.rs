//! What one drain of a sample source yields: raw samples (process, stacks,
//! a value of a [`SampleType`]), the window's degraded-sample counts, and
//! the kernel counters; and the decoding of a kernel map key.
//!
//! Sources implement [`crate::pipeline::SampleSource`].
use std::collections::{BTreeMap, BTreeSet};

use profiler_common::{unwind::StackEnd, Counter, StackKey, COMM_LEN, NO_STACK, NO_USER_STACK};

use crate::sample_type::SampleType;

/// One distinct (process, stacks) with its value: for [`SampleType::Cpu`]
/// the number of times it was sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSample {
    pub tgid: u32,
    /// `comm` of the sampled thread.
    pub comm: String,
    /// User stack, leaf first, as returned by the kernel (instruction
    /// pointer, then return addresses). Empty when absent.
    pub user: Vec<u64>,
    /// How the walk of the user stack ended (stack quality); `None`
    /// without a user stack.
    pub user_end: Option<StackEnd>,
    /// Kernel stack, leaf first. Empty when absent.
    pub kernel: Vec<u64>,
    /// What `value` measures.
    pub sample_type: SampleType,
    /// In the unit of `sample_type`.
    pub value: u64,
    /// Off-CPU: how the thread left the CPU (`sleeping`, `uninterruptible`,
    /// `runnable`, `other`).
    pub thread_state: Option<&'static str>,
    /// Off-CPU: the user stack (leaf first) of the thread of the same
    /// process that woke this one, when it did so in a system call; empty
    /// otherwise.
    pub waker: Vec<u64>,
}

/// Samples drained from the idle map set.
#[derive(Clone, Debug, Default)]
pub struct RawWindow {
    pub samples: Vec<RawSample>,
    /// Samples whose key named a stack id that was not in the stack map
    /// (should not happen; counted rather than guessed).
    pub missing_stacks: u64,
    /// Samples with a stack cut at the depth limit (root frames lost).
    pub truncated_stacks: u64,
    /// Samples with a user stack, by how the program's walk of it ended
    /// (stack quality: [`StackEnd::Root`] and [`StackEnd::FramePointerEnd`]
    /// reach the outermost frame, the others stopped early).
    pub user_stack_ends: BTreeMap<StackEnd, u64>,
}

/// Depth at which the kernel cuts kernel stacks (`PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

impl RawWindow {
    /// Sum of the values of one type (for [`SampleType::Cpu`], the number
    /// of samples).
    pub fn total(&self, sample_type: SampleType) -> u64 {
        self.samples
            .iter()
            .filter(|s| s.sample_type == sample_type)
            .map(|s| s.value)
            .sum()
    }

    /// The types of the samples present.
    pub fn types(&self) -> BTreeSet<SampleType> {
        self.samples.iter().map(|s| s.sample_type).collect()
    }

    /// Adds another window's samples and counts to this one.
    pub fn merge(&mut self, other: RawWindow) {
        self.samples.extend(other.samples);
        self.missing_stacks += other.missing_stacks;
        self.truncated_stacks += other.truncated_stacks;
        for (end, n) in other.user_stack_ends {
            *self.user_stack_ends.entry(end).or_default() += n;
        }
    }
}

/// Totals of the kernel-side counters since the sampler started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<Counter, u64>);

impl Counters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0.get(&counter).copied().unwrap_or(0)
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

/// Turns a map key and its stacks into a [`RawSample`] of
/// [`SampleType::Cpu`] (the kernel maps hold sample counts).
///
/// `kernel_lookup` returns the frames of a kernel stack id and
/// `user_lookup` those of a user-stack key with how its walk ended, leaf
/// first, or `None` when the stack is not in its map.
pub fn decode_key(
    key: &StackKey,
    count: u64,
    mut kernel_lookup: impl FnMut(u32) -> Option<Vec<u64>>,
    mut user_lookup: impl FnMut(u64) -> Option<(Vec<u64>, Option<StackEnd>)>,
) -> (RawSample, bool) {
    let mut missing = false;
    let (user, user_end) = if key.user_stack == NO_USER_STACK {
        (Vec::new(), None)
    } else {
        user_lookup(key.user_stack).unwrap_or_else(|| {
            missing = true;
            (Vec::new(), None)
        })
    };
    let kernel = if key.kernel_stack_id == NO_STACK || key.kernel_stack_id < 0 {
        Vec::new()
    } else {
        kernel_lookup(key.kernel_stack_id as u32).unwrap_or_else(|| {
            missing = true;
            Vec::new()
        })
    };
    (
        RawSample {
            tgid: key.tgid,
            comm: comm_to_string(&key.comm),
            user,
            user_end,
            kernel,
            sample_type: SampleType::Cpu,
            value: count,
            thread_state: None,
            waker: Vec::new(),
        },
        missing,
    )
}

/// Decodes a NUL-padded `comm`; invalid UTF-8 is replaced, never dropped.
pub fn comm_to_string(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Off-CPU recording's pauses ([`crate::kernel::guard`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuPauses {
    /// Paused now.
    pub paused: bool,
    /// Pauses so far.
    pub pauses: u64,
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
            user_stack: 3,
            kernel_stack_id: 7,
            comm: comm("worker"),
        };
        let (s, missing) = decode_key(
            &key,
            5,
            |id| Some(vec![id as u64 * 100, 1]),
            |key| Some((vec![key * 100, 1], Some(StackEnd::NoTable))),
        );
        assert!(!missing);
        assert_eq!(s.tgid, 42);
        assert_eq!(s.comm, "worker");
        assert_eq!(s.user, vec![300, 1]);
        assert_eq!(s.user_end, Some(StackEnd::NoTable));
        assert_eq!(s.kernel, vec![700, 1]);
        assert_eq!((s.sample_type, s.value), (SampleType::Cpu, 5));
    }

    #[test]
    fn absent_stacks_are_empty_not_missing() {
        let key = StackKey {
            tgid: 1,
            user_stack: NO_USER_STACK,
            kernel_stack_id: 2,
            comm: comm("kworker/0:1"),
        };
        let (s, missing) = decode_key(
            &key,
            1,
            |_| Some(vec![9]),
            |_| Some((vec![8], Some(StackEnd::Root))),
        );
        assert!(!missing);
        assert!(s.user.is_empty());
        assert_eq!(s.user_end, None);
        assert_eq!(s.kernel, vec![9]);
    }

    #[test]
    fn vanished_stack_is_reported() {
        let key = StackKey {
            tgid: 1,
            user_stack: 4,
            kernel_stack_id: NO_STACK,
            comm: comm("x"),
        };
        let (s, missing) = decode_key(&key, 1, |_| Some(vec![1]), |_| None);
        assert!(missing);
        assert_eq!(s.user_end, None);
    }

    #[test]
    fn comm_handles_full_length_and_bad_utf8() {
        assert_eq!(comm_to_string(&[b'a'; COMM_LEN]), "a".repeat(COMM_LEN));
        let mut c = comm("ab");
        c[2] = 0xff;
        assert_eq!(comm_to_string(&c), "ab\u{fffd}");
    }
}
