//! Binary and ternary quantizer cases: the binary centring of the latent weights (exact: the
//! same ordered sums), α, Ŵ and dL/dW against the scalar formulas of `quant::wbwtab` (α sums
//! |w| in another order: 1e-6 relative), and the binary activation both ways (exact).

use super::{Case, f64s};
use crate::DType;
use crate::kernels::wbwtab::{WbwtabWeights, sign_backward, sign_forward};
use crate::quant::wbwtab::{self as wb, Weights};
use crate::reference::{self, Tolerance};

const SHAPES: &[(&str, Weights, &[usize])] = &[
    ("binary conv", Weights::Binary, &[16, 8, 3, 3]),
    ("binary linear", Weights::Binary, &[10, 300]),
    ("ternary conv, a tie", Weights::Ternary, &[16, 8, 3, 3]),
    ("ternary 1x1", Weights::Ternary, &[24, 40, 1, 1]),
];

/// Per output channel: forward (α from the centred weights) and backward of `w` (channels of
/// `per` elements, input channels of `spatial`).
fn reference(
    weights: Weights,
    w: &mut [f32],
    g: &[f32],
    per: usize,
    cin: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (mut y, mut d) = (Vec::new(), Vec::new());
    for (o, row) in w.chunks_mut(per).enumerate() {
        let gr = &g[o * per..(o + 1) * per];
        match weights {
            Weights::Binary => {
                wb::binary_centre(row, cin);
                y.extend(wb::binary_forward(row));
                d.extend(wb::binary_backward(row, gr));
            }
            _ => {
                y.extend(wb::ternary_forward(row));
                d.extend(wb::ternary_backward(row, gr));
            }
        }
    }
    (y, d)
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for &(name, weights, shape) in SHAPES {
        v.push(Case::new(
            "wbwtab_quant",
            "weights forward, backward",
            format!("{name} {shape:?}"),
            move |gpu, rng| {
                let n: usize = shape.iter().product();
                let per = n / shape[0];
                let mut w = rng.vec_uniform(n, -1.5, 1.5);
                if weights == Weights::Ternary {
                    // Channel 0 holds the spec's exact tie (Δ = 0.4375 on the tied elements).
                    let tie = [0.4375f32, -0.4375, 0.8125, 0.8125];
                    for (j, x) in w[..per].iter_mut().enumerate() {
                        *x = tie[j % 4];
                    }
                }
                let g = rng.vec_uniform(n, -1.0, 1.0);
                let q = WbwtabWeights::new(gpu, "selftest", weights, shape)?;
                let wt = gpu.upload_f32("w", shape, &w)?;
                let gt = gpu.upload_f32("g", shape, &g)?;
                let w_hat = gpu.empty("w_hat", shape, DType::F32)?;
                let dw = gpu.empty("dw", shape, DType::F32)?;
                let mut ops = q.forward(gpu, &wt, &w_hat)?;
                ops.extend(q.backward(gpu, &wt, &gt, &dw)?);
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&wt, &w_hat, &dw])?;
                let cin = shape.get(1).copied().unwrap_or(1);
                let (y, d) = reference(weights, &mut w, &g, per, cin);
                let tol = Tolerance::new(1e-6, 1e-5);
                Ok(vec![
                    (
                        "latent weights after".into(),
                        reference::compare(&got[0], &f64s(&w), Tolerance::EXACT),
                    ),
                    ("w_hat".into(), reference::compare(&got[1], &f64s(&y), tol)),
                    ("dw".into(), reference::compare(&got[2], &f64s(&d), tol)),
                ])
            },
        ));
    }
    v.push(Case::new(
        "wbwtab_quant",
        "binary activation",
        "[5000]".into(),
        |gpu, rng| {
            let mut x = rng.vec_uniform(5000, -2.0, 2.0);
            for (i, v) in [-1.0f32, 1.0, 0.0, -0.999, 0.999, -1.5].iter().enumerate() {
                x[i] = *v;
            }
            let dy = rng.vec_uniform(5000, -1.0, 1.0);
            let xt = gpu.upload_f32("x", &[5000], &x)?;
            let dyt = gpu.upload_f32("dy", &[5000], &dy)?;
            let y = gpu.empty("y", &[5000], DType::F32)?;
            let dx = gpu.empty("dx", &[5000], DType::F32)?;
            let ops = vec![
                sign_forward(gpu, &xt, &y)?,
                sign_backward(gpu, &xt, &dyt, &dx)?,
            ];
            let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &dx])?;
            let want_y: Vec<f32> = x.iter().map(|&v| wb::act_forward(v)).collect();
            let want_dx: Vec<f32> = x
                .iter()
                .zip(&dy)
                .map(|(&v, &g)| wb::act_backward(v, g))
                .collect();
            Ok(vec![
                (
                    "y".into(),
                    reference::compare(&got[0], &f64s(&want_y), Tolerance::EXACT),
                ),
                (
                    "dx".into(),
                    reference::compare(&got[1], &f64s(&want_dx), Tolerance::EXACT),
                ),
            ])
        },
    ));
}
