#![no_main]
//! See `profiler_fuzz::check_otlp` for the invariants checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| profiler_fuzz::check_otlp(data));
