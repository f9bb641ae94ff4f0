//! The frozen layer's products in f64 on the host, for row-major X or G
//! (tokens × d_in or × d_out) and W0 (d_out × d_in). No dependencies:
//! singlora-candle's tests include this file too.

/// `X · W0ᵀ` (tokens × d_out).
pub fn base(x: &[f64], w0: &[f64], tokens: usize, d_in: usize, d_out: usize) -> Vec<f64> {
    let mut y = vec![0.0; tokens * d_out];
    for t in 0..tokens {
        for o in 0..d_out {
            y[t * d_out + o] = (0..d_in).map(|i| x[t * d_in + i] * w0[o * d_in + i]).sum();
        }
    }
    y
}

/// `G · W0` (tokens × d_in).
pub fn base_dx(g: &[f64], w0: &[f64], tokens: usize, d_in: usize, d_out: usize) -> Vec<f64> {
    let mut dx = vec![0.0; tokens * d_in];
    for t in 0..tokens {
        for o in 0..d_out {
            let gv = g[t * d_out + o];
            for i in 0..d_in {
                dx[t * d_in + i] += gv * w0[o * d_in + i];
            }
        }
    }
    dx
}
