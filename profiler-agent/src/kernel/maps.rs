//! The maps the agent reads: the A/B map sets (count map, off-CPU map,
//! kernel stack map and its overflow map, user-stack map each), flipped by
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
    thread_state,
    unwind::{StackEnd, UserStack, EXACT_PC_BIT, MAX_USER_FRAMES},
    Config, Counter, OffCpuKey, StackKey, OVERFLOW_STACK_BIT,
};

use super::load::{ebpf_error, take_map};
use crate::{
    config::OffCpuOptions,
    drain::{decode_key, Counters, RawWindow, MAX_STACK_DEPTH},
    sample_type::SampleType,
    Result,
};

/// A user stack's frames (leaf first) and how its walk ended.
type UserFrames = (Vec<u64>, Option<StackEnd>);

/// The map names of one set.
pub(super) struct SetNames {
    pub counts: &'static str,
    /// Off-CPU nanoseconds.
    pub off_cpu: &'static str,
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
        off_cpu: "OFF_CPU_A",
        stacks: "STACKS_A",
        overflow: "STACKS_A_OVERFLOW",
        user: "USER_STACKS_A",
    },
    SetNames {
        counts: "COUNTS_B",
        off_cpu: "OFF_CPU_B",
        stacks: "STACKS_B",
        overflow: "STACKS_B_OVERFLOW",
        user: "USER_STACKS_B",
    },
];

/// The maps of one set, owned by the kernel source.
pub(super) struct MapSet {
    counts: PerCpuHashMap<MapData, StackKey, u64>,
    off_cpu: PerCpuHashMap<MapData, OffCpuKey, u64>,
    stacks: StackTraceMap<MapData>,
    overflow: StackTraceMap<MapData>,
    user: BpfHashMap<MapData, u64, UserStack>,
}

impl MapSet {
    pub(super) fn take(ebpf: &mut Ebpf, names: &SetNames) -> Result<Self> {
        Ok(Self {
            counts: take_map(ebpf, names.counts)?,
            off_cpu: take_map(ebpf, names.off_cpu)?,
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
        stack_frames(&self.user, key)
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
    /// Off-CPU times (when `off_cpu` is on) are scaled back for the
    /// switches it left out; their stacks are in `stacks`.
    pub(super) fn read_and_clear(
        &mut self,
        off_cpu: Option<(&OffCpuOptions, &OffCpuStacks)>,
    ) -> Result<RawWindow> {
        let mut entries: Vec<(StackKey, u64)> = Vec::new();
        for item in self.counts.iter() {
            let (key, values) = item.map_err(|e| ebpf_error("reading a count map", e))?;
            entries.push((key, values.iter().sum()));
        }
        let mut times: Vec<(OffCpuKey, u64)> = Vec::new();
        if off_cpu.is_some() {
            for item in self.off_cpu.iter() {
                let (key, values) = item.map_err(|e| ebpf_error("reading an off-CPU map", e))?;
                times.push((key, values.iter().sum()));
            }
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
        // Off-CPU times: stack quality and the sample counts above are
        // about CPU samples; a lost stack here shows as a shorter stack.
        if let Some((options, stacks)) = off_cpu {
            let mut kernel_waits: HashMap<u64, Vec<u64>> = HashMap::new();
            let mut user_waits: HashMap<u64, Option<UserFrames>> = HashMap::new();
            for (key, ns) in &times {
                let stack = StackKey {
                    tgid: key.tgid,
                    kernel_stack_id: profiler_common::NO_STACK,
                    user_stack: key.user_stack,
                    comm: key.comm,
                };
                let (mut sample, _) = decode_key(
                    &stack,
                    *ns,
                    |_| None,
                    |k| {
                        user_waits
                            .entry(k)
                            .or_insert_with(|| stack_frames(&stacks.user, k))
                            .clone()
                    },
                );
                if key.kernel_stack != 0 {
                    sample.kernel = kernel_waits
                        .entry(key.kernel_stack)
                        .or_insert_with(|| {
                            // Kernel addresses as they are: their top bit
                            // is not `EXACT_PC_BIT`.
                            stacks
                                .kernel
                                .get(&key.kernel_stack, 0)
                                .map(|s| s.frames[..(s.len as usize).min(MAX_USER_FRAMES)].to_vec())
                                .unwrap_or_default()
                        })
                        .clone();
                }
                if key.waker_stack != profiler_common::NO_USER_STACK {
                    sample.waker = user_waits
                        .entry(key.waker_stack)
                        .or_insert_with(|| stack_frames(&stacks.user, key.waker_stack))
                        .clone()
                        .map(|(frames, _)| frames)
                        .unwrap_or_default();
                }
                sample.sample_type = SampleType::OffCpu;
                sample.value = options.scale(*ns);
                sample.thread_state = Some(thread_state::name(key.state));
                window.samples.push(sample);
            }
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
        for (key, _) in &times {
            let _ = self.off_cpu.remove(key);
        }
        Ok(window)
    }
}

/// The stacks of off-CPU waits (`OFF_CPU_USER_STACKS`,
/// `OFF_CPU_KERNEL_STACKS`): shared by both sets and never cleared (least
/// recently used entries go), as a wait can span windows.
pub(super) struct OffCpuStacks {
    pub user: BpfHashMap<MapData, u64, UserStack>,
    pub kernel: BpfHashMap<MapData, u64, UserStack>,
}

/// Frames of a stack in a user-stack map (leaf first) and how its walk
/// ended. A frame the program marked exact ([`EXACT_PC_BIT`]: a signal
/// trampoline, the code a signal interrupted) is returned one byte
/// further, so that the symbolizer's "return address minus one" looks up
/// the instruction itself.
fn stack_frames(map: &BpfHashMap<MapData, u64, UserStack>, key: u64) -> Option<UserFrames> {
    let stack = map.get(&key, 0).ok()?;
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

/// Writes the program's settings (active set, filters).
pub(super) fn write_config(map: &mut Array<MapData, Config>, config: Config) -> Result<()> {
    map.set(0, config, 0)
        .map_err(|e| ebpf_error("writing CONFIG", e))
}

/// Totals of the per-CPU counters, summed over CPUs.
///
/// The programs bump a total (`Samples`, `OffCpuSwitches`) before the
/// outcome it ends in, and totals have lower indices than their outcomes;
/// reading from the highest index down reads every outcome before its total,
/// so a snapshot taken while the programs run never has more outcomes than
/// events.
pub(super) fn read_counters(counters: &PerCpuArray<MapData, u64>) -> Result<Counters> {
    let mut out = Counters::default();
    for counter in Counter::ALL.into_iter().rev() {
        let values = counters
            .get(&(counter as u32), 0)
            .map_err(|e| ebpf_error("reading COUNTERS", e))?;
        out.0.insert(counter, values.iter().sum());
    }
    Ok(out)
}
