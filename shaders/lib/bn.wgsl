// BatchNorm's affine map and the ReLU fused after it, shared by norm.wgsl's passes and by the
// conv GEMMs that form a BatchNorm's output where they load it (conv2d.wgsl's and
// conv_coop.wgsl's IN_BN), so that both give the same bits.

// gamma * (v - mean) * invstd + beta, in this order.
fn bn_affine(v: f32, mean: f32, invstd: f32, gamma: f32, beta: f32) -> f32 {
    return gamma * ((v - mean) * invstd) + beta;
}

// ReLU by bits: 0 where v is negative or zero, v elsewhere (NaN kept, where compilers may
// assume there is none).
fn relu_bits(v: f32) -> f32 {
    let b = bitcast<u32>(v);
    let nonpositive = ((b & 0x80000000u) != 0u && (b & 0x7fffffffu) <= 0x7f800000u) || b == 0u;
    return select(v, 0.0, nonpositive);
}
