//! The start-up check of the cooperative-matrix kernels against the fp32 ones.

use super::{forward, grad_input, grad_weight};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::kernels::conv2d::{self, AroundBn, Conv2dGeom};
use crate::quant::Bits;

/// Checks the device's cooperative-matrix path (`gpu.coop()`) against the fp32 kernels, on a
/// quantized conv with tails in every dimension: the forward, and where the device runs them
/// there (`gpu.coop_grad_weight()`, `gpu.coop_grad_input()`) grad-weight with the bias gradient
/// and grad-input from a dy of small gradients; then the forward of a grouped conv whose groups
/// the kernel packs into one tile. The results must agree to rounding. (Every form of the
/// cooperative-matrix kernels used compiles here, so that a driver that fails one fails on the
/// throwaway device this runs on.)
pub fn verify(gpu: &Gpu) -> Result<()> {
    let mode = gpu
        .coop()
        .ok_or_else(|| Error::Invalid("no cooperative-matrix path to verify".into()))?;
    let bits = Bits::new(8).expect("8 bits");
    let geom = Conv2dGeom::square(2, 40, 7, 136, 3).padding(1);
    let t = Operands::upload(gpu, &geom, bits)?;
    // Four groups of 16 rows: the packed tile, slots of 32 rows.
    let packed_geom = Conv2dGeom::square(2, 32, 7, 64, 3).padding(1).groups(4);
    let packed = Operands::upload(gpu, &packed_geom, bits)?;
    let out = |what: &str, shape: &[usize]| gpu.empty(what, shape, DType::F32);
    let y = [
        out("coop check y", &geom.output_shape())?,
        out("coop check y fp32", &geom.output_shape())?,
    ];
    let dw = [
        out("coop check dw", &geom.weight_shape())?,
        out("coop check dw fp32", &geom.weight_shape())?,
    ];
    let db = [
        out("coop check db", &[geom.cout])?,
        out("coop check db fp32", &[geom.cout])?,
    ];
    let dx = [
        out("coop check dx", &geom.input_shape())?,
        out("coop check dx fp32", &geom.input_shape())?,
    ];
    let packed_y = [
        out("coop check packed y", &packed_geom.output_shape())?,
        out("coop check packed y fp32", &packed_geom.output_shape())?,
    ];
    let mut ops = Vec::new();
    for (geom, t, y) in [(&geom, &t, &y), (&packed_geom, &packed, &packed_y)] {
        ops.push(forward(
            gpu,
            geom,
            &t.x,
            &t.w,
            Some(&t.b),
            &y[0],
            (bits, bits),
            (Default::default(), None),
            mode,
        )?);
        ops.push(conv2d::forward(gpu, geom, &t.x, &t.w, Some(&t.b), &y[1])?);
    }
    // Grad-weight where the device runs it on cooperative matrices (else the fp32 kernel on
    // both sides, which compares equal).
    ops.extend(match gpu.coop_grad_weight() {
        Some(mode) => grad_weight(
            gpu,
            &geom,
            &t.x,
            &t.dy,
            (&dw[0], Some(&db[0])),
            bits,
            (AroundBn::default(), None),
            mode,
        )?,
        None => conv2d::grad_weight_and_bias(gpu, &geom, &t.x, &t.dy, &dw[0], &db[0], None, None)?,
    });
    ops.extend(conv2d::grad_weight_and_bias(
        gpu, &geom, &t.x, &t.dy, &dw[1], &db[1], None, None,
    )?);
    // Grad-input likewise.
    ops.push(match gpu.coop_grad_input() {
        Some(mode) => grad_input(
            gpu,
            &geom,
            &t.dy,
            &t.w,
            &dx[0],
            bits,
            (None, AroundBn::default()),
            mode,
        )?,
        None => conv2d::grad_input(gpu, &geom, &t.dy, &t.w, &dx[0])?,
    });
    ops.push(conv2d::grad_input(gpu, &geom, &t.dy, &t.w, &dx[1])?);
    let got: Vec<Vec<f32>> = gpu.run_and_read(
        "cooperative-matrix check",
        &ops,
        &[
            &y[0],
            &y[1],
            &dw[0],
            &dw[1],
            &db[0],
            &db[1],
            &dx[0],
            &dx[1],
            &packed_y[0],
            &packed_y[1],
        ],
    )?;
    let checks = [
        "the conv",
        "grad-weight",
        "the bias gradient",
        "grad-input",
        "the grouped conv",
    ];
    for (what, pair) in checks.iter().zip(got.chunks(2)) {
        let scale = pair[1].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = pair[0]
            .iter()
            .zip(&pair[1])
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        if scale == 0.0 || pair[0].iter().any(|v| !v.is_finite()) || worst > 1e-5 * scale {
            return Err(Error::Invalid(format!(
                "{what} on cooperative matrices differs from the fp32 kernel by {worst:e} (largest value {scale:e})"
            )));
        }
    }
    Ok(())
}

/// A check's operands on the device: input and weight levels, a bias, and a dy of gradients
/// around 1e-6 (below f16's normal range).
struct Operands {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    dy: Tensor,
}

impl Operands {
    fn upload(gpu: &Gpu, geom: &Conv2dGeom, bits: Bits) -> Result<Operands> {
        let n = bits.levels();
        // Levels as the quantizers form them: activations k fl32(1/n), weights 2 k fl32(1/n) - 1.
        let level = |i: usize, m: u32| ((i * 2654435761) % (m as usize + 1)) as f32;
        let x: Vec<f32> = (0..geom.input_shape().iter().product())
            .map(|i| level(i, n) * bits.inv_levels())
            .collect();
        let w: Vec<f32> = (0..geom.weight_shape().iter().product())
            .map(|i| 2.0 * (level(i + 7, n) * bits.inv_levels()) - 1.0)
            .collect();
        let b: Vec<f32> = (0..geom.cout).map(|i| i as f32 * 0.01 - 0.5).collect();
        let dy: Vec<f32> = (0..geom.output_shape().iter().product())
            .map(|i| (level(i + 3, 1000) - 500.0) * 2e-9)
            .collect();
        Ok(Operands {
            x: gpu.upload_f32("coop check x", &geom.input_shape(), &x)?,
            w: gpu.upload_f32("coop check w", &geom.weight_shape(), &w)?,
            b: gpu.upload_f32("coop check bias", &[geom.cout], &b)?,
            dy: gpu.upload_f32("coop check dy", &geom.output_shape(), &dy)?,
        })
    }
}
