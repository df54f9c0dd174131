//! The integer model of an IAO network (micronet's `wqaq/iao`, spec §5.2): 8-bit affine codes
//! between layers, int32 accumulation with packed 8-bit dot products, and micronet's graph of
//! quantizers made explicit. Each quantizer's codes are the bytes u = q − qmin of its code q;
//! a conv reads its own input quantizer's codes and writes, per output channel
//! `z = s_a·s_w[o]·A[o]·(acc + b_q[o]) + B[o]` (its bias as int32 accumulator units b_q, a
//! BatchNorm after it as A and B; a `bn_fuse` conv's folded weight and bias), ReLU, and the codes of the quantizer that reads its
//! output next (a pool's, or the next conv's); a pool's codes are requantized to the next conv's
//! (`requant`: the value, then the next quantizer, in fake quantization's f32 steps), max-pooled
//! as codes (quantization is monotonic), or dequantized for an average pool.
//!
//! A residual block's add is micronet's QuantAdd: both summands as codes of the add's quantizer,
//! their values added, the block's ReLU, then the next quantizer's codes or floats.

use super::model::{
    CodeSpace, IaoConv, IntModel, IntNode, IntOp, Manifest, conv_axis, linear_to_channels_last,
    pad_rows, pair, to_channels_last, weight_row,
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

/// A tensor of the exported graph: its integer edge, its codes' space (None: floats), its
/// per-image (C, H, W), and the (C, H, W) a flattened tensor was flattened from.
#[derive(Clone, Copy)]
struct Tensor {
    edge: usize,
    space: Option<CodeSpace>,
    shape: (usize, usize, usize),
    flattened_from: Option<(usize, usize, usize)>,
}

/// The integer model of IAO network `net` (weights and quantizer states read from the GPU).
pub fn int_model(gpu: &Gpu, net: &Network) -> Result<IntModel> {
    if !matches!(net.quant.scheme, Scheme::Iao(_)) {
        return Err(Error::Invalid("not an IAO network".into()));
    }
    let graph = &net.graph;
    let state: State = net
        .state_dict(gpu)?
        .into_iter()
        .filter_map(|t| match t.data {
            Data::F32(v) => Some((t.name, (t.shape, v))),
            _ => None,
        })
        .collect();
    let nodes = &graph.nodes;
    let readers = graph.consumers();
    let unsupported = |i: usize, why: &str| {
        Error::Invalid(format!(
            "cannot export layer {} ({}): {why}",
            nodes[i].name,
            nodes[i].layer.kind()
        ))
    };
    // The one code space every reader of node i's output takes (through shuffles and
    // flattens), or None: floats (a reader takes floats, readers differ, or nothing reads it).
    fn wanted(
        state: &State,
        nodes: &[crate::models::graph::Node],
        readers: &[Vec<usize>],
        i: usize,
    ) -> Result<Option<CodeSpace>> {
        let mut want: Option<CodeSpace> = None;
        for &r in &readers[i] {
            let s = match nodes[r].layer {
                LayerSpec::Shuffle { .. } | LayerSpec::Flatten => wanted(state, nodes, readers, r)?,
                _ => act_space(state, &nodes[r].name)?,
            };
            match (s, want) {
                (None, _) => return Ok(None),
                (Some(s), Some(w)) if s != w => return Ok(None),
                (Some(s), _) => want = Some(s),
            }
        }
        Ok(want)
    }
    let mut ops: Vec<IntNode> = Vec::new();
    let mut tensors: HashMap<String, Named> = HashMap::new();
    let input = [graph.input[0], graph.input[1], graph.input[2]];
    let image = Tensor {
        edge: 0,
        space: None,
        shape: (input[0], input[1], input[2]),
        flattened_from: None,
    };
    // Per node: its output tensor (absorbed nodes alias their conv's or add's).
    let mut out: Vec<Option<Tensor>> = vec![None; nodes.len()];
    // (edge, space) to the edge holding that edge's codes in that space.
    let mut converted: HashMap<(usize, [u32; 4]), usize> = HashMap::new();
    let push = |ops: &mut Vec<IntNode>, op: IntOp, inputs: Vec<usize>| {
        ops.push(IntNode { op, inputs });
        ops.len()
    };
    let key = |s: &CodeSpace| {
        [
            s.scale.to_bits(),
            s.zero_point.to_bits(),
            s.qmin.to_bits(),
            s.qmax.to_bits(),
        ]
    };
    // A tensor as codes of `to` (quantizing floats, requantizing other codes; once per edge).
    let mut into = |ops: &mut Vec<IntNode>, t: Tensor, to: CodeSpace| -> usize {
        match t.space {
            Some(f) if f == to => t.edge,
            from => *converted
                .entry((t.edge, key(&to)))
                .or_insert_with(|| match from {
                    Some(f) => push(ops, IntOp::IaoRequant { from: f, to }, vec![t.edge]),
                    None => push(ops, IntOp::IaoQuantize { to }, vec![t.edge]),
                }),
        }
    };
    let source = |out: &[Option<Tensor>], s: crate::models::Source| match s {
        crate::models::Source::Input => Ok(image),
        crate::models::Source::Node(k) => out[k].ok_or_else(|| {
            Error::Invalid(format!("layer {} read before it is made", nodes[k].name))
        }),
    };
    for i in 0..nodes.len() {
        if out[i].is_some() {
            continue; // absorbed into the conv or add before it
        }
        let node = &nodes[i];
        let name = &node.name;
        let x = source(&out, node.inputs[0])?;
        // The ReLU that alone reads node k folds into it.
        let relu_after = |k: usize| match readers[k][..] {
            [r] if matches!(nodes[r].layer, LayerSpec::Relu) => Some(r),
            _ => None,
        };
        let t = match &node.layer {
            LayerSpec::Conv { .. } | LayerSpec::Linear { .. } => {
                let linear = matches!(node.layer, LayerSpec::Linear { .. });
                let crate::models::spec::ConvWindow {
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                } = node.layer.conv_window().expect("a conv or Linear");
                let s_in = act_space(&state, name)?
                    .ok_or_else(|| unsupported(i, "its input is not quantized"))?;
                let src = into(&mut ops, x, s_in);
                // The BatchNorm that alone reads it (kept, or folded by bn_fuse), and the ReLU.
                let mut last = i;
                let mut bn = None;
                let mut fold_eps = 1e-5;
                if let [r] = readers[i][..] {
                    if let LayerSpec::BatchNorm { eps, .. } = nodes[r].layer {
                        last = r;
                        fold_eps = eps;
                        if state.contains_key(&format!("{}.weight", nodes[r].name)) {
                            bn = Some((nodes[r].name.clone(), eps));
                        }
                    }
                }
                let relu = relu_after(last);
                if let Some(r) = relu {
                    last = r;
                }
                let ((w_shape, w), b) = weight_and_bias(&state, name, fold_eps)?;
                let cout = w_shape[0];
                let wq = quantizer(&state, &format!("{name}.weight_quantizer"))?
                    .ok_or_else(|| unsupported(i, "its weight is not quantized"))?;
                let per = w.len() / cout;
                let row_q = |o: usize| &wq[if wq.len() == 1 { 0 } else { o }];
                let (wqmin, wqmax) = wq[0].range;
                if wqmax - wqmin > 255.0 || s_in.qmax - s_in.qmin > 255.0 {
                    return Err(unsupported(
                        i,
                        "integer export supports codes of up to 8 bits",
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
                // Codes pack four channels per word: a group's channels, and a flattened
                // input's channels (the words of its pixels must abut), must fill whole words.
                let flat_channels = x.flattened_from.map_or(4, |f| f.0);
                if (groups > 1 && !cig.is_multiple_of(4))
                    || (linear && !flat_channels.is_multiple_of(4))
                {
                    return Err(unsupported(
                        i,
                        "integer inference packs four input channels per word; the channels per group are not a multiple of 4",
                    ));
                }
                // |acc| <= K (255 + |z_a|)(255 + |z_w|) <= 4 K 255²: bounded for i32.
                if (per as u64) * 4 * 255 * 255 >= i32::MAX as u64 {
                    return Err(unsupported(
                        i,
                        "too many inputs per output for 32-bit integer accumulation",
                    ));
                }
                let (kh, kw) = kernel;
                let cl = match (linear, x.flattened_from) {
                    (true, Some(from)) => linear_to_channels_last(&codes, cout, from),
                    _ => to_channels_last(&codes, cout, cig, kh, kw),
                };
                let packed = pad_rows(&cl, cig, weight_row(cig * groups, groups, true), 0);
                let wkey = format!("{name}.weight_codes");
                tensors.insert(
                    wkey.clone(),
                    Named {
                        name: wkey,
                        shape: vec![packed.len()],
                        data: Data::U8(packed),
                    },
                );
                // z = A[o]·(s_a s_w[o]·acc + b[o] − μ[o]) + β[o] = s_a s_w[o] A[o]·(acc + b_q[o])
                // + (β[o] − A[o] μ[o]), the conv bias as int32 accumulator units
                // b_q = R(b / (s_a s_w[o])) (spec §5.2; its rounding, at most half a unit, is
                // what integer inference changes). A and μ, β: the BatchNorm after the conv, or
                // 1 and 0, 0.
                // (b_q, what of b stays float): a scale so small that the bias leaves int32 (an
                // unobserved range) keeps the bias in the float offset.
                let (bias_int, b_rest): (Vec<i64>, Vec<f64>) = (0..cout)
                    .map(|o| {
                        let q = (b[o] as f64 / (s_in.scale as f64 * row_q(o).scale as f64)).round();
                        if q.abs() < (1u64 << 30) as f64 {
                            (q as i64, 0.0)
                        } else {
                            (0, b[o] as f64)
                        }
                    })
                    .unzip();
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
                                    (a * (b_rest[o] - m[o] as f64) + be[o] as f64) as f32,
                                )
                            })
                            .unzip()
                    }
                    None => (vec![1.0; cout], b_rest.iter().map(|&r| r as f32).collect()),
                };
                let scale: Vec<f32> = (0..cout)
                    .map(|o| (s_in.scale as f64 * row_q(o).scale as f64 * a[o] as f64) as f32)
                    .collect();
                for (suffix, v) in [("scale", scale), ("bias", bb), ("weight_zero", z_w)] {
                    let k = format!("{name}.{suffix}");
                    tensors.insert(k.clone(), Named::f32(k, &[cout], v));
                }
                let k = format!("{name}.bias_int");
                tensors.insert(
                    k.clone(),
                    Named {
                        name: k,
                        shape: vec![cout],
                        data: Data::I64(bias_int),
                    },
                );
                let out_space = wanted(&state, nodes, &readers, last)?;
                let (oh, ow) = if linear {
                    (1, 1)
                } else {
                    (
                        conv_axis(x.shape.1, kh, stride.0, padding.0, dilation.0),
                        conv_axis(x.shape.2, kw, stride.1, padding.1, dilation.1),
                    )
                };
                let op = IntOp::Conv {
                    name: name.clone(),
                    cin: if linear { x.shape.0 } else { cin },
                    cout,
                    kernel: pair(kernel),
                    stride: pair(stride),
                    padding: pair(padding),
                    dilation: pair(dilation),
                    groups,
                    weight_bits: Some(8),
                    input_bits: Some(8),
                    relu: relu.is_some(),
                    output_bits: out_space.map(|_| 8),
                    iao: Some(IaoConv {
                        input: s_in,
                        output: out_space,
                    }),
                };
                let t = Tensor {
                    edge: push(&mut ops, op, vec![src]),
                    space: out_space,
                    shape: (cout, oh, ow),
                    flattened_from: None,
                };
                for k in [Some(last), readers[i].first().copied()]
                    .into_iter()
                    .flatten()
                {
                    if k <= last {
                        out[k] = Some(t);
                    }
                }
                t
            }
            LayerSpec::Add { .. } => {
                let s_add = act_space(&state, name)?
                    .ok_or_else(|| unsupported(i, "its inputs are not quantized"))?;
                let &[_, second] = node.inputs.as_slice() else {
                    return Err(unsupported(i, "IAO's QuantAdd adds two tensors"));
                };
                let y = source(&out, second)?;
                let (a, b) = (into(&mut ops, x, s_add), into(&mut ops, y, s_add));
                let relu = relu_after(i);
                let last = relu.unwrap_or(i);
                let out_space = wanted(&state, nodes, &readers, last)?;
                let t = Tensor {
                    edge: push(
                        &mut ops,
                        IntOp::IaoAdd {
                            space: s_add,
                            relu: relu.is_some(),
                            output: out_space,
                        },
                        vec![a, b],
                    ),
                    space: out_space,
                    ..x
                };
                out[last] = Some(t);
                t
            }
            LayerSpec::MaxPool { .. } | LayerSpec::AvgPool { .. } => {
                let s_p = act_space(&state, name)?
                    .ok_or_else(|| unsupported(i, "its input is not quantized"))?;
                let mut edge = into(&mut ops, x, s_p);
                let pool = IntOp::pool(&node.layer).expect("a pool layer");
                let (oh, ow) = pool.pool_out(x.shape.1, x.shape.2);
                let space = if matches!(pool, IntOp::MaxPool { .. }) {
                    edge = push(&mut ops, pool, vec![edge]);
                    Some(s_p)
                } else {
                    // The average of the quantized values, in float.
                    edge = push(&mut ops, IntOp::IaoDequant { from: s_p }, vec![edge]);
                    edge = push(&mut ops, pool, vec![edge]);
                    None
                };
                Tensor {
                    edge,
                    space,
                    shape: (x.shape.0, oh, ow),
                    flattened_from: None,
                }
            }
            LayerSpec::Shuffle { groups } => Tensor {
                edge: push(&mut ops, IntOp::Shuffle { groups: *groups }, vec![x.edge]),
                ..x
            },
            LayerSpec::Flatten => Tensor {
                edge: push(&mut ops, IntOp::Flatten, vec![x.edge]),
                shape: (x.shape.0 * x.shape.1 * x.shape.2, 1, 1),
                flattened_from: Some(x.shape),
                ..x
            },
            // A BatchNorm folded into the conv before it (bn_fuse) is an identity.
            LayerSpec::BatchNorm { .. } if !state.contains_key(&format!("{name}.weight")) => x,
            _ => {
                return Err(unsupported(
                    i,
                    "only a BatchNorm and ReLU right after a conv (a ReLU after an add) fold into it",
                ));
            }
        };
        out[i] = Some(t);
    }
    let last = out
        .last()
        .copied()
        .flatten()
        .ok_or_else(|| Error::Invalid("an empty model".into()))?;
    let shape = last.shape;
    if let Some(s) = last.space {
        push(&mut ops, IntOp::IaoDequant { from: s }, vec![last.edge]);
    }
    let manifest = Manifest::new(&net.spec.name, input, shape.0 * shape.1 * shape.2, ops);
    Ok(IntModel { manifest, tensors })
}
