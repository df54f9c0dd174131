//! ReLU, the residual add and gradient accumulation, and the per-channel sum.

use super::{Case, f64s, run_read};
use crate::DType;
use crate::kernels;
use crate::reference::{self, Tolerance};

pub(super) fn relu_cases(v: &mut Vec<Case>) {
    // Sizes around the 256-thread workgroup, and one past 65535 workgroups (a 2-D grid).
    for n in [1usize, 255, 257, 1000, 65535 * 256 + 300] {
        v.push(Case::new(
            "relu",
            "forward",
            format!("[{n}]"),
            move |gpu, rng| {
                let x = rng.vec_uniform(n, -1.0, 1.0);
                let xt = gpu.upload_f32("x", &[n], &x)?;
                let yt = gpu.empty("y", &[n], DType::F32)?;
                let got = run_read(
                    gpu,
                    vec![kernels::elementwise::relu_forward(gpu, &xt, &yt)?],
                    &[&yt],
                )?;
                let want = reference::elementwise::relu_forward(&x);
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
    }
    for n in [1usize, 257, 4099] {
        v.push(Case::new(
            "relu",
            "backward",
            format!("[{n}]"),
            move |gpu, rng| {
                let (y, dy, yt, dyt) = relu_output_and_gradient(gpu, rng, n)?;
                let dxt = gpu.empty("dx", &[n], DType::F32)?;
                let l = kernels::elementwise::relu_backward(gpu, &yt, &dyt, &dxt)?;
                let got = run_read(gpu, vec![l], &[&dxt])?;
                let want = reference::elementwise::relu_backward(&y, &dy);
                Ok(vec![(
                    "dx".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
        // The same dx written to two gradients (a residual add's summands).
        v.push(Case::new(
            "relu",
            "backward pair",
            format!("[{n}]"),
            move |gpu, rng| {
                let (y, dy, yt, dyt) = relu_output_and_gradient(gpu, rng, n)?;
                let dxs = [
                    gpu.empty("dx", &[n], DType::F32)?,
                    gpu.empty("dx2", &[n], DType::F32)?,
                ];
                let l =
                    kernels::elementwise::relu_backward_pair(gpu, &yt, &dyt, (&dxs[0], &dxs[1]))?;
                let got = run_read(gpu, vec![l], &[&dxs[0], &dxs[1]])?;
                let want = reference::elementwise::relu_backward(&y, &dy);
                Ok(vec![
                    (
                        "dx".into(),
                        reference::compare(&got[0], &want, Tolerance::EXACT),
                    ),
                    (
                        "dx2".into(),
                        reference::compare(&got[1], &want, Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
}

/// A ReLU's output (uniform in [-1, 1) through the ReLU) and an output gradient of `n`
/// elements, drawn and uploaded.
fn relu_output_and_gradient(
    gpu: &crate::Gpu,
    rng: &mut crate::rng::Rng,
    n: usize,
) -> crate::Result<(Vec<f32>, Vec<f32>, crate::gpu::Tensor, crate::gpu::Tensor)> {
    let y: Vec<f32> = rng
        .vec_uniform(n, -1.0, 1.0)
        .iter()
        .map(|v| v.max(0.0))
        .collect();
    let dy = rng.vec_uniform(n, -1.0, 1.0);
    let yt = gpu.upload_f32("y", &[n], &y)?;
    let dyt = gpu.upload_f32("dy", &[n], &dy)?;
    Ok((y, dy, yt, dyt))
}

/// The residual sum and gradient accumulation: one f32 add per element, exact.
pub(super) fn fill_cases(v: &mut Vec<Case>) {
    // Around the workgroup, and past 65535 workgroups (a 2-D grid); a range not around 0.
    let shapes = [
        (1usize, (-1.0f32, 1.0f32)),
        (1000, (2.0, 5.0)),
        (65535 * 256 + 300, (-1.0, 1.0)),
    ];
    for (n, (lo, hi)) in shapes {
        v.push(Case::new(
            "fill",
            "uniform",
            format!("[{n}] [{lo}, {hi})"),
            move |gpu, rng| {
                let seed = rng.next_u64() as u32;
                let y = gpu.empty("y", &[n], DType::F32)?;
                let again = gpu.empty("y again", &[n], DType::F32)?;
                let fill = |t| kernels::elementwise::fill_uniform(gpu, t, seed, (lo, hi));
                let got: Vec<Vec<f32>> =
                    gpu.run_and_read("selftest", &[fill(&y)?, fill(&again)?], &[&y, &again])?;
                let want = reference::elementwise::fill_uniform(n, seed, (lo, hi));
                // Two roundings at the range's scale (one where the device fuses them).
                let ulp = f64::from(lo.abs().max(hi.abs())) * f64::from(f32::EPSILON);
                let first = f64s(&got[0]);
                // In [lo, hi] (hi itself only where rounding reaches it).
                let clamped: Vec<f64> = first
                    .iter()
                    .map(|x| x.clamp(lo.into(), hi.into()))
                    .collect();
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &want, Tolerance::new(ulp, 0.0)),
                    ),
                    (
                        "y in range".into(),
                        reference::compare(&got[0], &clamped, Tolerance::EXACT),
                    ),
                    (
                        "y again".into(),
                        reference::compare(&got[1], &first, Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
}

pub(super) fn add_cases(v: &mut Vec<Case>) {
    for n in [1usize, 257, 65535 * 256 + 300] {
        v.push(Case::new(
            "add",
            "forward",
            format!("[{n}]"),
            move |gpu, rng| {
                let (a, b) = (rng.vec_uniform(n, -1.0, 1.0), rng.vec_uniform(n, -1.0, 1.0));
                let at = gpu.upload_f32("a", &[n], &a)?;
                let bt = gpu.upload_f32("b", &[n], &b)?;
                let yt = gpu.empty("y", &[n], DType::F32)?;
                let l = kernels::elementwise::add_forward(gpu, &at, &bt, &yt)?;
                let got = run_read(gpu, vec![l], &[&yt])?;
                let want = reference::elementwise::add(&a, &b);
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
    }
    // With the ReLU after the sum (a residual block's output): exact sums of 0 (a = -b) and of
    // two negative zeros among the values.
    for n in [1usize, 257, 4099] {
        v.push(Case::new(
            "add",
            "forward+relu",
            format!("[{n}]"),
            move |gpu, rng| {
                let a = rng.vec_uniform(n, -1.0, 1.0);
                let b: Vec<f32> = (0..n)
                    .map(|i| match i % 7 {
                        3 => -a[i],
                        5 => -0.0,
                        _ => rng.uniform(-1.0, 1.0),
                    })
                    .collect();
                let a: Vec<f32> = (0..n)
                    .map(|i| if i % 7 == 5 { -0.0 } else { a[i] })
                    .collect();
                let at = gpu.upload_f32("a", &[n], &a)?;
                let bt = gpu.upload_f32("b", &[n], &b)?;
                let yt = gpu.empty("y", &[n], DType::F32)?;
                let l = kernels::elementwise::add_forward_relu(gpu, &at, &bt, &yt, true)?;
                let got = run_read(gpu, vec![l], &[&yt])?;
                let sums: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a + b).collect();
                let want = reference::elementwise::relu_forward(&sums);
                // Bit for bit: a zero is +0, as relu_forward writes it.
                let signs = got[0].iter().filter(|v| v.is_sign_negative()).count();
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &want, Tolerance::EXACT),
                    ),
                    (
                        "negative zeros".into(),
                        reference::compare(&[signs as f32], &[0.0], Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    for n in [1usize, 4099] {
        v.push(Case::new(
            "add",
            "accumulate",
            format!("[{n}]"),
            move |gpu, rng| {
                let (x, s) = (rng.vec_uniform(n, -1.0, 1.0), rng.vec_uniform(n, -1.0, 1.0));
                let xt = gpu.upload_f32("x", &[n], &x)?;
                let st = gpu.upload_f32("sum", &[n], &s)?;
                // Twice: the second adds x to what the first left.
                let ls = vec![
                    kernels::elementwise::accumulate(gpu, &xt, &st)?,
                    kernels::elementwise::accumulate(gpu, &xt, &st)?,
                ];
                let got = run_read(gpu, ls, &[&st])?;
                let once: Vec<f32> = reference::elementwise::add(&s, &x)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                let want = reference::elementwise::add(&once, &x);
                Ok(vec![(
                    "sum".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
    }
}

pub(super) fn reduce_cases(v: &mut Vec<Case>) {
    // Split-K sums: slice counts below, at and far above the four runs each element is split
    // into (218: a 5x5 conv's grad-weight at batch 256), lengths that leave a workgroup's
    // elements partly empty; the pair form with a second set of another length.
    for (count, len, len2) in [
        (1usize, 5usize, 3usize),
        (3, 64, 1),
        (5, 100, 70),
        (16, 1000, 8),
        (218, 300, 256),
    ] {
        v.push(Case::new(
            "slice_sum",
            "forward",
            format!("{count} slices of {len} (pair: and of {len2})"),
            move |gpu, rng| {
                let a = rng.vec_uniform(count * len, -1.0, 1.0);
                let b = rng.vec_uniform(count * len2, -1.0, 1.0);
                let at = gpu.upload_f32("slices", &[count, len], &a)?;
                let bt = gpu.upload_f32("slices2", &[count, len2], &b)?;
                let out = gpu.empty("sum", &[len], DType::F32)?;
                let (out_p, out2_p) = (
                    gpu.empty("pair sum", &[len], DType::F32)?,
                    gpu.empty("pair sum 2", &[len2], DType::F32)?,
                );
                let got = run_read(
                    gpu,
                    vec![
                        kernels::reduce::slice_sum(gpu, &at, &out)?,
                        kernels::reduce::slice_sum_pair(gpu, (&at, &out_p), (&bt, &out2_p))?,
                    ],
                    &[&out, &out_p, &out2_p],
                )?;
                let sums = |v: &[f32], n: usize| -> Vec<f64> {
                    (0..n)
                        .map(|i| (0..count).map(|j| f64::from(v[j * n + i])).sum())
                        .collect()
                };
                // f32 sums of `count` terms of magnitude <= 1.
                let tol = Tolerance::new(1e-6 * count as f64, 1e-5);
                Ok(vec![
                    (
                        "sum".into(),
                        reference::compare(&got[0], &sums(&a, len), tol),
                    ),
                    (
                        "pair, first".into(),
                        reference::compare(&got[1], &f64s(&got[0]), Tolerance::EXACT),
                    ),
                    (
                        "pair, second".into(),
                        reference::compare(&got[2], &sums(&b, len2), tol),
                    ),
                ])
            },
        ));
    }
    // (N, C, S): one element per channel, S around the workgroup size, many channels.
    for (n, c, s) in [
        (1usize, 1usize, 1usize),
        (3, 5, 7),
        (2, 3, 300),
        (50, 10, 64),
        (4, 70_000, 1),
    ] {
        v.push(Case::new(
            "channel_sum",
            "forward",
            format!("[{n},{c},{s}]"),
            move |gpu, rng| {
                let x = rng.vec_uniform(n * c * s, -1.0, 1.0);
                let xt = gpu.upload_f32("x", &[n, c, s], &x)?;
                let out = gpu.empty("sum", &[c], DType::F32)?;
                let got = run_read(
                    gpu,
                    vec![kernels::reduce::channel_sum(gpu, &xt, &out)?],
                    &[&out],
                )?;
                let want = reference::reduce::channel_sum(&x, n, c, s);
                // f32 sums of up to n*s terms of magnitude <= 1.
                let tol = Tolerance::new(1e-6 * (n * s) as f64, 1e-5);
                Ok(vec![(
                    "sum".into(),
                    reference::compare(&got[0], &want, tol),
                )])
            },
        ));
    }
}
