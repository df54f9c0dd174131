//! The conv GEMMs that quantize their stored float input where they load it (the shaders'
//! `IN_QUANT` without `IN_BN`: a residual block's first conv reads the block's output so),
//! forward and grad-weight, on the fp32 kernels and on cooperative matrices (or their
//! emulation), against the f64 reference on the input quantized on the CPU. The input spans
//! the quantizer's clamp on both sides; the quantizer is the reference's, bit for bit.

use super::coop::{path_or_emulation, weight_levels};
use super::gemm::{GemmOp, gemm_tolerance};
use super::{Case, f64s, random};
use crate::DType;
use crate::gpu::CoopMode;
use crate::kernels::conv_coop;
use crate::kernels::conv2d::{self, AroundBn, Conv2dGeom};
use crate::quant::Bits;
use crate::reference::{self, quant};
use crate::rng::Rng;

/// A geometry, its input bits, and whether the cooperative-matrix kernels run it too: grouped
/// 3×3 padded, a pointwise conv on images of a multiple of 4 pixels (the vector loads), stride 2
/// with a 5×5 kernel, a group-packed tile, and a 3×3 over several column tiles. (The
/// cooperative-matrix kernels take the first two, their scalar and vector staging: on lavapipe
/// each of their emulated specialisations takes seconds to compile.)
fn shapes() -> Vec<(Conv2dGeom, u32, bool)> {
    vec![
        (
            Conv2dGeom::square(2, 8, 6, 12, 3).padding(1).groups(2),
            4,
            true,
        ),
        (Conv2dGeom::square(2, 6, 8, 5, 1), 8, true),
        (
            Conv2dGeom::square(1, 4, 9, 6, 5).stride(2).padding(2),
            2,
            false,
        ),
        (Conv2dGeom::square(2, 64, 4, 64, 1).groups(4), 8, false),
        (Conv2dGeom::square(2, 8, 16, 6, 3).padding(1), 4, false),
    ]
}

/// The float input (from below the clamp's 0 to above its 1) and its quantized form.
fn input(rng: &mut Rng, geom: &Conv2dGeom, bits: Bits) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = (0..geom.x_shape().iter().product())
        .map(|_| rng.uniform(-0.5, 1.5))
        .collect();
    let xq = quant::act_forward(&x, bits);
    (x, xq)
}

/// The kernels a case runs: `Some(None)` the fp32 ones, `Some(Some(mode))` the
/// cooperative-matrix ones on `path` (a coop case), `None` a coop case without a path here
/// (skipped).
pub(super) fn path_for(coop: bool, path: Option<CoopMode>) -> Option<Option<CoopMode>> {
    if coop { path.map(Some) } else { Some(None) }
}

fn quantized(bits: Bits) -> AroundBn<'static> {
    AroundBn {
        input_quant: Some(bits),
        ..AroundBn::default()
    }
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for (geom, b, on_coop) in shapes() {
        let shape = format!("{} A{b}", geom.describe());
        let bits = Bits::new(b).expect("valid bits");
        let k = geom.reduction();
        for coop in [false, true].into_iter().filter(|&c| on_coop || !c) {
            let direction = if coop {
                "forward coop quantized on load"
            } else {
                "forward quantized on load"
            };
            v.push(Case::new(
                "conv2d",
                direction,
                shape.clone(),
                move |gpu, rng| {
                    let Some(mode) = path_for(coop, path_or_emulation(gpu, gpu.coop())) else {
                        return Ok(Vec::new());
                    };
                    let (x, xq) = input(rng, &geom, bits);
                    // Weight levels, as the coop kernel takes them (the fp32 one takes any).
                    let w = weight_levels(rng, geom.w_shape().iter().product(), bits);
                    let bias = random(rng, &[geom.cout]);
                    let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                    let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                    let bt = gpu.upload_f32("b", &[geom.cout], &bias)?;
                    let out = gpu.empty("y", &geom.y_shape(), DType::F32)?;
                    let op = match mode {
                        Some(mode) => conv_coop::forward(
                            gpu,
                            &geom,
                            &xt,
                            &wt,
                            Some(&bt),
                            &out,
                            (bits, bits),
                            (quantized(bits), None),
                            mode,
                        )?,
                        None => conv2d::forward_with(
                            gpu,
                            &geom,
                            &xt,
                            &wt,
                            Some(&bt),
                            &out,
                            quantized(bits),
                            None,
                        )?,
                    };
                    let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&out, &xt])?;
                    let want = geom.ref_forward(&f64s(&xq), &f64s(&w), &f64s(&bias));
                    Ok(vec![
                        (
                            "y".into(),
                            reference::compare(&got[0], &want, gemm_tolerance(k[0])),
                        ),
                        // The float input is read, never written.
                        (
                            "x".into(),
                            reference::compare(&got[1], &f64s(&x), reference::Tolerance::EXACT),
                        ),
                    ])
                },
            ));
            let direction = if coop {
                "grad_weight+bias coop quantized on load"
            } else {
                "grad_weight+bias quantized on load"
            };
            v.push(Case::new(
                "conv2d",
                direction,
                shape.clone(),
                move |gpu, rng| {
                    let path = path_or_emulation(gpu, gpu.coop_grad_weight());
                    let Some(mode) = path_for(coop, path) else {
                        return Ok(Vec::new());
                    };
                    let (x, xq) = input(rng, &geom, bits);
                    let dy = random(rng, &geom.y_shape());
                    let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                    let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                    let dwt = gpu.empty("dw", &geom.w_shape(), DType::F32)?;
                    let dbt = gpu.empty("db", &[geom.cout], DType::F32)?;
                    let ops = match mode {
                        Some(mode) => conv_coop::grad_weight(
                            gpu,
                            &geom,
                            &xt,
                            &dyt,
                            (&dwt, Some(&dbt)),
                            bits,
                            (quantized(bits), None),
                            mode,
                        )?,
                        None => conv2d::grad_weight_fused(
                            gpu,
                            &geom,
                            &xt,
                            &dyt,
                            (&dwt, Some(&dbt)),
                            quantized(bits),
                            None,
                        )?,
                    };
                    let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dwt, &dbt])?;
                    let want = geom.ref_grad_weight(&f64s(&xq), &f64s(&dy));
                    let want_db = geom.ref_grad_bias(&f64s(&dy));
                    Ok(vec![
                        (
                            "dw".into(),
                            reference::compare(&got[0], &want, gemm_tolerance(k[2])),
                        ),
                        (
                            "db".into(),
                            reference::compare(
                                &got[1],
                                &want_db,
                                gemm_tolerance(dy.len() / geom.cout),
                            ),
                        ),
                    ])
                },
            ));
        }
    }
}
