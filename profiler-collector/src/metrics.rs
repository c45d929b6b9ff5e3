//! The collector's metrics: [`Reject`], the one list of reasons a batch or
//! an HTTP request is refused, and the `/metrics` families, kept in a
//! prometheus-client registry and rendered in the Prometheus text format
//! (version 0.0.4).
use std::{fmt::Write as _, sync::atomic::AtomicU64, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{
        prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
        LabelValueEncoder,
    },
    metrics::{counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};

use crate::store::StoreStats;

/// The reason of a connection refused by `--allow-cidr`.
pub const NOT_ALLOWED_NETWORK: &str = "not_allowed_network";

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Why a batch was refused (or, for the token reasons, an HTTP request):
/// the `reason` label of `profiler_batches_rejected_total` and
/// `profiler_http_requests_rejected_total`, and the reason in the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// Larger than the message size limit, before or after decompression.
    TooLarge,
    /// Not a protobuf `Batch`, or a compressed frame that does not inflate.
    Undecodable,
    /// No bearer token.
    MissingToken,
    /// A bearer token the token file does not hold.
    WrongToken,
    /// Every ingest slot busy: pushed back.
    Overloaded,
    /// The agent is over its rate limit: pushed back.
    RateLimited,
    /// The window ended before the retention period.
    OlderThanRetention,
    /// The store failed to write the batch (answered `UNAVAILABLE`).
    StoreError,
    // Validation (`validate.rs`):
    MissingAgentId,
    BadWindow,
    BadFrequency,
    /// A sample type or unit that is not `[a-z0-9_]{1,64}`.
    BadSampleType,
    /// A known type with another unit, or a type the store holds in
    /// another unit.
    UnitMismatch,
    InvalidUtf8,
    IndexOutOfRange,
    EmptyStack,
    StackTooDeep,
    BadCount,
    CountOverflow,
    BadLabel,
    TooManySamples,
    TooBig,
}

impl Reject {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [Reject; 22] = [
        Reject::TooLarge,
        Reject::Undecodable,
        Reject::MissingToken,
        Reject::WrongToken,
        Reject::Overloaded,
        Reject::RateLimited,
        Reject::OlderThanRetention,
        Reject::StoreError,
        Reject::MissingAgentId,
        Reject::BadWindow,
        Reject::BadFrequency,
        Reject::BadSampleType,
        Reject::UnitMismatch,
        Reject::InvalidUtf8,
        Reject::IndexOutOfRange,
        Reject::EmptyStack,
        Reject::StackTooDeep,
        Reject::BadCount,
        Reject::CountOverflow,
        Reject::BadLabel,
        Reject::TooManySamples,
        Reject::TooBig,
    ];

    /// The metric label and log name.
    pub const fn name(self) -> &'static str {
        match self {
            Reject::TooLarge => "too_large",
            Reject::Undecodable => "undecodable",
            Reject::MissingToken => "missing_token",
            Reject::WrongToken => "wrong_token",
            Reject::Overloaded => "overloaded",
            Reject::RateLimited => "rate_limited",
            Reject::OlderThanRetention => "older_than_retention",
            Reject::StoreError => "store_error",
            Reject::MissingAgentId => "missing_agent_id",
            Reject::BadWindow => "bad_window",
            Reject::BadFrequency => "bad_frequency",
            Reject::BadSampleType => "bad_sample_type",
            Reject::UnitMismatch => "unit_mismatch",
            Reject::InvalidUtf8 => "invalid_utf8",
            Reject::IndexOutOfRange => "index_out_of_range",
            Reject::EmptyStack => "empty_stack",
            Reject::StackTooDeep => "stack_too_deep",
            Reject::BadCount => "bad_count",
            Reject::CountOverflow => "count_overflow",
            Reject::BadLabel => "bad_label",
            Reject::TooManySamples => "too_many_samples",
            Reject::TooBig => "too_big",
        }
    }
}

/// Why a request carried no acceptable token (checked by the `auth` module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    MissingToken,
    WrongToken,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::MissingToken, Refusal::WrongToken];

    /// The metric label and log name (a [`Reject`] reason).
    pub fn reason(self) -> &'static str {
        Reject::from(self).name()
    }

    /// What the refused client is told.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::MissingToken => "no bearer token: send `authorization: Bearer TOKEN`",
            Refusal::WrongToken => "wrong bearer token",
        }
    }
}

impl From<Refusal> for Reject {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::MissingToken => Reject::MissingToken,
            Refusal::WrongToken => Reject::WrongToken,
        }
    }
}

impl EncodeLabelValue for Reject {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.name())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Reject,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImportLabels {
    format: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImportRejectLabels {
    format: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScrapeLabels {
    target: String,
    profile: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    server: String,
    reason: String,
}

/// Every metric of the collector. Counters are bumped where the event
/// happens; the store's size is read at each scrape.
pub struct Metrics {
    registry: Registry,
    pub batches_stored: Counter,
    pub batches_duplicate: Counter,
    pub samples_stored: Counter,
    /// Groups of batches written, one transaction each.
    pub store_commits: Counter,
    store_write_seconds: Counter<f64, AtomicU64>,
    pub queries: Counter,
    rejected: Family<ReasonLabel, Counter>,
    http_rejected: Family<ReasonLabel, Counter>,
    connections_rejected: Family<ConnectionLabels, Counter>,
    imports: Family<ImportLabels, Counter>,
    import_rejected: Family<ImportRejectLabels, Counter>,
    scrapes: Family<ScrapeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("profiler");
        let m = Self {
            batches_stored: Counter::default(),
            batches_duplicate: Counter::default(),
            samples_stored: Counter::default(),
            store_commits: Counter::default(),
            store_write_seconds: Counter::default(),
            queries: Counter::default(),
            rejected: Family::default(),
            http_rejected: Family::default(),
            connections_rejected: Family::default(),
            imports: Family::default(),
            import_rejected: Family::default(),
            scrapes: Family::default(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters and `.` to help.
        let r = &mut registry;
        r.register("batches_stored", "Batches stored", m.batches_stored.clone());
        r.register(
            "batches_duplicate",
            "Batches received again and not stored twice",
            m.batches_duplicate.clone(),
        );
        r.register("samples_stored", "Samples stored", m.samples_stored.clone());
        r.register_collector(Box::new(StoreErrors(m.rejected.clone())));
        r.register(
            "store_commits",
            "Groups of batches written, one transaction each (batches stored / commits = group size)",
            m.store_commits.clone(),
        );
        r.register(
            "store_write_seconds",
            "Time spent writing groups, commit included",
            m.store_write_seconds.clone(),
        );
        r.register("queries", "HTTP queries served", m.queries.clone());
        for reason in Reject::ALL {
            let _ = m.rejected.get_or_create(&ReasonLabel { reason });
        }
        r.register(
            "batches_rejected",
            "Batches rejected, by reason",
            m.rejected.clone(),
        );
        for refusal in Refusal::ALL {
            let _ = m.http_rejected.get_or_create(&ReasonLabel {
                reason: refusal.into(),
            });
        }
        r.register(
            "http_requests_rejected",
            "HTTP requests refused, by reason",
            m.http_rejected.clone(),
        );
        for server in ["gRPC", "HTTP"] {
            let _ = m.connections_rejected.get_or_create(&ConnectionLabels {
                server: server.into(),
                reason: NOT_ALLOWED_NETWORK.into(),
            });
        }
        r.register(
            "connections_rejected",
            "Connections refused, by server and reason: not_allowed_network (outside --allow-cidr), or why the TLS handshake failed",
            m.connections_rejected.clone(),
        );
        r.register(
            "imports",
            "Profiles received in other formats (format: otlp, pprof), by outcome: stored, duplicate (stored before), rejected",
            m.imports.clone(),
        );
        r.register(
            "imports_rejected",
            "Profiles in other formats refused whole, by format and reason",
            m.import_rejected.clone(),
        );
        r.register(
            "scrapes",
            "pprof scrapes of Go services, by target, profile and outcome: stored, duplicate, failed (unreachable or an HTTP error), oversize (answer over the limit), rejected (not a valid profile)",
            m.scrapes.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a refused batch.
    pub fn reject(&self, reason: Reject) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts a profile received in another format (`otlp`, `pprof`):
    /// `outcome` is stored, duplicate or rejected.
    pub fn import(&self, format: &str, outcome: &str) {
        self.imports
            .get_or_create(&ImportLabels {
                format: format.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts a profile in another format refused whole, with its reason.
    pub fn import_rejected(&self, format: &str, reason: &str) {
        self.import(format, "rejected");
        self.import_rejected
            .get_or_create(&ImportRejectLabels {
                format: format.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts one scrape of a target's profile.
    pub fn scrape(&self, target: &str, profile: &str, outcome: &str) {
        self.scrapes
            .get_or_create(&ScrapeLabels {
                target: target.into(),
                profile: profile.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts a refused HTTP request.
    pub fn reject_http(&self, refusal: Refusal) {
        self.http_rejected
            .get_or_create(&ReasonLabel {
                reason: refusal.into(),
            })
            .inc();
    }

    /// Counts a refused TLS handshake; `reason` is the handshake failure's name.
    pub fn reject_connection(&self, server: &'static str, reason: &'static str) {
        self.connections_rejected
            .get_or_create(&ConnectionLabels {
                server: server.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// A group of batches written in `took`.
    pub fn store_written(&self, took: Duration) {
        self.store_commits.inc();
        self.store_write_seconds.inc_by(took.as_secs_f64());
    }

    /// Time spent writing groups, commit included.
    pub fn store_write_seconds(&self) -> f64 {
        self.store_write_seconds.get()
    }

    /// TLS handshakes refused for `reason`, on either server.
    pub fn connections_rejected(&self, reason: &str) -> u64 {
        ["gRPC", "HTTP"]
            .into_iter()
            .filter_map(|server| {
                self.connections_rejected
                    .get(&ConnectionLabels {
                        server: server.into(),
                        reason: reason.into(),
                    })
                    .map(|c| c.get())
            })
            .sum()
    }

    /// Batches refused for `reason`.
    pub fn rejected(&self, reason: Reject) -> u64 {
        self.rejected.get_or_create(&ReasonLabel { reason }).get()
    }

    /// HTTP requests refused for `refusal`.
    pub fn http_rejected(&self, refusal: Refusal) -> u64 {
        self.http_rejected
            .get_or_create(&ReasonLabel {
                reason: refusal.into(),
            })
            .get()
    }

    /// The Prometheus text exposition; `store` adds the store's size.
    pub fn render(&self, store: Option<&StoreStats>) -> String {
        let mut out = String::with_capacity(4 << 10);
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        if let Some(stats) = store {
            let mut sizes = Registry::with_prefix("profiler");
            sizes.register_collector(Box::new(StoreSize(stats.clone())));
            let _ = prometheus_text::encode(&mut out, &sizes);
        }
        out
    }
}

/// `profiler_store_errors_total`: the `store_error` rejections under the
/// name operators already read.
#[derive(Debug)]
struct StoreErrors(Family<ReasonLabel, Counter>);

impl Collector for StoreErrors {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let errors = self
            .0
            .get_or_create(&ReasonLabel {
                reason: Reject::StoreError,
            })
            .get();
        let counter = prometheus_client::metrics::counter::ConstCounter::new(errors);
        let metric = encoder.encode_descriptor(
            "store_errors",
            "Batches the store failed to write (answered UNAVAILABLE).",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// The store's size, read at each scrape.
#[derive(Debug)]
struct StoreSize(StoreStats);

impl Collector for StoreSize {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        for (name, help, value) in [
            ("store_bytes", "Size of the store on disk.", s.bytes),
            ("store_batches", "Batches in the store.", s.batches),
            (
                "store_sample_rows",
                "Sample rows in the store.",
                s.sample_rows,
            ),
            ("store_stacks", "Distinct stacks in the store.", s.stacks),
        ] {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the Prometheus text format and returns the sample lines: each
    /// family has HELP then TYPE, every sample belongs to the family declared
    /// just before (a counter's samples end in `_total`), no family is
    /// declared twice, and every value is a number.
    pub(crate) fn check_format(text: &str, prefix: &str) -> Vec<(String, f64)> {
        let mut families = std::collections::HashSet::new();
        let mut family = String::new();
        let mut samples = Vec::new();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has a text");
                assert!(!help.is_empty(), "{line}");
                let ty = lines.next().expect("TYPE after HELP");
                assert!(
                    ty == format!("# TYPE {name} counter") || ty == format!("# TYPE {name} gauge"),
                    "{ty} after {line}"
                );
                assert_eq!(name.ends_with("_total"), ty.ends_with("counter"), "{name}");
                assert!(
                    name.starts_with(prefix)
                        && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "{name}"
                );
                assert!(families.insert(name.to_string()), "{name} declared twice");
                family = name.to_string();
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            let name = series.split('{').next().unwrap();
            assert_eq!(name, family, "sample outside its family: {line}");
            samples.push((series.to_string(), value));
        }
        samples
    }

    fn label_values<'a>(samples: &'a [(String, f64)], family: &str) -> Vec<&'a str> {
        samples
            .iter()
            .filter_map(|(series, _)| series.strip_prefix(&format!("{family}{{reason=\"")))
            .map(|rest| rest.strip_suffix("\"}").expect("one label"))
            .collect()
    }

    #[test]
    fn renders_prometheus_text_with_every_reason_once() {
        let m = Metrics::new();
        m.batches_stored.inc();
        m.samples_stored.inc_by(40);
        m.reject(Reject::TooLarge);
        m.reject(Reject::TooLarge);
        m.reject(Reject::StoreError);
        m.reject_http(Refusal::MissingToken);
        m.reject_connection("gRPC", "unknown_ca");
        m.store_written(Duration::from_millis(1500));
        let store = StoreStats {
            bytes: 4096,
            ..StoreStats::default()
        };
        let text = m.render(Some(&store));
        let samples = check_format(&text, "profiler_");
        for line in [
            "profiler_batches_stored_total 1",
            "profiler_samples_stored_total 40",
            "profiler_batches_rejected_total{reason=\"too_large\"} 2",
            "profiler_batches_rejected_total{reason=\"wrong_token\"} 0",
            "profiler_batches_rejected_total{reason=\"store_error\"} 1",
            "profiler_store_errors_total 1",
            "profiler_http_requests_rejected_total{reason=\"missing_token\"} 1",
            "profiler_connections_rejected_total{server=\"gRPC\",reason=\"unknown_ca\"} 1",
            "profiler_store_write_seconds_total 1.5",
            "profiler_store_commits_total 1",
            "profiler_store_bytes 4096",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let rejected = label_values(&samples, "profiler_batches_rejected_total");
        assert_eq!(rejected.len(), Reject::ALL.len());
        for reason in Reject::ALL {
            let n = rejected.iter().filter(|r| **r == reason.name()).count();
            assert_eq!(n, 1, "{} in\n{text}", reason.name());
        }
        let http = label_values(&samples, "profiler_http_requests_rejected_total");
        assert_eq!(http.len(), Refusal::ALL.len());
        for refusal in Refusal::ALL {
            assert!(http.contains(&refusal.reason()), "{refusal:?}");
        }
        assert_eq!(m.rejected(Reject::TooLarge), 2);
        assert_eq!(m.http_rejected(Refusal::MissingToken), 1);
        assert_eq!(m.connections_rejected("unknown_ca"), 1);
    }

    #[test]
    fn without_a_store_there_are_no_size_gauges() {
        let text = Metrics::new().render(None);
        check_format(&text, "profiler_");
        assert!(!text.contains("profiler_store_bytes"));
        assert!(text.contains("profiler_store_errors_total 0"));
    }

    #[test]
    fn reject_names_are_distinct_labels() {
        let mut names: Vec<&str> = Reject::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reject::ALL.len());
        assert!(names.iter().all(|n| n
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')));
    }
}
