//! Grad-input adding another reader's gradient of the layer input as it writes dx (the shaders'
//! `DX_PLUS`: a residual block's input is read by its first conv and by its shortcut), after
//! the input quantizer's mask where there is one, on the fp32 kernel and on cooperative
//! matrices (or their emulation), against the f64 reference of dx plus that gradient.

use super::coop::{path_or_emulation, weight_levels};
use super::gemm::{GemmOp, gemm_tolerance};
use super::quant_on_load::path_for;
use super::{Case, f64s, random};
use crate::DType;
use crate::kernels::conv_coop;
use crate::kernels::conv2d::{self, ActGrad, AroundBn, Conv2dGeom};
use crate::quant::Bits;
use crate::reference::{self, quant};

/// A geometry, the input quantizer's bits (its mask in the epilogue; `None`: a float conv) and
/// whether the cooperative-matrix kernel runs it too: grouped 3×3 padded, a pointwise conv on
/// images of a multiple of 4 pixels (the vector stores), and stride 2 with a 3×3 kernel (a
/// downsampling block's first conv). (Coop: the first, whose epilogue is the one every
/// coop grad-input writes through; on lavapipe each emulated specialisation takes seconds to
/// compile.)
fn shapes() -> Vec<(Conv2dGeom, Option<u32>, bool)> {
    vec![
        (
            Conv2dGeom::square(2, 8, 6, 12, 3).padding(1).groups(2),
            Some(4),
            true,
        ),
        (Conv2dGeom::square(2, 6, 8, 5, 1), Some(8), false),
        (
            Conv2dGeom::square(2, 4, 9, 6, 3).stride(2).padding(1),
            None,
            false,
        ),
    ]
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for (geom, b, on_coop) in shapes() {
        let shape = match b {
            Some(b) => format!("{} A{b}", geom.describe()),
            None => format!("{} float", geom.describe()),
        };
        let k = geom.reduction()[1];
        for coop in [false, true].into_iter().filter(|&c| on_coop || !c) {
            let direction = if coop {
                "grad_input+dx coop"
            } else {
                "grad_input+dx"
            };
            v.push(Case::new(
                "conv2d",
                direction,
                shape.clone(),
                move |gpu, rng| {
                    let path = path_or_emulation(gpu, gpu.coop_grad_input());
                    let Some(mode) = path_for(coop, path) else {
                        return Ok(Vec::new());
                    };
                    let bits = b.map(|b| Bits::new(b).expect("valid bits"));
                    // Weight levels, as the coop kernel takes them (the fp32 one takes any).
                    let w = weight_levels(
                        rng,
                        geom.w_shape().iter().product(),
                        bits.unwrap_or(Bits::new(8).expect("valid bits")),
                    );
                    let dy = random(rng, &geom.y_shape());
                    // The input spans the quantizer's clamp on both sides (its mask zeroes some).
                    let x: Vec<f32> = (0..geom.x_shape().iter().product())
                        .map(|_| rng.uniform(-0.5, 1.5))
                        .collect();
                    let plus = random(rng, &geom.x_shape());
                    let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                    let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                    let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                    let pt = gpu.upload_f32("other gradient", &geom.x_shape(), &plus)?;
                    let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
                    let act = bits.map(|bits| ActGrad {
                        x: &xt,
                        bits,
                        requantize: false,
                    });
                    let around = AroundBn {
                        dx_plus: Some(&pt),
                        ..AroundBn::default()
                    };
                    let op = match mode {
                        Some(mode) => conv_coop::grad_input(
                            gpu,
                            &geom,
                            &dyt,
                            &wt,
                            &dxt,
                            bits.expect("coop cases are quantized"),
                            (act, around),
                            mode,
                        )?,
                        None => conv2d::grad_input_fused(gpu, &geom, &dyt, &wt, &dxt, act, around)?,
                    };
                    let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&dxt, &pt])?;
                    let mut dx = geom.ref_grad_input(&f64s(&dy), &f64s(&w));
                    if bits.is_some() {
                        dx = quant::act_backward_f64(&x, &dx);
                    }
                    let want: Vec<f64> = dx
                        .iter()
                        .zip(&plus)
                        .map(|(d, &p)| d + f64::from(p))
                        .collect();
                    Ok(vec![
                        (
                            "dx".into(),
                            reference::compare(&got[0], &want, gemm_tolerance(k)),
                        ),
                        // The other gradient is read, never written.
                        (
                            "other gradient".into(),
                            reference::compare(&got[1], &f64s(&plus), reference::Tolerance::EXACT),
                        ),
                    ])
                },
            ));
        }
    }
}
