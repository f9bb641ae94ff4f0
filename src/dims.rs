//! Problem dimensions, the checked matrix shape, and the scalar checks every
//! launcher runs first. A [`Dims`] or a [`Matrix`] exists only once checked,
//! so code that holds one never checks it again.

use crate::error::{Error, Result};

/// The shape of one SingLoRA layer call, validated on construction.
///
/// `W0` is `d_out × d_in` (PyTorch `nn.Linear` orientation), `A` is
/// `D × rank` with `D = max(d_in, d_out)`; `A_in = A[:d_in]`,
/// `A_out = A[:d_out]`. `tokens` is the number of rows of X (0 is a no-op).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    tokens: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
}

/// Largest rank the kernels accept.
pub const MAX_RANK: usize = crate::params::SINGLORA_MAX_RANK as usize;

/// The kernels index columns and rows of A with 32-bit integers.
const MAX_D: usize = i32::MAX as usize;

impl Dims {
    /// Builds and validates: rank in 1..=256, d_in and d_out in
    /// 1..=i32::MAX, tokens ≤ i64::MAX, and every contiguous buffer size
    /// (tokens × d, tokens × rank, D × rank) representable.
    pub fn new(tokens: usize, d_in: usize, d_out: usize, rank: usize) -> Result<Self> {
        if rank == 0 || rank > MAX_RANK {
            return Err(Error::InvalidDim {
                name: "rank",
                expected: format!("1..={MAX_RANK}"),
                actual: rank as u64,
            });
        }
        for (name, v) in [("d_in", d_in), ("d_out", d_out)] {
            if v == 0 || v > MAX_D {
                return Err(Error::InvalidDim {
                    name,
                    expected: format!("1..={MAX_D}"),
                    actual: v as u64,
                });
            }
        }
        if tokens > i64::MAX as usize {
            return Err(Error::InvalidDim {
                name: "tokens",
                expected: format!("0..={}", i64::MAX),
                actual: tokens as u64,
            });
        }
        let dims = Self {
            tokens,
            d_in,
            d_out,
            rank,
        };
        mul(tokens, d_in, "tokens × d_in")?;
        mul(tokens, d_out, "tokens × d_out")?;
        mul(tokens, rank, "tokens × rank")?;
        mul(dims.d(), rank, "D × rank")?;
        Ok(dims)
    }

    /// The same layer with another token count (checked again, since the
    /// token count enters every size).
    pub fn with_tokens(&self, tokens: usize) -> Result<Self> {
        Self::new(tokens, self.d_in, self.d_out, self.rank)
    }

    /// Rows of X (and of Y, G, dX, S, Q).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Columns of X: the frozen weight's input features.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Columns of Y: the frozen weight's output features.
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// The adapter rank r.
    pub fn rank(&self) -> usize {
        self.rank
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

    /// X (`tokens × d_in`) with row stride `ld_x`.
    pub fn x(&self, ld_x: usize) -> Result<Matrix> {
        Matrix::new("x", "ld_x", self.tokens, self.d_in, ld_x)
    }

    /// A `tokens × d_out` matrix (Y or G) named `name`, row stride `ld`.
    pub fn out_rows(&self, name: &'static str, ld_name: &'static str, ld: usize) -> Result<Matrix> {
        Matrix::new(name, ld_name, self.tokens, self.d_out, ld)
    }

    /// A `tokens × d_in` matrix (X or dX) named `name`, row stride `ld`.
    pub fn in_rows(&self, name: &'static str, ld_name: &'static str, ld: usize) -> Result<Matrix> {
        Matrix::new(name, ld_name, self.tokens, self.d_in, ld)
    }
}

/// A checked row-major `rows × cols` matrix with row stride `ld ≥ cols`
/// (elements) whose extent `(rows-1)·ld + cols` is representable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matrix {
    name: &'static str,
    rows: usize,
    cols: usize,
    ld: usize,
    extent: usize,
}

impl Matrix {
    /// Checks `ld ≥ cols`, `ld ≤ i64::MAX` (the kernels' stride type) and
    /// that the extent is representable; `name` and `ld_name` are what a
    /// refusal names.
    pub fn new(
        name: &'static str,
        ld_name: &'static str,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<Self> {
        if ld < cols || ld > i64::MAX as usize {
            return Err(Error::InvalidStride {
                name: ld_name,
                min: cols as u64,
                actual: ld as u64,
            });
        }
        let extent = if rows == 0 {
            0
        } else {
            mul(rows - 1, ld, name)?
                .checked_add(cols)
                .ok_or(Error::Overflow { what: name })?
        };
        Ok(Self {
            name,
            rows,
            cols,
            ld,
            extent,
        })
    }

    /// A contiguous `rows × cols` matrix.
    pub fn contiguous(name: &'static str, rows: usize, cols: usize) -> Result<Self> {
        Self::new(name, name, rows, cols, cols)
    }

    /// The argument name refusals use.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row stride, in elements.
    pub fn ld(&self) -> usize {
        self.ld
    }

    /// Elements from the first to one past the last: `(rows-1)·ld + cols`.
    pub fn extent(&self) -> usize {
        self.extent
    }

    /// A buffer of `len` elements holds the matrix.
    pub fn check_len(&self, len: usize) -> Result<()> {
        check_len(self.name, len, self.extent)
    }
}

/// `a × b`, or a typed overflow error.
pub(crate) fn mul(a: usize, b: usize, what: &'static str) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::Overflow { what })
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
        return Err(Error::invalid(name, "0 or 1", beta));
    }
    Ok(())
}

/// Checks that the scale is finite.
pub(crate) fn check_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::invalid("scale", "a finite number", scale));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_extent_and_refusals() {
        let m = Matrix::new("y", "ld_y", 10, 32, 100).unwrap();
        assert_eq!(m.extent(), 9 * 100 + 32);
        assert!(m.check_len(932).is_ok());
        assert!(matches!(
            m.check_len(931),
            Err(Error::BufferTooSmall { name: "y", .. })
        ));
        assert!(matches!(
            Matrix::new("y", "ld_y", 10, 32, 31),
            Err(Error::InvalidStride { name: "ld_y", .. })
        ));
        assert_eq!(Matrix::new("y", "ld_y", 0, 32, 32).unwrap().extent(), 0);
        assert!(matches!(
            Matrix::new("y", "ld_y", usize::MAX, 2, 2),
            Err(Error::Overflow { .. })
        ));
    }

    #[test]
    fn dims_with_tokens_rechecks() {
        let d = Dims::new(4, 8, 16, 4).unwrap();
        assert_eq!(d.with_tokens(9).unwrap().tokens(), 9);
        assert!(d.with_tokens(usize::MAX).is_err());
    }
}
