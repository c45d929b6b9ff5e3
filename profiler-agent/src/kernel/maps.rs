//! The maps the agent reads: the A/B map sets (count map, stack map and
//! overflow stack map each), flipped by `CONFIG.active_set` and read and
//! cleared while idle, and the per-CPU counters.
//!
//! Draining: flip `CONFIG.active_set`, wait a grace period so programs that
//! read the old value finish, then read and clear the now idle set. Nothing
//! is deleted from a map the program may be writing to, and
//! `BPF_F_REUSE_STACKID` is never used (a collision is counted instead).
use std::collections::HashMap;

use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap, StackTraceMap},
    Ebpf,
};
use profiler_common::{Config, Counter, StackKey, OVERFLOW_STACK_BIT};

use super::load::{ebpf_error, take_map};
use crate::{
    drain::{decode_key, Counters, RawWindow, MAX_STACK_DEPTH},
    Result,
};

/// (count map, main stack map, overflow stack map) of the A and B sets.
pub(super) const MAP_SETS: [(&str, &str, &str); 2] = [
    ("COUNTS_A", "STACKS_A", "STACKS_A_OVERFLOW"),
    ("COUNTS_B", "STACKS_B", "STACKS_B_OVERFLOW"),
];

/// The maps of one set, owned by the kernel source.
pub(super) struct MapSet {
    counts: PerCpuHashMap<MapData, StackKey, u64>,
    stacks: StackTraceMap<MapData>,
    overflow: StackTraceMap<MapData>,
}

impl MapSet {
    pub(super) fn take(
        ebpf: &mut Ebpf,
        (counts, stacks, overflow): (&str, &str, &str),
    ) -> Result<Self> {
        Ok(Self {
            counts: take_map(ebpf, counts)?,
            stacks: take_map(ebpf, stacks)?,
            overflow: take_map(ebpf, overflow)?,
        })
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
        let mut cache: HashMap<u32, Option<Vec<u64>>> = HashMap::new();
        for (key, count) in &entries {
            let (sample, missing) = decode_key(key, *count, |id| {
                cache.entry(id).or_insert_with(|| self.frames(id)).clone()
            });
            if missing {
                window.missing_stacks += count;
            }
            if sample.user.len() >= MAX_STACK_DEPTH || sample.kernel.len() >= MAX_STACK_DEPTH {
                window.truncated_stacks += count;
            }
            window.samples.push(sample);
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
