//! The DoReFa quantizers: activations and weights, forward and backward, bit for bit against
//! the spec's formulas.

use super::{Case, bits, f64s};
use crate::DType;
use crate::kernels;
use crate::quant::Bits;
use crate::reference::{self, Tolerance};
use crate::rng::Rng;

/// Inputs for the activation quantizer: the spec's table, half-way ties at several widths, and
/// uniform values over [-2, 12] (past both clamp ends).
fn act_inputs(rng: &mut Rng, n: usize, b: Bits) -> Vec<f32> {
    let mut x = vec![
        -1.0, 0.0, 0.001, 0.5, 0.0196, 5.0, 9.99, 10.0, 10.000_001, 15.0,
    ];
    let levels = b.levels() as f32;
    for k in 0..8 {
        x.push((k as f32 + 0.5) / levels * 10.0); // near the ties c*n = k + 1/2
    }
    while x.len() < n {
        x.push(rng.uniform(-2.0, 12.0));
    }
    x.truncate(n.max(1));
    x
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for (b, n) in [(2u32, 1000usize), (4, 257), (8, 5000), (16, 300)] {
        v.push(Case::new(
            "act_quant",
            "forward",
            format!("a{b} [{n}]"),
            move |gpu, rng| {
                let b = bits(b);
                let x = act_inputs(rng, n, b);
                let xt = gpu.upload_f32("x", &[x.len()], &x)?;
                let yt = gpu.empty("y", &[x.len()], DType::F32)?;
                let mut ops = vec![kernels::quant::act_forward(gpu, b, &xt, &yt)?];
                let inplace = gpu.upload_f32("x, then y", &[x.len()], &x)?;
                ops.extend(kernels::quant::act_forward_in_place(gpu, b, &inplace)?);
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&yt, &inplace])?;
                let want = f64s(&reference::quant::act_forward(&x, b));
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &want, Tolerance::EXACT),
                    ),
                    (
                        "y in place".into(),
                        reference::compare(&got[1], &want, Tolerance::EXACT),
                    ),
                ])
            },
        ));
        v.push(Case::new(
            "act_quant",
            "backward",
            format!("a{b} [{n}]"),
            move |gpu, rng| {
                let b = bits(b);
                let x = act_inputs(rng, n, b);
                let dy = rng.vec_uniform(x.len(), -1.0, 1.0);
                let xt = gpu.upload_f32("x", &[x.len()], &x)?;
                let dyt = gpu.upload_f32("dy", &[x.len()], &dy)?;
                let dxt = gpu.empty("dx", &[x.len()], DType::F32)?;
                let op = kernels::quant::act_backward(gpu, b, &xt, &dyt, &dxt)?;
                // In place: dy first copied into the buffer that becomes dx.
                let inplace = gpu.upload_f32("dy, then dx", &[x.len()], &dy)?;
                let mut ops = vec![op];
                ops.extend(kernels::quant::act_backward_in_place(
                    gpu, b, &xt, &inplace,
                )?);
                // Mask and requantize in one pass: dy into dx, and x into its quantized value.
                let (xr, dr) = (
                    gpu.upload_f32("x, then quantized", &[x.len()], &x)?,
                    gpu.upload_f32("dy, then dx (requantize)", &[x.len()], &dy)?,
                );
                ops.extend(kernels::quant::act_backward_requantize(gpu, b, &xr, &dr)?);
                let got: Vec<Vec<f32>> =
                    gpu.run_and_read("selftest", &ops, &[&dxt, &inplace, &dr, &xr])?;
                let want = f64s(&reference::quant::act_backward(&x, &dy, b));
                let want_q = f64s(&reference::quant::act_forward(&x, b));
                Ok(vec![
                    (
                        "dx".into(),
                        reference::compare(&got[0], &want, Tolerance::EXACT),
                    ),
                    (
                        "dx in place".into(),
                        reference::compare(&got[1], &want, Tolerance::EXACT),
                    ),
                    (
                        "dx requantize".into(),
                        reference::compare(&got[2], &want, Tolerance::EXACT),
                    ),
                    (
                        "x requantized".into(),
                        reference::compare(&got[3], &want_q, Tolerance::EXACT),
                    ),
                ])
            },
        ));
        v.push(Case::new(
            "act_quant",
            "codes",
            format!("a{b} [{n}]"),
            move |gpu, rng| {
                let b = bits(b);
                let x = act_inputs(rng, n, b);
                let len = x.len();
                let xt = gpu.upload_f32("x", &[len], &x)?;
                let codes = gpu.empty("codes", &[len], b.code_dtype())?;
                let back = gpu.empty("dequant", &[len], DType::F32)?;
                let fake = gpu.empty("fake", &[len], DType::F32)?;
                let ops = vec![
                    kernels::quant::act_codes(gpu, b, &xt, &codes)?,
                    kernels::quant::act_dequant(gpu, b, &codes, &back)?,
                    kernels::quant::act_forward(gpu, b, &xt, &fake)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&back, &fake])?;
                let words: Vec<u32> = gpu.read(&codes)?;
                let want_codes: Vec<f64> = x
                    .iter()
                    .map(|&v| reference::quant::act_code(v, b) as f64)
                    .collect();
                Ok(vec![
                    (
                        "codes".into(),
                        reference::compare(
                            &unpack_codes(&words, b, len),
                            &want_codes,
                            Tolerance::EXACT,
                        ),
                    ),
                    (
                        "dequant = fake-quant".into(),
                        reference::compare(&got[0], &f64s(&got[1]), Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    // Weight tensors: a conv-like shape, one larger than a reduction block, ties in the max
    // (duplicated largest value and saturated |w| > 9.1), and an all-zero tensor.
    let weights: [(&str, u32, usize); 5] = [
        ("[16,8,3,3]", 4, 16 * 8 * 9),
        ("[9000] (3 blocks)", 8, 9000),
        ("ties [512]", 2, 512),
        ("saturated [300]", 8, 300),
        ("zeros [64]", 4, 64),
    ];
    for (shape, b, n) in weights {
        let make = move |rng: &mut Rng| -> Vec<f32> {
            let mut w = rng.vec_uniform(n, -1.5, 1.5);
            match shape {
                s if s.starts_with("ties") => {
                    w[3] = 2.0;
                    w[100] = 2.0;
                    w[200] = -2.0;
                }
                s if s.starts_with("saturated") => {
                    w[7] = 9.5;
                    w[8] = -12.0;
                    w[9] = 30.0;
                }
                s if s.starts_with("zeros") => w.iter_mut().for_each(|v| *v = 0.0),
                _ => {}
            }
            w
        };
        v.push(Case::new(
            "weight_quant",
            "forward",
            format!("w{b} {shape}"),
            move |gpu, rng| {
                let b = bits(b);
                let w = make(rng);
                let wt = gpu.upload_f32("w", &[n], &w)?;
                let w_hat = gpu.empty("w_hat", &[n], DType::F32)?;
                let q = kernels::quant::WeightQuantizer::new(gpu, b, &[n])?;
                let ops = q.forward(gpu, &wt, &w_hat)?;
                let t = q.t().expect("quantized");
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&w_hat, t])?;
                let (t_ref, _) = reference::quant::weight_forward(&w, b);
                // tanh is within a few ulp of libm's (both are about 1 ulp from exact); levels are
                // exact given t.
                let levels = reference::quant::weight_forward_from_t(&got[1], b);
                Ok(vec![
                    (
                        "tanh(W)".into(),
                        reference::compare(&got[1], &f64s(&t_ref), Tolerance::new(1e-30, 3e-7)),
                    ),
                    (
                        "levels given t".into(),
                        reference::compare(&got[0], &f64s(&levels), Tolerance::EXACT),
                    ),
                ])
            },
        ));
        v.push(Case::new(
            "weight_quant",
            "backward",
            format!("w{b} {shape}"),
            move |gpu, rng| {
                let b = bits(b);
                let w = make(rng);
                let g = rng.vec_uniform(n, -1.0, 1.0);
                let wt = gpu.upload_f32("w", &[n], &w)?;
                let gt = gpu.upload_f32("g", &[n], &g)?;
                let w_hat = gpu.empty("w_hat", &[n], DType::F32)?;
                let dw = gpu.empty("dw", &[n], DType::F32)?;
                let q = kernels::quant::WeightQuantizer::new(gpu, b, &[n])?;
                let mut ops = q.forward(gpu, &wt, &w_hat)?;
                ops.extend(q.backward(gpu, &gt, &dw)?);
                let t = q.t().expect("quantized");
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dw, t])?;
                let want = reference::quant::weight_backward(&got[1], &g, b);
                // The max term sums n products in f32.
                let tol = Tolerance::new(1e-6 * (n as f64).sqrt(), 1e-5);
                Ok(vec![("dW".into(), reference::compare(&got[0], &want, tol))])
            },
        ));
        v.push(Case::new(
            "weight_quant",
            "codes",
            format!("w{b} {shape}"),
            move |gpu, rng| {
                let b = bits(b);
                let w = make(rng);
                let wt = gpu.upload_f32("w", &[n], &w)?;
                let q = kernels::quant::WeightQuantizer::new(gpu, b, &[n])?;
                let codes = gpu.empty("codes", &[n], b.code_dtype())?;
                let back = gpu.empty("dequant", &[n], DType::F32)?;
                let fake = gpu.empty("fake", &[n], DType::F32)?;
                let mut ops = q.codes(gpu, &wt, &codes)?;
                ops.push(kernels::quant::weight_dequant(gpu, b, &codes, &back)?);
                ops.extend(q.forward(gpu, &wt, &fake)?);
                let t = q.t().expect("quantized");
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&back, &fake, t])?;
                let words: Vec<u32> = gpu.read(&codes)?;
                let m = reference::quant::absmax(&got[2]);
                let want_codes: Vec<f64> = got[2]
                    .iter()
                    .map(|&t| reference::quant::weight_code(t, m, b) as f64)
                    .collect();
                Ok(vec![
                    (
                        "codes".into(),
                        reference::compare(
                            &unpack_codes(&words, b, n),
                            &want_codes,
                            Tolerance::EXACT,
                        ),
                    ),
                    (
                        "dequant = fake-quant".into(),
                        reference::compare(&got[0], &f64s(&got[1]), Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    // Exact division: the hardware quotient, and one moved by up to 3 ulp either way.
    for nudge in [0i32, 1, -1, 3, -3] {
        v.push(Case::new(
            "exact_div",
            "forward",
            format!("nudge {nudge} ulp [4096]"),
            move |gpu, rng| {
                let n = 4096;
                let a: Vec<f32> = (0..n).map(|_| rng.uniform(-0.5, 0.5)).collect();
                let b: Vec<f32> = (0..n).map(|_| rng.uniform(1e-3, 1.0)).collect();
                let nudges = vec![nudge; n];
                let at = gpu.upload_f32("a", &[n], &a)?;
                let bt = gpu.upload_f32("b", &[n], &b)?;
                let nt = gpu.upload("nudge", &[n], DType::I32, &nudges)?;
                let qt = gpu.empty("q", &[n], DType::F32)?;
                let op = kernels::quant::div_check(gpu, &at, &bt, &nt, &qt)?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&qt])?;
                let want: Vec<f64> = a.iter().zip(&b).map(|(a, b)| (a / b) as f64).collect();
                Ok(vec![(
                    "q".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
    }
}

/// Codes as floats from packed (four per word) or one-per-word storage.
fn unpack_codes(words: &[u32], b: Bits, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match b.code_dtype() {
            DType::U8x4 => ((words[i / 4] >> (8 * (i % 4))) & 0xff) as f32,
            _ => words[i] as f32,
        })
        .collect()
}
