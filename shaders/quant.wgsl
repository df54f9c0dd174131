// DoReFa quantizers with micronet's semantics (spec §1-§2), forward and backward, and real
// quantize/dequantize to integer codes.
//
// Exactness. Levels must match the spec's GPU-faithful formulas bit for bit:
//   activations  k = floor(fl32(c * n) + 0.5),          y = k * fl32(1/n)
//   weights      u = fl32(fl32(t/2) / m) + 0.5,  k = floor(fl32(u * n) + 0.5),  w = 2 * (k * fl32(1/n)) - 1
// Two things could break that on a GPU. (1) A compiler may fuse `c * n + 0.5` into one FMA; for
// 0 <= c*n < 2^23 that cannot change floor(...) (the +0.5 of a float below 2^23 never rounds across
// an integer, and the fused and unfused sums round on the same grid with the same ties), so
// nothing is needed. (2) Vulkan allows f32 division to be off by 2.5 ulp; `div_rn` corrects the
// hardware quotient to the correctly rounded one with exact integer arithmetic.
// tanh is the one inexact step (see tanh_safe: about 1 ulp; PyTorch's CPU and CUDA differ by as
// much), so the weight kernels store t = tanh(W) and the levels are exact given t.

struct Params {
    n: u32,            // elements
    levels: u32,       // n_q = 2^bits - 1 (bits 2..=16; 32-bit identity never reaches a shader)
    members: u32,      // members of a weight-quantizer group
    _pad0: u32,
    levels_f: f32,     // f32(n_q)
    inv_levels: f32,   // fl32(1 / n_q), rounded from the exact double on the CPU
    _pad1: f32,
    _pad2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// act_forward, act_codes
@group(0) @binding(1) var<storage, read> act_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> act_y: array<f32>;
// act_backward
@group(0) @binding(3) var<storage, read> act_x_saved: array<f32>;
@group(0) @binding(4) var<storage, read> act_dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> act_dx: array<f32>;
// weight quantizer: W -> t = tanh(W) and per-workgroup max |t|
@group(0) @binding(6) var<storage, read> wq_w: array<f32>;
@group(0) @binding(7) var<storage, read_write> wq_t: array<f32>;
@group(0) @binding(8) var<storage, read_write> wq_partials: array<f32>;
// stats = [m, S, c, 0]: max |t|, sum of du*v (backward), number of elements with |t| = m
@group(0) @binding(9) var<storage, read> wq_partials_in: array<f32>;
@group(0) @binding(10) var<storage, read_write> wq_stats: array<f32>;
@group(0) @binding(11) var<storage, read> wq_t_in: array<f32>;
@group(0) @binding(12) var<storage, read> wq_stats_in: array<f32>;
@group(0) @binding(13) var<storage, read_write> wq_w_hat: array<f32>;
// weight backward: upstream gradient G = dL/dW_hat, and dL/dW
@group(0) @binding(14) var<storage, read> wq_g: array<f32>;
@group(0) @binding(15) var<storage, read_write> wq_dw: array<f32>;
// integer codes: one per u32, or four 8-bit codes per u32 when PACKED
@group(0) @binding(16) var<storage, read_write> codes_out: array<u32>;
@group(0) @binding(17) var<storage, read> codes_in: array<u32>;
// exact-division check
@group(0) @binding(18) var<storage, read> div_a: array<f32>;
@group(0) @binding(19) var<storage, read> div_b: array<f32>;
@group(0) @binding(20) var<storage, read> div_nudge: array<i32>;
@group(0) @binding(21) var<storage, read_write> div_q: array<f32>;
// the weight tensors a weight-quantizer launch covers (see Member)
@group(0) @binding(22) var<storage, read> members: array<Member>;

// Codes of at most 8 bits are packed four per word, element i in byte i % 4.
override PACKED: bool = true;

const WG: u32 = 256u;
// Elements each workgroup of a reduction pass covers.
const CHUNK: u32 = 4096u;

var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// By bit pattern: Vulkan lets compilers assume floats are never NaN, and `x != x` was seen
// folded to false (on lavapipe); integer tests cannot be.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// ---------------------------------------------------------------------------------------------
// Activation quantizer: y = Round(clamp(0.1 x, 0, 1) * n) / n, in [0, 1], not rescaled by 10.

fn act_code(x: f32) -> f32 {
    let c = clamp(x * 0.1, 0.0, 1.0);
    return floor(c * p.levels_f + 0.5);
}

fn act_value(x: f32) -> f32 {
    return dorefa_act(x, p.levels_f, p.inv_levels);
}

@compute @workgroup_size(256)
fn act_forward(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    act_y[i] = act_value(act_x[i]);
}

// act_forward over act_y itself: a network quantizes a recomputable input where it lies.
@compute @workgroup_size(256)
fn act_forward_in_place(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    act_y[i] = act_value(act_y[i]);
}

// Straight-through (dorefa_act_grad in shaders/lib/act.wgsl).
@compute @workgroup_size(256)
fn act_backward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    act_dx[i] = dorefa_act_grad(act_x_saved[i], act_dy[i]);
}

// act_backward with dy already in act_dx (overwritten with dx): saves the network a buffer.
@compute @workgroup_size(256)
fn act_backward_in_place(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    act_dx[i] = dorefa_act_grad(act_x_saved[i], act_dx[i]);
}

// act_backward_in_place, then act_forward_in_place, in one pass over a recomputed float input
// x (in act_y): the gradient in act_dx is masked by x, then x becomes its quantized value (what
// the layer's grad-weight reads next). The same expressions, so the same bits, as the two.
@compute @workgroup_size(256)
fn act_backward_requantize(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let x = act_y[i];
    act_dx[i] = dorefa_act_grad(x, act_dx[i]);
    act_y[i] = act_value(x);
}

// Exactly rounded division: div_rn, div_rn_from (shaders/lib/division.wgsl, prepended), and
// dorefa_act, dorefa_act_grad (shaders/lib/act.wgsl, prepended).

// Checks div_rn on the adapter: q = div_rn_from(a, b, hardware a/b moved by nudge ulp).
@compute @workgroup_size(256)
fn div_check(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let a = div_a[i];
    let b = div_b[i];
    let q = a / b;
    let moved = bitcast<f32>(u32(i32(bitcast<u32>(q)) + div_nudge[i]));
    div_q[i] = div_rn_from(a, b, moved);
}

// ---------------------------------------------------------------------------------------------
// Weight quantizer, per tensor: t = tanh(W), m = max |t|, u = (t/2)/m + 0.5, levels as above.
// One launch of each pass covers every member of a group (a network's quantized weights: 3
// launches forward and 3 backward whatever the depth). Each member is reduced exactly as it
// would be alone (the same CHUNK blocks, the same trees), so grouping does not change a bit.

// A member: a weight tensor, where its values lie in the bound buffers, and its grid ranges.
struct Member {
    n: u32,          // elements
    w_off: u32,      // offset of W and dL/dW
    t_off: u32,      // offset of t, W_hat and G = dL/dW_hat
    part_off: u32,   // its partial results (one per block forward, two backward)
    block0: u32,     // its first workgroup in a reduction grid (CHUNK elements each)
    tile0: u32,      // its first workgroup in an elementwise grid (WG elements each)
    stat_off: u32,   // its [m, S, c, 0]
    levels: u32,     // n_q of its bits
    levels_f: f32,
    inv_levels: f32,
    _pad0: u32,
    _pad1: u32,
}

// The member whose range of `field` (0: block0, 1: tile0) holds workgroup `w`. Workgroups past
// the last range (a 2-D grid's overshoot) get the last member, and find no element to touch.
fn member_at(w: u32, field: u32) -> u32 {
    var j = 0u;
    for (var i = 1u; i < p.members; i++) {
        let first = select(members[i].block0, members[i].tile0, field == 1u);
        if (first <= w) {
            j = i;
        }
    }
    return j;
}

fn blocks_of(mb: Member) -> u32 {
    return max(1u, (mb.n + CHUNK - 1u) / CHUNK);
}

// tanh to within about 1 ulp (3 where exp is as loose as Vulkan allows), the same on every driver:
// built-in tanh may be hundreds of ulp off near 0 (Mesa's is), which would move levels. Below
// |x| = 0.625 an odd polynomial (0.77 ulp in f32, coefficients fitted for relative error), above
// it 1 - 2/(e^2|x| + 1), exactly +-1 from |x| = 10 on. NaN is kept.
fn tanh_safe(x: f32) -> f32 {
    if (is_nan(x)) {
        return x;
    }
    let a = abs(x);
    var y: f32;
    if (a < 0.625) {
        let s = a * a;
        let poly = (((-0.0057049864 * s + 0.020639086) * s - 0.053739715) * s + 0.13331442) * s
            - 0.33333281;
        y = a + (a * s) * poly;
    } else {
        y = 1.0 - div_rn(2.0, exp(2.0 * min(a, 10.0)) + 1.0);
    }
    return select(y, -y, x < 0.0);
}

// The code k in 0..=n of t. With m = 0 (an all-zero tensor) DoReFa divides 0 by 0; wgqat defines
// u = 0.5 there, the level a zero weight gets in any other tensor (+1/n).
fn weight_code(t: f32, m: f32, levels_f: f32) -> f32 {
    var u = 0.5;
    if (m > 0.0) {
        u = div_rn(t * 0.5, m) + 0.5;
    }
    return floor(u * levels_f + 0.5);
}

fn weight_value_of_code(k: f32, inv_levels: f32) -> f32 {
    return 2.0 * (k * inv_levels) - 1.0;
}

// Pass 1: t = tanh(W), and the max |t| of each CHUNK-element block.
@compute @workgroup_size(256)
fn wq_absmax_partial(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let w = wid.x + wid.y * nwg.x;
    let mb = members[member_at(w, 0u)];
    let block = w - mb.block0;
    let start = block * CHUNK;
    var best = 0.0;
    for (var j = lid; j < CHUNK; j += WG) {
        let i = start + j;
        if (i < mb.n) {
            let t = tanh_safe(wq_w[mb.w_off + i]);
            wq_t[mb.t_off + i] = t;
            best = max(best, abs(t));
        }
    }
    red_a[lid] = best;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_a[lid] = max(red_a[lid], red_a[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u && block < blocks_of(mb)) {
        wq_partials[mb.part_off + block] = red_a[0];
    }
}

// Pass 2 (a workgroup per member): m = max of the partial maxima -> stats[0].
@compute @workgroup_size(256)
fn wq_absmax_final(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let mb = members[wid.x];
    var best = 0.0;
    for (var j = lid; j < blocks_of(mb); j += WG) {
        best = max(best, wq_partials_in[mb.part_off + j]);
    }
    red_a[lid] = best;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_a[lid] = max(red_a[lid], red_a[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        wq_stats[mb.stat_off] = red_a[0];
    }
}

// Pass 3: W_hat from t and m.
@compute @workgroup_size(256)
fn wq_forward(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let w = wid.x + wid.y * nwg.x;
    let mb = members[member_at(w, 1u)];
    let i = (w - mb.tile0) * WG + lid;
    if (i >= mb.n) {
        return;
    }
    let t = wq_t_in[mb.t_off + i];
    let k = weight_code(t, wq_stats_in[mb.stat_off], mb.levels_f);
    wq_w_hat[mb.t_off + i] = select(weight_value_of_code(k, mb.inv_levels), t, is_nan(t));
}

// Backward, following autograd's chain (spec §2.3):
//   du_i = ((2 G_i) * s) * n          (W_hat = 2q - 1, then Round's straight-through)
//   S    = sum_j du_j * (t_j / 2)      c = #{ j : |t_j| = m }
//   dt_i = (du_i / m) / 2 - sign(t_i) * 1[|t_i| = m] * (S / (m*m)) / c
//   dW_i = dt_i * (1 - t_i^2)
fn weight_du(g: f32, mb: Member) -> f32 {
    return ((2.0 * g) * mb.inv_levels) * mb.levels_f;
}

// Pass 1: per-block partial sums of du * t/2 and of the tie count.
@compute @workgroup_size(256)
fn wq_backward_partial(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let w = wid.x + wid.y * nwg.x;
    let mb = members[member_at(w, 0u)];
    let block = w - mb.block0;
    let start = block * CHUNK;
    let m = wq_stats_in[mb.stat_off];
    var s = 0.0;
    var ties = 0.0;
    for (var j = lid; j < CHUNK; j += WG) {
        let i = start + j;
        if (i < mb.n) {
            let t = wq_t_in[mb.t_off + i];
            s += weight_du(wq_g[mb.t_off + i], mb) * (t * 0.5);
            ties += select(0.0, 1.0, abs(t) == m);
        }
    }
    red_a[lid] = s;
    red_b[lid] = ties;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        if (lid < st) {
            red_a[lid] += red_a[lid + st];
            red_b[lid] += red_b[lid + st];
        }
        workgroupBarrier();
    }
    if (lid == 0u && block < blocks_of(mb)) {
        wq_partials[mb.part_off + 2u * block] = red_a[0];
        wq_partials[mb.part_off + 2u * block + 1u] = red_b[0];
    }
}

// Pass 2 (a workgroup per member): stats[1] = S, stats[2] = c; stats[0] (m) is kept.
@compute @workgroup_size(256)
fn wq_backward_final(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let mb = members[wid.x];
    var s = 0.0;
    var ties = 0.0;
    for (var j = lid; j < blocks_of(mb); j += WG) {
        s += wq_partials_in[mb.part_off + 2u * j];
        ties += wq_partials_in[mb.part_off + 2u * j + 1u];
    }
    red_a[lid] = s;
    red_b[lid] = ties;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        if (lid < st) {
            red_a[lid] += red_a[lid + st];
            red_b[lid] += red_b[lid + st];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        wq_stats[mb.stat_off + 1u] = red_a[0];
        wq_stats[mb.stat_off + 2u] = red_b[0];
    }
}

// Pass 3: dW. With m = 0 there is no finite gradient; wgqat defines it as 0.
@compute @workgroup_size(256)
fn wq_backward(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let w = wid.x + wid.y * nwg.x;
    let mb = members[member_at(w, 1u)];
    let i = (w - mb.tile0) * WG + lid;
    if (i >= mb.n) {
        return;
    }
    let g = wq_g[mb.t_off + i];
    let m = wq_stats_in[mb.stat_off];
    if (!(m > 0.0)) {
        wq_dw[mb.w_off + i] = select(0.0, m, is_nan(m));
        return;
    }
    let t = wq_t_in[mb.t_off + i];
    var dt = (weight_du(g, mb) / m) / 2.0;
    if (abs(t) == m) {
        let dm = -wq_stats_in[mb.stat_off + 1u] / (m * m);
        dt += sign(t) * (dm / wq_stats_in[mb.stat_off + 2u]);
    }
    wq_dw[mb.w_off + i] = dt * (1.0 - t * t);
}

// ---------------------------------------------------------------------------------------------
// Real quantization to integer codes, and back. dequantize(quantize(x)) is bit for bit the
// fake-quantized value: both use the same code and the same k * fl32(1/n).

// Codes of elements [4w, 4w + 4) packed into word w (PACKED), or of element w.
fn pack_word(word: u32, codes: vec4<f32>) {
    if (PACKED) {
        codes_out[word] = pack4xU8(vec4<u32>(codes));
    } else {
        codes_out[word] = u32(codes.x);
    }
}

fn elements_per_word() -> u32 {
    return select(1u, 4u, PACKED);
}

fn code_at(i: u32) -> f32 {
    if (PACKED) {
        return f32(unpack4xU8(codes_in[i / 4u])[i % 4u]);
    }
    return f32(codes_in[i]);
}

// Activation codes k in 0..=n (one thread per output word).
@compute @workgroup_size(256)
fn act_codes(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let word = flat_index(wid, nwg, lid);
    let first = word * elements_per_word();
    if (first >= p.n) {
        return;
    }
    var k = vec4<f32>(0.0);
    for (var j = 0u; j < elements_per_word(); j++) {
        if (first + j < p.n) {
            k[j] = act_code(act_x[first + j]);
        }
    }
    pack_word(word, k);
}

// Weight codes k in 0..=n (level 2k - n), from t and stats of the absmax passes.
@compute @workgroup_size(256)
fn weight_codes(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let word = flat_index(wid, nwg, lid);
    let first = word * elements_per_word();
    if (first >= p.n) {
        return;
    }
    let m = wq_stats_in[0];
    var k = vec4<f32>(0.0);
    for (var j = 0u; j < elements_per_word(); j++) {
        if (first + j < p.n) {
            k[j] = weight_code(wq_t_in[first + j], m, p.levels_f);
        }
    }
    pack_word(word, k);
}

@compute @workgroup_size(256)
fn act_dequant(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    act_y[i] = code_at(i) * p.inv_levels;
}

@compute @workgroup_size(256)
fn weight_dequant(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    wq_w_hat[i] = weight_value_of_code(code_at(i), p.inv_levels);
}
