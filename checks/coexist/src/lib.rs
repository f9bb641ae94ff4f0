//! Uses singlora and cudarc side by side, so `cargo check` type-checks both
//! with the merged features (see Cargo.toml).

use std::sync::Arc;

/// Opens a device through singlora and hands its context to code written
/// against cudarc directly, as candle does: one cudarc, one context type.
pub fn open(ordinal: usize) -> singlora::Result<Arc<cudarc::driver::CudaContext>> {
    if !singlora::runtime::device::driver_present() {
        return Err(singlora::Error::NoDriver);
    }
    singlora::open_device(ordinal)
}

/// The CUDA version cudarc's bindings were generated for.
pub fn bindings_version() -> (&'static str, &'static str) {
    (env!("CARGO_PKG_NAME"), cudarc_version())
}

#[cfg(feature = "own-version")]
fn cudarc_version() -> &'static str {
    "cuda-12080 (the dependent's)"
}

#[cfg(not(feature = "own-version"))]
fn cudarc_version() -> &'static str {
    "cuda-13000 (singlora's default)"
}
