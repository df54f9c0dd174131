//! Reference of the integer engine (`shaders/intinfer.wgsl`): the manifest's ops on the CPU,
//! channels-last, with integer accumulation in i64 and the same f32 epilogue.

use crate::error::{Error, Result};
use crate::infer::model::{CodeSpace, IntModel, IntOp, conv_axis, pool_axis};
use crate::quant::iao::round;

/// A channels-last activation: codes (as values 0..=n) or floats.
#[derive(Clone)]
enum Act {
    Codes(Vec<u32>),
    Float(Vec<f32>),
}

fn code_of(z: f32, levels: u32) -> u32 {
    ((z * 0.1f32).clamp(0.0, 1.0) * levels as f32 + 0.5).floor() as u32
}

/// IAO: the stored code (q − qmin) of value `x` in `s`.
fn iao_code(x: f32, s: &CodeSpace) -> u32 {
    (round(x / s.scale - s.zero_point).clamp(s.qmin, s.qmax) - s.qmin) as u32
}

/// IAO: the value of stored code `u` in `s`.
fn iao_value(u: u32, s: &CodeSpace) -> f32 {
    (u as f32 + s.qmin + s.zero_point) * s.scale
}

/// Logits `(batch, classes)` of NCHW normalised images.
pub fn run(model: &IntModel, images_nchw: &[f32]) -> Result<Vec<f32>> {
    let [c0, h0, w0] = model.manifest.input;
    let batch = images_nchw.len() / (c0 * h0 * w0);
    let mut x = vec![0.0f32; images_nchw.len()];
    for n in 0..batch {
        for c in 0..c0 {
            for p in 0..h0 * w0 {
                x[(n * h0 * w0 + p) * c0 + c] = images_nchw[(n * c0 + c) * h0 * w0 + p];
            }
        }
    }
    let mut manifest = model.manifest.clone();
    manifest.check_inputs()?;
    // Every edge: the input, then each op's output.
    let mut edges = vec![(Act::Float(x), c0, h0, w0)];
    for node in &manifest.ops {
        let op = &node.op;
        let (mut act, mut c, mut h, mut w) = edges[node.inputs[0]].clone();
        match op {
            IntOp::Conv {
                name,
                cin,
                cout,
                kernel,
                stride,
                padding,
                dilation,
                groups,
                weight_bits,
                relu,
                output_bits,
                iao,
                ..
            } => {
                let (cig, cog) = (cin / groups, cout / groups);
                // IAO: A = u_a + z_a, W = u_w + z_w[o].
                let z_a = iao.map_or(0, |q| (q.input.qmin + q.input.zero_point) as i64);
                let (z_w, bias_int) = match iao {
                    Some(_) => (
                        model
                            .floats(&format!("{name}.weight_zero"), *cout)?
                            .to_vec(),
                        model.ints(&format!("{name}.bias_int"), *cout)?,
                    ),
                    None => (Vec::new(), vec![0; *cout]),
                };
                let (oh, ow) = (
                    conv_axis(h, kernel[0], stride[0], padding[0], dilation[0]),
                    conv_axis(w, kernel[1], stride[1], padding[1], dilation[1]),
                );
                let row = crate::infer::model::weight_row(*cin, *groups, weight_bits.is_some());
                let nw = cout * kernel[0] * kernel[1] * row;
                let scale = model.floats(&format!("{name}.scale"), *cout)?;
                let bias = model.floats(&format!("{name}.bias"), *cout)?;
                let codes = weight_bits
                    .map(|b| model.weight_codes(name, nw, b))
                    .transpose()?;
                let floats = if weight_bits.is_none() {
                    Some(model.floats(&format!("{name}.weight"), nw)?)
                } else {
                    None
                };
                let mut zs = vec![0.0f32; batch * oh * ow * cout];
                for n in 0..batch {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            for co in 0..*cout {
                                let g = co / cog;
                                let (mut acc_i, mut acc_f) = (0i64, 0.0f32);
                                for ky in 0..kernel[0] {
                                    let iy = (oy * stride[0] + ky * dilation[0]) as isize
                                        - padding[0] as isize;
                                    for kx in 0..kernel[1] {
                                        let ix = (ox * stride[1] + kx * dilation[1]) as isize
                                            - padding[1] as isize;
                                        if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w
                                        {
                                            continue;
                                        }
                                        for ci in 0..cig {
                                            let a = ((n * h + iy as usize) * w + ix as usize) * c
                                                + g * cig
                                                + ci;
                                            let k =
                                                ((co * kernel[0] + ky) * kernel[1] + kx) * row + ci;
                                            match (&act, &codes, floats) {
                                                (Act::Codes(v), Some(wc), _) if iao.is_some() => {
                                                    acc_i += (v[a] as i64 + z_a)
                                                        * (wc[k] as i64 + z_w[co] as i64);
                                                }
                                                (Act::Codes(v), Some(wc), _) => {
                                                    let n_w =
                                                        (1i64 << weight_bits.unwrap_or(8)) - 1;
                                                    acc_i += v[a] as i64 * (2 * wc[k] as i64 - n_w);
                                                }
                                                (Act::Float(v), None, Some(wf)) => {
                                                    acc_f += v[a] * wf[k]
                                                }
                                                _ => {
                                                    return Err(Error::Invalid(format!(
                                                        "layer {name}: input and weights do not match"
                                                    )));
                                                }
                                            }
                                        }
                                    }
                                }
                                let acc = if codes.is_some() {
                                    (acc_i + bias_int[co] as i64) as f32
                                } else {
                                    acc_f
                                };
                                let mut z = acc * scale[co] + bias[co];
                                if *relu {
                                    z = z.max(0.0);
                                }
                                zs[((n * oh + oy) * ow + ox) * cout + co] = z;
                            }
                        }
                    }
                }
                act = match (output_bits, iao.and_then(|q| q.output)) {
                    (Some(_), Some(o)) => Act::Codes(zs.iter().map(|&z| iao_code(z, &o)).collect()),
                    (Some(b), None) => {
                        Act::Codes(zs.iter().map(|&z| code_of(z, (1 << b) - 1)).collect())
                    }
                    (None, _) => Act::Float(zs),
                };
                (c, h, w) = (*cout, oh, ow);
            }
            IntOp::SignPack => {
                act = match &act {
                    Act::Float(v) => Act::Codes(v.iter().map(|&x| u32::from(x >= 0.0)).collect()),
                    Act::Codes(_) => return Err(Error::Invalid("sign of codes".into())),
                };
            }
            IntOp::Unpack => {
                act = match &act {
                    Act::Codes(v) => {
                        Act::Float(v.iter().map(|&b| if b == 1 { 1.0 } else { -1.0 }).collect())
                    }
                    Act::Float(_) => return Err(Error::Invalid("unpack of floats".into())),
                };
            }
            IntOp::XnorConv {
                name,
                cin,
                cout,
                kernel,
                stride,
                padding,
                dilation,
                groups,
                ternary,
                sign,
            } => {
                let Act::Codes(a) = &act else {
                    return Err(Error::Invalid("a binary conv of floats".into()));
                };
                let (cig, cog) = (cin / groups, cout / groups);
                // The stored planes as they are: bit tap·cig + ci.
                let n = (cout * kernel[0] * kernel[1] * cig).div_ceil(8);
                let plane = |key: &str| -> Result<Vec<u8>> {
                    match model.tensors.get(key).map(|t| &t.data) {
                        Some(crate::nn::checkpoint::Data::U8(b)) if b.len() == n => Ok(b.clone()),
                        _ => Err(Error::Invalid(format!("no {key}"))),
                    }
                };
                let pos = plane(&format!("{name}.weight_bits"))?;
                let neg = if *ternary {
                    plane(&format!("{name}.weight_bits_neg"))?
                } else {
                    vec![0; n]
                };
                let scale = model.floats(&format!("{name}.scale"), *cout)?;
                let bias = model.floats(&format!("{name}.bias"), *cout)?;
                let (oh, ow) = (
                    conv_axis(h, kernel[0], stride[0], padding[0], dilation[0]),
                    conv_axis(w, kernel[1], stride[1], padding[1], dilation[1]),
                );
                let mut zs = vec![0.0f32; batch * oh * ow * cout];
                for nn in 0..batch {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            for co in 0..*cout {
                                let g = co / cog;
                                let mut dot = 0i64;
                                for ky in 0..kernel[0] {
                                    let iy = (oy * stride[0] + ky * dilation[0]) as isize
                                        - padding[0] as isize;
                                    for kx in 0..kernel[1] {
                                        let ix = (ox * stride[1] + kx * dilation[1]) as isize
                                            - padding[1] as isize;
                                        if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w
                                        {
                                            continue;
                                        }
                                        for ci in 0..cig {
                                            let av =
                                                if a[((nn * h + iy as usize) * w + ix as usize) * c
                                                    + g * cig
                                                    + ci]
                                                    == 1
                                                {
                                                    1
                                                } else {
                                                    -1
                                                };
                                            let k =
                                                ((co * kernel[0] + ky) * kernel[1] + kx) * cig + ci;
                                            let bit = |p: &[u8]| (p[k / 8] >> (k % 8)) & 1 == 1;
                                            let wv = if *ternary {
                                                i64::from(bit(&pos)) - i64::from(bit(&neg))
                                            } else if bit(&pos) {
                                                1
                                            } else {
                                                -1
                                            };
                                            dot += av * wv;
                                        }
                                    }
                                }
                                zs[((nn * oh + oy) * ow + ox) * cout + co] =
                                    dot as f32 * scale[co] + bias[co];
                            }
                        }
                    }
                }
                act = if *sign {
                    Act::Codes(zs.iter().map(|&z| u32::from(z >= 0.0)).collect())
                } else {
                    Act::Float(zs)
                };
                (c, h, w) = (*cout, oh, ow);
            }
            IntOp::IaoQuantize { to } => {
                act = match &act {
                    Act::Float(v) => Act::Codes(v.iter().map(|&z| iao_code(z, to)).collect()),
                    Act::Codes(_) => return Err(Error::Invalid("quantize of codes".into())),
                };
            }
            IntOp::IaoRequant { from, to } => {
                act = match &act {
                    Act::Codes(v) => Act::Codes(
                        v.iter()
                            .map(|&u| iao_code(iao_value(u, from), to))
                            .collect(),
                    ),
                    Act::Float(_) => return Err(Error::Invalid("requantize of floats".into())),
                };
            }
            IntOp::IaoDequant { from } => {
                act = match &act {
                    Act::Codes(v) => Act::Float(v.iter().map(|&u| iao_value(u, from)).collect()),
                    Act::Float(_) => return Err(Error::Invalid("dequantize of floats".into())),
                };
            }
            IntOp::Quantize { bits } => {
                act = match &act {
                    Act::Float(v) => {
                        Act::Codes(v.iter().map(|&z| code_of(z, (1 << bits) - 1)).collect())
                    }
                    Act::Codes(_) => return Err(Error::Invalid("quantize of codes".into())),
                };
            }
            IntOp::MaxPool {
                kernel,
                stride,
                padding,
            }
            | IntOp::AvgPool {
                kernel,
                stride,
                padding,
            } => {
                let (oh, ow) = (
                    pool_axis(h, kernel[0], stride[0], padding[0]),
                    pool_axis(w, kernel[1], stride[1], padding[1]),
                );
                let avg = matches!(op, IntOp::AvgPool { .. });
                let window =
                    |n: usize, oy: usize, ox: usize, ch: usize, f: &mut dyn FnMut(usize)| {
                        for ky in 0..kernel[0] {
                            let iy = (oy * stride[0] + ky) as isize - padding[0] as isize;
                            for kx in 0..kernel[1] {
                                let ix = (ox * stride[1] + kx) as isize - padding[1] as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    f(((n * h + iy as usize) * w + ix as usize) * c + ch);
                                }
                            }
                        }
                    };
                let len = batch * oh * ow * c;
                let index = |i: usize| {
                    (
                        i / c / (oh * ow),
                        (i / c % (oh * ow)) / ow,
                        i / c % ow,
                        i % c,
                    )
                };
                act = match &act {
                    Act::Codes(v) if !avg => Act::Codes(
                        (0..len)
                            .map(|i| {
                                let (n, oy, ox, ch) = index(i);
                                let mut m = 0;
                                window(n, oy, ox, ch, &mut |j| m = m.max(v[j]));
                                m
                            })
                            .collect(),
                    ),
                    Act::Float(v) => Act::Float(
                        (0..len)
                            .map(|i| {
                                let (n, oy, ox, ch) = index(i);
                                let (mut m, mut s) = (f32::MIN, 0.0f32);
                                window(n, oy, ox, ch, &mut |j| {
                                    m = m.max(v[j]);
                                    s += v[j];
                                });
                                if avg {
                                    s / (kernel[0] * kernel[1]) as f32
                                } else {
                                    m
                                }
                            })
                            .collect(),
                    ),
                    Act::Codes(_) => return Err(Error::Invalid("average pooling of codes".into())),
                };
                (h, w) = (oh, ow);
            }
            IntOp::Shuffle { groups } => {
                let per = c / groups;
                let src = |i: usize| {
                    let co = i % c;
                    i - co + (co % groups) * per + co / groups
                };
                act = match &act {
                    Act::Codes(v) => Act::Codes((0..v.len()).map(|i| v[src(i)]).collect()),
                    Act::Float(v) => Act::Float((0..v.len()).map(|i| v[src(i)]).collect()),
                };
            }
            IntOp::Flatten => (c, h, w) = (c * h * w, 1, 1),
            IntOp::IaoAdd {
                space,
                relu,
                output,
            } => {
                let (Act::Codes(x), Act::Codes(y)) = (&act, &edges[node.inputs[1]].0) else {
                    return Err(Error::Invalid("an IAO add of floats".into()));
                };
                let z = x.iter().zip(y).map(|(&a, &b)| {
                    let s = iao_value(a, space) + iao_value(b, space);
                    if *relu { s.max(0.0) } else { s }
                });
                act = match output {
                    Some(o) => Act::Codes(z.map(|z| iao_code(z, o)).collect()),
                    None => Act::Float(z.collect()),
                };
            }
            IntOp::Add { relu, output_bits } => {
                let (Act::Float(x), Act::Float(y)) = (&act, &edges[node.inputs[1]].0) else {
                    return Err(Error::Invalid("an add of codes".into()));
                };
                let z = x.iter().zip(y).map(|(a, b)| {
                    let s = a + b;
                    if *relu { s.max(0.0) } else { s }
                });
                act = match output_bits {
                    Some(b) => Act::Codes(z.map(|z| code_of(z, (1 << b) - 1)).collect()),
                    None => Act::Float(z.collect()),
                };
            }
        }
        edges.push((act, c, h, w));
    }
    match edges.pop().expect("the input edge").0 {
        Act::Float(v) => Ok(v),
        Act::Codes(_) => Err(Error::Invalid("the model's output is codes".into())),
    }
}
