//! Rust workload built with frame pointers: main -> crunch::hot_rust_loop.
use std::time::{Duration, Instant};

mod crunch {
    #[inline(never)]
    pub fn hot_rust_loop(seed: u64) -> u64 {
        // A local array keeps a stack frame in this leaf.
        let mut state = [seed; 8];
        for i in 0..2_000_000u64 {
            let j = (i & 7) as usize;
            state[j] = state[j].wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(&mut state);
        state.iter().fold(0, |a, b| a ^ b)
    }
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut sink = 0;
    while Instant::now() < end {
        sink ^= crunch::hot_rust_loop(sink);
    }
    std::hint::black_box(sink);
}
