//! The SingLoRA scale schedule s = (alpha / rank) · u(t), u(t) = min(t / T, 1).

/// The ramp of one adapter.
///
/// `step` counts **optimizer steps**, not forward calls: with gradient
/// accumulation several forwards share one step, and counting forwards would
/// run the ramp too fast (a bug in published SingLoRA code). `warmup_steps`
/// is T; T = 0 means no ramp (u = 1 from the first step). Since u(0) = 0 the
/// adapted layer starts equal to the frozen one, which is why A is initialised
/// randomly rather than to zero.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ramp {
    pub alpha: f64,
    pub rank: usize,
    pub warmup_steps: u64,
}

impl Ramp {
    /// u(step) = min(step / T, 1), in f64; 1 when T = 0.
    pub fn ramp(&self, step: u64) -> f64 {
        if self.warmup_steps == 0 {
            1.0
        } else {
            (step as f64 / self.warmup_steps as f64).min(1.0)
        }
    }

    /// s = (alpha / rank) · u(step), computed in f64 and rounded once to f32,
    /// the type the kernels take.
    pub fn scale(&self, step: u64) -> f32 {
        self.scale_f64(step) as f32
    }

    /// The scale the kernels derive from a device step counter (one u64 of
    /// optimizer steps taken): the same f64 operations as [`scale`](Self::scale),
    /// so the same bits, with no host read of the counter.
    pub fn on_device<'a>(
        &self,
        step: &'a cudarc::driver::CudaSlice<u64>,
    ) -> crate::ops::scale::Scale<'a> {
        crate::ops::scale::Scale::Ramp {
            step,
            alpha_over_rank: self.alpha / self.rank as f64,
            warmup_steps: self.warmup_steps,
        }
    }

    /// The same scale before the final rounding (for references).
    pub fn scale_f64(&self, step: u64) -> f64 {
        self.alpha / self.rank as f64 * self.ramp(step)
    }
}
