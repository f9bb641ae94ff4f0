//! The embedded fatbin, loaded once per CUDA context, and the device checks
//! that run before any driver call can fail in an untyped way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::params::{
    singlora_kernel_info, SINGLORA_DECODE_MAX_RANK, SINGLORA_RANK_BUCKET_0, SINGLORA_RANK_BUCKET_1,
    SINGLORA_RANK_BUCKET_2, SINGLORA_RANK_BUCKET_3, SINGLORA_THREADS,
};

/// Every kernels/*.cu, compiled by build.rs: SASS for sm_80 and sm_90a and
/// PTX for compute_80 by default (see `SINGLORA_CUDA_ARCHS`).
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/singlora.fatbin"));

/// The rank capacities the kernels are instantiated for, smallest first.
pub const RANK_BUCKETS: [usize; 4] = [
    SINGLORA_RANK_BUCKET_0 as usize,
    SINGLORA_RANK_BUCKET_1 as usize,
    SINGLORA_RANK_BUCKET_2 as usize,
    SINGLORA_RANK_BUCKET_3 as usize,
];

/// The smallest bucket that holds `rank` (callers validated rank ≤ 256).
pub(crate) fn rank_bucket(rank: usize) -> usize {
    RANK_BUCKETS
        .into_iter()
        .find(|&b| rank <= b)
        .unwrap_or(RANK_BUCKETS[3])
}

/// Threads per block of every kernel.
pub(crate) const THREADS: u32 = SINGLORA_THREADS;

/// Every kernel name in the module.
pub fn kernel_names() -> Vec<String> {
    let mut names = vec!["fill".to_string(), "backward_da_reduce".to_string()];
    for t in ["f32", "f16", "bf16"] {
        for family in ["merge", "adamw", "mse"] {
            names.push(format!("{family}_{t}"));
        }
        for r in RANK_BUCKETS {
            names.push(format!("forward_{t}_r{r}"));
            names.push(format!("backward_da_partial_{t}_r{r}"));
            if r <= SINGLORA_DECODE_MAX_RANK as usize {
                names.push(format!("forward_decode_{t}_r{r}"));
            }
        }
    }
    names
}

/// The name of a family's instantiation for an element type and rank.
pub(crate) fn kernel_name<T: DType>(family: &str, rank: usize) -> String {
    format!("{family}_{}_r{}", T::NAME, rank_bucket(rank))
}

/// The name of a family's instantiation for an element type (families with
/// one kernel per type: merge, adamw, mse).
pub(crate) fn typed_kernel_name<T: DType>(family: &str) -> String {
    format!("{family}_{}", T::NAME)
}

/// Opens device `ordinal` (its primary context) after checking, in this
/// order, that a driver exists, that the device exists, and that it is
/// compute capability 8.0 or newer. Never panics on a machine without CUDA.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    // SAFETY: only tries to dlopen libcuda; nothing is called through it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoDriver);
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        // cuInit reports a machine without a usable GPU as an error.
        Err(_) => 0,
    };
    if ordinal >= count {
        return Err(Error::NoDevice { ordinal, count });
    }
    let ctx = CudaContext::new(ordinal)?;
    check_capability(&ctx)?;
    Ok(ctx)
}

fn check_capability(ctx: &CudaContext) -> Result<()> {
    let major = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    if major < 8 {
        return Err(Error::UnsupportedDevice {
            ordinal: ctx.ordinal(),
            major,
            minor,
        });
    }
    Ok(())
}

/// One kernel: its function handle and the launch shape it published.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub(crate) func: CudaFunction,
    pub(crate) info: singlora_kernel_info,
    /// The device grants the kernel's shared memory (sm_86/sm_89 grant
    /// 99 KiB per block, less than the rank > 64 tiles take).
    fits: bool,
}

/// The module loaded into one CUDA context, with every kernel resolved.
///
/// Loading happens once per context (the first call of [`Kernels::get`]) and
/// is the only place that synchronises; launchers only look kernels up.
/// Several contexts (one per GPU) each get their own.
#[derive(Debug)]
pub struct Kernels {
    ctx: Arc<CudaContext>,
    _module: Arc<CudaModule>,
    kernels: HashMap<String, Kernel>,
    sm_count: u32,
    cc_major: i32,
}

fn cache() -> &'static Mutex<Vec<Arc<Kernels>>> {
    static CACHE: OnceLock<Mutex<Vec<Arc<Kernels>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(Vec::new()))
}

impl Kernels {
    /// The module for `ctx`, loading it on first use.
    pub fn get(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
        if FATBIN.is_empty() {
            return Err(Error::NoKernels);
        }
        let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cache.iter().find(|k| k.ctx.cu_ctx() == ctx.cu_ctx()) {
            return Ok(k.clone());
        }
        let loaded = Arc::new(Self::load(ctx)?);
        cache.push(loaded.clone());
        Ok(loaded)
    }

    fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        check_capability(ctx)?;
        // cuModuleLoadData takes a fatbin as well as PTX text.
        let module = ctx.load_module(Ptx::from_binary(FATBIN.to_vec()))?;
        let stream = ctx.default_stream();
        let smem_max = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as u32;
        let mut kernels = HashMap::new();
        for name in kernel_names() {
            let func = module.load_function(&name)?;
            let mut raw = [0u8; std::mem::size_of::<singlora_kernel_info>()];
            {
                let global = module.get_global(&format!("{name}_info"), &stream)?;
                stream.memcpy_dtoh(&global, &mut raw[..])?;
            }
            stream.synchronize()?;
            // SAFETY: singlora_kernel_info is four u32 (bindgen checked the
            // layout against the header the kernels were compiled with) and
            // `raw` holds exactly its bytes.
            let info: singlora_kernel_info =
                unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
            let fits = info.smem_bytes <= smem_max;
            if fits && info.smem_bytes > 48 * 1024 {
                func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    info.smem_bytes as i32,
                )?;
            }
            kernels.insert(name, Kernel { func, info, fits });
        }
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let cc_major =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        Ok(Self {
            ctx: ctx.clone(),
            _module: module,
            kernels,
            sm_count,
            cc_major,
        })
    }

    /// The module for the context `stream` belongs to.
    pub fn for_stream(stream: &Arc<CudaStream>) -> Result<Arc<Kernels>> {
        Self::get(stream.context())
    }

    /// A kernel by name, or a typed error when this device cannot run it.
    pub(crate) fn kernel(&self, name: &str) -> Result<&Kernel> {
        // Names come from kernel_name(), which only forms names of the list
        // that load() resolved.
        let kernel = &self.kernels[name];
        if !kernel.fits {
            let (major, minor) = self.ctx.compute_capability()?;
            return Err(Error::SharedMemoryTooSmall {
                kernel: name.to_string(),
                needed: kernel.info.smem_bytes,
                major,
                minor,
            });
        }
        Ok(kernel)
    }

    /// Streaming multiprocessors of the device (sizes few-token grids).
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The module runs its sm_90a SASS (compute capability 9.0): the
    /// cluster-based decode kernels exist only there (newer GPUs JIT the
    /// compute_80 PTX, whose decode kernels are stubs).
    pub(crate) fn has_clusters(&self) -> bool {
        self.cc_major == 9
    }

    /// The context this module lives in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

/// Enqueues `kernel` with one by-value parameter struct.
///
/// # Safety
/// Every device pointer inside `params` must be valid for the accesses the
/// kernel makes for the dimensions `params` describes, on `stream`'s context,
/// until the kernel completes; the grid must match those dimensions.
pub(crate) unsafe fn launch<P: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    kernel: &Kernel,
    grid: (u32, u32, u32),
    params: &P,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: kernel.info.smem_bytes,
    };
    let mut builder = stream.launch_builder(&kernel.func);
    builder.arg(params);
    builder.launch(cfg)?;
    Ok(())
}
