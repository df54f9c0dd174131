//! The kernels that form their input from a BatchNorm's where they load it (BatchNorm, ReLU,
//! channel shuffle and, in the conv GEMMs, the DoReFa input quantizer) against the f64
//! reference on the input formed on the CPU: the conv GEMMs' forward (fp32 and
//! cooperative-matrix kernels), grad-input's mask and grad-weight with the bias gradient, and
//! max-pool forward (with its output shuffle and quantizer) and backward. The BatchNorm's input and table are small
//! dyadic fractions, so that its affine map is exact in f32 whatever order a driver evaluates
//! it in; the quantizer is the reference's, bit for bit.

use super::coop::{act_levels, path_or_emulation, weight_levels};
use super::gemm::{GemmOp, gemm_tolerance};
use super::{Case, f64s, random};
use crate::DType;
use crate::gpu::Tensor;
use crate::kernels::conv_coop;
use crate::kernels::conv2d::{self, ActGrad, AroundBn, Conv2dGeom, InputBn, OutputBn};
use crate::kernels::norm::{BnForm, TABLE, entry};
use crate::quant::Bits;
use crate::reference::{self, quant};
use crate::rng::Rng;

/// A geometry with its BatchNorm's ReLU, shuffle groups and input bits: grouped 3×3 with a
/// shuffle, 1×1 without ReLU, stride 2 with a 5×5 kernel and a shuffle into one channel per
/// group, a group-packed tile, and a 3×3 over several column tiles.
fn shapes() -> Vec<(Conv2dGeom, bool, usize, u32)> {
    vec![
        (
            Conv2dGeom::square(2, 8, 6, 12, 3).padding(1).groups(2),
            true,
            2,
            4,
        ),
        (Conv2dGeom::square(1, 6, 7, 5, 1), false, 1, 8),
        (
            Conv2dGeom::square(1, 4, 9, 6, 5).stride(2).padding(2),
            true,
            4,
            2,
        ),
        (Conv2dGeom::square(2, 64, 4, 64, 1).groups(4), true, 16, 8),
        // 512 columns: grad-input's BatchNorm sums over several column tiles.
        (Conv2dGeom::square(2, 8, 16, 6, 3).padding(1), true, 2, 4),
    ]
}

/// The BatchNorm's input and table, and the layer input they form: float (for grad-input's
/// mask) and quantized.
struct Formed {
    y: Vec<f32>,
    table: Vec<f32>,
    x_float: Vec<f32>,
    x_quant: Vec<f32>,
}

fn dyadic(rng: &mut Rng, lo: i64, hi: i64, denominator: f32) -> f32 {
    (lo + rng.below((hi - lo + 1) as u64) as i64) as f32 / denominator
}

fn formed(rng: &mut Rng, geom: &Conv2dGeom, relu: bool, shuffle: usize, bits: Bits) -> Formed {
    let [n, c, h, w] = geom.input_shape();
    formed_nchw(rng, [n, c, h, w], relu, shuffle, bits)
}

fn formed_nchw(
    rng: &mut Rng,
    [n, c, h, w]: [usize; 4],
    relu: bool,
    shuffle: usize,
    bits: Bits,
) -> Formed {
    let plane = h * w;
    let y: Vec<f32> = (0..n * c * plane)
        .map(|_| dyadic(rng, -40, 40, 16.0))
        .collect();
    let mut table = vec![0.0; TABLE * c];
    for ch in 0..c {
        table[entry::at(ch, entry::MEAN)] = dyadic(rng, -8, 8, 16.0);
        table[entry::at(ch, entry::INVSTD)] = [0.5, 1.0, 2.0][rng.below(3) as usize];
        table[entry::at(ch, entry::GAMMA)] = dyadic(rng, -8, 16, 8.0);
        table[entry::at(ch, entry::BETA)] = dyadic(rng, -8, 8, 16.0);
    }
    let per = c / shuffle;
    let mut x_float = vec![0.0; y.len()];
    for b in 0..n {
        for ch in 0..c {
            // The shuffle sends BatchNorm channel sc to (sc % per) * shuffle + sc / per.
            let sc = (ch % shuffle) * per + ch / shuffle;
            for p in 0..plane {
                let v = y[(b * c + sc) * plane + p];
                let e = |e| table[entry::at(sc, e)];
                let t =
                    e(entry::GAMMA) * ((v - e(entry::MEAN)) * e(entry::INVSTD)) + e(entry::BETA);
                x_float[(b * c + ch) * plane + p] = if relu { t.max(0.0) } else { t };
            }
        }
    }
    let x_quant = quant::act_forward(&x_float, bits);
    Formed {
        y,
        table,
        x_float,
        x_quant,
    }
}

/// The conv input formed from a BatchNorm with `table`.
fn input_bn(table: &Tensor, relu: bool, shuffle: usize, bits: Bits) -> InputBn<'_> {
    InputBn {
        form: BnForm {
            table,
            relu,
            shuffle,
        },
        bits,
    }
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for (geom, relu, shuffle, b) in shapes() {
        let shape = format!(
            "x{:?} w{:?} s{:?} p{:?} g{} relu {relu} shuffle {shuffle} A{b}",
            geom.input_shape(),
            geom.weight_shape(),
            geom.stride,
            geom.padding,
            geom.groups
        );
        let bits = Bits::new(b).expect("valid bits");
        let k = geom.reduction();
        v.push(Case::new(
            "conv2d",
            "forward through bn",
            shape.clone(),
            move |gpu, rng| {
                let f = formed(rng, &geom, relu, shuffle, bits);
                let (w, bias) = (random(rng, &geom.w_shape()), random(rng, &[geom.cout]));
                let yt = gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?;
                let tt = gpu.upload_f32("bn table", &[TABLE * geom.cin], &f.table)?;
                let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                let bt = gpu.upload_f32("b", &[geom.cout], &bias)?;
                let out = gpu.empty("y", &geom.y_shape(), DType::F32)?;
                let ibn = input_bn(&tt, relu, shuffle, bits);
                let op =
                    conv2d::forward_with(gpu, &geom, &yt, &wt, Some(&bt), &out, Some(ibn), None)?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&out])?;
                let want = geom.ref_forward(&f64s(&f.x_quant), &f64s(&w), &f64s(&bias));
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, gemm_tolerance(k[0])),
                )])
            },
        ));
        v.push(Case::new(
            "conv2d",
            "forward coop through bn",
            shape.clone(),
            move |gpu, rng| {
                let Some(mode) = path_or_emulation(gpu, gpu.coop()) else {
                    return Ok(Vec::new());
                };
                let f = formed(rng, &geom, relu, shuffle, bits);
                // Weight levels, as the coop kernel takes them.
                let w = weight_levels(rng, geom.w_shape().iter().product(), bits);
                let bias = random(rng, &[geom.cout]);
                let yt = gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?;
                let tt = gpu.upload_f32("bn table", &[TABLE * geom.cin], &f.table)?;
                let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                let bt = gpu.upload_f32("b", &[geom.cout], &bias)?;
                let out = gpu.empty("y", &geom.y_shape(), DType::F32)?;
                let ibn = input_bn(&tt, relu, shuffle, bits);
                let op = conv_coop::forward(
                    gpu,
                    &geom,
                    &yt,
                    &wt,
                    Some(&bt),
                    &out,
                    (bits, bits),
                    (Some(ibn), None),
                    mode,
                )?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&out])?;
                let want = geom.ref_forward(&f64s(&f.x_quant), &f64s(&w), &f64s(&bias));
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, gemm_tolerance(k[0])),
                )])
            },
        ));
        v.push(Case::new(
            "conv2d",
            "grad_input+act through bn",
            shape.clone(),
            move |gpu, rng| {
                let f = formed(rng, &geom, relu, shuffle, bits);
                let (dy, w) = (random(rng, &geom.y_shape()), random(rng, &geom.w_shape()));
                let yt = gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?;
                let tt = gpu.upload_f32("bn table", &[TABLE * geom.cin], &f.table)?;
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
                let ibn = input_bn(&tt, relu, shuffle, bits);
                let act = ActGrad {
                    x: &yt,
                    bits,
                    requantize: false,
                };
                let around = AroundBn {
                    input: Some(ibn),
                    ..AroundBn::default()
                };
                let op = conv2d::grad_input_fused(gpu, &geom, &dyt, &wt, &dxt, Some(act), around)?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&dxt, &yt])?;
                let dx = geom.ref_grad_input(&f64s(&dy), &f64s(&w));
                // The straight-through rule of the formed float input, on the f64 sum.
                let want = quant::act_backward_f64(&f.x_float, &dx);
                Ok(vec![
                    (
                        "dx".into(),
                        reference::compare(&got[0], &want, gemm_tolerance(k[1])),
                    ),
                    // The BatchNorm's input is read, never written.
                    (
                        "bn input".into(),
                        reference::compare(&got[1], &f64s(&f.y), reference::Tolerance::EXACT),
                    ),
                ])
            },
        ));
        v.push(Case::new(
            "conv2d",
            "grad_input+act+bn sums through bn",
            shape.clone(),
            move |gpu, rng| grad_input_bn_sums(gpu, rng, &geom, relu, shuffle, bits),
        ));
        v.push(Case::new(
            "conv2d",
            "grad_weight+bias through bn",
            shape,
            move |gpu, rng| {
                let f = formed(rng, &geom, relu, shuffle, bits);
                let dy = random(rng, &geom.y_shape());
                let yt = gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?;
                let tt = gpu.upload_f32("bn table", &[TABLE * geom.cin], &f.table)?;
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let dwt = gpu.empty("dw", &geom.w_shape(), DType::F32)?;
                let dbt = gpu.empty("db", &[geom.cout], DType::F32)?;
                let ibn = input_bn(&tt, relu, shuffle, bits);
                let ops = conv2d::grad_weight_fused(
                    gpu,
                    &geom,
                    &yt,
                    &dyt,
                    (&dwt, Some(&dbt)),
                    AroundBn {
                        input: Some(ibn),
                        ..AroundBn::default()
                    },
                    None,
                )?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dwt, &dbt])?;
                let want = geom.ref_grad_weight(&f64s(&f.x_quant), &f64s(&dy));
                let want_db = geom.ref_grad_bias(&f64s(&dy));
                Ok(vec![
                    (
                        "dw".into(),
                        reference::compare(&got[0], &want, gemm_tolerance(k[2])),
                    ),
                    (
                        "db".into(),
                        reference::compare(&got[1], &want_db, gemm_tolerance(dy.len() / geom.cout)),
                    ),
                ])
            },
        ));
    }
}

/// Grad-input through a BatchNorm with that BatchNorm's backward sums in its epilogue, added up
/// by `norm::backward_merge`: dbeta and dgamma against the f64 reduction of the reference dx
/// (the BatchNorm's output gradient) through the ReLU's mask, and the table's entries.
fn grad_input_bn_sums(
    gpu: &crate::Gpu,
    rng: &mut Rng,
    geom: &Conv2dGeom,
    relu: bool,
    shuffle: usize,
    bits: Bits,
) -> crate::Result<Vec<(String, reference::Report)>> {
    use crate::kernels::norm::{self, BnShape};
    let f = formed(rng, geom, relu, shuffle, bits);
    let (dy, w) = (random(rng, &geom.y_shape()), random(rng, &geom.w_shape()));
    let c = geom.cin;
    let gamma: Vec<f32> = (0..c)
        .map(|ch| f.table[entry::at(ch, entry::GAMMA)])
        .collect();
    let yt = gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?;
    let tt = gpu.upload_f32("bn table", &[TABLE * c], &f.table)?;
    let gt = gpu.upload_f32("gamma", &[c], &gamma)?;
    let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
    let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
    let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
    let sums = gpu.empty("sums", &[conv2d::grad_input_bn_sums(geom)], DType::F32)?;
    let (dgt, dbt) = (
        gpu.empty("dgamma", &[c], DType::F32)?,
        gpu.empty("dbeta", &[c], DType::F32)?,
    );
    let act = ActGrad {
        x: &yt,
        bits,
        requantize: false,
    };
    let around = AroundBn {
        input: Some(input_bn(&tt, relu, shuffle, bits)),
        output: None,
        input_sums: Some(&sums),
    };
    let tiles = conv2d::grad_input_bn_sum_tiles(gpu, geom);
    let ops = vec![
        conv2d::grad_input_fused(gpu, geom, &dyt, &wt, &dxt, Some(act), around)?,
        norm::backward_merge(
            gpu,
            BnShape::of(&geom.x_shape())?,
            (&sums, tiles),
            &tt,
            &gt,
            (&dgt, &dbt),
        )?,
    ];
    let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dbt, &dgt, &tt])?;
    // The reference dx through the quantizer's straight-through rule (the BatchNorm's output
    // gradient, in the conv input's channels), then the BatchNorm's reduction of it.
    let dx = geom.ref_grad_input(&f64s(&dy), &f64s(&w));
    let masked = quant::act_backward_f64(&f.x_float, &dx);
    let (want_db, want_dg) = bn_backward_sums(&f, geom.input_shape(), &masked, relu, shuffle);
    let [n, _, h, wd] = geom.input_shape();
    let tol = gemm_tolerance(geom.reduction()[1] * n * h * wd);
    let table_sums: Vec<f64> = (0..c)
        .flat_map(|ch| [entry::DBETA, entry::DGAMMA].map(|e| f64::from(got[2][entry::at(ch, e)])))
        .collect();
    let written: Vec<f64> = (0..c)
        .flat_map(|ch| [got[0][ch], got[1][ch]].map(f64::from))
        .collect();
    Ok(vec![
        ("dbeta".into(), reference::compare(&got[0], &want_db, tol)),
        ("dgamma".into(), reference::compare(&got[1], &want_dg, tol)),
        (
            "table dbeta, dgamma".into(),
            reference::compare(
                &table_sums.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                &written,
                reference::Tolerance::EXACT,
            ),
        ),
    ])
}

/// Max-pool forming its input from a BatchNorm's: its window maxima (ties included: the values
/// are coarse) and their gradients as the reference finds them on the formed input.
pub(super) fn maxpool_cases(v: &mut Vec<Case>) {
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
    // (geometry, BatchNorm ReLU and shuffle, the pool's output shuffle, its quantizer's bits)
    // The last: planes of 2,500 windows, so the backward runs in two bands per plane.
    for (g, relu, bn_shuffle, out_shuffle, b) in [
        (geom(8, 6, 2, 2, 0), true, 2, 1, 8),
        (geom(12, 7, 3, 2, 1), false, 1, 4, 4),
        (geom(2, 100, 3, 2, 1), true, 2, 1, 8),
    ] {
        let shape = format!(
            "{:?} k{:?} relu {relu} shuffle {bn_shuffle} out shuffle {out_shuffle} a{b}",
            g.input_shape(),
            g.kernel
        );
        let bits = Bits::new(b).expect("valid bits");
        v.push(Case::new(
            "maxpool",
            "forward+backward through bn",
            shape,
            move |gpu, rng| {
                let f = formed_nchw(rng, g.input_shape(), relu, bn_shuffle, bits);
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
                    relu,
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
                    bn_backward_sums(&f, g.input_shape(), &want_dx, relu, bn_shuffle);
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

/// The f64 backward reduction (dbeta, dgamma) of the BatchNorm that formed `f`, given its
/// output gradient `dy` in the layer input's (shuffled) channels.
fn bn_backward_sums(
    f: &Formed,
    [n, c, h, w]: [usize; 4],
    dy: &[f64],
    relu: bool,
    shuffle: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (plane, per) = (h * w, c / shuffle);
    let (mut db, mut dg) = (vec![0.0f64; c], vec![0.0f64; c]);
    for b in 0..n {
        for ch in 0..c {
            let sc = (ch % shuffle) * per + ch / shuffle;
            let e = |e| f64::from(f.table[entry::at(sc, e)]);
            for p in 0..plane {
                let v = f64::from(f.y[(b * c + sc) * plane + p]);
                let xhat = (v - e(entry::MEAN)) * e(entry::INVSTD);
                let masked = relu && e(entry::GAMMA) * xhat + e(entry::BETA) <= 0.0;
                let d = if masked {
                    0.0
                } else {
                    dy[(b * c + ch) * plane + p]
                };
                db[sc] += d;
                dg[sc] += d * xhat;
            }
        }
    }
    (db, dg)
}

/// The conv forward that forms the statistics of the BatchNorm after it (per column tile, then
/// `norm::stats_merge`): the output as the plain forward's, the batch mean, invstd and the
/// running statistics against the f64 statistics of that output, and gamma and beta copied into
/// the table. Outputs with a large common offset (where a one-pass variance would cancel), tails
/// in every direction, group packing.
pub(super) fn stats_cases(v: &mut Vec<Case>) {
    // (geometry, also on the emulated cooperative-matrix kernel: a tail, and group packing in
    // slots of 32 and of 64 rows.)
    let shapes = [
        (Conv2dGeom::square(2, 3, 8, 4, 3).padding(1), false),
        (Conv2dGeom::square(3, 16, 5, 70, 1), true),
        (
            Conv2dGeom::square(1, 5, 9, 6, 5).stride(2).padding(2),
            false,
        ),
        (Conv2dGeom::square(2, 64, 9, 64, 1).groups(4), true),
        (
            Conv2dGeom::square(2, 12, 7, 150, 3).padding(1).groups(3),
            true,
        ),
    ];
    for (geom, on_coop) in shapes {
        let shape = format!(
            "x{:?} w{:?} s{:?} p{:?} g{}",
            geom.input_shape(),
            geom.weight_shape(),
            geom.stride,
            geom.padding,
            geom.groups
        );
        stats_case(v, geom, &shape, false);
        if on_coop {
            stats_case(v, geom, &shape, true);
        }
    }
}

/// One case of [`stats_cases`]: on the fp32 kernel, or on cooperative matrices (emulated where
/// there are none; inputs and weights are then 8-bit levels, as that kernel takes them).
fn stats_case(v: &mut Vec<Case>, geom: Conv2dGeom, shape: &str, coop: bool) {
    use crate::kernels::norm::{self, BnShape};
    let direction = if coop {
        "forward coop+bn stats"
    } else {
        "forward+bn stats"
    };
    v.push(Case::new(
        "conv2d",
        direction,
        shape.to_string(),
        move |gpu, rng| {
            let mode = match (coop, path_or_emulation(gpu, gpu.coop())) {
                (false, _) => None,
                (true, Some(m)) => Some(m),
                (true, None) => return Ok(Vec::new()),
            };
            let c = geom.cout;
            let bits = Bits::new(8).expect("8 bits");
            let (x, w) = if coop {
                (
                    act_levels(rng, geom.x_shape().iter().product(), bits),
                    weight_levels(rng, geom.w_shape().iter().product(), bits),
                )
            } else {
                (random(rng, &geom.x_shape()), random(rng, &geom.w_shape()))
            };
            let bias: Vec<f32> = random(rng, &[c]).iter().map(|b| 40.0 + b).collect();
            let (gamma, beta) = (rng.vec_uniform(c, 0.5, 1.5), rng.vec_uniform(c, -0.5, 0.5));
            let (rm0, rv0) = (rng.vec_uniform(c, -0.1, 0.1), rng.vec_uniform(c, 0.5, 1.5));
            let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
            let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
            let bt = gpu.upload_f32("b", &[c], &bias)?;
            let gt = gpu.upload_f32("gamma", &[c], &gamma)?;
            let bet = gpu.upload_f32("beta", &[c], &beta)?;
            let rm = gpu.upload_f32("rm", &[c], &rm0)?;
            let rv = gpu.upload_f32("rv", &[c], &rv0)?;
            let n = conv2d::forward_bn_partials(&geom);
            // Stale NaNs past what the GEMM writes must not be read.
            let partials = gpu.upload_f32("partials", &[n], &vec![f32::NAN; n])?;
            let stats = gpu.empty("stats", &[TABLE * c], DType::F32)?;
            let y = gpu.empty("y", &geom.y_shape(), DType::F32)?;
            let (oh, ow) = geom.out_hw();
            let sh = BnShape {
                n: geom.batch,
                c,
                s: oh * ow,
            };
            let (tile, forward) = match mode {
                Some(mode) => (
                    conv_coop::TILE,
                    conv_coop::forward(
                        gpu,
                        &geom,
                        &xt,
                        &wt,
                        Some(&bt),
                        &y,
                        (bits, bits),
                        (None, Some(&partials)),
                        mode,
                    )?,
                ),
                None => (
                    conv2d::forward_tile_columns(gpu, &geom),
                    conv2d::forward_with(
                        gpu,
                        &geom,
                        &xt,
                        &wt,
                        Some(&bt),
                        &y,
                        None,
                        Some(&partials),
                    )?,
                ),
            };
            let ops = vec![
                forward,
                norm::stats_merge(
                    gpu,
                    sh,
                    (&partials, tile),
                    1e-5,
                    0.1,
                    (&gt, &bet),
                    &stats,
                    &rm,
                    &rv,
                )?,
            ];
            let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &stats, &rm, &rv])?;
            let want_y = geom.ref_forward(&f64s(&x), &f64s(&w), &f64s(&bias));
            // The statistics of the output the GEMM wrote, in f64.
            let (_, mean, var) = reference::norm::forward_train(
                &f64s(&got[0]),
                (sh.n, c, sh.s),
                &f64s(&gamma),
                &f64s(&beta),
                1e-5,
                false,
            );
            let count = (sh.n * sh.s) as f64;
            let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
            let want_rm: Vec<f64> = (0..c)
                .map(|i| 0.9 * rm0[i] as f64 + 0.1 * mean[i])
                .collect();
            let want_rv: Vec<f64> = (0..c)
                .map(|i| 0.9 * rv0[i] as f64 + 0.1 * var[i] * count / (count - 1.0))
                .collect();
            let table = [f64s(&gamma), f64s(&beta)].concat();
            let tol = reference::Tolerance::new(2e-5, 1e-4);
            let entries =
                |e: usize| -> Vec<f32> { (0..c).map(|ch| got[1][entry::at(ch, e)]).collect() };
            let (got_mean, got_invstd) = (entries(entry::MEAN), entries(entry::INVSTD));
            let got_gamma_beta = [entries(entry::GAMMA), entries(entry::BETA)].concat();
            Ok(vec![
                (
                    "y".into(),
                    reference::compare(&got[0], &want_y, gemm_tolerance(geom.reduction()[0])),
                ),
                ("mean".into(), reference::compare(&got_mean, &mean, tol)),
                (
                    "invstd".into(),
                    reference::compare(&got_invstd, &invstd, tol),
                ),
                (
                    "gamma, beta".into(),
                    reference::compare(&got_gamma_beta, &table, reference::Tolerance::EXACT),
                ),
                (
                    "running_mean".into(),
                    reference::compare(&got[2], &want_rm, tol),
                ),
                (
                    "running_var".into(),
                    reference::compare(&got[3], &want_rv, tol),
                ),
            ])
        },
    ));
}

/// grad-input and grad-weight (with the bias gradient) applying the backward of the BatchNorm
/// after the conv where they load dy (`OUT_BN`): against the f64 GEMMs of the BatchNorm's input
/// gradient formed on the CPU from the conv output, the BatchNorm's output gradient (read
/// through its shuffle) and its table. Random values: the ReLU's mask and every term of the
/// formula matter.
pub(super) fn output_cases(v: &mut Vec<Case>) {
    // (geometry, the BatchNorm's ReLU and shuffle groups)
    let shapes = [
        (
            Conv2dGeom::square(2, 8, 6, 12, 3).padding(1).groups(2),
            true,
            2,
        ),
        (Conv2dGeom::square(1, 6, 7, 5, 1), false, 1),
        (
            Conv2dGeom::square(1, 4, 9, 6, 5).stride(2).padding(2),
            true,
            3,
        ),
        (Conv2dGeom::square(2, 64, 4, 64, 1).groups(4), true, 16),
    ];
    for (geom, relu, shuffle) in shapes {
        let shape = format!(
            "x{:?} w{:?} s{:?} p{:?} g{} relu {relu} shuffle {shuffle}",
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
                    let dy_conv = bn_input_gradient(&geom, &y, &bn_dy, &table, relu, shuffle);
                    let yt = gpu.upload_f32("conv output", &geom.y_shape(), &y)?;
                    let bdt = gpu.upload_f32("bn output gradient", &geom.y_shape(), &bn_dy)?;
                    let tt = gpu.upload_f32("bn table", &[TABLE * c], &table)?;
                    let around = AroundBn {
                        input: None,
                        output: Some(OutputBn {
                            form: BnForm {
                                table: &tt,
                                relu,
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
        (relu, shuffle, bits): (bool, usize, Bits),
    ) -> crate::Result<BetweenBns> {
        let f = formed(rng, geom, relu, shuffle, bits);
        let (y, bn_dy) = (random(rng, &geom.y_shape()), random(rng, &geom.y_shape()));
        let table = random_table_after(rng, geom);
        let dy_conv = bn_input_gradient(geom, &y, &bn_dy, &table, relu, shuffle);
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
    fn around(&self, (relu, shuffle, bits): (bool, usize, Bits)) -> AroundBn<'_> {
        AroundBn {
            input: Some(input_bn(&self.in_table, relu, shuffle, bits)),
            output: Some(OutputBn {
                form: BnForm {
                    table: &self.out_table,
                    relu,
                    shuffle,
                },
                dy: &self.bn_dy,
            }),
            input_sums: None,
        }
    }
}

/// Grad-weight on cooperative matrices (emulated where there are none) with both BatchNorms'
/// work on load: the input levels formed from the BatchNorm before (`IN_BN`, 8 bits) and dy
/// from the backward of the one after (`OUT_BN`), against the f64 GEMMs of the reference's
/// quantized input and BatchNorm input gradient. One shape: grouped 3x3, both shuffled, both
/// ReLUs.
pub(super) fn coop_grad_weight_case(v: &mut Vec<Case>) {
    let geom = Conv2dGeom::square(2, 8, 6, 12, 3).padding(1).groups(2);
    let form = (true, 2, Bits::new(8).expect("8 bits"));
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
pub(super) fn coop_grad_input_case(v: &mut Vec<Case>) {
    use crate::kernels::norm::{self, BnShape};
    let geom = Conv2dGeom::square(2, 8, 12, 12, 3).padding(1).groups(2);
    let form = (true, 2, Bits::new(8).expect("8 bits"));
    let (relu, shuffle, bits) = form;
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
            let act = ActGrad {
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
                    (Some(act), around),
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
                bn_backward_sums(&t.f, geom.input_shape(), &masked, relu, shuffle);
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
/// masked where the BatchNorm's output is not positive (with `relu`), through the train-mode
/// formula with the table's statistics and sums.
fn bn_input_gradient(
    geom: &Conv2dGeom,
    y: &[f32],
    dy: &[f32],
    table: &[f32],
    relu: bool,
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
                if relu && gamma * xhat + t(entry::BETA, ch) <= 0.0 {
                    g = 0.0;
                }
                out[(b * c + ch) * s + p] = gamma * invstd / count
                    * (count * g - t(entry::DBETA, ch) - xhat * t(entry::DGAMMA, ch));
            }
        }
    }
    out
}
