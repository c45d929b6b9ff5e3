//! The sink stage: where symbolized, labelled windows go. A sink gets one
//! [`LabelledWindow`] per drain and sample type, then one
//! [`Sink::finish`] at exit; it knows nothing of the other stages, so a new
//! destination is a new [`Sink`] and nothing else.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::label::Labels;
use crate::{sample_type::SampleType, Result};

/// One sample ready for a sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledSample {
    /// Shared by the samples of a process in a window.
    pub labels: Arc<Labels>,
    /// Frame names, root first (user, then kernel frames); empty when the
    /// sample had no stack.
    pub frames: Vec<String>,
    /// In the unit of the window's sample type.
    pub value: u64,
}

impl LabelledSample {
    /// The sample's stack as the profile and the collector show it: the
    /// process as the root frame, [`crate::fold::NO_STACK_FRAME`] for a
    /// sample without a stack.
    pub fn full_stack(&self) -> Vec<String> {
        let mut frames = Vec::with_capacity(self.frames.len() + 1);
        frames.push(self.labels.process.clone());
        if self.frames.is_empty() {
            frames.push(crate::fold::NO_STACK_FRAME.to_string());
        }
        frames.extend(self.frames.iter().cloned());
        frames
    }
}

/// The samples of one type drained in one window.
#[derive(Clone, Debug)]
pub struct LabelledWindow {
    pub sample_type: SampleType,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Sampling frequency per CPU of a sampled type (`cpu`); 0 for types
    /// whose values are measured.
    pub frequency_hz: u32,
    pub samples: Vec<LabelledSample>,
}

impl LabelledWindow {
    /// Sum of the values.
    pub fn total(&self) -> u64 {
        self.samples.iter().map(|s| s.value).sum()
    }
}

/// What a sink learns at exit.
#[derive(Clone, Debug)]
pub struct RunEnd {
    /// Time from the start of sampling to its stop.
    pub duration: Duration,
    /// Sampling frequency per CPU, in Hz.
    pub frequency: u64,
}

/// A destination of windows.
pub trait Sink {
    /// Takes one window of one sample type. Every drain gives a `cpu`
    /// window, empty or not, and a window of each other type present.
    fn window(&mut self, window: &LabelledWindow);
    /// Called once, after the last window: write, flush, hand over.
    fn finish(&mut self, end: &RunEnd) -> Result<()>;
    /// The memory watchdog asks to give back memory (e.g. move a queue to
    /// disk). Nothing by default.
    fn shed_memory(&mut self) {}
}
