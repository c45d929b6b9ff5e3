//! A containerised workload, simulated with cgroups on this machine, and a
//! local server that speaks the Kubernetes pod API: the profile in the
//! collector carries the right container id, pod, namespace, container and
//! service labels, and the web UI offers them.

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::support::*;
use profiler_agent::{export::ExportOptions, kube::KubeConfig};
use profiler_collector::server::{self, CollectorConfig, StoreLocation};

const POD_UID: &str = "6a1f1e3c-2b4d-4e5f-8a9b-0c1d2e3f4a5b";
const POD: &str = "checkout-7d9f8c6b5-x2x9q";

/// A cgroup for the fake container, in the first hierarchy this machine
/// lets us write: cgroup v1 `pids` (cgroupfs driver naming) or cgroup v2
/// (systemd driver naming, as containerd under kubelet). Removed on drop.
struct ContainerCgroup {
    dirs: Vec<PathBuf>,
    procs: PathBuf,
}

impl ContainerCgroup {
    fn create(container_id: &str) -> Self {
        let uid_ = POD_UID.replace('-', "_");
        let candidates = [
            (
                "/sys/fs/cgroup/pids",
                vec![
                    "kubepods".to_string(),
                    "burstable".into(),
                    format!("pod{POD_UID}"),
                    container_id.into(),
                ],
            ),
            (
                "/sys/fs/cgroup/unified",
                vec![
                    "kubepods.slice".to_string(),
                    "kubepods-burstable.slice".into(),
                    format!("kubepods-burstable-pod{uid_}.slice"),
                    format!("cri-containerd-{container_id}.scope"),
                ],
            ),
            (
                "/sys/fs/cgroup",
                vec![
                    "kubepods.slice".to_string(),
                    "kubepods-burstable.slice".into(),
                    format!("kubepods-burstable-pod{uid_}.slice"),
                    format!("cri-containerd-{container_id}.scope"),
                ],
            ),
        ];
        for (root, parts) in candidates {
            if !Path::new(root).join("cgroup.procs").exists() {
                continue;
            }
            let mut dirs = Vec::new();
            let mut dir = PathBuf::from(root);
            let mut ok = true;
            for part in &parts {
                dir.push(part);
                if !dir.exists() {
                    if std::fs::create_dir(&dir).is_err() {
                        ok = false;
                        break;
                    }
                    dirs.push(dir.clone());
                }
            }
            if ok && dir.join("cgroup.procs").exists() {
                return Self {
                    procs: dir.join("cgroup.procs"),
                    dirs,
                };
            }
            for d in dirs.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
        panic!("no writable cgroup hierarchy (v1 pids or v2) to simulate a container in");
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        // A cgroup can be removed once its last process is reaped.
        for d in self.dirs.iter().rev() {
            within(Duration::from_secs(1), || std::fs::remove_dir(d).ok());
        }
    }
}

/// Serves a pod list with our pod on `node`, and watches that stay open.
fn fake_api_server(container_id: &str, stop: Arc<AtomicBool>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let pod = format!(
        r#"{{"metadata":{{"name":"{POD}","namespace":"shop","uid":"{POD_UID}","resourceVersion":"7","labels":{{"pod-template-hash":"7d9f8c6b5"}},"ownerReferences":[{{"kind":"ReplicaSet","name":"checkout-7d9f8c6b5"}}]}},"spec":{{"nodeName":"test-node"}},"status":{{"containerStatuses":[{{"name":"web","containerID":"containerd://{container_id}"}}]}}}}"#
    );
    std::thread::spawn(move || {
        let mut open = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut conn, _)) = listener.accept() else {
                // The accept loop's pace: it checks `stop` between accepts.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            conn.set_nonblocking(false).unwrap();
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !request.contains("fieldSelector=spec.nodeName%3Dtest-node") {
                let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            } else if request.contains("watch=1") {
                // Headers only: the watch stays open with nothing new.
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
                open.push(conn);
            } else {
                let body = format!(
                    r#"{{"kind":"PodList","metadata":{{"resourceVersion":"7"}},"items":[{pod}]}}"#
                );
                let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            }
        }
    });
    addr
}

fn label_values(http: std::net::SocketAddr, name: &str) -> Vec<String> {
    let body = ureq::get(&format!(
        "http://{http}/api/v1/labels/{name}/values?start=now-10m"
    ))
    .call()
    .unwrap()
    .body_mut()
    .read_to_string()
    .unwrap();
    serde_json::from_str(&body).unwrap()
}

#[test]
fn containerised_workload_gets_pod_labels() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let container_id: String = "c0ffee42".repeat(8);
    let cgroup = ContainerCgroup::create(&container_id);
    let stop = Arc::new(AtomicBool::new(false));
    let api = fake_api_server(&container_id, stop.clone());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = rt
        .block_on(server::start(CollectorConfig {
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            store: StoreLocation::Sqlite(dir.path().join("p.db")),
            ..CollectorConfig::default()
        }))
        .unwrap();

    // The workload joins the container's cgroup before it execs.
    let script = format!(
        "echo $$ > {} && exec {} 8",
        cgroup.procs.display(),
        workload("chain").display()
    );
    let w = Workload::spawn_command(Command::new("sh").args(["-c", &script]));
    wait_for_exec(w.pid(), "chain");
    let in_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", w.pid())).unwrap();
    assert!(in_cgroup.contains(&container_id), "{in_cgroup}");

    let mut opts = options(vec![w.pid()], 3.0, 99);
    opts.export = Some(ExportOptions {
        collector: format!("http://{}", c.grpc_addr),
        node: "test-node".into(),
        queue_bytes: 16 << 20,
        flush_timeout: Duration::from_secs(10),
        spill_dir: None,
        spill_bytes: 0,
        security: Default::default(),
        protocol: Default::default(),
        headers: Vec::new(),
    });
    opts.kube = Some(KubeConfig {
        api_url: format!("http://{api}"),
        token: Some("test-token".into()),
        token_file: None,
        ca_pem: None,
        node: "test-node".into(),
    });
    let (rec, _) = record_with(&opts, || ());
    assert!(rec.samples > 200, "{} samples", rec.samples);

    assert_eq!(
        label_values(c.http_addr, "container_id"),
        vec![container_id.clone()]
    );
    assert_eq!(label_values(c.http_addr, "pod"), vec![POD.to_string()]);
    assert_eq!(
        label_values(c.http_addr, "namespace"),
        vec!["shop".to_string()]
    );
    assert_eq!(
        label_values(c.http_addr, "container"),
        vec!["web".to_string()]
    );
    assert_eq!(
        label_values(c.http_addr, "service"),
        vec!["checkout".to_string()]
    );

    // Selecting by pod labels gives the workload's call chain.
    let folded = ureq::get(&format!(
        "http://{}/api/v1/folded?start=now-10m&query=%7Bnamespace%3D%22shop%22%2Cservice%3D%22checkout%22%7D",
        c.http_addr
    ))
    .call()
    .unwrap()
    .body_mut()
    .read_to_string()
    .unwrap();
    let (profile, _) = profiler_agent::fold::parse_folded(&folded);
    let (hot, total) = count_where(&profile, "chain", |f| {
        has_chain(f, &["main", "outer", "inner_hot"])
    });
    assert!(
        total > 200 && hot * 100 >= total * 90,
        "{hot} of {total}\n{folded}"
    );

    // The UI offers the pod labels as pickers.
    let dom = chromium(
        &["--dump-dom"],
        &format!("http://{}/?start=now-10m&service=checkout", c.http_addr),
    );
    for want in [
        "<option value=\"checkout\">",
        &format!("<option value=\"{POD}\">"),
        "<option value=\"shop\">",
    ] {
        assert!(dom.contains(want), "UI lacks {want}:\n{dom}");
    }
    assert!(dom.contains("samples for {service=\"checkout\"}"), "{dom}");

    stop.store(true, Ordering::Relaxed);
    drop(w);
    rt.block_on(c.shutdown()).unwrap();
}
