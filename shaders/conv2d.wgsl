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
// a fixed-order sum reduces: deterministic, no atomics.
//
// Tiling: a workgroup computes a BM x 64 tile of C, each thread 4x4 outputs, so it has 4 * BM
// threads; K advances 16 at a time through workgroup memory. BM (64, 32 or 16) is chosen per layer
// from M so that thin layers (few output channels per group) do not compute padding. Loads check
// bounds (padding, tile edges); the multiply-add loop does not branch.

override MODE: u32 = 0u;
override KH: u32 = 1u;
override KW: u32 = 1u;
override HAS_BIAS: bool = false;
// Rows of the output tile (64, 32 or 16); the workgroup has 4 * BM threads.
override BM: u32 = 64u;
override THREADS: u32 = 4u * BM;

struct Params {
    batch: u32, cin: u32, h: u32, w: u32,        // input (N, Cin, H, W)
    cout: u32, oh: u32, ow: u32, groups: u32,    // output (N, Cout, OH, OW)
    sh: u32, sw: u32, ph: u32, pw: u32,          // stride, padding
    dh: u32, dw: u32, k_chunk: u32, splits: u32, // dilation; split-K (MODE 2)
    gm: u32, gn: u32, gk: u32, _pad: u32,        // GEMM sizes per group
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a_src: array<f32>;
@group(0) @binding(2) var<storage, read> b_src: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const BN: u32 = 64u;
const BK: u32 = 16u;
override KHW: u32 = KH * KW;

// A tile as [BK][BM/4] and B tile as [BK][BN/4] vec4s: thread (tx, ty) reads rows ty*4.. of A and
// columns tx*4.. of B with one vec4 load each per k. Sized for BM = 64.
var<workgroup> a_tile: array<vec4<f32>, 256>;
var<workgroup> b_tile: array<vec4<f32>, 256>;

// A[m][k] of group g (caller checks m < gm, k < gk). In MODE 2, (kb, kpix) = k split into
// batch index and output pixel.
fn load_a(g: u32, m: u32, k: u32, kb: u32, kpix: u32) -> f32 {
    let cig = p.cin / p.groups;
    let cog = p.cout / p.groups;
    if (MODE == 0u) {
        return a_src[(g * cog + m) * p.gk + k];
    } else if (MODE == 1u) {
        let co = k / KHW;
        let r = k - co * KHW;
        return a_src[((g * cog + co) * cig + m) * KHW + r];
    }
    return a_src[(kb * p.cout + g * cog + m) * (p.oh * p.ow) + kpix];
}

@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let n0 = wid.x * BN;
    let m0 = wid.y * BM;
    let cig = p.cin / p.groups;
    let cog = p.cout / p.groups;
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;

    var g = wid.z;
    var split = 0u;
    if (MODE == 2u) {
        g = wid.z / p.splits;
        split = wid.z % p.splits;
    }
    let k_begin = split * p.k_chunk;
    let k_end = min(p.gk, k_begin + p.k_chunk);

    // Loader roles: each thread stores one vec4 of the A tile and 64 / BM vec4s of the B tile per
    // K step. A: row k = lk (lid % 16), four consecutive m from q4 = 4 * (lid / 16). B in MODE 0/1:
    // rows b_k + r * BM / 4, four consecutive n from n4. B in MODE 2: row lk, columns q4 + r * BM.
    let lk = lid % 16u;
    let q4 = (lid / 16u) * 4u;
    let b_k = lid / 16u;
    let n4 = (lid % 16u) * 4u;
    let b_slots = 64u / BM;

    // MODE 0/1: this thread's four B columns are fixed; decompose them once.
    var col_ok: array<bool, 4>;
    var col_base: array<u32, 4>; // offset of (batch, group's channel 0) in b_src
    var col_y: array<i32, 4>;    // MODE 0: window's top row; MODE 1: input row + padding
    var col_x: array<i32, 4>;
    // MODE 2: this thread's B columns (ci, kh, kw), 4 per slot, are fixed.
    var wcol_ok: array<bool, 16>;
    var wcol_off: array<u32, 16>; // ci * H * W
    var wcol_dy: array<i32, 16>;
    var wcol_dx: array<i32, 16>;
    if (MODE == 2u) {
        for (var j = 0u; j < 4u * b_slots; j++) {
            let n = n0 + q4 + (j / 4u) * BM + j % 4u;
            let ci = n / KHW;
            let rem = n - ci * KHW;
            let kh = rem / KW;
            wcol_off[j] = ci * hw;
            wcol_dy[j] = i32(kh * p.dh) - i32(p.ph);
            wcol_dx[j] = i32((rem - kh * KW) * p.dw) - i32(p.pw);
            wcol_ok[j] = n < p.gn;
        }
    } else {
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + n4 + j;
            col_ok[j] = n < p.gn;
            if (MODE == 0u) {
                let b = n / ohw;
                let pix = n - b * ohw;
                let oy = pix / p.ow;
                col_base[j] = (b * p.cin + g * cig) * hw;
                col_y[j] = i32(oy * p.sh) - i32(p.ph);
                col_x[j] = i32((pix - oy * p.ow) * p.sw) - i32(p.pw);
            } else {
                let b = n / hw;
                let pix = n - b * hw;
                let iy = pix / p.w;
                col_base[j] = (b * p.cout + g * cog) * ohw;
                col_y[j] = i32(iy) + i32(p.ph);
                col_x[j] = i32(pix - iy * p.w) + i32(p.pw);
            }
        }
    }

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        // A (and MODE 2's B): row ka = k0 + lk; in MODE 2 split into batch and output pixel.
        let ka = k0 + lk;
        let ka_ok = ka < k_end;
        var kb = 0u;
        var kpix = 0u;
        if (MODE == 2u) {
            kb = ka / ohw;
            kpix = ka - kb * ohw;
        }
        var av = vec4<f32>(0.0);
        for (var r = 0u; r < 4u; r++) {
            let m = m0 + q4 + r;
            if (ka_ok && m < p.gm) {
                av[r] = load_a(g, m, ka, kb, kpix);
            }
        }
        a_tile[lk * (BM / 4u) + q4 / 4u] = av;

        if (MODE == 2u) {
            let oy = kpix / p.ow;
            let ox = kpix - oy * p.ow;
            let base = (kb * p.cin + g * cig) * hw;
            for (var slot = 0u; slot < b_slots; slot++) {
                var bv = vec4<f32>(0.0);
                for (var j = 0u; j < 4u; j++) {
                    let c = slot * 4u + j;
                    let iy = i32(oy * p.sh) + wcol_dy[c];
                    let ix = i32(ox * p.sw) + wcol_dx[c];
                    if (ka_ok && wcol_ok[c] && iy >= 0 && ix >= 0 && u32(iy) < p.h && u32(ix) < p.w) {
                        bv[j] = b_src[base + wcol_off[c] + u32(iy) * p.w + u32(ix)];
                    }
                }
                b_tile[lk * 16u + (q4 + slot * BM) / 4u] = bv;
            }
        } else {
            for (var slot = 0u; slot < b_slots; slot++) {
                let kl = b_k + slot * (BM / 4u);
                let k = k0 + kl;
                let c = k / KHW;
                let rem = k - c * KHW;
                let kh = rem / KW;
                let kw = rem - kh * KW;
                let k_ok = k < k_end;
                var bv = vec4<f32>(0.0);
                for (var j = 0u; j < 4u; j++) {
                    if (k_ok && col_ok[j]) {
                        if (MODE == 0u) {
                            let iy = col_y[j] + i32(kh * p.dh);
                            let ix = col_x[j] + i32(kw * p.dw);
                            if (iy >= 0 && ix >= 0 && u32(iy) < p.h && u32(ix) < p.w) {
                                bv[j] = b_src[col_base[j] + c * hw + u32(iy) * p.w + u32(ix)];
                            }
                        } else {
                            // Input pixel (iy, ix) receives output (oy, ox) through tap (kh, kw)
                            // when oy * sh = iy + ph - kh * dh (and likewise for x).
                            let ty_ = col_y[j] - i32(kh * p.dh);
                            let tx_ = col_x[j] - i32(kw * p.dw);
                            if (ty_ >= 0 && tx_ >= 0) {
                                let oy = u32(ty_) / p.sh;
                                let ox = u32(tx_) / p.sw;
                                if (oy * p.sh == u32(ty_) && ox * p.sw == u32(tx_) && oy < p.oh && ox < p.ow) {
                                    bv[j] = b_src[col_base[j] + c * ohw + oy * p.ow + ox];
                                }
                            }
                        }
                    }
                }
                b_tile[kl * 16u + n4 / 4u] = bv;
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = a_tile[kk * (BM / 4u) + ty];
            let b = b_tile[kk * 16u + tx];
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }

    var acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + ty * 4u + i;
        if (m >= p.gm) {
            continue;
        }
        var add = 0.0;
        if (HAS_BIAS) {
            add = bias[g * p.gm + m];
        }
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + tx * 4u + j;
            if (n >= p.gn) {
                continue;
            }
            let v = acc[i][j] + add;
            if (MODE == 0u) {
                let b = n / ohw;
                out[(b * p.cout + g * cog + m) * ohw + (n - b * ohw)] = v;
            } else if (MODE == 1u) {
                let b = n / hw;
                out[(b * p.cin + g * cig + m) * hw + (n - b * hw)] = v;
            } else {
                out[((split * p.groups + g) * p.gm + m) * p.gn + n] = v;
            }
        }
    }
}
