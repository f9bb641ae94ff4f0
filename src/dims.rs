//! Problem dimensions and the argument checks every launcher runs first.

use crate::error::{Error, Result};

/// The shape of one SingLoRA layer call.
///
/// `W0` is `d_out × d_in` (PyTorch `nn.Linear` orientation), `A` is
/// `D × rank` with `D = max(d_in, d_out)`; `A_in = A[:d_in]`,
/// `A_out = A[:d_out]`. `tokens` is the number of rows of X (0 is a no-op).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
}

/// Largest rank the kernels accept.
pub const MAX_RANK: usize = crate::params::SINGLORA_MAX_RANK as usize;

/// The kernels index columns and rows of A with 32-bit integers.
const MAX_D: usize = i32::MAX as usize;

impl Dims {
    /// Builds and validates.
    pub fn new(tokens: usize, d_in: usize, d_out: usize, rank: usize) -> Result<Self> {
        let dims = Self {
            tokens,
            d_in,
            d_out,
            rank,
        };
        dims.validate()?;
        Ok(dims)
    }

    /// rank in 1..=256, d_in and d_out in 1..=i32::MAX, and every contiguous
    /// buffer size representable.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > MAX_RANK {
            return Err(Error::InvalidDim {
                name: "rank",
                expected: format!("1..={MAX_RANK}"),
                actual: self.rank as u64,
            });
        }
        for (name, v) in [("d_in", self.d_in), ("d_out", self.d_out)] {
            if v == 0 || v > MAX_D {
                return Err(Error::InvalidDim {
                    name,
                    expected: format!("1..={MAX_D}"),
                    actual: v as u64,
                });
            }
        }
        if self.tokens > i64::MAX as usize {
            return Err(Error::InvalidDim {
                name: "tokens",
                expected: format!("0..={}", i64::MAX),
                actual: self.tokens as u64,
            });
        }
        mul(self.tokens, self.d_in, "tokens × d_in")?;
        mul(self.tokens, self.d_out, "tokens × d_out")?;
        mul(self.tokens, self.rank, "tokens × rank")?;
        mul(self.d(), self.rank, "D × rank")?;
        Ok(())
    }

    /// D = max(d_in, d_out): the rows of A.
    pub fn d(&self) -> usize {
        self.d_in.max(self.d_out)
    }

    /// Elements of A (and of dA): D × rank.
    pub fn a_len(&self) -> usize {
        self.d() * self.rank
    }

    /// Elements of S or Q: tokens × rank.
    pub fn s_len(&self) -> usize {
        self.tokens * self.rank
    }

    /// Rank rounded up to the kernels' tile (zeros are padded on chip).
    pub fn rank_pad(&self) -> usize {
        let align = crate::params::SINGLORA_RANK_ALIGN as usize;
        self.rank.div_ceil(align) * align
    }
}

/// `a × b`, or a typed overflow error.
pub(crate) fn mul(a: usize, b: usize, what: &'static str) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::Overflow { what })
}

/// Checks that a buffer of `len` elements holds a `rows × cols` row-major
/// matrix with row stride `ld`: `ld ≥ cols` and `(rows-1)·ld + cols ≤ len`.
pub(crate) fn check_matrix(
    name: &'static str,
    ld_name: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<()> {
    if ld < cols {
        return Err(Error::InvalidStride {
            name: ld_name,
            min: cols as u64,
            actual: ld as u64,
        });
    }
    if ld > i64::MAX as usize {
        return Err(Error::InvalidStride {
            name: ld_name,
            min: cols as u64,
            actual: ld as u64,
        });
    }
    let required = if rows == 0 {
        0
    } else {
        mul(rows - 1, ld, name)?
            .checked_add(cols)
            .ok_or(Error::Overflow { what: name })?
    };
    check_len(name, len, required)
}

/// Checks that a buffer has at least `required` elements.
pub(crate) fn check_len(name: &'static str, len: usize, required: usize) -> Result<()> {
    if len < required {
        return Err(Error::BufferTooSmall {
            name,
            required: required as u64,
            actual: len as u64,
        });
    }
    Ok(())
}

/// Checks that a scalar that selects overwrite or accumulate is exactly 0 or 1.
pub(crate) fn check_beta(name: &'static str, beta: f32) -> Result<()> {
    if beta != 0.0 && beta != 1.0 {
        return Err(Error::InvalidArgument {
            name,
            expected: "0 or 1",
            actual: beta.to_string(),
        });
    }
    Ok(())
}

/// Checks that the scale is finite.
pub(crate) fn check_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::InvalidArgument {
            name: "scale",
            expected: "a finite number",
            actual: scale.to_string(),
        });
    }
    Ok(())
}
