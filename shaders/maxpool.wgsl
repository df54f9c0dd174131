// Max-pool over NCHW planes (PyTorch semantics, floor mode), forward and backward, with the
// layers around it fused where the network asks: its input formed from a BatchNorm's (IN_BN),
// its output shuffled (OUT_SHUFFLE) and quantized for the next layer (QUANTIZE).
//   Implicit -inf padding; each window's gradient goes to its first maximum in row-major order
//   (strict >), NaN propagates; overlapping windows add up. The backward finds each window's
//   maximum again from the input (the same function on the same values, so the same element):
//   no index map is stored between the passes. Backward passes are gathers over the windows
//   that contain each input element: no atomics, deterministic.
// The layer's geometry is pipeline constants (one pipeline per layer and direction), so the
// index math divides by constants; only the plane count (batch * C) is a uniform.

override H: u32 = 1u;
override W: u32 = 1u;
override OH: u32 = 1u;
override OW: u32 = 1u;
override KH: u32 = 1u;
override KW: u32 = 1u;
override SH: u32 = 1u;
override SW: u32 = 1u;
override PH: u32 = 0u;
override PW: u32 = 0u;
override C: u32 = 1u;
// The channel shuffle after the max-pool, in OUT_SHUFFLE groups (1: none).
override OUT_SHUFFLE: u32 = 1u;
// The next layer's DoReFa activation quantizer, applied as the output is written, with f32(n)
// and fl32(1 / n) (shaders/lib/act.wgsl).
override QUANTIZE: bool = false;
override ACT_LEVELS: f32 = 1.0;
override ACT_INV_LEVELS: f32 = 1.0;
// IN_BN: the input is a BatchNorm's output that is never stored: x holds the BatchNorm's input
// and each element is formed as norm.wgsl's bn_apply would write it (affine map, the activation
// IN_ACT (lib/bn.wgsl's ACT_*), the shuffle in IN_SHUFFLE groups), so the same bits, in both
// directions.
override IN_BN: bool = false;
override IN_ACT: u32 = 0u;
override IN_SHUFFLE: u32 = 1u;
// maxpool_backward_banded with BN_SUMS (and IN_BN): the sums of the backward of the BatchNorm
// that IN_BN forms, whose output gradient is the dx written here: per plane (n, c) and band,
// sum dx' and sum dx' * xhat (dx' = dx after that BatchNorm's activation mask) at
// bn_part[(2 t) * C + sc] and bn_part[(2 t + 1) * C + sc], for tile t = n * BANDS + band and
// BatchNorm channel sc. Each invocation adds its elements in order, then a tree over the
// plane's invocations (fixed order); norm.wgsl's bn_backward_merge adds the tiles in order. That saves
// the BatchNorm's reduction pass over its input and output gradient.
override BN_SUMS: bool = false;
// maxpool_backward_banded: input rows per band, bands per plane, and planes per workgroup (1
// unless a plane is one band; a power of two, at most PACK_CAP).
override BAND_ROWS: u32 = H;
override BANDS: u32 = 1u;
override PLANE_PACK: u32 = 1u;
override HW: u32 = H * W;
override OHW: u32 = OH * OW;

struct Params {
    planes: u32,   // N * C
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
// IN_BN: the BatchNorm's table (lib/bn.wgsl's BN_TABLE floats per channel).
@group(0) @binding(7) var<storage, read> bn_table: array<f32>;
// BN_SUMS: the BatchNorm backward's sums, (N * BANDS, 2, C).
@group(0) @binding(8) var<storage, read_write> bn_part: array<f32>;

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

// Where input plane `plane` is read: its start in x and, with IN_BN, the BatchNorm channel's
// [mean, invstd, gamma, beta], read once per plane (or window), not per element.
struct Source {
    base: u32,
    bn: vec4<f32>,
}

// IN_BN: the BatchNorm channel that input channel c comes from (through the shuffle).
fn bn_channel(c: u32) -> u32 {
    if (IN_SHUFFLE > 1u) {
        return (c % IN_SHUFFLE) * (C / IN_SHUFFLE) + c / IN_SHUFFLE;
    }
    return c;
}

fn source(plane: u32) -> Source {
    if (!IN_BN) {
        return Source(plane * HW, vec4(0.0));
    }
    let n = plane / C;
    let sc = bn_channel(plane - n * C);
    let t = sc * BN_TABLE;
    let bn = vec4(bn_table[t + BN_MEAN], bn_table[t + BN_INVSTD], bn_table[t + BN_GAMMA],
                  bn_table[t + BN_BETA]);
    return Source((n * C + sc) * HW, bn);
}

fn input_value(src: Source, at: u32) -> f32 {
    let v = x[src.base + at];
    if (!IN_BN) {
        return v;
    }
    let r = bn_affine(v, src.bn.x, src.bn.y, src.bn.z, src.bn.w);
    return bn_act(r, IN_ACT);
}

// The maximum of window (oy, ox) of the plane at `src` and where it is: the first element, a
// strictly larger one, or a NaN (which then sticks) wins.
fn window_max(src: Source, oy: u32, ox: u32) -> WindowMax {
    var best = WindowMax(-3.40282347e38, 0xffffffffu);
    var seen = false;
    for (var ky = 0u; ky < KH; ky++) {
        let iy = i32(oy * SH + ky) - i32(PH);
        if (iy < 0 || u32(iy) >= H) {
            continue;
        }
        for (var kx = 0u; kx < KW; kx++) {
            let ix = i32(ox * SW + kx) - i32(PW);
            if (ix < 0 || u32(ix) >= W) {
                continue;
            }
            let at = u32(iy) * W + u32(ix);
            let v = input_value(src, at);
            if (!seen || (!is_nan(best.value) && (v > best.value || is_nan(v)))) {
                best = WindowMax(v, at);
                seen = true;
            }
        }
    }
    return best;
}

// The plane (n, c) of the output after the fused channel shuffle (micronet's: channel c goes to
// (c % per) * g + c / per, as pool.wgsl's channel_shuffle and BatchNorm's fused one).
fn shuffled_plane(plane: u32) -> u32 {
    if (OUT_SHUFFLE <= 1u) {
        return plane;
    }
    let n = plane / C;
    let c = plane - n * C;
    let per = C / OUT_SHUFFLE;
    return n * C + (c % per) * OUT_SHUFFLE + c / per;
}

@compute @workgroup_size(256)
fn maxpool_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.planes * OHW) {
        return;
    }
    let plane = i / OHW;
    let r = i - plane * OHW;
    let oy = r / OW;
    let v = window_max(source(plane), oy, r - oy * OW).value;
    y[shuffled_plane(plane) * OHW + r] = select(v, dorefa_act(v, ACT_LEVELS, ACT_INV_LEVELS), QUANTIZE);
}

// The backward for rows too wide for a band: each element finds the maxima of the windows
// that contain it.
@compute @workgroup_size(256)
fn maxpool_backward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.planes * HW) {
        return;
    }
    let plane = i / HW;
    let at = i - plane * HW;
    let iy = at / W;
    let ix = at - iy * W;
    let ry = window_range(iy, KH, SH, PH, OH);
    let rx = window_range(ix, KW, SW, PW, OW);
    // The output's gradient, where the fused shuffle put the output.
    let out_plane = shuffled_plane(plane);
    let src = source(plane);
    var acc = 0.0;
    for (var oy = ry.x; oy < ry.y; oy++) {
        for (var ox = rx.x; ox < rx.y; ox++) {
            if (window_max(src, oy, ox).at == at) {
                acc += dy[(out_plane * OH + oy) * OW + ox];
            }
        }
    }
    dx[i] = acc;
}

// Window maxima of a band (maxpool_backward_banded), one u32 per window: where it is.
const WIN_CAP: u32 = 2048u;
var<workgroup> win_at: array<u32, WIN_CAP>;
const PACK_CAP: u32 = 8u;
// Invocations per packed plane (PLANE_PACK is a power of two).
override GROUP: u32 = WG / PLANE_PACK;
// BN_SUMS: the trees over each plane's invocations.
var<workgroup> red: array<vec2<f32>, WG>;

// The backward, a workgroup per band of BAND_ROWS input rows of one plane, or per PLANE_PACK
// whole planes where a plane is one band: first every window that covers the band (whole
// output rows, at most WIN_CAP windows in all: the host sizes bands and packs so) finds its
// maximum once, into win_at; then each input element of the band adds up the gradients of the
// windows whose maximum it is, in the same order as maxpool_backward (same bits). A window is
// read once instead of once per element it covers (up to 4 for NIN's 3x3 stride-2 pools).
@compute @workgroup_size(256)
fn maxpool_backward_banded(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let job = wid.x + wid.y * nwg.x;
    if (job >= (p.planes + PLANE_PACK - 1u) / PLANE_PACK * BANDS) {
        return;
    }
    let plane0 = job / BANDS * PLANE_PACK;
    let iy0 = (job % BANDS) * BAND_ROWS;
    let iy1 = min(iy0 + BAND_ROWS, H);
    // The window rows that cover input rows iy0..iy1 (none where floor mode leaves rows out).
    let oy0 = window_range(iy0, KH, SH, PH, OH).x;
    let oy1 = max(window_range(iy1 - 1u, KH, SH, PH, OH).y, oy0);
    // A plane is one band (BANDS 1, then oy0..oy1 is 0..OH) or PLANE_PACK is 1: written so that
    // either way the divisions below are by constants.
    let windows = select((oy1 - oy0) * OW, OHW, BANDS == 1u);
    let band = select((iy1 - iy0) * W, HW, BANDS == 1u);
    let packed = min(PLANE_PACK, p.planes - plane0);
    for (var t = lid; t < min(packed * windows, WIN_CAP); t += WG) {
        let q = select(t / windows, 0u, PLANE_PACK == 1u);
        let r = t - q * windows;
        let oy = r / OW;
        win_at[t] = window_max(source(plane0 + q), oy0 + oy, r - oy * OW).at;
    }
    workgroupBarrier();
    // Then GROUP invocations per packed plane: q's gather the gradients of plane q's elements
    // (and, BN_SUMS, add up their sums in order, then a tree within the group).
    let q = lid / GROUP;
    let plane = plane0 + q;
    var sums = vec2(0.0);
    if (q < packed) {
        let src = source(plane);
        let out_plane = shuffled_plane(plane);
        for (var e = lid % GROUP; e < band; e += GROUP) {
            let at = iy0 * W + e;
            let iy = at / W;
            let ix = at - iy * W;
            let ry = window_range(iy, KH, SH, PH, OH);
            let rx = window_range(ix, KW, SW, PW, OW);
            var acc = 0.0;
            for (var oy = ry.x; oy < ry.y; oy++) {
                for (var ox = rx.x; ox < rx.y; ox++) {
                    if (win_at[min(q * windows + (oy - oy0) * OW + ox, WIN_CAP - 1u)] == at) {
                        acc += dy[(out_plane * OH + oy) * OW + ox];
                    }
                }
            }
            dx[plane * HW + at] = acc;
            if (BN_SUMS) {
                let v = x[src.base + at];
                var g = acc;
                if (IN_ACT != ACT_NONE) {
                    let u = bn_affine(v, src.bn.x, src.bn.y, src.bn.z, src.bn.w);
                    g = select(0.0, acc, act_passes(u, IN_ACT));
                }
                sums += vec2(g, g * ((v - src.bn.x) * src.bn.y));
            }
        }
    }
    if (BN_SUMS) {
        red[lid] = sums;
        workgroupBarrier();
        for (var st = GROUP / 2u; st > 0u; st >>= 1u) {
            if (lid % GROUP < st) {
                red[lid] += red[lid + st];
            }
            workgroupBarrier();
        }
        if (lid % GROUP == 0u && q < packed) {
            let n = plane / C;
            let t = n * BANDS + job % BANDS;
            let sc = bn_channel(plane - n * C);
            bn_part[(2u * t) * C + sc] = red[lid].x;
            bn_part[(2u * t + 1u) * C + sc] = red[lid].y;
        }
    }
}
