//! The integer model of a binary/ternary network (micronet's wbwtab, spec §6): binary activations
//! travel as bits, 32 channels per word, and a conv with binary weights (stored 1 bit each,
//! ternary 2) computes
//! `dot = K − 2·popcount(a XOR w)` (ternary: two bit planes), then `z = dot·α·A + (A·b + B)` with
//! the BatchNorm after it folded in (A = γ/√(σ²+ε), B = β − A·μ) and the binary activation as the
//! sign of z, as `sign(γ(y − μ)/σ + β)` is for either sign of γ, and sign(β) for γ = 0 (spec §6.6
//! divides by γ instead, which that case breaks). The first and last convs and Linear layers stay
//! float (their weights as they are, ±1 inputs unpacked from bits), as wbwtab trains them.

use super::model::{
    self, IntModel, IntNode, IntOp, Manifest, linear_to_channels_last, pair, to_channels_last,
};
use super::qdq::State;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::LayerSpec;
use crate::models::spec::ConvWindow;
use crate::nn::Network;
use crate::nn::checkpoint::{Data, Named};
use crate::quant::Scheme;
use crate::quant::wbwtab::{self as wb, Weights};
use std::collections::HashMap;

/// The integer model of wbwtab network `net` (weights read from the GPU).
pub fn int_model(gpu: &Gpu, net: &Network) -> Result<IntModel> {
    let Scheme::Wbwtab(o) = net.quant.scheme else {
        return Err(Error::Invalid("not a wbwtab network".into()));
    };
    let graph = &net.graph;
    if !graph.is_chain() {
        return Err(Error::Invalid(
            "integer export of wbwtab handles chains of layers (micronet's wbwtab trains NIN and NIN-GC)".into(),
        ));
    }
    let state: State = net
        .state_dict(gpu)?
        .into_iter()
        .filter_map(|t| match t.data {
            Data::F32(v) => Some((t.name, (t.shape, v))),
            _ => None,
        })
        .collect();
    let binary_layers = net.wbwtab_layers();
    let signs = net.binary_activations();
    let nodes = &graph.nodes;
    let unsupported = |i: usize, why: &str| {
        Error::Invalid(format!(
            "cannot export layer {} ({}): {why}",
            nodes[i].name,
            nodes[i].layer.kind()
        ))
    };
    let get = |key: &str| -> Result<&Vec<f32>> {
        state
            .get(key)
            .map(|t| &t.1)
            .ok_or_else(|| Error::Invalid(format!("the model has no tensor {key} to export")))
    };
    let mut ops: Vec<IntNode> = Vec::new();
    let mut tensors: HashMap<String, Named> = HashMap::new();
    let push = |ops: &mut Vec<IntNode>, op: IntOp| {
        let k = ops.len();
        ops.push(IntNode {
            op,
            inputs: vec![k],
        });
    };
    let input = [graph.input[0], graph.input[1], graph.input[2]];
    let mut shape = (input[0], input[1], input[2]);
    let mut flattened_from: Option<(usize, usize, usize)> = None;
    // Whether the current tensor is bits (else floats).
    let mut bits = false;
    let mut i = 0;
    while i < nodes.len() {
        let node = &nodes[i];
        let name = &node.name;
        match &node.layer {
            LayerSpec::Conv { bias, .. } | LayerSpec::Linear { bias, .. } => {
                let linear = matches!(node.layer, LayerSpec::Linear { .. });
                let ConvWindow {
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                } = node.layer.conv_window().expect("a conv or Linear");
                let (kh, kw) = kernel;
                let w_shape = &state
                    .get(&format!("{name}.weight"))
                    .ok_or_else(|| unsupported(i, "no weight"))?
                    .0;
                let cout = w_shape[0];
                let mut w = get(&format!("{name}.weight"))?.clone();
                let per = w.len() / cout;
                let b = if *bias {
                    get(&format!("{name}.bias"))?.clone()
                } else {
                    vec![0.0; cout]
                };
                // The BatchNorm that reads it, then the binary activation or ReLU after it.
                let mut last = i;
                let (mut a, mut bb) = (vec![1.0f32; cout], b.clone());
                if let Some(LayerSpec::BatchNorm { eps, .. }) = nodes.get(i + 1).map(|n| &n.layer) {
                    last = i + 1;
                    let bn = &nodes[i + 1].name;
                    let (g, be, m, v) = (
                        get(&format!("{bn}.weight"))?,
                        get(&format!("{bn}.bias"))?,
                        get(&format!("{bn}.running_mean"))?,
                        get(&format!("{bn}.running_var"))?,
                    );
                    for c in 0..cout {
                        let ac = g[c] as f64 / (v[c] as f64 + *eps as f64).sqrt();
                        a[c] = ac as f32;
                        bb[c] = (ac * (b[c] as f64 - m[c] as f64) + be[c] as f64) as f32;
                    }
                }
                let next = nodes.get(last + 1).map(|n| &n.layer);
                // The ReLU after it is wbwtab's binary activation (a network layer of kind Sign).
                let sign = matches!(next, Some(LayerSpec::Relu)) && signs.contains(&(last + 1));
                let relu = matches!(next, Some(LayerSpec::Relu)) && !sign;
                if matches!(next, Some(LayerSpec::Relu)) {
                    last += 1;
                }
                let cin = node.in_shape[0];
                let cig = if linear { per } else { cin / groups };
                let quantized = binary_layers.contains(&name.as_str());
                if quantized && bits {
                    // A binary conv on bits: bit planes of its binary or ternary weights.
                    if relu {
                        return Err(unsupported(i, "a binary conv followed by a ReLU"));
                    }
                    let ternary = o.weights == Weights::Ternary;
                    let mut codes = vec![0.0f32; w.len()];
                    let mut alpha = vec![0.0f32; cout];
                    for (c, (ch, t)) in w.chunks_mut(per).zip(codes.chunks_mut(per)).enumerate() {
                        if ternary {
                            let (delta, al, _) = wb::ternary_params(ch);
                            alpha[c] = al;
                            for (t, &v) in t.iter_mut().zip(ch.iter()) {
                                *t = wb::ternary_code(v, delta);
                            }
                        } else {
                            wb::binary_centre(ch, cig);
                            alpha[c] = wb::binary_alpha(ch);
                            for (t, &v) in t.iter_mut().zip(ch.iter()) {
                                *t = wb::sign_pos(v);
                            }
                        }
                    }
                    // Weights are (Cout, Cin/g, kh, kw); a plane's bit for tap (c, ky, kx) and
                    // input channel ci.
                    let code = |tap: usize, ci: usize| {
                        let (c, k) = (tap / (kh * kw), tap % (kh * kw));
                        codes[c * per + ci * kh * kw + k]
                    };
                    let taps = cout * kh * kw;
                    let pos = model::pack_plane(taps, cig, |t, ci| code(t, ci) > 0.0);
                    let neg = model::pack_plane(taps, cig, |t, ci| ternary && code(t, ci) < 0.0);
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
                    let scale: Vec<f32> = (0..cout).map(|c| alpha[c] * a[c]).collect();
                    for (suffix, v) in [("scale", scale), ("bias", bb)] {
                        let key = format!("{name}.{suffix}");
                        tensors.insert(key.clone(), Named::f32(key, &[cout], v));
                    }
                    push(
                        &mut ops,
                        IntOp::XnorConv {
                            name: name.clone(),
                            cin,
                            cout,
                            kernel: pair(kernel),
                            stride: pair(stride),
                            padding: pair(padding),
                            dilation: pair(dilation),
                            groups,
                            ternary,
                            sign,
                        },
                    );
                    bits = sign;
                } else {
                    // A float conv: its weights as wbwtab uses them (quantized ones as Ŵ when
                    // the input is float), on ±1 floats where the input is bits.
                    if quantized {
                        for ch in w.chunks_mut(per) {
                            let wh = match o.weights {
                                Weights::Ternary => wb::ternary_forward(ch),
                                _ => {
                                    wb::binary_centre(ch, cig);
                                    wb::binary_forward(ch)
                                }
                            };
                            ch.copy_from_slice(&wh);
                        }
                    }
                    if bits {
                        push(&mut ops, IntOp::Unpack);
                    }
                    let cl = match (linear, flattened_from) {
                        (true, Some(from)) => linear_to_channels_last(&w, cout, from),
                        _ => to_channels_last(&w, cout, cig, kh, kw),
                    };
                    for (suffix, v, shape) in [
                        ("weight", cl, vec![cout, kh, kw, cig]),
                        ("scale", a.clone(), vec![cout]),
                        ("bias", bb.clone(), vec![cout]),
                    ] {
                        let key = format!("{name}.{suffix}");
                        tensors.insert(key.clone(), Named::f32(key, &shape, v));
                    }
                    push(
                        &mut ops,
                        IntOp::Conv {
                            name: name.clone(),
                            cin: if linear { shape.0 } else { cin },
                            cout,
                            kernel: pair(kernel),
                            stride: pair(stride),
                            padding: pair(padding),
                            dilation: pair(dilation),
                            groups,
                            weight_bits: None,
                            input_bits: None,
                            relu,
                            output_bits: None,
                            iao: None,
                        },
                    );
                    bits = false;
                    if sign {
                        push(&mut ops, IntOp::SignPack);
                        bits = true;
                    }
                }
                shape = if linear {
                    (cout, 1, 1)
                } else {
                    (
                        cout,
                        super::model::conv_axis(shape.1, kh, stride.0, padding.0, dilation.0),
                        super::model::conv_axis(shape.2, kw, stride.1, padding.1, dilation.1),
                    )
                };
                flattened_from = None;
                i = last + 1;
                continue;
            }
            LayerSpec::MaxPool { .. } | LayerSpec::AvgPool { .. } => {
                let pool = IntOp::pool(&node.layer).expect("a pool layer");
                let (oh, ow) = pool.pool_out(shape.1, shape.2);
                // Max-pool works on bits (an OR); an average needs the ±1 values.
                if bits && matches!(pool, IntOp::AvgPool { .. }) {
                    push(&mut ops, IntOp::Unpack);
                    bits = false;
                }
                push(&mut ops, pool);
                shape = (shape.0, oh, ow);
            }
            LayerSpec::Shuffle { groups } => push(&mut ops, IntOp::Shuffle { groups: *groups }),
            LayerSpec::Flatten => {
                if bits {
                    push(&mut ops, IntOp::Unpack);
                    bits = false;
                }
                push(&mut ops, IntOp::Flatten);
                flattened_from = Some(shape);
                shape = (shape.0 * shape.1 * shape.2, 1, 1);
            }
            _ => {
                return Err(unsupported(
                    i,
                    "only a BatchNorm and its activation right after a conv fold into it",
                ));
            }
        }
        i += 1;
    }
    if bits {
        push(&mut ops, IntOp::Unpack);
    }
    let manifest = Manifest::new(&net.spec.name, input, shape.0 * shape.1 * shape.2, ops);
    Ok(IntModel { manifest, tensors })
}
