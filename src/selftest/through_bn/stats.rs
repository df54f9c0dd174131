//! The conv forward that forms the statistics of the BatchNorm after it.

use crate::selftest::coop::{act_levels, path_or_emulation, weight_levels};
use crate::selftest::gemm::{GemmOp, gemm_tolerance};
use crate::selftest::{Case, f64s, random};

use crate::DType;
use crate::kernels::conv_coop;
use crate::kernels::conv2d::{self, Conv2dGeom};
use crate::kernels::norm::{TABLE, entry};
use crate::quant::Bits;
use crate::reference::{self};

/// The conv forward that forms the statistics of the BatchNorm after it (per column tile, then
/// `norm::stats_merge`): the output as the plain forward's, the batch mean, invstd and the
/// running statistics against the f64 statistics of that output, and gamma and beta copied into
/// the table. Outputs with a large common offset (where a one-pass variance would cancel), tails
/// in every direction, group packing.
pub(in crate::selftest) fn cases(v: &mut Vec<Case>) {
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

/// One case of [`cases`]: on the fp32 kernel, or on cooperative matrices (emulated where
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
                        (Default::default(), Some(&partials)),
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
                        Default::default(),
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
