//! Flame graph SVGs rendered by inferno from folded stacks.
use std::io::Write;

use crate::{fold::FoldedProfile, sample_type::SampleType, Error, Result};

/// What the flame graph's title says about the recording.
#[derive(Clone, Debug)]
pub struct RenderInfo {
    pub host: String,
    pub duration_secs: f64,
    pub frequency: u64,
    /// What the profile's values measure.
    pub sample_type: SampleType,
}

/// The title: host, duration, and the total in the type's unit (with the
/// sampling frequency for `cpu`).
pub fn title(info: &RenderInfo, total: u64) -> String {
    match info.sample_type {
        SampleType::Cpu => format!(
            "CPU profile of {} — {:.1} s at {} Hz, {} samples",
            info.host, info.duration_secs, info.frequency, total
        ),
        other => format!(
            "{} profile of {} — {:.1} s, {} {}",
            other,
            info.host,
            info.duration_secs,
            total,
            other.unit()
        ),
    }
}

/// Writes an SVG flame graph of `profile`.
pub fn write_svg(profile: &FoldedProfile, info: &RenderInfo, out: impl Write) -> Result<()> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = title(info, profile.total());
    options.count_name = info.sample_type.unit().into();
    options.hash = true;
    options.deterministic = true;
    let lines = profile.lines();
    if lines.is_empty() {
        // inferno refuses empty input; say so in the picture instead.
        options.subtitle = Some("no samples were recorded".into());
        return inferno::flamegraph::from_lines(
            &mut options,
            ["[no samples] 1"].iter().copied(),
            out,
        )
        .map_err(|e| Error::Render(e.to_string()));
    }
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
        .map_err(|e| Error::Render(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_title_and_frames() {
        let mut profile = FoldedProfile::default();
        profile.add("app", &["main".into(), "hot_loop".into()], 75);
        profile.add("app", &["main".into(), "cold_path".into()], 25);
        let info = RenderInfo {
            host: "box".into(),
            duration_secs: 10.0,
            frequency: 99,
            sample_type: SampleType::Cpu,
        };
        let mut svg = Vec::new();
        write_svg(&profile, &info, &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("CPU profile of box — 10.0 s at 99 Hz, 100 samples"));
        assert!(svg.contains("hot_loop (75 samples, 75.00%)"), "{svg}");
        assert!(svg.contains("cold_path (25 samples, 25.00%)"));
    }

    #[test]
    fn empty_profile_still_renders() {
        let info = RenderInfo {
            host: "box".into(),
            duration_secs: 1.0,
            frequency: 99,
            sample_type: SampleType::Cpu,
        };
        let mut svg = Vec::new();
        write_svg(&FoldedProfile::default(), &info, &mut svg).unwrap();
        assert!(String::from_utf8(svg)
            .unwrap()
            .contains("no samples were recorded"));
    }

    #[test]
    fn other_types_are_titled_in_their_unit() {
        let mut profile = FoldedProfile::default();
        profile.add("app", &["main".into(), "wait".into()], 2_000_000);
        let info = RenderInfo {
            host: "box".into(),
            duration_secs: 10.0,
            frequency: 99,
            sample_type: SampleType::OffCpu,
        };
        let mut svg = Vec::new();
        write_svg(&profile, &info, &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(
            svg.contains("off_cpu profile of box — 10.0 s, 2000000 nanoseconds"),
            "{svg}"
        );
        assert!(
            svg.contains("wait (2,000,000 nanoseconds, 100.00%)"),
            "{svg}"
        );
    }
}
