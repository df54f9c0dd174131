// The IAO fake quantizer's per-element functions (spec §1), shared by iao.wgsl and norm.wgsl's
// bn_apply_iao_backward (kernels::shader! prepends this after lib/division.wgsl). Every step is
// PyTorch's f32 operation in PyTorch's order (see iao.wgsl's header).

// R: rounds half away from zero.
fn round_away(v: f32) -> f32 {
    let r = floor(abs(v) + 0.5);
    return select(r, -r, v < 0.0);
}

// x in code units, for scale s and zero point zp: v = fl32(x / s) - zp.
fn iao_v(xi: f32, s: f32, zp: f32) -> f32 {
    return div_rn(xi, s) - zp;
}

// The fake-quantized x from its v: (clamp(R(v), q.x, q.y) + zp) s, q = (qmin, qmax). NaN stays
// NaN (clamp would hide it), so that numerical faults surface.
fn iao_fake_quant(xi: f32, v: f32, s: f32, zp: f32, q: vec2<f32>) -> f32 {
    let code = clamp(round_away(v), q.x, q.y);
    let out = (code + zp) * s;
    return select(out, xi, (bitcast<u32>(xi) & 0x7fffffffu) > 0x7f800000u);
}

// The clip-STE: dL/dx = fl32(fl32(g s) / s) where qmin <= R(v) <= qmax and lo <= v <= hi, else
// 0, with (lo, hi) the observer's range `observed` = (min, max) in v's units (symmetric:
// +-max(|lo|, |hi|)).
fn iao_grad(v: f32, g: f32, s: f32, zp: f32, observed: vec2<f32>, q: vec2<f32>,
            asymmetric: bool) -> f32 {
    let code = round_away(v);
    var lo = div_rn(observed.x, s) - zp;
    var hi = div_rn(observed.y, s) - zp;
    if (!asymmetric) {
        hi = max(abs(lo), abs(hi));
        lo = -hi;
    }
    let passes = code >= q.x && code <= q.y && v >= lo && v <= hi;
    return select(0.0, div_rn(g * s, s), passes);
}
