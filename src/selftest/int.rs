//! The integer inference engine on random models against its CPU reference.

use super::{Case, f64s};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::quant::Bits;
use crate::reference::{self, Report, Tolerance};
use crate::rng::Rng;

/// A random folded conv (ReLU on) of `bits`-bit weight codes (None: float weights) reading
/// `input_bits`-bit codes (None: floats).
#[allow(clippy::too_many_arguments)]
fn random_folded_conv(
    rng: &mut Rng,
    name: &str,
    cin: usize,
    cout: usize,
    k: usize,
    pad: usize,
    groups: usize,
    bits: Option<u32>,
    input_bits: Option<u32>,
) -> crate::infer::fold::FoldedOp {
    use crate::infer::fold::{FoldedConv, FoldedOp, Weights};
    let n = cout * cin / groups * k * k;
    let weights = match bits {
        Some(b) => Weights::Codes {
            bits: Bits::new(b).expect("bits"),
            codes: (0..n).map(|_| rng.below((1 << b) as u64) as u8).collect(),
        },
        None => Weights::Float(rng.vec_uniform(n, -0.5, 0.5)),
    };
    FoldedOp::Conv(FoldedConv {
        name: name.into(),
        cin,
        cout,
        kernel: (k, k),
        stride: (1, 1),
        padding: (pad, pad),
        dilation: (1, 1),
        groups,
        linear: false,
        weights,
        input_bits: input_bits.map(|b| Bits::new(b).expect("bits")),
        a: rng.vec_uniform(cout, 0.5, 3.0),
        b: rng.vec_uniform(cout, -0.5, 1.5),
        relu: true,
    })
}

/// `op` (a conv) changed by `f`: e.g. without its ReLU, or as a Linear.
fn edited(
    op: crate::infer::fold::FoldedOp,
    f: impl FnOnce(&mut crate::infer::fold::FoldedConv),
) -> crate::infer::fold::FoldedOp {
    match op {
        crate::infer::fold::FoldedOp::Conv(mut c) => {
            f(&mut c);
            crate::infer::fold::FoldedOp::Conv(c)
        }
        other => other,
    }
}

/// A random model in inference form that takes every path of the integer engine: a float first
/// conv requantized to codes, max-pool and shuffle of codes, grouped 8-bit and 4-bit quantized
/// convs, a float output through max-pool and avg-pool, flatten and a float Linear. With
/// `quantized_first`, the first conv takes 6-bit codes of the image (a quantize op, weight rows
/// padded from 3 channels to 4) with 5-bit weights.
pub(super) fn random_int_model(rng: &mut Rng, quantized_first: bool) -> crate::infer::IntModel {
    use crate::infer::fold::{Folded, FoldedOp};
    let conv = random_folded_conv;
    let mut ops = vec![
        if quantized_first {
            conv(rng, "c0", 3, 8, 3, 1, 1, Some(5), Some(6))
        } else {
            conv(rng, "c0", 3, 8, 3, 1, 1, None, None)
        },
        FoldedOp::MaxPool {
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
        },
        FoldedOp::Shuffle { groups: 2 },
        conv(rng, "c1", 8, 12, 3, 1, 2, Some(8), Some(8)),
        conv(rng, "c2", 12, 8, 1, 0, 1, Some(4), Some(4)),
        FoldedOp::MaxPool {
            kernel: (3, 3),
            stride: (1, 1),
            padding: (1, 1),
        },
        FoldedOp::AvgPool {
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
        },
        FoldedOp::Flatten,
    ];
    ops.push(edited(conv(rng, "fc", 32, 10, 1, 0, 1, None, None), |c| {
        (c.linear, c.relu) = (true, false)
    }));
    crate::infer::IntModel::from_folded(&Folded::chain("random", [3, 9, 9], ops))
        .expect("a valid model")
}

/// A random residual model in inference form: a float stem; a block with an identity shortcut
/// (its input read as codes by the body and as floats by the add, so a quantize op comes
/// between); a block whose body and 1x1 shortcut conv both read the first add's output as codes
/// (the add writes codes); then average pooling, flatten and a quantized Linear.
pub(super) fn random_residual_int_model(rng: &mut Rng) -> crate::infer::IntModel {
    use crate::infer::fold::{Folded, FoldedNode, FoldedOp};
    let conv = random_folded_conv;
    let q8 = (Some(8), Some(8));
    let ops = [
        (conv(rng, "stem", 3, 8, 3, 1, 1, None, None), vec![0]),
        (conv(rng, "a.body.0", 8, 8, 3, 1, 1, q8.0, q8.1), vec![1]),
        (
            edited(
                conv(rng, "a.body.1", 8, 8, 3, 1, 2, Some(4), Some(8)),
                |c| c.relu = false,
            ),
            vec![2],
        ),
        (FoldedOp::Add { relu: true }, vec![3, 1]),
        (conv(rng, "b.body.0", 8, 12, 3, 1, 1, q8.0, q8.1), vec![4]),
        (
            edited(conv(rng, "b.body.1", 12, 12, 1, 0, 1, q8.0, Some(8)), |c| {
                c.relu = false
            }),
            vec![5],
        ),
        (
            edited(conv(rng, "b.shortcut", 8, 12, 1, 0, 1, q8.0, q8.1), |c| {
                c.relu = false
            }),
            vec![4],
        ),
        (FoldedOp::Add { relu: true }, vec![6, 7]),
        (
            FoldedOp::AvgPool {
                kernel: (9, 9),
                stride: (9, 9),
                padding: (0, 0),
            },
            vec![8],
        ),
        (FoldedOp::Flatten, vec![9]),
        (
            edited(conv(rng, "fc", 12, 10, 1, 0, 1, Some(4), Some(4)), |c| {
                (c.linear, c.relu) = (true, false)
            }),
            vec![10],
        ),
    ];
    crate::infer::IntModel::from_folded(&Folded {
        model: "random residual".into(),
        input: [3, 9, 9],
        ops: ops
            .into_iter()
            .map(|(op, inputs)| FoldedNode { op, inputs })
            .collect(),
    })
    .expect("a valid model")
}

/// The integer engine's logits for `batch` random images against its CPU reference's. Integer
/// sums are exact; the epilogue is one multiply-add per value, which a GPU may fuse: codes then
/// agree except at exact rounding ties.
pub(super) fn engine_against_reference(
    gpu: &Gpu,
    rng: &mut Rng,
    model: crate::infer::IntModel,
    batch: usize,
) -> Result<Vec<(String, Report)>> {
    let n = batch * model.manifest.input.iter().product::<usize>();
    let x = rng.vec_uniform(n, -2.0, 2.0);
    let engine = crate::infer::IntEngine::new(gpu, model.clone(), batch)?;
    let got = engine.run(gpu, &x)?;
    let want = f64s(&reference::intinfer::run(&model, &x)?);
    Ok(vec![(
        "logits".into(),
        reference::compare(&got, &want, Tolerance::new(1e-5, 1e-5)),
    )])
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for batch in [1usize, 4] {
        v.push(Case::new(
            "int_engine",
            "forward",
            format!("random residual model, batch {batch}"),
            move |gpu, rng| {
                let model = random_residual_int_model(rng);
                engine_against_reference(gpu, rng, model, batch)
            },
        ));
    }
    for (batch, qfirst) in [(1usize, false), (5, false), (3, true)] {
        let what = if qfirst {
            "quantized first layer"
        } else {
            "float first layer"
        };
        v.push(Case::new(
            "int_engine",
            "forward",
            format!("random model, {what}, batch {batch}"),
            move |gpu, rng| {
                let model = random_int_model(rng, qfirst);
                engine_against_reference(gpu, rng, model, batch)
            },
        ));
    }
}
