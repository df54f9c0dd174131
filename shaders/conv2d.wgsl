// Convolution as implicit GEMM: forward, grad-input and grad-weight of conv2d (NCHW input, OIHW
// weight, stride / padding / dilation per axis, groups). conv_transpose2d and matmul (Linear) are
// the same three GEMMs in other geometries (see src/kernels/conv_transpose2d.rs and matmul.rs).
//
// Per group g the GEMM is C[M][N] = sum_k A[M][K] * B[K][N], with im2col addresses computed on the
// fly (nothing is materialised):
//   MODE 0 forward      M = Cout/g (co)  N = batch*OH*OW (pixel)  K = Cin/g*KH*KW   A = weight  B = x
//   MODE 1 grad-input   M = Cin/g (ci)   N = batch*H*W (pixel)    K = Cout/g*KH*KW  A = weight  B = dy
//   MODE 2 grad-weight  M = Cout/g (co)  N = Cin/g*KH*KW          K = batch*OH*OW   A = dy      B = x
// Grad-weight splits K into `splits` chunks (grid z = groups * splits) writing partial results that
// a fixed-order sum reduces: deterministic, no atomics. With BIAS_GRAD it also forms the bias
// gradient, the row sums of A = dy, in the same pass over dy: the workgroups of the first column
// tile add up the A values they multiply, in increasing k, and write one sum per row and split.
//
// Tiling: a workgroup computes a BM x BN tile of C; each thread holds 8 x 16 outputs as eight 4x4
// blocks (two row quads half a group slot apart, four column quads TX apart, so every
// workgroup-memory read is one vec4 without bank conflicts), hence (BM / 8) * (BN / 16) threads.
// Group packing: a grouped conv whose groups have few rows (NIN-GC's 16 and 32) stacks GP
// groups of RG rows each in one tile (GP = 1, RG = BM: one group), each with its own B tile,
// so that its tiles are as tall as a dense layer's. A thread's 8 rows lie in one group. K
// advances BK = 8 at a time through two workgroup buffers: the next K tile is stored while the
// current one is multiplied, one barrier per tile, the loop unrolled by two so that both
// buffers sit at constant offsets. A is staged transposed (k-major) with each k row padded by
// 4 floats. With SPECIALIZED (the default) the layer's geometry is pipeline constants, so the
// im2col index math divides by constants (one pipeline per layer and direction); without, it is
// read from the uniforms (one pipeline per tile and kernel size, shared by layers: fewer to
// compile before the first step). Both sum in the same order and give the same bits. A thread
// stores whole vec4s of the tiles (quads: 4 rows of A or 4 columns of B, with what depends on k
// alone, such as a channel's BatchNorm table, found once per quad), read as aligned vec4s of
// the sources where the layer's shape allows (VEC_A, VEC_B); its outputs go out a row of a 4x4
// block at a time, one aligned vec4 where the shape allows (VEC_OUT). Loads check bounds
// (padding, tile edges, the end of K: out-of-range elements load as 0); the multiply-add loop
// does not branch.
// Each output sums its K terms in increasing k: results do not depend on the tile. The staging
// (operand loads, BatchNorm work on load, store_tile) is in lib/conv2d_loads.wgsl, appended to
// this file.

override MODE: u32 = 0u;
override HAS_BIAS: bool = false;
override BIAS_GRAD: bool = false;
// MODE 1: the layer input's DoReFa quantizer, applied as each dx is written (ACT_GRAD 1: dx
// masked by the float input x's straight-through rule; 2: also x replaced by its quantized value,
// what grad-weight reads next), with its levels (shaders/lib/act.wgsl).
override ACT_GRAD: u32 = 0u;
override ACT_LEVELS: f32 = 1.0;
override ACT_INV_LEVELS: f32 = 1.0;
// IN_BN: the layer's input is a BatchNorm's output that is never stored; the GEMM forms each
// element where it loads it, bit for bit as norm.wgsl's bn_apply would write it, from the
// BatchNorm's input (the conv output it normalises: b_src in MODE 0 and 2, act_x in MODE 1) and its
// per-channel table in_bn = [mean, invstd, gamma, beta]: then the activation (IN_ACT, lib/bn.wgsl's
// ACT_*), the channel shuffle after it (IN_SHUFFLE groups; 1: none) and, in MODE 0 and 2, the
// layer's input quantizer (IN_QUANT, with ACT_LEVELS). That saves the BatchNorm's output pass
// forward and its recompute backward.
// IN_QUANT without IN_BN (MODE 0 and 2): b_src is the layer's float input, quantized where it
// is loaded, which saves the quantizer's pass forward and its repeat for grad-weight.
override IN_BN: bool = false;
override IN_ACT: u32 = 0u;
override IN_SHUFFLE: u32 = 1u;
override IN_QUANT: bool = false;
// MODE 0 with BN_STATS: the statistics of the BatchNorm that normalises this output, as
// per-tile partials: for column tile t and output channel c, the mean and the sum of squared
// deviations (M2) of the tile's values of c, at bn_part[(2 t) * COUT + c] and
// bn_part[(2 t + 1) * COUT + c]. Each thread forms them over its 16 columns (two passes over its
// registers), then the TX threads of each row are merged in order (Chan's formula); norm.wgsl's
// bn_stats_merge merges the tiles in a fixed order. That saves the BatchNorm's own pass over the output.
override BN_STATS: bool = false;
// MODE 1 with BN_SUMS (and IN_BN, ACT_GRAD 1, or 0 for a float input): the sums of the backward of
// the BatchNorm before (the one IN_BN forms), whose output gradient is the dx written here: per
// column tile t and BatchNorm channel c, sum dy' and sum dy' * xhat (dy' = dx after that
// BatchNorm's activation mask) at bn_part[(2 t) * CIN + c] and bn_part[(2 t + 1) * CIN + c]. Each
// thread adds its 16 columns in order as it writes them, then the TX threads of each row are added
// in order; norm.wgsl's bn_backward_merge adds the tiles in order. That saves the BatchNorm's
// reduction pass over its input and output gradient.
override BN_SUMS: bool = false;
// MODE 1 with DX_PLUS: dx_plus, the gradient another reader of the layer input wrote (a
// residual block's input is read by its first conv and by its shortcut), added to each dx as it
// is written (after the quantizer's mask), so that dx is the input's whole gradient: the same
// f32 add as an accumulate pass after the GEMM would do, without that pass.
override DX_PLUS: bool = false;
// MODE 1 and 2 with OUT_BN: this conv's output feeds a BatchNorm (with its activation OUT_ACT, and
// a shuffle of OUT_SHUFFLE groups after it) whose backward is applied where the GEMM loads the
// output gradient, instead of in a pass of its own: dy (b_src in MODE 1, a_src in MODE 2) holds the
// conv output, out_dy the BatchNorm's output gradient and out_bn its table [mean, invstd, gamma,
// beta, dbeta, dgamma, scale] (lib/bn.wgsl's bn_grad, bit for bit norm.wgsl's bn_backward_apply).
override OUT_BN: bool = false;
override OUT_ACT: u32 = 0u;
override OUT_SHUFFLE: u32 = 1u;
// Vector loads, where the layer's shape puts four tile elements in one aligned vec4 of their
// source (a_src4 and b_src4 read a_src's and b_src's buffers as vec4s): the tiles hold the same
// values, from fewer load instructions. 0: element by element.
//   VEC_A 1: a row quad of A from one vec4 (grad-input of a 1x1 conv: the weight runs along m)
//   VEC_A 2: a 4x4 block of A from four vec4s along k, transposed (forward: the weight's rows;
//            grad-weight: dy's rows)
//   VEC_B 1: a column quad of B from one vec4 (forward and grad-input of a pointwise conv: pixels)
//   VEC_B 2: a 4x4 block of B from four vec4s along k, transposed (grad-weight of a pointwise
//            conv: the input's pixels)
override VEC_A: u32 = 0u;
override VEC_B: u32 = 0u;
// VEC_OUT: each row's four outputs of a 4x4 block stored as one vec4 (out4), where the shape
// puts every such quad in one aligned vec4 of out: images of a multiple of 4 pixels (MODE 0:
// output, MODE 1: input), grad-weight rows of a multiple of 4 (MODE 2).
override VEC_OUT: bool = false;
// Tile rows (a multiple of 16, up to 192; with packing GP * RG) and columns (32, 64 or 128).
override BM: u32 = 128u;
override BN: u32 = 128u;
// Groups per tile and the rows of each (a multiple of 8: a group's whole GEMM height).
override GP: u32 = 1u;
override RG: u32 = BM;

// Geometry of the convolution (conv2d's view; see the table above): constants when SPECIALIZED,
// else read from the uniforms. The kernel size is always a constant.
override SPECIALIZED: bool = true;
override CIN: u32 = 1u;
override H: u32 = 1u;
override W: u32 = 1u;
override COUT: u32 = 1u;
override OH: u32 = 1u;
override OW: u32 = 1u;
override SH: u32 = 1u;
override SW: u32 = 1u;
override PH: u32 = 0u;
override PW: u32 = 0u;
override DH: u32 = 1u;
override DW: u32 = 1u;
override GROUPS: u32 = 1u;
override KH: u32 = 1u;
override KW: u32 = 1u;
override KHW: u32 = KH * KW;

const BK: u32 = 8u;
override TX: u32 = BN / 16u;
override TY: u32 = BM / 8u;
override THREADS: u32 = TX * TY;
// Row stride, in vec4s, of the transposed A tile and of the B tile.
override AS4: u32 = BM / 4u + 1u;
override BS4: u32 = BN / 4u;
override A_BUF: u32 = BK * AS4;
// One group slot's B tile, and a buffer's (GP slots).
override B_SLOT: u32 = BK * BS4;
override B_BUF: u32 = GP * B_SLOT;
// Quads (vec4s) of each tile one thread stores per K step (the last round may be partial).
override A_QUADS: u32 = (BK * BM / 4u + THREADS - 1u) / THREADS;
override B_QUADS: u32 = (GP * BK * BS4 + THREADS - 1u) / THREADS;
// The same in 4x4 blocks (VEC_A 2, VEC_B 2).
override A_BLOCKS: u32 = (BK * BM / 16u + THREADS - 1u) / THREADS;
override B_BLOCKS: u32 = (GP * BK * BN / 16u + THREADS - 1u) / THREADS;

struct Params {
    batch: u32,
    gn: u32,      // columns of one group's GEMM
    gk: u32,      // depth of one group's GEMM
    k_chunk: u32, // split-K chunk (MODE 2; gk otherwise), a multiple of BK
    splits: u32,
    cin: u32, h: u32, w: u32,
    cout: u32, oh: u32, ow: u32,
    sh: u32, sw: u32, ph: u32, pw: u32,
    dh: u32, dw: u32, groups: u32,
    _pad0: u32, _pad1: u32,
}

// The geometry as the kernel uses it, and what follows from it.
struct Geometry {
    cin: u32, h: u32, w: u32,
    cout: u32, oh: u32, ow: u32,
    sh: u32, sw: u32, ph: u32, pw: u32,
    dh: u32, dw: u32, groups: u32,
    cig: u32, cog: u32, hw: u32, ohw: u32,
    gm: u32, // rows of one group's GEMM
}

fn geometry() -> Geometry {
    var q: Geometry;
    if (SPECIALIZED) {
        q = Geometry(CIN, H, W, COUT, OH, OW, SH, SW, PH, PW, DH, DW, GROUPS, 0u, 0u, 0u, 0u, 0u);
    } else {
        q = Geometry(p.cin, p.h, p.w, p.cout, p.oh, p.ow, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw,
                     p.groups, 0u, 0u, 0u, 0u, 0u);
    }
    q.cig = q.cin / q.groups;
    q.cog = q.cout / q.groups;
    q.hw = q.h * q.w;
    q.ohw = q.oh * q.ow;
    q.gm = select(q.cog, q.cig, MODE == 1u);
    return q;
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a_src: array<f32>;
@group(0) @binding(2) var<storage, read> b_src: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// MODE 2 with BIAS_GRAD: the bias gradient, (splits, groups * gm) partial sums.
@group(0) @binding(5) var<storage, read_write> bias_grad: array<f32>;
// MODE 1 with ACT_GRAD: the float input x (with IN_BN: the BatchNorm's input).
@group(0) @binding(6) var<storage, read_write> act_x: array<f32>;
// IN_BN: the BatchNorm's table (lib/bn.wgsl: two vec4s per channel, [mean, invstd, gamma,
// beta] first).
@group(0) @binding(7) var<storage, read> in_bn: array<vec4<f32>>;
// MODE 0 with BN_STATS: the partial statistics, (tiles, 2, COUT); MODE 1 with BN_SUMS: the
// BatchNorm backward's sums, (tiles, 2, CIN).
@group(0) @binding(8) var<storage, read_write> bn_part: array<f32>;
// OUT_BN: the BatchNorm's output gradient and its table (two vec4s per channel).
@group(0) @binding(9) var<storage, read> out_dy: array<f32>;
@group(0) @binding(10) var<storage, read> out_bn: array<vec4<f32>>;
// a_src and b_src as vec4s (VEC_A, VEC_B).
@group(0) @binding(11) var<storage, read> a_src4: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read> b_src4: array<vec4<f32>>;
// OUT_BN: out_dy as vec4s (with VEC_B 1 in grad-input, VEC_A 2 in grad-weight).
@group(0) @binding(13) var<storage, read> out_dy4: array<vec4<f32>>;
// out as vec4s (VEC_OUT).
@group(0) @binding(14) var<storage, read_write> out4: array<vec4<f32>>;
// DX_PLUS: the other reader's gradient of the layer input.
@group(0) @binding(15) var<storage, read> dx_plus: array<f32>;

var<workgroup> a_tile: array<vec4<f32>, 2u * A_BUF>;
var<workgroup> b_tile: array<vec4<f32>, 2u * B_BUF>;

// This workgroup's first group, split, first row and column, and end of its K range.
var<private> q: Geometry;
var<private> g0: u32;
var<private> split: u32;
var<private> m0: u32;
var<private> n0: u32;
var<private> k_end: u32;

// This thread's 8 x 16 outputs as eight 4x4 blocks (rows: quads qa, qb; columns: quads tx + j
// TX), and (BIAS_GRAD) the row sums of A for rows qa * 4 + i and qb * 4 + i.
var<private> c00: mat4x4<f32>;
var<private> c01: mat4x4<f32>;
var<private> c02: mat4x4<f32>;
var<private> c03: mat4x4<f32>;
var<private> c10: mat4x4<f32>;
var<private> c11: mat4x4<f32>;
var<private> c12: mat4x4<f32>;
var<private> c13: mat4x4<f32>;
var<private> s0: vec4<f32>;
var<private> s1: vec4<f32>;
// BN_SUMS: sum dy' and sum dy' * xhat of rows qa * 4 + i (index 0) and qb * 4 + i (index 1).
var<private> sum_dy: array<vec4<f32>, 2>;
var<private> sum_dyx: array<vec4<f32>, 2>;

// c + outer(a, b) as fused multiply-adds: column r of the block is row r of the output quad.
fn fma4(c: mat4x4<f32>, a: vec4<f32>, b: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(fma(vec4(a.x), b, c[0]), fma(vec4(a.y), b, c[1]),
                       fma(vec4(a.z), b, c[2]), fma(vec4(a.w), b, c[3]));
}

// Multiplies the K tile of the buffer whose A and B parts start at ab and bb (constants at
// each call) into this thread's outputs, in increasing k.
fn multiply(ab: u32, bb: u32, tx: u32, qa: u32, qb: u32) {
    for (var kk = 0u; kk < BK; kk++) {
        let a0 = a_tile[ab + kk * AS4 + qa];
        let a1 = a_tile[ab + kk * AS4 + qb];
        let b0 = b_tile[bb + kk * BS4 + tx];
        let b1 = b_tile[bb + kk * BS4 + tx + TX];
        let b2 = b_tile[bb + kk * BS4 + tx + 2u * TX];
        let b3 = b_tile[bb + kk * BS4 + tx + 3u * TX];
        c00 = fma4(c00, a0, b0);
        c01 = fma4(c01, a0, b1);
        c02 = fma4(c02, a0, b2);
        c03 = fma4(c03, a0, b3);
        c10 = fma4(c10, a1, b0);
        c11 = fma4(c11, a1, b1);
        c12 = fma4(c12, a1, b2);
        c13 = fma4(c13, a1, b3);
        if (BIAS_GRAD) {
            s0 += a0;
            s1 += a1;
        }
    }
}

// BN_SUMS: adds dx value d of row r of quad h (0: qa, 1: qb), whose BatchNorm input is v in
// the channel whose table is t, to the sums, as norm.wgsl's bn_backward_reduce adds it.
fn add_bn_sums(h: u32, r: u32, v: f32, t: vec4<f32>, d: f32) {
    var g = d;
    if (IN_ACT != ACT_NONE) {
        g = select(0.0, d, act_passes(bn_affine(v, t.x, t.y, t.z, t.w), IN_ACT));
    }
    sum_dy[h][r] += g;
    sum_dyx[h][r] += g * ((v - t.x) * t.y);
}

// Where output (row, col) of group g lies in out: NCHW (MODE 0: y, MODE 1: dx), or grad-weight's
// (splits, groups, gm, gn) partial results (MODE 2).
fn out_index(g: u32, row: u32, col: u32) -> u32 {
    if (MODE == 0u) {
        let b = col / q.ohw;
        return (b * q.cout + g * q.cog + row) * q.ohw + (col - b * q.ohw);
    } else if (MODE == 1u) {
        let b = col / q.hw;
        return (b * q.cin + g * q.cig + row) * q.hw + (col - b * q.hw);
    }
    return ((split * q.groups + g) * q.gm + row) * p.gn + col;
}

// MODE 1: the dx written for GEMM value v at (row, col) of group g (out index i): through the
// input quantizer's backward (ACT_GRAD, replacing x by its quantized value with 2), and added
// to the BatchNorm sums of row r of quad h (BN_SUMS; a float input, ACT_GRAD 0, adds v itself).
fn grad_input_value(g: u32, row: u32, col: u32, i: u32, v: f32, h: u32, r: u32) -> f32 {
    if (ACT_GRAD == 0u && !BN_SUMS) {
        return v;
    }
    var xv: f32;
    var d = v;
    if (IN_BN) {
        let b = col / q.hw;
        let sc = unshuffled(g * q.cig + row);
        let t = in_bn_of(sc);
        let bx = act_x[(b * q.cin + sc) * q.hw + (col - b * q.hw)];
        if (ACT_GRAD > 0u) {
            xv = bn_formed(bx, t, false);
            d = dorefa_act_grad(xv, v);
        }
        if (BN_SUMS) {
            add_bn_sums(h, r, bx, t, d);
        }
    } else if (ACT_GRAD > 0u) {
        xv = act_x[i];
        d = dorefa_act_grad(xv, v);
    }
    if (ACT_GRAD == 2u) {
        act_x[i] = dorefa_act(xv, ACT_LEVELS, ACT_INV_LEVELS);
    }
    return d;
}

// Writes the 4x4 block whose first row is m (tile-relative) and first column n; h: which of
// the thread's row quads it is (0: qa, 1: qb). With VEC_OUT each row's four values go out as
// one vec4: the quad is then wholly in or past the columns, in one image, 16-byte aligned.
fn store_block(m: u32, n: u32, c: mat4x4<f32>, h: u32) {
    let slot = m / RG;
    let g = g0 + slot;
    if (g >= q.groups || n0 + n >= p.gn) {
        return;
    }
    for (var r = 0u; r < 4u; r++) {
        let row = m0 + m - slot * RG + r;
        if (row >= q.gm) {
            return;
        }
        var add = 0.0;
        if (HAS_BIAS) {
            add = bias[g * q.gm + row];
        }
        var quad = vec4(0.0);
        for (var j = 0u; j < 4u; j++) {
            let col = n0 + n + j;
            if (col >= p.gn) {
                break;
            }
            let i = out_index(g, row, col);
            var v = c[r][j] + add;
            if (MODE == 1u) {
                v = grad_input_value(g, row, col, i, v, h, r);
                if (DX_PLUS) {
                    v = v + dx_plus[i];
                }
            }
            if (VEC_OUT) {
                quad[j] = v;
            } else {
                out[i] = v;
            }
        }
        if (VEC_OUT) {
            out4[out_index(g, row, n0 + n) / 4u] = quad;
        }
    }
}

// BN_STATS: count, mean and M2 of rows m..m+3 (tile-relative) over this thread's columns
// (quads tx + t TX), each value as store_block writes it.
struct RowStats {
    n: f32,
    mean: vec4<f32>,
    m2: vec4<f32>,
}

// The bias of rows m..m+3 (tile-relative), 0 past the group's rows.
fn quad_bias(m: u32) -> vec4<f32> {
    var add = vec4(0.0);
    let slot = m / RG;
    let g = g0 + slot;
    if (HAS_BIAS && g < q.groups) {
        for (var r = 0u; r < 4u; r++) {
            let row = m0 + m - slot * RG + r;
            if (row < q.gm) {
                add[r] = bias[g * q.gm + row];
            }
        }
    }
    return add;
}

// The values of column j of a 4x4 block, one per row.
fn block_column(c: mat4x4<f32>, j: u32) -> vec4<f32> {
    return vec4(c[0][j], c[1][j], c[2][j], c[3][j]);
}

fn row_stats(m: u32, tx: u32, b0: mat4x4<f32>, b1: mat4x4<f32>, b2: mat4x4<f32>,
             b3: mat4x4<f32>) -> RowStats {
    let add = quad_bias(m);
    var n = 0.0;
    var sum = vec4(0.0);
    for (var j = 0u; j < 4u; j++) {
        let col = n0 + tx * 4u + j;
        if (col < p.gn) {
            sum += block_column(b0, j) + add;
            n += 1.0;
        }
        if (col + TX * 4u < p.gn) {
            sum += block_column(b1, j) + add;
            n += 1.0;
        }
        if (col + 2u * TX * 4u < p.gn) {
            sum += block_column(b2, j) + add;
            n += 1.0;
        }
        if (col + 3u * TX * 4u < p.gn) {
            sum += block_column(b3, j) + add;
            n += 1.0;
        }
    }
    let mean = sum / max(n, 1.0);
    var m2 = vec4(0.0);
    for (var j = 0u; j < 4u; j++) {
        let col = n0 + tx * 4u + j;
        if (col < p.gn) {
            let d = block_column(b0, j) + add - mean;
            m2 += d * d;
        }
        if (col + TX * 4u < p.gn) {
            let d = block_column(b1, j) + add - mean;
            m2 += d * d;
        }
        if (col + 2u * TX * 4u < p.gn) {
            let d = block_column(b2, j) + add - mean;
            m2 += d * d;
        }
        if (col + 3u * TX * 4u < p.gn) {
            let d = block_column(b3, j) + add - mean;
            m2 += d * d;
        }
    }
    return RowStats(n, mean, m2);
}

// Columns of thread column tx within this tile (what row_stats counted).
fn thread_columns(tx: u32) -> f32 {
    var n = 0u;
    for (var t = 0u; t < 4u; t++) {
        let col = n0 + (tx + t * TX) * 4u;
        if (col < p.gn) {
            n += min(4u, p.gn - col);
        }
    }
    return f32(n);
}

// BN_SUMS: adds the TX threads' sums of row quad qd (workgroup memory, see main) in order and
// writes the tile's sums of its 4 rows, at their BatchNorm channels.
fn write_bn_sums(qd: u32) {
    let m = qd * 4u;
    let slot = m / RG;
    let g = g0 + slot;
    if (g >= q.groups) {
        return;
    }
    var sdy = vec4(0.0);
    var sdyx = vec4(0.0);
    for (var t = 0u; t < TX; t++) {
        sdy += a_tile[(qd * TX + t) * 2u];
        sdyx += a_tile[(qd * TX + t) * 2u + 1u];
    }
    for (var r = 0u; r < 4u; r++) {
        let row = m0 + m - slot * RG + r;
        if (row < q.gm) {
            let c = unshuffled(g * q.gm + row);
            bn_part[(2u * n_tile) * q.cin + c] = sdy[r];
            bn_part[(2u * n_tile + 1u) * q.cin + c] = sdyx[r];
        }
    }
}

// Merges the TX threads' statistics of row quad qd (workgroup memory, see main) in order and
// writes the tile's partials of its 4 rows.
fn write_row_stats(qd: u32) {
    let m = qd * 4u;
    let slot = m / RG;
    let g = g0 + slot;
    if (g >= q.groups) {
        return;
    }
    var n = 0.0;
    var mean = vec4(0.0);
    var m2 = vec4(0.0);
    for (var t = 0u; t < TX; t++) {
        let nb = thread_columns(t);
        if (nb == 0.0) {
            continue;
        }
        let mb = a_tile[(qd * TX + t) * 2u];
        let m2b = a_tile[(qd * TX + t) * 2u + 1u];
        let nab = n + nb;
        let delta = mb - mean;
        mean = mean + delta * (nb / nab);
        m2 = m2 + m2b + delta * delta * (n * nb / nab);
        n = nab;
    }
    for (var r = 0u; r < 4u; r++) {
        let row = m0 + m - slot * RG + r;
        if (row < q.gm) {
            let c = g * q.gm + row;
            bn_part[(2u * n_tile) * q.cout + c] = mean[r];
            bn_part[(2u * n_tile + 1u) * q.cout + c] = m2[r];
        }
    }
}

var<private> n_tile: u32;

@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let tx = lid % TX;
    let ty = lid / TX;
    // This thread's group slot and its two row quads, RG / 2 rows apart in that slot (with one
    // slot: ty and ty + BM / 8).
    let pairs = RG / 8u;
    let slot = ty / pairs;
    let qa = slot * (RG / 4u) + ty % pairs;
    let qb = qa + pairs;
    q = geometry();
    n0 = wid.x * BN;
    m0 = wid.y * BM;
    g0 = wid.z * GP;
    split = 0u;
    if (MODE == 2u) {
        g0 = (wid.z / p.splits) * GP;
        split = wid.z % p.splits;
    }
    let k_begin = split * p.k_chunk;
    let k_stop = min(p.gk, k_begin + p.k_chunk);
    k_end = k_stop;
    let tiles = (k_stop - k_begin + BK - 1u) / BK;

    store_tile(lid, k_begin, 0u);
    workgroupBarrier();
    // Two K tiles per iteration, one from each buffer, so that every workgroup-memory offset
    // of the multiply is a constant (a static double buffer). The other buffer was last read
    // before the previous barrier: it is filled while this one is multiplied. A tile past the
    // end loads zeros and is never multiplied.
    for (var t = 0u; t < tiles; t += 2u) {
        store_tile(lid, k_begin + (t + 1u) * BK, 1u);
        multiply(0u, slot * B_SLOT, tx, qa, qb);
        workgroupBarrier();
        if (t + 1u < tiles) {
            store_tile(lid, k_begin + (t + 2u) * BK, 0u);
            multiply(A_BUF, B_BUF + slot * B_SLOT, tx, qa, qb);
        }
        workgroupBarrier();
    }

    if (MODE == 0u && BN_STATS) {
        // Each thread's statistics of its two row quads into workgroup memory (free: the K loop
        // ended on a barrier), then one thread per row pair merges them across the row.
        n_tile = wid.x;
        let sa = row_stats(qa * 4u, tx, c00, c01, c02, c03);
        let sb = row_stats(qb * 4u, tx, c10, c11, c12, c13);
        a_tile[(qa * TX + tx) * 2u] = sa.mean;
        a_tile[(qa * TX + tx) * 2u + 1u] = sa.m2;
        a_tile[(qb * TX + tx) * 2u] = sb.mean;
        a_tile[(qb * TX + tx) * 2u + 1u] = sb.m2;
        workgroupBarrier();
        if (tx == 0u) {
            write_row_stats(qa);
            write_row_stats(qb);
        }
    }

    let r0 = qa * 4u;
    let r1 = qb * 4u;
    let g = g0 + slot;
    if (BIAS_GRAD && wid.x == 0u && tx == 0u && g < q.groups) {
        // Rows of this thread's group: the tile's rows less the slots before it.
        let row0 = m0 + r0 - slot * RG;
        let row1 = m0 + r1 - slot * RG;
        for (var i = 0u; i < 4u; i++) {
            if (row0 + i < q.gm) {
                bias_grad[(split * q.groups + g) * q.gm + row0 + i] = s0[i];
            }
            if (row1 + i < q.gm) {
                bias_grad[(split * q.groups + g) * q.gm + row1 + i] = s1[i];
            }
        }
    }
    store_block(r0, tx * 4u, c00, 0u);
    store_block(r0, (tx + TX) * 4u, c01, 0u);
    store_block(r0, (tx + 2u * TX) * 4u, c02, 0u);
    store_block(r0, (tx + 3u * TX) * 4u, c03, 0u);
    store_block(r1, tx * 4u, c10, 1u);
    store_block(r1, (tx + TX) * 4u, c11, 1u);
    store_block(r1, (tx + 2u * TX) * 4u, c12, 1u);
    store_block(r1, (tx + 3u * TX) * 4u, c13, 1u);

    if (MODE == 1u && BN_SUMS) {
        // As BN_STATS's: each thread's sums into workgroup memory (free since the K loop's last
        // barrier), then one thread per row pair adds them across the row.
        n_tile = wid.x;
        a_tile[(qa * TX + tx) * 2u] = sum_dy[0];
        a_tile[(qa * TX + tx) * 2u + 1u] = sum_dyx[0];
        a_tile[(qb * TX + tx) * 2u] = sum_dy[1];
        a_tile[(qb * TX + tx) * 2u + 1u] = sum_dyx[1];
        workgroupBarrier();
        if (tx == 0u) {
            write_bn_sums(qa);
            write_bn_sums(qb);
        }
    }
}
