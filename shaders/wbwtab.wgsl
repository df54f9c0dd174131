// micronet's binary and ternary quantizers (wbwtab, spec iao-wbwtab §6), forward and backward.
// Weights are per output channel o of n = (Cin/g)·kh·kw elements; `wstats` holds per channel
// [alpha, delta, count, S]:
//   binary   (on the latent weights, in place, every forward) w <- clamp(w - mean_c w, -1, 1),
//            mean over input channels at each kernel position; alpha = mean |w|; w_hat = B(w) alpha
//            dw_j = alpha G_j + sgn(w_j) / n * S,  S = sum_k G_k B(w_k)
//   ternary  delta = 0.7 mean |w|; alpha = mean of |w| over |w| > delta; t = sign(sign(w + delta)
//            + sign(w - delta)); w_hat = t alpha
//            dw_j = alpha G_j + sgn(w_j) [|w_j| > delta] / count * S,  S = sum_k G_k t_k
// B is sign with 0 -> +1, sgn(0) = 0. An all-zero channel has alpha 0 (micronet: 0 binary, NaN
// ternary); loading such weights is refused. Activations: y = B(x), dx = dy where -1 < x < 1.

struct Params {
    n: u32,          // elements of the tensor
    per_channel: u32, // weights: elements per output channel
    cin: u32,        // weights: input channels per group (the centring's reduction)
    spatial: u32,    // weights: kh * kw
    ternary: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> wstats: array<f32>;
@group(0) @binding(3) var<storage, read> w_in: array<f32>;
@group(0) @binding(4) var<storage, read> wstats_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> w_hat: array<f32>;
@group(0) @binding(6) var<storage, read> g: array<f32>;
@group(0) @binding(7) var<storage, read_write> dw: array<f32>;
@group(0) @binding(8) var<storage, read> x: array<f32>;
@group(0) @binding(9) var<storage, read_write> y: array<f32>;
@group(0) @binding(10) var<storage, read> dy: array<f32>;

const WG: u32 = 256u;

var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

fn sign_pos(v: f32) -> f32 {
    return select(1.0, -1.0, v < 0.0);
}

fn sgn(v: f32) -> f32 {
    return select(select(0.0, -1.0, v < 0.0), 1.0, v > 0.0);
}

fn ternary_code(v: f32, delta: f32) -> f32 {
    return sgn(sgn(v + delta) + sgn(v - delta));
}

fn reduce2(lid: u32) -> vec2<f32> {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            red_a[lid] = red_a[lid] + red_a[lid + stride];
            red_b[lid] = red_b[lid] + red_b[lid + stride];
        }
    }
    workgroupBarrier();
    let r = vec2<f32>(red_a[0], red_b[0]);
    workgroupBarrier();
    return r;
}

// Binary weights' centring, in place: one thread per (output channel, kernel position), the
// input channels summed in order.
@compute @workgroup_size(256)
fn bin_centre(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let t = flat_index(wid, nwg, lid);
    let positions = p.n / p.cin;
    if (t >= positions) {
        return;
    }
    let o = t / p.spatial;
    let s = t % p.spatial;
    let base = o * p.per_channel + s;
    var sum = 0.0;
    for (var c = 0u; c < p.cin; c++) {
        sum += w[base + c * p.spatial];
    }
    let mean = sum / f32(p.cin);
    for (var c = 0u; c < p.cin; c++) {
        let i = base + c * p.spatial;
        w[i] = clamp(w[i] - mean, -1.0, 1.0);
    }
}

// alpha (and delta, count) of each output channel: one workgroup per channel.
@compute @workgroup_size(256)
fn wq_alpha(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let o = wid.x;
    let base = o * p.per_channel;
    var s = 0.0;
    for (var j = lid; j < p.per_channel; j += WG) {
        s += abs(w_in[base + j]);
    }
    red_a[lid] = s;
    red_b[lid] = 0.0;
    let mean = reduce2(lid).x / f32(p.per_channel);
    var alpha = mean;
    var delta = 0.0;
    var count = f32(p.per_channel);
    if (p.ternary == 1u) {
        delta = 0.7 * mean;
        var sa = 0.0;
        var sc = 0.0;
        for (var j = lid; j < p.per_channel; j += WG) {
            let a = abs(w_in[base + j]);
            if (a > delta) {
                sa += a;
                sc += 1.0;
            }
        }
        red_a[lid] = sa;
        red_b[lid] = sc;
        let r = reduce2(lid);
        count = r.y;
        alpha = select(0.0, r.x / r.y, r.y > 0.0);
    }
    if (lid == 0u) {
        wstats[o * 4u] = alpha;
        wstats[o * 4u + 1u] = delta;
        wstats[o * 4u + 2u] = count;
    }
}

fn code(v: f32, o: u32) -> f32 {
    if (p.ternary == 1u) {
        return ternary_code(v, wstats_in[o * 4u + 1u]);
    }
    return sign_pos(v);
}

@compute @workgroup_size(256)
fn wq_forward(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let o = i / p.per_channel;
    w_hat[i] = code(w_in[i], o) * wstats_in[o * 4u];
}

// S of each output channel: one workgroup per channel.
@compute @workgroup_size(256)
fn wq_backward_sum(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let o = wid.x;
    let base = o * p.per_channel;
    var s = 0.0;
    for (var j = lid; j < p.per_channel; j += WG) {
        let v = w_in[base + j];
        var c = sign_pos(v);
        if (p.ternary == 1u) {
            c = ternary_code(v, wstats[o * 4u + 1u]);
        }
        s += g[base + j] * c;
    }
    red_a[lid] = s;
    red_b[lid] = 0.0;
    let r = reduce2(lid);
    if (lid == 0u) {
        wstats[o * 4u + 3u] = r.x;
    }
}

@compute @workgroup_size(256)
fn wq_backward(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let o = i / p.per_channel;
    let v = w_in[i];
    let alpha = wstats_in[o * 4u];
    let s = wstats_in[o * 4u + 3u];
    var term = sgn(v) / f32(p.per_channel) * s;
    if (p.ternary == 1u) {
        let count = wstats_in[o * 4u + 2u];
        let inside = select(0.0, 1.0, abs(v) > wstats_in[o * 4u + 1u]);
        term = select(0.0, sgn(v) * inside / count * s, count > 0.0);
    }
    dw[i] = alpha * g[i] + term;
}

@compute @workgroup_size(256)
fn sign_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    y[i] = sign_bits(x[i]);
}

@compute @workgroup_size(256)
fn sign_backward(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    dw[i] = select(0.0, dy[i], act_passes(x[i], ACT_SIGN));
}
