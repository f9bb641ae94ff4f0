//! Initialisation of A: Kaiming-uniform from a seeded, platform-independent
//! generator, so a seed gives the same adapter everywhere.

use crate::dtype::DType;

/// SplitMix64 (Steele, Lea, Flood 2014): a full-period 64-bit generator that
/// needs no dependency and gives the same stream on every platform.
#[derive(Clone, Copy, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `D × rank` values uniform in `±1/√D` (kaiming_uniform with a = √5 and
/// fan-in D), from a SplitMix64 stream seeded by `seed`, rounded to `T`.
pub fn kaiming_uniform<T: DType>(d: usize, rank: usize, seed: u64) -> Vec<T> {
    let bound = 1.0 / (d as f64).sqrt();
    let mut rng = SplitMix64::new(seed);
    (0..d * rank)
        .map(|_| T::from_f64((2.0 * rng.next_f64() - 1.0) * bound))
        .collect()
}
