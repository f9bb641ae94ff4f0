//! One call's random inputs (never zeros) and their f64 reference, for the
//! CPU, CUDA and dropout tests.

use candle_core::DType;
use rand::{rngs::StdRng, SeedableRng};
use singlora::{reference, Dims, Dropout};

use super::*;

/// Random inputs of one call (never zeros).
pub struct Case {
    pub lead: Vec<usize>,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
    pub scale: f64,
    pub x: Vec<f64>,
    pub a: Vec<f64>,
    pub w: Vec<f64>,
    pub g: Vec<f64>,
}

impl Case {
    pub fn new(lead: &[usize], d_in: usize, d_out: usize, rank: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let tokens: usize = lead.iter().product();
        let d = d_in.max(d_out);
        Self {
            lead: lead.to_vec(),
            d_in,
            d_out,
            rank,
            scale: 0.75,
            x: randn(&mut rng, tokens * d_in, 1.0),
            a: randn(&mut rng, d * rank, 1.0 / (d as f64).sqrt()),
            w: randn(&mut rng, d_out * d_in, 1.0 / (d_in as f64).sqrt()),
            g: randn(&mut rng, tokens * d_out, 1.0),
        }
    }

    pub fn tokens(&self) -> usize {
        self.lead.iter().product()
    }

    pub fn shape(&self, last: usize) -> Vec<usize> {
        let mut s = self.lead.clone();
        s.push(last);
        s
    }

    pub fn dims(&self) -> Dims {
        Dims::new(self.tokens(), self.d_in, self.d_out, self.rank).unwrap()
    }

    /// The f64 reference (frozen product included when `frozen`) on the
    /// inputs as `dtype` rounds them: `(y, dX, dA)` for upstream G.
    pub fn reference(
        &self,
        dtype: DType,
        frozen: bool,
        dropout: Dropout,
    ) -> R<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let (x, a, w, g) = (
            rounded(&self.x, dtype)?,
            rounded(&self.a, dtype)?,
            rounded(&self.w, dtype)?,
            rounded(&self.g, dtype)?,
        );
        let (t, di, dout) = (self.tokens(), self.d_in, self.d_out);
        let dims = self.dims();
        let (mut y, mut dx) = if frozen {
            (base(&x, &w, t, di, dout), base_dx(&g, &w, t, di, dout))
        } else {
            (vec![0.0; t * dout], vec![0.0; t * di])
        };
        reference::forward(&dims, &x, &a, self.scale, 1.0, &mut y, dropout).unwrap();
        let mut da = vec![0.0; dims.a_len()];
        reference::backward(
            &dims, &x, &a, &g, self.scale, 1.0, &mut dx, 0.0, &mut da, dropout,
        )
        .unwrap();
        Ok((y, dx, da))
    }
}
