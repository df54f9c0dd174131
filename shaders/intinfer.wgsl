// Integer inference of an exported model. Tensors are channels-last (N, H, W, C): float
// activations one f32 per value, quantized activations as 8-bit codes k in 0..=n packed four
// channels per u32 (a pixel holds ceil(C/4) words; unused lanes are 0).
//
// A quantized conv multiplies codes exactly: with activation codes a and weight codes k (weight
// level 2k - n_w),
//     acc = sum a * (2k - n_w) = 2 * sum a*k - n_w * sum a
// where both sums are dot4U8Packed of packed words (exact in u32; the exporter checks that acc
// fits in i32). One float epilogue per output channel then gives z = acc * scale + bias (the
// levels' scales 1/(n_a n_w), the conv bias and BatchNorm folded together), ReLU, and either z or
// z requantized to the next layer's codes floor(clamp(0.1 z, 0, 1) * n + 0.5).

struct Params {
    batch: u32, h: u32, w: u32, cin: u32,         // input (N, H, W, Cin)
    oh: u32, ow: u32, cout: u32, groups: u32,     // output (N, OH, OW, Cout)
    kh: u32, kw: u32, sh: u32, sw: u32,
    ph: u32, pw: u32, dh: u32, dw: u32,
    w_levels: u32,      // n_w of weight codes
    out_levels: u32,    // n of output codes (codes output)
    relu: u32,
    shuffle_groups: u32,
    out_levels_f: f32,
    out_inv_levels: f32,
    // IAO code spaces (q in [qmin, qmax] stored as u = q - qmin; value (q + zp) * scale)
    in_scale: f32,
    in_zero: f32,
    in_qmin: f32,
    out_scale: f32,
    out_zero: f32,
    out_qmin: f32,
    out_qmax: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in_codes: array<u32>;
@group(0) @binding(2) var<storage, read> in_float: array<f32>;
@group(0) @binding(3) var<storage, read> w_codes: array<u32>;
@group(0) @binding(4) var<storage, read> w_float: array<f32>;
@group(0) @binding(5) var<storage, read> scale: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> out_codes: array<u32>;
@group(0) @binding(8) var<storage, read_write> out_float: array<f32>;
// The second addend of add_float.
@group(0) @binding(9) var<storage, read> in_float2: array<f32>;
// conv_iao: per output channel, the weight codes' offset z_w (A·W = (u_a + z_a)(u_w + z_w)).
@group(0) @binding(10) var<storage, read> w_zero: array<f32>;
// The second summand of add_iao.
@group(0) @binding(11) var<storage, read> in_codes2: array<u32>;
// conv_xnor: the weights' bit planes, +1 (and, ternary, -1): a bit per weight, 32 per word.
@group(0) @binding(12) var<storage, read> w_pos: array<u32>;
@group(0) @binding(13) var<storage, read> w_neg: array<u32>;
// conv_iao: the conv bias in accumulator units, b_q = R(b / (s_a s_w[o])).
@group(0) @binding(14) var<storage, read> bias_int: array<i32>;

// Output codes (true) or floats.
override OUT_CODES: bool = true;
// The output codes are IAO's (p.out_*) rather than DoReFa's.
override OUT_IAO: bool = false;
// conv_xnor: write the binary activation B(z) as bits (else floats); ternary weights.
override OUT_BITS: bool = true;
override TERNARY: bool = false;

// The input row (column) that output o's tap k reads: stride s, dilation d, padding pad, input
// size n; -1 where it falls in the padding.
fn tap(o: u32, k: u32, s: u32, d: u32, pad: u32, n: u32) -> i32 {
    let i = i32(o * s + k * d) - i32(pad);
    return select(-1, i, i >= 0 && u32(i) < n);
}

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

fn words(c: u32) -> u32 {
    return (c + 3u) / 4u;
}

fn round_away(v: f32) -> f32 {
    let r = floor(abs(v) + 0.5);
    return select(r, -r, v < 0.0);
}

// IAO: the stored code u = clamp(R(x / s - zp), qmin, qmax) - qmin of value x (division exact).
fn iao_code(x: f32) -> u32 {
    let q = clamp(round_away(div_rn(x, p.out_scale) - p.out_zero), p.out_qmin, p.out_qmax);
    return u32(q - p.out_qmin);
}

// IAO: the value (q + zp) * s of stored input code u.
fn iao_value(u: u32) -> f32 {
    return (f32(u) + p.in_qmin + p.in_zero) * p.in_scale;
}

fn code_of(z: f32) -> u32 {
    if (OUT_IAO) {
        return iao_code(z);
    }
    return u32(floor(clamp(z * 0.1, 0.0, 1.0) * p.out_levels_f + 0.5));
}

// Writes four output channels co0..co0+3 of pixel `pix` (z for channels >= cout is ignored).
fn store(pix: u32, co0: u32, z: vec4<f32>) {
    var v = z;
    if (p.relu == 1u) {
        v = max(v, vec4<f32>(0.0));
    }
    if (OUT_CODES) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            if (co0 + j < p.cout) {
                word |= code_of(v[j]) << (8u * j);
            }
        }
        out_codes[pix * words(p.cout) + co0 / 4u] = word;
    } else {
        for (var j = 0u; j < 4u; j++) {
            if (co0 + j < p.cout) {
                out_float[pix * p.cout + co0 + j] = v[j];
            }
        }
    }
}

// Thread: output pixel (n, oy, ox) and channels 4q..4q+3. Returns (pixel index, q) or none.
fn output_slot(i: u32) -> vec2<u32> {
    let q_per_pixel = words(p.cout);
    return vec2<u32>(i / q_per_pixel, i % q_per_pixel);
}

// A quantized conv: codes in, codes weights. A group's channels fill whole words: either a
// multiple of 4 per group, or one group whose last word is padded (activation lanes 0, so the
// padded weight codes add nothing to either sum).
@compute @workgroup_size(256)
fn conv_int(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let slot = output_slot(i);
    let pix = slot.x;
    if (pix >= p.batch * p.oh * p.ow) {
        return;
    }
    let n = pix / (p.oh * p.ow);
    let r = pix % (p.oh * p.ow);
    let oy = r / p.ow;
    let ox = r % p.ow;
    let cig4 = words(p.cin / p.groups);
    let cog = p.cout / p.groups;
    let in_words = words(p.cin);
    var z = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let co = slot.y * 4u + j;
        if (co >= p.cout) {
            break;
        }
        let g = co / cog;
        var s_ak = 0u;
        var s_a = 0u;
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = tap(oy, ky, p.sh, p.dh, p.ph, p.h);
            if (iy < 0) {
                continue;
            }
            for (var kx = 0u; kx < p.kw; kx++) {
                let ix = tap(ox, kx, p.sw, p.dw, p.pw, p.w);
                if (ix < 0) {
                    continue;
                }
                let a_base = ((n * p.h + u32(iy)) * p.w + u32(ix)) * in_words + g * cig4;
                let w_base = ((co * p.kh + ky) * p.kw + kx) * cig4;
                for (var c = 0u; c < cig4; c++) {
                    let a = in_codes[a_base + c];
                    s_ak += dot4U8Packed(a, w_codes[w_base + c]);
                    s_a += dot4U8Packed(a, 0x01010101u);
                }
            }
        }
        let acc = 2 * i32(s_ak) - i32(p.w_levels * s_a);
        z[j] = f32(acc) * scale[co] + bias[co];
    }
    store(pix, slot.y * 4u, z);
}

// A float conv (the first layer, which DoReFa leaves float): float in, float weights.
@compute @workgroup_size(256)
fn conv_float(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let slot = output_slot(i);
    let pix = slot.x;
    if (pix >= p.batch * p.oh * p.ow) {
        return;
    }
    let n = pix / (p.oh * p.ow);
    let r = pix % (p.oh * p.ow);
    let oy = r / p.ow;
    let ox = r % p.ow;
    let cig = p.cin / p.groups;
    let cog = p.cout / p.groups;
    var z = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let co = slot.y * 4u + j;
        if (co >= p.cout) {
            break;
        }
        let g = co / cog;
        var acc = 0.0;
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = tap(oy, ky, p.sh, p.dh, p.ph, p.h);
            if (iy < 0) {
                continue;
            }
            for (var kx = 0u; kx < p.kw; kx++) {
                let ix = tap(ox, kx, p.sw, p.dw, p.pw, p.w);
                if (ix < 0) {
                    continue;
                }
                let a_base = ((n * p.h + u32(iy)) * p.w + u32(ix)) * p.cin + g * cig;
                let w_base = ((co * p.kh + ky) * p.kw + kx) * cig;
                for (var c = 0u; c < cig; c++) {
                    acc += in_float[a_base + c] * w_float[w_base + c];
                }
            }
        }
        z[j] = acc * scale[co] + bias[co];
    }
    store(pix, slot.y * 4u, z);
}

// Pooling window of output (oy, ox) along one axis: input index for tap k, or -1 (padding).
// Max-pool of codes: exact, since quantization is monotonic (q(max) = max(q)).
@compute @workgroup_size(256)
fn maxpool_codes(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let cw = words(p.cin);
    if (i >= p.batch * p.oh * p.ow * cw) {
        return;
    }
    let c4 = i % cw;
    let pix = i / cw;
    let n = pix / (p.oh * p.ow);
    let oy = (pix % (p.oh * p.ow)) / p.ow;
    let ox = pix % p.ow;
    var best = vec4<u32>(0u);
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = tap(oy, ky, p.sh, 1u, p.ph, p.h);
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = tap(ox, kx, p.sw, 1u, p.pw, p.w);
            if (iy >= 0 && ix >= 0) {
                best = max(best, unpack4xU8(in_codes[((n * p.h + u32(iy)) * p.w + u32(ix)) * cw + c4]));
            }
        }
    }
    out_codes[i] = pack4xU8(best);
}

// Max-pool of floats (channels-last), NaN-free inputs.
@compute @workgroup_size(256)
fn maxpool_float(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.batch * p.oh * p.ow * p.cin) {
        return;
    }
    let c = i % p.cin;
    let pix = i / p.cin;
    let n = pix / (p.oh * p.ow);
    let oy = (pix % (p.oh * p.ow)) / p.ow;
    let ox = pix % p.ow;
    var best = -3.40282347e38;
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = tap(oy, ky, p.sh, 1u, p.ph, p.h);
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = tap(ox, kx, p.sw, 1u, p.pw, p.w);
            if (iy >= 0 && ix >= 0) {
                best = max(best, in_float[((n * p.h + u32(iy)) * p.w + u32(ix)) * p.cin + c]);
            }
        }
    }
    out_float[i] = best;
}

// Average pool of floats, padding counted (divisor kh * kw).
@compute @workgroup_size(256)
fn avgpool_float(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.batch * p.oh * p.ow * p.cin) {
        return;
    }
    let c = i % p.cin;
    let pix = i / p.cin;
    let n = pix / (p.oh * p.ow);
    let oy = (pix % (p.oh * p.ow)) / p.ow;
    let ox = pix % p.ow;
    var acc = 0.0;
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = tap(oy, ky, p.sh, 1u, p.ph, p.h);
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = tap(ox, kx, p.sw, 1u, p.pw, p.w);
            if (iy >= 0 && ix >= 0) {
                acc += in_float[((n * p.h + u32(iy)) * p.w + u32(ix)) * p.cin + c];
            }
        }
    }
    out_float[i] = acc / f32(p.kh * p.kw);
}

// Channel shuffle (micronet's) of codes: output channel b*g + a takes input channel a*(C/g) + b.
@compute @workgroup_size(256)
fn shuffle_codes(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let cw = words(p.cin);
    if (i >= p.batch * p.h * p.w * cw) {
        return;
    }
    let pix = i / cw;
    let c4 = i % cw;
    let g = p.shuffle_groups;
    let per = p.cin / g;
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let co = c4 * 4u + j;
        if (co < p.cin) {
            let ci = (co % g) * per + co / g;
            let code = (in_codes[pix * cw + ci / 4u] >> (8u * (ci % 4u))) & 0xffu;
            word |= code << (8u * j);
        }
    }
    out_codes[i] = word;
}

@compute @workgroup_size(256)
fn shuffle_float(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.batch * p.h * p.w * p.cin) {
        return;
    }
    let co = i % p.cin;
    let pix = i / p.cin;
    let g = p.shuffle_groups;
    let per = p.cin / g;
    out_float[i] = in_float[pix * p.cin + (co % g) * per + co / g];
}

// Float activations (channels-last) to packed codes floor(clamp(0.1 x, 0, 1) * n + 0.5), or
// with OUT_IAO an IAO quantizer's: the input of a quantized first layer.
@compute @workgroup_size(256)
fn quantize_codes(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let cw = words(p.cin);
    if (i >= p.batch * p.h * p.w * cw) {
        return;
    }
    let pix = i / cw;
    let c4 = i % cw;
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let c = c4 * 4u + j;
        if (c < p.cin) {
            word |= code_of(in_float[pix * p.cin + c]) << (8u * j);
        }
    }
    out_codes[i] = word;
}

// A residual add of two float tensors (channels-last, cout channels), ReLU when asked, written as
// floats or as the next layer's codes, as a conv's epilogue would. Thread: a pixel's channels
// 4q..4q+3.
@compute @workgroup_size(256)
fn add_float(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let slot = output_slot(i);
    let pix = slot.x;
    if (pix >= p.batch * p.oh * p.ow) {
        return;
    }
    var z = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let c = slot.y * 4u + j;
        if (c < p.cout) {
            z[j] = in_float[pix * p.cout + c] + in_float2[pix * p.cout + c];
        }
    }
    store(pix, slot.y * 4u, z);
}

// ---------------------------------------------------------------------------------------------
// IAO (micronet's wqaq/iao) codes: 8-bit, affine. An input code u_a stands for A = u_a + z_a
// (z_a = qmin + zp), a weight code u_w for W = u_w + z_w[o], so a conv's
//     acc = sum A W = S_aw + z_w S_a + z_a S_w + K z_a z_w
// with the S sums dot4U8Packed of packed words (exact; padded lanes hold code 0 and count in no
// sum) and K the real terms (valid taps times channels per group): exact in i32, the exporter
// checks the bound. Then z = acc * scale + bias (s_a s_w and BatchNorm folded), ReLU, and the
// next quantizer's codes (OUT_IAO) or floats.
@compute @workgroup_size(256)
fn conv_iao(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let slot = output_slot(i);
    let pix = slot.x;
    if (pix >= p.batch * p.oh * p.ow) {
        return;
    }
    let n = pix / (p.oh * p.ow);
    let r = pix % (p.oh * p.ow);
    let oy = r / p.ow;
    let ox = r % p.ow;
    let cig = p.cin / p.groups;
    let cig4 = words(cig);
    let cog = p.cout / p.groups;
    let in_words = words(p.cin);
    let za = i32(p.in_qmin + p.in_zero);
    var z = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let co = slot.y * 4u + j;
        if (co >= p.cout) {
            break;
        }
        let g = co / cog;
        var s_aw = 0u;
        var s_a = 0u;
        var s_w = 0u;
        var taps = 0u;
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = tap(oy, ky, p.sh, p.dh, p.ph, p.h);
            if (iy < 0) {
                continue;
            }
            for (var kx = 0u; kx < p.kw; kx++) {
                let ix = tap(ox, kx, p.sw, p.dw, p.pw, p.w);
                if (ix < 0) {
                    continue;
                }
                taps += 1u;
                let a_base = ((n * p.h + u32(iy)) * p.w + u32(ix)) * in_words + g * cig4;
                let w_base = ((co * p.kh + ky) * p.kw + kx) * cig4;
                for (var c = 0u; c < cig4; c++) {
                    let a = in_codes[a_base + c];
                    let wc = w_codes[w_base + c];
                    s_aw += dot4U8Packed(a, wc);
                    s_a += dot4U8Packed(a, 0x01010101u);
                    s_w += dot4U8Packed(0x01010101u, wc);
                }
            }
        }
        let zw = i32(w_zero[co]);
        let k = i32(taps * cig);
        let acc = i32(s_aw) + zw * i32(s_a) + za * i32(s_w) + k * za * zw;
        z[j] = f32(acc + bias_int[co]) * scale[co] + bias[co];
    }
    store(pix, slot.y * 4u, z);
}

// IAO codes of one quantizer to another's: the value (q + zp) s, then the next quantizer, in
// the f32 steps fake quantization takes.
@compute @workgroup_size(256)
fn requant_iao(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let cw = words(p.cin);
    if (i >= p.batch * p.h * p.w * cw) {
        return;
    }
    let word_in = in_codes[i];
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        if ((i % cw) * 4u + j < p.cin) {
            word |= iao_code(iao_value((word_in >> (8u * j)) & 0xffu)) << (8u * j);
        }
    }
    out_codes[i] = word;
}

// IAO codes to their values (floats, channels-last).
@compute @workgroup_size(256)
fn dequant_iao(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.batch * p.h * p.w * p.cin) {
        return;
    }
    let c = i % p.cin;
    let pix = i / p.cin;
    let u = (in_codes[pix * words(p.cin) + c / 4u] >> (8u * (c % 4u))) & 0xffu;
    out_float[i] = iao_value(u);
}

// IAO's QuantAdd: the values of two code tensors of one space (p.in_*) added, the block's ReLU,
// then floats or the next quantizer's codes (store). Thread: a pixel's channels 4q..4q+3.
@compute @workgroup_size(256)
fn add_iao(@builtin(workgroup_id) wid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let slot = output_slot(i);
    let pix = slot.x;
    if (pix >= p.batch * p.oh * p.ow) {
        return;
    }
    let word = pix * words(p.cout) + slot.y;
    let a = in_codes[word];
    let b = in_codes2[word];
    var z = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (slot.y * 4u + j < p.cout) {
            z[j] = iao_value((a >> (8u * j)) & 0xffu) + iao_value((b >> (8u * j)) & 0xffu);
        }
    }
    store(pix, slot.y * 4u, z);
}

// ---------------------------------------------------------------------------------------------
// Binary networks (micronet's wbwtab): binary activations ±1 as bits, 32 channels per word
// (bit 1 is +1; unused lanes 0), a pixel holding ceil(C/32) words.

fn words32(c: u32) -> u32 {
    return (c + 31u) / 32u;
}

// The binary activation B(x) (sign, 0 -> +1) of float activations, as bits: one thread per word.
@compute @workgroup_size(256)
fn sign_pack(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let cw = words32(p.cin);
    if (i >= p.batch * p.h * p.w * cw) {
        return;
    }
    let pix = i / cw;
    let c0 = (i % cw) * 32u;
    var word = 0u;
    for (var j = 0u; j < 32u; j++) {
        if (c0 + j < p.cin && in_float[pix * p.cin + c0 + j] >= 0.0) {
            word |= 1u << j;
        }
    }
    out_codes[i] = word;
}

// Bits back to ±1 floats (for a float layer reading binary activations).
@compute @workgroup_size(256)
fn unpack_bits(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.batch * p.h * p.w * p.cin) {
        return;
    }
    let c = i % p.cin;
    let pix = i / p.cin;
    let bit = (in_codes[pix * words32(p.cin) + c / 32u] >> (c % 32u)) & 1u;
    out_float[i] = select(-1.0, 1.0, bit == 1u);
}

// Max-pool of ±1 bits: +1 where any tap is +1 (an OR).
@compute @workgroup_size(256)
fn maxpool_bits(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let cw = words32(p.cin);
    if (i >= p.batch * p.oh * p.ow * cw) {
        return;
    }
    let c = i % cw;
    let pix = i / cw;
    let n = pix / (p.oh * p.ow);
    let oy = (pix % (p.oh * p.ow)) / p.ow;
    let ox = pix % p.ow;
    var any = 0u;
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = tap(oy, ky, p.sh, 1u, p.ph, p.h);
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = tap(ox, kx, p.sw, 1u, p.pw, p.w);
            if (iy >= 0 && ix >= 0) {
                any |= in_codes[((n * p.h + u32(iy)) * p.w + u32(ix)) * cw + c];
            }
        }
    }
    out_codes[i] = any;
}

// micronet's channel shuffle of bits.
@compute @workgroup_size(256)
fn shuffle_bits(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let cw = words32(p.cin);
    if (i >= p.batch * p.h * p.w * cw) {
        return;
    }
    let pix = i / cw;
    let g = p.shuffle_groups;
    let per = p.cin / g;
    var word = 0u;
    for (var j = 0u; j < 32u; j++) {
        let co = (i % cw) * 32u + j;
        if (co < p.cin) {
            let ci = (co % g) * per + co / g;
            word |= ((in_codes[pix * cw + ci / 32u] >> (ci % 32u)) & 1u) << j;
        }
    }
    out_codes[i] = word;
}

// `n` (1..=32) activation bits of a pixel starting at channel `start`, in the low bits.
fn bits_at(pix_base: u32, start: u32, n: u32, in_words: u32) -> u32 {
    let w = start / 32u;
    let off = start % 32u;
    var v = in_codes[pix_base + w] >> off;
    if (off > 0u && w + 1u < in_words) {
        v |= in_codes[pix_base + w + 1u] << (32u - off);
    }
    return select(v & ((1u << n) - 1u), v, n == 32u);
}

// A binary conv on bits: per output channel the ±1 activations against binary weights ±1
// (dot = K - 2 popcount(a xor w) over the K real terms, a group's channels gathered into words
// from any bit offset; lanes past them are 0 in both, so they agree and count in no K), or
// ternary weights as two planes (dot = agree(+) - disagree(+) - agree(-) + disagree(-)), then z = dot * scale + bias (alpha and the BatchNorm folded), and
// B(z) as bits (OUT_BITS) or z. Thread: a pixel's output channels 32q..32q+31.
@compute @workgroup_size(256)
fn conv_xnor(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let ow32 = words32(p.cout);
    let pix = i / ow32;
    let q = i % ow32;
    if (pix >= p.batch * p.oh * p.ow) {
        return;
    }
    let n = pix / (p.oh * p.ow);
    let r = pix % (p.oh * p.ow);
    let oy = r / p.ow;
    let ox = r % p.ow;
    let cig = p.cin / p.groups;
    let cig32 = words32(cig);
    let cog = p.cout / p.groups;
    let in_words = words32(p.cin);
    var word = 0u;
    for (var j = 0u; j < 32u; j++) {
        let co = q * 32u + j;
        if (co >= p.cout) {
            break;
        }
        let g = co / cog;
        var dot = 0i;
        for (var ky = 0u; ky < p.kh; ky++) {
            let iy = tap(oy, ky, p.sh, p.dh, p.ph, p.h);
            if (iy < 0) {
                continue;
            }
            for (var kx = 0u; kx < p.kw; kx++) {
                let ix = tap(ox, kx, p.sw, p.dw, p.pw, p.w);
                if (ix < 0) {
                    continue;
                }
                let pix_base = ((n * p.h + u32(iy)) * p.w + u32(ix)) * in_words;
                let w_base = ((co * p.kh + ky) * p.kw + kx) * cig32;
                for (var c = 0u; c < cig32; c++) {
                    let real = min(cig - c * 32u, 32u);
                    let a = bits_at(pix_base, g * cig + c * 32u, real, in_words);
                    let wp = w_pos[w_base + c];
                    if (TERNARY) {
                        let wn = w_neg[w_base + c];
                        dot += i32(countOneBits(wp & a)) - i32(countOneBits(wp & ~a))
                            - i32(countOneBits(wn & a)) + i32(countOneBits(wn & ~a));
                    } else {
                        dot += i32(real) - 2 * i32(countOneBits(a ^ wp));
                    }
                }
            }
        }
        let z = f32(dot) * scale[co] + bias[co];
        if (OUT_BITS) {
            word |= select(0u, 1u << j, z >= 0.0);
        } else {
            out_float[pix * p.cout + co] = z;
        }
    }
    if (OUT_BITS) {
        out_codes[pix * ow32 + q] = word;
    }
}
