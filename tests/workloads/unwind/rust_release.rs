//! Rust as `cargo build --release` builds it: rustc -C opt-level=3
//! -C strip=debuginfo, no forced frame pointers.
//!
//! Expected chains (share of the process's samples), names demangled:
//!   rust_release::main -> rust_release::run -> rust_release::top
//!     -> rust_release::mid -> rust_release::leaf_a   75 %
//!   ... rust_release::mid -> rust_release::leaf_b    25 %
//!
//! Each round gives leaf_a three times the units of leaf_b, the round's size
//! drawn at random (the same work loop as the C workloads' work.h). Every
//! function of the chain is `#[inline(never)]` and works after its call.
use std::hint::black_box;
use std::time::{Duration, Instant};

/// `n` units of work on `x`, in registers only.
#[inline(always)]
fn work(mut x: u64, n: u64) -> u64 {
    for i in 0..n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        // SAFETY: an empty asm block that only claims to change `x`.
        unsafe { std::arch::asm!("/* {0} */", inout(reg) x, options(nomem, nostack, preserves_flags)) };
    }
    x
}

fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

#[inline(never)]
fn leaf_a(x: u64, n: u64) -> u64 {
    work(x, n)
}

#[inline(never)]
fn leaf_b(x: u64, n: u64) -> u64 {
    work(x, n)
}

#[inline(never)]
fn mid(seed: u64, n: u64) -> u64 {
    let a = black_box(leaf_a(seed, 3 * n));
    let b = black_box(leaf_b(a ^ seed, n));
    a ^ b.rotate_left(7) ^ n
}

#[inline(never)]
fn top(seed: u64, rng: &mut u64) -> u64 {
    let n = 4_000_000 + next_random(rng) % 12_000_000;
    black_box(mid(seed, n)).wrapping_add(seed)
}

#[inline(never)]
fn run(seconds: f64) -> u64 {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let (mut rng, mut x) = (88172645463325252u64, 1u64);
    while Instant::now() < end {
        x = black_box(top(x, &mut rng));
    }
    x
}

#[inline(never)]
fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let x = run(seconds);
    println!("{x}");
}
