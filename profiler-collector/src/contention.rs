//! The lock-contention view: off-CPU time spent waiting in a futex (the
//! kernel's wait behind pthread mutexes, condition variables, Go's runtime
//! locks, Rust's `std::sync`), grouped by the user stack that waited, with
//! the function that asked for the lock named as the lock site, and, where
//! the agent saw who woke the waiting thread (a thread of the same process
//! releasing the lock: the `[woken by]` part of a stack), the holders'
//! sites; and, from the CPU profile, the share of Go's on-CPU lock spinning.
use std::collections::HashMap;

use serde::Serialize;

use profiler_proto::frames;

use crate::model::Profile;

/// Kernel frames end in this (the agent's naming).
const KERNEL_SUFFIX: &str = "_[k]";

/// A lock site: the user stack that waited, and how long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockSite {
    /// The innermost user function outside the locking code (pthread,
    /// libc's futex wrappers, Go's and Rust's lock internals): the one that
    /// asked for the lock.
    pub site: String,
    /// The user frames, root first (process name left out).
    pub stack: Vec<String>,
    /// Time waited, in the profile's unit (nanoseconds).
    pub wait: u64,
    /// Where the lock was released to these waits, by the time they waited,
    /// most first (waits without a known waker are not in it).
    pub holders: Vec<Holder>,
}

/// The site where a lock holder woke waiting threads: its innermost
/// function outside the locking code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub site: String,
    /// The holder's user frames, root first.
    pub stack: Vec<String>,
    /// Time the threads it woke had waited.
    pub wait: u64,
}

/// Holders kept per lock site.
const HOLDERS_PER_SITE: usize = 5;

/// The contention view of an off-CPU profile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Contention {
    /// All off-CPU time of the selection.
    pub total: u64,
    /// The part of it waiting in a futex.
    pub futex_wait: u64,
    /// Lock sites by time waited, most first.
    pub sites: Vec<LockSite>,
    /// Time waited per site function (sites with several stacks summed),
    /// most first.
    pub functions: Vec<(String, u64)>,
    /// The part of `futex_wait` whose waker is known.
    pub woken_known: u64,
    /// Time waited per holder site function, most first.
    pub holder_functions: Vec<(String, u64)>,
}

/// Whether a kernel frame is a futex wait (`futex_wait`,
/// `futex_wait_queue`, `__futex_wait`, `do_futex`…).
fn is_futex_frame(frame: &str) -> bool {
    frame
        .strip_suffix(KERNEL_SUFFIX)
        .is_some_and(|name| name.contains("futex"))
}

/// Whether a user frame belongs to the locking code rather than to the
/// program that asked for the lock.
pub fn is_lock_internal(frame: &str) -> bool {
    // Inlined frames end in `_[i]`.
    let f = frame.trim_end_matches("_[i]").to_ascii_lowercase();
    const INTERNALS: [&str; 13] = [
        "pthread_mutex",
        "pthread_cond",
        "pthread_rwlock",
        "lll_",
        "futex",
        "sem_wait",
        "__gi___",
        "std::sys::sync",
        "parking_lot",
        "runtime.lock",
        "runtime.notesleep",
        "sync.(*mutex)",
        "sync.(*rwmutex)",
    ];
    f.starts_with("__")
        || f.starts_with("[stack cut")
        || f == "syscall"
        || INTERNALS.iter().any(|i| f.contains(i))
}

/// The contention view of `profile` (an `off_cpu` profile): its futex
/// waits by user stack, the `n` longest.
pub fn contention(profile: &Profile, n: usize) -> Contention {
    let mut out = Contention {
        total: profile.total(),
        ..Contention::default()
    };
    type Waits<'a> = (u64, HashMap<Vec<&'a str>, u64>);
    let mut by_stack: HashMap<Vec<&str>, Waits> = HashMap::new();
    let mut holder_functions: HashMap<String, u64> = HashMap::new();
    for (stack, value) in &profile.stacks {
        let (waited, waker) = frames::split_woken_by(stack);
        let frames: Vec<&str> = waited.split(';').skip(1).collect();
        if !frames.iter().any(|f| is_futex_frame(f)) {
            continue;
        }
        out.futex_wait = out.futex_wait.saturating_add(*value);
        let user: Vec<&str> = frames
            .into_iter()
            .filter(|f| !f.ends_with(KERNEL_SUFFIX))
            .collect();
        let entry = by_stack.entry(user).or_default();
        entry.0 = entry.0.saturating_add(*value);
        if let Some(waker) = waker {
            // Leaf first after the marker: root first here.
            let mut holder: Vec<&str> = waker.split(';').filter(|f| !f.is_empty()).collect();
            holder.reverse();
            out.woken_known = out.woken_known.saturating_add(*value);
            let total = holder_functions.entry(site_of(&holder)).or_default();
            *total = total.saturating_add(*value);
            let wait = entry.1.entry(holder).or_default();
            *wait = wait.saturating_add(*value);
        }
    }
    let mut functions: HashMap<String, u64> = HashMap::new();
    let mut sites: Vec<LockSite> = by_stack
        .into_iter()
        .map(|(stack, (wait, holders))| {
            let site = site_of(&stack);
            let entry = functions.entry(site.clone()).or_default();
            *entry = entry.saturating_add(wait);
            let mut holders: Vec<Holder> = holders
                .into_iter()
                .map(|(stack, wait)| Holder {
                    site: site_of(&stack),
                    stack: stack.into_iter().map(str::to_string).collect(),
                    wait,
                })
                .collect();
            holders.sort_by(|a, b| b.wait.cmp(&a.wait).then_with(|| a.stack.cmp(&b.stack)));
            holders.truncate(HOLDERS_PER_SITE);
            LockSite {
                site,
                stack: stack.into_iter().map(str::to_string).collect(),
                wait,
                holders,
            }
        })
        .collect();
    sites.sort_by(|a, b| b.wait.cmp(&a.wait).then_with(|| a.stack.cmp(&b.stack)));
    sites.truncate(n);
    out.sites = sites;
    let mut functions: Vec<(String, u64)> = functions.into_iter().collect();
    functions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    functions.truncate(n);
    out.functions = functions;
    let mut holder_functions: Vec<(String, u64)> = holder_functions.into_iter().collect();
    holder_functions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    holder_functions.truncate(n);
    out.holder_functions = holder_functions;
    out
}

/// The innermost function of a user stack (root first) outside the
/// locking code.
fn site_of(stack: &[&str]) -> String {
    stack
        .iter()
        .rev()
        .find(|f| !is_lock_internal(f))
        .or(stack.last())
        .map_or_else(|| "[unknown]".to_string(), |f| f.to_string())
}

/// Go's on-CPU signs of lock contention (spinning and handing off before
/// or instead of sleeping), by function: self value in a CPU profile.
pub fn go_lock_spin(profile: &Profile) -> Vec<(String, u64)> {
    const SPIN: [&str; 5] = [
        "runtime.lock2",
        "runtime.procyield",
        "sync.(*Mutex).lockSlow",
        "sync.(*RWMutex).RLock",
        "runtime.futex",
    ];
    let mut by: HashMap<String, u64> = HashMap::new();
    for (stack, value) in &profile.stacks {
        let Some(leaf) = stack.rsplit(';').find(|f| !f.ends_with(KERNEL_SUFFIX)) else {
            continue;
        };
        if let Some(name) = SPIN.iter().find(|s| leaf == **s) {
            let entry = by.entry(name.to_string()).or_default();
            *entry = entry.saturating_add(*value);
        }
    }
    let mut out: Vec<(String, u64)> = by.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(stacks: &[(&str, u64)]) -> Profile {
        Profile::of(stacks.iter().copied())
    }

    #[test]
    fn futex_waits_are_grouped_by_the_function_that_asked_for_the_lock() {
        let p = profile(&[
            (
                "app;main;worker;take_lock;___pthread_mutex_lock;__lll_lock_wait;entry_SYSCALL_64_[k];__x64_sys_futex_[k];futex_wait_[k];schedule_[k]",
                700,
            ),
            (
                "app;main;other;take_lock;pthread_mutex_lock;lll_mutex_lock_optimized_[i];__lll_lock_wait;futex_wait_[i];futex_wait_queue_[k]",
                200,
            ),
            (
                "app;main;flush;pthread_cond_wait;__futex_abstimed_wait_common;futex_wait_[k]",
                50,
            ),
            ("app;main;nap;__GI___clock_nanosleep;do_nanosleep_[k]", 1000),
        ]);
        let c = contention(&p, 10);
        assert_eq!(c.total, 1950);
        assert_eq!(c.futex_wait, 950, "the nanosleep is not a lock wait");
        let sites: Vec<(&str, u64)> = c.sites.iter().map(|s| (s.site.as_str(), s.wait)).collect();
        assert_eq!(
            sites,
            [("take_lock", 700), ("take_lock", 200), ("flush", 50)]
        );
        assert_eq!(
            c.functions,
            [("take_lock".to_string(), 900), ("flush".to_string(), 50)]
        );
        assert_eq!(c.sites[0].stack[..3], ["main", "worker", "take_lock"]);
        assert_eq!(contention(&p, 1).sites.len(), 1);
        assert_eq!(c.woken_known, 0);
        assert!(c.sites.iter().all(|s| s.holders.is_empty()));
    }

    #[test]
    fn wakers_name_the_holders_site() {
        let wait = "app;main;worker;take_lock;pthread_mutex_lock;__lll_lock_wait;futex_wait_[k]";
        let p = profile(&[
            (
                &format!("{wait};[woken by];__lll_unlock_wake;pthread_mutex_unlock;hold_lock;worker;main"),
                600,
            ),
            (
                &format!("{wait};[woken by];__lll_unlock_wake;pthread_mutex_unlock;flush;main"),
                100,
            ),
            (wait, 50),
            (
                "app;main;nap;do_nanosleep_[k];[woken by];futex_wake;main",
                1000,
            ),
        ]);
        let c = contention(&p, 10);
        assert_eq!(c.futex_wait, 750);
        assert_eq!(c.woken_known, 700);
        assert_eq!(
            c.sites.len(),
            1,
            "the waker's frames do not make a new lock site"
        );
        let site = &c.sites[0];
        assert_eq!((site.site.as_str(), site.wait), ("take_lock", 750));
        let holders: Vec<(&str, u64)> = site
            .holders
            .iter()
            .map(|h| (h.site.as_str(), h.wait))
            .collect();
        assert_eq!(holders, [("hold_lock", 600), ("flush", 100)]);
        assert_eq!(
            site.holders[0].stack,
            [
                "main",
                "worker",
                "hold_lock",
                "pthread_mutex_unlock",
                "__lll_unlock_wake"
            ]
        );
        assert_eq!(
            c.holder_functions,
            [("hold_lock".to_string(), 600), ("flush".to_string(), 100)]
        );
    }

    #[test]
    fn go_spinning_is_counted_by_its_leaf() {
        let p = profile(&[
            (
                "svc;main.handler;sync.(*Mutex).Lock;sync.(*Mutex).lockSlow",
                30,
            ),
            ("svc;runtime.mcall;runtime.schedule;runtime.lock2", 20),
            ("svc;main.handler;main.compute", 100),
            ("svc;runtime.lock2;runtime.procyield", 5),
        ]);
        assert_eq!(
            go_lock_spin(&p),
            [
                ("sync.(*Mutex).lockSlow".to_string(), 30),
                ("runtime.lock2".to_string(), 20),
                ("runtime.procyield".to_string(), 5)
            ]
        );
    }
}
