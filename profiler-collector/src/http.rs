//! The HTTP API and the web UI: routes and their responses (parameters
//! are parsed in [`crate::selection`], answers drawn in [`crate::render`]).
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
//! | `GET /api/v1/quality` | the share of complete stacks, and of cut ones by reason (JSON) |
//! | `GET /api/v1/diff.svg` | differential flame graph: `base_*` against the selection |
//! | `GET /api/v1/contention` | lock contention: futex waits of the `off_cpu` profile by lock site, and Go's on-CPU lock spinning (JSON) |
//! | `POST /api/v1/ingest/pprof` | stores a pprof profile (gzipped or plain); query parameters are its labels |
//! | `POST /v1development/profiles` | stores OTLP profiles (OTLP/HTTP, protobuf) |
//! | `GET /api/v1/go/gc` | Go's GC tax: per Go process (`runtime=go`), CPU shares of marking, assists, allocation, sweeping, write barriers, flags, top allocation sites (JSON) |
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
    metrics::Metrics,
    model::{Profile, SampleType, Selector},
    render::{self, title, type_title, StackQuality},
    selection::{sample_type_param, selector, svg_options, top_n},
    store::{SharedStore, Store},
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
        .route("/api/v1/quality", get(quality))
        .route("/api/v1/diff.svg", get(diff))
        .route("/api/v1/contention", get(contention))
        .route("/api/v1/go/gc", get(go_gc))
        .with_state(state)
}

/// The ingest routes of the HTTP port (bodies up to `max_bytes`), see
/// [`crate::receivers`].
pub fn ingest_router(state: crate::receivers::HttpIngest, max_bytes: usize) -> Router {
    use crate::receivers::{otlp_http, otlp_other_version, pprof_upload, OTLP_HTTP_PATH};
    use axum::routing::post;
    Router::new()
        .route("/api/v1/ingest/pprof", post(pprof_upload))
        .route(OTLP_HTTP_PATH, post(otlp_http))
        .route("/v1experimental/profiles", post(otlp_other_version))
        .route("/v1/profiles", post(otlp_other_version))
        // Room for a gzip header on a body at the limit; the inflated
        // size is checked against `max_bytes` itself.
        .layer(axum::extract::DefaultBodyLimit::max(
            max_bytes.saturating_add(1 << 10),
        ))
        .with_state(state)
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
    if sel.sample_type == crate::wall::WALL {
        return wall_profile(state, sel).await;
    }
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

/// The wall view of a selection (`type=wall`): its `cpu` and `off_cpu`
/// samples on one axis, in nanoseconds ([`crate::wall`]).
async fn wall_profile(
    state: &AppState,
    sel: Selector,
) -> Result<(Selector, Profile, SampleType), Response> {
    let of_type = |t: &str| Selector {
        sample_type: t.to_string(),
        ..sel.clone()
    };
    let (cpu_sel, off_sel) = (of_type(crate::model::CPU), of_type(crate::model::OFF_CPU));
    let (cpu, off, frequencies) = with_store(state, move |s| {
        Ok((
            s.profile(&cpu_sel)?,
            s.profile(&off_sel)?,
            s.cpu_frequencies(cpu_sel.start_ns, cpu_sel.end_ns)?,
        ))
    })
    .await?;
    let profile =
        crate::wall::wall(&cpu, &off, &frequencies).map_err(|e| BadRequest(e).into_response())?;
    let sample_type = SampleType::new(crate::wall::WALL, crate::wall::WALL_UNIT);
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
        Ok(mut types) => {
            // The wall view is offered where both of its types exist.
            let has = |t: &str| types.iter().any(|s| s.name == t);
            if has(crate::model::CPU) && has(crate::model::OFF_CPU) {
                types.push(SampleType::new(crate::wall::WALL, crate::wall::WALL_UNIT));
            }
            Json(types).into_response()
        }
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
        Ok(opts) => svg_response(render::svg(&profile, &opts)),
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
            render::pprof_gz(
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
            "functions": render::top(&profile, n),
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// The contention preset: the selection's `off_cpu` time waiting in a
/// futex, by lock site (`n` of them, default 10), and the share of its
/// `cpu` samples spinning in Go's locks.
async fn contention(State(state): State<AppState>, Query(params): Params) -> Response {
    let n = match top_n(&params) {
        Ok(n) => n,
        Err(e) => return BadRequest(e).into_response(),
    };
    let with_type = |t: &str| {
        let mut p = params.clone();
        p.insert("type".to_string(), t.to_string());
        p
    };
    let off = match profile_for(&state, &with_type(crate::model::OFF_CPU), "").await {
        Ok((_, profile, _)) => profile,
        Err(r) => return r,
    };
    let cpu = match profile_for(&state, &with_type(crate::model::CPU), "").await {
        Ok((_, profile, _)) => profile,
        Err(r) => return r,
    };
    let view = crate::contention::contention(&off, n);
    let share = |part: u64, whole: u64| (whole > 0).then(|| part as f64 / whole as f64);
    let sites: Vec<serde_json::Value> = view
        .sites
        .iter()
        .map(|s| {
            let holders: Vec<serde_json::Value> = s
                .holders
                .iter()
                .map(|h| {
                    serde_json::json!({
                        "site": h.site,
                        "stack": h.stack,
                        "wait_ns": h.wait,
                        "share": share(h.wait, s.wait),
                    })
                })
                .collect();
            serde_json::json!({
                "site": s.site,
                "stack": s.stack,
                "wait_ns": s.wait,
                "share": share(s.wait, view.futex_wait),
                "holders": holders,
            })
        })
        .collect();
    let functions: Vec<serde_json::Value> = view
        .functions
        .iter()
        .map(|(f, w)| serde_json::json!({"function": f, "wait_ns": w, "share": share(*w, view.futex_wait)}))
        .collect();
    let cpu_total = cpu.total();
    let spin: Vec<serde_json::Value> = crate::contention::go_lock_spin(&cpu)
        .into_iter()
        .map(
            |(f, v)| serde_json::json!({"function": f, "samples": v, "share": share(v, cpu_total)}),
        )
        .collect();
    Json(serde_json::json!({
        "off_cpu_ns": view.total,
        "futex_wait_ns": view.futex_wait,
        "sites": sites,
        "functions": functions,
        "woken_known_ns": view.woken_known,
        "holder_functions": view.holder_functions.iter()
            .map(|(f, w)| serde_json::json!({"function": f, "wait_ns": w, "share": share(*w, view.futex_wait)}))
            .collect::<Vec<_>>(),
        "cpu_samples": cpu_total,
        "go_lock_spin": spin,
    }))
    .into_response()
}

/// Go's GC tax in the selection's `cpu` samples of Go processes (those
/// labelled `runtime=go`): per process, the figures of [`crate::gogc`]
/// and `n` allocation sites (default 10).
async fn go_gc(State(state): State<AppState>, Query(params): Params) -> Response {
    let n = match top_n(&params) {
        Ok(n) => n,
        Err(e) => return BadRequest(e).into_response(),
    };
    let mut params = params;
    params.insert("type".to_string(), crate::model::CPU.to_string());
    let mut sel = match selector(&params, "") {
        Ok(sel) => sel,
        Err(e) => return BadRequest(e).into_response(),
    };
    sel.matchers.retain(|(name, _)| name != "runtime");
    sel.matchers.push(("runtime".to_string(), "go".to_string()));
    let profile = match with_store(&state, move |s| s.profile(&sel)).await {
        Ok(profile) => profile,
        Err(r) => return r,
    };
    Json(serde_json::json!({
        "alloc_threshold": crate::gogc::ALLOC_THRESHOLD,
        "assist_threshold": crate::gogc::ASSIST_THRESHOLD,
        "processes": crate::gogc::go_gc(&profile, n),
    }))
    .into_response()
}

/// Stack quality of the selection: `total`, `complete` and `cut` values
/// with their shares (0-1, `null` when the selection is empty), and
/// `cut_by_reason`, most first.
async fn quality(State(state): State<AppState>, Query(params): Params) -> Response {
    match profile_for(&state, &params, "").await {
        Ok((_, profile, sample_type)) => {
            let q = StackQuality::of(&profile);
            let reasons: Vec<serde_json::Value> = q
                .reasons()
                .into_iter()
                .map(|(reason, value)| {
                    serde_json::json!({
                        "reason": reason,
                        "value": value,
                        "share": q.share(value),
                    })
                })
                .collect();
            Json(serde_json::json!({
                "type": sample_type.name,
                "unit": sample_type.unit,
                "total": q.total,
                "complete": q.complete(),
                "complete_share": q.share(q.complete()),
                "cut": q.cut_total(),
                "cut_share": q.share(q.cut_total()),
                "cut_by_reason": reasons,
            }))
            .into_response()
        }
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
        Ok(opts) => svg_response(render::diff_svg(&before, &after, &opts)),
        Err(e) => BadRequest(e).into_response(),
    }
}
