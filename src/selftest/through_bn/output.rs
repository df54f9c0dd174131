//! grad-input and grad-weight applying the backward of the BatchNorm after the conv where they
//! load dy, on the fp32 kernels and on cooperative matrices.

use super::{Formed, bn_backward_sums, formed, input_bn, stopped};
use crate::selftest::coop::{path_or_emulation, weight_levels};
use crate::selftest::gemm::{GemmOp, gemm_tolerance};
use crate::selftest::{Case, f64s, random};

use crate::DType;
use crate::gpu::Tensor;
use crate::kernels::conv_coop;
use crate::kernels::conv2d::{self, ActGrad, AroundBn, Conv2dGeom, OutputBn};
use crate::kernels::norm::{Act, BnForm, TABLE, entry};
use crate::quant::Bits;
use crate::reference::{self, quant};
use crate::rng::Rng;

/// grad-input and grad-weight (with the bias gradient) applying the backward of the BatchNorm
/// after the conv where they load dy (`OUT_BN`): against the f64 GEMMs of the BatchNorm's input
/// gradient formed on the CPU from the conv output, the BatchNorm's output gradient (read
/// through its shuffle) and its table. Random values: the activation's mask and every term of the
/// formula matter.
pub(in crate::selftest) fn cases(v: &mut Vec<Case>) {
    // (geometry, the BatchNorm's activation and shuffle groups)
    let shapes = [
        (
            Conv2dGeom::square(2, 8, 6, 12, 3).padding(1).groups(2),
            Act::Relu,
            2,
        ),
        (Conv2dGeom::square(1, 6, 7, 5, 1), Act::Identity, 1),
        (
            Conv2dGeom::square(1, 4, 9, 6, 5).stride(2).padding(2),
            Act::Relu,
            3,
        ),
        (Conv2dGeom::square(2, 64, 4, 64, 1).groups(4), Act::Relu, 16),
        // wbwtab's sign after the BatchNorm.
        (
            Conv2dGeom::square(2, 8, 6, 12, 3).padding(1).groups(2),
            Act::Sign,
            2,
        ),
    ];
    for (geom, act, shuffle) in shapes {
        let shape = format!(
            "x{:?} w{:?} s{:?} p{:?} g{} {act:?} shuffle {shuffle}",
            geom.input_shape(),
            geom.weight_shape(),
            geom.stride,
            geom.padding,
            geom.groups
        );
        let k = geom.reduction();
        for direction in ["grad_input+bn backward", "grad_weight+bias+bn backward"] {
            v.push(Case::new(
                "conv2d",
                direction,
                shape.clone(),
                move |gpu, rng| {
                    let c = geom.cout;
                    let (y, bn_dy) = (random(rng, &geom.y_shape()), random(rng, &geom.y_shape()));
                    let table = random_table_after(rng, &geom);
                    let dy_conv = bn_input_gradient(&geom, &y, &bn_dy, &table, act, shuffle);
                    let yt = gpu.upload_f32("conv output", &geom.y_shape(), &y)?;
                    let bdt = gpu.upload_f32("bn output gradient", &geom.y_shape(), &bn_dy)?;
                    let tt = gpu.upload_f32("bn table", &[TABLE * c], &table)?;
                    let around = AroundBn {
                        input: None,
                        output: Some(OutputBn {
                            form: BnForm {
                                table: &tt,
                                act,
                                shuffle,
                            },
                            dy: &bdt,
                        }),
                        ..AroundBn::default()
                    };
                    if direction.starts_with("grad_input") {
                        let w = random(rng, &geom.w_shape());
                        let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                        let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
                        let op =
                            conv2d::grad_input_fused(gpu, &geom, &yt, &wt, &dxt, None, around)?;
                        let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&dxt])?;
                        let want = geom.ref_grad_input(&dy_conv, &f64s(&w));
                        return Ok(vec![(
                            "dx".into(),
                            reference::compare(&got[0], &want, gemm_tolerance(k[1])),
                        )]);
                    }
                    let x = random(rng, &geom.x_shape());
                    let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                    let dwt = gpu.empty("dw", &geom.w_shape(), DType::F32)?;
                    let dbt = gpu.empty("db", &[c], DType::F32)?;
                    let ops = conv2d::grad_weight_fused(
                        gpu,
                        &geom,
                        &xt,
                        &yt,
                        (&dwt, Some(&dbt)),
                        around,
                        None,
                    )?;
                    let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dwt, &dbt])?;
                    let want = geom.ref_grad_weight(&f64s(&x), &dy_conv);
                    let want_db = geom.ref_grad_bias(&dy_conv);
                    Ok(vec![
                        (
                            "dw".into(),
                            reference::compare(&got[0], &want, gemm_tolerance(k[2])),
                        ),
                        (
                            "db".into(),
                            reference::compare(&got[1], &want_db, gemm_tolerance(y.len() / c)),
                        ),
                    ])
                },
            ));
        }
    }
}

/// A conv between two BatchNorms, as the coop backward cases give it: the input formed from the
/// BatchNorm before (`f`, its input in `x` and table in `in_table`), the conv's output `y` and
/// the BatchNorm after's output gradient and table, and the f64 gradient of the conv's output
/// through that BatchNorm (`dy_conv`).
struct BetweenBns {
    f: Formed,
    dy_conv: Vec<f64>,
    x: Tensor,
    in_table: Tensor,
    y: Tensor,
    bn_dy: Tensor,
    out_table: Tensor,
}

impl BetweenBns {
    fn new(
        gpu: &crate::Gpu,
        rng: &mut Rng,
        geom: &Conv2dGeom,
        (act, shuffle, bits): (Act, usize, Bits),
    ) -> crate::Result<BetweenBns> {
        let f = formed(rng, geom, act, shuffle, bits);
        let (y, bn_dy) = (random(rng, &geom.y_shape()), random(rng, &geom.y_shape()));
        let table = random_table_after(rng, geom);
        let dy_conv = bn_input_gradient(geom, &y, &bn_dy, &table, act, shuffle);
        Ok(BetweenBns {
            x: gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?,
            in_table: gpu.upload_f32("bn table", &[TABLE * geom.cin], &f.table)?,
            y: gpu.upload_f32("conv output", &geom.y_shape(), &y)?,
            bn_dy: gpu.upload_f32("bn output gradient", &geom.y_shape(), &bn_dy)?,
            out_table: gpu.upload_f32("bn after table", &[TABLE * geom.cout], &table)?,
            f,
            dy_conv,
        })
    }

    /// Both BatchNorms' work on load (no backward sums).
    fn around(&self, (act, shuffle, bits): (Act, usize, Bits)) -> AroundBn<'_> {
        AroundBn {
            input: Some(input_bn(&self.in_table, act, shuffle, bits)),
            output: Some(OutputBn {
                form: BnForm {
                    table: &self.out_table,
                    act,
                    shuffle,
                },
                dy: &self.bn_dy,
            }),
            ..AroundBn::default()
        }
    }
}

/// Grad-weight on cooperative matrices (emulated where there are none) with both BatchNorms'
/// work on load: the input levels formed from the BatchNorm before (`IN_BN`, 8 bits) and dy
/// from the backward of the one after (`OUT_BN`), against the f64 GEMMs of the reference's
/// quantized input and BatchNorm input gradient. One shape: grouped 3x3, both shuffled, both
/// ReLUs.
pub(in crate::selftest) fn coop_grad_weight_case(v: &mut Vec<Case>) {
    let geom = Conv2dGeom::square(2, 8, 6, 12, 3).padding(1).groups(2);
    let form = (Act::Relu, 2, Bits::new(8).expect("8 bits"));
    let shape = format!("{} relu true shuffle 2 A8", geom.describe());
    let k = geom.reduction();
    v.push(Case::new(
        "conv2d",
        "grad_weight+bias coop through bn +bn backward",
        shape,
        move |gpu, rng| {
            let Some(mode) = path_or_emulation(gpu, gpu.coop_grad_weight()) else {
                return Ok(Vec::new());
            };
            let t = BetweenBns::new(gpu, rng, &geom, form)?;
            let c = geom.cout;
            let dwt = gpu.empty("dw", &geom.w_shape(), DType::F32)?;
            let dbt = gpu.empty("db", &[c], DType::F32)?;
            let ops = conv_coop::grad_weight(
                gpu,
                &geom,
                &t.x,
                &t.y,
                (&dwt, Some(&dbt)),
                form.2,
                (t.around(form), None),
                mode,
            )?;
            let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dwt, &dbt])?;
            let want = geom.ref_grad_weight(&f64s(&t.f.x_quant), &t.dy_conv);
            let want_db = geom.ref_grad_bias(&t.dy_conv);
            Ok(vec![
                (
                    "dw".into(),
                    reference::compare(&got[0], &want, gemm_tolerance(k[2])),
                ),
                (
                    "db".into(),
                    reference::compare(&got[1], &want_db, gemm_tolerance(t.dy_conv.len() / c)),
                ),
            ])
        },
    ));
}

/// Grad-input on cooperative matrices (emulated where there are none) with all of its
/// BatchNorm work: dy formed through the backward of the BatchNorm after (`OUT_BN`), the mask of
/// the input formed from the BatchNorm before (`IN_BN`, the quantizer's straight-through rule)
/// and that BatchNorm's backward sums per 128-column tile (`BN_SUMS`), merged by
/// `norm::backward_merge`: dx, dbeta and dgamma against the f64 reference. One shape: grouped
/// 3x3 over three column tiles, both shuffled, both ReLUs.
pub(in crate::selftest) fn coop_grad_input_case(v: &mut Vec<Case>) {
    use crate::kernels::norm::{self, BnShape};
    let geom = Conv2dGeom::square(2, 8, 12, 12, 3).padding(1).groups(2);
    let form = (Act::Relu, 2, Bits::new(8).expect("8 bits"));
    let (act, shuffle, bits) = form;
    let shape = format!("{} relu true shuffle 2 W8", geom.describe());
    let k = geom.reduction();
    v.push(Case::new(
        "conv2d",
        "grad_input+act+bn sums coop through bn +bn backward",
        shape,
        move |gpu, rng| {
            let Some(mode) = path_or_emulation(gpu, gpu.coop_grad_input()) else {
                return Ok(Vec::new());
            };
            let t = BetweenBns::new(gpu, rng, &geom, form)?;
            let ci = geom.cin;
            let w = weight_levels(rng, geom.w_shape().iter().product(), bits);
            let gamma: Vec<f32> = (0..ci)
                .map(|ch| t.f.table[entry::at(ch, entry::GAMMA)])
                .collect();
            let gt = gpu.upload_f32("gamma", &[ci], &gamma)?;
            let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
            let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
            let sums = gpu.empty("sums", &[conv2d::grad_input_bn_sums(&geom)], DType::F32)?;
            let (dgt, dbt) = (
                gpu.empty("dgamma", &[ci], DType::F32)?,
                gpu.empty("dbeta", &[ci], DType::F32)?,
            );
            let act_grad = ActGrad {
                x: &t.x,
                bits,
                requantize: false,
            };
            let around = AroundBn {
                input_sums: Some(&sums),
                ..t.around(form)
            };
            let [n, _, h, wd] = geom.input_shape();
            let tiles = (n * h * wd).div_ceil(conv_coop::TILE);
            let ops = [
                conv_coop::grad_input(
                    gpu,
                    &geom,
                    &t.y,
                    &wt,
                    &dxt,
                    bits,
                    (Some(act_grad), around),
                    mode,
                )?,
                norm::backward_merge(
                    gpu,
                    BnShape::of(&geom.x_shape())?,
                    (&sums, tiles),
                    &t.in_table,
                    &gt,
                    (&dgt, &dbt),
                )?,
            ];
            let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dxt, &dbt, &dgt])?;
            let dx = geom.ref_grad_input(&t.dy_conv, &f64s(&w));
            let masked = quant::act_backward_f64(&t.f.x_float, &dx);
            let (want_db, want_dg) =
                bn_backward_sums(&t.f, geom.input_shape(), &masked, act, shuffle);
            let tol = gemm_tolerance(k[1] * n * h * wd);
            Ok(vec![
                (
                    "dx".into(),
                    reference::compare(&got[0], &masked, gemm_tolerance(k[1])),
                ),
                ("dbeta".into(), reference::compare(&got[1], &want_db, tol)),
                ("dgamma".into(), reference::compare(&got[2], &want_dg, tol)),
            ])
        },
    ));
}

/// A random table of the BatchNorm after a conv (its statistics, affine parameters and
/// backward sums), with the scale gamma · invstd / count as the backward reduction writes it.
fn random_table_after(rng: &mut Rng, geom: &Conv2dGeom) -> Vec<f32> {
    let c = geom.cout;
    let count = (geom.y_shape().iter().product::<usize>() / c) as f32;
    let mut table = vec![0.0; TABLE * c];
    for ch in 0..c {
        let at = |e| entry::at(ch, e);
        table[at(entry::MEAN)] = rng.uniform(-0.3, 0.3);
        table[at(entry::INVSTD)] = rng.uniform(0.5, 2.0);
        table[at(entry::GAMMA)] = rng.uniform(0.5, 1.5);
        table[at(entry::BETA)] = rng.uniform(-0.5, 0.5);
        table[at(entry::DBETA)] = rng.uniform(-3.0, 3.0);
        table[at(entry::DGAMMA)] = rng.uniform(-3.0, 3.0);
        table[at(entry::SCALE)] = table[at(entry::GAMMA)] * table[at(entry::INVSTD)] / count;
    }
    table
}

/// dL/d(BatchNorm input) in f64: the output gradient read where the shuffle put each channel,
/// masked by the activation after the BatchNorm (`act`), through the train-mode formula with the
/// table's statistics and sums.
fn bn_input_gradient(
    geom: &Conv2dGeom,
    y: &[f32],
    dy: &[f32],
    table: &[f32],
    act: Act,
    shuffle: usize,
) -> Vec<f64> {
    let c = geom.cout;
    let (oh, ow) = geom.out_hw();
    let s = oh * ow;
    let count = (geom.batch * s) as f64;
    let per = c / shuffle;
    let t = |e: usize, ch: usize| table[entry::at(ch, e)] as f64;
    let mut out = vec![0.0; y.len()];
    for b in 0..geom.batch {
        for ch in 0..c {
            let at = (ch % per) * shuffle + ch / per;
            for p in 0..s {
                let v = y[(b * c + ch) * s + p] as f64;
                let (gamma, invstd) = (t(entry::GAMMA, ch), t(entry::INVSTD, ch));
                let xhat = (v - t(entry::MEAN, ch)) * invstd;
                let mut g = dy[(b * c + at) * s + p] as f64;
                if stopped(act, gamma * xhat + t(entry::BETA, ch)) {
                    g = 0.0;
                }
                out[(b * c + ch) * s + p] = gamma * invstd / count
                    * (count * g - t(entry::DBETA, ch) - xhat * t(entry::DGAMMA, ch));
            }
        }
    }
    out
}
