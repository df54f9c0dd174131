//! The integer engine's IAO ops against the CPU reference: random models with every one of them
//! (quantize, IAO convs writing codes and floats, requantize, max-pool of codes, a grouped conv,
//! QuantAdd), symmetric and asymmetric spaces, per-channel weight offsets, padding, and a
//! 3-channel input padded to a word.

use super::Case;
use crate::infer::IntModel;
use crate::infer::model::{CodeSpace, IaoConv, IntNode, IntOp, Manifest};
use crate::nn::checkpoint::{Data, Named};
use crate::rng::Rng;
use std::collections::HashMap;

fn sym(scale: f32) -> CodeSpace {
    CodeSpace {
        scale,
        zero_point: 0.0,
        qmin: -128.0,
        qmax: 127.0,
    }
}

fn asym(scale: f32, zero_point: f32) -> CodeSpace {
    CodeSpace {
        scale,
        zero_point,
        qmin: 0.0,
        qmax: 255.0,
    }
}

/// A conv `name` of `cin` → `cout` (3×3, padding 1) with random 8-bit weight codes (rows padded
/// to words with code 0), per-channel offsets, scales and biases.
#[allow(clippy::too_many_arguments)]
fn conv(
    rng: &mut Rng,
    tensors: &mut HashMap<String, Named>,
    name: &str,
    (cin, cout, groups): (usize, usize, usize),
    input: CodeSpace,
    output: Option<CodeSpace>,
    relu: bool,
) -> IntOp {
    let cig = cin / groups;
    let row = cig.next_multiple_of(4);
    let mut codes = Vec::new();
    for _ in 0..cout * 9 {
        for c in 0..row {
            codes.push(if c < cig {
                (rng.uniform(0.0, 254.99) as u8).min(254)
            } else {
                0
            });
        }
    }
    let put = |t: &mut HashMap<String, Named>, key: String, v: Vec<f32>| {
        t.insert(key.clone(), Named::f32(key, &[v.len()], v));
    };
    let key = format!("{name}.weight_codes");
    tensors.insert(
        key.clone(),
        Named {
            name: key,
            shape: vec![codes.len()],
            data: Data::U8(codes),
        },
    );
    // Symmetric channels (offset −127) and asymmetric ones (an offset in −254..0).
    let zero: Vec<f32> = (0..cout)
        .map(|o| {
            if o % 2 == 0 {
                -127.0
            } else {
                -rng.uniform(0.0, 254.0).floor()
            }
        })
        .collect();
    put(tensors, format!("{name}.weight_zero"), zero);
    put(
        tensors,
        format!("{name}.scale"),
        rng.vec_uniform(cout, 1e-5, 4e-5),
    );
    put(
        tensors,
        format!("{name}.bias"),
        rng.vec_uniform(cout, -0.5, 0.5),
    );
    let key = format!("{name}.bias_int");
    tensors.insert(
        key.clone(),
        Named {
            name: key,
            shape: vec![cout],
            data: Data::I64(
                (0..cout)
                    .map(|_| rng.uniform(-3000.0, 3000.0) as i64)
                    .collect(),
            ),
        },
    );
    IntOp::Conv {
        name: name.into(),
        cin,
        cout,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups,
        weight_bits: Some(8),
        input_bits: Some(8),
        relu,
        output_bits: output.map(|_| 8),
        iao: Some(IaoConv { input, output }),
    }
}

/// A random IAO model on a 3×9×9 input; `residual`: the second conv writes codes and a QuantAdd
/// sums them with the max-pool's output requantized to the add's space (then a ReLU, floats).
pub fn random_iao_int_model(rng: &mut Rng, residual: bool) -> IntModel {
    let mut tensors = HashMap::new();
    let (s0, s1, s2, s3) = (sym(0.03), asym(0.02, -40.0), sym(0.05), asym(0.04, -3.0));
    // (op, the edges it reads): edge 0 the image, edge k + 1 op k's output.
    let mut ops: Vec<(IntOp, Vec<usize>)> = vec![
        (IntOp::IaoQuantize { to: s0 }, vec![0]),
        (
            conv(rng, &mut tensors, "c1", (3, 8, 1), s0, Some(s1), true),
            vec![1],
        ),
        (
            IntOp::MaxPool {
                kernel: [2, 2],
                stride: [2, 2],
                padding: [0, 0],
            },
            vec![2],
        ),
        (IntOp::IaoRequant { from: s1, to: s2 }, vec![3]),
        (
            conv(
                rng,
                &mut tensors,
                "c2",
                (8, 8, 2),
                s2,
                residual.then_some(s3),
                false,
            ),
            vec![4],
        ),
    ];
    if residual {
        ops.push((IntOp::IaoRequant { from: s1, to: s3 }, vec![3]));
        ops.push((
            IntOp::IaoAdd {
                space: s3,
                relu: true,
                output: None,
            },
            vec![5, 6],
        ));
    }
    let n = ops.len();
    ops.push((
        IntOp::AvgPool {
            kernel: [4, 4],
            stride: [4, 4],
            padding: [0, 0],
        },
        vec![n],
    ));
    ops.push((IntOp::Flatten, vec![n + 1]));
    let ops = ops
        .into_iter()
        .map(|(op, inputs)| IntNode { op, inputs })
        .collect();
    IntModel {
        manifest: Manifest::new("random iao", [3, 9, 9], 8, ops),
        tensors,
    }
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for (batch, residual) in [(1usize, false), (4, true)] {
        v.push(Case::new(
            "int_engine",
            "forward",
            format!(
                "random IAO model{}, batch {batch}",
                if residual { " with a QuantAdd" } else { "" }
            ),
            move |gpu, rng| {
                let model = random_iao_int_model(rng, residual);
                super::int::engine_against_reference(gpu, rng, model, batch)
            },
        ));
    }
}
