//! The integer model of an IAO network (micronet's `wqaq/iao`, spec §5.2): 8-bit affine codes
//! between layers, int32 accumulation with packed 8-bit dot products, and micronet's graph of
//! quantizers made explicit. Each quantizer's codes are the bytes u = q − qmin of its code q;
//! a conv reads its own input quantizer's codes and writes, per output channel
//! `z = acc·s_a·s_w[o]·A[o] + B[o]` (its bias and a BatchNorm after it folded into A and B; a
//! `bn_fuse` conv's folded weight and bias), ReLU, and the codes of the quantizer that reads its
//! output next (a pool's, or the next conv's); a pool's codes are requantized to the next conv's
//! (`requant`: the value, then the next quantizer, in fake quantization's f32 steps), max-pooled
//! as codes (quantization is monotonic), or dequantized for an average pool.
//!
//! Chains of layers (NIN, NIN-GC) export; residual networks export to ONNX (`--format onnx`).

use super::model::{
    CodeSpace, FORMAT, IaoConv, IntModel, IntNode, IntOp, Manifest, conv_axis,
    linear_to_channels_last, pad_rows, pair, pool_axis, to_channels_last, weight_row,
};
use super::qdq::{State, quantizer, weight_and_bias};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::LayerSpec;
use crate::nn::Network;
use crate::nn::checkpoint::{Data, Named};
use crate::quant::Scheme;
use std::collections::HashMap;

/// The per-tensor quantizer stored at `prefix`, as the code space of its codes.
fn space(state: &State, prefix: &str) -> Result<Option<CodeSpace>> {
    Ok(quantizer(state, prefix)?.map(|q| CodeSpace {
        scale: q[0].scale,
        zero_point: q[0].zero_point,
        qmin: q[0].range.0,
        qmax: q[0].range.1,
    }))
}

fn act_space(state: &State, name: &str) -> Result<Option<CodeSpace>> {
    space(state, &format!("{name}.activation_quantizer"))
}

/// The integer model of IAO network `net` (weights and quantizer states read from the GPU).
pub fn int_model(gpu: &Gpu, net: &Network) -> Result<IntModel> {
    if !matches!(net.quant.scheme, Scheme::Iao(_)) {
        return Err(Error::Invalid("not an IAO network".into()));
    }
    let graph = &net.graph;
    if !graph.is_chain() {
        return Err(Error::Invalid(
            "integer export of IAO residual networks is not supported yet: export them with `--format onnx` (QDQ)".into(),
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
    let nodes = &graph.nodes;
    let unsupported = |i: usize, why: &str| {
        Error::Invalid(format!(
            "cannot export layer {} ({}): {why}",
            nodes[i].name,
            nodes[i].layer.kind()
        ))
    };
    // The code space that reads node i's output next: the first quantizer downstream through
    // shuffles and flattens (None: floats are read, or the model ends).
    let next_space = |i: usize| -> Result<Option<CodeSpace>> {
        for n in &nodes[i + 1..] {
            match n.layer {
                LayerSpec::Shuffle { .. } | LayerSpec::Flatten => continue,
                _ => return act_space(&state, &n.name),
            }
        }
        Ok(None)
    };
    let mut ops: Vec<IntNode> = Vec::new();
    let mut tensors: HashMap<String, Named> = HashMap::new();
    let input = [graph.input[0], graph.input[1], graph.input[2]];
    let mut shape = (input[0], input[1], input[2]);
    let mut flattened_from: Option<(usize, usize, usize)> = None;
    // The current edge and its codes' space (None: floats).
    let (mut cur, mut cur_space): (usize, Option<CodeSpace>) = (0, None);
    let push = |ops: &mut Vec<IntNode>, op: IntOp, from: usize| {
        ops.push(IntNode {
            op,
            inputs: vec![from],
        });
        ops.len()
    };
    // Brings the current edge to codes of `to` (quantizing floats, requantizing other codes).
    let into =
        |ops: &mut Vec<IntNode>, cur: usize, from: Option<CodeSpace>, to: CodeSpace| match from {
            Some(f) if f == to => cur,
            Some(f) => push(ops, IntOp::IaoRequant { from: f, to }, cur),
            None => push(ops, IntOp::IaoQuantize { to }, cur),
        };
    let mut i = 0;
    while i < nodes.len() {
        let node = &nodes[i];
        let name = &node.name;
        match &node.layer {
            LayerSpec::Conv { .. } | LayerSpec::Linear { .. } => {
                let linear = matches!(node.layer, LayerSpec::Linear { .. });
                let (kernel, stride, padding, dilation, groups) = match node.layer {
                    LayerSpec::Conv {
                        kernel,
                        stride,
                        padding,
                        dilation,
                        groups,
                        ..
                    } => (kernel.t(), stride.t(), padding.t(), dilation.t(), groups),
                    _ => ((1, 1), (1, 1), (0, 0), (1, 1), 1),
                };
                let s_in = act_space(&state, name)?
                    .ok_or_else(|| unsupported(i, "its input is not quantized"))?;
                let src = into(&mut ops, cur, cur_space, s_in);
                // The BatchNorm (not folded by bn_fuse) and the ReLU after it fold in.
                let mut last = i;
                let mut bn = None;
                if let Some(LayerSpec::BatchNorm { eps, .. }) =
                    nodes.get(last + 1).map(|n| &n.layer)
                {
                    last += 1;
                    if state.contains_key(&format!("{}.weight", nodes[last].name)) {
                        bn = Some((nodes[last].name.clone(), *eps));
                    }
                }
                let relu = matches!(nodes.get(last + 1).map(|n| &n.layer), Some(LayerSpec::Relu));
                if relu {
                    last += 1;
                }
                let fold_eps = match nodes.get(i + 1).map(|n| &n.layer) {
                    Some(LayerSpec::BatchNorm { eps, .. }) => *eps,
                    _ => 1e-5,
                };
                let ((w_shape, w), b) = weight_and_bias(&state, name, fold_eps)?;
                let cout = w_shape[0];
                let wq = quantizer(&state, &format!("{name}.weight_quantizer"))?
                    .ok_or_else(|| unsupported(i, "its weight is not quantized"))?;
                let per = w.len() / cout;
                let row_q = |o: usize| &wq[if wq.len() == 1 { 0 } else { o }];
                let (wqmin, wqmax) = wq[0].range;
                if wqmax - wqmin > 255.0 {
                    return Err(unsupported(
                        i,
                        "integer export supports weights of up to 8 bits",
                    ));
                }
                let codes: Vec<u8> = w
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| (row_q(j / per).code(v) - wqmin) as u8)
                    .collect();
                let z_w: Vec<f32> = (0..cout).map(|o| wqmin + row_q(o).zero_point).collect();
                let cin = node.in_shape[0];
                // Weights per output channel and tap (a Linear: all its input features).
                let cig = if linear { per } else { cin / groups };
                if s_in.qmax - s_in.qmin > 255.0 {
                    return Err(unsupported(
                        i,
                        "integer export supports activations of up to 8 bits",
                    ));
                }
                // Codes pack four channels per word: a group's channels, and a flattened
                // input's channels (the words of its pixels must abut), must fill whole words.
                let flat_channels = flattened_from.map_or(4, |f| f.0);
                if (groups > 1 && !cig.is_multiple_of(4))
                    || (linear && !flat_channels.is_multiple_of(4))
                {
                    return Err(unsupported(
                        i,
                        "integer inference packs four input channels per word; the channels per group are not a multiple of 4",
                    ));
                }
                // |acc| <= K (255 + |z_a|)(255 + |z_w|): bounded for i32.
                let k = (per as u64) * 4 * 255 * 255;
                if k >= i32::MAX as u64 {
                    return Err(unsupported(
                        i,
                        "too many inputs per output for 32-bit integer accumulation",
                    ));
                }
                let (kh, kw) = kernel;
                let cl = match (linear, flattened_from) {
                    (true, Some(from)) => linear_to_channels_last(&codes, cout, from),
                    _ => to_channels_last(&codes, cout, cig, kh, kw),
                };
                let packed = pad_rows(&cl, cig, weight_row(cig * groups, groups, true), 0);
                let key = format!("{name}.weight_codes");
                tensors.insert(
                    key.clone(),
                    Named {
                        name: key,
                        shape: vec![packed.len()],
                        data: Data::U8(packed),
                    },
                );
                // z = acc · s_a s_w[o] · A[o] + B[o].
                let (a, bb): (Vec<f32>, Vec<f32>) = match &bn {
                    Some((bn_name, eps)) => {
                        let get = |s: &str| -> Result<&Vec<f32>> {
                            state
                                .get(&format!("{bn_name}.{s}"))
                                .map(|t| &t.1)
                                .ok_or_else(|| unsupported(i, "its BatchNorm has no statistics"))
                        };
                        let (g, be, m, v) = (
                            get("weight")?,
                            get("bias")?,
                            get("running_mean")?,
                            get("running_var")?,
                        );
                        (0..cout)
                            .map(|o| {
                                let a = g[o] as f64 / (v[o] as f64 + *eps as f64).sqrt();
                                (
                                    a as f32,
                                    (a * (b[o] as f64 - m[o] as f64) + be[o] as f64) as f32,
                                )
                            })
                            .unzip()
                    }
                    None => (vec![1.0; cout], b.clone()),
                };
                let scale: Vec<f32> = (0..cout)
                    .map(|o| (s_in.scale as f64 * row_q(o).scale as f64 * a[o] as f64) as f32)
                    .collect();
                for (suffix, v) in [("scale", scale), ("bias", bb), ("weight_zero", z_w)] {
                    let key = format!("{name}.{suffix}");
                    tensors.insert(key.clone(), Named::f32(key, &[cout], v));
                }
                let out_space = next_space(last)?;
                let (oh, ow) = if linear {
                    (1, 1)
                } else {
                    (
                        conv_axis(shape.1, kh, stride.0, padding.0, dilation.0),
                        conv_axis(shape.2, kw, stride.1, padding.1, dilation.1),
                    )
                };
                let op = IntOp::Conv {
                    name: name.clone(),
                    cin: if linear { shape.0 } else { cin },
                    cout,
                    kernel: pair(kernel),
                    stride: pair(stride),
                    padding: pair(padding),
                    dilation: pair(dilation),
                    groups,
                    weight_bits: Some(8),
                    input_bits: Some(8),
                    relu,
                    output_bits: out_space.map(|_| 8),
                    iao: Some(IaoConv {
                        input: s_in,
                        output: out_space,
                    }),
                };
                cur = push(&mut ops, op, src);
                cur_space = out_space;
                shape = (cout, oh, ow);
                flattened_from = None;
                i = last + 1;
                continue;
            }
            LayerSpec::MaxPool {
                kernel,
                stride,
                padding,
            }
            | LayerSpec::AvgPool {
                kernel,
                stride,
                padding,
            } => {
                let s_p = act_space(&state, name)?
                    .ok_or_else(|| unsupported(i, "its input is not quantized"))?;
                cur = into(&mut ops, cur, cur_space, s_p);
                let stride = stride.unwrap_or(*kernel);
                let (k, st, pd) = (pair(kernel.t()), pair(stride.t()), pair(padding.t()));
                let max = matches!(node.layer, LayerSpec::MaxPool { .. });
                cur_space = if max {
                    cur = push(
                        &mut ops,
                        IntOp::MaxPool {
                            kernel: k,
                            stride: st,
                            padding: pd,
                        },
                        cur,
                    );
                    Some(s_p)
                } else {
                    // The average of the quantized values, in float.
                    cur = push(&mut ops, IntOp::IaoDequant { from: s_p }, cur);
                    cur = push(
                        &mut ops,
                        IntOp::AvgPool {
                            kernel: k,
                            stride: st,
                            padding: pd,
                        },
                        cur,
                    );
                    None
                };
                shape = (
                    shape.0,
                    pool_axis(shape.1, k[0], st[0], pd[0]),
                    pool_axis(shape.2, k[1], st[1], pd[1]),
                );
            }
            LayerSpec::Shuffle { groups } => {
                cur = push(&mut ops, IntOp::Shuffle { groups: *groups }, cur);
            }
            LayerSpec::Flatten => {
                cur = push(&mut ops, IntOp::Flatten, cur);
                flattened_from = Some(shape);
                shape = (shape.0 * shape.1 * shape.2, 1, 1);
            }
            // A BatchNorm folded into the conv before it (bn_fuse) is an identity.
            LayerSpec::BatchNorm { .. } if !state.contains_key(&format!("{name}.weight")) => {}
            _ => {
                return Err(unsupported(
                    i,
                    "only a BatchNorm and ReLU right after a conv fold into it",
                ));
            }
        }
        i += 1;
    }
    if let Some(s) = cur_space {
        cur = push(&mut ops, IntOp::IaoDequant { from: s }, cur);
    }
    let _ = cur;
    let classes = shape.0 * shape.1 * shape.2;
    let manifest = Manifest {
        format: FORMAT.into(),
        model: net.spec.name.clone(),
        input,
        mean: crate::data::MEAN,
        std: crate::data::STD,
        classes,
        class_names: if classes == crate::data::CLASSES {
            crate::data::CLASS_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            Vec::new()
        },
        layout: "NHWC".into(),
        ops,
    };
    Ok(IntModel { manifest, tensors })
}
