//! The wall view: where a selection's threads spent their time, on the CPU
//! and off it, on one axis in nanoseconds. CPU samples count as the period
//! they stand for (1 s / the sampling frequency); off-CPU waits as the time
//! they lasted (their waker's frames, after `[woken by]`, left out: that
//! time is the waiting thread's). Select one thread (`thread="worker"`, or
//! `process=` for a single-threaded one) for a per-thread timeline of
//! where its wall-clock time went.
use profiler_proto::frames;

use crate::model::{Profile, CPU, OFF_CPU};

/// The view's name where a sample type is expected (`type=wall`).
pub const WALL: &str = "wall";
/// Its unit.
pub const WALL_UNIT: &str = "nanoseconds";

/// The wall profile of `cpu` (samples taken at `frequencies`, the distinct
/// CPU sampling frequencies of the range) and `off_cpu` (nanoseconds).
pub fn wall(cpu: &Profile, off_cpu: &Profile, frequencies: &[u32]) -> Result<Profile, String> {
    if cpu.stacks.is_empty() || off_cpu.stacks.is_empty() {
        let missing = if cpu.stacks.is_empty() { CPU } else { OFF_CPU };
        return Err(format!(
            "the wall view needs both {CPU} and {OFF_CPU} samples in the selection; \
             it has no {missing} samples"
        ));
    }
    let frequency = match frequencies {
        [one] if *one > 0 => u128::from(*one),
        [] => return Err("the range has no CPU sampling frequency".to_string()),
        several => {
            let list: Vec<String> = several.iter().map(u32::to_string).collect();
            return Err(format!(
                "the wall view needs one CPU sampling frequency in the range, it has {} Hz: \
                 choose a range (or agents) sampled at one frequency",
                list.join(", ")
            ));
        }
    };
    let mut wall = Profile::default();
    for (stack, samples) in &cpu.stacks {
        let ns = u128::from(*samples) * 1_000_000_000 / frequency;
        wall.add(stack, ns.min(u128::from(u64::MAX)) as u64);
    }
    for (stack, ns) in &off_cpu.stacks {
        wall.add(frames::waited_part(stack), *ns);
    }
    Ok(wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_samples_and_waits_share_one_axis() {
        let cpu = Profile::of([("app;main;work", 50), ("app;main;parse", 10)]);
        let off = Profile::of([
            ("app;main;work;futex_wait_[k]", 300_000_000),
            (
                "app;main;work;futex_wait_[k];[woken by];unlock;hold;main",
                200_000_000,
            ),
            ("app;main;nap;do_nanosleep_[k]", 100_000_000),
        ]);
        let w = wall(&cpu, &off, &[100]).unwrap();
        // 50 samples at 100 Hz: 0.5 s.
        assert_eq!(w.stacks["app;main;work"], 500_000_000);
        assert_eq!(w.stacks["app;main;parse"], 100_000_000);
        assert_eq!(
            w.stacks["app;main;work;futex_wait_[k]"], 500_000_000,
            "waits with and without a known waker are the same time of the thread"
        );
        assert_eq!(w.total(), 1_200_000_000);
    }

    #[test]
    fn it_refuses_what_it_cannot_put_on_one_axis() {
        let cpu = Profile::of([("app;main", 1)]);
        let off = Profile::of([("app;main;do_nanosleep_[k]", 1)]);
        let err = wall(&cpu, &off, &[19, 99]).unwrap_err();
        assert!(err.contains("19, 99 Hz"), "{err}");
        let err = wall(&cpu, &Profile::default(), &[19]).unwrap_err();
        assert!(err.contains("no off_cpu samples"), "{err}");
        assert!(wall(&Profile::default(), &off, &[19]).is_err());
    }
}
