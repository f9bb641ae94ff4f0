//! What the binding's tests share: random inputs, tensors from and to f64
//! host vectors (on any device), the element types' bars and the relative
//! L2 check; the frozen layer's products on the host (singlora's
//! tests/common/frozen.rs).
#![allow(dead_code)]

mod case;
#[allow(unused_imports)]
pub use case::Case;

#[path = "../../../tests/common/frozen.rs"]
mod frozen;
#[allow(unused_imports)]
pub use frozen::*;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng};
use singlora::reference;

pub type R<T = ()> = candle_core::Result<T>;

/// `n` draws of N(0, std²) (Box–Muller).
pub fn randn(rng: &mut StdRng, n: usize, std: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
            std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        })
        .collect()
}

/// `v` as a `dims` tensor of `dtype` on the CPU.
pub fn tensor(v: &[f64], dims: &[usize], dtype: DType) -> R<Tensor> {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu)?.to_dtype(dtype)
}

/// [`tensor`] on `dev`.
pub fn tensor_on(v: &[f64], dims: &[usize], dtype: DType, dev: &Device) -> R<Tensor> {
    tensor(v, dims, dtype)?.to_device(dev)
}

/// A tensor's elements as f64 on the host.
pub fn host(t: &Tensor) -> R<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}

/// The values a tensor of `dtype` holds for `v` (rounded), as f64.
pub fn rounded(v: &[f64], dtype: DType) -> R<Vec<f64>> {
    host(&tensor(v, &[v.len()], dtype)?)
}

/// The relative L2 bar of `dtype`.
pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

#[track_caller]
pub fn assert_close(name: &str, got: &[f64], want: &[f64], bar: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let err = reference::relative_l2(got, want);
    assert!(
        err <= bar,
        "{name}: relative L2 error {err:.3e} > {bar:.0e}"
    );
}
