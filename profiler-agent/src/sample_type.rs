//! What a sample's value measures. Every layer of the agent carries it, so a
//! window of CPU samples (counts at a frequency) and one of off-CPU time
//! (nanoseconds) never mix; each window sends one batch per type.
use profiler_proto::v1;

/// The type of a profile's values, with its unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SampleType {
    /// Samples of on-CPU stacks taken at the sampling frequency; a value is
    /// a number of samples (CPU time = value / frequency).
    #[default]
    Cpu,
    /// Time threads spent off the CPU, in nanoseconds.
    OffCpu,
}

impl SampleType {
    /// Every type, in a stable order.
    pub const ALL: [SampleType; 2] = [SampleType::Cpu, SampleType::OffCpu];

    /// The type's name on the wire and in queries (`type=`).
    pub fn name(self) -> &'static str {
        match self {
            SampleType::Cpu => "cpu",
            SampleType::OffCpu => "off_cpu",
        }
    }

    /// The unit of the values.
    pub fn unit(self) -> &'static str {
        match self {
            SampleType::Cpu => "samples",
            SampleType::OffCpu => "nanoseconds",
        }
    }

    /// The batch header field.
    pub fn to_proto(self) -> v1::SampleType {
        v1::SampleType {
            r#type: self.name().to_string(),
            unit: self.unit().to_string(),
        }
    }
}

impl std::fmt::Display for SampleType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_units_are_the_wire_pairs() {
        assert_eq!(
            SampleType::Cpu.to_proto(),
            v1::SampleType {
                r#type: "cpu".into(),
                unit: "samples".into()
            }
        );
        assert_eq!(SampleType::OffCpu.name(), "off_cpu");
        assert_eq!(SampleType::OffCpu.unit(), "nanoseconds");
    }
}
