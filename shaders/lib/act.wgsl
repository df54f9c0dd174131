// DoReFa's activation quantizer and its straight-through gradient (spec §1), shared by every
// kernel that applies them (quant.wgsl's passes and the epilogues of BatchNorm and of the conv
// GEMMs), so that they all give the same bits.

// y = floor(fl32(clamp(0.1 x, 0, 1) * n) + 0.5) * fl32(1 / n); NaN is kept (clamp would hide
// it; tested by bit pattern, since compilers may assume no NaN) so that faults surface.
fn dorefa_act(x: f32, levels_f: f32, inv_levels: f32) -> f32 {
    let c = clamp(x * 0.1, 0.0, 1.0);
    let q = floor(c * levels_f + 0.5) * inv_levels;
    return select(q, x, (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u);
}

// Straight-through: dx = 0.1 * dy where 0 <= fl32(0.1 x) <= 1 (inclusive), else 0. PyTorch's
// chain forms ((dy * s) * n) * 0.1, which is dy * 0.1 to within an ulp; drivers may reassociate
// that chain anyway (SPIR-V float ops are not marked exact), so one multiply it is.
fn dorefa_act_grad(x: f32, dy: f32) -> f32 {
    let c = x * 0.1;
    return select(0.0, 0.1 * dy, c >= 0.0 && c <= 1.0);
}
