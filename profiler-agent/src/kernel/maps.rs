//! The maps the agent reads: the A/B map sets (count map, kernel stack map
//! and its overflow map, user-stack map each), flipped by
//! `CONFIG.active_set` and read and cleared while idle, and the per-CPU
//! counters.
//!
//! Draining: flip `CONFIG.active_set`, wait a grace period so programs that
//! read the old value finish, then read and clear the now idle set. Nothing
//! is deleted from a map the program may be writing to, and
//! `BPF_F_REUSE_STACKID` is never used (a collision is counted instead).
use std::collections::HashMap;

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, StackTraceMap},
    Ebpf,
};
use profiler_common::{
    unwind::{StackEnd, UserStack, EXACT_PC_BIT, MAX_USER_FRAMES},
    Config, Counter, StackKey, OVERFLOW_STACK_BIT,
};

use super::load::{ebpf_error, take_map};
use crate::{
    drain::{decode_key, Counters, RawWindow, MAX_STACK_DEPTH},
    Result,
};

/// A user stack's frames (leaf first) and how its walk ended.
type UserFrames = (Vec<u64>, Option<StackEnd>);

/// The map names of one set.
pub(super) struct SetNames {
    pub counts: &'static str,
    /// Kernel stacks (`bpf_get_stackid`) and their overflow map.
    pub stacks: &'static str,
    pub overflow: &'static str,
    /// User stacks the program unwound.
    pub user: &'static str,
}

/// The maps of the A and B sets.
pub(super) const MAP_SETS: [SetNames; 2] = [
    SetNames {
        counts: "COUNTS_A",
        stacks: "STACKS_A",
        overflow: "STACKS_A_OVERFLOW",
        user: "USER_STACKS_A",
    },
    SetNames {
        counts: "COUNTS_B",
        stacks: "STACKS_B",
        overflow: "STACKS_B_OVERFLOW",
        user: "USER_STACKS_B",
    },
];

/// The maps of one set, owned by the kernel source.
pub(super) struct MapSet {
    counts: PerCpuHashMap<MapData, StackKey, u64>,
    stacks: StackTraceMap<MapData>,
    overflow: StackTraceMap<MapData>,
    user: BpfHashMap<MapData, u64, UserStack>,
}

impl MapSet {
    pub(super) fn take(ebpf: &mut Ebpf, names: &SetNames) -> Result<Self> {
        Ok(Self {
            counts: take_map(ebpf, names.counts)?,
            stacks: take_map(ebpf, names.stacks)?,
            overflow: take_map(ebpf, names.overflow)?,
            user: take_map(ebpf, names.user)?,
        })
    }

    /// Frames of a user stack, leaf first, and how its walk ended.
    ///
    /// A frame the program marked exact ([`EXACT_PC_BIT`]: a signal
    /// trampoline, the code a signal interrupted) is returned one byte
    /// further, so that the symbolizer's "return address minus one" looks
    /// up the instruction itself.
    fn user_frames(&self, key: u64) -> Option<UserFrames> {
        let stack = self.user.get(&key, 0).ok()?;
        let len = (stack.len as usize).min(MAX_USER_FRAMES);
        let frames = stack.frames[..len]
            .iter()
            .map(|&ip| {
                if ip & EXACT_PC_BIT != 0 {
                    (ip & !EXACT_PC_BIT) + 1
                } else {
                    ip
                }
            })
            .collect();
        Some((frames, StackEnd::from_u32(stack.end)))
    }

    /// Frames of a stack id, leaf first; ids tagged with
    /// [`OVERFLOW_STACK_BIT`] live in the overflow map.
    fn frames(&self, id: u32) -> Option<Vec<u64>> {
        let (map, id) = if id & OVERFLOW_STACK_BIT as u32 != 0 {
            (&self.overflow, id & !(OVERFLOW_STACK_BIT as u32))
        } else {
            (&self.stacks, id)
        };
        let trace = map.get(&id, 0).ok()?;
        Some(trace.frames().iter().map(|f| f.ip).collect())
    }

    /// Reads every entry, then empties the set. Only called on the idle set.
    pub(super) fn read_and_clear(&mut self) -> Result<RawWindow> {
        let mut entries: Vec<(StackKey, u64)> = Vec::new();
        for item in self.counts.iter() {
            let (key, values) = item.map_err(|e| ebpf_error("reading a count map", e))?;
            entries.push((key, values.iter().sum()));
        }
        let mut window = RawWindow::default();
        let mut kernel: HashMap<u32, Option<Vec<u64>>> = HashMap::new();
        let mut user: HashMap<u64, Option<UserFrames>> = HashMap::new();
        for (key, count) in &entries {
            let (sample, missing) = decode_key(
                key,
                *count,
                |id| kernel.entry(id).or_insert_with(|| self.frames(id)).clone(),
                |k| user.entry(k).or_insert_with(|| self.user_frames(k)).clone(),
            );
            if missing {
                window.missing_stacks += count;
            }
            let end = sample.user_end;
            if let Some(end) = end {
                *window.user_stack_ends.entry(end).or_default() += count;
            }
            if end == Some(StackEnd::DepthLimit) || sample.kernel.len() >= MAX_STACK_DEPTH {
                window.truncated_stacks += count;
            }
            window.samples.push(sample);
        }
        let user_keys: Vec<u64> = self.user.keys().filter_map(|k| k.ok()).collect();
        for key in user_keys {
            let _ = self.user.remove(&key);
        }
        for map in [&mut self.stacks, &mut self.overflow] {
            let ids: Vec<u32> = map.stack_ids().filter_map(|id| id.ok()).collect();
            for id in ids {
                // An id already gone is fine: the goal is an empty map.
                let _ = map.remove(&id);
            }
        }
        for (key, _) in &entries {
            let _ = self.counts.remove(key);
        }
        Ok(window)
    }
}

/// Writes the program's settings (active set, filters).
pub(super) fn write_config(map: &mut Array<MapData, Config>, config: Config) -> Result<()> {
    map.set(0, config, 0)
        .map_err(|e| ebpf_error("writing CONFIG", e))
}

/// Totals of the per-CPU counters, summed over CPUs.
pub(super) fn read_counters(counters: &PerCpuArray<MapData, u64>) -> Result<Counters> {
    let mut out = Counters::default();
    for counter in Counter::ALL {
        let values = counters
            .get(&(counter as u32), 0)
            .map_err(|e| ebpf_error("reading COUNTERS", e))?;
        out.0.insert(counter, values.iter().sum());
    }
    Ok(out)
}
