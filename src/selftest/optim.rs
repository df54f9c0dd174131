//! The optimizers: three steps each, so state and bias corrections matter.

use super::{Case, f64s};
use crate::DType;
use crate::kernels;
use crate::reference::{self, Tolerance};

pub(super) fn cases(v: &mut Vec<Case>) {
    for (name, kind) in [
        (
            "adam",
            kernels::optim::OptimizerKind::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 1e-2,
            },
        ),
        (
            "sgd",
            kernels::optim::OptimizerKind::Sgd {
                momentum: 0.9,
                dampening: 0.1,
                nesterov: false,
                weight_decay: 1e-2,
            },
        ),
        (
            "sgd",
            kernels::optim::OptimizerKind::Sgd {
                momentum: 0.9,
                dampening: 0.0,
                nesterov: true,
                weight_decay: 0.0,
            },
        ),
    ] {
        v.push(Case::new(
            "optimizer",
            name,
            format!("3 steps [1000] {kind:?}"),
            move |gpu, rng| {
                let n = 1000;
                let p0 = rng.vec_uniform(n, -1.0, 1.0);
                let pt = gpu.upload_f32("param", &[n], &p0)?;
                let (m, vv) = (
                    gpu.zeros("m", &[n], DType::F32)?,
                    gpu.zeros("v", &[n], DType::F32)?,
                );
                let step = gpu.zeros("step", &[kernels::loss::STEP_WORDS], DType::U32)?;
                let (mut p, mut mr, mut vr) = (f64s(&p0), vec![0.0; n], vec![0.0; n]);
                let lr = 0.01;
                for t in 1..=3u32 {
                    let g = rng.vec_uniform(n, -1.0, 1.0);
                    let gt = gpu.upload_f32("grad", &[n], &g)?;
                    let values = crate::train::optimizer::step_values(&kind, t, lr, 0);
                    gpu.write(&step, &[values])?;
                    let op = kernels::optim::update(gpu, &kind, &step, &pt, &gt, &m, &vv)?;
                    gpu.submit("selftest", &[op])?;
                    match kind {
                        kernels::optim::OptimizerKind::Adam {
                            beta1,
                            beta2,
                            eps,
                            weight_decay,
                        } => reference::optim::adam(
                            &mut p,
                            &f64s(&g),
                            &mut mr,
                            &mut vr,
                            t,
                            lr,
                            (beta1 as f64, beta2 as f64, eps as f64, weight_decay as f64),
                        ),
                        kernels::optim::OptimizerKind::Sgd {
                            momentum,
                            dampening,
                            nesterov,
                            weight_decay,
                        } => reference::optim::sgd(
                            &mut p,
                            &f64s(&g),
                            &mut mr,
                            t,
                            lr,
                            (
                                momentum as f64,
                                dampening as f64,
                                nesterov,
                                weight_decay as f64,
                            ),
                        ),
                    }
                }
                let got = gpu.read_f32(&pt)?;
                Ok(vec![(
                    "param after 3 steps".into(),
                    reference::compare(&got, &p, Tolerance::new(1e-6, 1e-5)),
                )])
            },
        ));
    }
}
