//! The local profile sink: the whole run's folded stacks, one profile per
//! sample type, written at exit as folded text and an inferno flame graph.
//!
//! The `cpu` profile goes to the paths given (`-o`, `--folded`); another
//! type's goes next to them with the type before the extension
//! (`flame.off_cpu.svg`). The given files are opened (not truncated) when
//! the sink is made, so an unwritable path fails before profiling and a
//! failed start leaves an old file intact.
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{BufWriter, Seek, Write},
    path::{Path, PathBuf},
};

use super::sink::{LabelledWindow, RunEnd, Sink};
use crate::{
    fold::FoldedProfile,
    render::{write_svg, RenderInfo},
    sample_type::SampleType,
    Error, Result,
};

/// An output file opened (not truncated) at start.
struct Output {
    path: PathBuf,
    file: File,
    created: bool,
}

impl Output {
    fn open(path: &Path) -> Result<Self> {
        let created = !path.exists();
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map(|file| Output {
                path: path.to_path_buf(),
                file,
                created,
            })
            .map_err(|source| Error::Output {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Replaces the file's content with what `write` produces.
    fn write_with(
        mut self,
        write: impl FnOnce(&mut BufWriter<&mut File>) -> Result<()>,
    ) -> Result<()> {
        let err = |source| Error::Output {
            path: self.path.clone(),
            source,
        };
        self.file.set_len(0).map_err(err)?;
        self.file.rewind().map_err(err)?;
        let mut out = BufWriter::new(&mut self.file);
        write(&mut out)?;
        out.flush().map_err(err)
    }

    /// Removes the file if this run created it (start failed).
    fn abandon(self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The path of `sample_type`'s output next to `path` (`cpu`: `path` itself).
pub fn output_path(path: &Path, sample_type: SampleType) -> PathBuf {
    if sample_type == SampleType::Cpu {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.{sample_type}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{sample_type}"),
    };
    path.with_file_name(name)
}

/// The whole run's profiles, written at exit.
pub struct LocalSink {
    host: String,
    svg: Option<Output>,
    folded: Option<Output>,
    profiles: BTreeMap<SampleType, FoldedProfile>,
}

impl LocalSink {
    /// A sink that writes a flame graph to `svg` and folded stacks to
    /// `folded` at exit (either may be absent); both files are opened now.
    pub fn open(svg: Option<&Path>, folded: Option<&Path>, host: &str) -> Result<Self> {
        let svg = svg.map(Output::open).transpose()?;
        let folded = match folded.map(Output::open).transpose() {
            Ok(out) => out,
            Err(e) => {
                svg.into_iter().for_each(Output::abandon);
                return Err(e);
            }
        };
        Ok(Self {
            host: host.to_string(),
            svg,
            folded,
            profiles: BTreeMap::new(),
        })
    }

    /// Writes a profile of `sample_type` at exit even if no window has one
    /// (an empty flame graph says the type was recorded and nothing came).
    pub fn expect(&mut self, sample_type: SampleType) {
        self.profiles.entry(sample_type).or_default();
    }

    /// Removes the output files this run created: the start failed.
    pub fn abandon(self) {
        self.svg
            .into_iter()
            .chain(self.folded)
            .for_each(Output::abandon);
    }

    /// The profile of one type so far.
    pub fn profile(&self, sample_type: SampleType) -> Option<&FoldedProfile> {
        self.profiles.get(&sample_type)
    }

    /// Every profile, by type.
    pub fn into_profiles(self) -> BTreeMap<SampleType, FoldedProfile> {
        self.profiles
    }

    fn write_outputs(&mut self, end: &RunEnd) -> Result<()> {
        let empty = FoldedProfile::default();
        let mut types: Vec<SampleType> = self.profiles.keys().copied().collect();
        if !types.contains(&SampleType::Cpu) {
            types.insert(0, SampleType::Cpu);
        }
        let given_folded = self.folded.as_ref().map(|o| o.path.clone());
        let given_svg = self.svg.as_ref().map(|o| o.path.clone());
        for sample_type in types {
            let profile = self.profiles.get(&sample_type).unwrap_or(&empty);
            if let Some(path) = &given_folded {
                let out = if sample_type == SampleType::Cpu {
                    self.folded.take()
                } else {
                    Some(Output::open(&output_path(path, sample_type))?)
                };
                if let Some(out) = out {
                    let path = out.path.clone();
                    out.write_with(|w| {
                        profile
                            .write_to(w)
                            .map_err(|source| Error::Output { path, source })
                    })?;
                }
            }
            if let Some(path) = &given_svg {
                let out = if sample_type == SampleType::Cpu {
                    self.svg.take()
                } else {
                    Some(Output::open(&output_path(path, sample_type))?)
                };
                if let Some(out) = out {
                    let info = RenderInfo {
                        host: self.host.clone(),
                        duration_secs: end.duration.as_secs_f64(),
                        frequency: end.frequency,
                        sample_type,
                    };
                    out.write_with(|w| write_svg(profile, &info, w))?;
                }
            }
        }
        Ok(())
    }
}

impl Sink for LocalSink {
    fn window(&mut self, window: &LabelledWindow) {
        let profile = self.profiles.entry(window.sample_type).or_default();
        for sample in &window.samples {
            profile.add(&sample.labels.process, &sample.frames, sample.value);
        }
    }

    /// Writes the outputs; the given files are written once (a second call
    /// finds them taken).
    fn finish(&mut self, end: &RunEnd) -> Result<()> {
        if self.svg.is_none() && self.folded.is_none() {
            return Ok(());
        }
        self.write_outputs(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_types_go_next_to_the_given_paths() {
        let p = Path::new("/tmp/out/flame.svg");
        assert_eq!(output_path(p, SampleType::Cpu), p);
        assert_eq!(
            output_path(p, SampleType::OffCpu),
            Path::new("/tmp/out/flame.off_cpu.svg")
        );
        assert_eq!(
            output_path(Path::new("stacks"), SampleType::OffCpu),
            Path::new("stacks.off_cpu")
        );
    }

    #[test]
    fn an_unwritable_folded_path_removes_the_svg_it_created() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("f.svg");
        let err = LocalSink::open(Some(&svg), Some(&dir.path().join("no/such/dir.txt")), "h")
            .err()
            .expect("the folded path cannot be opened");
        assert!(err.to_string().contains("no/such/dir.txt"), "{err}");
        assert!(!svg.exists(), "the svg this start created is removed");
    }
}
