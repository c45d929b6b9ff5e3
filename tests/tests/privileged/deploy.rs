//! The Kubernetes deployment: manifests valid against the Kubernetes API
//! schemas (offline, `kubernetes-validate` installed by `cargo xtask
//! setup`), the agent's security properties, and the capability set it
//! declares — each capability shown to be needed by running the real agent
//! with exactly that set, and with each one removed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::support::*;

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(manifests().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .collect()
}

fn yv(v: impl Into<serde_yaml::Value>) -> serde_yaml::Value {
    v.into()
}

fn daemonset() -> serde_yaml::Value {
    documents("agent-daemonset.yaml").remove(0)
}

/// The capabilities the DaemonSet gives the agent, as `setpriv` names them.
fn declared_capabilities() -> Vec<String> {
    let ds = daemonset();
    let add =
        &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"];
    add.as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_lowercase())
        .collect()
}

/// Runs `kubernetes-validate --strict` on `files`: whether they passed, and
/// what it printed.
fn kubernetes_validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--no-warn"])
        .args(files)
        .output()
        .expect("kubernetes-validate (PyPI, installed by `cargo xtask setup`) must be on PATH");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    let (valid, text) = kubernetes_validate(&files);
    assert!(valid, "{text}");
    for kind in [
        "daemonset",
        "deployment",
        "service",
        "clusterrole",
        "clusterrolebinding",
        "serviceaccount",
        "configmap",
        "persistentvolumeclaim",
        "namespace",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}/")),
            "{kind} not validated:\n{text}"
        );
    }
    // Every manifest is part of the kustomization.
    let kustomization = std::fs::read_to_string(manifests().join("kustomization.yaml")).unwrap();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            kustomization.contains(&format!("- {name}")),
            "{name} missing from kustomization.yaml"
        );
    }
    // The validator does reject a broken manifest.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(manifests().join("agent-daemonset.yaml"))
            .unwrap()
            .replace("hostPID: true", "hostPID: true\n      hostPIDS: true"),
    )
    .unwrap();
    assert!(
        !kubernetes_validate(&[broken]).0,
        "an unknown field must fail validation"
    );
}

/// The scaled-out collector in front of ClickHouse: a kustomize overlay of
/// `deploy/kubernetes` (a sibling directory: kustomize refuses an overlay
/// inside its base), rendered with `kubectl kustomize` and validated whole.
#[test]
fn clickhouse_overlay_validates_and_scales_the_collector() {
    let overlay = manifests().join("../kubernetes-clickhouse");
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&overlay)
        .output()
        .expect("kubectl (for `kubectl kustomize`) must be on PATH");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clickhouse.yaml");
    std::fs::write(&file, &rendered).unwrap();
    let (valid, text) = kubernetes_validate(&[file]);
    assert!(valid, "{text}");
    for resource in [
        "deployment/profiler-collector",
        "service/profiler-collector",
        "service/clickhouse",
        "poddisruptionbudget/profiler-collector",
        "configmap/profiler-collector",
        "daemonset/profiler-agent",
    ] {
        assert!(
            text.contains(&format!("passed for resource {resource} ")),
            "{resource} not validated:\n{text}"
        );
    }
    // Every file of the overlay is used by it.
    let kustomization = std::fs::read_to_string(overlay.join("kustomization.yaml")).unwrap();
    for e in std::fs::read_dir(&overlay).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                kustomization.contains(&format!("path: {name}"))
                    || kustomization.contains(&format!("- {name}")),
                "{name} missing from the overlay's kustomization.yaml"
            );
        }
    }

    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .collect();
    let find = |kind: &str, name: &str| -> &serde_yaml::Value {
        docs.iter()
            .find(|d| d["kind"] == yv(kind) && d["metadata"]["name"] == yv(name))
            .unwrap_or_else(|| panic!("no {kind}/{name}"))
    };
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == yv("PersistentVolumeClaim")),
        "no SQLite volume in front of ClickHouse"
    );

    let deployment = find("Deployment", "profiler-collector");
    assert_eq!(deployment["spec"]["replicas"], yv(3));
    assert_eq!(deployment["spec"]["strategy"]["type"], yv("RollingUpdate"));
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], yv("profiler-collector"));
    for v in pod["volumes"].as_sequence().unwrap() {
        assert!(v["persistentVolumeClaim"].is_null(), "{v:?}");
    }
    let c = &pod["containers"][0];
    let env = c["env"].as_sequence().unwrap();
    let password = env
        .iter()
        .find(|e| e["name"] == yv("PROFILER_CLICKHOUSE_PASSWORD"))
        .expect("PROFILER_CLICKHOUSE_PASSWORD");
    assert_eq!(
        password["valueFrom"]["secretKeyRef"]["name"],
        yv("profiler-clickhouse")
    );
    // Probes, security and resources stay those of the single collector.
    let base = documents("collector.yaml")
        .into_iter()
        .find(|d| d["kind"] == yv("Deployment"))
        .unwrap();
    let base_pod = &base["spec"]["template"]["spec"];
    let base_c = &base_pod["containers"][0];
    assert_eq!(pod["securityContext"], base_pod["securityContext"]);
    for key in [
        "securityContext",
        "readinessProbe",
        "livenessProbe",
        "resources",
        "ports",
        "args",
    ] {
        assert_eq!(c[key], base_c[key], "{key}");
    }
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], yv(true));

    // The PDB and both Services select the collector's pods.
    let pdb = find("PodDisruptionBudget", "profiler-collector");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *labels);
    assert_eq!(pdb["spec"]["maxUnavailable"], yv(1));
    let service = find("Service", "profiler-collector");
    assert_eq!(service["spec"]["selector"], *labels);
    let clickhouse = find("Service", "clickhouse");
    assert_eq!(clickhouse["spec"]["type"], yv("ExternalName"));

    // The collector's file: keys it knows, the ClickHouse store, no SQLite.
    let toml = find("ConfigMap", "profiler-collector")["data"]["collector.toml"]
        .as_str()
        .unwrap();
    let config = profiler_collector::config::FileConfig::parse(toml).unwrap();
    assert_eq!(
        config.store.as_deref(),
        Some("clickhouse://clickhouse.profiler.svc:8123/profiles")
    );
    assert!(
        config.retention.is_some(),
        "one retention for every replica"
    );
    assert!(!toml.contains("sqlite"), "{toml}");
    let mut collector = profiler_collector::server::CollectorConfig::default();
    config.apply(&mut collector).unwrap();
    assert!(matches!(
        collector.store,
        profiler_collector::server::StoreLocation::ClickHouse(ref url)
            if url.host == "clickhouse.profiler.svc" && url.port == 8123 && url.database == "profiles"
    ));
}

#[test]
fn agent_pod_is_least_privilege() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], yv(true));
    assert_eq!(pod["serviceAccountName"], yv("profiler-agent"));
    assert_eq!(
        pod["tolerations"][0]["operator"],
        yv("Exists"),
        "runs on every node"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], yv(false));
    assert_eq!(sc["allowPrivilegeEscalation"], yv(false));
    assert_eq!(sc["readOnlyRootFilesystem"], yv(true));
    assert_eq!(sc["capabilities"]["drop"][0], yv("ALL"));
    let caps = declared_capabilities();
    assert_eq!(
        caps,
        [
            "bpf",
            "perfmon",
            "sys_ptrace",
            "checkpoint_restore",
            "syslog",
            "dac_read_search"
        ],
        "the capability test below proves exactly this set"
    );
    let env = c["env"].as_sequence().unwrap();
    let node = env
        .iter()
        .find(|e| e["name"] == yv("NODE_NAME"))
        .expect("NODE_NAME");
    assert_eq!(
        node["valueFrom"]["fieldRef"]["fieldPath"],
        yv("spec.nodeName")
    );
    for what in ["requests", "limits"] {
        assert!(
            c["resources"][what]["memory"].as_str().is_some(),
            "{what}.memory"
        );
        assert!(c["resources"][what]["cpu"].as_str().is_some(), "{what}.cpu");
    }
    // RBAC: get/list/watch pods, nothing more.
    let rbac = documents("rbac.yaml");
    let role = rbac
        .iter()
        .find(|d| d["kind"] == yv("ClusterRole"))
        .unwrap();
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]["resources"],
        serde_yaml::from_str::<serde_yaml::Value>("[pods]").unwrap()
    );
    assert_eq!(
        rules[0]["verbs"],
        serde_yaml::from_str::<serde_yaml::Value>("[get, list, watch]").unwrap()
    );
}

/// Runs `profiler-agent record` as root limited to `caps` (bounding set):
/// (exit ok, stderr, folded stacks).
fn agent_with(caps: &[&str], pid: u32, dir: &Path) -> (bool, String, String) {
    let folded = dir.join("out.folded");
    let _ = std::fs::remove_file(&folded);
    let set: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let out = Command::new("setpriv")
        .arg(format!("--bounding-set=-all,{}", set.join(",")))
        .arg("--inh-caps=-all")
        .arg(agent_binary())
        .args([
            "record",
            "-d",
            "1s",
            "--no-progress",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(dir.join("out.svg"))
        .arg("--folded")
        .arg(&folded)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        std::fs::read_to_string(&folded).unwrap_or_default(),
    )
}

fn named(folded: &str, chain: &[&str]) -> bool {
    folded.lines().any(|l| {
        let frames: Vec<&str> = l
            .rsplit_once(' ')
            .map(|(s, _)| s)
            .unwrap_or(l)
            .split(';')
            .collect();
        has_chain(&frames, chain)
    })
}

#[test]
fn each_declared_capability_is_needed() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let caps_owned = declared_capabilities();
    let all: Vec<&str> = caps_owned.iter().map(String::as_str).collect();
    let without = |cap: &str| -> Vec<&str> { all.iter().copied().filter(|c| *c != cap).collect() };
    let dir = tempfile::tempdir().unwrap();
    let chain = ["main", "outer", "inner_hot"];

    // Exactly the DaemonSet's set: a correct profile, kernel frames named.
    let w = Workload::spawn(&workload("syscalls"), &["10"]);
    let (ok, err, folded) = agent_with(&all, w.pid(), dir.path());
    assert!(ok, "{err}");
    assert!(
        !err.contains("without CAP_"),
        "the DaemonSet's set lacks nothing: {err}"
    );
    assert!(folded.contains("read_zero_[k]"), "{folded}");
    let (ok, err, folded) = agent_with(&without("syslog"), w.pid(), dir.path());
    assert!(ok && err.contains("without CAP_SYSLOG"), "{err}");
    assert!(
        !folded.contains("read_zero_[k]") && folded.contains("[unknown]_[k]"),
        "SYSLOG names kernel frames:\n{folded}"
    );
    drop(w);

    // BPF and PERFMON: without them the agent stops and names them.
    let w = Workload::spawn(&workload("chain"), &["10"]);
    for (cap, name) in [("bpf", "CAP_BPF"), ("perfmon", "CAP_PERFMON")] {
        let (ok, err, _) = agent_with(&without(cap), w.pid(), dir.path());
        assert!(
            !ok && err.contains("missing privileges") && err.contains(name),
            "{cap}: {err}"
        );
    }
    drop(w);

    // CHECKPOINT_RESTORE: a deleted binary is only reachable via map_files.
    let deleted = dir.path().join("deleted-chain");
    std::fs::copy(workload("chain"), &deleted).unwrap();
    let w = Workload::spawn(&deleted, &["10"]);
    wait_for_exec(w.pid(), "deleted-chain");
    std::fs::remove_file(&deleted).unwrap();
    let (ok, err, folded) = agent_with(&all, w.pid(), dir.path());
    assert!(ok && named(&folded, &chain), "{err}\n{folded}");
    let (ok, err, folded) = agent_with(&without("checkpoint_restore"), w.pid(), dir.path());
    assert!(
        ok && !named(&folded, &chain),
        "CHECKPOINT_RESTORE opens deleted binaries:\n{folded}"
    );
    assert!(err.contains("without CAP_CHECKPOINT_RESTORE"), "{err}");
    drop(w);

    // SYS_PTRACE: the binaries of another user's process; DAC_READ_SEARCH:
    // a binary root may not read (mode 0711).
    let bindir = dir.path().join("bin");
    std::fs::create_dir(&bindir).unwrap();
    let other = bindir.join("otheruser");
    std::fs::copy(workload("chain"), &other).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bindir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&other, Some(65534), Some(65534)).unwrap();
    for (mode, cap) in [(0o755, "sys_ptrace"), (0o711, "dac_read_search")] {
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(mode)).unwrap();
        let w = Workload::spawn_command(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&other)
                .arg("10"),
        );
        wait_for_exec(w.pid(), "otheruser");
        let (ok, err, folded) = agent_with(&all, w.pid(), dir.path());
        assert!(
            ok && named(&folded, &chain),
            "mode {mode:o}, all caps: {err}\n{folded}"
        );
        let (ok, err, folded) = agent_with(&without(cap), w.pid(), dir.path());
        assert!(
            ok && !named(&folded, &chain),
            "{cap} is needed for mode {mode:o}:\n{folded}"
        );
        let warning = format!("without CAP_{}", cap.to_uppercase());
        assert!(err.contains(&warning), "the agent names {cap}: {err}");
    }
}
