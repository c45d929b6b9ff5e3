//! The HTTP API and the web UI.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the web UI |
//! | `GET /healthz` | `ok` |
//! | `GET /metrics` | Prometheus text |
//! | `GET /api/v1/types` | sample types (name, unit) present in the range (JSON) |
//! | `GET /api/v1/labels` | label names (JSON) |
//! | `GET /api/v1/labels/{name}/values` | values of a label (JSON) |
//! | `GET /api/v1/flamegraph.svg` | flame graph (inferno SVG); `min_width`, `max_nodes` |
//! | `GET /api/v1/folded` | folded stacks (text) |
//! | `GET /api/v1/pprof` | gzipped pprof (`go tool pprof` reads it) |
//! | `GET /api/v1/top` | top-N functions, self and total (JSON) |
//! | `GET /api/v1/diff.svg` | differential flame graph: `base_*` against the selection |
//!
//! Selections: `type=` the sample type (default `cpu`; a type with no data
//! in the range gives an empty answer), `query={name="value",...}` (all
//! must match), `start`, `end` as Unix seconds, RFC 3339, `now` or
//! `now-15m` (default: the last hour); a window belongs to the range its
//! end falls in. The label routes take `type=` too (without it: labels of
//! every type). Values are in the type's unit.
use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Query, State},
    http::{header, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::get,
    Json, Router,
};

use crate::{
    ingest::{now_ns, SharedStore},
    metrics::Metrics,
    model::{Profile, SampleType, Selector, CPU},
    query::{self, SvgOptions},
    store::Store,
    validate::valid_type_name,
};

#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub metrics: Arc<Metrics>,
}

type Params = Query<HashMap<String, String>>;

/// A 400 with a JSON `{"error": ...}` body.
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": self.0 })),
        )
            .into_response()
    }
}

const UI: &str = include_str!("../ui/index.html");
const MAX_RANGE_NS: i64 = 400 * 24 * 3600 * 1_000_000_000;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(UI) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/types", get(sample_types))
        .route("/api/v1/labels", get(label_names))
        .route("/api/v1/labels/{name}/values", get(label_values))
        .route("/api/v1/flamegraph.svg", get(flamegraph))
        .route("/api/v1/folded", get(folded))
        .route("/api/v1/pprof", get(pprof))
        .route("/api/v1/top", get(top))
        .route("/api/v1/diff.svg", get(diff))
        .with_state(state)
}

/// Parses a time: Unix seconds, RFC 3339, `now`, or `now-DURATION`.
pub fn parse_time(text: &str, now: i64) -> Result<i64, String> {
    let t = text.trim();
    if t == "now" {
        return Ok(now);
    }
    let out_of_range = || format!("time {t:?} is out of range");
    if let Some(ago) = t.strip_prefix("now-") {
        let d = humantime::parse_duration(ago).map_err(|e| format!("bad time {t:?}: {e}"))?;
        let ago = i64::try_from(d.as_nanos()).map_err(|_| out_of_range())?;
        return now
            .checked_sub(ago)
            .filter(|t| *t >= 0)
            .ok_or_else(out_of_range);
    }
    if let Ok(secs) = t.parse::<f64>() {
        // Up to the year 2262, where nanoseconds leave an i64.
        if secs.is_finite() && (0.0..9.2e9).contains(&secs) {
            return Ok((secs * 1e9) as i64);
        }
        return Err(out_of_range());
    }
    humantime::parse_rfc3339_weak(t)
        .map_err(|e| format!("bad time {t:?}: {e} (use Unix seconds, RFC 3339 or now-1h)"))
        .and_then(|st| {
            st.duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| format!("time {t:?} is before 1970"))
                .and_then(|d| i64::try_from(d.as_nanos()).map_err(|_| out_of_range()))
        })
}

/// The `type` parameter, checked: `None` when absent.
pub fn sample_type_param(params: &HashMap<String, String>) -> Result<Option<String>, String> {
    match params.get("type") {
        None => Ok(None),
        Some(t) if valid_type_name(t) => Ok(Some(t.clone())),
        Some(t) => Err(format!(
            "type {t:?} must be 1-64 lower-case ASCII letters, digits or `_`"
        )),
    }
}

/// The selection named by `{prefix}type`, `{prefix}query`, `{prefix}start`,
/// `{prefix}end`.
pub fn selector(params: &HashMap<String, String>, prefix: &str) -> Result<Selector, String> {
    let now = now_ns();
    let get = |k: &str| params.get(&format!("{prefix}{k}")).map(String::as_str);
    let end = get("end")
        .map(|t| parse_time(t, now))
        .transpose()?
        .unwrap_or(now);
    let start = get("start")
        .map(|t| parse_time(t, now))
        .transpose()?
        .unwrap_or(end.saturating_sub(3600 * 1_000_000_000));
    if start >= end {
        return Err(format!("{prefix}start must be before {prefix}end"));
    }
    if end.saturating_sub(start) > MAX_RANGE_NS {
        return Err("time range longer than 400 days".into());
    }
    // A baseline without its own query compares the same selection.
    let query = get("query")
        .or_else(|| params.get("query").map(String::as_str))
        .unwrap_or("");
    let matchers = query::parse_selector(query)?;
    // A baseline without its own type compares the same type.
    let sample_type = match get("type") {
        Some(t) if valid_type_name(t) => t.to_string(),
        Some(t) => {
            return Err(format!(
                "{prefix}type {t:?} must be 1-64 lower-case ASCII letters, digits or `_`"
            ))
        }
        None => sample_type_param(params)?.unwrap_or_else(|| CPU.to_string()),
    };
    Ok(Selector {
        sample_type,
        matchers,
        start_ns: start,
        end_ns: end,
    })
}

async fn with_store<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    state.metrics.queries.inc();
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let guard = store.lock().unwrap_or_else(|e| e.into_inner());
        f(guard.as_ref())
    })
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())?
    .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response())
}

/// The selection's profile and its type with the unit it is stored in (a
/// type never stored: the unit a known type has, else `count`).
async fn profile_for(
    state: &AppState,
    params: &HashMap<String, String>,
    prefix: &str,
) -> Result<(Selector, Profile, SampleType), Response> {
    let sel = selector(params, prefix).map_err(|e| BadRequest(e).into_response())?;
    let q = sel.clone();
    let (profile, unit) = with_store(state, move |s| {
        Ok((s.profile(&q)?, s.unit(&q.sample_type)?))
    })
    .await?;
    let unit = unit
        .or_else(|| SampleType::known_unit(&sel.sample_type).map(str::to_string))
        .unwrap_or_else(|| "count".to_string());
    let sample_type = SampleType::new(&sel.sample_type, &unit);
    Ok((sel, profile, sample_type))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let stats = with_store(&state, |s| s.stats()).await.ok();
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(stats.as_ref()),
    )
        .into_response()
}

async fn sample_types(State(state): State<AppState>, Query(params): Params) -> Response {
    let sel = match selector(&params, "") {
        Ok(sel) => sel,
        Err(e) => return BadRequest(e).into_response(),
    };
    match with_store(&state, move |s| s.sample_types(sel.start_ns, sel.end_ns)).await {
        Ok(types) => Json(types).into_response(),
        Err(r) => r,
    }
}

async fn label_names(State(state): State<AppState>, Query(params): Params) -> Response {
    let (sel, sample_type) = match selector(&params, "").and_then(|sel| {
        let t = sample_type_param(&params)?;
        Ok((sel, t))
    }) {
        Ok(v) => v,
        Err(e) => return BadRequest(e).into_response(),
    };
    match with_store(&state, move |s| {
        s.label_names(sample_type.as_deref(), sel.start_ns, sel.end_ns)
    })
    .await
    {
        Ok(names) => Json(names).into_response(),
        Err(r) => r,
    }
}

async fn label_values(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Params,
) -> Response {
    let (sel, sample_type) = match selector(&params, "").and_then(|sel| {
        let t = sample_type_param(&params)?;
        Ok((sel, t))
    }) {
        Ok(v) => v,
        Err(e) => return BadRequest(e).into_response(),
    };
    match with_store(&state, move |s| {
        s.label_values(&name, sample_type.as_deref(), sel.start_ns, sel.end_ns)
    })
    .await
    {
        Ok(values) => Json(values).into_response(),
        Err(r) => r,
    }
}

/// What a flame graph of a type is called: `CPU` for `cpu`, else the type.
fn type_title(sample_type: &SampleType) -> String {
    if sample_type.name == CPU {
        "CPU".to_string()
    } else {
        format!("{} ({})", sample_type.name, sample_type.unit)
    }
}

fn title(sel: &Selector, what: &str) -> String {
    let labels: Vec<String> = sel
        .matchers
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let span = (sel.end_ns - sel.start_ns) as f64 / 1e9;
    let labels = if labels.is_empty() {
        "all".to_string()
    } else {
        labels.join(", ")
    };
    format!(
        "{what}: {labels} — {}",
        humantime::format_duration(std::time::Duration::from_secs(span as u64))
    )
}

/// Flame graph options from the `min_width` and `max_nodes` parameters,
/// values named after `unit`.
pub fn svg_options(
    params: &HashMap<String, String>,
    title: String,
    unit: &str,
) -> Result<SvgOptions, String> {
    let mut opts = SvgOptions {
        title,
        count_name: query::count_name(unit),
        ..SvgOptions::default()
    };
    if let Some(w) = params.get("min_width") {
        opts.min_width = w
            .parse::<f64>()
            .ok()
            .filter(|w| w.is_finite() && (0.0..=1000.0).contains(w))
            .ok_or_else(|| format!("min_width {w:?} must be a number of pixels 0-1000"))?;
    }
    if let Some(n) = params.get("max_nodes") {
        opts.max_nodes = Some(
            n.parse::<usize>()
                .ok()
                .filter(|n| *n >= 2)
                .ok_or_else(|| format!("max_nodes {n:?} must be an integer of 2 or more"))?,
        );
    }
    Ok(opts)
}

fn svg_response(result: Result<Vec<u8>, String>) -> Response {
    match result {
        Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

async fn flamegraph(State(state): State<AppState>, Query(params): Params) -> Response {
    let (sel, profile, sample_type) = match profile_for(&state, &params, "").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match svg_options(
        &params,
        title(&sel, &type_title(&sample_type)),
        &sample_type.unit,
    ) {
        Ok(opts) => svg_response(query::svg(&profile, &opts)),
        Err(e) => BadRequest(e).into_response(),
    }
}

async fn folded(State(state): State<AppState>, Query(params): Params) -> Response {
    match profile_for(&state, &params, "").await {
        Ok((_, profile, _)) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            profile.folded(),
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn pprof(State(state): State<AppState>, Query(params): Params) -> Response {
    match profile_for(&state, &params, "").await {
        Ok((sel, profile, sample_type)) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile.pb.gz\"",
                ),
            ],
            query::pprof_gz(
                &profile,
                &sample_type,
                sel.end_ns - sel.start_ns,
                sel.start_ns,
            ),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// How many functions `/api/v1/top` lists: the `n` parameter, 1-10000, default 20.
pub fn top_n(params: &HashMap<String, String>) -> Result<usize, String> {
    match params.get("n").map(|n| n.parse::<usize>()) {
        None => Ok(20),
        Some(Ok(n)) if (1..=10_000).contains(&n) => Ok(n),
        Some(_) => Err("n must be 1-10000".into()),
    }
}

async fn top(State(state): State<AppState>, Query(params): Params) -> Response {
    let n = match top_n(&params) {
        Ok(n) => n,
        Err(e) => return BadRequest(e).into_response(),
    };
    match profile_for(&state, &params, "").await {
        Ok((_, profile, sample_type)) => Json(serde_json::json!({
            "type": sample_type.name,
            "unit": sample_type.unit,
            "total": profile.total(),
            "functions": query::top(&profile, n),
        }))
        .into_response(),
        Err(r) => r,
    }
}

async fn diff(State(state): State<AppState>, Query(params): Params) -> Response {
    let (sel, after, sample_type) = match profile_for(&state, &params, "").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !params.keys().any(|k| k.starts_with("base_")) {
        return BadRequest("diff needs a baseline: base_query, base_start, base_end".into())
            .into_response();
    }
    let (_, before, _) = match profile_for(&state, &params, "base_").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match svg_options(
        &params,
        title(&sel, "Differential (red: more than baseline)"),
        &sample_type.unit,
    ) {
        Ok(opts) => svg_response(query::diff_svg(&before, &after, &opts)),
        Err(e) => BadRequest(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        let now = 2_000_000_000 * 1_000_000_000i64;
        assert_eq!(parse_time("now", now), Ok(now));
        assert_eq!(parse_time("now-1h", now), Ok(now - 3_600_000_000_000));
        assert_eq!(parse_time("1700000000", now), Ok(1_700_000_000_000_000_000));
        assert_eq!(parse_time("1970-01-01T00:00:10Z", now), Ok(10_000_000_000));
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("-5", now).is_err());
        assert!(parse_time("1e300", now).is_err());
        assert!(parse_time("99999999999", now).is_err());
        assert!(parse_time("now-300y", now).is_err());
        assert!(parse_time("now-100000000000y", now).is_err());
    }

    #[test]
    fn selections_are_checked() {
        let p = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let s = selector(
            &p(&[
                ("query", r#"{process="x"}"#),
                ("start", "10"),
                ("end", "20"),
            ]),
            "",
        )
        .unwrap();
        assert_eq!(s.start_ns, 10_000_000_000);
        assert_eq!(s.matchers, vec![("process".into(), "x".into())]);
        assert!(selector(&p(&[("start", "20"), ("end", "10")]), "").is_err());
        assert!(selector(&p(&[("query", "{bad")]), "").is_err());
        let b = selector(
            &p(&[
                ("base_start", "1"),
                ("base_end", "2"),
                ("query", r#"{process="x"}"#),
            ]),
            "base_",
        )
        .unwrap();
        assert_eq!(b.end_ns, 2_000_000_000);
        assert_eq!(
            b.matchers,
            vec![("process".into(), "x".into())],
            "baseline defaults to the query"
        );
        assert_eq!(s.sample_type, "cpu", "the default type");
        let t = selector(&p(&[("type", "off_cpu"), ("base_end", "2")]), "base_").unwrap();
        assert_eq!(t.sample_type, "off_cpu", "baseline defaults to the type");
        let t = selector(&p(&[("type", "off_cpu"), ("base_type", "cpu")]), "base_").unwrap();
        assert_eq!(t.sample_type, "cpu");
        let e = selector(&p(&[("type", "Off CPU")]), "").unwrap_err();
        assert!(e.contains("type \"Off CPU\" must be"), "{e}");
        assert!(sample_type_param(&p(&[("type", "")])).is_err());
        assert_eq!(sample_type_param(&p(&[])), Ok(None));
    }
}
