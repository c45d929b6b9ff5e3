//! What a query picks, parsed from request parameters: the label selector
//! `{name="value",...}`, times (`parse_time`), the range, the sample type
//! (`type=`, default `cpu`), and the [`Selector`] they make; also the
//! rendering parameters (`min_width`, `max_nodes`, `n`). Every error names
//! the parameter that was wrong.
use std::collections::HashMap;

use crate::{
    clock::now_ns,
    model::{Selector, CPU},
    render::{count_name, SvgOptions},
    validate::{valid_label_name, valid_type_name},
};

/// The longest range a query may span.
const MAX_RANGE_NS: i64 = 400 * 24 * 3600 * 1_000_000_000;

/// Parses a label selector `{name="value", ...}` (the braces are optional;
/// `\"` and `\\` escape inside values).
pub fn parse_selector(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut s = text.trim();
    if let Some(inner) = s.strip_prefix('{') {
        s = inner
            .strip_suffix('}')
            .ok_or_else(|| format!("selector {text:?} has no closing brace"))?;
    }
    let mut matchers = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut name = String::new();
        while let Some(c) = chars.peek().copied() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        if !valid_label_name(&name) {
            return Err(format!("invalid label name {name:?} in selector"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') || chars.next() != Some('"') {
            return Err(format!("expected {name}=\"value\" in selector"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some(c) => value.push(c),
                    None => return Err("selector ends inside an escape".into()),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => return Err(format!("unterminated value for label {name}")),
            }
        }
        matchers.push((name, value));
    }
    Ok(matchers)
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
    let matchers = parse_selector(query)?;
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

/// Flame graph options from the `min_width` and `max_nodes` parameters,
/// values named after `unit`.
pub fn svg_options(
    params: &HashMap<String, String>,
    title: String,
    unit: &str,
) -> Result<SvgOptions, String> {
    let mut opts = SvgOptions {
        title,
        count_name: count_name(unit),
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

/// How many functions `/api/v1/top` lists: the `n` parameter, 1-10000, default 20.
pub fn top_n(params: &HashMap<String, String>) -> Result<usize, String> {
    match params.get("n").map(|n| n.parse::<usize>()) {
        None => Ok(20),
        Some(Ok(n)) if (1..=10_000).contains(&n) => Ok(n),
        Some(_) => Err("n must be 1-10000".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_reject_garbage() {
        assert_eq!(
            parse_selector(r#"{process="chain", node="vm"}"#).unwrap(),
            vec![
                ("process".into(), "chain".into()),
                ("node".into(), "vm".into())
            ]
        );
        assert_eq!(parse_selector("").unwrap(), vec![]);
        assert_eq!(parse_selector("{}").unwrap(), vec![]);
        assert_eq!(
            parse_selector(r#"process="a\"b\\c""#).unwrap(),
            vec![("process".into(), r#"a"b\c"#.into())]
        );
        assert_eq!(
            parse_selector(r#"{process="'; DROP TABLE samples; --"}"#).unwrap()[0].1,
            "'; DROP TABLE samples; --"
        );
        assert!(parse_selector(r#"{process="x""#).is_err());
        assert!(parse_selector(r#"{pro cess="x"}"#).is_err());
        assert!(parse_selector(r#"{process=x}"#).is_err());
        assert!(parse_selector(r#"{1x="y"}"#).is_err());
    }

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
