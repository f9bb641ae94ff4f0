//! The API in one page: a SingLoRA adapter's forward and backward on the GPU,
//! checked against the f64 reference. Without a GPU it says so and exits 0.
//!
//!     cargo run --release --example quickstart

use half::bf16;
use singlora::{
    backward, backward_workspace_len, forward, open_device, reference, DType, Dims, DxOut, Ramp,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (tokens, d_in, d_out, rank) = (256, 1024, 768, 16);
    let dims = Dims::new(tokens, d_in, d_out, rank)?;
    let ramp = Ramp {
        alpha: 16.0,
        rank,
        warmup_steps: 100,
    };
    let scale = ramp.scale(50); // optimizer step 50 of a 100-step warm-up

    let ctx = match open_device(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("no GPU ({e}); nothing to run");
            return Ok(());
        }
    };
    let stream = ctx.default_stream();

    // Deterministic, non-zero inputs (a small LCG keeps the example dependency-free).
    let mut seed = 1u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    };
    let q =
        |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| bf16::from_f64(x).to_f64()).collect() };
    let x = q((0..tokens * d_in).map(|_| next()).collect());
    let a = q((0..dims.a_len()).map(|_| next() * 0.1).collect());
    let g = q((0..tokens * d_out).map(|_| next()).collect());
    let to_dev =
        |v: &[f64]| stream.clone_htod(&v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>());

    let (xd, ad, gd) = (to_dev(&x)?, to_dev(&a)?, to_dev(&g)?);
    let mut yd = stream.alloc_zeros::<bf16>(tokens * d_out)?; // the frozen layer's output would be here
    let mut sd = stream.alloc_zeros::<f32>(dims.s_len())?;
    forward(
        &stream,
        &dims,
        &xd,
        d_in,
        &ad,
        &mut yd,
        d_out,
        Some(&mut sd),
        scale,
        1.0,
        singlora::Dropout::NONE,
    )?;

    let mut dxd = stream.alloc_zeros::<bf16>(tokens * d_in)?;
    let mut dad = stream.alloc_zeros::<f32>(dims.a_len())?;
    let mut ws = stream.alloc_zeros::<f32>(backward_workspace_len(&dims, true)?)?;
    let dx = DxOut {
        dx: &mut dxd,
        ld_dx: d_in,
        beta: 1.0,
    };
    backward(
        &stream,
        &dims,
        &xd,
        d_in,
        &gd,
        d_out,
        &ad,
        Some(&sd),
        scale,
        Some(dx),
        &mut dad,
        0.0,
        &mut ws,
        singlora::Dropout::NONE,
    )?;

    // The same math in f64.
    let mut y_ref = vec![0.0; tokens * d_out];
    reference::forward(
        &dims,
        &x,
        &a,
        scale as f64,
        1.0,
        &mut y_ref,
        singlora::Dropout::NONE,
    )?;
    let (mut dx_ref, mut da_ref) = (vec![0.0; tokens * d_in], vec![0.0; dims.a_len()]);
    reference::backward(
        &dims,
        &x,
        &a,
        &g,
        scale as f64,
        1.0,
        &mut dx_ref,
        0.0,
        &mut da_ref,
        singlora::Dropout::NONE,
    )?;

    let down = |v: Vec<bf16>| -> Vec<f64> { v.into_iter().map(|x| x.to_f64()).collect() };
    let y = down(stream.clone_dtoh(&yd)?);
    let dxh = down(stream.clone_dtoh(&dxd)?);
    let da: Vec<f64> = stream
        .clone_dtoh(&dad)?
        .into_iter()
        .map(f64::from)
        .collect();
    println!("scale s = {scale} (alpha/rank · u(50/100))");
    for (name, out, r) in [
        ("Y", &y, &y_ref),
        ("dX", &dxh, &dx_ref),
        ("dA", &da, &da_ref),
    ] {
        let err = reference::relative_l2(out, r);
        println!(
            "{name}: relative L2 error vs f64 reference {err:.2e} (bf16 bar {:.0e})",
            bf16::TOLERANCE
        );
        if err > bf16::TOLERANCE {
            return Err(format!("{name} misses the bar").into());
        }
    }
    Ok(())
}
