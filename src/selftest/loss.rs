//! The losses, with the metrics slot they write.

use super::{Case, f64s, random};
use crate::DType;
use crate::kernels;
use crate::reference::{self, Tolerance};

pub(super) fn cases(v: &mut Vec<Case>) {
    for (n, classes) in [(1usize, 10usize), (50, 10), (300, 7)] {
        v.push(Case::new(
            "cross_entropy",
            "forward+backward",
            format!("[{n},{classes}]"),
            move |gpu, rng| {
                let z: Vec<f32> = rng.vec_uniform(n * classes, 0.0, 6.0);
                let labels: Vec<u32> = (0..n).map(|_| rng.below(classes as u64) as u32).collect();
                let zt = gpu.upload_f32("logits", &[n, classes], &z)?;
                let lt = gpu.upload_u32("labels", &[n], &labels)?;
                let dz = gpu.empty("dlogits", &[n, classes], DType::F32)?;
                let rows = gpu.empty("per_row", &[2 * n], DType::F32)?;
                let metrics = gpu.zeros("metrics", &[8], DType::F32)?;
                let step = gpu.upload(
                    "step",
                    &[kernels::loss::STEP_WORDS],
                    DType::U32,
                    &[2u32, 0, 0, 0, 0, 0, 0, 0],
                )?;
                let ops = vec![
                    kernels::loss::cross_entropy(gpu, &zt, &lt, &dz, &rows)?,
                    kernels::loss::batch_metrics(gpu, n, &rows, &metrics, &step)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dz, &metrics])?;
                let (loss, grad, correct) =
                    reference::loss::cross_entropy(&f64s(&z), &labels, classes);
                Ok(vec![
                    (
                        "dlogits".into(),
                        reference::compare(&got[0], &grad, Tolerance::new(1e-7, 1e-5)),
                    ),
                    (
                        "loss (slot 2)".into(),
                        reference::compare(&got[1][4..5], &[loss], Tolerance::new(1e-6, 1e-5)),
                    ),
                    (
                        "correct (slot 2)".into(),
                        reference::compare(&got[1][5..6], &[correct as f64], Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    v.push(Case::new(
        "mse",
        "forward+backward",
        "[4,3,5,5]".into(),
        move |gpu, rng| {
            let shape = [4usize, 3, 5, 5];
            let (y, t) = (random(rng, &shape), random(rng, &shape));
            let yt = gpu.upload_f32("y", &shape, &y)?;
            let tt = gpu.upload_f32("target", &shape, &t)?;
            let dy = gpu.empty("dy", &shape, DType::F32)?;
            let rows = gpu.empty("per_row", &[8], DType::F32)?;
            let metrics = gpu.zeros("metrics", &[2], DType::F32)?;
            let step = gpu.zeros("step", &[kernels::loss::STEP_WORDS], DType::U32)?;
            let ops = vec![
                kernels::loss::mse(gpu, &yt, &tt, &dy, &rows)?,
                kernels::loss::batch_metrics(gpu, 4, &rows, &metrics, &step)?,
            ];
            let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dy, &metrics])?;
            let (loss, grad) = reference::loss::mse(&f64s(&y), &f64s(&t));
            Ok(vec![
                (
                    "dy".into(),
                    reference::compare(&got[0], &grad, Tolerance::new(1e-8, 1e-5)),
                ),
                (
                    "loss".into(),
                    reference::compare(&got[1][..1], &[loss], Tolerance::new(1e-6, 1e-5)),
                ),
            ])
        },
    ));
}
