//! Reading a candle layout as rows: `rows × cols` elements with unit stride
//! along a row and one row stride `ld ≥ cols`, from `offset` — the form the
//! kernels and cuBLAS take in place. Any other layout is copied first.

// Used by the CUDA path (and its tests on every build).
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::Layout;

/// A layout whose elements are equally spaced rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rows {
    pub rows: usize,
    pub cols: usize,
    /// Row stride in elements (`cols` when there is at most one row).
    pub ld: usize,
    /// Offset of the first element, in elements.
    pub offset: usize,
}

impl Rows {
    /// Elements from the first to one past the last: `(rows-1)·ld + cols`
    /// (0 for no rows).
    pub fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.ld + self.cols
        }
    }

    /// A contiguous `rows × cols` matrix from offset 0.
    pub fn contiguous(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            ld: cols,
            offset: 0,
        }
    }
}

/// The layout's elements as rows of its last dimension, if they are: unit
/// stride along the last dimension, and the leading dimensions (of any
/// number, size-1 ones ignored) one evenly spaced sequence of rows that do
/// not overlap. `None`: the layout must be copied (a transpose, a
/// broadcast, a gather of rows with unequal spacing).
pub(crate) fn rows(layout: &Layout) -> Option<Rows> {
    let dims = layout.dims();
    let stride = layout.stride();
    let (&cols, lead) = dims.split_last()?;
    let rows = lead.iter().product::<usize>();
    let offset = layout.start_offset();
    if rows == 0 || cols == 0 {
        return Some(Rows {
            rows,
            cols,
            ld: cols,
            offset,
        });
    }
    if cols > 1 && stride[dims.len() - 1] != 1 {
        return None;
    }
    // Walk the leading dimensions from the innermost out: the first one of
    // size > 1 sets the row stride, each further one must step over exactly
    // the rows inside it.
    let mut ld = None;
    let mut expected = 0;
    for (i, &n) in lead.iter().enumerate().rev() {
        if n == 1 {
            continue;
        }
        let s = stride[i];
        match ld {
            None => {
                ld = Some(s);
                expected = s * n;
            }
            Some(_) => {
                if s != expected {
                    return None;
                }
                expected = s * n;
            }
        }
    }
    let ld = match ld {
        None => cols, // one row
        Some(ld) if ld >= cols => ld,
        Some(_) => return None, // overlapping rows (a broadcast)
    };
    Some(Rows {
        rows,
        cols,
        ld,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Shape;

    fn layout(dims: &[usize], stride: &[usize], offset: usize) -> Layout {
        Layout::new(Shape::from(dims.to_vec()), stride.to_vec(), offset)
    }

    #[test]
    fn contiguous_and_batched() {
        let l = Layout::contiguous((2, 3, 8));
        assert_eq!(
            rows(&l),
            Some(Rows {
                rows: 6,
                cols: 8,
                ld: 8,
                offset: 0
            })
        );
    }

    #[test]
    fn column_slice_keeps_its_row_stride() {
        // x[.., 16..24] of a (2, 3, 40) tensor.
        let l = layout(&[2, 3, 8], &[120, 40, 1], 16);
        assert_eq!(
            rows(&l),
            Some(Rows {
                rows: 6,
                cols: 8,
                ld: 40,
                offset: 16
            })
        );
    }

    #[test]
    fn unequal_spacing_transpose_and_broadcast_are_copied() {
        // (2, 3, 8) where the batch stride is not 3 rows.
        assert_eq!(rows(&layout(&[2, 3, 8], &[200, 40, 1], 0)), None);
        // A transpose.
        assert_eq!(rows(&layout(&[4, 8], &[1, 4], 0)), None);
        // A broadcast row.
        assert_eq!(rows(&layout(&[4, 8], &[0, 1], 0)), None);
    }

    #[test]
    fn size_one_dims_and_single_rows() {
        assert_eq!(
            rows(&layout(&[1, 1, 8], &[999, 77, 1], 5)),
            Some(Rows {
                rows: 1,
                cols: 8,
                ld: 8,
                offset: 5
            })
        );
        assert_eq!(
            rows(&layout(&[3, 1, 8], &[40, 8, 1], 0)),
            Some(Rows {
                rows: 3,
                cols: 8,
                ld: 40,
                offset: 0
            })
        );
        assert_eq!(rows(&layout(&[0, 8], &[8, 1], 0)).map(|r| r.rows), Some(0));
    }
}
