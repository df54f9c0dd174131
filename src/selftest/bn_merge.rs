//! The BatchNorm merges of per-tile partials (`norm::stats_merge`, `norm::backward_merge`),
//! alone: partials drawn at random, against the f64 combination of the same partials. Tile
//! counts below, at and far above the 32 runs the kernels split them into (2,048: a 32x32 layer
//! at batch 256), channel counts that leave a workgroup's channels partly empty, many
//! workgroups.

use super::{Case, f64s};
use crate::DType;
use crate::kernels::norm::{self, BnShape, TABLE, entry};
use crate::reference::{self, Tolerance};
use crate::rng::Rng;

/// (N, C, S, columns per tile)
const SHAPES: [(usize, usize, usize, usize); 5] = [
    (2, 3, 50, 128),
    (4, 13, 300, 64),
    (40, 10, 256, 128),
    (256, 9, 1024, 128),
    (3, 1030, 7, 128),
];

pub(super) fn cases(v: &mut Vec<Case>) {
    for (n, c, s, tile) in SHAPES {
        let sh = BnShape { n, c, s };
        let tiles = (n * s).div_ceil(tile);
        let shape = format!("[{n},{c},{s}] {tiles} tiles of {tile}");
        v.push(Case::new(
            "batchnorm",
            "stats merge",
            shape.clone(),
            move |gpu, rng| {
                let count = n * s;
                // Per tile and channel a mean about a large common offset (where a one-pass
                // variance would cancel) and a sum of squared deviations about 1 per value.
                let cols = |t: usize| tile.min(count - t * tile) as f32;
                let mut partials = vec![0.0f32; 2 * tiles * c];
                for t in 0..tiles {
                    for ch in 0..c {
                        partials[2 * t * c + ch] = 40.0 + rng.uniform(-1.0, 1.0);
                        partials[(2 * t + 1) * c + ch] = cols(t) * rng.uniform(0.5, 1.5);
                    }
                }
                let (gamma, beta) = (rng.vec_uniform(c, 0.5, 1.5), rng.vec_uniform(c, -0.5, 0.5));
                let (rm0, rv0) = (rng.vec_uniform(c, -0.1, 0.1), rng.vec_uniform(c, 0.5, 1.5));
                let pt = gpu.upload_f32("partials", &[partials.len()], &partials)?;
                let gt = gpu.upload_f32("gamma", &[c], &gamma)?;
                let bt = gpu.upload_f32("beta", &[c], &beta)?;
                let rm = gpu.upload_f32("rm", &[c], &rm0)?;
                let rv = gpu.upload_f32("rv", &[c], &rv0)?;
                let stats = gpu.empty("stats", &[TABLE * c], DType::F32)?;
                let ops = [norm::stats_merge(
                    gpu,
                    sh,
                    (&pt, tile),
                    1e-5,
                    0.1,
                    (&gt, &bt),
                    &stats,
                    &rm,
                    &rv,
                )?];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&stats, &rm, &rv])?;
                // The f64 combination: mean over every value, then M2 about it.
                let nf = count as f64;
                let part =
                    |t: usize, k: usize, ch: usize| f64::from(partials[(2 * t + k) * c + ch]);
                let mean: Vec<f64> = (0..c)
                    .map(|ch| {
                        (0..tiles)
                            .map(|t| f64::from(cols(t)) * part(t, 0, ch))
                            .sum::<f64>()
                            / nf
                    })
                    .collect();
                let var: Vec<f64> = (0..c)
                    .map(|ch| {
                        (0..tiles)
                            .map(|t| {
                                part(t, 1, ch)
                                    + f64::from(cols(t)) * (part(t, 0, ch) - mean[ch]).powi(2)
                            })
                            .sum::<f64>()
                            / nf
                    })
                    .collect();
                let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
                let want_rm: Vec<f64> = (0..c)
                    .map(|i| 0.9 * f64::from(rm0[i]) + 0.1 * mean[i])
                    .collect();
                let want_rv: Vec<f64> = (0..c)
                    .map(|i| 0.9 * f64::from(rv0[i]) + 0.1 * var[i] * nf / (nf - 1.0))
                    .collect();
                let entries =
                    |e: usize| -> Vec<f32> { (0..c).map(|ch| got[0][entry::at(ch, e)]).collect() };
                let tol = Tolerance::new(1e-5, 1e-5);
                Ok(vec![
                    (
                        "mean".into(),
                        reference::compare(&entries(entry::MEAN), &mean, tol),
                    ),
                    (
                        "invstd".into(),
                        reference::compare(&entries(entry::INVSTD), &invstd, tol),
                    ),
                    (
                        "gamma, beta".into(),
                        reference::compare(
                            &[entries(entry::GAMMA), entries(entry::BETA)].concat(),
                            &[f64s(&gamma), f64s(&beta)].concat(),
                            Tolerance::EXACT,
                        ),
                    ),
                    (
                        "running_mean".into(),
                        reference::compare(&got[1], &want_rm, tol),
                    ),
                    (
                        "running_var".into(),
                        reference::compare(&got[2], &want_rv, tol),
                    ),
                ])
            },
        ));
        v.push(Case::new(
            "batchnorm",
            "backward merge",
            shape,
            move |gpu, rng| backward_case(gpu, rng, sh, tiles),
        ));
    }
}

/// `norm::backward_merge` of random per-tile sums: dbeta and dgamma against their f64 sums,
/// the table's copies of them exactly, its scale against `gamma * invstd / count`.
fn backward_case(
    gpu: &crate::gpu::Gpu,
    rng: &mut Rng,
    sh: BnShape,
    tiles: usize,
) -> crate::error::Result<Vec<(String, reference::Report)>> {
    let c = sh.c;
    let sums = rng.vec_uniform(2 * tiles * c, -1.0, 1.0);
    let gamma = rng.vec_uniform(c, 0.5, 1.5);
    // A table whose other entries are stale values the merge must keep (the invstd it reads).
    let table = rng.vec_uniform(TABLE * c, 0.5, 2.0);
    let st = gpu.upload_f32("sums", &[sums.len()], &sums)?;
    let gt = gpu.upload_f32("gamma", &[c], &gamma)?;
    let tt = gpu.upload_f32("table", &[TABLE * c], &table)?;
    let (dgt, dbt) = (
        gpu.empty("dgamma", &[c], DType::F32)?,
        gpu.empty("dbeta", &[c], DType::F32)?,
    );
    let ops = [norm::backward_merge(
        gpu,
        sh,
        (&st, tiles),
        &tt,
        &gt,
        (&dgt, &dbt),
    )?];
    let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dbt, &dgt, &tt])?;
    let sum = |k: usize| -> Vec<f64> {
        (0..c)
            .map(|ch| {
                (0..tiles)
                    .map(|t| f64::from(sums[(2 * t + k) * c + ch]))
                    .sum()
            })
            .collect()
    };
    let entries = |e: usize| -> Vec<f32> { (0..c).map(|ch| got[2][entry::at(ch, e)]).collect() };
    let count = (sh.n * sh.s) as f64;
    let scale: Vec<f64> = (0..c)
        .map(|ch| f64::from(gamma[ch]) * f64::from(table[entry::at(ch, entry::INVSTD)]) / count)
        .collect();
    let kept: Vec<usize> = (0..c)
        .flat_map(|ch| {
            [entry::MEAN, entry::INVSTD, entry::GAMMA, entry::BETA].map(|e| entry::at(ch, e))
        })
        .collect();
    let tol = Tolerance::new(1e-4, 1e-5);
    Ok(vec![
        ("dbeta".into(), reference::compare(&got[0], &sum(0), tol)),
        ("dgamma".into(), reference::compare(&got[1], &sum(1), tol)),
        (
            "table dbeta, dgamma".into(),
            reference::compare(
                &[entries(entry::DBETA), entries(entry::DGAMMA)].concat(),
                &f64s(&[got[0].clone(), got[1].clone()].concat()),
                Tolerance::EXACT,
            ),
        ),
        (
            "table scale".into(),
            reference::compare(&entries(entry::SCALE), &scale, Tolerance::new(0.0, 1e-6)),
        ),
        (
            "table kept".into(),
            reference::compare(
                &kept.iter().map(|&i| got[2][i]).collect::<Vec<_>>(),
                &kept
                    .iter()
                    .map(|&i| f64::from(table[i]))
                    .collect::<Vec<_>>(),
                Tolerance::EXACT,
            ),
        ),
    ])
}
