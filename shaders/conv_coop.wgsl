// Quantized conv2d forward on cooperative matrices (tensor cores), for adapters that report
// f16 16x16x16 -> f32 through wgpu's EXPERIMENTAL_COOPERATIVE_MATRIX. x holds DoReFa activation
// levels k_a / n_a and w weight levels c_w / n_w: their integer codes (k_a in 0..n_a, c_w in
// -n_w..n_w) are exact in f16, every product is exact in the f32 accumulator and so is every
// sum below 2^24, so y = (sum c_w k_a) * fl32(1 / (n_w n_a)) + b equals conv2d.wgsl's fp32
// result up to the order of rounding.
//
// conv2d.wgsl's MODE 0 GEMM (M = Cout/g, N = batch*OH*OW, K = Cin/g*KH*KW), geometry as
// pipeline constants. A workgroup of four 32-wide subgroups computes a 128 x 128 tile, each
// subgroup a 64 x 64 quarter as 4 x 4 16x16 matrices; K advances BK (32) at a time through
// workgroup memory (codes as f16, rows padded by 8 halves), staged in quads of four adjacent
// elements (vec4 loads where the shape allows); each invocation's four columns are decoded once
// before the K loop. Loads check bounds (padding, tile edges, the end of K load 0).
//
// Group packing: a grouped conv whose groups have at most 64 rows stacks GP groups in the tile,
// in slots of RG = 32 or 64 rows (a group's rows, then zero rows), each slot with its own B tile
// and BK 16 (workgroup memory stays about as it is); each 16-row matrix lies in one slot and
// multiplies that slot's B. A 16-row block that holds no output row (past its group's rows, or
// in a slot past the last group) skips its multiply-adds.
//
// Each 16x16 result goes through a staging tile in workgroup memory to the NCHW output, where
// the whole workgroup scales, adds the bias and writes it: two of each subgroup's at a time, so
// one barrier pair per two results (row blocks that hold no output skipped).
//
// Lavapipe has no cooperative matrices: src/kernels/conv_coop/mod.rs derives a plain-WGSL
// emulation of this file (the same staging, tiles and epilogue; each matrix operation done by
// the lanes of the subgroup that owns it), which the tests run against the CPU reference.

enable f16;
enable wgpu_cooperative_matrix;
// Each subgroup skips the multiply-adds of its 16-row blocks that hold no output row: a branch
// uniform in the subgroup, as cooperative-matrix operations need, but not in the workgroup,
// which is what naga's uniformity analysis checks, reporting it under this rule. (The emulation
// drops this line, so that the tests check the rest of the kernel's uniformity, barriers among
// it, in full.)
diagnostic(off, derivative_uniformity);

override HAS_BIAS: bool = false;
// IN_BN: x is a BatchNorm's input and each element is formed as conv2d.wgsl's IN_BN forms it
// (the BatchNorm with table in_bn, IN_ACT, IN_SHUFFLE, then the activation quantizer). With
// IN_QUANT alone (lib/coop_conv.wgsl), x is the layer's float input, quantized as it is loaded.
override IN_BN: bool = false;
override IN_ACT: u32 = 0u;
override IN_SHUFFLE: u32 = 1u;
// BN_STATS: the partial statistics of the BatchNorm after this conv, as conv2d.wgsl's BN_STATS
// forms them (per 128-column tile and channel: mean and M2 at bn_part[(2 t) * COUT + c] and
// bn_part[(2 t + 1) * COUT + c]): each invocation merges the 8-value runs it writes (Chan's
// formula), then one invocation per row merges the row's four writers in order.
override BN_STATS: bool = false;
// n_w, n_a and fl32(1 / (n_w n_a)).
override W_LEVELS: f32 = 1.0;
override A_LEVELS: f32 = 1.0;
override A_INV_LEVELS: f32 = 1.0;
override SCALE: f32 = 1.0;
// The geometry (CIN .. OHW) is in lib/coop_conv.wgsl.
override GK: u32 = CIG * KHW;
// Vector loads where the layer's shape allows (src/kernels/conv2d/gemm.rs `vector_loads`, VEC_A 2
// and VEC_B 1 of conv2d.wgsl's forward): VEC_W, weight rows of a multiple of 4 (four k of a row
// in one aligned vec4); VEC_X, a pointwise conv whose images have a multiple of 4 pixels (four
// columns in one aligned vec4 of x).
override VEC_W: bool = false;
override VEC_X: bool = false;

const BM: u32 = 128u;
const BN: u32 = 128u;
// The rows of each group slot (32, 64, or BM: one group's rows, m0 onwards) and the slots.
override RG: u32 = BM;
override GP: u32 = BM / RG;
override BK: u32 = select(32u, 16u, GP > 1u);
// Row strides, in halves, of the staged A ([m][k]) and B ([slot][k][n]) tiles.
override AS: u32 = BK + 8u;
const BS: u32 = BN + 8u;
// The staged tiles' lengths, in halves (named: naga 30 cannot specialise an array length
// written as an expression ahead of other overrides).
override A_SH: u32 = BM * AS;
override B_SH: u32 = GP * BK * BS;

struct Params {
    gn: u32,   // N: batch * OH * OW (K, Cin/g * KH * KW, is the constant GK)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w_src: array<f32>;
@group(0) @binding(2) var<storage, read> x_src: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> in_bn: array<f32>;
@group(0) @binding(6) var<storage, read_write> bn_part: array<f32>;
// w_src and x_src as vec4s (VEC_W, VEC_X).
@group(0) @binding(7) var<storage, read> w_src4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> x_src4: array<vec4<f32>>;

// BN_STATS: this invocation's count, mean and M2 of its row in each row block mi / 16.
var<private> st_n: array<f32, 4>;
var<private> st_mean: array<f32, 4>;
var<private> st_m2: array<f32, 4>;

var<workgroup> a_sh: array<f16, A_SH>;
var<workgroup> b_sh: array<f16, B_SH>;
var<workgroup> c_sh: array<f32, 2048>;   // two 16x16 staging tiles per subgroup

alias MA = coop_mat16x16<f16, A>;
alias MB = coop_mat16x16<f16, B>;
alias MC = coop_mat16x16<f32, C>;

// The columns this invocation stages in every K tile, n0 + 4 * (lid % 32) + j for j = 0..3,
// decoded once before the K loop: where their image starts in x (col_base) and the input pixel
// of tap (0, 0) (col_iy, col_ix). A column past N gets a row far out of range, so that every
// tap of it loads 0.
var<private> col_base: array<u32, 4>;
var<private> col_iy: array<i32, 4>;
var<private> col_ix: array<i32, 4>;

fn decode_columns(lid: u32, n0: u32) {
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + 4u * (lid % 32u) + j;
        let b = n / OHW;
        let pix = n - b * OHW;
        let oy = pix / OW;
        col_base[j] = b * (CIN * H * W);
        col_iy[j] = select(i32(oy * SH) - i32(PH), -0x40000000, n >= p.gn);
        col_ix[j] = i32((pix - oy * OW) * SW) - i32(PW);
    }
}

// The output channel of tile row t, or COUT where the row has none (past its group's rows, or
// in a slot past the last group): GP = 1, row m0 + t of group g0; packed, a row of the group of
// slot t / RG.
fn row_channel(g0: u32, m0: u32, t: u32) -> u32 {
    let slot = t / RG;
    let r = m0 + t - slot * RG;
    let g = g0 + slot;
    return select(COUT, g * COG + r, r < COG && g < GROUPS);
}

// Whether tile rows t or 64 + t (the 16-row blocks that the epilogue's round for block t of
// each subgroup writes) hold output rows: rounds where neither does are skipped.
fn any_live(g0: u32, m0: u32, t: u32) -> bool {
    return row_channel(g0, m0, t) < COUT || row_channel(g0, m0, 64u + t) < COUT;
}

// Stages the K tile starting at k0: weight codes round(w * n_w) into a_sh, activation codes
// round(x * n_a) into b_sh (one K tile per group slot, the slots' k rows stacked). Each
// invocation stores quads, four adjacent k of one weight row and four adjacent columns of one x
// row, so that what depends on k alone (the im2col tap, the channel, its BatchNorm table) is
// found once per quad, and a quad is one vec4 load where the layer's shape makes it one aligned
// vec4 of its source (VEC_W, VEC_X).
fn stage(lid: u32, g0: u32, m0: u32, k0: u32) {
    // A: BM rows of BK / 4 quads, the 128 invocations BK / 4 rounds.
    let qr = BK / 4u;
    let kq = 4u * (lid % qr);
    for (var e = 0u; e < qr; e++) {
        let m = lid / qr + (BM / qr) * e;
        var v = vec4(0.0);
        let co = row_channel(g0, m0, m);
        if (co < COUT) {
            let row = co * GK + k0 + kq;
            if (VEC_W) {
                // GK is a multiple of 4: the quad is wholly before the end of K or past it.
                if (k0 + kq < GK) {
                    v = w_src4[row / 4u];
                }
            } else {
                for (var j = 0u; j < 4u; j++) {
                    if (k0 + kq + j < GK) {
                        v[j] = w_src[row + j];
                    }
                }
            }
        }
        let at = m * AS + kq;
        let codes = round(v * W_LEVELS);
        a_sh[at] = f16(codes.x);
        a_sh[at + 1u] = f16(codes.y);
        a_sh[at + 2u] = f16(codes.z);
        a_sh[at + 3u] = f16(codes.w);
    }
    // B: GP * BK rows (slot r / BK, its k row r % BK) of 32 quads.
    let nq = 4u * (lid % 32u);
    for (var e = 0u; e < GP * BK / 4u; e++) {
        let r = lid / 32u + 4u * e;
        let slot = r / BK;
        let k = k0 + r - slot * BK;
        let g = g0 + slot;
        var v = vec4(0.0);
        if (k < GK && g < GROUPS) {
            let c = k / KHW;
            let t = k - c * KHW;
            let kh = t / KW;
            let ty = i32(kh * DH);
            let tx = i32((t - kh * KW) * DW);
            let ch = unshuffled(g * CIG + c);
            let plane = ch * (H * W);
            if (VEC_X) {
                // A pointwise conv with images of a multiple of 4 pixels: the quad lies in one
                // image, wholly in or past the columns, at an aligned offset.
                if (col_iy[0] >= 0) {
                    v = x_src4[(col_base[0] + plane + u32(col_iy[0]) * W + u32(col_ix[0])) / 4u];
                    if (IN_BN || IN_QUANT) {
                        v = vec4(input_formed(v.x, ch), input_formed(v.y, ch),
                                 input_formed(v.z, ch), input_formed(v.w, ch));
                    }
                }
            } else {
                for (var j = 0u; j < 4u; j++) {
                    let iy = col_iy[j] + ty;
                    let ix = col_ix[j] + tx;
                    if (iy >= 0 && ix >= 0 && u32(iy) < H && u32(ix) < W) {
                        v[j] = input_formed(x_src[col_base[j] + plane + u32(iy) * W + u32(ix)], ch);
                    }
                }
            }
        }
        let at = r * BS + nq;
        let codes = round(v * A_LEVELS);
        b_sh[at] = f16(codes.x);
        b_sh[at + 1u] = f16(codes.y);
        b_sh[at + 2u] = f16(codes.z);
        b_sh[at + 3u] = f16(codes.w);
    }
}

// Writes the staged 16x16 results of every subgroup (subgroup s owns the quarter (s / 2, s % 2)):
// matrix (mi, nj) of each quarter, 8 values per invocation (see staged_index).
fn write_out(lid: u32, m0: u32, n0: u32, g0: u32, mi: u32, nj: u32) {
    for (var e = 0u; e < 8u; e++) {
        let i = staged_index(lid, e);
        let s = i / 256u;
        let r = (i % 256u) / 16u;
        let c = i % 16u;
        let co = row_channel(g0, m0, (s / 2u) * 64u + mi + r);
        let col = n0 + (s % 2u) * 64u + nj + c;
        if (co < COUT && col < p.gn) {
            let b = col / OHW;
            out[(b * COUT + co) * OHW + (col - b * OHW)] = out_value(staged_at(i, nj), co);
        }
    }
    if (BN_STATS) {
        run_stats(lid, m0, n0, g0, mi, nj);
    }
}

// The output value staged at c_sh[i], of output channel co: scaled, the bias added.
fn out_value(i: u32, co: u32) -> f32 {
    var v = c_sh[i] * SCALE;
    if (HAS_BIAS) {
        v += bias[co];
    }
    return v;
}

// BN_STATS: the statistics of a run of 8 staged values (one row, 8 adjacent columns: c_sh[lid *
// 8..]; two passes), merged into this invocation's row of block mi.
fn run_stats(lid: u32, m0: u32, n0: u32, g0: u32, mi: u32, nj: u32) {
    let s = lid / 32u;
    let co = row_channel(g0, m0, (s / 2u) * 64u + mi + (lid % 32u) / 2u);
    let col0 = n0 + (s % 2u) * 64u + nj + (lid % 2u) * 8u;
    if (co >= COUT || col0 >= p.gn) {
        return;
    }
    let n = min(8u, p.gn - col0);
    var sum = 0.0;
    for (var e = 0u; e < n; e++) {
        sum += out_value(staged_at(lid * 8u + e, nj), co);
    }
    let mean = sum / f32(n);
    var m2 = 0.0;
    for (var e = 0u; e < n; e++) {
        let d = out_value(staged_at(lid * 8u + e, nj), co) - mean;
        m2 += d * d;
    }
    let k = mi / 16u;
    let na = st_n[k];
    let nb = f32(n);
    let nab = na + nb;
    let delta = mean - st_mean[k];
    st_mean[k] = st_mean[k] + delta * (nb / nab);
    st_m2[k] = st_m2[k] + m2 + delta * delta * (na * nb / nab);
    st_n[k] = nab;
}

// BN_STATS, after the last write_out: every invocation's rows into c_sh (row R of the tile,
// writer w = column half * 2 + lane parity: (R * 4 + w) * 2), then invocation R merges row R's
// writers in order and writes the tile's partials.
fn write_stats(lid: u32, m0: u32, n0: u32, g0: u32, tile: u32) {
    let s = lid / 32u;
    let w = (s % 2u) * 2u + lid % 2u;
    for (var k = 0u; k < 4u; k++) {
        let r = (s / 2u) * 64u + k * 16u + (lid % 32u) / 2u;
        c_sh[(r * 4u + w) * 2u] = st_mean[k];
        c_sh[(r * 4u + w) * 2u + 1u] = st_m2[k];
    }
    workgroupBarrier();
    let c = row_channel(g0, m0, lid);
    if (c >= COUT) {
        return;
    }
    var n = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var v = 0u; v < 4u; v++) {
        // Writer v's columns: its half's four runs of 8 at its lane parity's offset.
        var nb = 0u;
        for (var nj = 0u; nj < 64u; nj += 16u) {
            let col0 = n0 + (v / 2u) * 64u + nj + (v % 2u) * 8u;
            if (col0 < p.gn) {
                nb += min(8u, p.gn - col0);
            }
        }
        if (nb == 0u) {
            continue;
        }
        let fb = f32(nb);
        let nab = n + fb;
        let delta = c_sh[(lid * 4u + v) * 2u] - mean;
        mean = mean + delta * (fb / nab);
        m2 = m2 + c_sh[(lid * 4u + v) * 2u + 1u] + delta * delta * (n * fb / nab);
        n = nab;
    }
    bn_part[(2u * tile) * COUT + c] = mean;
    bn_part[(2u * tile + 1u) * COUT + c] = m2;
}

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg_id: u32) {
    let sg = sg_id;
    let wm = sg / 2u;
    let wn = sg % 2u;
    let n0 = wid.x * BN;
    let m0 = wid.y * BM;
    let g0 = wid.z * GP;
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
    // Which of this subgroup's four 16-row blocks hold output rows: a block past its group's
    // rows (or in a slot past the last group) skips its multiply-adds.
    let live0 = row_channel(g0, m0, wm * 64u) < COUT;
    let live1 = row_channel(g0, m0, wm * 64u + 16u) < COUT;
    let live2 = row_channel(g0, m0, wm * 64u + 32u) < COUT;
    let live3 = row_channel(g0, m0, wm * 64u + 48u) < COUT;
    decode_columns(lid, n0);
    for (var k0 = 0u; k0 < GK; k0 += BK) {
        stage(lid, g0, m0, k0);
        workgroupBarrier();
        for (var ks = 0u; ks < BK; ks += 16u) {
            // The B tile of the slot that matrix rows wm * 64 lie in (with RG 32, rows
            // wm * 64 + 32 lie in the next one).
            var kb = ((wm * 64u) / RG * BK + ks) * BS + wn * 64u;
            var b0 = coopLoadT<MB>(&b_sh[kb + 0u], BS);
            var b1 = coopLoadT<MB>(&b_sh[kb + 16u], BS);
            var b2 = coopLoadT<MB>(&b_sh[kb + 32u], BS);
            var b3 = coopLoadT<MB>(&b_sh[kb + 48u], BS);
            if (live0) {
                let a0 = coopLoadT<MA>(&a_sh[(wm * 64u + 0u) * AS + ks], AS);
                acc00 = coopMultiplyAdd(a0, b0, acc00);
                acc01 = coopMultiplyAdd(a0, b1, acc01);
                acc02 = coopMultiplyAdd(a0, b2, acc02);
                acc03 = coopMultiplyAdd(a0, b3, acc03);
            }
            if (live1) {
                let a1 = coopLoadT<MA>(&a_sh[(wm * 64u + 16u) * AS + ks], AS);
                acc10 = coopMultiplyAdd(a1, b0, acc10);
                acc11 = coopMultiplyAdd(a1, b1, acc11);
                acc12 = coopMultiplyAdd(a1, b2, acc12);
                acc13 = coopMultiplyAdd(a1, b3, acc13);
            }
            if (RG == 32u) {
                kb += BK * BS;
                b0 = coopLoadT<MB>(&b_sh[kb + 0u], BS);
                b1 = coopLoadT<MB>(&b_sh[kb + 16u], BS);
                b2 = coopLoadT<MB>(&b_sh[kb + 32u], BS);
                b3 = coopLoadT<MB>(&b_sh[kb + 48u], BS);
            }
            if (live2) {
                let a2 = coopLoadT<MA>(&a_sh[(wm * 64u + 32u) * AS + ks], AS);
                acc20 = coopMultiplyAdd(a2, b0, acc20);
                acc21 = coopMultiplyAdd(a2, b1, acc21);
                acc22 = coopMultiplyAdd(a2, b2, acc22);
                acc23 = coopMultiplyAdd(a2, b3, acc23);
            }
            if (live3) {
                let a3 = coopLoadT<MA>(&a_sh[(wm * 64u + 48u) * AS + ks], AS);
                acc30 = coopMultiplyAdd(a3, b0, acc30);
                acc31 = coopMultiplyAdd(a3, b1, acc31);
                acc32 = coopMultiplyAdd(a3, b2, acc32);
                acc33 = coopMultiplyAdd(a3, b3, acc33);
            }
        }
        workgroupBarrier();
    }
    if (any_live(g0, m0, 0u)) {
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
        write_out(lid, m0, n0, g0, 0u, 0u);
        write_out(lid, m0, n0, g0, 0u, 16u);
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
        write_out(lid, m0, n0, g0, 0u, 32u);
        write_out(lid, m0, n0, g0, 0u, 48u);
        workgroupBarrier();
    }
    if (any_live(g0, m0, 16u)) {
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
        write_out(lid, m0, n0, g0, 16u, 0u);
        write_out(lid, m0, n0, g0, 16u, 16u);
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
        write_out(lid, m0, n0, g0, 16u, 32u);
        write_out(lid, m0, n0, g0, 16u, 48u);
        workgroupBarrier();
    }
    if (any_live(g0, m0, 32u)) {
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
        write_out(lid, m0, n0, g0, 32u, 0u);
        write_out(lid, m0, n0, g0, 32u, 16u);
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
        write_out(lid, m0, n0, g0, 32u, 32u);
        write_out(lid, m0, n0, g0, 32u, 48u);
        workgroupBarrier();
    }
    if (any_live(g0, m0, 48u)) {
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
        write_out(lid, m0, n0, g0, 48u, 0u);
        write_out(lid, m0, n0, g0, 48u, 16u);
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
        write_out(lid, m0, n0, g0, 48u, 32u);
        write_out(lid, m0, n0, g0, 48u, 48u);
        workgroupBarrier();
    }
    if (BN_STATS) {
        write_stats(lid, m0, n0, g0, wid.x);
    }
}
