//! Running tables of cases: every case under each element type with its own
//! seeds, one `#[test]` per element type, and the check that a table of
//! layouts takes both the 16-byte and the element-wise paths.

use singlora::DType;

use super::{gpu, Gpu};

/// One run of a case under one element type: `run_case::<T>`.
pub type Run<C> = fn(&Gpu, C, u64);

/// Runs every case under each `(run, seed)` in turn, case `i` with seed
/// `seed + i`, on the GPU (or skips without one).
pub fn all_cases<C: Copy>(cases: &[C], runs: &[(Run<C>, u64)]) {
    let Some(gpu) = gpu() else { return };
    for (i, &c) in cases.iter().enumerate() {
        for &(run, seed) in runs {
            run(&gpu, c, seed + i as u64);
        }
    }
}

/// `f::<T>()` for f32, f16 and bf16, in that order.
#[allow(unused_macros)]
macro_rules! each_dtype {
    ($f:ident) => {
        $f::<f32>();
        $f::<half::f16>();
        $f::<half::bf16>();
    };
}

/// One `#[test]` per element type: `f32_name, f16_name, bf16_name => body;`
/// defines three tests whose body runs with `T` the test's type; with a
/// seed per test, `f32_name = 10, f16_name = 20, bf16_name = 30 => body;`,
/// the body also has `SEED`, the test's.
#[allow(unused_macros)]
macro_rules! typed_tests {
    ($($f32:ident = $s32:expr, $f16:ident = $s16:expr, $bf16:ident = $sbf16:expr => $body:expr;)+) => {
        $(
            #[test]
            fn $f32() {
                type T = f32;
                const SEED: u64 = $s32;
                $body;
            }

            #[test]
            fn $f16() {
                type T = half::f16;
                const SEED: u64 = $s16;
                $body;
            }

            #[test]
            fn $bf16() {
                type T = half::bf16;
                const SEED: u64 = $sbf16;
                $body;
            }
        )+
    };
    ($($f32:ident, $f16:ident, $bf16:ident => $body:expr;)+) => {
        $(
            #[test]
            fn $f32() {
                type T = f32;
                $body;
            }

            #[test]
            fn $f16() {
                type T = half::f16;
                $body;
            }

            #[test]
            fn $bf16() {
                type T = half::bf16;
                $body;
            }
        )+
    };
}

/// [`all_cases`] of `run::<T>` for each listed type with its seed:
/// `run_typed!(&cases, run_case: bf16 => 7, f32 => 27)`.
#[allow(unused_macros)]
macro_rules! run_typed {
    ($cases:expr, $run:ident: $($t:ty => $seed:expr),+ $(,)?) => {
        all_cases($cases, &[$(($run::<$t>, $seed)),+])
    };
}

#[allow(unused_imports)]
pub(crate) use {each_dtype, run_typed, typed_tests};

/// Where a matrix of one case lies, for element type T: its base offset and
/// row stride in elements, and its columns.
pub type Placement = (usize, usize, usize);

/// The layout cases take both the 16-byte and the element-wise paths of
/// each matrix `places` gives for T (`names` in order; then A, whose base
/// offset and rank it gives last), and the 16-byte path with a tail
/// (columns not a multiple of the vector width), by the launchers' rule:
/// base address and row stride both multiples of 16 bytes.
pub fn assert_takes_both_paths<T: DType, C, const N: usize>(
    cases: &[C],
    names: [&str; N],
    places: impl Fn(&C) -> ([Placement; N], (usize, usize)),
) {
    let v = 16 / std::mem::size_of::<T>();
    let vec_ok = |off: usize, ld: usize| off % v == 0 && ld % v == 0;
    let all: Vec<_> = cases.iter().map(places).collect();
    for (m, name) in names.iter().enumerate() {
        let p: Vec<(bool, bool)> = all
            .iter()
            .map(|(p, _)| {
                let (off, ld, cols) = p[m];
                (vec_ok(off, ld), cols % v != 0)
            })
            .collect();
        assert!(
            p.iter().any(|&(ok, _)| !ok) && p.iter().any(|&(ok, tail)| ok && tail),
            "{} {name}: (16-byte path, tail) per case {p:?}",
            T::NAME
        );
    }
    let a: Vec<bool> = all
        .iter()
        .map(|&(_, (off, rank))| vec_ok(off, rank))
        .collect();
    assert!(
        a.contains(&true) && a.contains(&false),
        "{} A: {a:?}",
        T::NAME
    );
}
