//! Checks for the privileges the agent needs, so a missing one is named
//! before the kernel answers with a bare `EPERM`.
use crate::{Error, Result};

/// `CAP_SYS_ADMIN`: covers BPF and perf events on kernels before 5.8.
pub const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_PERFMON` (Linux 5.8+): perf events and stack walking.
pub const CAP_PERFMON: u32 = 38;
/// `CAP_BPF` (Linux 5.8+): loading programs and creating maps.
pub const CAP_BPF: u32 = 39;

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

/// Fails with the name of the missing capability.
pub fn check() -> Result<()> {
    match effective_capabilities().and_then(missing_capability) {
        Some((what, capability)) => Err(Error::MissingPrivilege { what, capability }),
        None => Ok(()),
    }
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
