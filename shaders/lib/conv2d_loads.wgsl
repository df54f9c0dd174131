// The tile staging of conv2d.wgsl, appended to it (it uses that file's overrides, bindings and
// workgroup state): where each element of A and B comes from (im2col addresses, padding and tails),
// the BatchNorm work done as an operand is loaded (IN_BN, OUT_BN), the vector forms (VEC_A,
// VEC_B), and store_tile, which fills one K tile of the workgroup buffers.

// IN_BN: the BatchNorm channel that input channel ch comes from (the shuffle sends channel c
// to (c % per) * IN_SHUFFLE + c / per, per = cin / IN_SHUFFLE); ch itself without IN_BN.
fn unshuffled(ch: u32) -> u32 {
    if (!IN_BN || IN_SHUFFLE <= 1u) {
        return ch;
    }
    return (ch % IN_SHUFFLE) * (q.cin / IN_SHUFFLE) + ch / IN_SHUFFLE;
}

// IN_BN: BatchNorm channel sc's [mean, invstd, gamma, beta].
fn in_bn_of(sc: u32) -> vec4<f32> {
    return in_bn[sc * (BN_TABLE / 4u)];
}

// IN_BN: the input element whose BatchNorm input is v, in the channel whose table is t.
fn bn_formed(v: f32, t: vec4<f32>, quantize: bool) -> f32 {
    let r = bn_act(bn_affine(v, t.x, t.y, t.z, t.w), IN_ACT);
    if (quantize) {
        return dorefa_act(r, ACT_LEVELS, ACT_INV_LEVELS);
    }
    return r;
}

// The input element the GEMM uses whose stored value is v (with IN_BN the BatchNorm's input,
// in the channel whose table is t): formed through the BatchNorm (IN_BN), quantized (IN_QUANT).
fn input_formed(v: f32, t: vec4<f32>) -> f32 {
    if (IN_BN) {
        return bn_formed(v, t, IN_QUANT);
    }
    if (IN_QUANT) {
        return dorefa_act(v, ACT_LEVELS, ACT_INV_LEVELS);
    }
    return v;
}

// Element (b, y, x) of b_src's channel sc (an input channel unshuffled), formed.
fn load_input(b: u32, sc: u32, iy: u32, ix: u32) -> f32 {
    let v = b_src[((b * q.cin + sc) * q.h + iy) * q.w + ix];
    if (IN_BN) {
        return bn_formed(v, in_bn_of(sc), IN_QUANT);
    }
    return input_formed(v, vec4(0.0));
}

// OUT_BN: what the backward of the BatchNorm after output channel co needs: where its output
// gradient lies (the shuffle after it moves the channel) and its table.
struct OutBn {
    at: u32,
    mean: f32, invstd: f32, gamma: f32, beta: f32,
    dbeta: f32, dgamma: f32, scale: f32,
}

fn out_bn_of(co: u32) -> OutBn {
    var at = co;
    if (OUT_SHUFFLE > 1u) {
        let per = q.cout / OUT_SHUFFLE;
        at = (co % per) * OUT_SHUFFLE + co / per;
    }
    let t0 = out_bn[co * (BN_TABLE / 4u)];
    let t1 = out_bn[co * (BN_TABLE / 4u) + 1u];
    return OutBn(at, t0[BN_MEAN], t0[BN_INVSTD], t0[BN_GAMMA], t0[BN_BETA], t1[BN_DBETA - 4u],
                 t1[BN_DGAMMA - 4u], t1[BN_SCALE - 4u]);
}

// OUT_BN: dL/d(conv output) at (b, output pixel pix) of the channel t describes, whose value is y.
fn out_grad(t: OutBn, b: u32, pix: u32, y: f32) -> f32 {
    return bn_grad(y, out_dy[(b * q.cout + t.at) * q.ohw + pix], t.mean, t.invstd, t.gamma,
                   t.beta, t.dbeta, t.dgamma, f32(p.batch * q.ohw), t.scale, OUT_ACT);
}

// OUT_BN: out_grad at the four output pixels pix..pix+3 (pix a multiple of 4, in an image of a
// multiple of 4 pixels), whose values are y, their output gradients read as one vec4.
fn out_grad4(t: OutBn, b: u32, pix: u32, y: vec4<f32>) -> vec4<f32> {
    let g = out_dy4[((b * q.cout + t.at) * q.ohw + pix) / 4u];
    let count = f32(p.batch * q.ohw);
    let r = OUT_ACT;
    return vec4(
        bn_grad(y.x, g.x, t.mean, t.invstd, t.gamma, t.beta, t.dbeta, t.dgamma, count, t.scale, r),
        bn_grad(y.y, g.y, t.mean, t.invstd, t.gamma, t.beta, t.dbeta, t.dgamma, count, t.scale, r),
        bn_grad(y.z, g.z, t.mean, t.invstd, t.gamma, t.beta, t.dbeta, t.dgamma, count, t.scale, r),
        bn_grad(y.w, g.w, t.mean, t.invstd, t.gamma, t.beta, t.dbeta, t.dgamma, count, t.scale, r));
}

// A[m][k] of group g, 0 past the group's rows; the caller checks g < groups and k < k_end.
fn load_a(g: u32, m: u32, k: u32) -> f32 {
    if (m >= q.gm) {
        return 0.0;
    }
    if (MODE == 0u) {
        return a_src[(g * q.cog + m) * (q.cig * KHW) + k];
    } else if (MODE == 1u) {
        let co = k / KHW;
        return a_src[((g * q.cog + co) * q.cig + m) * KHW + (k - co * KHW)];
    }
    let b = k / q.ohw;
    let pix = k - b * q.ohw;
    let co = g * q.cog + m;
    let y = a_src[(b * q.cout + co) * q.ohw + pix];
    if (OUT_BN) {
        return out_grad(out_bn_of(co), b, pix, y);
    }
    return y;
}

// A[m + r][k] for r = 0..3: a quad of rows.
fn load_a4(g: u32, m: u32, k: u32) -> vec4<f32> {
    return vec4(load_a(g, m, k), load_a(g, m + 1u, k), load_a(g, m + 2u, k),
                load_a(g, m + 3u, k));
}

// What B's row k (of group g) has the same in every column: in MODE 0 and 1 the channel, its
// BatchNorm table and the tap, found once for a quad of columns; in MODE 2 the pixel.
struct BRow {
    ch: u32,
    tap_y: u32,
    tap_x: u32,
    in_bn: vec4<f32>,
    out_bn: OutBn,
    b: u32,
    oy: u32,
    ox: u32,
}

fn b_row(g: u32, k: u32) -> BRow {
    var row: BRow;
    if (MODE == 2u) {
        row.b = k / q.ohw;
        let pix = k - row.b * q.ohw;
        row.oy = pix / q.ow;
        row.ox = pix - row.oy * q.ow;
        return row;
    }
    let c = k / KHW;
    let r = k - c * KHW;
    let kh = r / KW;
    row.tap_y = kh * q.dh;
    row.tap_x = (r - kh * KW) * q.dw;
    if (MODE == 0u) {
        row.ch = unshuffled(g * q.cig + c);
        if (IN_BN) {
            row.in_bn = in_bn_of(row.ch);
        }
    } else {
        row.ch = g * q.cog + c;
        if (OUT_BN) {
            row.out_bn = out_bn_of(row.ch);
        }
    }
    return row;
}

// B[k][n] of group g, k's row described by `row` (0 in the padding and past the columns).
fn load_b(g: u32, row: BRow, n: u32) -> f32 {
    if (n >= p.gn) {
        return 0.0;
    }
    if (MODE == 0u) {
        let b = n / q.ohw;
        let pix = n - b * q.ohw;
        let oy = pix / q.ow;
        let iy = i32(oy * q.sh + row.tap_y) - i32(q.ph);
        let ix = i32((pix - oy * q.ow) * q.sw + row.tap_x) - i32(q.pw);
        if (iy < 0 || ix < 0 || u32(iy) >= q.h || u32(ix) >= q.w) {
            return 0.0;
        }
        let x = b_src[((b * q.cin + row.ch) * q.h + u32(iy)) * q.w + u32(ix)];
        return input_formed(x, row.in_bn);
    } else if (MODE == 1u) {
        // Input pixel (iy, ix) receives output (oy, ox) through tap (kh, kw) when
        // oy * sh = iy + ph - kh * dh (and likewise for x).
        let b = n / q.hw;
        let pix = n - b * q.hw;
        let iy = pix / q.w;
        let ty = i32(iy + q.ph) - i32(row.tap_y);
        let tx = i32(pix - iy * q.w + q.pw) - i32(row.tap_x);
        if (ty < 0 || tx < 0) {
            return 0.0;
        }
        let oy = u32(ty) / q.sh;
        let ox = u32(tx) / q.sw;
        if (oy * q.sh != u32(ty) || ox * q.sw != u32(tx) || oy >= q.oh || ox >= q.ow) {
            return 0.0;
        }
        let y = b_src[((b * q.cout + row.ch) * q.oh + oy) * q.ow + ox];
        if (OUT_BN) {
            return out_grad(row.out_bn, b, oy * q.ow + ox, y);
        }
        return y;
    }
    let ci = n / KHW;
    let r = n - ci * KHW;
    let kh = r / KW;
    let iy = i32(row.oy * q.sh + kh * q.dh) - i32(q.ph);
    let ix = i32(row.ox * q.sw + (r - kh * KW) * q.dw) - i32(q.pw);
    if (iy < 0 || ix < 0 || u32(iy) >= q.h || u32(ix) >= q.w) {
        return 0.0;
    }
    return load_input(row.b, unshuffled(g * q.cig + ci), u32(iy), u32(ix));
}

// B[k][n + j] for j = 0..3: a quad of columns.
fn load_b4(g: u32, k: u32, n: u32) -> vec4<f32> {
    let row = b_row(g, k);
    return vec4(load_b(g, row, n), load_b(g, row, n + 1u), load_b(g, row, n + 2u),
                load_b(g, row, n + 3u));
}

// VEC_A 1: A[m..m+3][k] from one vec4 (grad-input, 1x1: the weight's (co = k, ci = m) run
// along m; cig is a multiple of 4, so a quad is all past the group's rows or none).
fn load_a_quad4(g: u32, m: u32, k: u32) -> vec4<f32> {
    if (m >= q.gm) {
        return vec4(0.0);
    }
    return a_src4[((g * q.cog + k) * q.cig + m) / 4u];
}

// VEC_A 2: A[m][k..k+3] as one vec4 (0 past the group's rows). Forward: a weight row (K a
// multiple of 4); grad-weight: a row of dy, k a pixel of one image (its pixel count a multiple
// of 4).
fn load_a_row4(g: u32, m: u32, k: u32) -> vec4<f32> {
    if (m >= q.gm) {
        return vec4(0.0);
    }
    if (MODE == 0u) {
        return a_src4[((g * q.cog + m) * (q.cig * KHW) + k) / 4u];
    }
    let b = k / q.ohw;
    let pix = k - b * q.ohw;
    let co = g * q.cog + m;
    let y = a_src4[((b * q.cout + co) * q.ohw + pix) / 4u];
    if (OUT_BN) {
        return out_grad4(out_bn_of(co), b, pix, y);
    }
    return y;
}

// VEC_A 2: the block A[m..m+3][k..k+3], column j holding A[m..m+3][k + j].
fn load_a_block4(g: u32, m: u32, k: u32) -> mat4x4<f32> {
    return transpose(mat4x4(load_a_row4(g, m, k), load_a_row4(g, m + 1u, k),
                            load_a_row4(g, m + 2u, k), load_a_row4(g, m + 3u, k)));
}

// Four input elements of the channel whose table is t (with IN_BN), formed.
fn input_formed4(v: vec4<f32>, t: vec4<f32>) -> vec4<f32> {
    return vec4(input_formed(v.x, t), input_formed(v.y, t), input_formed(v.z, t),
                input_formed(v.w, t));
}

// VEC_B 1: B[k][n..n+3] from one vec4 (a pointwise conv: n is a pixel, the image's pixel count
// a multiple of 4, so the quad lies in one image, all past the columns or none).
fn load_b_quad4(g: u32, k: u32, n: u32) -> vec4<f32> {
    if (n >= p.gn) {
        return vec4(0.0);
    }
    let row = b_row(g, k);
    let b = n / q.ohw;
    let pix = n - b * q.ohw;
    if (MODE == 0u) {
        let x = b_src4[((b * q.cin + row.ch) * q.hw + pix) / 4u];
        if (IN_BN || IN_QUANT) {
            return input_formed4(x, row.in_bn);
        }
        return x;
    }
    let y = b_src4[((b * q.cout + row.ch) * q.ohw + pix) / 4u];
    if (OUT_BN) {
        return out_grad4(row.out_bn, b, pix, y);
    }
    return y;
}

// VEC_B 2 (grad-weight of a pointwise conv): B[k..k+3][n], input channel n at four pixels of
// one image, as one vec4 (0 past the GEMM's columns).
fn load_b_column4(g: u32, k: u32, n: u32) -> vec4<f32> {
    if (n >= p.gn) {
        return vec4(0.0);
    }
    let b = k / q.ohw;
    let pix = k - b * q.ohw;
    let sc = unshuffled(g * q.cig + n);
    let x = b_src4[((b * q.cin + sc) * q.hw + pix) / 4u];
    if (IN_BN) {
        return input_formed4(x, in_bn_of(sc));
    }
    if (IN_QUANT) {
        return input_formed4(x, vec4(0.0));
    }
    return x;
}

// VEC_B 2: the block B[k..k+3][n..n+3], column kk holding B[k + kk][n..n+3].
fn load_b_block4(g: u32, k: u32, n: u32) -> mat4x4<f32> {
    return transpose(mat4x4(load_b_column4(g, k, n), load_b_column4(g, k, n + 1u),
                            load_b_column4(g, k, n + 2u), load_b_column4(g, k, n + 3u)));
}

// A quad of A (rows m..m+3 at k) in the layer's form: one vec4 (VEC_A 1) or four elements.
fn load_a_quad(g: u32, m: u32, k: u32) -> vec4<f32> {
    if (VEC_A == 1u) {
        return load_a_quad4(g, m, k);
    }
    return load_a4(g, m, k);
}

// A quad of B (columns n..n+3 at k) in the layer's form: one vec4 (VEC_B 1) or four elements.
fn load_b_quad(g: u32, k: u32, n: u32) -> vec4<f32> {
    if (VEC_B == 1u) {
        return load_b_quad4(g, k, n);
    }
    return load_b4(g, k, n);
}

// Stores A's part of the K tile starting at k0 into buffer `buf`: quads, or with VEC_A 2 4x4
// blocks (the two k halves of a row quad in adjacent threads). Adjacent threads load adjacent
// k (contiguous in the weight and in dy).
fn store_a(lid: u32, k0: u32, buf: u32) {
    if (VEC_A == 2u) {
        for (var e = 0u; e < A_BLOCKS; e++) {
            let i = lid + e * THREADS;
            let kk = (i % (BK / 4u)) * 4u;
            let m = (i / (BK / 4u)) * 4u;
            let slot = m / RG;
            if (i >= BK * BM / 16u) {
                return;
            }
            var v: mat4x4<f32>;
            if (g0 + slot < q.groups && k0 + kk < k_end) {
                v = load_a_block4(g0 + slot, m0 + m - slot * RG, k0 + kk);
            }
            let at = buf * A_BUF + kk * AS4 + m / 4u;
            a_tile[at] = v[0];
            a_tile[at + AS4] = v[1];
            a_tile[at + 2u * AS4] = v[2];
            a_tile[at + 3u * AS4] = v[3];
        }
        return;
    }
    for (var e = 0u; e < A_QUADS; e++) {
        let i = lid + e * THREADS;
        let kk = i % BK;
        let m = (i / BK) * 4u;
        let slot = m / RG;
        if (i >= BK * BM / 4u) {
            return;
        }
        var v = vec4(0.0);
        if (g0 + slot < q.groups && k0 + kk < k_end) {
            v = load_a_quad(g0 + slot, m0 + m - slot * RG, k0 + kk);
        }
        a_tile[buf * A_BUF + kk * AS4 + m / 4u] = v;
    }
}

// Stores B's part (one B tile per group slot): quads, or with VEC_B 2 4x4 blocks. Adjacent
// threads load adjacent column quads (contiguous pixels).
fn store_b(lid: u32, k0: u32, buf: u32) {
    if (VEC_B == 2u) {
        for (var e = 0u; e < B_BLOCKS; e++) {
            let i = lid + e * THREADS;
            let slot = i / (BK * BN / 16u);
            let r = i - slot * (BK * BN / 16u);
            let nq = r % BS4;
            let kk = (r / BS4) * 4u;
            if (i >= GP * BK * BN / 16u) {
                return;
            }
            var v: mat4x4<f32>;
            if (g0 + slot < q.groups && k0 + kk < k_end) {
                v = load_b_block4(g0 + slot, k0 + kk, n0 + nq * 4u);
            }
            let at = buf * B_BUF + slot * B_SLOT + kk * BS4 + nq;
            b_tile[at] = v[0];
            b_tile[at + BS4] = v[1];
            b_tile[at + 2u * BS4] = v[2];
            b_tile[at + 3u * BS4] = v[3];
        }
        return;
    }
    for (var e = 0u; e < B_QUADS; e++) {
        let i = lid + e * THREADS;
        let slot = i / (BK * BS4);
        let r = i - slot * (BK * BS4);
        let nq = r % BS4;
        let kk = r / BS4;
        if (i >= GP * BK * BS4) {
            return;
        }
        var v = vec4(0.0);
        if (g0 + slot < q.groups && k0 + kk < k_end) {
            v = load_b_quad(g0 + slot, k0 + kk, n0 + nq * 4u);
        }
        b_tile[buf * B_BUF + slot * B_SLOT + kk * BS4 + nq] = v;
    }
}

// Stores the K tile starting at k0 into buffer `buf`, each store a quad (a vec4 of workgroup
// memory: 4 rows of A or 4 columns of B).
fn store_tile(lid: u32, k0: u32, buf: u32) {
    store_a(lid, k0, buf);
    store_b(lid, k0, buf);
}
