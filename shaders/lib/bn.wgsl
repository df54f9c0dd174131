// BatchNorm's affine map, the activation fused after it and its input gradient, shared by
// norm.wgsl's passes and by the kernels that do a BatchNorm's work where they load their operands
// (conv2d.wgsl's IN_BN and OUT_BN, conv_coop.wgsl's IN_BN, maxpool.wgsl's IN_BN, elementwise.wgsl's
// add_forward_bn), so that both give the same bits.

// A BatchNorm's table: BN_TABLE floats per channel, channel c's at c * BN_TABLE: [mean, invstd,
// gamma, beta] (formed by the statistics kernels), then [dbeta, dgamma, scale, unused] (by the
// backward reduction). Two aligned vec4s: a kernel that forms the BatchNorm where it loads its
// operand reads a channel's entries in one or two loads.
const BN_TABLE: u32 = 8u;
const BN_MEAN: u32 = 0u;
const BN_INVSTD: u32 = 1u;
const BN_GAMMA: u32 = 2u;
const BN_BETA: u32 = 3u;
const BN_DBETA: u32 = 4u;
const BN_DGAMMA: u32 = 5u;
const BN_SCALE: u32 = 6u;

// gamma * (v - mean) * invstd + beta, in this order.
fn bn_affine(v: f32, mean: f32, invstd: f32, gamma: f32, beta: f32) -> f32 {
    return gamma * ((v - mean) * invstd) + beta;
}

// The activation fused after a BatchNorm (norm.wgsl's p.act, the kernels' IN_ACT and OUT_ACT;
// src/kernels/norm.rs's `Act`): none, a ReLU, or wbwtab's binary activation (sign).
const ACT_NONE: u32 = 0u;
const ACT_RELU: u32 = 1u;
const ACT_SIGN: u32 = 2u;

// Activation act of v (the BatchNorm's value).
fn bn_act(v: f32, act: u32) -> f32 {
    if (act == ACT_RELU) {
        return relu_bits(v);
    }
    if (act == ACT_SIGN) {
        return sign_bits(v);
    }
    return v;
}

// Whether the gradient passes activation act at its input v: the ReLU's where v > 0 (PyTorch's
// rule), the sign's where -1 < v < 1 (micronet's straight-through rule, both ends excluded).
fn act_passes(v: f32, act: u32) -> bool {
    if (act == ACT_RELU) {
        return v > 0.0;
    }
    if (act == ACT_SIGN) {
        return v > -1.0 && v < 1.0;
    }
    return true;
}

// BatchNorm's (train) input gradient at input v whose output gradient is g, before the fused
// activation's mask (act_passes of the BatchNorm's value; `act`), for `count` values per channel
// and the channel's sums dbeta = sum g', dgamma = sum g' xhat (g' = g after the mask); `scale`
// is the channel's gamma * invstd / count (bn_scale), formed once per channel.
fn bn_grad(v: f32, g: f32, mean: f32, invstd: f32, gamma: f32, beta: f32, dbeta: f32,
           dgamma: f32, count: f32, scale: f32, act: u32) -> f32 {
    var gm = g;
    if (act != ACT_NONE) {
        gm = select(0.0, g, act_passes(bn_affine(v, mean, invstd, gamma, beta), act));
    }
    let xhat = (v - mean) * invstd;
    return scale * (count * gm - dbeta - xhat * dgamma);
}

fn bn_scale(gamma: f32, invstd: f32, count: f32) -> f32 {
    return gamma * invstd / count;
}

// ReLU by bits: 0 where v is negative or zero, v elsewhere (NaN kept, where compilers may
// assume there is none).
fn relu_bits(v: f32) -> f32 {
    let b = bitcast<u32>(v);
    let nonpositive = ((b & 0x80000000u) != 0u && (b & 0x7fffffffu) <= 0x7f800000u) || b == 0u;
    return select(v, 0.0, nonpositive);
}

// wbwtab's binary activation by bits: -1 where v < 0, +1 elsewhere (0 and -0 give +1), NaN kept
// so that numerical faults surface.
fn sign_bits(v: f32) -> f32 {
    let nan = (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
    return select(select(1.0, -1.0, v < 0.0), v, nan);
}
