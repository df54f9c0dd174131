// BatchNorm2d over (N, C, S) activations (S = H*W), PyTorch semantics, with an optional fused
// activation (NIN follows BN with a ReLU, or with wbwtab's sign in its place; fusing saves two
// passes each way), an optional fused channel
// shuffle after it (NIN-GC's; the output is written permuted and the gradient read permuted, so
// the unshuffled output never exists) and, forward only, the next layer's activation quantizer.
//   train: normalise with the batch mean and biased variance; running stats move by momentum
//          with the unbiased variance (n / (n - 1));
//   eval:  normalise with the running stats.
// stats = per channel [mean, invstd, gamma, beta] each step (then the backward's dbeta, dgamma
// and bn_scale, see bn_backward_reduce; the layout is lib/bn.wgsl's BN_TABLE): the statistics
// kernels copy gamma and beta beside them, so that a conv that forms this BatchNorm's output where it loads its input
// (conv2d.wgsl's IN_BN) reads one table. Per-channel reductions are one workgroup per channel,
// two passes (mean, then squared deviations) over the same data, tree-reduced: deterministic.

struct Params {
    n: u32,          // N
    c: u32,          // C
    s: u32,          // S
    act: u32,        // the activation after BN (lib/bn.wgsl's ACT_*), and its mask backward
    eps: f32,
    momentum: f32,
    shuffle: u32,    // channel shuffle groups after BN (and its activation); 1: none
    quantize: u32,   // 1: apply writes the activation quantizer's output (the next layer's input)
    levels_f: f32,   // the quantizer's f32(n) and fl32(1 / n), as in quant.wgsl
    inv_levels: f32,
    tile: u32,       // bn_stats_merge: columns (of N * S) per partial
    tiles: u32,      // bn_backward_merge: partial sums per channel
}

@group(0) @binding(0) var<uniform> p: Params;
// bn_stats (train): x, gamma, beta -> stats, running stats updated in place
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_var: array<f32>;
// bn_eval_stats: running stats, gamma, beta -> stats (reads 3, 4, 6, 7, writes 2)
// bn_apply: x, stats, gamma, beta -> y
@group(0) @binding(5) var<storage, read> stats_in: array<f32>;
@group(0) @binding(6) var<storage, read> gamma: array<f32>;
@group(0) @binding(7) var<storage, read> beta: array<f32>;
@group(0) @binding(8) var<storage, read_write> y: array<f32>;
// backward: x, gamma, beta (for the activation's mask), dy -> dgamma, dbeta (reduce), then dx
// (apply)
@group(0) @binding(10) var<storage, read> dy: array<f32>;
@group(0) @binding(11) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(12) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(13) var<storage, read> dgamma_in: array<f32>;
@group(0) @binding(14) var<storage, read> dbeta_in: array<f32>;
@group(0) @binding(15) var<storage, read_write> dx: array<f32>;
// bn_stats_merge: per-tile (mean, M2) partials from the conv before, (tiles, 2, C)
// (conv2d.wgsl's BN_STATS); bn_backward_merge: per-tile sums from the reader after (BN_SUMS).
@group(0) @binding(16) var<storage, read> partials: array<f32>;
// bn_apply_extremes: per block of EXTREMES_CHUNK outputs, their [min, max] (an IAO quantizer's
// partials, shaders/iao.wgsl's layout for one row).
@group(0) @binding(17) var<storage, read_write> extremes: array<f32>;
// bn_apply_iao_*: the state of the IAO quantizer after the BatchNorm (per tensor: min,
// max, scale, zero point; shaders/iao.wgsl's layout), and its code range and type.
@group(0) @binding(18) var<storage, read> iao_state: array<f32>;
// bn_apply_iao_backward_sums and _mask_sums: the BatchNorm's backward sums per tile.
@group(0) @binding(19) var<storage, read_write> sums_out: array<f32>;
override IAO_QMIN: f32 = 0.0;
override IAO_QMAX: f32 = 0.0;
override IAO_ASYMMETRIC: bool = false;

const WG: u32 = 256u;
var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

// Element i's channel and where its output (and output gradient) lies: with a fused shuffle,
// channel c goes to (c % per) * g + c / per, micronet's channel_shuffle. As few integer
// divisions as the shuffle allows (they were most of an elementwise pass's time on a CPU
// driver).
struct Place {
    c: u32,
    out: u32,
}

fn place(i: u32) -> Place {
    let plane = i / p.s;
    let c = plane % p.c;
    if (p.shuffle <= 1u) {
        return Place(c, i);
    }
    return Place(c, (plane - c + shuffled(c)) * p.s + (i - plane * p.s));
}

fn shuffled(c: u32) -> u32 {
    if (p.shuffle <= 1u) {
        return c;
    }
    let per = p.c / p.shuffle;
    return (c % per) * p.shuffle + c / per;
}

// A per-channel pass visits j = lid, lid + WG, ... over channel c's (n, s) elements in order.
// Walk is j as (n, s), advanced by WG with a division only when it crosses a plane (the
// integer division per element was most of these passes' time on a CPU driver).
struct Walk {
    b: u32,
    s: u32,
}

fn walk_start(lid: u32) -> Walk {
    return Walk(lid / p.s, lid % p.s);
}

fn walk_next(w: Walk) -> Walk {
    var r = Walk(w.b, w.s + WG);
    if (r.s >= p.s) {
        let q = r.s / p.s;
        r.b += q;
        r.s -= q * p.s;
    }
    return r;
}

fn walk_index(c: u32, w: Walk) -> u32 {
    return (w.b * p.c + c) * p.s + w.s;
}

fn tree_sum_a(lid: u32) -> f32 {
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        if (lid < st) {
            red_a[lid] += red_a[lid + st];
        }
        workgroupBarrier();
    }
    let v = red_a[0];
    workgroupBarrier();
    return v;
}

fn tree_sum_ab(lid: u32) -> vec2<f32> {
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        if (lid < st) {
            red_a[lid] += red_a[lid + st];
            red_b[lid] += red_b[lid + st];
        }
        workgroupBarrier();
    }
    let v = vec2<f32>(red_a[0], red_b[0]);
    workgroupBarrier();
    return v;
}

// One workgroup per channel: mean, biased variance -> stats; running stats updated.
@compute @workgroup_size(256)
fn bn_stats(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= p.c) {
        return;
    }
    let count = p.n * p.s;
    var acc = 0.0;
    var w = walk_start(lid);
    for (var j = lid; j < count; j += WG) {
        acc += x[walk_index(c, w)];
        w = walk_next(w);
    }
    red_a[lid] = acc;
    let mean = tree_sum_a(lid) / f32(count);
    acc = 0.0;
    w = walk_start(lid);
    for (var j = lid; j < count; j += WG) {
        let d = x[walk_index(c, w)] - mean;
        acc += d * d;
        w = walk_next(w);
    }
    red_a[lid] = acc;
    let var_b = tree_sum_a(lid) / f32(count);
    if (lid == 0u) {
        write_stats(c, mean, var_b, count);
    }
}

// The batch mean and biased variance -> stats of channel c; running stats updated.
fn write_stats(c: u32, mean: f32, var_b: f32, count: u32) {
    stats[c * BN_TABLE + BN_MEAN] = mean;
    stats[c * BN_TABLE + BN_INVSTD] = 1.0 / sqrt(var_b + p.eps);
    stats[c * BN_TABLE + BN_GAMMA] = gamma[c];
    stats[c * BN_TABLE + BN_BETA] = beta[c];
    let unbiased = var_b * f32(count) / f32(max(count, 2u) - 1u);
    running_mean[c] = (1.0 - p.momentum) * running_mean[c] + p.momentum * mean;
    running_var[c] = (1.0 - p.momentum) * running_var[c] + p.momentum * unbiased;
}

// The merges of per-tile partials (bn_stats_merge, bn_backward_merge) run MERGE_SPLITS
// invocations per channel, MERGE_CH channels per workgroup (adjacent invocations take adjacent
// channels, so a subgroup's loads are a few contiguous runs): split j takes the j-th run of
// ceil(tiles / MERGE_SPLITS) consecutive tiles in order, then the splits are merged in a fixed
// tree, so every run gives the same bits. (One invocation walking every tile made a chain of
// thousands of dependent loads, 2,048 tiles per 32x32 layer at batch 256, on one workgroup.)
const MERGE_CH: u32 = 8u;
const MERGE_SPLITS: u32 = WG / MERGE_CH;
var<workgroup> red_n: array<f32, 256>;

struct MergeLane {
    c: u32,       // the channel (p.c or more: none; such a lane still takes the barriers)
    first: u32,   // its tiles: first .. end
    end: u32,
}

fn merge_lane(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, tiles: u32) -> MergeLane {
    let c = (wid.x + wid.y * nwg.x) * MERGE_CH + lid % MERGE_CH;
    let per = (tiles + MERGE_SPLITS - 1u) / MERGE_SPLITS;
    let first = min(tiles, (lid / MERGE_CH) * per);
    let end = select(first, min(tiles, first + per), c < p.c);
    return MergeLane(c, first, end);
}

// Chan's merge of the statistics (count, mean, M2) of two disjoint sets of values.
fn chan_merge(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    if (b.x == 0.0) {
        return a;
    }
    let n = a.x + b.x;
    let delta = b.y - a.y;
    return vec3<f32>(n, a.y + delta * (b.x / n), a.z + b.z + delta * delta * (a.x * b.x / n));
}

// bn_stats from the conv's per-tile partials: each split merges its tiles in order (Chan's
// formula), then the splits in a fixed tree, the same every run.
@compute @workgroup_size(256)
fn bn_stats_merge(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let count = p.n * p.s;
    let l = merge_lane(wid, nwg, lid, (count + p.tile - 1u) / p.tile);
    var acc = vec3<f32>(0.0);
    for (var t = l.first; t < l.end; t++) {
        let nb = f32(min(p.tile, count - t * p.tile));
        acc = chan_merge(acc, vec3<f32>(nb, partials[(2u * t) * p.c + l.c],
                                        partials[(2u * t + 1u) * p.c + l.c]));
    }
    red_n[lid] = acc.x;
    red_a[lid] = acc.y;
    red_b[lid] = acc.z;
    workgroupBarrier();
    for (var st = WG / 2u; st >= MERGE_CH; st >>= 1u) {
        if (lid < st) {
            let o = lid + st;
            let m = chan_merge(vec3<f32>(red_n[lid], red_a[lid], red_b[lid]),
                               vec3<f32>(red_n[o], red_a[o], red_b[o]));
            red_n[lid] = m.x;
            red_a[lid] = m.y;
            red_b[lid] = m.z;
        }
        workgroupBarrier();
    }
    if (lid < MERGE_CH && l.c < p.c) {
        write_stats(l.c, red_a[lid], red_b[lid] / f32(count), count);
    }
}

// Eval: stats from the running statistics.
@compute @workgroup_size(256)
fn bn_eval_stats(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let c = (wid.x + wid.y * nwg.x) * WG + lid;
    if (c >= p.c) {
        return;
    }
    stats[c * BN_TABLE + BN_MEAN] = running_mean[c];
    stats[c * BN_TABLE + BN_INVSTD] = 1.0 / sqrt(running_var[c] + p.eps);
    stats[c * BN_TABLE + BN_GAMMA] = gamma[c];
    stats[c * BN_TABLE + BN_BETA] = beta[c];
}

// gamma * (x - mean) * invstd + beta, before any fused activation. The backward forms it again
// for the activation's mask, so it never reads y, which a network may have overwritten by then.
fn bn_value_of(v: f32, c: u32) -> f32 {
    return bn_affine(v, stats_in[c * BN_TABLE + BN_MEAN], stats_in[c * BN_TABLE + BN_INVSTD],
                     gamma[c], beta[c]);
}

// bn_apply's value (before any fused quantizer) of input v of channel c: bn_value_of, then the
// fused activation.
fn bn_output_of(v: f32, c: u32) -> f32 {
    return bn_act(bn_value_of(v, c), p.act);
}

// DoReFa's activation quantizer (shaders/lib/act.wgsl, prepended): a BatchNorm whose output
// only feeds a quantized layer writes that layer's input at once.
fn act_value(x: f32) -> f32 {
    return dorefa_act(x, p.levels_f, p.inv_levels);
}

// y = gamma * (x - mean) * invstd + beta, then the activation if fused, then the quantizer if
// fused.
@compute @workgroup_size(256)
fn bn_apply(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n * p.c * p.s) {
        return;
    }
    let at = place(i);
    let r = bn_output_of(x[i], at.c);
    y[at.out] = select(r, act_value(r), p.quantize == 1u);
}

// Outputs per workgroup of bn_apply_extremes: shaders/iao.wgsl's CHUNK (src/kernels/norm.rs
// checks that the two agree).
const EXTREMES_CHUNK: u32 = 4096u;

// The element whose output lies at o (place's inverse): its channel, and its index in `out`.
fn input_of(o: u32) -> Place {
    let plane = o / p.s;
    let co = plane % p.c;
    if (p.shuffle <= 1u) {
        return Place(co, o);
    }
    let per = p.c / p.shuffle;
    let c = (co % p.shuffle) * per + co / p.shuffle;
    return Place(c, (plane - co + c) * p.s + (o - plane * p.s));
}

// bn_apply (without the DoReFa quantizer) that also writes the extremes of what it writes, as
// the IAO quantizer reading this output would find them in its own pass (iao_extremes_partial
// over y): workgroup g takes outputs g * EXTREMES_CHUNK .. in the same order and reduces them in
// the same tree, so its observer gets the same bits and the output is not read again for them.
@compute @workgroup_size(256)
fn bn_apply_extremes(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let g = wid.x + wid.y * nwg.x;
    let n = p.n * p.c * p.s;
    let in_grid = g < (n + EXTREMES_CHUNK - 1u) / EXTREMES_CHUNK;
    var lo = 3.40282347e38;
    var hi = -3.40282347e38;
    if (in_grid) {
        let end = min((g + 1u) * EXTREMES_CHUNK, n);
        for (var o = g * EXTREMES_CHUNK + lid; o < end; o += WG) {
            let at = input_of(o);
            let r = bn_output_of(x[at.out], at.c);
            y[o] = r;
            lo = min(lo, r);
            hi = max(hi, r);
        }
    }
    red_a[lid] = lo;
    red_b[lid] = hi;
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            red_a[lid] = min(red_a[lid], red_a[lid + stride]);
            red_b[lid] = max(red_b[lid], red_b[lid + stride]);
        }
    }
    workgroupBarrier();
    if (in_grid && lid == 0u) {
        extremes[g * 2u] = red_a[0];
        extremes[g * 2u + 1u] = red_b[0];
    }
}

// The passes of a layer whose input is this BatchNorm's output under an IAO quantizer (per
// tensor), in its backward pass: the output formed again (bn_apply's value), then quantized
// into y, or the layer's input gradient dx masked by the quantizer's clip-STE, or both, where
// they lie. The same bits as bn_apply followed by iao.wgsl's kernels over its output.

// Element i's output place and bn_apply's value of it.
struct Formed {
    out: u32,
    r: f32,
}

fn formed(i: u32) -> Formed {
    let at = place(i);
    return Formed(at.out, bn_output_of(x[i], at.c));
}

fn iao_quantized(r: f32) -> f32 {
    let s = iao_state[2];
    let zp = iao_state[3];
    return iao_fake_quant(r, iao_v(r, s, zp), s, zp, vec2(IAO_QMIN, IAO_QMAX));
}

fn iao_masked(r: f32, g: f32) -> f32 {
    let s = iao_state[2];
    let zp = iao_state[3];
    return iao_grad(iao_v(r, s, zp), g, s, zp, vec2(iao_state[0], iao_state[1]),
                    vec2(IAO_QMIN, IAO_QMAX), IAO_ASYMMETRIC);
}

// The _sums forms of the passes that mask the gradient also form this BatchNorm's backward sums
// from it, for bn_backward_merge (sum dy' and sum dy' * xhat per tile and channel, (tiles, 2, C) in
// sums_out, dy' the masked gradient after the activation's mask), so that no reduction pass reads
// the BatchNorm's input and gradient again: workgroup g takes channel c = g / p.tiles and its
// SUM_TILE elements from t * SUM_TILE (t = g % p.tiles) in (n, s) order, SUM_TILE / WG per
// invocation (one barrier tree per tile: barriers are dear on a CPU driver).
const SUM_TILE: u32 = 4096u;

// The terms of the sums of an element of channel c: dy' and dy' * xhat, for its BatchNorm input
// xv, the BatchNorm's value u (before the activation, whose mask it gives) and masked gradient g.
fn sum_terms(c: u32, xv: f32, u: f32, g: f32) -> vec2<f32> {
    let gm = select(0.0, g, act_passes(u, p.act));
    let xhat = (xv - stats_in[c * BN_TABLE + BN_MEAN]) * stats_in[c * BN_TABLE + BN_INVSTD];
    return vec2(gm, gm * xhat);
}

// Invocation lid's elements of tile t of channel c (SUM_TILE / WG of them, WG apart): where the
// BatchNorm input and its output lie, walked without a division per element.
struct TileWalk {
    c: u32,
    co: u32,
    t: u32,
    j: u32,
    w: Walk,
}

fn tile_walk(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> TileWalk {
    let g = wid.x + wid.y * nwg.x;
    let c = g / p.tiles;
    let t = g % p.tiles;
    let j = t * SUM_TILE + lid;
    return TileWalk(c, shuffled(min(c, p.c - 1u)), t, j, walk_start(j));
}

fn tile_valid(tw: TileWalk) -> bool {
    return tw.c < p.c && tw.j < p.n * p.s;
}

fn tile_next(tw: TileWalk) -> TileWalk {
    return TileWalk(tw.c, tw.co, tw.t, tw.j + WG, walk_next(tw.w));
}

// The walk's element (valid) formed again and its gradient masked in place: where its output
// lies, bn_apply's value of it, and its terms of the sums.
struct TileMasked {
    o: u32,
    r: f32,
    terms: vec2<f32>,
}

fn tile_mask(tw: TileWalk) -> TileMasked {
    let xv = x[walk_index(tw.c, tw.w)];
    let o = walk_index(tw.co, tw.w);
    let u = bn_value_of(xv, tw.c);
    let r = bn_act(u, p.act);
    let g = iao_masked(r, dx[o]);
    dx[o] = g;
    return TileMasked(o, r, sum_terms(tw.c, xv, u, g));
}

// This invocation's sums added over the workgroup in a fixed tree and written for the walk's
// tile and channel (every invocation calls it: it holds the barriers).
fn write_tile_sums(tw: TileWalk, lid: u32, acc: vec2<f32>) {
    red_a[lid] = acc.x;
    red_b[lid] = acc.y;
    let sums = tree_sum_ab(lid);
    if (lid == 0u && tw.c < p.c) {
        sums_out[(2u * tw.t) * p.c + tw.c] = sums.x;
        sums_out[(2u * tw.t + 1u) * p.c + tw.c] = sums.y;
    }
}

// Both: a conv's input gradient masked and its input quantized for grad-weight, after its
// grad-input (iao_backward_requantize's bits).
@compute @workgroup_size(256)
fn bn_apply_iao_backward(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n * p.c * p.s) {
        return;
    }
    let f = formed(i);
    dx[f.out] = iao_masked(f.r, dx[f.out]);
    y[f.out] = iao_quantized(f.r);
}

@compute @workgroup_size(256)
fn bn_apply_iao_backward_sums(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    var tw = tile_walk(wid, nwg, lid);
    var acc = vec2(0.0);
    for (var k = 0u; k < SUM_TILE / WG; k++) {
        if (tile_valid(tw)) {
            let m = tile_mask(tw);
            y[m.o] = iao_quantized(m.r);
            acc += m.terms;
        }
        tw = tile_next(tw);
    }
    write_tile_sums(tw, lid, acc);
}

// The quantized input alone: a max-pool's, before its backward finds the maxima in it
// (iao_forward's bits).
@compute @workgroup_size(256)
fn bn_apply_iao_quantize(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n * p.c * p.s) {
        return;
    }
    let f = formed(i);
    y[f.out] = iao_quantized(f.r);
}

// The mask alone: a pool's input gradient, after its backward (iao_backward_in_place's bits).
@compute @workgroup_size(256)
fn bn_apply_iao_mask(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n * p.c * p.s) {
        return;
    }
    let f = formed(i);
    dx[f.out] = iao_masked(f.r, dx[f.out]);
}

// bn_apply_iao_backward_sums without the quantized output (an entry of its own: an entry point
// may only reach the bindings its pipeline binds, and this one binds no y).
@compute @workgroup_size(256)
fn bn_apply_iao_mask_sums(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    var tw = tile_walk(wid, nwg, lid);
    var acc = vec2(0.0);
    for (var k = 0u; k < SUM_TILE / WG; k++) {
        if (tile_valid(tw)) {
            acc += tile_mask(tw).terms;
        }
        tw = tile_next(tw);
    }
    write_tile_sums(tw, lid, acc);
}

// One workgroup per channel: dbeta = sum dy', dgamma = sum dy' * xhat (dy' = dy after the
// activation's mask), also copied into the table (BN_DBETA, BN_DGAMMA, with bn_scale at BN_SCALE)
// for a conv that applies the backward where it loads its output gradient (conv2d.wgsl's OUT_BN).
@compute @workgroup_size(256)
fn bn_backward_reduce(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= p.c) {
        return;
    }
    let count = p.n * p.s;
    let mean = stats[c * BN_TABLE + BN_MEAN];
    let invstd = stats[c * BN_TABLE + BN_INVSTD];
    var sdy = 0.0;
    var sdyx = 0.0;
    // Channel c's gradient lies in channel `co` of dy (the fused shuffle); the activation's mask
    // as in bn_grad.
    let co = shuffled(c);
    var w = walk_start(lid);
    for (var j = lid; j < count; j += WG) {
        let xv = x[walk_index(c, w)];
        var g = dy[walk_index(co, w)];
        w = walk_next(w);
        if (p.act != ACT_NONE) {
            g = select(0.0, g, act_passes(bn_affine(xv, mean, invstd, gamma[c], beta[c]), p.act));
        }
        sdy += g;
        sdyx += g * ((xv - mean) * invstd);
    }
    red_a[lid] = sdy;
    red_b[lid] = sdyx;
    let sums = tree_sum_ab(lid);
    if (lid == 0u) {
        dbeta[c] = sums.x;
        dgamma[c] = sums.y;
        stats[c * BN_TABLE + BN_DBETA] = sums.x;
        stats[c * BN_TABLE + BN_DGAMMA] = sums.y;
        stats[c * BN_TABLE + BN_SCALE] = bn_scale(gamma[c], invstd, f32(count));
    }
}

// bn_backward_reduce from the per-tile sums its reader formed as it wrote dy (conv2d.wgsl's
// and maxpool.wgsl's BN_SUMS: (tiles, 2, C), sum dy' then sum dy' * xhat): each split adds its
// tiles in order, then the splits are added in a fixed tree (as bn_stats_merge), the same
// every run.
@compute @workgroup_size(256)
fn bn_backward_merge(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let l = merge_lane(wid, nwg, lid, p.tiles);
    var sdy = 0.0;
    var sdyx = 0.0;
    for (var t = l.first; t < l.end; t++) {
        sdy += partials[(2u * t) * p.c + l.c];
        sdyx += partials[(2u * t + 1u) * p.c + l.c];
    }
    red_a[lid] = sdy;
    red_b[lid] = sdyx;
    workgroupBarrier();
    for (var st = WG / 2u; st >= MERGE_CH; st >>= 1u) {
        if (lid < st) {
            red_a[lid] += red_a[lid + st];
            red_b[lid] += red_b[lid + st];
        }
        workgroupBarrier();
    }
    let c = l.c;
    if (lid < MERGE_CH && c < p.c) {
        let count = p.n * p.s;
        dbeta[c] = red_a[lid];
        dgamma[c] = red_b[lid];
        let invstd = stats[c * BN_TABLE + BN_INVSTD];
        stats[c * BN_TABLE + BN_DBETA] = red_a[lid];
        stats[c * BN_TABLE + BN_DGAMMA] = red_b[lid];
        stats[c * BN_TABLE + BN_SCALE] = bn_scale(gamma[c], invstd, f32(count));
    }
}

// dx = gamma * invstd / n * (n dy' - dbeta - xhat * dgamma), for element i with input xv.
fn bn_dx(i: u32, xv: f32) -> f32 {
    let at = place(i);
    let c = at.c;
    let invstd = stats_in[c * BN_TABLE + BN_INVSTD];
    let count = f32(p.n * p.s);
    return bn_grad(xv, dy[at.out], stats_in[c * BN_TABLE + BN_MEAN], invstd, gamma[c], beta[c], dbeta_in[c],
                   dgamma_in[c], count, bn_scale(gamma[c], invstd, count), p.act);
}

// Where S is a multiple of 4 the backward applies take four consecutive elements per
// invocation (one plane, so one channel: its place and table found once, the same formula per
// element); the launch sizes its grid to match (src/kernels/norm.rs: `backward_apply`).
fn quads() -> bool {
    return (p.s & 3u) == 0u;
}

// bn_dx of the four elements from i0 (a multiple of 4, S a multiple of 4), with inputs xv.
fn bn_dx4(i0: u32, xv: vec4<f32>) -> vec4<f32> {
    let at = place(i0);
    let c = at.c;
    let mean = stats_in[c * BN_TABLE + BN_MEAN];
    let invstd = stats_in[c * BN_TABLE + BN_INVSTD];
    let count = f32(p.n * p.s);
    let scale = bn_scale(gamma[c], invstd, count);
    let g = gamma[c];
    let b = beta[c];
    let db = dbeta_in[c];
    let dg = dgamma_in[c];
    var r: vec4<f32>;
    for (var k = 0u; k < 4u; k++) {
        r[k] = bn_grad(xv[k], dy[at.out + k], mean, invstd, g, b, db, dg, count, scale, p.act);
    }
    return r;
}

@compute @workgroup_size(256)
fn bn_backward_apply(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    let total = p.n * p.c * p.s;
    if (quads()) {
        let i0 = 4u * i;
        if (i0 >= total) {
            return;
        }
        let r = bn_dx4(i0, vec4<f32>(x[i0], x[i0 + 1u], x[i0 + 2u], x[i0 + 3u]));
        for (var k = 0u; k < 4u; k++) {
            dx[i0 + k] = r[k];
        }
        return;
    }
    if (i >= total) {
        return;
    }
    dx[i] = bn_dx(i, x[i]);
}

// bn_backward_apply with dx over x (each element reads its own input, then overwrites it): a
// network writes a BatchNorm's input gradient where the conv output it normalised was, which
// nothing reads again.
@compute @workgroup_size(256)
fn bn_backward_apply_in_place(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    let total = p.n * p.c * p.s;
    if (quads()) {
        let i0 = 4u * i;
        if (i0 >= total) {
            return;
        }
        let r = bn_dx4(i0, vec4<f32>(dx[i0], dx[i0 + 1u], dx[i0 + 2u], dx[i0 + 3u]));
        for (var k = 0u; k < 4u; k++) {
            dx[i0 + k] = r[k];
        }
        return;
    }
    if (i >= total) {
        return;
    }
    dx[i] = bn_dx(i, dx[i]);
}
