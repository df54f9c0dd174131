// IAO's BatchNorm folded into the conv during QAT (micronet's QuantBNFuseConv2d, spec iao §3).
// Per output channel c, with y0 = conv(x, W, b) the float conv of the float input:
//   training:  mu = mean(y0), var = sum((y0 - mu)^2) / (m - 1)  (unbiased, also to normalise)
//              running: the first call copies (unless pretrained), later (1 - mom) r + mom v
//              k = gamma / sqrt(var + eps), b_f = beta + (b - mu) k
//   evaluation or QAFT: the same from the running statistics
//   W_f = W k (per output channel), then the IAO quantizers and conv(Q(x), Q(W_f)) + b_f.
// Backward (training; gradients reach W, b, gamma, beta and x through both convs):
//   dk = sum_j dW_f[c,j] W[c,j] + db_f (b - mu),   dgamma = dk / sqrt(var + eps),  dbeta = db_f
//   dW += dW_f k,  db += db_f k,  dmu = -db_f k,  dvar = -dk k / (2 (var + eps))
//   dy0 = dmu / m + dvar 2 (y0 - mu) / (m - 1)   (QAFT: no dy0, statistics are constants)

struct Params {
    n: u32,           // elements of the tensor an elementwise pass covers
    channels: u32,
    hw: u32,          // y0's elements per channel and image
    per_channel: u32, // W's elements per output channel (1 for the bias pass)
    eps: f32,
    momentum: f32,
    pretrained: u32,  // the first call updates the running statistics instead of copying
    has_bias: u32,
    accumulate: u32,  // gradient passes: add to the target instead of setting it
    opaque_zero: u32, // 0, unknown to the compiler (keeps the running update's products apart)
    count: u32,       // m = batch * hw, the values of a channel's statistics
    calib: u32,       // micronet's bn_fuse_calib: W_f from the running variance, output rescaled
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> y0: array<f32>;
// per channel: [mu, var] of the batch
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_var: array<f32>;
// [0]: whether the running statistics were ever set since the layer was made or loaded
@group(0) @binding(5) var<storage, read_write> flag: array<f32>;
@group(0) @binding(6) var<storage, read> gamma: array<f32>;
@group(0) @binding(7) var<storage, read> beta: array<f32>;
@group(0) @binding(8) var<storage, read> bias: array<f32>;
// per channel k, and the folded bias b_f
@group(0) @binding(9) var<storage, read_write> k_out: array<f32>;
@group(0) @binding(10) var<storage, read_write> bias_f: array<f32>;
// W_f = W k
@group(0) @binding(11) var<storage, read> w: array<f32>;
@group(0) @binding(12) var<storage, read_write> w_f: array<f32>;
// backward
@group(0) @binding(13) var<storage, read> k_in: array<f32>;
@group(0) @binding(14) var<storage, read> dw_f: array<f32>;
@group(0) @binding(15) var<storage, read> db_f: array<f32>;
@group(0) @binding(16) var<storage, read> stats_in: array<f32>;
@group(0) @binding(17) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(18) var<storage, read_write> dbeta: array<f32>;
// per channel [a, b]: dy0 = a + b y0
@group(0) @binding(19) var<storage, read_write> dcoef: array<f32>;
@group(0) @binding(20) var<storage, read_write> dy0: array<f32>;
@group(0) @binding(21) var<storage, read> dcoef_in: array<f32>;
@group(0) @binding(22) var<storage, read_write> grad: array<f32>;
@group(0) @binding(23) var<storage, read> running_mean_in: array<f32>;
@group(0) @binding(24) var<storage, read> running_var_in: array<f32>;
// bn_fuse_calib: k_w = gamma / sqrt(running var + eps) for W_f, rho = sqrt(running var + eps) /
// sqrt(var + eps) rescaling the quantized conv, and d rho
@group(0) @binding(25) var<storage, read_write> k_w: array<f32>;
@group(0) @binding(26) var<storage, read_write> rho: array<f32>;
@group(0) @binding(27) var<storage, read> rho_in: array<f32>;
@group(0) @binding(28) var<storage, read> bias_in: array<f32>;
@group(0) @binding(29) var<storage, read_write> drho: array<f32>;
@group(0) @binding(30) var<storage, read> drho_in: array<f32>;
@group(0) @binding(31) var<storage, read> k_w_in: array<f32>;

const WG: u32 = 256u;

var<workgroup> red: array<f32, 256>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

fn opaque(f: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(f) ^ p.opaque_zero);
}

fn reduce_sum(lid: u32) -> f32 {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            red[lid] = red[lid] + red[lid + stride];
        }
    }
    workgroupBarrier();
    let s = red[0];
    workgroupBarrier();
    return s;
}

fn y0_index(c: u32, i: u32) -> u32 {
    return (i / p.hw) * p.channels * p.hw + c * p.hw + i % p.hw;
}

// Batch statistics of channel c (one workgroup per channel), the running update, k and b_f.
@compute @workgroup_size(256)
fn fold_stats(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let c = wid.x;
    let m = p.count;
    var s = 0.0;
    for (var i = lid; i < m; i += WG) {
        s += y0[y0_index(c, i)];
    }
    red[lid] = s;
    let mu = reduce_sum(lid) / f32(m);
    var q = 0.0;
    for (var i = lid; i < m; i += WG) {
        let d = y0[y0_index(c, i)] - mu;
        q += d * d;
    }
    red[lid] = q;
    let v = reduce_sum(lid) / f32(m - 1u);
    if (lid == 0u) {
        stats[c * 2u] = mu;
        stats[c * 2u + 1u] = v;
        if (flag[0] == 0.0 && p.pretrained == 0u) {
            running_mean[c] = mu;
            running_var[c] = v;
        } else {
            let keep = 1.0 - p.momentum;
            running_mean[c] = opaque(keep * running_mean[c]) + opaque(p.momentum * mu);
            running_var[c] = opaque(keep * running_var[c]) + opaque(p.momentum * v);
        }
        let k = gamma[c] / sqrt(v + p.eps);
        let b = select(0.0, bias[c], p.has_bias == 1u);
        k_out[c] = k;
        bias_f[c] = beta[c] + (b - mu) * k;
        if (p.calib == 1u) {
            let sr = sqrt(running_var[c] + p.eps);
            k_w[c] = gamma[c] / sr;
            rho[c] = sr / sqrt(v + p.eps);
        }
    }
}

// bn_fuse_calib's output: the quantized conv (no bias) rescaled to the batch statistics, plus
// the folded bias.
@compute @workgroup_size(256)
fn fold_calib_out(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let c = (i / p.hw) % p.channels;
    dy0[i] = dy0[i] * rho_in[c] + bias_in[c];
}

// bn_fuse_calib backward, per channel (one workgroup each): d rho = sum dy * c (c the quantized
// conv without bias, in `y0`), then dy scaled by rho in place for the quantized conv's backward.
@compute @workgroup_size(256)
fn fold_calib_grad(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let c = wid.x;
    let m = p.count;
    var s = 0.0;
    for (var i = lid; i < m; i += WG) {
        let j = y0_index(c, i);
        s += dy0[j] * y0[j];
    }
    red[lid] = s;
    let total = reduce_sum(lid);
    if (lid == 0u) {
        drho[c] = total;
    }
    for (var i = lid; i < m; i += WG) {
        let j = y0_index(c, i);
        dy0[j] = dy0[j] * rho_in[c];
    }
}

// After fold_stats: the running statistics have been set.
@compute @workgroup_size(1)
fn fold_mark() {
    flag[0] = 1.0;
}

// k and b_f from the running statistics (evaluation, QAFT), which the backward pass then takes
// as its statistics.
@compute @workgroup_size(256)
fn fold_running(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let c = flat_index(wid, nwg, lid);
    if (c >= p.channels) {
        return;
    }
    let k = gamma[c] / sqrt(running_var_in[c] + p.eps);
    let b = select(0.0, bias[c], p.has_bias == 1u);
    k_out[c] = k;
    bias_f[c] = beta[c] + (b - running_mean_in[c]) * k;
    // The statistics the backward pass takes as constants.
    stats[c * 2u] = running_mean_in[c];
    stats[c * 2u + 1u] = running_var_in[c];
}

// W_f = W k, per output channel.
@compute @workgroup_size(256)
fn fold_weight(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    w_f[i] = w[i] * k_in[i / p.per_channel];
}

// Per output channel (one workgroup each): dk, dgamma, dbeta and the coefficients of dy0 (with
// batch statistics; `stats_in` holds the running ones under QAFT, and dy0 is not used).
@compute @workgroup_size(256)
fn fold_backward_channel(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let c = wid.x;
    let kk = p.per_channel;
    var s = 0.0;
    for (var j = lid; j < kk; j += WG) {
        s += dw_f[c * kk + j] * w[c * kk + j];
    }
    red[lid] = s;
    let dk_w = reduce_sum(lid);
    if (lid == 0u) {
        let mu = stats_in[c * 2u];
        let v = stats_in[c * 2u + 1u] + p.eps;
        let k = k_in[c];
        let b = select(0.0, bias[c], p.has_bias == 1u);
        let dk = dk_w + db_f[c] * (b - mu);
        var dg = dk / sqrt(v);
        var dvar = -dk * k / (2.0 * v);
        if (p.calib == 1u) {
            // W_f = W k_w (running variance, a constant); b_f and rho carry the batch's.
            let dk_b = db_f[c] * (b - mu);
            dg = dk_w / sqrt(running_var_in[c] + p.eps) + dk_b / sqrt(v);
            dvar = -dk_b * k / (2.0 * v) - drho_in[c] * rho_in[c] / (2.0 * v);
        }
        dgamma[c] = dg;
        dbeta[c] = db_f[c];
        let dmu = -db_f[c] * k;
        let m = f32(p.count);
        let bc = 2.0 * dvar / (m - 1.0);
        dcoef[c * 2u] = dmu / m - bc * mu;
        dcoef[c * 2u + 1u] = bc;
    }
}

// dy0 = a + b y0, over y0's buffer.
@compute @workgroup_size(256)
fn fold_dy0(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let c = (i / p.hw) % p.channels;
    dy0[i] = dcoef_in[c * 2u] + dcoef_in[c * 2u + 1u] * dy0[i];
}

// grad (+)= dW_f k, per output channel (W's elements), or db (+)= db_f k (one per channel).
@compute @workgroup_size(256)
fn fold_grad(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let g = dw_f[i] * k_in[i / p.per_channel];
    grad[i] = select(g, grad[i] + g, p.accumulate == 1u);
}
