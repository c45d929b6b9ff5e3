//! Pull mode: the collector scrapes Go services' `net/http/pprof`
//! endpoints on an interval and stores what they answer like an upload
//! ([`crate::import::pprof`], then [`IngestCore`]).
//!
//! Targets come from the configuration file (`[[scrape]]`, with labels
//! each) and, in Kubernetes, from pod annotations ([`kubernetes`]). Each
//! profile of a target is fetched once an interval:
//!
//! | profile | path | what is stored |
//! |---|---|---|
//! | `cpu` | `profile?seconds=N` | `samples`/count, `cpu_nanoseconds` over the N seconds |
//! | `mutex` | `mutex?seconds=N` | `contentions`/count, `delay`/nanoseconds over the N seconds |
//! | `block` | `block?seconds=N` | `contentions`/count, `delay`/nanoseconds over the N seconds |
//! | `allocs` | `allocs?seconds=N` | `alloc_objects`/count, `alloc_space`/bytes over the N seconds |
//! | `heap` | `heap` | `inuse_objects`/count, `inuse_space`/bytes at the scrape |
//! | `goroutine` | `goroutine` | `goroutine`/count at the scrape |
//!
//! Every sample carries the target's labels, `instance` (host:port),
//! `profile` (the row above: mutex and block share their types) and
//! `process`, the program's name as the agent names it (from the
//! profile's first mapping) unless the target's labels name it. Each
//! scrape is counted per target and profile by outcome
//! (`profiler_scrapes_total`): stored, duplicate, failed (unreachable, an
//! HTTP error, a timeout), oversize (an answer over the size limit),
//! rejected (not a valid profile).
pub mod kubernetes;

use std::{collections::HashMap, io::Read as _, sync::Arc, time::Duration};

use tokio::{sync::Semaphore, task::JoinHandle};

use crate::{
    import::{self, Source},
    ingest::IngestCore,
};

/// Fetches in flight at once, over every target. A fetch holds a blocking
/// thread while the service profiles itself (`seconds`): at 15 s / 10 s
/// with all six profiles, a target keeps about four busy, so this serves
/// about 100 targets. The collector's runtime has threads for them and
/// for its queries (`main.rs`).
pub const MAX_IN_FLIGHT: usize = 448;

/// A profile a Go service serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GoProfile {
    Cpu,
    Mutex,
    Block,
    Allocs,
    Heap,
    Goroutine,
}

impl GoProfile {
    pub const ALL: [GoProfile; 6] = [
        GoProfile::Cpu,
        GoProfile::Mutex,
        GoProfile::Block,
        GoProfile::Allocs,
        GoProfile::Heap,
        GoProfile::Goroutine,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GoProfile::Cpu => "cpu",
            GoProfile::Mutex => "mutex",
            GoProfile::Block => "block",
            GoProfile::Allocs => "allocs",
            GoProfile::Heap => "heap",
            GoProfile::Goroutine => "goroutine",
        }
    }

    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name.trim())
            .ok_or_else(|| {
                format!(
                    "unknown Go profile {name:?}: use cpu, mutex, block, allocs, heap or goroutine"
                )
            })
    }

    /// A list like `cpu,mutex,heap`.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let mut out = text
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Self::parse)
            .collect::<Result<Vec<_>, _>>()?;
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The path under the target's base URL, for a scrape of `seconds`.
    pub fn path(self, seconds: u64) -> String {
        match self {
            GoProfile::Cpu => format!("profile?seconds={seconds}"),
            GoProfile::Mutex => format!("mutex?seconds={seconds}"),
            GoProfile::Block => format!("block?seconds={seconds}"),
            GoProfile::Allocs => format!("allocs?seconds={seconds}"),
            GoProfile::Heap => "heap".into(),
            GoProfile::Goroutine => "goroutine".into(),
        }
    }

    /// The sample types kept: a delta `allocs` profile's in-use values
    /// can be negative, and a snapshot's cumulative allocations would
    /// count again at every scrape.
    fn keeps(self) -> Option<&'static [&'static str]> {
        match self {
            GoProfile::Allocs => Some(&["alloc_objects", "alloc_space"]),
            GoProfile::Heap => Some(&["inuse_objects", "inuse_space"]),
            _ => None,
        }
    }
}

/// A Go service to scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Base URL of its pprof handlers, e.g. `http://10.0.0.5:6060/debug/pprof`.
    pub url: String,
    /// Labels of every sample (e.g. `service`, `process`).
    pub labels: Vec<(String, String)>,
    pub profiles: Vec<GoProfile>,
}

impl Target {
    /// `host:port` of the URL: the `instance` label and the target's name
    /// in metrics.
    pub fn instance(&self) -> String {
        let rest = self.url.split_once("://").map_or(&*self.url, |(_, r)| r);
        rest.split('/').next().unwrap_or(rest).to_string()
    }
}

/// What to scrape and how often.
#[derive(Clone, Debug)]
pub struct ScrapeConfig {
    pub targets: Vec<Target>,
    /// Time between two scrapes of a target.
    pub interval: Duration,
    /// Length of the profiles that cover a time (cpu, mutex, block,
    /// allocs); at most the interval.
    pub seconds: u64,
    /// Pods that ask to be scraped (annotations), when in Kubernetes.
    pub kubernetes: Option<kubernetes::Discovery>,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            interval: Duration::from_secs(15),
            seconds: 10,
            kubernetes: None,
        }
    }
}

impl ScrapeConfig {
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty() && self.kubernetes.is_none()
    }
}

/// Runs the scrapes until `stopped` says so: the configured targets, and
/// those discovered in Kubernetes (refreshed every interval; a target that
/// is gone stops being scraped).
pub fn spawn(
    config: ScrapeConfig,
    core: IngestCore,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let fetches = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut running: HashMap<String, (Target, JoinHandle<()>)> = HashMap::new();
        let agent = http_agent(config.seconds);
        loop {
            let mut wanted: Vec<Target> = config.targets.clone();
            if let Some(discovery) = &config.kubernetes {
                let d = discovery.clone();
                match tokio::task::spawn_blocking(move || d.targets()).await {
                    Ok(Ok(found)) => wanted.extend(found),
                    Ok(Err(e)) => {
                        tracing::warn!("scrape discovery: {e}; keeping the targets found before");
                        wanted.extend(
                            running
                                .values()
                                .map(|(t, _)| t.clone())
                                .filter(|t| !config.targets.contains(t)),
                        );
                    }
                    Err(e) => tracing::warn!("scrape discovery task failed: {e}"),
                }
            }
            let wanted: HashMap<String, Target> =
                wanted.into_iter().map(|t| (t.url.clone(), t)).collect();
            running.retain(|url, (target, task)| {
                let keep = wanted.get(url) == Some(target);
                if !keep {
                    task.abort();
                }
                keep
            });
            for (url, target) in wanted {
                if running.contains_key(&url) {
                    continue;
                }
                tracing::info!(target = %url, profiles = ?target.profiles, "scraping");
                let task = tokio::spawn(scrape_loop(
                    target.clone(),
                    config.interval,
                    config.seconds,
                    core.clone(),
                    agent.clone(),
                    fetches.clone(),
                ));
                running.insert(url, (target, task));
            }
            if config.kubernetes.is_none() {
                let _ = stopped.wait_for(|s| *s).await;
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(config.interval) => {}
                _ = stopped.wait_for(|s| *s) => break,
            }
        }
        for (_, (_, task)) in running {
            task.abort();
        }
    })
}

fn http_agent(seconds: u64) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(5)))
        // The profile takes its seconds; the rest is for the answer.
        .timeout_global(Some(Duration::from_secs(seconds + 20)))
        .build()
        .into()
}

/// Scrapes every profile of `target` once an interval.
async fn scrape_loop(
    target: Target,
    interval: Duration,
    seconds: u64,
    core: IngestCore,
    agent: ureq::Agent,
    fetches: Arc<Semaphore>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Every profile at once; a task's end (abort) ends them too.
        let mut scrapes = tokio::task::JoinSet::new();
        for &profile in &target.profiles {
            let (target, core, agent, fetches) =
                (target.clone(), core.clone(), agent.clone(), fetches.clone());
            scrapes.spawn(async move {
                let Ok(_permit) = fetches.acquire_owned().await else {
                    return;
                };
                scrape_one(&target, profile, seconds, &core, agent).await;
            });
        }
        while scrapes.join_next().await.is_some() {}
    }
}

/// Why a fetch gave no profile.
enum FetchError {
    Failed(String),
    Oversize,
}

fn fetch(agent: &ureq::Agent, url: &str, max_bytes: usize) -> Result<Vec<u8>, FetchError> {
    let response = agent
        .get(url)
        .call()
        .map_err(|e| FetchError::Failed(e.to_string()))?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| FetchError::Failed(format!("reading the answer: {e}")))?;
    if status != 200 {
        let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        return Err(FetchError::Failed(format!(
            "HTTP {status}: {}",
            text.trim()
        )));
    }
    if body.len() > max_bytes {
        return Err(FetchError::Oversize);
    }
    Ok(body)
}

async fn scrape_one(
    target: &Target,
    profile: GoProfile,
    seconds: u64,
    core: &IngestCore,
    agent: ureq::Agent,
) {
    let instance = target.instance();
    let url = format!(
        "{}/{}",
        target.url.trim_end_matches('/'),
        profile.path(seconds)
    );
    let max = core.max_message_bytes;
    let fetched = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || fetch(&agent, &url, max)).await
    };
    let body = match fetched {
        Ok(Ok(body)) => body,
        Ok(Err(FetchError::Oversize)) => {
            core.metrics.scrape(&instance, profile.name(), "oversize");
            tracing::warn!(target = %url, limit = max, "scrape refused: the answer is over the size limit");
            return;
        }
        Ok(Err(FetchError::Failed(why))) => {
            core.metrics.scrape(&instance, profile.name(), "failed");
            tracing::warn!(target = %url, "scrape failed: {why}");
            return;
        }
        Err(e) => {
            core.metrics.scrape(&instance, profile.name(), "failed");
            tracing::warn!(target = %url, "scrape task failed: {e}");
            return;
        }
    };
    let mut labels = target.labels.clone();
    labels.push(("instance".into(), instance.clone()));
    labels.push(("profile".into(), profile.name().into()));
    labels.sort();
    labels.dedup_by(|a, b| a.0 == b.0);
    let source = Source {
        agent_id: format!("scrape/{instance}/{}", profile.name()),
        node: String::new(),
    };
    let converted = import::pprof::decode(&body, max).and_then(|mut p| {
        if let Some(keep) = profile.keeps() {
            keep_types(&mut p, keep);
        }
        let labels = import::pprof::with_process(labels, &p);
        import::pprof::to_batches(&p, &labels, &source)
    });
    let batches = match converted {
        Ok(b) => b,
        Err(e) => {
            core.metrics.scrape(&instance, profile.name(), "rejected");
            tracing::warn!(target = %url, reason = e.reason(), "scrape refused: {e}");
            return;
        }
    };
    match core.store_all(&batches, &url).await {
        Ok(count) => {
            let outcome = if count.new == 0 && count.duplicate > 0 {
                "duplicate"
            } else {
                "stored"
            };
            core.metrics.scrape(&instance, profile.name(), outcome);
        }
        Err(refused) => {
            core.metrics.scrape(&instance, profile.name(), "rejected");
            tracing::warn!(target = %url, reason = refused.reason.as_str(), "scrape not stored: {}", refused.message);
        }
    }
}

/// Keeps only the sample types named in `keep` (their values, in order).
fn keep_types(profile: &mut profiler_proto::pprof::Profile, keep: &[&str]) {
    let name = |i: i64| {
        profile
            .string_table
            .get(i as usize)
            .map_or("", String::as_str)
    };
    let kept: Vec<usize> = profile
        .sample_type
        .iter()
        .enumerate()
        .filter(|(_, t)| keep.contains(&name(t.r#type)))
        .map(|(i, _)| i)
        .collect();
    profile.sample_type = kept.iter().map(|&i| profile.sample_type[i]).collect();
    for sample in &mut profile.sample {
        sample.value = kept
            .iter()
            .map(|&i| sample.value.get(i).copied().unwrap_or(0))
            .collect();
    }
    profile.default_sample_type = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_lists_parse_and_name_their_paths() {
        assert_eq!(
            GoProfile::parse_list("heap, cpu,mutex,cpu").unwrap(),
            vec![GoProfile::Cpu, GoProfile::Mutex, GoProfile::Heap]
        );
        assert!(GoProfile::parse_list("cpu,threads")
            .unwrap_err()
            .contains("\"threads\""));
        assert_eq!(GoProfile::Cpu.path(10), "profile?seconds=10");
        assert_eq!(GoProfile::Heap.path(10), "heap");
    }

    #[test]
    fn instance_is_host_and_port() {
        let t = Target {
            url: "http://10.0.0.5:6060/debug/pprof".into(),
            labels: vec![],
            profiles: vec![],
        };
        assert_eq!(t.instance(), "10.0.0.5:6060");
    }

    #[test]
    fn kept_types_keep_their_values() {
        use profiler_proto::pprof::{Profile, Sample, ValueType};
        let mut p = Profile {
            string_table: [
                "",
                "alloc_objects",
                "count",
                "alloc_space",
                "bytes",
                "inuse_objects",
                "inuse_space",
            ]
            .map(String::from)
            .to_vec(),
            sample_type: vec![
                ValueType { r#type: 1, unit: 2 },
                ValueType { r#type: 3, unit: 4 },
                ValueType { r#type: 5, unit: 2 },
                ValueType { r#type: 6, unit: 4 },
            ],
            sample: vec![Sample {
                value: vec![1, 2, -3, -4],
                ..Default::default()
            }],
            ..Default::default()
        };
        keep_types(&mut p, &["alloc_objects", "alloc_space"]);
        assert_eq!(p.sample_type.len(), 2);
        assert_eq!(p.sample[0].value, vec![1, 2]);
    }
}
