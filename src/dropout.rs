//! Adapter dropout: the checked [`Dropout`] parameters and the host's twin of
//! the kernels' mask generator.
//!
//! The adapter sees `drop(X) = M ⊙ X / (1 − p)` (PEFT's `lora_dropout`),
//! the frozen path `X`. The mask `M` is never stored: the forward and the
//! backward regenerate it from Philox4x32-10 keyed by `(seed, offset)` and
//! each element's `(token, column)`, with the mapping of
//! `kernels/params.h` (`singlora_dropout`):
//!
//! ```text
//! key     = (seed lo32, seed hi32)
//! counter = (column / 4, token lo32, offset lo32, offset hi32)
//! keep    = word (column % 4) of Philox4x32-10(counter, key) >= threshold
//! ```
//!
//! [`philox4x32_10`] is the same generator as `kernels/common/philox.cuh`
//! (tests/philox.rs compiles that header as host C++ and compares the two,
//! and checks this one against Random123's known-answer vectors), so the
//! f64 reference ([`crate::reference`]) computes bitwise the kernels' mask.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::params::singlora_dropout;

/// The Random123 constants (philox.h: `PHILOX_M4x32_0/1`, `PHILOX_W32_0/1`).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds (Salmon et al., SC11; Random123's
/// `philox4x32_R(10, ctr, key)`): four counter words and two key words to
/// four output words.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = ctr;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(c0);
        let p1 = u64::from(M1) * u64::from(c2);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    [c0, c1, c2, c3]
}

/// Most tokens one call with dropout can address: the counter holds the
/// token's low 32 bits.
pub const MAX_DROPOUT_TOKENS: u64 = 1 << 32;

/// Adapter dropout of one forward and its backward: probability `p` of
/// dropping an element of the adapter's input, and the `(seed, offset)`
/// pair that keys the mask. The same value must reach the forward and the
/// backward that differentiates it; a training loop advances `offset` once
/// per forward ([`crate::SingLoraLinear`] does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    p: f64,
    seed: u64,
    offset: u64,
}

impl Default for Dropout {
    fn default() -> Self {
        Self::NONE
    }
}

impl Dropout {
    /// No dropout: the kernels do no mask work (bitwise the undropped path).
    pub const NONE: Dropout = Dropout {
        p: 0.0,
        seed: 0,
        offset: 0,
    };

    /// Dropout with probability `p` in `[0, 1)` keyed by `(seed, offset)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `p` when it is outside `[0, 1)` or
    /// not finite.
    pub fn new(p: f64, seed: u64, offset: u64) -> Result<Self> {
        check_p("p", p)?;
        Ok(Self { p, seed, offset })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The same probability and seed at another offset.
    pub fn at_offset(&self, offset: u64) -> Self {
        Self { offset, ..*self }
    }

    /// The u32 nearest `p·2³²` (saturated at `2³² − 1`): an element keeps
    /// iff its word is at least this. 0 means off (p = 0, or p < 2⁻³³).
    pub fn threshold(&self) -> u32 {
        let t = (self.p * 4_294_967_296.0).round();
        if t >= u32::MAX as f64 {
            u32::MAX
        } else {
            t as u32
        }
    }

    /// The mask does anything (`threshold() != 0`).
    pub fn is_active(&self) -> bool {
        self.threshold() != 0
    }

    /// `1 / (1 − p)` in f64 (the reference's factor).
    pub fn keep_scale(&self) -> f64 {
        1.0 / (1.0 - self.p)
    }

    /// Refuses token counts the mapping cannot address when active (more
    /// than 2³²: the counter holds 32 bits of the token).
    pub fn check_tokens(&self, tokens: usize) -> Result<()> {
        if self.is_active() && tokens as u64 > MAX_DROPOUT_TOKENS {
            return Err(Error::InvalidDim {
                name: "tokens",
                expected: "at most 2^32 with dropout p > 0 (the mask's counter holds 32 bits of the token)"
                    .into(),
                actual: tokens as u64,
            });
        }
        Ok(())
    }

    /// The four mask words of elements `(token, 4·col4 .. 4·col4 + 4)`.
    pub fn words(&self, token: u64, col4: u32) -> [u32; 4] {
        philox4x32_10(
            [
                col4,
                token as u32,
                self.offset as u32,
                (self.offset >> 32) as u32,
            ],
            [self.seed as u32, (self.seed >> 32) as u32],
        )
    }

    /// Whether element `(token, col)` of the dropped matrix is kept
    /// (always, when inactive).
    pub fn keeps(&self, token: u64, col: usize) -> bool {
        let th = self.threshold();
        th == 0 || self.words(token, (col / 4) as u32)[col % 4] >= th
    }

    /// The mask of a `rows × cols` matrix, row-major (`true`: kept).
    pub fn mask(&self, rows: usize, cols: usize) -> Vec<bool> {
        let th = self.threshold();
        let mut m = vec![true; rows * cols];
        if th == 0 {
            return m;
        }
        for (t, row) in m.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
            for (c4, quad) in row.chunks_mut(4).enumerate() {
                let w = self.words(t as u64, c4 as u32);
                for (k, keep) in quad.iter_mut().enumerate() {
                    *keep = w[k] >= th;
                }
            }
        }
        m
    }

    /// The kernels' parameter block (threshold 0: off).
    pub fn param(&self) -> singlora_dropout {
        let threshold = self.threshold();
        singlora_dropout {
            seed: self.seed,
            offset: self.offset,
            threshold,
            scale: if threshold == 0 {
                1.0
            } else {
                self.keep_scale() as f32
            },
        }
    }
}

/// Refuses a drop probability outside `[0, 1)` or not finite, naming `name`.
pub(crate) fn check_p(name: &'static str, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(name, "a probability in [0, 1)", p));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_and_scale() {
        assert_eq!(Dropout::NONE.threshold(), 0);
        assert!(!Dropout::NONE.is_active());
        assert_eq!(Dropout::NONE.param().scale, 1.0);
        let d = Dropout::new(0.5, 1, 2).unwrap();
        assert_eq!(d.threshold(), 1 << 31);
        assert_eq!(d.param().scale, 2.0);
        assert_eq!(Dropout::new(0.25, 0, 0).unwrap().threshold(), 1 << 30);
        // Tiny p rounds to threshold 0: off (keep probability 1 − 2^-33 at most away).
        assert_eq!(Dropout::new(1e-11, 0, 0).unwrap().threshold(), 0);
        // Close to 1: saturated.
        let near_one = Dropout::new(1.0 - 1e-12, 0, 0).unwrap();
        assert_eq!(near_one.threshold(), u32::MAX);
        assert_eq!(
            Dropout::new(0.1, 0, 0).unwrap().param().scale,
            (1.0 / 0.9f64) as f32
        );
    }

    #[test]
    fn refusals_name_p() {
        for p in [
            1.0,
            1.5,
            -0.1,
            -0.0 - 1e-300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let e = Dropout::new(p, 0, 0).unwrap_err();
            assert_eq!(e.argument(), Some("p"), "p = {p}: {e}");
        }
        assert!(Dropout::new(0.0, 0, 0).is_ok());
        assert!(Dropout::new(-0.0, 0, 0).is_ok());
    }

    #[test]
    fn tokens_beyond_the_counter_are_refused_only_when_active() {
        let d = Dropout::new(0.1, 0, 0).unwrap();
        assert!(d.check_tokens(1 << 32).is_ok());
        let e = d.check_tokens((1 << 32) + 1).unwrap_err();
        assert_eq!(e.argument(), Some("tokens"));
        assert!(Dropout::NONE.check_tokens(usize::MAX).is_ok());
    }

    #[test]
    fn mask_agrees_with_keeps() {
        let d = Dropout::new(0.3, 0x1234_5678_9abc_def0, 77).unwrap();
        let (rows, cols) = (5, 11);
        let m = d.mask(rows, cols);
        for t in 0..rows {
            for c in 0..cols {
                assert_eq!(m[t * cols + c], d.keeps(t as u64, c));
            }
        }
    }

    /// The keep rate over 2^20 elements is within 4 standard deviations of
    /// 1 − p, for several p, seeds and offsets; different offsets give
    /// different masks.
    #[test]
    fn keep_rate_within_four_sigma() {
        let (rows, cols) = (1024, 1024);
        let n = (rows * cols) as f64;
        for (p, seed, offset) in [
            (0.1, 0, 0),
            (0.5, 42, 7),
            (0.9, u64::MAX, u64::MAX),
            (0.01, 3, 1 << 40),
        ] {
            let d = Dropout::new(p, seed, offset).unwrap();
            let kept = d.mask(rows, cols).iter().filter(|&&k| k).count() as f64;
            let q = 1.0 - p;
            let sigma = (n * p * q).sqrt();
            assert!(
                (kept - n * q).abs() <= 4.0 * sigma,
                "p = {p}: kept {kept} of {n}, expected {} ± {}",
                n * q,
                4.0 * sigma
            );
        }
        let d = Dropout::new(0.5, 9, 0).unwrap();
        assert_ne!(d.mask(16, 16), d.at_offset(1).mask(16, 16));
    }
}

/// A layer's adapter dropout over a run: the probability, the masks' seed,
/// the offset the next training-mode forward takes, and training or eval
/// mode. Each training-mode forward draws its [`Dropout`] with
/// [`next`](Self::next) (the offset advances once; atomically, because a
/// layer's forward takes `&self`); eval mode draws [`Dropout::NONE`] and no
/// offset. [`crate::SingLoraLinear`] and singlora-candle's layer keep one.
#[derive(Debug)]
pub struct DropoutSchedule {
    p: f64,
    seed: u64,
    offset: AtomicU64,
    training: bool,
}

impl DropoutSchedule {
    /// No dropout (p = 0), masks keyed by `seed` from offset 0, training
    /// mode.
    pub fn new(seed: u64) -> Self {
        Self {
            p: 0.0,
            seed,
            offset: AtomicU64::new(0),
            training: true,
        }
    }

    /// Sets the probability; refused (naming `p`, nothing changed) outside
    /// `[0, 1)` or not finite.
    pub fn set_p(&mut self, p: f64) -> Result<()> {
        check_p("p", p)?;
        self.p = p;
        Ok(())
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// Sets the masks' seed and restarts the offset at `offset` (to resume a
    /// run: the same seed, the offset reached).
    pub fn set_seed(&mut self, seed: u64, offset: u64) {
        self.seed = seed;
        *self.offset.get_mut() = offset;
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The offset the next training-mode forward takes.
    pub fn offset(&self) -> u64 {
        self.offset.load(Ordering::Relaxed)
    }

    /// Training mode (dropout on, the default) or eval mode (no dropout).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The dropout of a forward in training (`train`, taking the next
    /// offset) or eval mode ([`Dropout::NONE`], no offset taken).
    pub fn next(&self, train: bool) -> Result<Dropout> {
        if !train {
            return Ok(Dropout::NONE);
        }
        let offset = self.offset.fetch_add(1, Ordering::Relaxed);
        Dropout::new(self.p, self.seed, offset)
    }

    /// Gives back the offset of `taken`, drawn by `next(true)` for a forward
    /// that was then refused, unless another forward has taken the next one
    /// meanwhile. Not for an eval-mode draw, which took no offset.
    pub fn give_back(&self, taken: Dropout) {
        let offset = taken.offset();
        let _ = self.offset.compare_exchange(
            offset.wrapping_add(1),
            offset,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}
