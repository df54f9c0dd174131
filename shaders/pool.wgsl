// Pooling (PyTorch semantics, floor mode) and channel shuffle, over NCHW planes.
//   max-pool: implicit -inf padding; each window's gradient goes to its first maximum in row-major
//     order (strict >), NaN propagates; overlapping windows add up. The backward finds each
//     window's maximum again from the input (the same function on the same values, so the same
//     element): no index map is stored between the passes.
//   avg-pool: count_include_pad: the divisor is always kh * kw.
// Backward passes are gathers over the windows that contain each input pixel: no atomics,
// deterministic.

struct Params {
    planes: u32,   // N * C
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    c: u32,        // channels (shuffle)
    groups: u32,   // shuffle groups (channel_shuffle; max-pool's output shuffle: 1 is none)
    inverse: u32,  // shuffle: 1 applies the inverse permutation (backward)
    quantize: u32, // max-pool: 1 writes the next layer's DoReFa-quantized input
    levels_f: f32, // the quantizer's f32(n) and fl32(1 / n) (shaders/lib/act.wgsl)
    inv_levels: f32,
    in_bn: u32,      // max-pool: 1 forms its input from a BatchNorm's (see input_value)
    in_relu: u32,    // ... with the BatchNorm's fused ReLU
    in_shuffle: u32, // ... and its fused shuffle's groups (1: none)
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
// in_bn: the BatchNorm's table (lib/bn.wgsl's BN_TABLE floats per channel).
@group(0) @binding(7) var<storage, read> bn_table: array<f32>;

const WG: u32 = 256u;

// NaN by bit pattern (float tests like `v != v` may be folded away by Vulkan compilers).
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

struct WindowMax {
    value: f32,
    at: u32,   // index within the H*W plane
}

// Where input plane `plane` is read: its start in x and, with in_bn, the BatchNorm channel it
// comes from. With in_bn the max-pool's input is a BatchNorm's output that is never stored: x
// holds the BatchNorm's input, and each element is formed as norm.wgsl's bn_apply would write it
// (affine map, ReLU, shuffle), so the same bits, in both directions.
// The channel's table is read once per plane, not per element: a window is read once per
// output in the forward and once per output containing an element in the backward.
struct Source {
    base: u32,
    bn: vec4<f32>, // [mean, invstd, gamma, beta] (in_bn)
}

fn source(plane: u32) -> Source {
    if (p.in_bn == 0u) {
        return Source(plane * p.h * p.w, vec4(0.0));
    }
    let n = plane / p.c;
    var sc = plane - n * p.c;
    if (p.in_shuffle > 1u) {
        sc = (sc % p.in_shuffle) * (p.c / p.in_shuffle) + sc / p.in_shuffle;
    }
    let bn = vec4(bn_table[sc * BN_TABLE + BN_MEAN], bn_table[sc * BN_TABLE + BN_INVSTD],
                  bn_table[sc * BN_TABLE + BN_GAMMA], bn_table[sc * BN_TABLE + BN_BETA]);
    return Source((n * p.c + sc) * p.h * p.w, bn);
}

fn input_value(src: Source, at: u32) -> f32 {
    let v = x[src.base + at];
    if (p.in_bn == 0u) {
        return v;
    }
    let r = bn_affine(v, src.bn.x, src.bn.y, src.bn.z, src.bn.w);
    return select(r, relu_bits(r), p.in_relu == 1u);
}

// The maximum of window (oy, ox) of the plane at `src` and where it is: the first element, a strictly larger
// one, or a NaN (which then sticks) wins.
fn window_max(src: Source, oy: u32, ox: u32) -> WindowMax {
    var best = WindowMax(-3.40282347e38, 0xffffffffu);
    var seen = false;
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = i32(oy * p.sh + ky) - i32(p.ph);
        if (iy < 0 || u32(iy) >= p.h) {
            continue;
        }
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = i32(ox * p.sw + kx) - i32(p.pw);
            if (ix < 0 || u32(ix) >= p.w) {
                continue;
            }
            let at = u32(iy) * p.w + u32(ix);
            let v = input_value(src, at);
            if (!seen || (!is_nan(best.value) && (v > best.value || is_nan(v)))) {
                best = WindowMax(v, at);
                seen = true;
            }
        }
    }
    return best;
}

// The plane (n, c) of a max-pool output after the fused channel shuffle (micronet's: channel c
// goes to (c % per) * g + c / per, as channel_shuffle below and BatchNorm's fused one).
fn shuffled_plane(plane: u32) -> u32 {
    if (p.groups <= 1u) {
        return plane;
    }
    let n = plane / p.c;
    let c = plane - n * p.c;
    let per = p.c / p.groups;
    return n * p.c + (c % per) * p.groups + c / per;
}

// Max-pool, with the channel shuffle that follows it and the next layer's activation quantizer
// fused where the network asks: the unshuffled or float output never exists.
@compute @workgroup_size(256)
fn maxpool_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let ohw = p.oh * p.ow;
    if (i >= p.planes * ohw) {
        return;
    }
    let plane = i / ohw;
    let r = i - plane * ohw;
    let oy = r / p.ow;
    let v = window_max(source(plane), oy, r - oy * p.ow).value;
    y[shuffled_plane(plane) * ohw + r] = select(v, dorefa_act(v, p.levels_f, p.inv_levels), p.quantize == 1u);
}

// Output windows (along one axis) that contain input index i: o with o*s - p <= i < o*s - p + k.
fn window_range(i: u32, k: u32, s: u32, pad: u32, n_out: u32) -> vec2<u32> {
    let top = i + pad;                            // o*s <= top
    let hi = min(top / s, n_out - 1u);
    var lo = 0u;
    if (top + 1u > k) {
        lo = (top + 1u - k + s - 1u) / s;         // o*s > top - k
    }
    return vec2<u32>(lo, hi + 1u);
}

@compute @workgroup_size(256)
fn maxpool_backward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let hw = p.h * p.w;
    if (i >= p.planes * hw) {
        return;
    }
    let plane = i / hw;
    let at = i - plane * hw;
    let iy = at / p.w;
    let ix = at - iy * p.w;
    let ry = window_range(iy, p.kh, p.sh, p.ph, p.oh);
    let rx = window_range(ix, p.kw, p.sw, p.pw, p.ow);
    // The output's gradient, where the fused shuffle put the output.
    let out_plane = shuffled_plane(plane);
    let src = source(plane);
    var acc = 0.0;
    for (var oy = ry.x; oy < ry.y; oy++) {
        for (var ox = rx.x; ox < rx.y; ox++) {
            if (window_max(src, oy, ox).at == at) {
                acc += dy[(out_plane * p.oh + oy) * p.ow + ox];
            }
        }
    }
    dx[i] = acc;
}

@compute @workgroup_size(256)
fn avgpool_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let ohw = p.oh * p.ow;
    if (i >= p.planes * ohw) {
        return;
    }
    let plane = i / ohw;
    let r = i - plane * ohw;
    let oy = r / p.ow;
    let ox = r - oy * p.ow;
    let base = plane * p.h * p.w;
    var acc = 0.0;
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = i32(oy * p.sh + ky) - i32(p.ph);
        if (iy < 0 || u32(iy) >= p.h) {
            continue;
        }
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = i32(ox * p.sw + kx) - i32(p.pw);
            if (ix >= 0 && u32(ix) < p.w) {
                acc += x[base + u32(iy) * p.w + u32(ix)];
            }
        }
    }
    y[i] = acc / f32(p.kh * p.kw);
}

@compute @workgroup_size(256)
fn avgpool_backward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let hw = p.h * p.w;
    if (i >= p.planes * hw) {
        return;
    }
    let plane = i / hw;
    let at = i - plane * hw;
    let iy = at / p.w;
    let ix = at - iy * p.w;
    let ry = window_range(iy, p.kh, p.sh, p.ph, p.oh);
    let rx = window_range(ix, p.kw, p.sw, p.pw, p.ow);
    var acc = 0.0;
    for (var oy = ry.x; oy < ry.y; oy++) {
        for (var ox = rx.x; ox < rx.y; ox++) {
            acc += dy[(plane * p.oh + oy) * p.ow + ox];
        }
    }
    dx[i] = acc / f32(p.kh * p.kw);
}

// Channel shuffle (micronet): out[:, b*g + a] = in[:, a*(C/g) + b]. With `inverse`, the
// transposed permutation (the backward). Reads x (binding 1), writes y (binding 2).
@compute @workgroup_size(256)
fn channel_shuffle(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let hw = p.h * p.w;
    if (i >= p.planes * hw) {
        return;
    }
    let plane = i / hw;
    let n = plane / p.c;
    let co = plane - n * p.c;
    let per = p.c / p.groups;
    var ci: u32;
    if (p.inverse == 0u) {
        ci = (co % p.groups) * per + co / p.groups;
    } else {
        ci = (co % per) * p.groups + co / per;
    }
    y[i] = x[(n * p.c + ci) * hw + (i - plane * hw)];
}
