//! FusedAdamW: singlora's fused AdamW step as a `candle_nn::Optimizer`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    backprop::GradStore, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, TensorId, Var,
};
use half::{bf16, f16};
use singlora::AdamW;

use crate::checks::{refuse, wrap};

/// The ramp counters of the layers' `A`s, by tensor id, so that an
/// optimizer built from plain `Var`s advances the right layer's ramp.
fn counters() -> &'static Mutex<HashMap<TensorId, Weak<AtomicU64>>> {
    static COUNTERS: OnceLock<Mutex<HashMap<TensorId, Weak<AtomicU64>>>> = OnceLock::new();
    COUNTERS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Records `counter` as the ramp counter of the layer whose `A` is `a`.
pub(crate) fn register_counter(a: &Tensor, counter: &Arc<AtomicU64>) {
    let mut map = counters().lock().unwrap_or_else(|e| e.into_inner());
    map.retain(|_, c| c.strong_count() > 0);
    map.insert(a.id(), Arc::downgrade(counter));
}

fn counter_of(t: &Tensor) -> Option<Weak<AtomicU64>> {
    let map = counters().lock().unwrap_or_else(|e| e.into_inner());
    map.get(&t.id()).cloned()
}

/// The optimizer state of one parameter: f32 moments, and f32 master
/// weights for a 16-bit parameter (it receives them rounded).
enum State {
    Cpu {
        m: Vec<f32>,
        v: Vec<f32>,
        master: Option<Vec<f32>>,
    },
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::AdamWBuffers),
}

impl State {
    fn new(var: &Tensor) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if var.device().is_cuda() {
            return Ok(State::Cuda(crate::cuda::AdamWBuffers::new(var)?));
        }
        if !var.device().is_cpu() {
            return Err(refuse(
                "var",
                "a parameter on the CPU or a CUDA device",
                format!("{:?}", var.device().location()),
            ));
        }
        let n = var.elem_count();
        let master = match var.dtype() {
            DType::F32 => None,
            _ => Some(
                var.detach()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
        };
        Ok(State::Cpu {
            m: vec![0.0; n],
            v: vec![0.0; n],
            master,
        })
    }
}

struct Param {
    var: Var,
    /// Created on the parameter's first update.
    state: Option<State>,
    /// Updates of this parameter (AdamW's `t`, 1-based at the update).
    updates: u64,
    /// The ramp counter of the layer this parameter is the `A` of.
    counter: Option<Weak<AtomicU64>>,
}

/// singlora's fused AdamW (PyTorch's `torch.optim.AdamW` update, f32
/// moments, f32 master weights for f16/bf16 parameters) as a
/// [`candle_nn::Optimizer`].
///
/// On a CUDA device each parameter is updated in place by one fused launch
/// on candle's stream; on the CPU by the same arithmetic in Rust. Every
/// `step` that updates the `A` of a [`crate::SingLoraLinear`] also advances
/// that layer's ramp by one optimizer step (so use one optimizer per
/// adapter). Parameters without a gradient in a step are left alone, and
/// their AdamW step count does not advance (as in PyTorch).
pub struct FusedAdamW {
    params: Vec<Param>,
    cfg: AdamW,
    grad_scale: f32,
}

impl FusedAdamW {
    /// The hyper-parameters.
    pub fn config(&self) -> &AdamW {
        &self.cfg
    }

    /// Replaces the hyper-parameters (checked at the next step).
    pub fn set_config(&mut self, cfg: AdamW) {
        self.cfg = cfg;
    }

    /// Multiplies every gradient by `scale` inside the update (1 by
    /// default): with a loss scaled by `L` for f16 training, `1 / L` gives
    /// AdamW the true gradients without a separate unscaling pass.
    pub fn set_grad_scale(&mut self, scale: f32) -> Result<()> {
        if !scale.is_finite() {
            return Err(refuse("grad_scale", "a finite number", scale));
        }
        self.grad_scale = scale;
        Ok(())
    }

    /// Adds a parameter.
    pub fn push(&mut self, var: &Var) -> Result<()> {
        check_var(var)?;
        self.params.push(Param {
            var: var.clone(),
            state: None,
            updates: 0,
            counter: counter_of(var.as_tensor()),
        });
        Ok(())
    }

    fn update(cfg: &AdamW, grad_scale: f32, p: &mut Param, grad: &Tensor) -> Result<()> {
        if grad.dims() != p.var.dims() {
            return Err(refuse(
                "grad",
                format!("the parameter's shape {:?}", p.var.dims()),
                format!("shape {:?}", grad.dims()),
            ));
        }
        let t = p.updates + 1;
        cfg.bias_corrections(t).map_err(wrap)?;
        if p.state.is_none() {
            p.state = Some(State::new(p.var.as_tensor())?);
        }
        let g32 = grad.detach().to_dtype(DType::F32)?.contiguous()?;
        let op = AdamWOp {
            cfg,
            step: t,
            grad_scale,
            state: RefCell::new(p.state.as_mut().expect("created above")),
        };
        p.var.as_tensor().inplace_op2(&g32, &op)?;
        p.updates = t;
        if let Some(c) = p.counter.as_ref().and_then(Weak::upgrade) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn check_var(var: &Var) -> Result<()> {
    match var.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(refuse(
            "var",
            "an f32, f16 or bf16 parameter",
            format!("{other:?}"),
        )),
    }
}

impl candle_nn::Optimizer for FusedAdamW {
    type Config = AdamW;

    /// Integer variables are skipped (as candle's optimizers do); f64 ones
    /// are refused (the kernel runs f32, f16 and bf16).
    fn new(vars: Vec<Var>, cfg: AdamW) -> Result<Self> {
        cfg.bias_corrections(1).map_err(wrap)?;
        let mut opt = Self {
            params: Vec::new(),
            cfg,
            grad_scale: 1.0,
        };
        for var in vars.iter().filter(|v| v.dtype().is_float()) {
            opt.push(var)?;
        }
        Ok(opt)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let (cfg, grad_scale) = (self.cfg, self.grad_scale);
        for p in self.params.iter_mut() {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                Self::update(&cfg, grad_scale, p, g)?;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr as f64
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr as f32;
    }
}

/// One AdamW update of a parameter's storage in place, from its f32
/// gradient.
pub(crate) struct AdamWOp<'a> {
    pub(crate) cfg: &'a AdamW,
    pub(crate) step: u64,
    pub(crate) grad_scale: f32,
    state: RefCell<&'a mut State>,
}

/// The kernel's arithmetic (kernels/adamw/adamw.cu), in f32, on the host.
#[allow(clippy::too_many_arguments)]
fn adamw_host<T: Copy>(
    cfg: &AdamW,
    (bias1, bias2): (f32, f32),
    grad_scale: f32,
    p: &mut [T],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    mut master: Option<&mut Vec<f32>>,
    to: impl Fn(T) -> f32,
    from: impl Fn(f32) -> T,
) {
    for i in 0..p.len() {
        let gi = grad_scale * g[i];
        let mut x = match master.as_deref() {
            Some(w) => w[i],
            None => to(p[i]),
        };
        x *= 1.0 - cfg.lr * cfg.weight_decay;
        let mi = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * gi;
        let vi = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        x -= cfg.lr * (mi / bias1) / ((vi / bias2).sqrt() + cfg.eps);
        if let Some(w) = master.as_deref_mut() {
            w[i] = x;
        }
        p[i] = from(x);
    }
}

fn range(name: &'static str, l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| {
        refuse(
            name,
            "a contiguous tensor",
            format!("strides {:?}", l.stride()),
        )
    })
}

impl InplaceOp2 for AdamWOp<'_> {
    fn name(&self) -> &'static str {
        "singlora-adamw"
    }

    // Without the `cuda` feature the state has one variant.
    #[allow(irrefutable_let_patterns)]
    fn cpu_fwd(&self, p: &mut CpuStorage, pl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let mut state = self.state.borrow_mut();
        let State::Cpu { m, v, master } = &mut **state else {
            return Err(refuse(
                "var",
                "the device its optimizer state is on",
                "the CPU",
            ));
        };
        let (ps, pe) = range("var", pl)?;
        let (gs, ge) = range("grad", gl)?;
        let CpuStorage::F32(g) = g else {
            return Err(refuse(
                "grad",
                "an f32 gradient",
                format!("{:?}", g.dtype()),
            ));
        };
        let g = &g[gs..ge];
        let (b1, b2) = self.cfg.bias_corrections(self.step).map_err(wrap)?;
        let bias = (b1 as f32, b2 as f32);
        let (cfg, gs) = (self.cfg, self.grad_scale);
        // The update of the slice of `p`, through f32 (`to`, `from`).
        macro_rules! update {
            ($p:expr, $master:expr, $to:expr, $from:expr) => {
                adamw_host(cfg, bias, gs, &mut $p[ps..pe], g, m, v, $master, $to, $from)
            };
        }
        match p {
            CpuStorage::F32(p) => update!(p, None, |x| x, |x| x),
            CpuStorage::F16(p) => update!(p, master.as_mut(), f16::to_f32, f16::from_f32),
            CpuStorage::BF16(p) => update!(p, master.as_mut(), bf16::to_f32, bf16::from_f32),
            other => {
                return Err(refuse(
                    "var",
                    "an f32, f16 or bf16 parameter",
                    format!("{:?}", other.dtype()),
                ))
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        pl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let mut state = self.state.borrow_mut();
        let State::Cuda(buffers) = &mut **state else {
            return Err(refuse(
                "var",
                "the device its optimizer state is on",
                "a CUDA device",
            ));
        };
        crate::cuda::adamw(self, buffers, (p, pl), (g, gl))
    }
}
