//! The kernels that form their input from a BatchNorm's where they load it (BatchNorm, its
//! activation (a ReLU, or wbwtab's sign), channel shuffle and, in the conv GEMMs, the DoReFa input
//! quantizer) against the f64 reference on the input formed on the CPU. Here: the conv GEMMs'
//! forward (fp32 and cooperative-matrix kernels), grad-input's mask and grad-weight with the bias
//! gradient; in `pool` max-pool forward (with its output shuffle and quantizer) and backward; in
//! `stats` the forward that forms the next BatchNorm's statistics; in `output` the backward GEMMs
//! that apply the next BatchNorm's backward where they load dy. The BatchNorm's input and table are
//! small dyadic fractions, so that its affine map is exact in f32 whatever order a driver evaluates
//! it in; the quantizer is the reference's, bit for bit.

use super::coop::{path_or_emulation, weight_levels};
use super::gemm::{GemmOp, gemm_tolerance};
use super::{Case, f64s, random};
use crate::DType;
use crate::gpu::Tensor;
use crate::kernels::conv_coop;
use crate::kernels::conv2d::{self, ActGrad, AroundBn, Conv2dGeom, InputBn};
use crate::kernels::norm::{Act, BnForm, TABLE, entry};
use crate::quant::Bits;
use crate::reference::{self, quant};
use crate::rng::Rng;

pub(super) mod add;
pub(super) mod output;
pub(super) mod pool;
pub(super) mod stats;

/// A geometry with its BatchNorm's activation, shuffle groups and input bits: grouped 3×3 with
/// a shuffle, 1×1 without activation, stride 2 with a 5×5 kernel and a shuffle into one channel
/// per group, a group-packed tile, and a 3×3 over several column tiles; then float inputs (no
/// quantizer, grad-input's sums without a mask of its own): wbwtab's sign over several column
/// tiles, and a ReLU (a float model's).
fn shapes() -> Vec<(Conv2dGeom, Act, usize, u32)> {
    vec![
        (
            Conv2dGeom::square(2, 8, 6, 12, 3).padding(1).groups(2),
            Act::Relu,
            2,
            4,
        ),
        (Conv2dGeom::square(1, 6, 7, 5, 1), Act::Identity, 1, 8),
        (
            Conv2dGeom::square(1, 4, 9, 6, 5).stride(2).padding(2),
            Act::Relu,
            4,
            2,
        ),
        (
            Conv2dGeom::square(2, 64, 4, 64, 1).groups(4),
            Act::Relu,
            16,
            8,
        ),
        // 512 columns: grad-input's BatchNorm sums over several column tiles.
        (
            Conv2dGeom::square(2, 8, 16, 6, 3).padding(1),
            Act::Relu,
            2,
            4,
        ),
        (
            Conv2dGeom::square(2, 8, 16, 6, 3).padding(1),
            Act::Sign,
            2,
            32,
        ),
        (
            Conv2dGeom::square(1, 6, 7, 6, 1).groups(2),
            Act::Relu,
            1,
            32,
        ),
    ]
}

/// The activation fused after the BatchNorm, on the CPU: the ReLU, or wbwtab's sign (0 → +1).
fn activated(act: Act, t: f32) -> f32 {
    match act {
        Act::Identity => t,
        Act::Relu => t.max(0.0),
        Act::Sign => crate::quant::wbwtab::sign_pos(t),
    }
}

/// Whether the activation's mask stops the gradient at the BatchNorm's value `u`: the ReLU's
/// where u ≤ 0, the sign's where |u| ≥ 1 (micronet's rule excludes both ends).
fn stopped(act: Act, u: f64) -> bool {
    match act {
        Act::Identity => false,
        Act::Relu => u <= 0.0,
        Act::Sign => !(u > -1.0 && u < 1.0),
    }
}

/// The input quantizer's straight-through rule on the f64 gradient `dx` at the float input
/// `x` (a float input: none).
fn input_mask(x: &[f32], dx: &[f64], bits: Bits) -> Vec<f64> {
    if bits.is_float() {
        dx.to_vec()
    } else {
        quant::act_backward_f64(x, dx)
    }
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

fn formed(rng: &mut Rng, geom: &Conv2dGeom, act: Act, shuffle: usize, bits: Bits) -> Formed {
    let [n, c, h, w] = geom.input_shape();
    formed_nchw(rng, [n, c, h, w], act, shuffle, bits)
}

fn formed_nchw(
    rng: &mut Rng,
    [n, c, h, w]: [usize; 4],
    act: Act,
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
                x_float[(b * c + ch) * plane + p] = activated(act, t);
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
fn input_bn(table: &Tensor, act: Act, shuffle: usize, bits: Bits) -> InputBn<'_> {
    InputBn {
        form: BnForm {
            table,
            act,
            shuffle,
        },
        bits,
    }
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for (geom, act, shuffle, b) in shapes() {
        let shape = format!(
            "x{:?} w{:?} s{:?} p{:?} g{} {act:?} shuffle {shuffle} A{b}",
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
                let f = formed(rng, &geom, act, shuffle, bits);
                let (w, bias) = (random(rng, &geom.w_shape()), random(rng, &[geom.cout]));
                let yt = gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?;
                let tt = gpu.upload_f32("bn table", &[TABLE * geom.cin], &f.table)?;
                let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                let bt = gpu.upload_f32("b", &[geom.cout], &bias)?;
                let out = gpu.empty("y", &geom.y_shape(), DType::F32)?;
                let ibn = input_bn(&tt, act, shuffle, bits);
                let input = AroundBn {
                    input: Some(ibn),
                    ..AroundBn::default()
                };
                let op = conv2d::forward_with(gpu, &geom, &yt, &wt, Some(&bt), &out, input, None)?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&out])?;
                let want = geom.ref_forward(&f64s(&f.x_quant), &f64s(&w), &f64s(&bias));
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, gemm_tolerance(k[0])),
                )])
            },
        ));
        // (Float inputs are not cooperative-matrix operands.)
        if !bits.is_float() {
            v.push(Case::new(
                "conv2d",
                "forward coop through bn",
                shape.clone(),
                move |gpu, rng| {
                    let Some(mode) = path_or_emulation(gpu, gpu.coop()) else {
                        return Ok(Vec::new());
                    };
                    let f = formed(rng, &geom, act, shuffle, bits);
                    // Weight levels, as the coop kernel takes them.
                    let w = weight_levels(rng, geom.w_shape().iter().product(), bits);
                    let bias = random(rng, &[geom.cout]);
                    let yt = gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?;
                    let tt = gpu.upload_f32("bn table", &[TABLE * geom.cin], &f.table)?;
                    let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                    let bt = gpu.upload_f32("b", &[geom.cout], &bias)?;
                    let out = gpu.empty("y", &geom.y_shape(), DType::F32)?;
                    let ibn = input_bn(&tt, act, shuffle, bits);
                    let op = conv_coop::forward(
                        gpu,
                        &geom,
                        &yt,
                        &wt,
                        Some(&bt),
                        &out,
                        (bits, bits),
                        (
                            AroundBn {
                                input: Some(ibn),
                                ..AroundBn::default()
                            },
                            None,
                        ),
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
        }
        v.push(Case::new(
            "conv2d",
            "grad_input+act through bn",
            shape.clone(),
            move |gpu, rng| {
                let f = formed(rng, &geom, act, shuffle, bits);
                let (dy, w) = (random(rng, &geom.y_shape()), random(rng, &geom.w_shape()));
                let yt = gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?;
                let tt = gpu.upload_f32("bn table", &[TABLE * geom.cin], &f.table)?;
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
                let ibn = input_bn(&tt, act, shuffle, bits);
                let act_grad = ActGrad {
                    x: &yt,
                    bits,
                    requantize: false,
                };
                let around = AroundBn {
                    input: Some(ibn),
                    ..AroundBn::default()
                };
                let op =
                    conv2d::grad_input_fused(gpu, &geom, &dyt, &wt, &dxt, Some(act_grad), around)?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&dxt, &yt])?;
                let dx = geom.ref_grad_input(&f64s(&dy), &f64s(&w));
                // The straight-through rule of the formed float input, on the f64 sum.
                let want = input_mask(&f.x_float, &dx, bits);
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
            move |gpu, rng| grad_input_bn_sums(gpu, rng, &geom, act, shuffle, bits),
        ));
        v.push(Case::new(
            "conv2d",
            "grad_weight+bias through bn",
            shape,
            move |gpu, rng| {
                let f = formed(rng, &geom, act, shuffle, bits);
                let dy = random(rng, &geom.y_shape());
                let yt = gpu.upload_f32("bn input", &geom.x_shape(), &f.y)?;
                let tt = gpu.upload_f32("bn table", &[TABLE * geom.cin], &f.table)?;
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let dwt = gpu.empty("dw", &geom.w_shape(), DType::F32)?;
                let dbt = gpu.empty("db", &[geom.cout], DType::F32)?;
                let ibn = input_bn(&tt, act, shuffle, bits);
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
/// (the BatchNorm's output gradient) through the activation's mask, and the table's entries.
fn grad_input_bn_sums(
    gpu: &crate::Gpu,
    rng: &mut Rng,
    geom: &Conv2dGeom,
    act: Act,
    shuffle: usize,
    bits: Bits,
) -> crate::Result<Vec<(String, reference::Report)>> {
    use crate::kernels::norm::{self, BnShape};
    let f = formed(rng, geom, act, shuffle, bits);
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
    let act_grad = ActGrad {
        x: &yt,
        bits,
        requantize: false,
    };
    let around = AroundBn {
        input: Some(input_bn(&tt, act, shuffle, bits)),
        input_sums: Some(&sums),
        ..AroundBn::default()
    };
    let tiles = conv2d::grad_input_bn_sum_tiles(gpu, geom);
    let ops = vec![
        conv2d::grad_input_fused(gpu, geom, &dyt, &wt, &dxt, Some(act_grad), around)?,
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
    let masked = input_mask(&f.x_float, &dx, bits);
    let (want_db, want_dg) = bn_backward_sums(&f, geom.input_shape(), &masked, act, shuffle);
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

/// The f64 backward reduction (dbeta, dgamma) of the BatchNorm that formed `f`, given its
/// output gradient `dy` in the layer input's (shuffled) channels.
fn bn_backward_sums(
    f: &Formed,
    [n, c, h, w]: [usize; 4],
    dy: &[f64],
    act: Act,
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
                let d = if stopped(act, e(entry::GAMMA) * xhat + e(entry::BETA)) {
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
