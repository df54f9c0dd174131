// Grad-weight of a quantized conv2d on cooperative matrices (tensor cores), for the adapters
// conv_coop.wgsl runs on. conv2d.wgsl's MODE 2 GEMM per group and split: dW[co][n] = sum over
// the split's pixels k of dy[co][k] * x[k][n] (M = Cout/g, N = Cin/g*KH*KW, K = batch*OH*OW in
// chunks of p.k_chunk), written as that kernel writes it (split-K partials, or dW itself).
//
// x holds DoReFa activation levels k_a / n_a: their codes are exact in f16. dy is a float
// gradient and goes through f16 in two halves. Each row of A (one output channel's dy over the
// split) is first scaled by the power of two S that puts its largest magnitude in [2^14, 2^15),
// so nothing overflows and small gradients do not underflow; then hi = f16(dy S) and
// lo = f16(dy S - hi) hold dy S to about 22 bits (fewer for values under about 2^-17 of their
// row's largest, where lo is subnormal; none under about 2^-39). Both halves times a code are
// exact products in the f32 accumulator; the epilogue multiplies by 1 / S (exact) and
// fl32(1 / n_a). The result is conv2d.wgsl's up to the rounding of the split and of the sums.
//
// A first pass over the workgroup's rows (eight invocations per row, reading adjacent pixels)
// finds each row's largest magnitude and, with BIAS_GRAD, its sum: the bias gradient.
// Then a workgroup of four 32-wide subgroups computes a 128 x 128 tile, each subgroup a 64 x 64
// quarter as 4 x 4 16x16 matrices, K advancing 16 at a time through workgroup memory (rows
// padded to 16-byte multiples, staged in quads: four adjacent pixels of a dy row, four adjacent
// columns of an x row, with the columns decoded once); a subgroup's 16-row blocks past M, or
// all of them where its 64 columns lie past N, skip their multiply-adds. With OUT_BN, dy is
// formed from the conv output and the BatchNorm's output gradient as conv2d.wgsl's OUT_BN forms
// it; with IN_BN, x from the BatchNorm's input as conv2d.wgsl's IN_BN forms it (lib/bn.wgsl,
// lib/act.wgsl); with IN_QUANT alone, x is the layer's float input, quantized as it is loaded.
//
// Lavapipe has no cooperative matrices: src/kernels/conv_coop/mod.rs derives a plain-WGSL emulation
// of this file, as of conv_coop.wgsl, which the tests run against the f64 reference.

enable f16;
enable wgpu_cooperative_matrix;
// The skipped blocks' branches are uniform in the subgroup, not the workgroup (see conv_coop.wgsl).
diagnostic(off, derivative_uniformity);

override BIAS_GRAD: bool = false;
override IN_BN: bool = false;
override IN_ACT: u32 = 0u;
override IN_SHUFFLE: u32 = 1u;
override OUT_BN: bool = false;
override OUT_ACT: u32 = 0u;
override OUT_SHUFFLE: u32 = 1u;
// VEC_A: images of a multiple of 4 pixels, so four adjacent k of a dy row are one aligned vec4.
override VEC_A: bool = false;
// n_a and fl32(1 / n_a).
override A_LEVELS: f32 = 1.0;
override A_INV_LEVELS: f32 = 1.0;
// The geometry (CIN .. OHW) is in lib/coop_conv.wgsl.
override GN: u32 = CIG * KHW;

const BM: u32 = 128u;
const BN: u32 = 128u;
const BK: u32 = 16u;
// Row strides, in halves, of the staged A ([m][k], hi and lo) and B ([k][n]) tiles: multiples
// of 8 (16 bytes) that spread a matrix load's rows over the banks.
const AS: u32 = BK + 8u;
const BS: u32 = BN + 8u;

struct Params {
    gk: u32,      // K: batch * OH * OW (also the BatchNorm's count with OUT_BN)
    k_chunk: u32, // pixels per split, a multiple of BK
    splits: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// dy, or with OUT_BN the conv's output.
@group(0) @binding(1) var<storage, read> a_src: array<f32>;
// x (levels), or with IN_BN the BatchNorm's input.
@group(0) @binding(2) var<storage, read> b_src: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// BIAS_GRAD: (splits, Cout) partial sums.
@group(0) @binding(4) var<storage, read_write> bias_grad: array<f32>;
@group(0) @binding(5) var<storage, read> in_bn: array<f32>;
// OUT_BN: the BatchNorm's output gradient and its table.
@group(0) @binding(6) var<storage, read> out_dy: array<f32>;
@group(0) @binding(7) var<storage, read> out_bn: array<f32>;
// a_src as vec4s (VEC_A).
@group(0) @binding(8) var<storage, read> a_src4: array<vec4<f32>>;

var<workgroup> a_sh: array<f16, 3072>;   // BM * AS: the hi halves
var<workgroup> a_lo: array<f16, 3072>;   // the lo halves
var<workgroup> b_sh: array<f16, 2176>;   // BK * BS
var<workgroup> c_sh: array<f32, 2048>;   // two 16x16 staging tiles per subgroup
// Per row of the tile: S, and 1 / S.
var<workgroup> row_scale: array<f32, 128>;
var<workgroup> row_unscale: array<f32, 128>;

alias MA = coop_mat16x16<f16, A>;
alias MB = coop_mat16x16<f16, B>;
alias MC = coop_mat16x16<f32, C>;

// The first pass, over the workgroup's rows and the split's pixels: eight invocations per row
// (rows lid / 8 + 16 r, r = 0..7), invocation part = lid % 8 taking every eighth pixel from
// k_begin + part, so that adjacent invocations read adjacent pixels. It finds each row's largest
// magnitude (its scale) and, with BIAS_GRAD in the first column tile, its sum: the bias
// gradient, the eight partial sums added in order. The partials go through c_sh (free until the
// epilogue), row R's at c_sh[R * 8 + part].
fn row_pass(lid: u32, g: u32, m0: u32, k_begin: u32, k_stop: u32, first_column: bool,
            split: u32) {
    let part = lid % 8u;
    var mx: array<f32, 8>;
    var sum: array<f32, 8>;
    for (var r = 0u; r < 8u; r++) {
        let row = m0 + lid / 8u + 16u * r;
        if (row < COG) {
            let co = g * COG + row;
            var t: OutBn;
            if (OUT_BN) {
                t = out_bn_of(co);
            }
            for (var k = k_begin + part; k < k_stop; k += 8u) {
                let b = k / OHW;
                let pix = k - b * OHW;
                let v = dy_value(t, b, pix, a_src[(b * COUT + co) * OHW + pix], f32(p.gk));
                mx[r] = max(mx[r], abs(v));
                sum[r] += v;
            }
        }
    }
    for (var r = 0u; r < 8u; r++) {
        c_sh[(lid / 8u + 16u * r) * 8u + part] = mx[r];
    }
    workgroupBarrier();
    var m = 0.0;
    for (var i = 0u; i < 8u; i++) {
        m = max(m, c_sh[lid * 8u + i]);
    }
    let s = scale_for(m);
    row_scale[lid] = s;
    row_unscale[lid] = 1.0 / s;
    workgroupBarrier();
    if (BIAS_GRAD) {
        for (var r = 0u; r < 8u; r++) {
            c_sh[(lid / 8u + 16u * r) * 8u + part] = sum[r];
        }
    }
    workgroupBarrier();
    if (BIAS_GRAD && first_column && m0 + lid < COG) {
        var total = 0.0;
        for (var i = 0u; i < 8u; i++) {
            total += c_sh[lid * 8u + i];
        }
        bias_grad[(split * GROUPS + g) * COG + m0 + lid] = total;
    }
}

// The columns this invocation stages in every K tile, n0 + 4 * (lid % 32) + j for j = 0..3,
// decoded once: the channel plane of x they read (col_plane; their BatchNorm channel col_ch)
// and their tap's offset from the output pixel (col_ty, col_tx). A column past N gets an offset
// far out of range, so that it loads 0.
var<private> col_plane: array<u32, 4>;
var<private> col_ch: array<u32, 4>;
var<private> col_ty: array<i32, 4>;
var<private> col_tx: array<i32, 4>;

fn decode_columns(lid: u32, g: u32, n0: u32) {
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + 4u * (lid % 32u) + j;
        let ci = n / KHW;
        let r = n - ci * KHW;
        let kh = r / KW;
        let ch = unshuffled(g * CIG + min(ci, CIG - 1u));
        col_ch[j] = ch;
        col_plane[j] = ch * (H * W);
        col_ty[j] = select(i32(kh * DH) - i32(PH), -0x40000000, n >= GN);
        col_tx[j] = i32((r - kh * KW) * DW) - i32(PW);
    }
}

// Stages the K tile starting at k0 (0 from k_stop on): dy S as hi and lo halves into a_sh and
// a_lo, activation codes round(x * n_a) into b_sh, in quads.
fn stage(lid: u32, g: u32, m0: u32, k0: u32, k_stop: u32) {
    let kq = 4u * (lid % 4u);
    for (var e = 0u; e < 4u; e++) {
        let m = lid / 4u + 32u * e;
        var v = vec4(0.0);
        if (m0 + m < COG) {
            let co = g * COG + m0 + m;
            var t: OutBn;
            if (OUT_BN) {
                t = out_bn_of(co);
            }
            if (VEC_A) {
                // Images of a multiple of 4 pixels, chunks of a multiple of 16: the quad lies
                // in one image, wholly before k_stop or from it on.
                let k = k0 + kq;
                if (k < k_stop) {
                    let b = k / OHW;
                    let pix = k - b * OHW;
                    let y = a_src4[((b * COUT + co) * OHW + pix) / 4u];
                    let n = f32(p.gk);
                    v = vec4(dy_value(t, b, pix, y.x, n), dy_value(t, b, pix + 1u, y.y, n),
                             dy_value(t, b, pix + 2u, y.z, n), dy_value(t, b, pix + 3u, y.w, n));
                }
            } else {
                for (var j = 0u; j < 4u; j++) {
                    let k = k0 + kq + j;
                    if (k < k_stop) {
                        let b = k / OHW;
                        let pix = k - b * OHW;
                        v[j] = dy_value(t, b, pix, a_src[(b * COUT + co) * OHW + pix], f32(p.gk));
                    }
                }
            }
        }
        let scaled = v * row_scale[m];
        let at = m * AS + kq;
        for (var j = 0u; j < 4u; j++) {
            let hi = f16(scaled[j]);
            a_sh[at + j] = hi;
            a_lo[at + j] = f16(scaled[j] - f32(hi));
        }
    }
    let nq = 4u * (lid % 32u);
    for (var e = 0u; e < 4u; e++) {
        let kk = lid / 32u + 4u * e;
        let k = k0 + kk;
        var v = vec4(0.0);
        if (k < k_stop) {
            let b = k / OHW;
            let pix = k - b * OHW;
            let oy = pix / OW;
            let y0 = i32(oy * SH);
            let x0 = i32((pix - oy * OW) * SW);
            let base = b * (CIN * H * W);
            for (var j = 0u; j < 4u; j++) {
                let iy = y0 + col_ty[j];
                let ix = x0 + col_tx[j];
                if (iy >= 0 && ix >= 0 && u32(iy) < H && u32(ix) < W) {
                    v[j] = input_formed(b_src[base + col_plane[j] + u32(iy) * W + u32(ix)],
                                        col_ch[j]);
                }
            }
        }
        let at = kk * BS + nq;
        let codes = round(v * A_LEVELS);
        b_sh[at] = f16(codes.x);
        b_sh[at + 1u] = f16(codes.y);
        b_sh[at + 2u] = f16(codes.z);
        b_sh[at + 3u] = f16(codes.w);
    }
}

var<private> m0: u32;
var<private> n0: u32;

// Writes the staged 16x16 results of every subgroup (subgroup s owns the quarter (s / 2, s % 2)):
// matrix (mi, nj) of each quarter, 8 values per invocation (see staged_index), unscaled.
fn write_out(lid: u32, g: u32, split: u32, mi: u32, nj: u32) {
    for (var e = 0u; e < 8u; e++) {
        let i = staged_index(lid, e);
        let s = i / 256u;
        let r = (s / 2u) * 64u + mi + (i % 256u) / 16u;
        let row = m0 + r;
        let col = n0 + (s % 2u) * 64u + nj + i % 16u;
        if (row < COG && col < GN) {
            out[((split * GROUPS + g) * COG + row) * GN + col] =
                (c_sh[staged_at(i, nj)] * row_unscale[r]) * A_INV_LEVELS;
        }
    }
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
    let g = wid.z / p.splits;
    let split = wid.z % p.splits;
    let k_begin = split * p.k_chunk;
    let k_stop = min(p.gk, k_begin + p.k_chunk);
    row_pass(lid, g, m0, k_begin, k_stop, wid.x == 0u, split);
    decode_columns(lid, g, n0);
    workgroupBarrier();
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
    // Which of this subgroup's four 16-row blocks hold rows of dW, where its 64 columns hold
    // any: a block past them skips its multiply-adds (and an epilogue round that writes
    // nothing is skipped).
    let live_cols = n0 + wn * 64u < GN;
    let live0 = live_cols && m0 + wm * 64u < COG;
    let live1 = live_cols && m0 + wm * 64u + 16u < COG;
    let live2 = live_cols && m0 + wm * 64u + 32u < COG;
    let live3 = live_cols && m0 + wm * 64u + 48u < COG;
    for (var k0 = k_begin; k0 < k_stop; k0 += BK) {
        stage(lid, g, m0, k0, k_stop);
        workgroupBarrier();
        let b0 = coopLoadT<MB>(&b_sh[wn * 64u + 0u], BS);
        let b1 = coopLoadT<MB>(&b_sh[wn * 64u + 16u], BS);
        let b2 = coopLoadT<MB>(&b_sh[wn * 64u + 32u], BS);
        let b3 = coopLoadT<MB>(&b_sh[wn * 64u + 48u], BS);
        if (live0) {
            let hi = coopLoadT<MA>(&a_sh[(wm * 64u + 0u) * AS], AS);
            acc00 = coopMultiplyAdd(hi, b0, acc00);
            acc01 = coopMultiplyAdd(hi, b1, acc01);
            acc02 = coopMultiplyAdd(hi, b2, acc02);
            acc03 = coopMultiplyAdd(hi, b3, acc03);
            let lo = coopLoadT<MA>(&a_lo[(wm * 64u + 0u) * AS], AS);
            acc00 = coopMultiplyAdd(lo, b0, acc00);
            acc01 = coopMultiplyAdd(lo, b1, acc01);
            acc02 = coopMultiplyAdd(lo, b2, acc02);
            acc03 = coopMultiplyAdd(lo, b3, acc03);
        }
        if (live1) {
            let hi = coopLoadT<MA>(&a_sh[(wm * 64u + 16u) * AS], AS);
            acc10 = coopMultiplyAdd(hi, b0, acc10);
            acc11 = coopMultiplyAdd(hi, b1, acc11);
            acc12 = coopMultiplyAdd(hi, b2, acc12);
            acc13 = coopMultiplyAdd(hi, b3, acc13);
            let lo = coopLoadT<MA>(&a_lo[(wm * 64u + 16u) * AS], AS);
            acc10 = coopMultiplyAdd(lo, b0, acc10);
            acc11 = coopMultiplyAdd(lo, b1, acc11);
            acc12 = coopMultiplyAdd(lo, b2, acc12);
            acc13 = coopMultiplyAdd(lo, b3, acc13);
        }
        if (live2) {
            let hi = coopLoadT<MA>(&a_sh[(wm * 64u + 32u) * AS], AS);
            acc20 = coopMultiplyAdd(hi, b0, acc20);
            acc21 = coopMultiplyAdd(hi, b1, acc21);
            acc22 = coopMultiplyAdd(hi, b2, acc22);
            acc23 = coopMultiplyAdd(hi, b3, acc23);
            let lo = coopLoadT<MA>(&a_lo[(wm * 64u + 32u) * AS], AS);
            acc20 = coopMultiplyAdd(lo, b0, acc20);
            acc21 = coopMultiplyAdd(lo, b1, acc21);
            acc22 = coopMultiplyAdd(lo, b2, acc22);
            acc23 = coopMultiplyAdd(lo, b3, acc23);
        }
        if (live3) {
            let hi = coopLoadT<MA>(&a_sh[(wm * 64u + 48u) * AS], AS);
            acc30 = coopMultiplyAdd(hi, b0, acc30);
            acc31 = coopMultiplyAdd(hi, b1, acc31);
            acc32 = coopMultiplyAdd(hi, b2, acc32);
            acc33 = coopMultiplyAdd(hi, b3, acc33);
            let lo = coopLoadT<MA>(&a_lo[(wm * 64u + 48u) * AS], AS);
            acc30 = coopMultiplyAdd(lo, b0, acc30);
            acc31 = coopMultiplyAdd(lo, b1, acc31);
            acc32 = coopMultiplyAdd(lo, b2, acc32);
            acc33 = coopMultiplyAdd(lo, b3, acc33);
        }
        workgroupBarrier();
    }
    if (m0 + 0u < COG) {
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
        if (n0 + 0u < GN) {
            write_out(lid, g, split, 0u, 0u);
        }
        if (n0 + 16u < GN) {
            write_out(lid, g, split, 0u, 16u);
        }
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
        if (n0 + 32u < GN) {
            write_out(lid, g, split, 0u, 32u);
        }
        if (n0 + 48u < GN) {
            write_out(lid, g, split, 0u, 48u);
        }
        workgroupBarrier();
    }
    if (m0 + 16u < COG) {
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
        if (n0 + 0u < GN) {
            write_out(lid, g, split, 16u, 0u);
        }
        if (n0 + 16u < GN) {
            write_out(lid, g, split, 16u, 16u);
        }
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
        if (n0 + 32u < GN) {
            write_out(lid, g, split, 16u, 32u);
        }
        if (n0 + 48u < GN) {
            write_out(lid, g, split, 16u, 48u);
        }
        workgroupBarrier();
    }
    if (m0 + 32u < COG) {
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
        if (n0 + 0u < GN) {
            write_out(lid, g, split, 32u, 0u);
        }
        if (n0 + 16u < GN) {
            write_out(lid, g, split, 32u, 16u);
        }
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
        if (n0 + 32u < GN) {
            write_out(lid, g, split, 32u, 32u);
        }
        if (n0 + 48u < GN) {
            write_out(lid, g, split, 32u, 48u);
        }
        workgroupBarrier();
    }
    if (m0 + 48u < COG) {
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
        if (n0 + 0u < GN) {
            write_out(lid, g, split, 48u, 0u);
        }
        if (n0 + 16u < GN) {
            write_out(lid, g, split, 48u, 16u);
        }
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
        if (n0 + 32u < GN) {
            write_out(lid, g, split, 48u, 32u);
        }
        if (n0 + 48u < GN) {
            write_out(lid, g, split, 48u, 48u);
        }
        workgroupBarrier();
    }
}
