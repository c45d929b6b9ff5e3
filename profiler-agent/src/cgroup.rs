//! Container attribution from `/proc/PID/cgroup`: the container id, the
//! Kubernetes pod UID, and the systemd unit, for cgroup v2 and v1 and the
//! path forms of containerd, CRI-O, Docker and the systemd and cgroupfs
//! drivers, e.g.
//!
//! - `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
//! - `/kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope`
//! - `/kubepods/burstable/pod<uid>/<id>` (cgroupfs driver)
//! - `/system.slice/docker-<id>.scope`, `/docker/<id>`
//! - `/system.slice/nginx.service` (no container: the unit is the service)

/// What a process's cgroup says about where it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Container id (hex, as the runtime reports it).
    pub container_id: Option<String>,
    /// Kubernetes pod UID (with dashes).
    pub pod_uid: Option<String>,
    /// systemd unit of a process outside containers, e.g. `nginx.service`.
    pub systemd_unit: Option<String>,
}

/// Prefixes of the scope names runtimes give containers (systemd driver).
const SCOPE_PREFIXES: &[&str] = &[
    "cri-containerd-",
    "crio-",
    "docker-",
    "libpod-",
    "containerd-",
];

/// Container runtimes name containers with 64 hex digits; shorter hex
/// components (other sandboxes' cgroups) are not containers we can name.
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id named by one path component, if any.
fn container_id_of(component: &str) -> Option<&str> {
    if let Some(scope) = component.strip_suffix(".scope") {
        // `crio-conmon-<id>.scope` is CRI-O's monitor, not the container.
        if scope.starts_with("crio-conmon-") {
            return None;
        }
        return SCOPE_PREFIXES
            .iter()
            .find_map(|p| scope.strip_prefix(p))
            .filter(|id| is_container_id(id));
    }
    is_container_id(component).then_some(component)
}

/// The pod UID named by one path component, if any: `pod<uid>` (cgroupfs)
/// or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(component: &str) -> Option<String> {
    let raw = if let Some(slice) = component.strip_suffix(".slice") {
        slice.rsplit_once("-pod").map(|(_, uid)| uid)?
    } else {
        component.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    let valid = uid.len() >= 32 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then_some(uid)
}

/// Parses one cgroup path.
pub fn parse_path(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo::default();
    for component in path.split('/').filter(|c| !c.is_empty()) {
        if let Some(uid) = pod_uid_of(component) {
            info.pod_uid = Some(uid);
        }
        if let Some(id) = container_id_of(component) {
            info.container_id = Some(id.to_string());
        }
        if component.ends_with(".service") {
            info.systemd_unit = Some(component.to_string());
        }
    }
    if info.container_id.is_some() {
        // Inside a container the unit (e.g. containerd.service) is the host's.
        info.systemd_unit = None;
    }
    info
}

/// Parses the text of `/proc/PID/cgroup`: the cgroup v2 line (`0::/path`)
/// when there is one, else the first v1 line that names a container.
pub fn parse_proc_cgroup(text: &str) -> CgroupInfo {
    let paths: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let id = parts.next()?;
            let _controllers = parts.next()?;
            Some((id, parts.next()?))
        })
        .collect();
    let parsed: Vec<CgroupInfo> = paths.iter().map(|(_, p)| parse_path(p)).collect();
    if let Some(found) = parsed.iter().find(|i| i.container_id.is_some()) {
        return found.clone();
    }
    paths
        .iter()
        .position(|(id, _)| *id == "0")
        .map(|i| parsed[i].clone())
        .or_else(|| parsed.into_iter().find(|i| i.systemd_unit.is_some()))
        .unwrap_or_default()
}

/// The `service` label when Kubernetes says nothing: the systemd unit
/// without `.service`, else the executable's file name.
pub fn fallback_service(info: &CgroupInfo, exe: Option<&str>) -> Option<String> {
    if let Some(unit) = &info.systemd_unit {
        return Some(unit.trim_end_matches(".service").to_string());
    }
    exe.and_then(|e| e.rsplit('/').next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2b4e1c9a8d7f6e5d4c3b2a19080706f5e4d3c2b1a09f8e7d6c5b4a39281706";
    const UID: &str = "6a1f1e3c-2b4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn info(id: Option<&str>, uid: Option<&str>, unit: Option<&str>) -> CgroupInfo {
        CgroupInfo {
            container_id: id.map(str::to_string),
            pod_uid: uid.map(str::to_string),
            systemd_unit: unit.map(str::to_string),
        }
    }

    #[test]
    fn real_world_paths() {
        let u = UID.replace('-', "_");
        let cases = [
            // containerd, systemd driver, cgroup v2
            (format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n"), info(Some(ID), Some(UID), None)),
            // guaranteed QoS: no QoS slice
            (format!("0::/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope\n"), info(Some(ID), Some(UID), None)),
            // CRI-O
            (format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{ID}.scope\n"), info(Some(ID), Some(UID), None)),
            // CRI-O's conmon is not the container
            (format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-conmon-{ID}.scope\n"), info(None, Some(UID), None)),
            // cgroupfs driver, cgroup v1 (several hierarchies)
            (format!("12:pids:/kubepods/burstable/pod{UID}/{ID}\n11:memory:/kubepods/burstable/pod{UID}/{ID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n"), info(Some(ID), Some(UID), None)),
            (format!("4:cpu,cpuacct:/kubepods/pod{UID}/{ID}\n"), info(Some(ID), Some(UID), None)),
            // Docker, systemd driver and cgroupfs
            (format!("0::/system.slice/docker-{ID}.scope\n"), info(Some(ID), None, None)),
            (format!("9:devices:/docker/{ID}\n0::/\n"), info(Some(ID), None, None)),
            // podman
            (format!("0::/machine.slice/libpod-{ID}.scope/container\n"), info(Some(ID), None, None)),
            // what an agent in its own cgroup namespace reads for another pod
            (format!("0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope\n"), info(Some(ID), Some(UID), None)),
            // a plain systemd service, and a login session
            ("0::/system.slice/nginx.service\n".to_string(), info(None, None, Some("nginx.service"))),
            ("0::/user.slice/user-1000.slice/session-3.scope\n".to_string(), info(None, None, None)),
            ("".to_string(), info(None, None, None)),
            ("garbage without colons\n".to_string(), info(None, None, None)),
            // another sandbox's 32-hex cgroup is not a container id
            ("4:memory:/process_api/239566cbbe0affabf768bf990a962566\n0::/\n".to_string(), info(None, None, None)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_proc_cgroup(&text), want, "{text}");
        }
    }

    #[test]
    fn service_falls_back_to_unit_then_exe() {
        let unit = info(None, None, Some("postgresql@15-main.service"));
        assert_eq!(
            fallback_service(&unit, Some("/usr/bin/x")).as_deref(),
            Some("postgresql@15-main")
        );
        let none = CgroupInfo::default();
        assert_eq!(
            fallback_service(&none, Some("/usr/sbin/nginx")).as_deref(),
            Some("nginx")
        );
        assert_eq!(fallback_service(&none, None), None);
    }

    #[test]
    fn own_cgroup_parses() {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        // Whatever this machine runs in, parsing never fails.
        let _ = parse_proc_cgroup(&text);
    }
}
