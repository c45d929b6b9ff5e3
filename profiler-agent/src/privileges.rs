//! Checks for the privileges the agent needs, so a missing one is named
//! before the kernel answers with a bare `EPERM`.
use crate::{Error, Result};

/// `CAP_SYS_ADMIN`: covers BPF and perf events on kernels before 5.8.
pub const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_DAC_OVERRIDE`: read any file (implies what DAC_READ_SEARCH gives).
pub const CAP_DAC_OVERRIDE: u32 = 1;
/// `CAP_DAC_READ_SEARCH`: read binaries that are not world-readable.
pub const CAP_DAC_READ_SEARCH: u32 = 2;
/// `CAP_SYS_PTRACE`: open the binaries of other users' processes.
pub const CAP_SYS_PTRACE: u32 = 19;
/// `CAP_SYSLOG`: real addresses in `/proc/kallsyms` (kernel frame names).
pub const CAP_SYSLOG: u32 = 34;
/// `CAP_CHECKPOINT_RESTORE` (Linux 5.9+): opening `/proc/PID/map_files/`.
pub const CAP_CHECKPOINT_RESTORE: u32 = 40;
/// `CAP_PERFMON` (Linux 5.8+): perf events and stack walking.
pub const CAP_PERFMON: u32 = 38;
/// `CAP_BPF` (Linux 5.8+): loading programs and creating maps.
pub const CAP_BPF: u32 = 39;

/// Capabilities still used once the programs are loaded and attached: map
/// operations on the fds we hold (`CAP_BPF`, while the kernel disallows
/// unprivileged `bpf()`), and reading other processes' files and kallsyms.
const KEPT_AFTER_ATTACH: &[caps::Capability] = &[
    caps::Capability::CAP_BPF,
    caps::Capability::CAP_SYS_PTRACE,
    caps::Capability::CAP_CHECKPOINT_RESTORE,
    caps::Capability::CAP_SYSLOG,
    caps::Capability::CAP_DAC_READ_SEARCH,
];

/// After load and attach: drops every capability not in
/// `KEPT_AFTER_ATTACH` from the effective, permitted, inheritable, ambient
/// and bounding sets, and returns the names of those kept.
pub fn drop_unneeded() -> Result<Vec<String>> {
    use caps::CapSet;
    let permitted = caps::read(None, CapSet::Permitted)
        .map_err(|e| Error::InvalidArgument(format!("reading capabilities: {e}")))?;
    let keep: caps::CapsHashSet = KEPT_AFTER_ATTACH
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    let fail = |what: &str, e: caps::errors::CapsError| {
        Error::InvalidArgument(format!("dropping capabilities ({what}): {e}"))
    };
    for cap in caps::all() {
        if !keep.contains(&cap) {
            // The bounding set needs CAP_SETPCAP; without it, the permitted
            // set (below) is what matters.
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| fail("ambient", e))?;
    caps::set(None, CapSet::Inheritable, &caps::CapsHashSet::new())
        .map_err(|e| fail("inheritable", e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| fail("effective", e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| fail("permitted", e))?;
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    Ok(names)
}

/// Effective capability set of this process, from `/proc/self/status`.
pub fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

/// Parses the `CapEff:` line of a `/proc/PID/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Names the first capability missing from `caps` for loading and
/// attaching the profiler, if any.
pub fn missing_capability(caps: u64) -> Option<(&'static str, &'static str)> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return None;
    }
    if !has(CAP_BPF) {
        return Some(("loading the eBPF program", "CAP_BPF"));
    }
    if !has(CAP_PERFMON) {
        return Some(("sampling every CPU with perf events", "CAP_PERFMON"));
    }
    None
}

/// Capabilities whose absence degrades the profile without stopping it:
/// (capability, what is lost).
pub fn degraded_without(caps: u64) -> Vec<(&'static str, &'static str)> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYSLOG) {
        missing.push((
            "CAP_SYSLOG",
            "kallsyms shows no addresses: kernel frames stay unnamed",
        ));
    }
    if !has(CAP_SYS_ADMIN) && !has(CAP_CHECKPOINT_RESTORE) {
        missing.push((
            "CAP_CHECKPOINT_RESTORE",
            "/proc/PID/map_files is closed: deleted binaries and exited containers resolve less often",
        ));
    }
    if !has(CAP_SYS_PTRACE) {
        missing.push((
            "CAP_SYS_PTRACE",
            "binaries of other users' processes cannot be opened: their frames stay unnamed",
        ));
    }
    if !has(CAP_DAC_READ_SEARCH) && !has(CAP_DAC_OVERRIDE) {
        missing.push((
            "CAP_DAC_READ_SEARCH",
            "binaries that are not world-readable cannot be read: their frames stay unnamed",
        ));
    }
    missing
}

/// Fails with the name of the missing capability; warns about those whose
/// absence only degrades the profile.
pub fn check() -> Result<()> {
    let Some(caps) = effective_capabilities() else {
        return Ok(());
    };
    if let Some((what, capability)) = missing_capability(caps) {
        return Err(Error::MissingPrivilege { what, capability });
    }
    for (capability, lost) in degraded_without(caps) {
        tracing::warn!("without {capability}: {lost}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_missing_capability() {
        assert_eq!(
            missing_capability(0),
            Some(("loading the eBPF program", "CAP_BPF"))
        );
        assert_eq!(
            missing_capability(1 << CAP_BPF),
            Some(("sampling every CPU with perf events", "CAP_PERFMON"))
        );
        assert_eq!(
            missing_capability((1 << CAP_BPF) | (1 << CAP_PERFMON)),
            None
        );
        assert_eq!(missing_capability(1 << CAP_SYS_ADMIN), None);
    }

    #[test]
    fn names_capabilities_that_only_degrade() {
        let all = u64::MAX;
        assert!(degraded_without(all).is_empty());
        let no_syslog = all & !(1 << CAP_SYSLOG);
        assert_eq!(degraded_without(no_syslog)[0].0, "CAP_SYSLOG");
        let minimal = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        let names: Vec<_> = degraded_without(minimal).iter().map(|d| d.0).collect();
        assert_eq!(
            names,
            vec![
                "CAP_SYSLOG",
                "CAP_CHECKPOINT_RESTORE",
                "CAP_SYS_PTRACE",
                "CAP_DAC_READ_SEARCH"
            ]
        );
    }

    #[test]
    fn parses_status() {
        let status = "Name:\tx\nCapPrm:\t0\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x"), None);
        let err = Error::MissingPrivilege {
            what: "loading the eBPF program",
            capability: "CAP_BPF",
        };
        assert!(err.to_string().contains("CAP_BPF"));
    }
}
