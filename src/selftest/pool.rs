//! Max and average pools (alone and with the shuffle and quantizer after them fused) and the
//! channel shuffle.

use super::{Case, f64s, random};
use crate::DType;
use crate::kernels;
use crate::quant::Bits;
use crate::reference::{self, Tolerance};

pub(super) fn cases(v: &mut Vec<Case>) {
    // Pools: NIN's k3 s2 p1 (overlapping, -inf padding) and k2 s2, avg 8, odd sizes, asymmetric.
    use kernels::pool::PoolGeom;
    let pool = |[n, c, h, w]: [usize; 4], kernel, stride, padding| PoolGeom {
        n,
        c,
        h,
        w,
        kernel,
        stride,
        padding,
    };
    let pools = [
        pool([2, 3, 8, 8], (3, 3), (2, 2), (1, 1)),
        pool([2, 4, 8, 6], (2, 2), (2, 2), (0, 0)),
        pool([3, 10, 8, 8], (8, 8), (1, 1), (0, 0)),
        pool([1, 2, 7, 9], (3, 2), (1, 2), (1, 1)),
        // Small planes, 8 to a workgroup in max-pool backward, the last workgroup's 5.
        pool([3, 7, 16, 16], (3, 3), (2, 2), (1, 1)),
        // Planes whose windows do not fit one workgroup: max-pool backward in two bands, with
        // input rows that no window covers (stride 3 over 2) at and around the band edge.
        pool([1, 2, 300, 70], (2, 3), (3, 2), (0, 1)),
        // Rows too wide for a band (2,100 windows): max-pool backward window by window.
        pool([1, 1, 3, 4200], (3, 3), (2, 2), (1, 1)),
    ];
    for g in pools {
        let shape = format!(
            "{:?} k{:?} s{:?} p{:?}",
            g.input_shape(),
            g.kernel,
            g.stride,
            g.padding
        );
        v.push(Case::new(
            "maxpool",
            "forward+backward",
            shape.clone(),
            move |gpu, rng| {
                // Coarse values so that ties (first maximum wins) occur.
                let x: Vec<f32> = (0..g.input_shape().iter().product())
                    .map(|_| (rng.below(5) as f32) - 2.0)
                    .collect();
                let dy = random(rng, &g.output_shape());
                let xt = gpu.upload_f32("x", &g.input_shape(), &x)?;
                let dyt = gpu.upload_f32("dy", &g.output_shape(), &dy)?;
                let y = gpu.empty("y", &g.output_shape(), DType::F32)?;
                let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                let ops = vec![
                    kernels::maxpool::maxpool_forward(gpu, &g, &xt, &y)?,
                    kernels::maxpool::maxpool_backward(gpu, &g, &xt, &dyt, &dx)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &dx])?;
                let (wy, warg) = reference::pool::maxpool_forward(&g, &f64s(&x));
                let wdx = reference::pool::maxpool_backward(&g, &f64s(&dy), &warg);
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &wy, Tolerance::EXACT),
                    ),
                    (
                        "dx".into(),
                        reference::compare(&got[1], &wdx, Tolerance::new(1e-6, 1e-6)),
                    ),
                ])
            },
        ));
        v.push(Case::new(
            "avgpool",
            "forward+backward",
            shape,
            move |gpu, rng| {
                let x = random(rng, &g.input_shape());
                let dy = random(rng, &g.output_shape());
                let xt = gpu.upload_f32("x", &g.input_shape(), &x)?;
                let dyt = gpu.upload_f32("dy", &g.output_shape(), &dy)?;
                let y = gpu.empty("y", &g.output_shape(), DType::F32)?;
                let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                let ops = vec![
                    kernels::pool::avgpool_forward(gpu, &g, &xt, &y)?,
                    kernels::pool::avgpool_backward(gpu, &g, &dyt, &dx)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &dx])?;
                let tol = Tolerance::new(1e-6, 1e-5);
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(
                            &got[0],
                            &reference::pool::avgpool_forward(&g, &f64s(&x)),
                            tol,
                        ),
                    ),
                    (
                        "dx".into(),
                        reference::compare(
                            &got[1],
                            &reference::pool::avgpool_backward(&g, &f64s(&dy)),
                            tol,
                        ),
                    ),
                ])
            },
        ));
    }
    // Max-pool with the shuffle after it and the next layer's quantizer fused (what a NIN-GC
    // network runs): the output shuffled and quantized, the gradient read shuffled.
    for (g, groups) in [
        (
            PoolGeom {
                n: 2,
                c: 4,
                h: 8,
                w: 6,
                kernel: (2, 2),
                stride: (2, 2),
                padding: (0, 0),
            },
            2usize,
        ),
        (
            PoolGeom {
                n: 2,
                c: 12,
                h: 7,
                w: 7,
                kernel: (3, 3),
                stride: (2, 2),
                padding: (1, 1),
            },
            4,
        ),
    ] {
        let shape = format!("{:?} k{:?} g{groups}", g.input_shape(), g.kernel);
        v.push(Case::new(
            "maxpool",
            "forward+backward shuffled, a4",
            shape,
            move |gpu, rng| {
                // Coarse values (ties) over [-3, 13]: some outside the quantizer's range.
                let x: Vec<f32> = (0..g.input_shape().iter().product())
                    .map(|_| rng.below(17) as f32 - 2.63)
                    .collect();
                let dy = random(rng, &g.output_shape());
                let bits = Bits::new(4).expect("4 bits");
                let xt = gpu.upload_f32("x", &g.input_shape(), &x)?;
                let dyt = gpu.upload_f32("dy", &g.output_shape(), &dy)?;
                let y = gpu.empty("y", &g.output_shape(), DType::F32)?;
                let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                let ep = kernels::maxpool::MaxPoolEpilogue {
                    shuffle: groups,
                    quantize: Some(bits),
                };
                let ops = vec![
                    kernels::maxpool::maxpool_forward_fused(gpu, &g, &xt, &y, ep, None)?,
                    kernels::maxpool::maxpool_backward_shuffled(
                        gpu, &g, &xt, &dyt, &dx, groups, None,
                    )?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &dx])?;
                let (oh, ow) = g.out_hw();
                let planes = (g.n, g.c, oh * ow);
                let (pooled, arg) = reference::pool::maxpool_forward(&g, &f64s(&x));
                let shuffled = reference::pool::channel_shuffle(&pooled, planes, groups, false);
                let as_f32: Vec<f32> = shuffled.iter().map(|&v| v as f32).collect();
                let wy = f64s(&reference::quant::act_forward(&as_f32, bits));
                let dy_pool = reference::pool::channel_shuffle(&f64s(&dy), planes, groups, true);
                let wdx = reference::pool::maxpool_backward(&g, &dy_pool, &arg);
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &wy, Tolerance::EXACT),
                    ),
                    (
                        "dx".into(),
                        reference::compare(&got[1], &wdx, Tolerance::new(1e-6, 1e-6)),
                    ),
                ])
            },
        ));
    }
    for (n, c, hw, groups) in [
        (2usize, 8usize, 3usize, 2usize),
        (1, 512, 4, 16),
        (2, 12, 5, 4),
    ] {
        v.push(Case::new(
            "channel_shuffle",
            "forward+backward",
            format!("[{n},{c},{hw}] g{groups}"),
            move |gpu, rng| {
                let x = rng.vec_uniform(n * c * hw, -1.0, 1.0);
                let xt = gpu.upload_f32("x", &[n, c, hw, 1], &x)?;
                let y = gpu.empty("y", &[n, c, hw, 1], DType::F32)?;
                let back = gpu.empty("back", &[n, c, hw, 1], DType::F32)?;
                let ops = vec![
                    kernels::pool::channel_shuffle(gpu, groups, false, &xt, &y)?,
                    kernels::pool::channel_shuffle(gpu, groups, true, &y, &back)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &back])?;
                let want = reference::pool::channel_shuffle(&f64s(&x), (n, c, hw), groups, false);
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &want, Tolerance::EXACT),
                    ),
                    (
                        "inverse(y) = x".into(),
                        reference::compare(&got[1], &f64s(&x), Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
}
