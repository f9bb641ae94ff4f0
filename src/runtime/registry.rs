//! The typed kernel registry: every kernel of kernels/params.h's list,
//! resolved once per CUDA context and looked up by (family, element type,
//! rank bucket) — never by a string built per launch.
//!
//! Two modules are embedded: the portable one (every family but the `_sm90`
//! ones; SASS for sm_80 and sm_90a, PTX for compute_80) and the sm_90a one
//! (the `_sm90` families), which is loaded only on a compute capability 9.0
//! device and only when the build included sm_90a. Whether a path exists is
//! therefore a fact about the loaded module, not about the device's
//! capability: a build without sm_90a never offers the cluster kernels.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DriverError};
use cudarc::nvrtc::Ptx;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::params::singlora_kernel_info;
use crate::runtime::device::{capability, check_capability};

include!(concat!(env!("OUT_DIR"), "/kernel_list.rs"));

/// The portable module: SASS for sm_80 and sm_90a and PTX for compute_80 by
/// default (see `SINGLORA_CUDA_ARCHS`).
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/singlora.fatbin"));

/// The sm_90a module (the `_sm90` families); empty when the build has no
/// sm_90a target.
pub static FATBIN_SM90: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/singlora_sm90.fatbin"));

/// Test knob: caps the shared memory per block the registry lets kernels
/// use (bytes), below what the device grants, so the refusals of a small
/// device (sm_86/sm_89: 99 KiB) can be exercised on a large one. Read once,
/// when a context's module is loaded.
pub const SMEM_LIMIT_ENV: &str = "SINGLORA_MAX_SMEM_PER_BLOCK";

/// Test knob: caps the clusters of the persistent cluster kernels (the
/// fused backward) the registry lets a grid hold at once, below what the
/// driver reports, so the grid's walk over more token ranges than resident
/// clusters can be exercised on any sm_90 device. Read once, when a
/// context's module is loaded.
pub const MAX_CLUSTERS_ENV: &str = "SINGLORA_MAX_ACTIVE_CLUSTERS";

/// One family of `SINGLORA_FAMILIES`.
#[derive(Clone, Copy, Debug)]
pub struct FamilySpec {
    pub family: Family,
    /// The kernel name's stem.
    pub name: &'static str,
    /// The element types it has one kernel each for (codes, indices into
    /// [`DTYPE_NAMES`], in the header's order); empty: one untyped kernel.
    pub dtypes: &'static [usize],
    /// The rank capacities instantiated, smallest first (empty: one kernel
    /// for every rank).
    pub buckets: &'static [usize],
    /// sm_90a code, in the sm_90a module.
    pub sm90: bool,
}

impl Family {
    /// This family's entry of the list.
    pub fn spec(self) -> &'static FamilySpec {
        &FAMILIES[self as usize]
    }
}

/// One kernel of the list: a family, an element type (index into the
/// family's type list, 0 for untyped families) and a rank bucket (index into
/// the family's bucket list, 0 for unranked ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId {
    family: Family,
    dtype: usize,
    bucket: usize,
}

impl KernelId {
    /// The kernel of `family` for element type `T` and `rank`: the smallest
    /// bucket that holds the rank. `None` when the family has no bucket that
    /// large (the decode forward above rank 64) or no kernel for `T` (the
    /// bf16-only fused backward for f16 or f32).
    pub fn of<T: DType>(family: Family, rank: usize) -> Option<Self> {
        let spec = family.spec();
        // The slot of T among the family's types (none: no such kernel).
        let dtype = if spec.dtypes.is_empty() {
            0
        } else {
            spec.dtypes.iter().position(|&c| c == T::CODE as usize)?
        };
        let bucket = if spec.buckets.is_empty() {
            0
        } else {
            // A small-configuration family may lack the lower buckets: the
            // rank must fit the bucket the regular family would pick.
            let regular = RANK_BUCKETS.iter().find(|&&cap| rank <= cap)?;
            let b = spec.buckets.iter().position(|&cap| rank <= cap)?;
            if spec.buckets[b] != *regular && spec.name.ends_with("_small") {
                return None;
            }
            b
        };
        Some(Self {
            family,
            dtype,
            bucket,
        })
    }

    /// The one kernel of a family with neither element types nor buckets.
    pub fn untyped(family: Family) -> Self {
        debug_assert!(family.spec().dtypes.is_empty() && family.spec().buckets.is_empty());
        Self {
            family,
            dtype: 0,
            bucket: 0,
        }
    }

    /// The family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The kernel's name in the module: `family[_<dtype>][_r<bucket>]`.
    pub fn name(&self) -> String {
        let spec = self.family.spec();
        let mut name = spec.name.to_string();
        if !spec.dtypes.is_empty() {
            name.push('_');
            name.push_str(DTYPE_NAMES[spec.dtypes[self.dtype]]);
        }
        if !spec.buckets.is_empty() {
            name.push_str(&format!("_r{}", spec.buckets[self.bucket]));
        }
        name
    }

    /// Its slot in a registry table (the order of [`KernelId::all`]).
    fn index(&self) -> usize {
        let mut offset = 0;
        for spec in &FAMILIES {
            if spec.family == self.family {
                return offset + self.dtype * slots_per_dtype(spec) + self.bucket;
            }
            offset += kernels_of(spec);
        }
        unreachable!("every family is in FAMILIES")
    }

    /// Every kernel of the list, family by family in the header's order.
    pub fn all() -> Vec<KernelId> {
        let mut out = Vec::new();
        for spec in &FAMILIES {
            for dtype in 0..spec.dtypes.len().max(1) {
                for bucket in 0..slots_per_dtype(spec) {
                    out.push(KernelId {
                        family: spec.family,
                        dtype,
                        bucket,
                    });
                }
            }
        }
        out
    }
}

fn slots_per_dtype(spec: &FamilySpec) -> usize {
    spec.buckets.len().max(1)
}

fn kernels_of(spec: &FamilySpec) -> usize {
    spec.dtypes.len().max(1) * slots_per_dtype(spec)
}

/// Every kernel name of the list (both modules), in [`KernelId::all`] order.
pub fn kernel_names() -> Vec<String> {
    KernelId::all().iter().map(KernelId::name).collect()
}

/// One resolved kernel: its function handle and the launch shape it published.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub(crate) func: CudaFunction,
    pub(crate) info: singlora_kernel_info,
    /// The device (and the test knob) grant the kernel's shared memory.
    fits: bool,
    /// Clusters of this kernel that can be resident at once, queried when
    /// the module loads for the persistent cluster kernels (`None` for the
    /// others, or when the driver cannot say). Their grid is sized from it;
    /// `Some(0)`: the device cannot hold one.
    pub(crate) max_clusters: Option<u32>,
}

/// The modules loaded into one CUDA context, with every kernel resolved.
///
/// Loading happens once per context (the first [`Kernels::get`]) and is the
/// only place that synchronises; launchers only index the table. Several
/// contexts (one per GPU) each get their own.
#[derive(Debug)]
pub struct Kernels {
    ctx: Arc<CudaContext>,
    _modules: Vec<Arc<CudaModule>>,
    /// Indexed by [`KernelId::index`]; `None`: not in any loaded module.
    table: Vec<Option<Kernel>>,
    sm_count: u32,
}

fn cache() -> &'static Mutex<Vec<Arc<Kernels>>> {
    static CACHE: OnceLock<Mutex<Vec<Arc<Kernels>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(Vec::new()))
}

impl Kernels {
    /// The registry for `ctx`, loading the modules on first use.
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

    /// The registry of the context `stream` belongs to.
    pub fn for_stream(stream: &Arc<cudarc::driver::CudaStream>) -> Result<Arc<Kernels>> {
        Self::get(stream.context())
    }

    fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        check_capability(ctx)?;
        // cuModuleLoadData takes a fatbin as well as PTX text.
        let main = ctx.load_module(Ptx::from_binary(FATBIN.to_vec()))?;
        let mut modules = vec![main.clone()];
        // sm_90a SASS runs on compute capability 9.0 alone.
        let sm90 = if !FATBIN_SM90.is_empty() && capability(ctx)? == (9, 0) {
            let m = ctx.load_module(Ptx::from_binary(FATBIN_SM90.to_vec()))?;
            modules.push(m.clone());
            Some(m)
        } else {
            None
        };
        let stream = ctx.default_stream();
        let mut smem_max = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as u32;
        if let Some(limit) = std::env::var(SMEM_LIMIT_ENV)
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            smem_max = smem_max.min(limit);
        }
        let mut table = Vec::new();
        for id in KernelId::all() {
            let module = if id.family.spec().sm90 {
                sm90.as_ref()
            } else {
                Some(&main)
            };
            let kernel = match module {
                Some(m) => resolve(m, &stream, &id.name(), smem_max)?,
                None => None,
            };
            table.push(kernel);
        }
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        Ok(Self {
            ctx: ctx.clone(),
            _modules: modules,
            table,
            sm_count,
        })
    }

    /// A kernel, or a typed error: [`Error::MissingKernel`] when no loaded
    /// module has it, [`Error::SharedMemoryTooSmall`] when the device cannot
    /// grant its shared memory.
    pub(crate) fn kernel(&self, id: KernelId) -> Result<&Kernel> {
        let Some(kernel) = &self.table[id.index()] else {
            return Err(Error::MissingKernel { kernel: id.name() });
        };
        if !kernel.fits {
            let (major, minor) = capability(&self.ctx)?;
            return Err(Error::SharedMemoryTooSmall {
                kernel: id.name(),
                needed: kernel.info.smem_bytes,
                major,
                minor,
            });
        }
        Ok(kernel)
    }

    /// The kernel of a family for element type `T` and `rank` that fits this
    /// device: the regular configuration, or, where the device cannot grant
    /// its shared memory, the `small` family's (sm_86/sm_89). The regular
    /// kernel's refusal when neither fits.
    pub(crate) fn fitting<T: DType>(
        &self,
        regular: Family,
        small: Family,
        rank: usize,
    ) -> Result<&Kernel> {
        let id = KernelId::of::<T>(regular, rank).ok_or_else(|| Error::MissingKernel {
            kernel: format!("{} for rank {rank}", regular.spec().name),
        })?;
        match self.kernel(id) {
            Err(Error::SharedMemoryTooSmall { .. })
                if KernelId::of::<T>(small, rank).is_some_and(|s| self.has(s)) =>
            {
                self.kernel(KernelId::of::<T>(small, rank).expect("checked above"))
            }
            other => other,
        }
    }

    /// The kernel exists in a loaded module and fits this device.
    pub(crate) fn has(&self, id: KernelId) -> bool {
        self.usable(id).is_some()
    }

    /// The kernel, where it exists in a loaded module and fits this device:
    /// the optional paths' lookup (they never refuse; see [`Kernels::kernel`]
    /// for the typed errors).
    pub(crate) fn usable(&self, id: KernelId) -> Option<&Kernel> {
        self.table[id.index()].as_ref().filter(|k| k.fits)
    }

    /// Kernel `name` (of [`kernel_names`]), if a loaded module has it.
    fn by_name(&self, name: &str) -> Option<&Kernel> {
        KernelId::all()
            .iter()
            .position(|id| id.name() == name)
            .and_then(|i| self.table[i].as_ref())
    }

    /// Whether the module loaded into this context has kernel `name` (of
    /// [`kernel_names`]); sm_90a kernels exist only on compute capability 9.0.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name(name).is_some()
    }

    /// The dynamic shared memory per block kernel `name` (of
    /// [`kernel_names`]) launches with, if it is loaded here.
    pub fn shared_memory(&self, name: &str) -> Option<u32> {
        self.by_name(name).map(|k| k.info.smem_bytes)
    }

    /// How many clusters of kernel `name` (of [`kernel_names`]) the device
    /// holds at once, for the persistent cluster kernels loaded here (the
    /// fused backward); `None` for other kernels or when the driver cannot say.
    pub fn max_active_clusters(&self, name: &str) -> Option<u32> {
        self.by_name(name).and_then(|k| k.max_clusters)
    }

    /// Streaming multiprocessors of the device (sizes few-token grids).
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The context this registry lives in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

/// Resolves `name` and reads its published `name_info`; `None` when the
/// module has no such function.
fn resolve(
    module: &Arc<CudaModule>,
    stream: &Arc<cudarc::driver::CudaStream>,
    name: &str,
    smem_max: u32,
) -> Result<Option<Kernel>> {
    let func = match module.load_function(name) {
        Ok(f) => f,
        Err(DriverError(cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NOT_FOUND)) => {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    let mut raw = [0u8; std::mem::size_of::<singlora_kernel_info>()];
    {
        let global = module.get_global(&format!("{name}_info"), stream)?;
        stream.memcpy_dtoh(&global, &mut raw[..])?;
    }
    stream.synchronize()?;
    // SAFETY: singlora_kernel_info is four u32 (bindgen checked the layout
    // against the header the kernels were compiled with) and `raw` holds
    // exactly its bytes.
    let info: singlora_kernel_info = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    let fits = info.smem_bytes <= smem_max;
    if fits && info.smem_bytes > 48 * 1024 {
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            info.smem_bytes as i32,
        )?;
    }
    let max_clusters = match cluster_size(name) {
        Some(cl) if fits => {
            let cap = std::env::var(MAX_CLUSTERS_ENV)
                .ok()
                .and_then(|v| v.parse::<u32>().ok());
            match (max_active_clusters(&func, cl, info.smem_bytes), cap) {
                (Some(n), Some(c)) => Some(n.min(c)),
                (n, c) => n.or(c),
            }
        }
        _ => None,
    };
    Ok(Some(Kernel {
        func,
        info,
        fits,
        max_clusters,
    }))
}

/// The compile-time cluster size of the persistent cluster kernels (whose
/// grid the host sizes from the device's residency); `None` for others.
fn cluster_size(name: &str) -> Option<u32> {
    name.starts_with(Family::BackwardFusedSm90.spec().name)
        .then_some(crate::params::SINGLORA_BACKWARD_FUSED_CLUSTER)
}

/// How many clusters of `cl` blocks of `func` (with `smem` bytes of dynamic
/// shared memory each) the device can hold at once; `None` if the driver
/// cannot say (the launcher then takes its full grid).
fn max_active_clusters(func: &CudaFunction, cl: u32, smem: u32) -> Option<u32> {
    use cudarc::driver::sys;
    let config = sys::CUlaunchConfig {
        gridDimX: cl,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: crate::params::SINGLORA_THREADS,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: std::ptr::null_mut(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut n: std::ffi::c_int = 0;
    // SAFETY: `func` is a live function of a loaded module (the context is
    // current: the module was just loaded in it); `config` is fully
    // initialised and names no attributes (the kernel's cluster shape is
    // compiled in); `n` is a valid out-pointer.
    let rc = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, func.cu_function(), &config) };
    (rc == sys::cudaError_enum::CUDA_SUCCESS).then_some(n.max(0) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn dtype_names_follow_the_dtype_codes() {
        assert_eq!(DTYPE_NAMES[f32::CODE as usize], f32::NAME);
        assert_eq!(DTYPE_NAMES[f16::CODE as usize], f16::NAME);
        assert_eq!(DTYPE_NAMES[bf16::CODE as usize], bf16::NAME);
    }

    #[test]
    fn families_are_listed_in_enum_order() {
        for (i, spec) in FAMILIES.iter().enumerate() {
            assert_eq!(spec.family as usize, i, "{}", spec.name);
        }
    }

    #[test]
    fn kernel_ids_index_the_table_densely_and_name_uniquely() {
        let all = KernelId::all();
        for (i, id) in all.iter().enumerate() {
            assert_eq!(id.index(), i, "{}", id.name());
        }
        let mut names = kernel_names();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "kernel names are unique");
    }

    #[test]
    fn ranks_pick_the_smallest_bucket_that_holds_them() {
        let name = |f, r| KernelId::of::<bf16>(f, r).map(|k| k.name());
        assert_eq!(name(Family::Forward, 1).unwrap(), "forward_bf16_r32");
        assert_eq!(name(Family::Forward, 32).unwrap(), "forward_bf16_r32");
        assert_eq!(name(Family::Forward, 33).unwrap(), "forward_bf16_r64");
        assert_eq!(name(Family::Forward, 256).unwrap(), "forward_bf16_r256");
        assert_eq!(name(Family::Forward, 257), None);
        assert_eq!(
            name(Family::ForwardDecodeSm90, 64).unwrap(),
            "forward_decode_sm90_bf16_r64"
        );
        assert_eq!(name(Family::ForwardDecodeSm90, 65), None);
        // Small configurations exist only where the regular one is too big.
        assert_eq!(
            name(Family::ForwardSmall, 200).unwrap(),
            "forward_small_bf16_r256"
        );
        assert_eq!(name(Family::ForwardSmall, 100), None);
        assert_eq!(
            name(Family::BackwardDaPartialSmall, 100).unwrap(),
            "backward_da_partial_small_bf16_r128"
        );
        assert_eq!(name(Family::BackwardDaPartialSmall, 64), None);
        assert_eq!(name(Family::Merge, 200).unwrap(), "merge_bf16");
        // A family of fewer element types has no kernel for the others.
        assert_eq!(
            name(Family::BackwardFusedSm90, 20).unwrap(),
            "backward_fused_sm90_bf16_r32"
        );
        assert_eq!(name(Family::BackwardFusedSm90, 33), None);
        assert!(KernelId::of::<f16>(Family::BackwardFusedSm90, 16).is_none());
        assert!(KernelId::of::<f32>(Family::BackwardFusedSm90, 16).is_none());
        assert_eq!(KernelId::untyped(Family::Fill).name(), "fill");
        assert_eq!(
            KernelId::of::<f32>(Family::BackwardDaPartial, 100)
                .unwrap()
                .name(),
            "backward_da_partial_f32_r128"
        );
    }
}
