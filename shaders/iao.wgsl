// IAO fake quantizers with micronet's semantics (wqaq/iao, spec §1): observers, scale and zero
// point, forward and the clip-STE backward. `div_rn` (shaders/lib/division.wgsl) and the
// per-element functions (shaders/lib/iao_q.wgsl) are prepended.
//
// A quantizer has `rows` independent ranges (1 for a tensor or a per-layer weight, else one per
// output channel: row r covers elements r*row_len .. (r+1)*row_len of a contiguous tensor). Its
// state is rows x [min, max, scale, zp] followed by one word `observed` (1 once anything was
// observed since the quantizer was made or loaded: micronet's num_flag, which a checkpoint does
// not keep). Every step is PyTorch's f32 operation in PyTorch's order:
//   update   first call: (min, max) = current; else MinMax: running extremes, or
//            moving average: min = fl32(0.9 min) + fl32(0.1 cur) (products kept apart, below)
//   qparams  symmetric  s = max(fl32(max(|min|, |max|) / Q), eps), zp = 0,  Q = (qmax - qmin) / 2
//            asymmetric s = max(fl32(fl32(max - min) / Q), eps), zp = R(fl32(min / s)), Q = qmax - qmin
//   forward  v = fl32(x / s) - zp, code = clamp(R(v), qmin, qmax), y = (code + zp) * s
//   backward dx = fl32(fl32(g * s) / s) where qmin <= R(v) <= qmax and lo <= v <= hi, else 0, with
//            (lo, hi) the observer's range in v's units (symmetric: +-max(|lo|, |hi|))
// R rounds half away from zero. No fused multiply-add can move these: each product is followed
// by a division or by floor after a sum that is exact, except the moving average's two products,
// which pass through `opaque` so that a compiler cannot contract them into one FMA.

struct Params {
    n: u32,              // elements of x
    rows: u32,           // quantizer rows
    row_len: u32,        // elements per row
    blocks: u32,         // partial-reduction blocks per row
    qmin: f32,
    qmax: f32,
    asymmetric: u32,
    moving_average: u32,
    opaque_zero: u32,    // 0, unknown to the compiler
    k: u32,              // histogram observer: which smallest |x| (1-based)
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// per-block extremes: (row * blocks + block) * 2 + {0: min, 1: max}
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(3) var<storage, read> partials_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> state: array<f32>;
@group(0) @binding(5) var<storage, read> state_in: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> dy: array<f32>;
@group(0) @binding(8) var<storage, read_write> dx: array<f32>;
// QuantAdd: copies of the two observers' states (one after the other: they live in the buffer
// `state` is a view of, which one dispatch cannot also read), and the second summand
@group(0) @binding(9) var<storage, read> observed_pair: array<f32>;
@group(0) @binding(11) var<storage, read> x_b: array<f32>;
// PTQ's histogram observer: counts of |x| by the high, then the low 16 bits of its pattern (the
// patterns of non-negative floats sort as the floats do), and [high bits found, k left]
@group(0) @binding(12) var<storage, read_write> hist: array<atomic<u32>>;
@group(0) @binding(13) var<storage, read_write> select_state: array<u32>;

const WG: u32 = 256u;
// Elements of one row each workgroup of the extremes pass covers.
const CHUNK: u32 = 4096u;
const EPS: f32 = 1.1920929e-7;
const MOMENTUM: f32 = 0.1;
const KEEP: f32 = 0.9; // fl32(1 - 0.1), as PyTorch multiplies by it

var<workgroup> red_min: array<f32, 256>;
var<workgroup> red_max: array<f32, 256>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// The value of f, which the compiler cannot see through: an f32 that must be rounded as it is.
fn opaque(f: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(f) ^ p.opaque_zero);
}

fn row_of(i: u32) -> u32 {
    return i / p.row_len;
}

// Tree reduction of red_min / red_max; the result lands in element 0.
fn reduce_extremes(lid: u32) {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            red_min[lid] = min(red_min[lid], red_min[lid + stride]);
            red_max[lid] = max(red_max[lid], red_max[lid + stride]);
        }
    }
    workgroupBarrier();
}

// Extremes of each CHUNK of each row: one workgroup per (row, block).
@compute @workgroup_size(256)
fn iao_extremes_partial(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let g = wid.x + wid.y * nwg.x;
    let in_grid = g < p.rows * p.blocks;
    let row = g / max(p.blocks, 1u);
    let block = g % max(p.blocks, 1u);
    let start = row * p.row_len + block * CHUNK;
    let end = row * p.row_len + min((block + 1u) * CHUNK, p.row_len);
    var lo = 3.40282347e38;
    var hi = -3.40282347e38;
    if (in_grid) {
        for (var i = start + lid; i < end; i += WG) {
            lo = min(lo, x[i]);
            hi = max(hi, x[i]);
        }
    }
    red_min[lid] = lo;
    red_max[lid] = hi;
    reduce_extremes(lid);
    if (in_grid && lid == 0u) {
        partials[g * 2u] = red_min[0];
        partials[g * 2u + 1u] = red_max[0];
    }
}

fn qparams(r: u32) {
    let lo = state[r * 4u];
    let hi = state[r * 4u + 1u];
    var s: f32;
    var zp: f32;
    if (p.asymmetric == 1u) {
        s = max(div_rn(hi - lo, p.qmax - p.qmin), EPS);
        zp = round_away(div_rn(lo, s));
    } else {
        s = max(div_rn(max(abs(lo), abs(hi)), (p.qmax - p.qmin) * 0.5), EPS);
        zp = 0.0;
    }
    state[r * 4u + 2u] = s;
    state[r * 4u + 3u] = zp;
}

// Row r's observer takes the batch's extremes (the first call copies them), then scale and
// zero point.
fn observe_row(r: u32, cur: vec2<f32>, first: bool) {
    var new_lo = cur.x;
    var new_hi = cur.y;
    if (!first) {
        let old_lo = state[r * 4u];
        let old_hi = state[r * 4u + 1u];
        if (p.moving_average == 1u) {
            new_lo = opaque(KEEP * old_lo) + opaque(MOMENTUM * cur.x);
            new_hi = opaque(KEEP * old_hi) + opaque(MOMENTUM * cur.y);
        } else {
            new_lo = min(old_lo, cur.x);
            new_hi = max(old_hi, cur.y);
        }
    }
    state[r * 4u] = new_lo;
    state[r * 4u + 1u] = new_hi;
    qparams(r);
}

// Rows of at most this many blocks are merged one per invocation (per-channel weights: up to
// 1,024 rows of one block each), the others one at a time by the whole workgroup (an
// activation's one row of many blocks). min and max are exact in any order: the same bits
// either way, without a barrier pair per row where there are many.
const ROW_PER_INVOCATION_BLOCKS: u32 = 16u;

// Merges the blocks' extremes of each row, updates the observer (the first call copies), and
// forms scale and zero point. One workgroup.
@compute @workgroup_size(256)
fn iao_observe(@builtin(local_invocation_index) lid: u32) {
    let first = state[p.rows * 4u] == 0.0;
    if (p.blocks <= ROW_PER_INVOCATION_BLOCKS) {
        for (var r = lid; r < p.rows; r += WG) {
            var lo = 3.40282347e38;
            var hi = -3.40282347e38;
            for (var b = 0u; b < p.blocks; b++) {
                lo = min(lo, partials_in[(r * p.blocks + b) * 2u]);
                hi = max(hi, partials_in[(r * p.blocks + b) * 2u + 1u]);
            }
            observe_row(r, vec2(lo, hi), first);
        }
    } else {
        for (var r = 0u; r < p.rows; r++) {
            var lo = 3.40282347e38;
            var hi = -3.40282347e38;
            for (var b = lid; b < p.blocks; b += WG) {
                lo = min(lo, partials_in[(r * p.blocks + b) * 2u]);
                hi = max(hi, partials_in[(r * p.blocks + b) * 2u + 1u]);
            }
            red_min[lid] = lo;
            red_max[lid] = hi;
            reduce_extremes(lid);
            if (lid == 0u) {
                observe_row(r, vec2(red_min[0], red_max[0]), first);
            }
            workgroupBarrier();
        }
    }
    // Every invocation has read the flag before it is set.
    storageBarrier();
    workgroupBarrier();
    if (lid == 0u) {
        state[p.rows * 4u] = 1.0;
    }
}

// Scale and zero point of every row from the range already in the state (a loaded or merged
// range). One workgroup.
@compute @workgroup_size(256)
fn iao_qparams(@builtin(local_invocation_index) lid: u32) {
    for (var r = lid; r < p.rows; r += WG) {
        qparams(r);
    }
}

// The fake quantizer and the clip-STE of row r (lib/iao_q.wgsl).
fn fake_quant(xi: f32, r: u32) -> f32 {
    let s = state_in[r * 4u + 2u];
    let zp = state_in[r * 4u + 3u];
    return iao_fake_quant(xi, iao_v(xi, s, zp), s, zp, vec2(p.qmin, p.qmax));
}

fn grad(xi: f32, g: f32, r: u32) -> f32 {
    let s = state_in[r * 4u + 2u];
    let zp = state_in[r * 4u + 3u];
    return iao_grad(iao_v(xi, s, zp), g, s, zp, vec2(state_in[r * 4u], state_in[r * 4u + 1u]),
                    vec2(p.qmin, p.qmax), p.asymmetric != 0u);
}

@compute @workgroup_size(256)
fn iao_forward(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    y[i] = fake_quant(x[i], row_of(i));
}

// iao_forward over y itself: a network quantizes a recomputable input where it lies.
@compute @workgroup_size(256)
fn iao_forward_in_place(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    y[i] = fake_quant(y[i], row_of(i));
}

@compute @workgroup_size(256)
fn iao_backward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    dx[i] = grad(x[i], dy[i], row_of(i));
}

// iao_backward over the gradient in place: dx holds dL/dy and becomes dL/dx.
@compute @workgroup_size(256)
fn iao_backward_in_place(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    dx[i] = grad(x[i], dx[i], row_of(i));
}

// Element i (of input value xi): its gradient in dx masked, its quantized value into y.
fn mask_and_quantize(i: u32, xi: f32) {
    let r = row_of(i);
    dx[i] = grad(xi, dx[i], r);
    y[i] = fake_quant(xi, r);
}

// iao_backward_in_place, then the float x quantized where it lies (y holds x and becomes its
// fake-quantized value): one pass where a network forms its quantized input again for
// grad-weight after the mask, the same bits as the two kernels one after the other.
@compute @workgroup_size(256)
fn iao_backward_requantize(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    mask_and_quantize(i, y[i]);
}

// iao_backward_in_place and iao_forward (x into y) in one pass: the mask, and the quantized
// input formed again in a temporary for grad-weight.
@compute @workgroup_size(256)
fn iao_backward_quantize(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    mask_and_quantize(i, x[i]);
}

// QuantAdd (spec iao §2.1): the union of its two observers' ranges becomes the range of the
// quantizer both summands share (a one-row state). Scale and zero point follow separately, in
// training only (iao_qparams).
@compute @workgroup_size(1)
fn iao_union() {
    // The second copy starts 64 words (256 bytes, a binding offset's alignment) in.
    state[0] = min(observed_pair[0], observed_pair[64]);
    state[1] = max(observed_pair[1], observed_pair[65]);
}

// y = Q(a) + Q(b), both with the one shared quantizer.
@compute @workgroup_size(256)
fn iao_add_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    y[i] = fake_quant(x[i], 0u) + fake_quant(x_b[i], 0u);
}

// ---------------------------------------------------------------------------------------------
// PTQ's histogram observer (spec §1.5): the k-th smallest |x| by a two-pass radix select, exact
// (integer counts), then max = that value on the first call, else a moving average; min = 0.

const BINS: u32 = 65536u;
var<workgroup> red_count: array<u32, 256>;

@compute @workgroup_size(256)
fn iao_hist_clear(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i < BINS) {
        atomicStore(&hist[i], 0u);
    }
}

@compute @workgroup_size(256)
fn iao_hist_hi(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    atomicAdd(&hist[bitcast<u32>(abs(x[i])) >> 16u], 1u);
}

@compute @workgroup_size(256)
fn iao_hist_lo(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let bits = bitcast<u32>(abs(x[i]));
    if ((bits >> 16u) == select_state[0]) {
        atomicAdd(&hist[bits & 0xffffu], 1u);
    }
}

// The bin holding the k-th counted value (1-based), and how many of that bin's values come
// before it, k - (values in lower bins): each thread sums 256 bins, thread 0 walks the sums.
fn find_bin(lid: u32, k: u32) -> vec2<u32> {
    var sum = 0u;
    for (var b = lid * 256u; b < lid * 256u + 256u; b++) {
        sum += atomicLoad(&hist[b]);
    }
    red_count[lid] = sum;
    workgroupBarrier();
    var out = vec2<u32>(0u, 0u);
    if (lid == 0u) {
        var before = 0u;
        var t = 0u;
        while (t < 255u && before + red_count[t] < k) {
            before += red_count[t];
            t++;
        }
        var b = t * 256u;
        loop {
            let c = atomicLoad(&hist[b]);
            if (before + c >= k || b == t * 256u + 255u) {
                break;
            }
            before += c;
            b++;
        }
        out = vec2<u32>(b, k - before);
    }
    return out;
}

@compute @workgroup_size(256)
fn iao_select_hi(@builtin(local_invocation_index) lid: u32) {
    let found = find_bin(lid, p.k);
    if (lid == 0u) {
        select_state[0] = found.x;
        select_state[1] = found.y;
    }
}

@compute @workgroup_size(256)
fn iao_select_lo(@builtin(local_invocation_index) lid: u32) {
    let found = find_bin(lid, select_state[1]);
    if (lid == 0u) {
        let cur = bitcast<f32>((select_state[0] << 16u) | found.x);
        var hi = cur;
        if (state[4] != 0.0) {
            hi = opaque(KEEP * state[1]) + opaque(MOMENTUM * cur);
        }
        state[0] = 0.0;
        state[1] = hi;
        qparams(0u);
        state[4] = 1.0;
    }
}
