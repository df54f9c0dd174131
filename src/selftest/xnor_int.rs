//! The integer engine's binary ops against the CPU reference: a random model with a float conv,
//! sign-packing to bits, binary and ternary XNOR convs (a grouped one whose groups start inside
//! a word, channel counts that are not multiples of 32, padding), max-pool and shuffle of bits,
//! and unpacking to floats.

use super::Case;
use crate::infer::IntModel;
use crate::infer::model::{IntNode, IntOp, Manifest, pack_plane};
use crate::nn::checkpoint::{Data, Named};
use crate::rng::Rng;
use std::collections::HashMap;

fn put(tensors: &mut HashMap<String, Named>, key: String, shape: &[usize], v: Vec<f32>) {
    tensors.insert(key.clone(), Named::f32(key, shape, v));
}

/// An XNOR conv `name` of `cin` → `cout` (3×3, padding 1, `groups`) with random bit planes
/// (ternary: disjoint +1 and −1 planes), scales and biases of either sign.
fn xnor_conv(
    rng: &mut Rng,
    tensors: &mut HashMap<String, Named>,
    name: &str,
    (cin, cout, groups): (usize, usize, usize),
    ternary: bool,
    sign: bool,
) -> IntOp {
    let (cig, taps) = (cin / groups, cout * 9);
    // Per (tap, channel): +1, −1 (ternary only; binary's 0 bit) or 0 (ternary).
    let draws: Vec<f32> = (0..taps * cig).map(|_| rng.uniform(0.0, 1.0)).collect();
    let draw = |t: usize, ci: usize| draws[t * cig + ci];
    let pos = pack_plane(taps, cig, |t, ci| {
        let r = draw(t, ci);
        (0.3..0.65).contains(&r) || (!ternary && r < 0.3)
    });
    let neg = pack_plane(taps, cig, |t, ci| ternary && draw(t, ci) < 0.3);
    let planes: &[(&str, &Vec<u8>)] = if ternary {
        &[("weight_bits", &pos), ("weight_bits_neg", &neg)]
    } else {
        &[("weight_bits", &pos)]
    };
    for (suffix, p) in planes {
        let key = format!("{name}.{suffix}");
        tensors.insert(
            key.clone(),
            Named {
                name: key,
                shape: vec![p.len()],
                data: Data::U8(p.to_vec()),
            },
        );
    }
    let scale = (0..cout)
        .map(|_| {
            rng.uniform(0.01, 0.1)
                * if rng.uniform(0.0, 1.0) < 0.2 {
                    -1.0
                } else {
                    1.0
                }
        })
        .collect();
    put(tensors, format!("{name}.scale"), &[cout], scale);
    put(
        tensors,
        format!("{name}.bias"),
        &[cout],
        rng.vec_uniform(cout, -0.5, 0.5),
    );
    IntOp::XnorConv {
        name: name.into(),
        cin,
        cout,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups,
        ternary,
        sign,
    }
}

/// A random binary model on a 3×9×9 input: float conv → sign → binary XNOR conv (40 → 40) →
/// max-pool → shuffle(2) → ternary grouped XNOR conv (40 → 40, groups of 20) → bits (`bits_out`,
/// then unpacked) or floats → average pool.
pub fn random_xnor_int_model(rng: &mut Rng, bits_out: bool) -> IntModel {
    let mut tensors = HashMap::new();
    let c = 40;
    put(
        &mut tensors,
        "c0.weight".into(),
        &[c, 3, 3, 3],
        rng.vec_uniform(c * 27, -0.5, 0.5),
    );
    put(&mut tensors, "c0.scale".into(), &[c], vec![1.0; c]);
    put(
        &mut tensors,
        "c0.bias".into(),
        &[c],
        rng.vec_uniform(c, -0.2, 0.2),
    );
    let mut ops = vec![
        IntOp::Conv {
            name: "c0".into(),
            cin: 3,
            cout: c,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
            weight_bits: None,
            input_bits: None,
            relu: false,
            output_bits: None,
            iao: None,
        },
        IntOp::SignPack,
        xnor_conv(rng, &mut tensors, "c1", (c, c, 1), false, true),
        IntOp::MaxPool {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
        },
        IntOp::Shuffle { groups: 2 },
        xnor_conv(rng, &mut tensors, "c2", (c, c, 2), true, bits_out),
    ];
    if bits_out {
        ops.push(IntOp::Unpack);
    }
    ops.push(IntOp::AvgPool {
        kernel: [4, 4],
        stride: [4, 4],
        padding: [0, 0],
    });
    ops.push(IntOp::Flatten);
    let ops = ops
        .into_iter()
        .enumerate()
        .map(|(k, op)| IntNode {
            op,
            inputs: vec![k],
        })
        .collect();
    IntModel {
        manifest: Manifest::new("random xnor", [3, 9, 9], c, ops),
        tensors,
    }
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for (batch, bits_out) in [(1usize, true), (3, false)] {
        v.push(Case::new(
            "int_engine",
            "forward",
            format!(
                "random binary/ternary XNOR model ({} out), batch {batch}",
                if bits_out { "bits" } else { "floats" }
            ),
            move |gpu, rng| {
                let model = random_xnor_int_model(rng, bits_out);
                super::int::engine_against_reference(gpu, rng, model, batch)
            },
        ));
    }
}
