// Grad-input of a quantized conv2d on cooperative matrices (tensor cores), for the adapters
// conv_coop.wgsl runs on. conv2d.wgsl's MODE 1 GEMM per group: dx[ci][n] = sum over k = (co, tap)
// of w[co][ci][tap] * dy[co][the output pixel that tap joins to input pixel n] (M = Cin/g,
// N = batch*H*W, K = Cout/g*KH*KW), then that kernel's epilogue: the input quantizer's
// straight-through mask (ACT_GRAD 1; 2: also x requantized in place), or with IN_BN the mask of
// the input formed from the BatchNorm before and that BatchNorm's backward sums (BN_SUMS).
//
// w holds DoReFa weight levels c_w / n_w: their codes c_w in -n_w..n_w are exact in f16. dy is a
// float gradient and goes through f16 in two halves: each column n of B (its terms, dy over the
// group's channels at the output pixels the taps join to input pixel n) is scaled by the power
// of two S_n that puts its largest magnitude in [2^14, 2^15) (lib/coop_backward.wgsl), then
// hi = f16(dy S_n) and lo = f16(dy S_n - hi). Both halves times a code are exact products in the
// f32 accumulator; the epilogue multiplies by 1 / S_n (exact) and fl32(1 / n_w). The result is
// conv2d.wgsl's up to the rounding of the split and of the sums.
//
// The scales come from a first sweep over the output pixels the tile's columns read (a window of
// them in batch-major order): each invocation takes pixels and finds, over the group's channels,
// their largest magnitude, into workgroup memory; each column then takes the largest over its
// taps. That sweep also brings the tile's dy into the cache for the GEMM. (Where the window is
// too large for workgroup memory, as in images more than about 128 pixels wide, each column reads
// its terms for their largest itself.)
//
// A workgroup of four 32-wide subgroups computes a 128 x 128 tile, each subgroup a 64 x 64
// quarter as 4 x 4 16x16 matrices, K advancing 16 at a time through workgroup memory (rows
// padded to 16-byte multiples): weight codes staged in quads of four rows (one vec4 where the
// weight runs along them, VEC_W), dy in quads of four columns (one vec4 for a pointwise conv,
// VEC_DY), each invocation's columns decoded once; a subgroup's 16-row blocks past M (a group
// of 16 input channels fills one) skip their multiply-adds. With OUT_BN, dy is formed from the
// conv output and the BatchNorm's output gradient as conv2d.wgsl's OUT_BN forms it.
//
// Lavapipe has no cooperative matrices: src/kernels/conv_coop/mod.rs derives a plain-WGSL emulation
// of this file, as of conv_coop.wgsl, which the tests run against the f64 reference.

enable f16;
enable wgpu_cooperative_matrix;
// The skipped blocks' branches are uniform in the subgroup, not the workgroup (see conv_coop.wgsl).
diagnostic(off, derivative_uniformity);

// The input quantizer's backward in the epilogue (conv2d.wgsl's ACT_GRAD): 0 none, 1 the mask
// from act_x, 2 also act_x replaced by its quantized value.
override ACT_GRAD: u32 = 0u;
override IN_BN: bool = false;
override IN_ACT: u32 = 0u;
override IN_SHUFFLE: u32 = 1u;
// BN_SUMS (with IN_BN, ACT_GRAD 1): per 128-column tile t and BatchNorm channel c, sum dy' and sum
// dy' * xhat (dy' = dx after that BatchNorm's activation mask) at bn_part[(2 t) * CIN + c] and
// bn_part[(2 t + 1) * CIN + c], as conv2d.wgsl's BN_SUMS: each invocation adds its 8-value runs in
// order, then one invocation per row adds the row's four writers in order.
override BN_SUMS: bool = false;
// DX_PLUS: another reader's gradient of the layer input added to each dx as it is written
// (conv2d.wgsl's DX_PLUS).
override DX_PLUS: bool = false;
override OUT_BN: bool = false;
override OUT_ACT: u32 = 0u;
override OUT_SHUFFLE: u32 = 1u;
// n_w and fl32(1 / n_w); n_a and fl32(1 / n_a) of the input quantizer (conv2d.wgsl's names;
// lib/coop_conv.wgsl's A_LEVELS and A_INV_LEVELS follow them).
override W_LEVELS: f32 = 1.0;
override W_INV_LEVELS: f32 = 1.0;
override ACT_LEVELS: f32 = 1.0;
override ACT_INV_LEVELS: f32 = 1.0;
override A_LEVELS: f32 = ACT_LEVELS;
override A_INV_LEVELS: f32 = ACT_INV_LEVELS;
// VEC_W: a 1x1 conv whose groups have a multiple of 4 input channels (four rows of a K step in
// one aligned vec4 of w). VEC_DY: a pointwise conv whose images have a multiple of 4 pixels
// (four columns in one aligned vec4 of dy).
override VEC_W: bool = false;
override VEC_DY: bool = false;
// The geometry (CIN .. OHW) is in lib/coop_conv.wgsl.
override GK: u32 = COG * KHW;
override HW: u32 = H * W;

const BM: u32 = 128u;
const BN: u32 = 128u;
const BK: u32 = 16u;
// Row strides, in halves, of the staged A ([m][k]) and B ([k][n], hi and lo) tiles.
const AS: u32 = BK + 8u;
const BS: u32 = BN + 8u;

struct Params {
    gn: u32,    // N: batch * H * W
    batch: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// The weight levels.
@group(0) @binding(1) var<storage, read> w_src: array<f32>;
// dy, or with OUT_BN the conv's output.
@group(0) @binding(2) var<storage, read> dy_src: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// ACT_GRAD: the float input x (with IN_BN: the BatchNorm's input).
@group(0) @binding(4) var<storage, read_write> act_x: array<f32>;
@group(0) @binding(5) var<storage, read> in_bn: array<f32>;
// BN_SUMS: (tiles, 2, CIN).
@group(0) @binding(6) var<storage, read_write> bn_part: array<f32>;
// OUT_BN: the BatchNorm's output gradient and its table.
@group(0) @binding(7) var<storage, read> out_dy: array<f32>;
@group(0) @binding(8) var<storage, read> out_bn: array<f32>;
// w_src and dy_src as vec4s (VEC_W, VEC_DY).
@group(0) @binding(9) var<storage, read> w_src4: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read> dy_src4: array<vec4<f32>>;
// DX_PLUS: the other reader's gradient of the layer input.
@group(0) @binding(11) var<storage, read> dx_plus: array<f32>;

var<workgroup> a_sh: array<f16, 3072>;   // BM * AS
var<workgroup> b_sh: array<f16, 2176>;   // BK * BS: the hi halves
var<workgroup> b_lo: array<f16, 2176>;   // the lo halves
var<workgroup> c_sh: array<f32, 2048>;   // two 16x16 staging tiles per subgroup
// Per column of the tile, S and 1 / S.
var<workgroup> col_s: array<f32, 128>;
var<workgroup> col_unscale: array<f32, 128>;
// The sweep: the largest magnitude over the group's channels of each output pixel of the
// window, where it has at most WINDOW of them.
const WINDOW: u32 = 512u;
var<workgroup> pix_max: array<f32, WINDOW>;

alias MA = coop_mat16x16<f16, A>;
alias MB = coop_mat16x16<f16, B>;
alias MC = coop_mat16x16<f32, C>;

// BatchNorm count of the BatchNorm after (OUT_BN).
fn count() -> f32 {
    return f32(p.batch * OHW);
}

// The window of output pixels (batch-major: b * OHW + oy * OW + ox) the tile's columns read:
// from the first row that can join the first column's input row to the last row that can join
// the last column's, whole rows (a superset; empty where no tap reaches an output).
struct Window {
    lo: u32,
    len: u32,
}

fn window(n0: u32) -> Window {
    let n1 = min(n0 + BN, p.gn) - 1u;
    let b0 = n0 / HW;
    let b1 = n1 / HW;
    let iy0 = (n0 - b0 * HW) / W;
    let iy1 = (n1 - b1 * HW) / W;
    let top = i32(iy0 + PH) - i32((KH - 1u) * DH);
    let oy0 = select(0u, u32(top) / SH, top > 0);
    let oy1 = min(OH - 1u, (iy1 + PH) / SH);
    let lo = b0 * OHW + oy0 * OW;
    let hi = b1 * OHW + oy1 * OW + OW;
    return Window(lo, select(0u, hi - lo, hi > lo));
}

// The largest magnitude over the group's channels of dy at output pixel o (batch-major).
fn pixel_max(g: u32, o: u32) -> f32 {
    let b = o / OHW;
    let pix = o - b * OHW;
    var mx = 0.0;
    for (var c = 0u; c < COG; c++) {
        let co = g * COG + c;
        var t: OutBn;
        if (OUT_BN) {
            t = out_bn_of(co);
        }
        mx = max(mx, abs(dy_value(t, b, pix, dy_src[(b * COUT + co) * OHW + pix], count())));
    }
    return mx;
}

// The sweep: pix_max of every pixel of the window, where it fits in WINDOW.
fn sweep(lid: u32, g: u32, win: Window) {
    if (win.len > WINDOW) {
        return;
    }
    for (var q = lid; q < win.len; q += 128u) {
        pix_max[q] = pixel_max(g, win.lo + q);
    }
}

// S and 1 / S of column n0 + lid into col_s and col_unscale, from the largest magnitude over
// its taps' output pixels (exactly the terms of the column): from pix_max, or where the window
// did not fit, from dy itself.
fn column_scale(lid: u32, g: u32, n0: u32, win: Window) {
    let n = n0 + lid;
    var mx = 0.0;
    if (n < p.gn) {
        let b = n / HW;
        let pix = n - b * HW;
        let iy = pix / W;
        let ix = pix - iy * W;
        for (var kh = 0u; kh < KH; kh++) {
            let sy = i32(iy + PH) - i32(kh * DH);
            if (sy < 0 || u32(sy) % SH != 0u || u32(sy) / SH >= OH) {
                continue;
            }
            for (var kw = 0u; kw < KW; kw++) {
                let sx = i32(ix + PW) - i32(kw * DW);
                if (sx < 0 || u32(sx) % SW != 0u || u32(sx) / SW >= OW) {
                    continue;
                }
                let o = b * OHW + (u32(sy) / SH) * OW + u32(sx) / SW;
                if (win.len <= WINDOW) {
                    mx = max(mx, pix_max[o - win.lo]);
                } else {
                    mx = max(mx, pixel_max(g, o));
                }
            }
        }
    }
    let s = scale_for(mx);
    col_s[lid] = s;
    col_unscale[lid] = 1.0 / s;
}

// The columns this invocation stages in every K tile, n0 + 4 * (lid % 32) + j for j = 0..3,
// decoded once: their image (col_b) and where it starts in dy (col_base), their input pixel
// shifted by the padding (col_y, col_x; a column past N gets a row far out of range, so that
// every tap of it loads 0), and their scale (after column_scale).
var<private> col_b: array<u32, 4>;
var<private> col_base: array<u32, 4>;
var<private> col_y: array<i32, 4>;
var<private> col_x: array<i32, 4>;
var<private> col_scale: array<f32, 4>;

fn decode_columns(lid: u32, g: u32, n0: u32) {
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + 4u * (lid % 32u) + j;
        let b = min(n / HW, p.batch - 1u);
        let pix = n - b * HW;
        let iy = pix / W;
        col_b[j] = b;
        col_base[j] = b * (COUT * OHW);
        col_y[j] = select(i32(iy + PH), -0x40000000, n >= p.gn);
        col_x[j] = i32(pix - iy * W + PW);
        col_scale[j] = col_s[4u * (lid % 32u) + j];
    }
}

// Stages the K tile starting at k0: weight codes round(w * n_w) into a_sh (quads of four rows
// at one k; adjacent invocations take adjacent k), and dy S as hi and lo halves into b_sh and
// b_lo (quads of four columns at one k, with what depends on k alone found once per quad).
fn stage(lid: u32, g: u32, m0: u32, k0: u32) {
    for (var e = 0u; e < 4u; e++) {
        let i = lid + 128u * e;
        let kk = i % BK;
        let m = 4u * (i / BK);
        let k = k0 + kk;
        var v = vec4(0.0);
        if (k < GK) {
            let co = k / KHW;
            let tap = k - co * KHW;
            let base = (g * COG + co) * CIG + m0 + m;
            if (VEC_W) {
                // KHW = 1 and CIG a multiple of 4: the quad is wholly in the group's rows or past.
                if (m0 + m < CIG) {
                    v = w_src4[base / 4u];
                }
            } else {
                for (var r = 0u; r < 4u; r++) {
                    if (m0 + m + r < CIG) {
                        v[r] = w_src[(base + r) * KHW + tap];
                    }
                }
            }
        }
        let codes = round(v * W_LEVELS);
        a_sh[m * AS + kk] = f16(codes.x);
        a_sh[(m + 1u) * AS + kk] = f16(codes.y);
        a_sh[(m + 2u) * AS + kk] = f16(codes.z);
        a_sh[(m + 3u) * AS + kk] = f16(codes.w);
    }
    let nq = 4u * (lid % 32u);
    for (var e = 0u; e < 4u; e++) {
        let kk = lid / 32u + 4u * e;
        let k = k0 + kk;
        var v = vec4(0.0);
        if (k < GK) {
            let co = k / KHW;
            let r = k - co * KHW;
            let kh = r / KW;
            let ch = g * COG + co;
            var t: OutBn;
            if (OUT_BN) {
                t = out_bn_of(ch);
            }
            if (VEC_DY) {
                // A pointwise conv with images of a multiple of 4 pixels: the quad lies in one
                // image, wholly in or past the columns, at an aligned offset.
                if (col_y[0] >= 0) {
                    let pix = u32(col_y[0]) * W + u32(col_x[0]);
                    let y = dy_src4[(col_base[0] + ch * OHW + pix) / 4u];
                    let b = col_b[0];
                    v = vec4(dy_value(t, b, pix, y.x, count()),
                             dy_value(t, b, pix + 1u, y.y, count()),
                             dy_value(t, b, pix + 2u, y.z, count()),
                             dy_value(t, b, pix + 3u, y.w, count()));
                }
            } else {
                // Input pixel (iy, ix) receives output (oy, ox) through tap (kh, kw) when
                // oy * SH = iy + PH - kh * DH (and likewise for x).
                let ty = i32(kh * DH);
                let tx = i32((r - kh * KW) * DW);
                for (var j = 0u; j < 4u; j++) {
                    let sy = col_y[j] - ty;
                    let sx = col_x[j] - tx;
                    if (sy >= 0 && sx >= 0) {
                        let oy = u32(sy) / SH;
                        let ox = u32(sx) / SW;
                        if (oy * SH == u32(sy) && ox * SW == u32(sx) && oy < OH && ox < OW) {
                            let pix = oy * OW + ox;
                            v[j] = dy_value(t, col_b[j], pix,
                                            dy_src[col_base[j] + ch * OHW + pix], count());
                        }
                    }
                }
            }
        }
        let at = kk * BS + nq;
        for (var j = 0u; j < 4u; j++) {
            let scaled = v[j] * col_scale[j];
            let hi = f16(scaled);
            b_sh[at + j] = hi;
            b_lo[at + j] = f16(scaled - f32(hi));
        }
    }
}

var<private> m0: u32;
var<private> n0: u32;

// BN_SUMS: this invocation's sums of its row in each row block mi / 16.
var<private> sum_dy: array<f32, 4>;
var<private> sum_dyx: array<f32, 4>;

// dx at (row, col) of group g whose GEMM value is v, through the epilogue, written; adds it to
// the BatchNorm sums of row block k (BN_SUMS).
fn write_dx(g: u32, row: u32, col: u32, v: f32, k: u32) {
    let b = col / HW;
    let pix = col - b * HW;
    let i = (b * CIN + g * CIG + row) * HW + pix;
    var d = v;
    if (ACT_GRAD > 0u) {
        var xv: f32;
        if (IN_BN) {
            let sc = unshuffled(g * CIG + row);
            let bx = act_x[(b * CIN + sc) * HW + pix];
            xv = bn_activated(bx, sc);
            d = dorefa_act_grad(xv, v);
            if (BN_SUMS) {
                let t = sc * BN_TABLE;
                let mean = in_bn[t + BN_MEAN];
                let invstd = in_bn[t + BN_INVSTD];
                var gm = d;
                if (IN_ACT != ACT_NONE) {
                    let u = bn_affine(bx, mean, invstd, in_bn[t + BN_GAMMA], in_bn[t + BN_BETA]);
                    gm = select(0.0, d, act_passes(u, IN_ACT));
                }
                sum_dy[k] += gm;
                sum_dyx[k] += gm * ((bx - mean) * invstd);
            }
        } else {
            xv = act_x[i];
            d = dorefa_act_grad(xv, v);
        }
        if (ACT_GRAD == 2u) {
            act_x[i] = dorefa_act(xv, ACT_LEVELS, ACT_INV_LEVELS);
        }
    }
    if (DX_PLUS) {
        d = d + dx_plus[i];
    }
    out[i] = d;
}

// Writes the staged 16x16 results of every subgroup (subgroup s owns the quarter (s / 2, s % 2)):
// matrix (mi, nj) of each quarter, 8 values per invocation, unscaled. An invocation keeps one
// row (its BatchNorm sums are per row), the two invocations of a row taking alternate columns,
// so that each step writes 8 contiguous bytes per row (adjacent columns 2e and 2e + 1).
fn write_out(lid: u32, g: u32, mi: u32, nj: u32) {
    for (var e = 0u; e < 8u; e++) {
        let i = (lid / 2u) * 16u + 2u * e + lid % 2u;
        let s = i / 256u;
        let row = m0 + (s / 2u) * 64u + mi + (i % 256u) / 16u;
        let c = (s % 2u) * 64u + nj + i % 16u;
        let col = n0 + c;
        if (row < CIG && col < p.gn) {
            write_dx(g, row, col, (c_sh[staged_at(i, nj)] * col_unscale[c]) * W_INV_LEVELS,
                     mi / 16u);
        }
    }
}

// BN_SUMS, after the last write_out: every invocation's rows into c_sh (row R of the tile,
// writer w = column half * 2 + lane parity: (R * 4 + w) * 2), then invocation R adds row R's
// writers in order and writes the tile's sums at the row's BatchNorm channel.
fn write_sums(lid: u32, g: u32, tile: u32) {
    let s = lid / 32u;
    let w = (s % 2u) * 2u + lid % 2u;
    for (var k = 0u; k < 4u; k++) {
        let r = (s / 2u) * 64u + k * 16u + (lid % 32u) / 2u;
        c_sh[(r * 4u + w) * 2u] = sum_dy[k];
        c_sh[(r * 4u + w) * 2u + 1u] = sum_dyx[k];
    }
    workgroupBarrier();
    let row = m0 + lid;
    if (row >= CIG) {
        return;
    }
    var sdy = 0.0;
    var sdyx = 0.0;
    for (var v = 0u; v < 4u; v++) {
        sdy += c_sh[(lid * 4u + v) * 2u];
        sdyx += c_sh[(lid * 4u + v) * 2u + 1u];
    }
    let c = unshuffled(g * CIG + row);
    bn_part[(2u * tile) * CIN + c] = sdy;
    bn_part[(2u * tile + 1u) * CIN + c] = sdyx;
}

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg_id: u32) {
    let sg = sg_id;
    let wm = sg / 2u;
    let wn = sg % 2u;
    n0 = wid.x * BN;
    m0 = wid.y * BM;
    let g = wid.z;
    let win = window(n0);
    sweep(lid, g, win);
    workgroupBarrier();
    column_scale(lid, g, n0, win);
    workgroupBarrier();
    decode_columns(lid, g, n0);
    var acc00 = MC();
    var acc01 = MC();
    var acc02 = MC();
    var acc03 = MC();
    var acc10 = MC();
    var acc11 = MC();
    var acc12 = MC();
    var acc13 = MC();
    var acc20 = MC();
    var acc21 = MC();
    var acc22 = MC();
    var acc23 = MC();
    var acc30 = MC();
    var acc31 = MC();
    var acc32 = MC();
    var acc33 = MC();

    // Which of this subgroup's four 16-row blocks hold rows of dx: a block past them skips its
    // multiply-adds (and an epilogue round where neither subgroup row holds any is skipped).
    let live0 = m0 + wm * 64u < CIG;
    let live1 = m0 + wm * 64u + 16u < CIG;
    let live2 = m0 + wm * 64u + 32u < CIG;
    let live3 = m0 + wm * 64u + 48u < CIG;
    for (var k0 = 0u; k0 < GK; k0 += BK) {
        stage(lid, g, m0, k0);
        workgroupBarrier();
        // dy's hi and lo halves, then each 16-row block of weights that holds rows of dx
        // (live) multiplies both, the hi half first.
        let b0 = coopLoadT<MB>(&b_sh[wn * 64u + 0u], BS);
        let b1 = coopLoadT<MB>(&b_sh[wn * 64u + 16u], BS);
        let b2 = coopLoadT<MB>(&b_sh[wn * 64u + 32u], BS);
        let b3 = coopLoadT<MB>(&b_sh[wn * 64u + 48u], BS);
        let l0 = coopLoadT<MB>(&b_lo[wn * 64u + 0u], BS);
        let l1 = coopLoadT<MB>(&b_lo[wn * 64u + 16u], BS);
        let l2 = coopLoadT<MB>(&b_lo[wn * 64u + 32u], BS);
        let l3 = coopLoadT<MB>(&b_lo[wn * 64u + 48u], BS);
        if (live0) {
            let a0 = coopLoadT<MA>(&a_sh[(wm * 64u + 0u) * AS], AS);
            acc00 = coopMultiplyAdd(a0, b0, acc00);
            acc01 = coopMultiplyAdd(a0, b1, acc01);
            acc02 = coopMultiplyAdd(a0, b2, acc02);
            acc03 = coopMultiplyAdd(a0, b3, acc03);
            acc00 = coopMultiplyAdd(a0, l0, acc00);
            acc01 = coopMultiplyAdd(a0, l1, acc01);
            acc02 = coopMultiplyAdd(a0, l2, acc02);
            acc03 = coopMultiplyAdd(a0, l3, acc03);
        }
        if (live1) {
            let a1 = coopLoadT<MA>(&a_sh[(wm * 64u + 16u) * AS], AS);
            acc10 = coopMultiplyAdd(a1, b0, acc10);
            acc11 = coopMultiplyAdd(a1, b1, acc11);
            acc12 = coopMultiplyAdd(a1, b2, acc12);
            acc13 = coopMultiplyAdd(a1, b3, acc13);
            acc10 = coopMultiplyAdd(a1, l0, acc10);
            acc11 = coopMultiplyAdd(a1, l1, acc11);
            acc12 = coopMultiplyAdd(a1, l2, acc12);
            acc13 = coopMultiplyAdd(a1, l3, acc13);
        }
        if (live2) {
            let a2 = coopLoadT<MA>(&a_sh[(wm * 64u + 32u) * AS], AS);
            acc20 = coopMultiplyAdd(a2, b0, acc20);
            acc21 = coopMultiplyAdd(a2, b1, acc21);
            acc22 = coopMultiplyAdd(a2, b2, acc22);
            acc23 = coopMultiplyAdd(a2, b3, acc23);
            acc20 = coopMultiplyAdd(a2, l0, acc20);
            acc21 = coopMultiplyAdd(a2, l1, acc21);
            acc22 = coopMultiplyAdd(a2, l2, acc22);
            acc23 = coopMultiplyAdd(a2, l3, acc23);
        }
        if (live3) {
            let a3 = coopLoadT<MA>(&a_sh[(wm * 64u + 48u) * AS], AS);
            acc30 = coopMultiplyAdd(a3, b0, acc30);
            acc31 = coopMultiplyAdd(a3, b1, acc31);
            acc32 = coopMultiplyAdd(a3, b2, acc32);
            acc33 = coopMultiplyAdd(a3, b3, acc33);
            acc30 = coopMultiplyAdd(a3, l0, acc30);
            acc31 = coopMultiplyAdd(a3, l1, acc31);
            acc32 = coopMultiplyAdd(a3, l2, acc32);
            acc33 = coopMultiplyAdd(a3, l3, acc33);
        }
        workgroupBarrier();
    }
    if (m0 + 0u < CIG) {
        // Two 16x16 results of each subgroup's row block at a time (see staged_at).
        {
            let ci = sg * 512u + 0u;
            let cv = acc00;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        {
            let ci = sg * 512u + 256u;
            let cv = acc01;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        workgroupBarrier();
        write_out(lid, g, 0u, 0u);
        write_out(lid, g, 0u, 16u);
        workgroupBarrier();
        {
            let ci = sg * 512u + 0u;
            let cv = acc02;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        {
            let ci = sg * 512u + 256u;
            let cv = acc03;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        workgroupBarrier();
        write_out(lid, g, 0u, 32u);
        write_out(lid, g, 0u, 48u);
        workgroupBarrier();
    }
    if (m0 + 16u < CIG) {
        {
            let ci = sg * 512u + 0u;
            let cv = acc10;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        {
            let ci = sg * 512u + 256u;
            let cv = acc11;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        workgroupBarrier();
        write_out(lid, g, 16u, 0u);
        write_out(lid, g, 16u, 16u);
        workgroupBarrier();
        {
            let ci = sg * 512u + 0u;
            let cv = acc12;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        {
            let ci = sg * 512u + 256u;
            let cv = acc13;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        workgroupBarrier();
        write_out(lid, g, 16u, 32u);
        write_out(lid, g, 16u, 48u);
        workgroupBarrier();
    }
    if (m0 + 32u < CIG) {
        {
            let ci = sg * 512u + 0u;
            let cv = acc20;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        {
            let ci = sg * 512u + 256u;
            let cv = acc21;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        workgroupBarrier();
        write_out(lid, g, 32u, 0u);
        write_out(lid, g, 32u, 16u);
        workgroupBarrier();
        {
            let ci = sg * 512u + 0u;
            let cv = acc22;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        {
            let ci = sg * 512u + 256u;
            let cv = acc23;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        workgroupBarrier();
        write_out(lid, g, 32u, 32u);
        write_out(lid, g, 32u, 48u);
        workgroupBarrier();
    }
    if (m0 + 48u < CIG) {
        {
            let ci = sg * 512u + 0u;
            let cv = acc30;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        {
            let ci = sg * 512u + 256u;
            let cv = acc31;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        workgroupBarrier();
        write_out(lid, g, 48u, 0u);
        write_out(lid, g, 48u, 16u);
        workgroupBarrier();
        {
            let ci = sg * 512u + 0u;
            let cv = acc32;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        {
            let ci = sg * 512u + 256u;
            let cv = acc33;
            coopStoreT(cv, &c_sh[ci], 16u);
        }
        workgroupBarrier();
        write_out(lid, g, 48u, 32u);
        write_out(lid, g, 48u, 48u);
        workgroupBarrier();
    }
    if (BN_SUMS) {
        write_sums(lid, g, wid.x);
    }
}
