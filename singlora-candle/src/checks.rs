//! Argument checks shared by the ops: every refusal is a candle error that
//! names the argument, with what was expected and what was given.

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, Shape};
use singlora::Dims;

/// The refusal of argument `name`; carried in [`candle_core::Error::Wrapped`]
/// (its message is `invalid argument `name`: expected …, got …`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgError {
    pub name: &'static str,
    pub expected: String,
    pub actual: String,
}

impl std::fmt::Display for ArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "singlora: invalid argument `{}`: expected {}, got {}",
            self.name, self.expected, self.actual
        )
    }
}

impl std::error::Error for ArgError {}

/// A candle error for argument `name`.
pub(crate) fn refuse(
    name: &'static str,
    expected: impl Into<String>,
    actual: impl std::fmt::Display,
) -> candle_core::Error {
    candle_core::Error::wrap(ArgError {
        name,
        expected: expected.into(),
        actual: actual.to_string(),
    })
}

/// A singlora error (a launcher's refusal, a driver error) as a candle error.
pub(crate) fn wrap(e: singlora::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The element types the kernels run on.
pub(crate) fn check_float(name: &'static str, dtype: DType) -> candle_core::Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(refuse(
            name,
            "an f32, f16 or bf16 tensor",
            format!("{other:?}"),
        )),
    }
}

/// A finite scale.
pub(crate) fn check_scale(scale: f32) -> candle_core::Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(refuse("scale", "a finite number", scale))
    }
}

/// The sizes of one adapter: `d_in`, `d_out`, `rank` (and `D`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
}

impl Geometry {
    pub fn d(&self) -> usize {
        self.d_in.max(self.d_out)
    }

    /// singlora's own checks of the sizes (rank 1..=256, sizes ≥ 1, ...).
    pub fn dims(&self, tokens: usize) -> candle_core::Result<Dims> {
        Dims::new(tokens, self.d_in, self.d_out, self.rank).map_err(wrap)
    }
}

/// What the checks of one call found.
#[derive(Clone, Debug)]
pub(crate) struct Checked {
    pub dtype: DType,
    /// Rows of `x`: the product of its leading dimensions.
    pub tokens: usize,
    /// `x`'s shape with the last dimension `d_out`.
    pub out_shape: Shape,
}

/// Checks `x` (`… × d_in`), `a` (`D × rank`) and, if given, `w`
/// (`d_out × d_in`): shapes, one float dtype for all.
pub(crate) fn check_call(
    geo: &Geometry,
    x: (&Shape, DType),
    a: (&Shape, DType),
    w: Option<(&Shape, DType)>,
) -> candle_core::Result<Checked> {
    let (xs, xt) = x;
    check_float("x", xt)?;
    let dims = xs.dims();
    let Some((&last, lead)) = dims.split_last() else {
        return Err(refuse(
            "x",
            format!("a tensor of shape (…, {}) (d_in last)", geo.d_in),
            "a scalar",
        ));
    };
    if last != geo.d_in {
        return Err(refuse(
            "x",
            format!("a tensor of shape (…, {}) (d_in last)", geo.d_in),
            format!("shape {dims:?}"),
        ));
    }
    let (as_, at) = a;
    if at != xt {
        return Err(refuse("a", format!("x's dtype {xt:?}"), format!("{at:?}")));
    }
    if as_.dims() != [geo.d(), geo.rank] {
        return Err(refuse(
            "a",
            format!(
                "shape [{}, {}] (D = max(d_in, d_out), rank)",
                geo.d(),
                geo.rank
            ),
            format!("shape {:?}", as_.dims()),
        ));
    }
    if let Some((ws, wt)) = w {
        if wt != xt {
            return Err(refuse("w0", format!("x's dtype {xt:?}"), format!("{wt:?}")));
        }
        if ws.dims() != [geo.d_out, geo.d_in] {
            return Err(refuse(
                "w0",
                format!("shape [{}, {}] (d_out, d_in)", geo.d_out, geo.d_in),
                format!("shape {:?}", ws.dims()),
            ));
        }
    }
    let tokens = lead.iter().product::<usize>();
    geo.dims(tokens)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = geo.d_out;
    Ok(Checked {
        dtype: xt,
        tokens,
        out_shape: Shape::from(out),
    })
}

/// [`check_call`] on storages and their layouts (what a custom op's forward
/// receives).
pub(crate) fn check_storages<S: BackendStorage>(
    geo: &Geometry,
    x: (&S, &Layout),
    a: (&S, &Layout),
    w: Option<(&S, &Layout)>,
) -> candle_core::Result<Checked> {
    fn of<'l, S: BackendStorage>((s, l): (&S, &'l Layout)) -> (&'l Shape, DType) {
        (l.shape(), s.dtype())
    }
    check_call(geo, of(x), of(a), w.map(of))
}
