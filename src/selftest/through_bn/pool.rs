//! Max-pool forming its input from a BatchNorm's, forward (with its output shuffle and quantizer)
//! and backward.

use super::{bn_backward_sums, formed_nchw};
use crate::DType;
use crate::kernels::norm::{Act, BnForm, TABLE, entry};
use crate::quant::Bits;
use crate::reference::{self, quant};
use crate::selftest::{Case, f64s, random};

/// Max-pool forming its input from a BatchNorm's: its window maxima (ties included: the values
/// are coarse) and their gradients as the reference finds them on the formed input.
pub(in crate::selftest) fn cases(v: &mut Vec<Case>) {
    use crate::kernels::maxpool::{self, MaxPoolEpilogue};
    use crate::kernels::pool::PoolGeom;
    let geom = |c, hw, k, s, p| PoolGeom {
        n: 2,
        c,
        h: hw,
        w: hw,
        kernel: (k, k),
        stride: (s, s),
        padding: (p, p),
    };
    // (geometry, BatchNorm activation and shuffle, the pool's output shuffle, its quantizer's
    // bits). The third: planes of 2,500 windows, so the backward runs in two bands per plane.
    // The last: wbwtab's sign (all ties) before a float conv.
    for (g, act, bn_shuffle, out_shuffle, b) in [
        (geom(8, 6, 2, 2, 0), Act::Relu, 2, 1, 8),
        (geom(12, 7, 3, 2, 1), Act::Identity, 1, 4, 4),
        (geom(2, 100, 3, 2, 1), Act::Relu, 2, 1, 8),
        (geom(8, 7, 3, 2, 1), Act::Sign, 2, 2, 32),
    ] {
        let shape = format!(
            "{:?} k{:?} {act:?} shuffle {bn_shuffle} out shuffle {out_shuffle} a{b}",
            g.input_shape(),
            g.kernel
        );
        let bits = Bits::new(b).expect("valid bits");
        v.push(Case::new(
            "maxpool",
            "forward+backward through bn",
            shape,
            move |gpu, rng| {
                let f = formed_nchw(rng, g.input_shape(), act, bn_shuffle, bits);
                let dy = random(rng, &g.output_shape());
                let yt = gpu.upload_f32("bn input", &g.input_shape(), &f.y)?;
                let tt = gpu.upload_f32("bn table", &[TABLE * g.c], &f.table)?;
                let dyt = gpu.upload_f32("dy", &g.output_shape(), &dy)?;
                let out = gpu.empty("y", &g.output_shape(), DType::F32)?;
                let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                let dx_again = gpu.empty("dx with sums", &g.input_shape(), DType::F32)?;
                let tiles = maxpool::bn_sum_tiles(&g).expect("rows fit bands");
                let sums = gpu.empty("sums", &[2 * tiles * g.c], DType::F32)?;
                let gamma: Vec<f32> = (0..g.c)
                    .map(|ch| f.table[entry::at(ch, entry::GAMMA)])
                    .collect();
                let gt = gpu.upload_f32("gamma", &[g.c], &gamma)?;
                let (dgt, dbt) = (
                    gpu.empty("dgamma", &[g.c], DType::F32)?,
                    gpu.empty("dbeta", &[g.c], DType::F32)?,
                );
                let form = BnForm {
                    table: &tt,
                    act,
                    shuffle: bn_shuffle,
                };
                let ep = MaxPoolEpilogue {
                    shuffle: out_shuffle,
                    quantize: Some(bits),
                };
                let ops = vec![
                    maxpool::maxpool_forward_fused(gpu, &g, &yt, &out, ep, Some(form))?,
                    maxpool::maxpool_backward_shuffled(
                        gpu,
                        &g,
                        &yt,
                        &dyt,
                        &dx,
                        out_shuffle,
                        Some(form),
                    )?,
                    // Again with the BatchNorm's backward sums, added up by its merge.
                    maxpool::maxpool_backward_with_sums(
                        gpu,
                        &g,
                        (&yt, &dyt, &dx_again),
                        out_shuffle,
                        Some(form),
                        Some(&sums),
                    )?,
                    crate::kernels::norm::backward_merge(
                        gpu,
                        crate::kernels::norm::BnShape::of(&g.input_shape())?,
                        (&sums, tiles),
                        &tt,
                        &gt,
                        (&dgt, &dbt),
                    )?,
                ];
                let got: Vec<Vec<f32>> =
                    gpu.run_and_read("selftest", &ops, &[&out, &dx, &dx_again, &dbt, &dgt])?;
                let (oh, ow) = g.out_hw();
                let planes = (g.n, g.c, oh * ow);
                let (pooled, arg) = reference::pool::maxpool_forward(&g, &f64s(&f.x_float));
                let shuffled =
                    reference::pool::channel_shuffle(&pooled, planes, out_shuffle, false);
                let as_f32: Vec<f32> = shuffled.iter().map(|&v| v as f32).collect();
                let want_y = f64s(&quant::act_forward(&as_f32, bits));
                let dy_pool =
                    reference::pool::channel_shuffle(&f64s(&dy), planes, out_shuffle, true);
                let want_dx = reference::pool::maxpool_backward(&g, &dy_pool, &arg);
                let (want_db, want_dg) =
                    bn_backward_sums(&f, g.input_shape(), &want_dx, act, bn_shuffle);
                let sums_tol = reference::Tolerance::new(1e-6 * (g.n * g.h * g.w) as f64, 1e-5);
                Ok(vec![
                    (
                        "dx with sums".into(),
                        reference::compare(&got[2], &f64s(&got[1]), reference::Tolerance::EXACT),
                    ),
                    (
                        "dbeta".into(),
                        reference::compare(&got[3], &want_db, sums_tol),
                    ),
                    (
                        "dgamma".into(),
                        reference::compare(&got[4], &want_dg, sums_tol),
                    ),
                    (
                        "y".into(),
                        reference::compare(&got[0], &want_y, reference::Tolerance::EXACT),
                    ),
                    (
                        "dx".into(),
                        reference::compare(
                            &got[1],
                            &want_dx,
                            reference::Tolerance::new(1e-6, 1e-6),
                        ),
                    ),
                ])
            },
        ));
    }
}
