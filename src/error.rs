//! Typed errors. Every refusal names the argument, with what was expected and
//! what was given; a refused call has touched no output.

use cudarc::driver::DriverError;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a call can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver: libcuda could not be loaded")]
    NoDriver,
    /// The driver is present but the requested device does not exist.
    #[error("no CUDA device with ordinal {ordinal} ({count} present)")]
    NoDevice { ordinal: usize, count: usize },
    /// The device is older than compute capability 8.0 (the kernels use
    /// bf16 mma.sync and cp.async).
    #[error(
        "device {ordinal} has compute capability {major}.{minor}; singlora needs 8.0 or newer"
    )]
    UnsupportedDevice {
        ordinal: usize,
        major: i32,
        minor: i32,
    },
    /// The kernel for this element type and rank needs more shared memory
    /// per block than the device grants (sm_86 and sm_89 run ranks up to 64).
    #[error("kernel {kernel} needs {needed} bytes of shared memory per block, more than this compute capability {major}.{minor} device grants")]
    SharedMemoryTooSmall {
        kernel: String,
        needed: u32,
        major: i32,
        minor: i32,
    },
    /// A dimension is out of range.
    #[error("invalid dimension `{name}`: expected {expected}, got {actual}")]
    InvalidDim {
        name: &'static str,
        expected: String,
        actual: u64,
    },
    /// A row stride is smaller than the row it must hold.
    #[error("invalid row stride `{name}`: expected at least {min}, got {actual}")]
    InvalidStride {
        name: &'static str,
        min: u64,
        actual: u64,
    },
    /// A buffer is too short for the matrix the dimensions describe.
    #[error("buffer `{name}` too small: needs {required} elements, has {actual}")]
    BufferTooSmall {
        name: &'static str,
        required: u64,
        actual: u64,
    },
    /// A size computation overflowed.
    #[error("size overflow computing {what}")]
    Overflow { what: &'static str },
    /// A scalar argument is outside what the operation accepts.
    #[error("invalid argument `{name}`: expected {expected}, got {actual}")]
    InvalidArgument {
        name: &'static str,
        expected: &'static str,
        actual: String,
    },
    /// The build embedded no kernels (a docs.rs build).
    #[error("this build of singlora embeds no kernels (built under DOCS_RS)")]
    NoKernels,
    /// A kernel of the list is in no module loaded on this device (a build
    /// without its architecture, or an sm_90a kernel on another GPU).
    #[error("kernel {kernel} is not in the module loaded on this device")]
    MissingKernel { kernel: String },
    /// An output's memory overlaps another argument's (exact aliasing
    /// included): the kernels read what other blocks write.
    #[error(
        "buffer `{name}` overlaps `{other}`: outputs must not share memory with any other argument"
    )]
    Overlap {
        name: &'static str,
        other: &'static str,
    },
    /// A buffer's address range runs past the end of the address space.
    #[error(
        "buffer `{name}` at {ptr:#x} with {bytes} bytes wraps past the end of the address space"
    )]
    AddressWrap {
        name: &'static str,
        ptr: u64,
        bytes: u64,
    },
    /// A cuBLAS call failed (the frozen base GEMMs of [`crate::SingLoraLinear`]).
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
}

impl Error {
    /// The refusal of a scalar or state argument `name`: what was expected,
    /// and what was given.
    pub fn invalid(
        name: &'static str,
        expected: &'static str,
        actual: impl std::fmt::Display,
    ) -> Self {
        Error::InvalidArgument {
            name,
            expected,
            actual: actual.to_string(),
        }
    }

    /// The argument a refusal names, if it is one (`None` for failures that
    /// are not about an argument: no driver, a driver error, ...).
    pub fn argument(&self) -> Option<&'static str> {
        match self {
            Error::InvalidDim { name, .. }
            | Error::InvalidStride { name, .. }
            | Error::BufferTooSmall { name, .. }
            | Error::InvalidArgument { name, .. }
            | Error::Overlap { name, .. }
            | Error::AddressWrap { name, .. } => Some(name),
            _ => None,
        }
    }
}
