//! A seeded random generator for test data and benchmarks: the same seed
//! gives the same sequence on every machine and run (xorshift64*).

/// xorshift64*: fast, reproducible, not for anything secret.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fixed by `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index drawn from cumulative weights `cum` (ascending, not empty).
    pub fn pick(&mut self, cum: &[f64]) -> usize {
        let x = self.unit() * cum[cum.len() - 1];
        cum.partition_point(|&c| c < x).min(cum.len() - 1)
    }
}

/// Cumulative Zipf weights of `n` ranks with exponent `s`, for [`Rng::pick`].
pub fn zipf_cumulative(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    (0..n)
        .map(|i| {
            acc += 1.0 / ((i + 1) as f64).powf(s);
            acc
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let (mut a, mut b, mut c) = (Rng::new(7), Rng::new(7), Rng::new(8));
        let sa: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let sb: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        let sc: Vec<u64> = (0..5).map(|_| c.next_u64()).collect();
        assert_eq!(sa, sb);
        assert_ne!(sa, sc);
        assert_ne!(Rng::new(0).next_u64(), 0, "seed 0 still moves");
    }

    #[test]
    fn draws_stay_in_range_and_follow_the_weights() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            assert!(rng.below(3) < 3);
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
        }
        let cum = zipf_cumulative(4, 1.0);
        let mut hits = [0usize; 4];
        for _ in 0..10_000 {
            hits[rng.pick(&cum)] += 1;
        }
        // Rank 1 has weight 1, rank 4 weight 1/4 (of 2.083 in all).
        assert!(hits[0] > 4000 && hits[0] < 5600, "{hits:?}");
        assert!(hits[3] > 900 && hits[3] < 1500, "{hits:?}");
    }
}
