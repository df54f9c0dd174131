//! IAO quantizer cases: observer, scale and zero point, forward and backward of activation and
//! weight quantizers, per tensor and per channel, over two training calls (the first copies the
//! range, the second updates it) and an evaluation call (nothing updates). All exact.

use super::{Case, bits, f64s};
use crate::DType;
use crate::kernels::iao::IaoQuantizer;
use crate::quant::iao::{Observer, Operand, Percentile, QType, Spec};
use crate::reference::iao::IaoState;
use crate::reference::{self, Tolerance};
use crate::rng::Rng;

struct Setup {
    name: &'static str,
    /// PTQ's histogram observer at this percentile.
    histogram: Option<f64>,
    bits: u32,
    q_type: QType,
    operand: Operand,
    observer: Observer,
    shape: &'static [usize],
    per_channel: bool,
}

const SETUPS: &[Setup] = &[
    Setup {
        name: "act histogram 0.999999 (k = n - 1)",
        histogram: Some(0.999999),
        bits: 8,
        q_type: QType::Symmetric,
        operand: Operand::Activation,
        observer: Observer::MovingAverage,
        shape: &[9000],
        per_channel: false,
    },
    Setup {
        name: "act histogram 0.9",
        histogram: Some(0.9),
        bits: 4,
        q_type: QType::Symmetric,
        operand: Operand::Activation,
        observer: Observer::MovingAverage,
        shape: &[2, 5, 7, 3],
        per_channel: false,
    },
    Setup {
        histogram: None,
        name: "act sym",
        bits: 8,
        q_type: QType::Symmetric,
        operand: Operand::Activation,
        observer: Observer::MovingAverage,
        shape: &[9000],
        per_channel: false,
    },
    Setup {
        histogram: None,
        name: "act asym",
        bits: 4,
        q_type: QType::Asymmetric,
        operand: Operand::Activation,
        observer: Observer::MovingAverage,
        shape: &[2, 5, 7, 3],
        per_channel: false,
    },
    Setup {
        histogram: None,
        name: "conv weight sym C minmax",
        bits: 8,
        q_type: QType::Symmetric,
        operand: Operand::Weight,
        observer: Observer::MinMax,
        shape: &[16, 8, 3, 3],
        per_channel: true,
    },
    Setup {
        histogram: None,
        name: "linear weight asym FC minmax",
        bits: 4,
        q_type: QType::Asymmetric,
        operand: Operand::Weight,
        observer: Observer::MinMax,
        shape: &[10, 20],
        per_channel: true,
    },
    Setup {
        histogram: None,
        name: "conv weight sym L moving-average",
        bits: 4,
        q_type: QType::Symmetric,
        operand: Operand::Weight,
        observer: Observer::MovingAverage,
        shape: &[16, 8, 3, 3],
        per_channel: false,
    },
    Setup {
        histogram: None,
        name: "weight asym C moving-average, 3 blocks a row",
        bits: 8,
        q_type: QType::Asymmetric,
        operand: Operand::Weight,
        observer: Observer::MovingAverage,
        shape: &[3, 9000],
        per_channel: true,
    },
    // The observer's two ways of merging rows: a row of more than 16 blocks by the whole
    // workgroup, and more rows than invocations, one per invocation.
    Setup {
        histogram: None,
        name: "act sym, 18 blocks",
        bits: 8,
        q_type: QType::Symmetric,
        operand: Operand::Activation,
        observer: Observer::MovingAverage,
        shape: &[17 * 4096 + 5],
        per_channel: false,
    },
    Setup {
        histogram: None,
        name: "linear weight sym C minmax, 300 rows",
        bits: 8,
        q_type: QType::Symmetric,
        operand: Operand::Weight,
        observer: Observer::MinMax,
        shape: &[300, 7],
        per_channel: true,
    },
];

/// Inputs with exact ties for the rounding: some elements on the codes of the first call's
/// scale, some half-way between, zeros and a per-row constant stretch.
fn inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut x = rng.vec_uniform(n, -2.0, 3.0);
    for i in (0..n).step_by(7) {
        x[i] = 0.0;
    }
    for i in (3..n).step_by(11) {
        x[i] = (x[i] * 64.0).round() / 128.0;
    }
    x
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for s in SETUPS {
        v.push(Case::new(
            "iao_quant",
            "observe, forward, backward",
            format!(
                "{} {}{} {:?}",
                s.name,
                if s.operand == Operand::Weight {
                    "w"
                } else {
                    "a"
                },
                s.bits,
                s.shape
            ),
            move |gpu, rng| {
                let b = bits(s.bits);
                let n: usize = s.shape.iter().product();
                let rows = if s.per_channel { s.shape[0] } else { 1 };
                let spec = Spec {
                    bits: b,
                    q_type: s.q_type,
                    operand: s.operand,
                    observer: s.observer,
                    per_channel: s.per_channel,
                    histogram: s.histogram.map(Percentile),
                };
                let q = IaoQuantizer::new(gpu, "selftest", spec, s.shape)?;
                let mut cpu = IaoState::new(spec, rows);
                let state = gpu.upload_f32("state", &[q.state_len()], &q.initial_state())?;
                let x1 = inputs(rng, n);
                // The second call: wider on one side, narrower on the other, so both the range
                // update and the clip-STE's mask show.
                let x2: Vec<f32> = x1.iter().map(|v| v * 1.25 - 0.3).collect();
                let dy = rng.vec_uniform(n, -1.0, 1.0);
                let mut out = Vec::new();
                for (call, (x, train)) in [(&x1, true), (&x2, true), (&x1, false)]
                    .into_iter()
                    .enumerate()
                {
                    let xt = gpu.upload_f32("x", s.shape, x)?;
                    let dyt = gpu.upload_f32("dy", s.shape, &dy)?;
                    let y = gpu.empty("y", s.shape, DType::F32)?;
                    let dx = gpu.empty("dx", s.shape, DType::F32)?;
                    let d_in_place = gpu.upload_f32("dy, then dx", s.shape, &dy)?;
                    let y_in_place = gpu.upload_f32("x, then y", s.shape, x)?;
                    // The one-pass forms: mask and requantize in place, mask and quantize.
                    let d_requant = gpu.upload_f32("dy, then dx", s.shape, &dy)?;
                    let y_requant = gpu.upload_f32("x, then y", s.shape, x)?;
                    let d_quant = gpu.upload_f32("dy, then dx", s.shape, &dy)?;
                    let y_quant = gpu.empty("y", s.shape, DType::F32)?;
                    let mut ops = Vec::new();
                    if train {
                        ops.extend(q.observe(gpu, &state, &xt)?);
                        cpu.observe(x);
                    }
                    ops.push(q.forward(gpu, &state, &xt, &y)?);
                    ops.push(q.backward(gpu, &state, &xt, &dyt, &dx)?);
                    ops.push(q.backward_in_place(gpu, &state, &xt, &d_in_place)?);
                    ops.push(q.forward_in_place(gpu, &state, &y_in_place)?);
                    ops.push(q.backward_requantize(gpu, &state, &y_requant, &d_requant)?);
                    ops.push(q.backward_quantize(gpu, &state, &xt, &d_quant, &y_quant)?);
                    let got: Vec<Vec<f32>> = gpu.run_and_read(
                        "selftest",
                        &ops,
                        &[
                            &y,
                            &dx,
                            &d_in_place,
                            &state,
                            &y_in_place,
                            &d_requant,
                            &y_requant,
                            &d_quant,
                            &y_quant,
                        ],
                    )?;
                    let want_dx = f64s(&cpu.backward(x, &dy));
                    let tag = ["call 1", "call 2", "eval"][call];
                    out.push((
                        format!("{tag} state"),
                        reference::compare(&got[3], &f64s(&cpu.words()), Tolerance::EXACT),
                    ));
                    out.push((
                        format!("{tag} y in place"),
                        reference::compare(&got[4], &f64s(&cpu.forward(x)), Tolerance::EXACT),
                    ));
                    out.push((
                        format!("{tag} y"),
                        reference::compare(&got[0], &f64s(&cpu.forward(x)), Tolerance::EXACT),
                    ));
                    out.push((
                        format!("{tag} dx"),
                        reference::compare(&got[1], &want_dx, Tolerance::EXACT),
                    ));
                    out.push((
                        format!("{tag} dx in place"),
                        reference::compare(&got[2], &want_dx, Tolerance::EXACT),
                    ));
                    let want_y = f64s(&cpu.forward(x));
                    for (what, i, want) in [
                        ("dx, requantized", 5, &want_dx),
                        ("y, requantized", 6, &want_y),
                        ("dx, quantized", 7, &want_dx),
                        ("y, quantized", 8, &want_y),
                    ] {
                        out.push((
                            format!("{tag} {what}"),
                            reference::compare(&got[i], want, Tolerance::EXACT),
                        ));
                    }
                }
                Ok(out)
            },
        ));
    }
}
