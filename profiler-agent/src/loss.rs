//! The ways a sample is lost or degraded, one enum per stage of the agent:
//! the kernel program ([`KernelLoss`], over `profiler_common::Counter`), the
//! drain ([`DrainLoss`]), process metadata ([`ProcessLoss`]) and the
//! symbolizer ([`SymbolizerDegrade`]); the exporter's drops are
//! `crate::export`'s. Each reason's name is defined here once and is the
//! `reason` label on `/metrics`, the key of the periodic log summary and the
//! line of the exit summary.
use profiler_common::Counter;

use crate::drain::Counters;

/// Defines a reason enum with its names, `ALL` and `COUNT`. The summaries,
/// which list every stage together, name a reason `PREFIX` + its name.
macro_rules! reasons {
    (
        $(#[$meta:meta])*
        pub enum $name:ident, summarized as $prefix:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every reason, in the order summaries list them.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// Number of reasons (the length of arrays indexed by them).
            pub const COUNT: usize = Self::ALL.len();

            /// The name in metric labels, log summaries and the exit summary.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            /// The name in the log and exit summaries.
            pub const fn summary_name(self) -> &'static str {
                match self {
                    $($name::$variant => concat!($prefix, $label),)+
                }
            }

            /// Position in [`Self::ALL`].
            pub const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

reasons! {
    /// Samples kept with a stack missing or cut when the maps are drained.
    pub enum DrainLoss, summarized as "" {
        /// A key named a stack id missing from the stack map.
        StackMissingAtDrain => "stack_missing_at_drain",
        /// A stack reached the kernel's depth limit: its root frames are cut.
        StackTruncated => "stack_truncated",
    }
}

reasons! {
    /// Why frames stay unnamed for lack of process or binary metadata.
    pub enum ProcessLoss, summarized as "" {
        /// The process exited before its mappings could be read.
        ProcessGoneBeforeSnapshot => "process_gone_before_snapshot",
        /// The process cache was full.
        ProcessCacheFull => "process_cache_full",
        /// The binary cache was full.
        BinaryCacheFull => "binary_cache_full",
        /// A mapped binary could not be opened.
        BinaryOpenFailed => "binary_open_failed",
        /// Process events the kernel dropped (a full ring) or the log had no
        /// room for: a process gone before its snapshot may stay unnamed.
        ProcessEventsLost => "process_events_lost",
    }
}

reasons! {
    /// Why the symbolizer named fewer frames than it could have.
    pub enum SymbolizerDegrade, summarized as "symbolizer_" {
        /// A window's time budget ran out.
        WindowsOverBudget => "windows_over_budget",
        /// Frames left as `module+0xOFFSET` because the budget was spent.
        FramesOverBudget => "frames_over_budget",
        /// Binaries named without DWARF because of their size.
        DwarfSkippedLarge => "dwarf_skipped_large",
        /// Binaries blazesym could not read.
        BinariesUnreadable => "binaries_unreadable",
        /// Panics inside blazesym, caught.
        Panics => "panics",
    }
}

/// Whether a reason loses the sample or keeps it with less information.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The sample is not delivered (`samples_dropped_total`).
    Lost,
    /// The sample is kept with a stack or name missing or cut
    /// (`samples_degraded_total`).
    Degraded,
}

/// A sample the kernel program lost or degraded: one of its drop counters,
/// or samples it ran for that no counter accounts for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelLoss {
    /// A drop counter of the eBPF program ([`Counter::is_drop`]).
    Counter(Counter),
    /// Runs neither recorded, skipped nor counted as lost: zero unless the
    /// program has a path that loses samples silently.
    Unaccounted,
}

impl KernelLoss {
    /// Every kernel reason: the drop counters in index order, then
    /// [`KernelLoss::Unaccounted`].
    pub fn all() -> impl Iterator<Item = KernelLoss> {
        Counter::ALL
            .into_iter()
            .filter(|c| c.is_drop())
            .map(KernelLoss::Counter)
            .chain([KernelLoss::Unaccounted])
    }

    pub fn name(self) -> &'static str {
        match self {
            KernelLoss::Counter(c) => c.name(),
            KernelLoss::Unaccounted => "unaccounted",
        }
    }

    pub fn effect(self) -> Effect {
        match self {
            KernelLoss::Counter(
                Counter::CountMapFull
                | Counter::CountOtherError
                | Counter::OffCpuStartLost
                | Counter::OffCpuMapFull
                | Counter::OffCpuPaused,
            )
            | KernelLoss::Unaccounted => Effect::Lost,
            KernelLoss::Counter(_) => Effect::Degraded,
        }
    }

    /// The reasons whose count is not zero in `counters`, by name.
    pub fn nonzero(counters: &Counters) -> Vec<(&'static str, u64)> {
        Self::all()
            .map(|r| (r.name(), r.value(counters)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Its value in a reading of the kernel counters.
    pub fn value(self, counters: &Counters) -> u64 {
        match self {
            KernelLoss::Counter(c) => counters.get(c),
            KernelLoss::Unaccounted => counters.unaccounted(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_distinct_across_the_stages_that_share_a_label() {
        // `samples_degraded_total` holds kernel and drain reasons; the
        // summaries hold every stage.
        let mut seen = HashSet::new();
        let names = KernelLoss::all()
            .map(KernelLoss::name)
            .chain(DrainLoss::ALL.iter().map(|r| r.name()))
            .chain(ProcessLoss::ALL.iter().map(|r| r.name()))
            .chain(SymbolizerDegrade::ALL.iter().map(|r| r.summary_name()));
        for name in names {
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
        }
    }

    #[test]
    fn indexes_follow_all() {
        for (i, r) in SymbolizerDegrade::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(r.summary_name(), format!("symbolizer_{}", r.name()));
        }
        for (i, r) in ProcessLoss::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        assert_eq!(DrainLoss::COUNT, 2);
    }

    #[test]
    fn only_count_losses_lose_the_sample() {
        let lost: Vec<&str> = KernelLoss::all()
            .filter(|r| r.effect() == Effect::Lost)
            .map(KernelLoss::name)
            .collect();
        assert_eq!(
            lost,
            [
                "count_map_full",
                "count_other_error",
                "off_cpu_start_lost",
                "off_cpu_map_full",
                "off_cpu_paused",
                "unaccounted"
            ]
        );
    }

    #[test]
    fn nonzero_drops_lists_only_drops() {
        let mut c = Counters::default();
        c.0.insert(Counter::Samples, 100);
        c.0.insert(Counter::CountMapFull, 2);
        c.0.insert(Counter::UserStackCollision, 0);
        c.0.insert(Counter::Recorded, 90);
        c.0.insert(Counter::IdleSkipped, 8);
        assert_eq!(KernelLoss::nonzero(&c), vec![("count_map_full", 2)]);
        c.0.insert(Counter::Samples, 105);
        assert_eq!(
            KernelLoss::nonzero(&c),
            vec![("count_map_full", 2), ("unaccounted", 5)]
        );
    }
}
