//! The conv GEMMs on cooperative matrices (tensor cores): the adapter's own where it has them,
//! else their plain-WGSL emulation (the same staging, tiles and epilogue), against the f64
//! reference. (Their BatchNorm-fused forms are in `through_bn`.)

use super::gemm::{GemmOp, gemm_tolerance};
use super::{Case, f64s, random};
use crate::DType;
use crate::gpu::{CoopMode, Gpu};
use crate::kernels;
use crate::quant::Bits;
use crate::reference::{self, Tolerance};
use crate::rng::Rng;

/// The cooperative-matrix path a case runs on: the device's own (`path`: `gpu.coop()` or
/// `gpu.coop_grad_weight()`), else the emulation where shaders have f16; `None`: the case
/// checks nothing on this adapter.
pub(super) fn path_or_emulation(gpu: &Gpu, path: Option<CoopMode>) -> Option<CoopMode> {
    path.or_else(|| gpu.caps.shader_f16.then_some(CoopMode::Emulated))
}

/// `len` DoReFa activation levels k fl32(1/n), as the quantizers form them.
pub(super) fn act_levels(rng: &mut Rng, len: usize, bits: Bits) -> Vec<f32> {
    let n = u64::from(bits.levels());
    (0..len)
        .map(|_| rng.below(n + 1) as f32 * bits.inv_levels())
        .collect()
}

/// `len` DoReFa weight levels 2 k fl32(1/n) - 1, as the quantizers form them.
pub(super) fn weight_levels(rng: &mut Rng, len: usize, bits: Bits) -> Vec<f32> {
    act_levels(rng, len, bits)
        .into_iter()
        .map(|v| 2.0 * v - 1.0)
        .collect()
}

/// Forward, grad-weight and grad-input cases.
pub(super) fn cases(v: &mut Vec<Case>) {
    forward_cases(v);
    grad_weight_cases(v);
    grad_input_cases(v);
}

/// The quantized conv forward on cooperative matrices: the adapter's own where it has them,
/// else their plain-WGSL emulation (the same staging, tiles and epilogue), against the f64
/// reference on DoReFa levels. Shapes with tails in M, N and K, two row tiles, stride,
/// padding, dilation and groups, group packing (slots of 32 and 64 rows, empty slots), scalar
/// and vector loads; 8-bit and 4-bit codes. (An adapter
/// without f16 has neither: the cases check nothing there.)
fn forward_cases(v: &mut Vec<Case>) {
    use kernels::conv2d::Conv2dGeom as G;
    let shapes = [
        (G::square(1, 5, 9, 6, 5).stride(2).padding(2), 8),
        (
            G {
                batch: 2,
                cin: 4,
                h: 7,
                w: 9,
                cout: 6,
                kernel: (3, 3),
                stride: (1, 1),
                padding: (1, 2),
                dilation: (2, 2),
                groups: 2,
            },
            4,
        ),
        (G::square(1, 40, 12, 190, 3).padding(1), 4),
        // Pointwise with images of 36 pixels: weight rows and input pixels as vec4s, N = 108.
        (G::square(3, 12, 6, 20, 1), 8),
        // Group packing: 6 groups of 12 rows in slots of 32 (the second tile's last two slots
        // empty); 3 groups of 50 rows in slots of 64, pointwise with vector loads.
        (G::square(2, 12, 7, 72, 3).padding(1).groups(6), 4),
        (G::square(2, 12, 6, 150, 1).groups(3), 8),
    ];
    for (geom, b) in shapes {
        let shape = format!("{} W{b}A{b}", geom.describe());
        v.push(Case::new(
            "conv2d",
            "forward coop",
            shape,
            move |gpu, rng| {
                let Some(mode) = path_or_emulation(gpu, gpu.coop()) else {
                    return Ok(Vec::new());
                };
                let bits = Bits::new(b).expect("valid bits");
                let x = act_levels(rng, geom.x_shape().iter().product(), bits);
                let w = weight_levels(rng, geom.w_shape().iter().product(), bits);
                let bias = random(rng, &[geom.cout]);
                let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                let bt = gpu.upload_f32("b", &[geom.cout], &bias)?;
                let yt = gpu.empty("y", &geom.y_shape(), DType::F32)?;
                let op = kernels::conv_coop::forward(
                    gpu,
                    &geom,
                    &xt,
                    &wt,
                    Some(&bt),
                    &yt,
                    (bits, bits),
                    (Default::default(), None),
                    mode,
                )?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&yt])?;
                let want = geom.ref_forward(&f64s(&x), &f64s(&w), &f64s(&bias));
                let k = geom.reduction()[0];
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, gemm_tolerance(k)),
                )])
            },
        ));
    }
}

/// Grad-weight of a quantized conv on cooperative matrices (emulated where there are none)
/// against the f64 reference: input levels, and a float dy whose rows span 2^-30 to 1 (as
/// gradients do; f16 without the kernel's row scales would lose the small ones), checked row
/// class by row class with tolerances scaled to each. Tails in M, N and K, two row and column
/// tiles, stride, padding, dilation, groups, split-K into a NaN-filled scratch, the bias
/// gradient, scalar and vector loads, 4 and 8 bits.
fn grad_weight_cases(v: &mut Vec<Case>) {
    use kernels::conv2d::Conv2dGeom as G;
    let shapes = [
        (
            G {
                batch: 2,
                cin: 4,
                h: 9,
                w: 9,
                cout: 6,
                kernel: (3, 3),
                stride: (2, 1),
                padding: (1, 2),
                dilation: (2, 1),
                groups: 2,
            },
            4,
        ),
        (G::square(4, 20, 16, 140, 3).padding(1), 8),
        // Pointwise with images of 36 pixels: dy rows as vec4s.
        (G::square(3, 12, 6, 20, 1), 8),
    ];
    for (geom, b) in shapes {
        let shape = format!("{} A{b}", geom.describe());
        v.push(Case::new(
            "conv2d",
            "grad_weight+bias coop",
            shape,
            move |gpu, rng| {
                let Some(mode) = path_or_emulation(gpu, gpu.coop_grad_weight()) else {
                    return Ok(Vec::new());
                };
                let bits = Bits::new(b).expect("valid bits");
                let x = act_levels(rng, geom.x_shape().iter().product(), bits);
                // Output channel c's gradients scaled by 2^-(10 (c % 4)).
                let class = |c: usize| c % 4;
                let row_scale = |c: usize| 2f32.powi(-10 * class(c) as i32);
                let [nb, c, oh, ow] = geom.output_shape();
                let dy: Vec<f32> = (0..nb * c * oh * ow)
                    .map(|i| rng.uniform(-1.0, 1.0) * row_scale((i / (oh * ow)) % c))
                    .collect();
                let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let dwt = gpu.empty("dw", &geom.w_shape(), DType::F32)?;
                let dbt = gpu.empty("db", &[c], DType::F32)?;
                let len = 4 * geom.w_shape().iter().product::<usize>() + 4 * c + 64;
                let scratch = gpu.upload_f32("scratch", &[len], &vec![f32::NAN; len])?;
                let ops = kernels::conv_coop::grad_weight(
                    gpu,
                    &geom,
                    &xt,
                    &dyt,
                    (&dwt, Some(&dbt)),
                    bits,
                    (Default::default(), Some(&scratch)),
                    mode,
                )?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dwt, &dbt])?;
                let want_dw = geom.ref_grad_weight(&f64s(&x), &f64s(&dy));
                let want_db = geom.ref_grad_bias(&f64s(&dy));
                let per_row = want_dw.len() / c;
                let [_, _, k_dw] = geom.reduction();
                let mut out = Vec::new();
                for cls in 0..4 {
                    let rows: Vec<usize> = (0..c).filter(|&r| class(r) == cls).collect();
                    if rows.is_empty() {
                        continue;
                    }
                    let scale = f64::from(row_scale(rows[0]));
                    let pick = |v: &[f32], w: &[f64], width: usize| -> (Vec<f32>, Vec<f64>) {
                        rows.iter()
                            .flat_map(|&r| (r * width..(r + 1) * width).map(|i| (v[i], w[i])))
                            .unzip()
                    };
                    let tol = |k: usize| {
                        let t = gemm_tolerance(k);
                        Tolerance::new(t.atol * scale, t.rtol)
                    };
                    let (g, w) = pick(&got[0], &want_dw, per_row);
                    out.push((
                        format!("dw rows x2^-{}", 10 * cls),
                        reference::compare(&g, &w, tol(k_dw)),
                    ));
                    let (g, w) = pick(&got[1], &want_db, 1);
                    out.push((
                        format!("db rows x2^-{}", 10 * cls),
                        reference::compare(&g, &w, tol(dy.len() / c)),
                    ));
                }
                Ok(out)
            },
        ));
    }
}

/// Grad-input of a quantized conv on cooperative matrices (emulated where there are none)
/// against the f64 reference: weight levels, and a float dy whose images span 2^-30 to 1 (each
/// image has its own scale in the kernel), checked image by image with tolerances scaled to
/// each. A strided, dilated, padded grouped 3x3 with the input quantizer's mask and
/// requantization in the epilogue (the float x spans both sides of the quantizer's range; rows
/// of 200 pixels, so that some tiles' output windows fit in workgroup memory and some do not),
/// a pointwise conv over two row tiles with vector loads of w and dy and no epilogue, and a
/// strided 5x5; 2, 4 and 8 bits.
fn grad_input_cases(v: &mut Vec<Case>) {
    use kernels::conv2d::Conv2dGeom as G;
    let shapes = [
        (
            G {
                batch: 3,
                cin: 6,
                h: 9,
                w: 200,
                cout: 8,
                kernel: (3, 3),
                stride: (2, 1),
                padding: (1, 2),
                dilation: (2, 1),
                groups: 2,
            },
            4,
            true,
        ),
        (G::square(4, 140, 6, 20, 1), 8, false),
        // 5x5 with stride 2, input channels not a multiple of 4 (scalar weight loads).
        (G::square(2, 6, 11, 9, 5).stride(2).padding(2), 2, true),
    ];
    for (geom, b, act) in shapes {
        let requantize = if act { " +act requantize" } else { "" };
        let shape = format!("{} W{b}{requantize}", geom.describe());
        v.push(Case::new(
            "conv2d",
            if act {
                "grad_input+act coop"
            } else {
                "grad_input coop"
            },
            shape,
            move |gpu, rng| {
                let Some(mode) = path_or_emulation(gpu, gpu.coop_grad_input()) else {
                    return Ok(Vec::new());
                };
                let bits = Bits::new(b).expect("valid bits");
                let w = weight_levels(rng, geom.w_shape().iter().product(), bits);
                // Image b's gradients scaled by 2^-(10 (b % 4)).
                let class = |b: usize| b % 4;
                let image_scale = |b: usize| 2f32.powi(-10 * class(b) as i32);
                let per_image: usize = geom.y_shape()[1..].iter().product();
                let dy: Vec<f32> = (0..geom.batch * per_image)
                    .map(|i| rng.uniform(-1.0, 1.0) * image_scale(i / per_image))
                    .collect();
                let x: Vec<f32> = (0..geom.x_shape().iter().product())
                    .map(|_| rng.uniform(-2.0, 12.0))
                    .collect();
                let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
                let act_grad = act.then_some(kernels::conv2d::ActGrad {
                    x: &xt,
                    bits,
                    requantize: true,
                });
                let op = kernels::conv_coop::grad_input(
                    gpu,
                    &geom,
                    &dyt,
                    &wt,
                    &dxt,
                    bits,
                    (act_grad, Default::default()),
                    mode,
                )?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&dxt, &xt])?;
                let mut want = geom.ref_grad_input(&f64s(&dy), &f64s(&w));
                if act {
                    want = reference::quant::act_backward_f64(&x, &want);
                }
                let per_dx: usize = geom.x_shape()[1..].iter().product();
                let k = geom.reduction()[1];
                let mut out = Vec::new();
                for cls in 0..4 {
                    let images: Vec<usize> = (0..geom.batch).filter(|&b| class(b) == cls).collect();
                    if images.is_empty() {
                        continue;
                    }
                    let (g, w): (Vec<f32>, Vec<f64>) = images
                        .iter()
                        .flat_map(|&b| (b * per_dx..(b + 1) * per_dx).map(|i| (got[0][i], want[i])))
                        .unzip();
                    let t = gemm_tolerance(k);
                    let tol = Tolerance::new(t.atol * f64::from(image_scale(images[0])), t.rtol);
                    out.push((
                        format!("dx images x2^-{}", 10 * cls),
                        reference::compare(&g, &w, tol),
                    ));
                }
                if act {
                    out.push((
                        "x requantized".into(),
                        reference::compare(
                            &got[1],
                            &f64s(&reference::quant::act_forward(&x, bits)),
                            Tolerance::EXACT,
                        ),
                    ));
                }
                Ok(out)
            },
        ));
    }
}
