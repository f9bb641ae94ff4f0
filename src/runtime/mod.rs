//! The runtime: opening devices, the typed kernel registry (modules loaded
//! once per context), and the launch helpers every op shares.

pub mod blas;
pub mod device;
pub(crate) mod launch;
pub mod registry;
pub(crate) mod tma;

pub use device::open_device;
pub use registry::{kernel_names, Family, KernelId, Kernels, RANK_BUCKETS};
