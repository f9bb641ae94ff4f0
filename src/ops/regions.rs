//! Device memory regions of a call's arguments, and the checks that outputs
//! share no memory with any other argument and that no range wraps past the
//! end of the address space. The kernels read inputs that other blocks may
//! be writing when an output overlaps them, so such a call is refused, with
//! both arguments named, before anything is enqueued.

use crate::dims::Matrix;
use crate::error::{Error, Result};

/// The bytes a strided matrix occupies at a device address: `rows` rows of
/// `width` bytes, `pitch` bytes apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    name: &'static str,
    ptr: u64,
    rows: u64,
    width: u64,
    pitch: u64,
}

impl Region {
    /// Matrix `m` of `elem`-byte elements at `ptr` (0: absent, never overlaps).
    pub(crate) fn matrix(ptr: u64, m: &Matrix, elem: usize) -> Result<Self> {
        Self::new(
            m.name(),
            ptr,
            m.rows() as u64,
            (m.cols() * elem) as u64,
            (m.ld() * elem) as u64,
        )
    }

    /// `len` contiguous `elem`-byte elements at `ptr`.
    pub(crate) fn contiguous(
        name: &'static str,
        ptr: u64,
        len: usize,
        elem: usize,
    ) -> Result<Self> {
        let bytes = (len as u64)
            .checked_mul(elem as u64)
            .ok_or(Error::Overflow { what: name })?;
        Self::new(name, ptr, (bytes > 0) as u64, bytes, bytes)
    }

    /// The device scalar a scale is read through (absent for a value).
    pub(crate) fn scale(scale: &crate::ops::scale::RawScale) -> Result<Self> {
        let (name, ptr, bytes) = scale.region();
        Self::contiguous(name, ptr, bytes, 1)
    }

    fn new(name: &'static str, ptr: u64, rows: u64, width: u64, pitch: u64) -> Result<Self> {
        let r = Self {
            name,
            ptr,
            rows,
            width,
            pitch,
        };
        let bytes = r.bytes().ok_or(Error::Overflow { what: name })?;
        if ptr != 0 && ptr.checked_add(bytes).is_none() {
            return Err(Error::AddressWrap { name, ptr, bytes });
        }
        Ok(r)
    }

    /// `(rows-1)·pitch + width`: from the first byte to one past the last.
    fn bytes(&self) -> Option<u64> {
        if self.rows == 0 || self.width == 0 {
            return Some(0);
        }
        (self.rows - 1)
            .checked_mul(self.pitch)?
            .checked_add(self.width)
    }

    fn is_empty(&self) -> bool {
        self.ptr == 0 || self.bytes() == Some(0)
    }

    /// Some byte belongs to both. Exact for matrices of one pitch (a column
    /// slice of a fused output beside another slice of it does not overlap);
    /// for different pitches, any overlap of the two address ranges counts.
    fn overlaps(&self, other: &Region) -> bool {
        if self.is_empty() || other.is_empty() {
            return false;
        }
        let (a0, b0) = (self.ptr as i128, other.ptr as i128);
        let a1 = a0 + self.bytes().unwrap_or(u64::MAX) as i128;
        let b1 = b0 + other.bytes().unwrap_or(u64::MAX) as i128;
        if a1 <= b0 || b1 <= a0 {
            return false;
        }
        // A single row has no pitch of its own: it takes the other's.
        let pitch = match (self.rows, other.rows) {
            (1, 1) => return true,
            (1, _) => other.pitch,
            (_, 1) => self.pitch,
            _ if self.pitch == other.pitch => self.pitch,
            _ => return true,
        };
        // Rows i of self and j of other meet iff, with k = j - i and
        // delta = b0 - a0: -width_b < delta + k·pitch < width_a. The k that
        // qualify form an integer interval; any of them in the range the
        // row counts allow, [-(rows_a - 1), rows_b - 1], is a real pair.
        let (p, wa, wb) = (pitch as i128, self.width as i128, other.width as i128);
        let delta = b0 - a0;
        let k_lo = (-wb - delta).div_euclid(p) + 1;
        let k_hi = -((delta - wa).div_euclid(p)) - 1;
        let k_min = -(self.rows as i128 - 1);
        let k_max = other.rows as i128 - 1;
        k_lo.max(k_min) <= k_hi.min(k_max)
    }
}

/// Refuses a call whose `outputs` overlap each other or any of `inputs`
/// (absent buffers, pointer 0, are skipped). Inputs may share memory.
pub(crate) fn check_disjoint(outputs: &[Region], inputs: &[Region]) -> Result<()> {
    for (i, out) in outputs.iter().enumerate() {
        for other in outputs[i + 1..].iter().chain(inputs) {
            if out.overlaps(other) {
                return Err(Error::Overlap {
                    name: out.name,
                    other: other.name,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &'static str, rows: usize, cols: usize, ld: usize) -> Matrix {
        Matrix::new(name, name, rows, cols, ld).unwrap()
    }

    const P: u64 = 0x7f00_0000_0000;

    #[test]
    fn exact_aliasing_and_partial_overlap_are_refused() {
        let x = Region::matrix(P, &m("x", 4, 8, 8), 2).unwrap();
        let y = Region::matrix(P, &m("y", 4, 8, 8), 2).unwrap();
        assert!(matches!(
            check_disjoint(&[y], &[x]),
            Err(Error::Overlap {
                name: "y",
                other: "x"
            })
        ));
        // y starts in x's last row.
        let y = Region::matrix(P + 3 * 16 + 14, &m("y", 4, 8, 8), 2).unwrap();
        assert!(check_disjoint(&[y], &[x]).is_err());
        // y starts right after x's last byte.
        let y = Region::matrix(P + 4 * 16, &m("y", 4, 8, 8), 2).unwrap();
        assert!(check_disjoint(&[y], &[x]).is_ok());
    }

    #[test]
    fn interleaved_column_slices_of_one_pitch_are_disjoint() {
        // A fused [x | y] buffer: rows of 24 elements, x the first 8
        // columns, y the next 16.
        let x = Region::matrix(P, &m("x", 100, 8, 24), 2).unwrap();
        let y = Region::matrix(P + 16, &m("y", 100, 16, 24), 2).unwrap();
        assert!(check_disjoint(&[y], &[x]).is_ok());
        // One column more and they share a column.
        let y = Region::matrix(P + 14, &m("y", 100, 16, 24), 2).unwrap();
        assert!(check_disjoint(&[y], &[x]).is_err());
        // y shifted down by rows, still in its own columns.
        let y = Region::matrix(P + 16 + 5 * 48, &m("y", 100, 16, 24), 2).unwrap();
        assert!(check_disjoint(&[y], &[x]).is_ok());
        // A single-row S inside x's gap columns is disjoint; inside x it is not.
        let s = Region::contiguous("s", P + 48 + 16, 8, 4).unwrap();
        assert!(check_disjoint(&[s], &[x]).is_ok());
        let s = Region::contiguous("s", P + 48 + 8, 8, 4).unwrap();
        assert!(matches!(
            check_disjoint(&[s], &[x]),
            Err(Error::Overlap {
                name: "s",
                other: "x"
            })
        ));
    }

    #[test]
    fn a_contiguous_buffer_wider_than_the_pitch_is_checked_exactly() {
        // y: 33 rows of 320 bytes; A (2560 bytes) starts 2 bytes before y ends.
        let y = Region::matrix(P, &m("y", 33, 160, 160), 2).unwrap();
        let end = P + 33 * 320;
        let a = Region::contiguous("a", end - 2, 1280, 2).unwrap();
        assert!(check_disjoint(&[y], &[a]).is_err());
        let a = Region::contiguous("a", end, 1280, 2).unwrap();
        assert!(check_disjoint(&[y], &[a]).is_ok());
        // A wide buffer inside the gap columns of a strided matrix's rows
        // still meets the next row.
        let x = Region::matrix(P, &m("x", 4, 8, 64), 2).unwrap();
        let s = Region::contiguous("s", P + 16, 200, 1).unwrap();
        assert!(check_disjoint(&[s], &[x]).is_err());
        let s = Region::contiguous("s", P + 16, 100, 1).unwrap();
        assert!(check_disjoint(&[s], &[x]).is_ok());
    }

    /// The exact rule against brute force over small layouts.
    #[test]
    fn overlap_agrees_with_brute_force() {
        let bytes = |r: &Region| -> Vec<u64> {
            (0..r.rows)
                .flat_map(|i| (0..r.width).map(move |b| r.ptr + i * r.pitch + b))
                .collect()
        };
        let mut checked = 0;
        for (ra, wa, pa) in [(1, 8, 8), (3, 4, 8), (4, 6, 6), (2, 3, 10)] {
            for (rb, wb, pb) in [(1, 5, 5), (1, 30, 30), (3, 4, 8), (2, 2, 8), (5, 1, 8)] {
                for off in 0..40u64 {
                    let a = Region::new("a", 1000, ra, wa, pa).unwrap();
                    let b = Region::new("b", 1000 + off - 12, rb, wb, pb).unwrap();
                    let (sa, sb) = (bytes(&a), bytes(&b));
                    let truth = sa.iter().any(|x| sb.contains(x));
                    let exact = pa == pb || ra == 1 || rb == 1;
                    if exact {
                        assert_eq!(a.overlaps(&b), truth, "{a:?} {b:?}");
                    } else {
                        // Different pitches: conservative, never misses one.
                        assert!(a.overlaps(&b) || !truth, "{a:?} {b:?}");
                    }
                    assert_eq!(a.overlaps(&b), b.overlaps(&a), "symmetric: {a:?} {b:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 4 * 5 * 40);
    }

    #[test]
    fn outputs_are_checked_against_each_other_and_absent_buffers_skipped() {
        let dx = Region::matrix(P, &m("dx", 4, 8, 8), 4).unwrap();
        let ws = Region::contiguous("workspace", P + 64, 4, 4).unwrap();
        assert!(matches!(
            check_disjoint(&[dx, ws], &[]),
            Err(Error::Overlap {
                name: "dx",
                other: "workspace"
            })
        ));
        let none = Region::matrix(0, &m("s", 4, 8, 8), 4).unwrap();
        assert!(check_disjoint(&[none], &[dx]).is_ok());
        // Inputs may alias each other.
        let g = Region::matrix(P, &m("g", 4, 8, 8), 4).unwrap();
        assert!(check_disjoint(&[], &[dx, g]).is_ok());
    }

    #[test]
    fn ranges_past_the_end_of_the_address_space_are_refused() {
        assert!(matches!(
            Region::matrix(u64::MAX - 15, &m("x", 2, 8, 8), 2),
            Err(Error::AddressWrap { name: "x", .. })
        ));
        assert!(Region::matrix(u64::MAX - 32, &m("x", 2, 8, 8), 2).is_ok());
    }
}
