//! BatchNorm as separate passes: train and eval forward (with its fused ReLU, shuffle and
//! activation quantizer) and backward.

use super::{Case, bits, f64s};
use crate::DType;
use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::kernels;
use crate::kernels::norm::{Act, Epilogue};
use crate::reference::{self, Tolerance};
use crate::rng::Rng;

/// A BatchNorm's input, parameters and running statistics drawn from the case's generator (in
/// that order), uploaded, with its table and output allocated.
struct Inputs {
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm0: Vec<f32>,
    rv0: Vec<f32>,
    xt: Tensor,
    gt: Tensor,
    bt: Tensor,
    rm: Tensor,
    rv: Tensor,
    stats: Tensor,
    y: Tensor,
}

impl Inputs {
    /// Running means in ±`rm_range`.
    fn draw(
        gpu: &Gpu,
        rng: &mut Rng,
        (n, c, s): (usize, usize, usize),
        rm_range: f32,
    ) -> Result<Inputs> {
        let x = rng.vec_uniform(n * c * s, -2.0, 3.0);
        let (gamma, beta) = (rng.vec_uniform(c, 0.5, 1.5), rng.vec_uniform(c, -0.5, 0.5));
        let rm0 = rng.vec_uniform(c, -rm_range, rm_range);
        let rv0 = rng.vec_uniform(c, 0.5, 1.5);
        Ok(Inputs {
            xt: gpu.upload_f32("x", &[n, c, s], &x)?,
            gt: gpu.upload_f32("gamma", &[c], &gamma)?,
            bt: gpu.upload_f32("beta", &[c], &beta)?,
            rm: gpu.upload_f32("rm", &[c], &rm0)?,
            rv: gpu.upload_f32("rv", &[c], &rv0)?,
            stats: gpu.empty("stats", &[kernels::norm::TABLE * c], DType::F32)?,
            y: gpu.empty("y", &[n, c, s], DType::F32)?,
            x,
            gamma,
            beta,
            rm0,
            rv0,
        })
    }
}

pub(super) fn cases(v: &mut Vec<Case>) {
    // BatchNorm: train forward (with running stats), eval forward, backward; with and without
    // the fused ReLU and channel shuffle; a single-element channel batch too. The reference
    // shuffles its output (and unshuffles the output gradient) separately.
    // With `quantize` bits (0: none), forward eval also checks the fused activation quantizer
    // bit for bit against act_forward of the unquantized output.
    for (n, c, s, relu, shuffle, quantize) in [
        (4usize, 3usize, 25usize, true, 1usize, 0u32),
        (2, 70, 64, false, 1, 0),
        (50, 4, 1, true, 1, 0),
        (3, 5, 300, true, 1, 4),
        (4, 6, 25, true, 2, 8),
        (2, 12, 9, false, 3, 2),
        // Planes of a multiple of 4: the backward applies take four elements per invocation.
        (3, 8, 16, true, 2, 0),
        // Three blocks of IAO extremes (bn_apply_extremes), the last a tail, with a shuffle.
        (2, 8, 600, true, 4, 0),
        // Three tiles of an IAO mask pass's backward sums per channel (4,096 elements each,
        // the last a tail, planes across tiles).
        (3, 2, 3000, true, 2, 0),
    ] {
        let ep = Epilogue {
            act: Act::relu_if(relu),
            shuffle,
            quantize: None,
        };
        let shape = format!(
            "[{n},{c},{s}]{}{}{}",
            if relu { " +relu" } else { "" },
            if shuffle > 1 {
                format!(" +shuffle {shuffle}")
            } else {
                String::new()
            },
            if quantize > 0 {
                format!(" +a{quantize}")
            } else {
                String::new()
            }
        );
        let shuffled = move |v: Vec<f64>, inverse: bool| {
            if shuffle > 1 {
                reference::pool::channel_shuffle(&v, (n, c, s), shuffle, inverse)
            } else {
                v
            }
        };
        v.push(Case::new(
            "batchnorm",
            "forward train",
            shape.clone(),
            move |gpu, rng| {
                let t = Inputs::draw(gpu, rng, (n, c, s), 0.1)?;
                let mut ops = vec![
                    kernels::norm::stats_train(
                        gpu,
                        &t.xt,
                        1e-5,
                        0.1,
                        (&t.gt, &t.bt),
                        &t.stats,
                        &t.rm,
                        &t.rv,
                    )?,
                    kernels::norm::apply(gpu, ep, &t.xt, &t.stats, &t.gt, &t.bt, &t.y)?,
                ];
                // The same output, with the extremes of each block an IAO quantizer observes.
                let chunk = kernels::iao::CHUNK;
                let blocks = (n * c * s).div_ceil(chunk);
                let y_ext = gpu.empty("y", &[n, c, s], DType::F32)?;
                let extremes = gpu.empty("extremes", &[2 * blocks], DType::F32)?;
                ops.push(kernels::norm::apply_extremes(
                    gpu,
                    ep,
                    &t.xt,
                    &t.stats,
                    (&t.gt, &t.bt),
                    &y_ext,
                    &extremes,
                )?);
                let got: Vec<Vec<f32>> =
                    gpu.run_and_read("selftest", &ops, &[&t.y, &t.rm, &t.rv, &y_ext, &extremes])?;
                let block_extremes: Vec<f64> = got[0]
                    .chunks(chunk)
                    .flat_map(|b| {
                        let lo = b.iter().copied().fold(f32::INFINITY, f32::min);
                        let hi = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        [f64::from(lo), f64::from(hi)]
                    })
                    .collect();
                let (want, mean, var) = reference::norm::forward_train(
                    &f64s(&t.x),
                    (n, c, s),
                    &f64s(&t.gamma),
                    &f64s(&t.beta),
                    1e-5,
                    relu,
                );
                let want = shuffled(want, false);
                let (wrm, wrv) = reference::norm::running_update(
                    &f64s(&t.rm0),
                    &f64s(&t.rv0),
                    &mean,
                    &var,
                    n * s,
                    0.1,
                );
                let tol = Tolerance::new(2e-5, 1e-4);
                Ok(vec![
                    ("y".into(), reference::compare(&got[0], &want, tol)),
                    (
                        "running_mean".into(),
                        reference::compare(&got[1], &wrm, tol),
                    ),
                    ("running_var".into(), reference::compare(&got[2], &wrv, tol)),
                    (
                        "y with extremes".into(),
                        reference::compare(&got[3], &f64s(&got[0]), Tolerance::EXACT),
                    ),
                    (
                        "extremes".into(),
                        reference::compare(&got[4], &block_extremes, Tolerance::EXACT),
                    ),
                ])
            },
        ));
        // The backward pass of a conv reading this output under an IAO quantizer: the output
        // formed again, the conv's input gradient masked and the output quantized in one pass,
        // against bn_apply and iao_backward_requantize, bit for bit. The quantizer observed a
        // narrower tensor, so some outputs lie past its range (the mask shows).
        v.push(Case::new(
            "batchnorm",
            "iao backward",
            shape.clone(),
            move |gpu, rng| {
                use crate::kernels::iao::IaoQuantizer;
                use crate::quant::iao::{QType, Spec};
                let t = Inputs::draw(gpu, rng, (n, c, s), 0.1)?;
                let dy = rng.vec_uniform(n * c * s, -1.0, 1.0);
                let q_type = if c % 2 == 0 {
                    QType::Symmetric
                } else {
                    QType::Asymmetric
                };
                let spec = Spec::activation(bits(if c % 2 == 0 { 8 } else { 4 }), q_type);
                let q = IaoQuantizer::new(gpu, "selftest", spec, &[n, c, s])?;
                let state = gpu.upload_f32("state", &[q.state_len()], &q.initial_state())?;
                let (d_two, d_one) = (
                    gpu.upload_f32("dy", &[n, c, s], &dy)?,
                    gpu.upload_f32("dy", &[n, c, s], &dy)?,
                );
                let y_one = gpu.empty("y", &[n, c, s], DType::F32)?;
                let mut ops = vec![kernels::norm::stats_train(
                    gpu,
                    &t.xt,
                    1e-5,
                    0.1,
                    (&t.gt, &t.bt),
                    &t.stats,
                    &t.rm,
                    &t.rv,
                )?];
                let narrow: Vec<f32> = t.x.iter().map(|v| v * 0.3).collect();
                let observed = gpu.upload_f32("observed", &[n, c, s], &narrow)?;
                ops.extend(q.observe(gpu, &state, &observed)?);
                ops.push(kernels::norm::apply(
                    gpu, ep, &t.xt, &t.stats, &t.gt, &t.bt, &t.y,
                )?);
                ops.push(q.backward_requantize(gpu, &state, &t.y, &d_two)?);
                ops.push(kernels::norm::apply_iao(
                    gpu,
                    ep,
                    (&t.xt, &t.stats),
                    (&t.gt, &t.bt),
                    (&q, &state),
                    Some((&d_one, None)),
                    Some(&y_one),
                )?);
                // The two halves alone: the quantized output, and the mask.
                let (d_mask, y_quant) = (
                    gpu.upload_f32("dy", &[n, c, s], &dy)?,
                    gpu.empty("y", &[n, c, s], DType::F32)?,
                );
                for (d, y) in [(Some((&d_mask, None)), None), (None, Some(&y_quant))] {
                    ops.push(kernels::norm::apply_iao(
                        gpu,
                        ep,
                        (&t.xt, &t.stats),
                        (&t.gt, &t.bt),
                        (&q, &state),
                        d,
                        y,
                    )?);
                }
                // Both masking forms again, each also forming the BatchNorm's backward sums,
                // added up by its merge: against the reduction pass over the masked gradient.
                let sh = kernels::norm::BnShape { n, c, s };
                let tiles = kernels::norm::iao_sum_tiles(sh);
                let per_channel = || gpu.empty("per channel", &[c], DType::F32);
                let (dg_ref, db_ref) = (per_channel()?, per_channel()?);
                ops.extend(kernels::norm::backward(
                    gpu, ep, &t.xt, &d_two, &t.stats, &t.gt, &t.bt, &dg_ref, &db_ref, None,
                )?);
                let mut summed = Vec::new();
                for with_y in [true, false] {
                    let d = gpu.upload_f32("dy", &[n, c, s], &dy)?;
                    let y = gpu.empty("y", &[n, c, s], DType::F32)?;
                    let sums = gpu.empty("sums", &[2 * tiles * c], DType::F32)?;
                    let (dg, db) = (per_channel()?, per_channel()?);
                    ops.push(kernels::norm::apply_iao(
                        gpu,
                        ep,
                        (&t.xt, &t.stats),
                        (&t.gt, &t.bt),
                        (&q, &state),
                        Some((&d, Some(&sums))),
                        Some(&y).filter(|_| with_y),
                    )?);
                    ops.push(kernels::norm::backward_merge(
                        gpu,
                        sh,
                        (&sums, tiles),
                        &t.stats,
                        &t.gt,
                        (&dg, &db),
                    )?);
                    summed.push((d, y, dg, db));
                }
                let mut read = vec![
                    &t.y, &d_two, &y_one, &d_one, &y_quant, &d_mask, &dg_ref, &db_ref,
                ];
                for (d, y, dg, db) in &summed {
                    read.extend([d, y, dg, db]);
                }
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &read)?;
                // (1 where the case masks some gradients, as it must to test the mask.)
                let masks = f32::from(u8::from(got[1].contains(&0.0)));
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[2], &f64s(&got[0]), Tolerance::EXACT),
                    ),
                    (
                        "dx".into(),
                        reference::compare(&got[3], &f64s(&got[1]), Tolerance::EXACT),
                    ),
                    (
                        "y alone".into(),
                        reference::compare(&got[4], &f64s(&got[0]), Tolerance::EXACT),
                    ),
                    (
                        "dx alone".into(),
                        reference::compare(&got[5], &f64s(&got[1]), Tolerance::EXACT),
                    ),
                    (
                        "some dx masked".into(),
                        reference::compare(&[masks], &[1.0], Tolerance::EXACT),
                    ),
                    // Sums of up to n * s terms of magnitude at most about 3.
                    (
                        "with sums: dx, y".into(),
                        reference::compare(
                            &[&got[8][..], &got[9][..], &got[12][..]].concat(),
                            &f64s(&[&got[1][..], &got[0][..], &got[1][..]].concat()),
                            Tolerance::EXACT,
                        ),
                    ),
                    (
                        "with sums: dgamma, dbeta".into(),
                        reference::compare(
                            &[&got[10][..], &got[11][..], &got[14][..], &got[15][..]].concat(),
                            &f64s(&[&got[6][..], &got[7][..], &got[6][..], &got[7][..]].concat()),
                            Tolerance::new(1e-6 * (n * s) as f64, 1e-4),
                        ),
                    ),
                ])
            },
        ));
        v.push(Case::new(
            "batchnorm",
            "forward eval",
            shape.clone(),
            move |gpu, rng| {
                let t = Inputs::draw(gpu, rng, (n, c, s), 0.5)?;
                let mut ops = vec![
                    kernels::norm::stats_eval(
                        gpu,
                        c,
                        1e-5,
                        (&t.gt, &t.bt),
                        &t.rm,
                        &t.rv,
                        &t.stats,
                    )?,
                    kernels::norm::apply(gpu, ep, &t.xt, &t.stats, &t.gt, &t.bt, &t.y)?,
                ];
                let yq = gpu.empty("y quantized", &[n, c, s], DType::F32)?;
                if quantize > 0 {
                    let q = Epilogue {
                        quantize: Some(bits(quantize)),
                        ..ep
                    };
                    ops.push(kernels::norm::apply(
                        gpu, q, &t.xt, &t.stats, &t.gt, &t.bt, &yq,
                    )?);
                }
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&t.y, &yq])?;
                let want = shuffled(
                    reference::norm::apply(
                        &f64s(&t.x),
                        (n, c, s),
                        &f64s(&t.rm0),
                        &f64s(&t.rv0),
                        &f64s(&t.gamma),
                        &f64s(&t.beta),
                        1e-5,
                        relu,
                    ),
                    false,
                );
                let mut checks = vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, Tolerance::new(1e-5, 1e-5)),
                )];
                if quantize > 0 {
                    let want_q = reference::quant::act_forward(&got[0], bits(quantize));
                    checks.push((
                        format!("y quantized a{quantize}"),
                        reference::compare(&got[1], &f64s(&want_q), Tolerance::EXACT),
                    ));
                }
                Ok(checks)
            },
        ));
        v.push(Case::new(
            "batchnorm",
            "backward",
            shape,
            move |gpu, rng| {
                let x = rng.vec_uniform(n * c * s, -2.0, 3.0);
                let dy = rng.vec_uniform(n * c * s, -1.0, 1.0);
                let (gamma, beta) = (rng.vec_uniform(c, 0.5, 1.5), rng.vec_uniform(c, -0.5, 0.5));
                let xt = gpu.upload_f32("x", &[n, c, s], &x)?;
                let dyt = gpu.upload_f32("dy", &[n, c, s], &dy)?;
                let (gt, bt) = (
                    gpu.upload_f32("gamma", &[c], &gamma)?,
                    gpu.upload_f32("beta", &[c], &beta)?,
                );
                let (rm, rv) = (
                    gpu.zeros("rm", &[c], DType::F32)?,
                    gpu.zeros("rv", &[c], DType::F32)?,
                );
                let stats = gpu.empty("stats", &[kernels::norm::TABLE * c], DType::F32)?;
                let y = gpu.empty("y", &[n, c, s], DType::F32)?;
                let (dg, db) = (
                    gpu.empty("dgamma", &[c], DType::F32)?,
                    gpu.empty("dbeta", &[c], DType::F32)?,
                );
                let dx = gpu.empty("dx", &[n, c, s], DType::F32)?;
                let mut ops = vec![
                    kernels::norm::stats_train(gpu, &xt, 1e-5, 0.1, (&gt, &bt), &stats, &rm, &rv)?,
                    kernels::norm::apply(gpu, ep, &xt, &stats, &gt, &bt, &y)?,
                ];
                ops.extend(kernels::norm::backward(
                    gpu,
                    ep,
                    &xt,
                    &dyt,
                    &stats,
                    &gt,
                    &bt,
                    &dg,
                    &db,
                    Some(&dx),
                )?);
                // In place: dx over a copy of x, as a network writes it over the conv output.
                let x_then_dx = gpu.upload_f32("x, then dx", &[n, c, s], &x)?;
                let (dg2, db2) = (
                    gpu.empty("dgamma 2", &[c], DType::F32)?,
                    gpu.empty("dbeta 2", &[c], DType::F32)?,
                );
                ops.extend(kernels::norm::backward(
                    gpu,
                    ep,
                    &x_then_dx,
                    &dyt,
                    &stats,
                    &gt,
                    &bt,
                    &dg2,
                    &db2,
                    Some(&x_then_dx),
                )?);
                let got: Vec<Vec<f32>> =
                    gpu.run_and_read("selftest", &ops, &[&dx, &dg, &db, &x_then_dx])?;
                let (yr, mean, var) = reference::norm::forward_train(
                    &f64s(&x),
                    (n, c, s),
                    &f64s(&gamma),
                    &f64s(&beta),
                    1e-5,
                    relu,
                );
                // The ReLU mask comes from the GPU's own y (a value at exactly 0 may round either
                // way); the backward forms the same pre-activation again, so their signs agree.
                let y_gpu: Vec<f64> = if relu {
                    shuffled(f64s(&gpu.read_f32(&y)?), true)
                } else {
                    yr
                };
                let (wdx, wdg, wdb) = reference::norm::backward(
                    &f64s(&x),
                    &y_gpu,
                    &shuffled(f64s(&dy), true),
                    (n, c, s),
                    &mean,
                    &var,
                    &f64s(&gamma),
                    1e-5,
                    relu,
                );
                let mut checks =
                    backward_checks((&got[0], &got[1], &got[2]), (&wdx, &wdg, &wdb), n * s);
                checks.push((
                    "dx in place".into(),
                    reference::compare(&got[3], &wdx, backward_tolerances(n * s).0),
                ));
                Ok(checks)
            },
        ));
    }
}

/// BatchNorm with wbwtab's sign fused after it, train forward and backward (the passes a
/// network runs where it keeps every output): the sign of each value bit for bit the sign of
/// the same pass's value without it (`sign_pos`, 0 → +1), and the backward against the f64
/// reference of the gradient masked where the GPU's own value lies outside (−1, 1) (a value
/// next to ±1 may round either way; the backward forms the same value again).
pub(super) fn sign_cases(v: &mut Vec<Case>) {
    // (N, C, S, shuffle groups); planes of 16: the backward applies take four at a time.
    for (n, c, s, shuffle) in [(4usize, 6usize, 25usize, 2usize), (3, 8, 16, 1)] {
        let shuffled = move |v: Vec<f64>, inverse: bool| {
            if shuffle > 1 {
                reference::pool::channel_shuffle(&v, (n, c, s), shuffle, inverse)
            } else {
                v
            }
        };
        v.push(Case::new(
            "batchnorm",
            "forward+backward +sign",
            format!("[{n},{c},{s}] +shuffle {shuffle}"),
            move |gpu, rng| {
                let t = Inputs::draw(gpu, rng, (n, c, s), 0.1)?;
                let dy = rng.vec_uniform(n * c * s, -1.0, 1.0);
                let dyt = gpu.upload_f32("dy", &[n, c, s], &dy)?;
                let ep = |act| Epilogue {
                    act,
                    shuffle,
                    quantize: None,
                };
                let u = gpu.empty("bn value", &[n, c, s], DType::F32)?;
                let per_channel = |what| gpu.empty(what, &[c], DType::F32);
                let (dg, db) = (per_channel("dgamma")?, per_channel("dbeta")?);
                let dx = gpu.empty("dx", &[n, c, s], DType::F32)?;
                let (rm, rv, stats) = (&t.rm, &t.rv, &t.stats);
                let (x, g, b) = (&t.xt, &t.gt, &t.bt);
                let mut ops = vec![
                    kernels::norm::stats_train(gpu, x, 1e-5, 0.1, (g, b), stats, rm, rv)?,
                    kernels::norm::apply(gpu, ep(Act::Identity), x, stats, g, b, &u)?,
                    kernels::norm::apply(gpu, ep(Act::Sign), x, stats, g, b, &t.y)?,
                ];
                let sign = ep(Act::Sign);
                ops.extend(kernels::norm::backward(
                    gpu,
                    sign,
                    x,
                    &dyt,
                    stats,
                    g,
                    b,
                    &dg,
                    &db,
                    Some(&dx),
                )?);
                let got: Vec<Vec<f32>> =
                    gpu.run_and_read("selftest", &ops, &[&u, &t.y, &dx, &dg, &db])?;
                let want_y: Vec<f64> = got[0]
                    .iter()
                    .map(|&v| f64::from(crate::quant::wbwtab::sign_pos(v)))
                    .collect();
                // The gradient through the sign's mask, in the output's (shuffled) channels.
                let masked: Vec<f64> = got[0]
                    .iter()
                    .zip(&dy)
                    .map(|(&v, &d)| {
                        if v > -1.0 && v < 1.0 {
                            f64::from(d)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let (_, mean, var) = reference::norm::forward_train(
                    &f64s(&t.x),
                    (n, c, s),
                    &f64s(&t.gamma),
                    &f64s(&t.beta),
                    1e-5,
                    false,
                );
                // (No ReLU: the reference's output argument is unused.)
                let (wdx, wdg, wdb) = reference::norm::backward(
                    &f64s(&t.x),
                    &vec![0.0; n * c * s],
                    &shuffled(masked, true),
                    (n, c, s),
                    &mean,
                    &var,
                    &f64s(&t.gamma),
                    1e-5,
                    false,
                );
                // (1 where the values fall on both sides of the mask, as they must to test it.)
                let inside = got[0].iter().filter(|v| v.abs() < 1.0).count();
                let both = f32::from(u8::from(inside > 0 && inside < got[0].len()));
                let mut checks = vec![(
                    "y".into(),
                    reference::compare(&got[1], &want_y, Tolerance::EXACT),
                )];
                checks.extend(backward_checks(
                    (&got[2], &got[3], &got[4]),
                    (&wdx, &wdg, &wdb),
                    n * s,
                ));
                checks.push((
                    "values on both sides of the mask".into(),
                    reference::compare(&[both], &[1.0], Tolerance::EXACT),
                ));
                Ok(checks)
            },
        ));
    }
}

/// The tolerances of a BatchNorm backward over `count` values per channel: dx, and the sums
/// dgamma and dbeta.
fn backward_tolerances(count: usize) -> (Tolerance, Tolerance) {
    let k = (count as f64).sqrt();
    (
        Tolerance::new(1e-5 * k, 1e-4),
        Tolerance::new(2e-6 * k, 1e-5),
    )
}

/// dx, dgamma and dbeta of a BatchNorm backward over `count` values per channel against the
/// reference's.
fn backward_checks(
    (dx, dg, db): (&[f32], &[f32], &[f32]),
    (wdx, wdg, wdb): (&[f64], &[f64], &[f64]),
    count: usize,
) -> Vec<(String, reference::Report)> {
    let (tol_dx, tol_sums) = backward_tolerances(count);
    vec![
        ("dx".into(), reference::compare(dx, wdx, tol_dx)),
        ("dgamma".into(), reference::compare(dg, wdg, tol_sums)),
        ("dbeta".into(), reference::compare(db, wdb, tol_sums)),
    ]
}
