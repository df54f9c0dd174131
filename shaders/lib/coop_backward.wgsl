// What the backward kernels on cooperative matrices (conv_coop_gw.wgsl, conv_coop_gi.wgsl)
// share, appended to each after lib/coop_conv.wgsl: the float gradient dy, formed through the
// backward of the BatchNorm after the conv where it is loaded (the kernels' OUT_BN, OUT_ACT and
// OUT_SHUFFLE constants and their out_dy and out_bn bindings), as conv2d.wgsl's OUT_BN forms
// it, and the power-of-two scale that carries such a gradient through f16 in two halves.

// OUT_BN: what the backward of the BatchNorm after output channel co needs: where its output
// gradient lies (the shuffle after it moves the channel) and its table.
struct OutBn {
    at: u32,
    mean: f32, invstd: f32, gamma: f32, beta: f32,
    dbeta: f32, dgamma: f32, scale: f32,
}

fn out_bn_of(co: u32) -> OutBn {
    var at = co;
    if (OUT_SHUFFLE > 1u) {
        let per = COUT / OUT_SHUFFLE;
        at = (co % per) * OUT_SHUFFLE + co / per;
    }
    let t = co * BN_TABLE;
    return OutBn(at, out_bn[t + BN_MEAN], out_bn[t + BN_INVSTD], out_bn[t + BN_GAMMA],
                 out_bn[t + BN_BETA], out_bn[t + BN_DBETA], out_bn[t + BN_DGAMMA],
                 out_bn[t + BN_SCALE]);
}

// dL/d(conv output) at (image b, output pixel pix) of the channel t describes, whose loaded
// value is y: y itself (dy), or with OUT_BN formed from y (the conv's output) and the
// BatchNorm's output gradient, over `count` values per channel.
fn dy_value(t: OutBn, b: u32, pix: u32, y: f32, count: f32) -> f32 {
    if (OUT_BN) {
        return bn_grad(y, out_dy[(b * COUT + t.at) * OHW + pix], t.mean, t.invstd, t.gamma,
                       t.beta, t.dbeta, t.dgamma, count, t.scale, OUT_ACT);
    }
    return y;
}

// The power of two that puts mx in [2^14, 2^15) (1 for 0, inf or NaN), kept within 2^-126 and
// 2^126 so that both it and its inverse are normal. Scaled by it, a gradient goes through f16
// as hi = f16(v S) and lo = f16(v S - hi): about 22 bits for values down to about 2^-17 of mx
// (below, lo is subnormal and keeps fewer; nothing under about 2^-39 of mx), no overflow.
fn scale_for(mx: f32) -> f32 {
    let e = i32((bitcast<u32>(mx) >> 23u) & 0xffu);
    if (mx == 0.0 || e == 255) {
        return 1.0;
    }
    return bitcast<f32>(u32(clamp(268 - e, 1, 253)) << 23u);
}
