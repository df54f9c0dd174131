// Elementwise kernels over flat f32 arrays. Grids may be 2-D (more than 65535 workgroups):
// the linear index is (wid.x + wid.y * nwg.x) * 256 + lid.

struct Params {
    n: u32,
    // fill_uniform only: the seed and the range [lo, hi).
    seed: u32,
    lo: f32,
    hi: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

// add_forward: the ReLU after the sum in the same pass (a residual block's output).
override ADD_RELU: bool = false;
// add_forward: a summand that is a BatchNorm's output never stored (A_BN, B_BN; a residual
// block's last BatchNorm, its shortcut's): its tensor holds the BatchNorm's input, and each
// element is formed as norm.wgsl's bn_apply writes it (lib/bn.wgsl's affine map with the
// channel's table entries, then its fused activation A_ACT / B_ACT, lib/bn.wgsl's ACT_*), so the
// same bits.
// Element i is in channel (i / ADD_HW) % ADD_C.
override A_BN: bool = false;
override A_ACT: u32 = 0u;
override B_BN: bool = false;
override B_ACT: u32 = 0u;
override ADD_C: u32 = 1u;
override ADD_HW: u32 = 1u;
// relu_forward
@group(0) @binding(1) var<storage, read> fwd_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> fwd_y: array<f32>;
// relu_backward (relu_backward_pair: also bwd_dx2)
@group(0) @binding(3) var<storage, read> bwd_y: array<f32>;
@group(0) @binding(4) var<storage, read> bwd_dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> bwd_dx: array<f32>;
@group(0) @binding(14) var<storage, read_write> bwd_dx2: array<f32>;
// add_forward
@group(0) @binding(6) var<storage, read> add_a: array<f32>;
@group(0) @binding(7) var<storage, read> add_b: array<f32>;
@group(0) @binding(8) var<storage, read_write> add_y: array<f32>;
// add_forward with A_BN, B_BN: the BatchNorms' tables (lib/bn.wgsl's BN_TABLE floats per channel).
@group(0) @binding(12) var<storage, read> add_a_bn: array<f32>;
@group(0) @binding(13) var<storage, read> add_b_bn: array<f32>;
// accumulate
@group(0) @binding(9) var<storage, read> acc_x: array<f32>;
@group(0) @binding(10) var<storage, read_write> acc_sum: array<f32>;
// fill_uniform
@group(0) @binding(11) var<storage, read_write> fill_y: array<f32>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// y = max(x, 0). NaN stays NaN so that numerical faults are not hidden.
@compute @workgroup_size(256)
fn relu_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    // (lib/bn.wgsl: by sign and magnitude bits, NaN kept.)
    fwd_y[i] = relu_bits(fwd_x[i]);
}

// dx = dy where the forward output y > 0, else 0 (PyTorch's rule for ReLU).
@compute @workgroup_size(256)
fn relu_backward(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    bwd_dx[i] = select(0.0, bwd_dy[i], bwd_y[i] > 0.0);
}

// relu_backward's dx written to two gradients at once (the two summands of a residual block's
// add share it), instead of a copy of the first afterwards.
@compute @workgroup_size(256)
fn relu_backward_pair(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let d = select(0.0, bwd_dy[i], bwd_y[i] > 0.0);
    bwd_dx[i] = d;
    bwd_dx2[i] = d;
}

// A BatchNorm's output formed from its input v with its channel's [mean, invstd, gamma, beta].
fn bn_formed(v: f32, bn: vec4<f32>, act: u32) -> f32 {
    return bn_act(bn_affine(v, bn.x, bn.y, bn.z, bn.w), act);
}

// Table entry t's [mean, invstd, gamma, beta] (two functions: a pointer to a storage array is
// not a function parameter in WGSL).
fn add_a_entry(t: u32) -> vec4<f32> {
    return vec4(add_a_bn[t + BN_MEAN], add_a_bn[t + BN_INVSTD], add_a_bn[t + BN_GAMMA],
                add_a_bn[t + BN_BETA]);
}

fn add_b_entry(t: u32) -> vec4<f32> {
    return vec4(add_b_bn[t + BN_MEAN], add_b_bn[t + BN_INVSTD], add_b_bn[t + BN_GAMMA],
                add_b_bn[t + BN_BETA]);
}

// y = a + b: a residual sum (one f32 add, so exactly PyTorch's); with ADD_RELU, relu(a + b).
@compute @workgroup_size(256)
fn add_forward(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    add_write(i, add_a[i], add_b[i]);
}

// add_forward with either summand formed from a BatchNorm's input (A_BN / B_BN; both tables
// are bound, the unused one to any table).
@compute @workgroup_size(256)
fn add_forward_bn(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let t = ((i / ADD_HW) % ADD_C) * BN_TABLE;
    var a = add_a[i];
    if (A_BN) {
        a = bn_formed(a, add_a_entry(t), A_ACT);
    }
    var b = add_b[i];
    if (B_BN) {
        b = bn_formed(b, add_b_entry(t), B_ACT);
    }
    add_write(i, a, b);
}

fn add_write(i: u32, a: f32, b: f32) {
    let s = a + b;
    add_y[i] = select(s, relu_bits(s), ADD_RELU);
}

// sum += x: gradients of a tensor read by several layers, summed one consumer at a time in a
// fixed order (deterministic, no atomics).
@compute @workgroup_size(256)
fn accumulate(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    acc_sum[i] = acc_sum[i] + acc_x[i];
}

// A 32-bit integer hash with good avalanche (xor-shift and odd-multiply rounds); src/kernels/
// elementwise.rs computes the same on the CPU.
fn hash32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x21f0aaadu;
    x ^= x >> 15u;
    x *= 0x735a2d97u;
    x ^= x >> 15u;
    return x;
}

// y[i] = lo + (hi - lo) * u_i, u_i in [0, 1) from 24 bits of a hash of the seed and i: inputs made
// on the device that uses them (benchmarks), with no host-side generation or upload.
@compute @workgroup_size(256)
fn fill_uniform(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let u = f32(hash32(i ^ hash32(p.seed)) >> 8u) * (1.0 / 16777216.0);
    fill_y[i] = p.lo + (p.hi - p.lo) * u;
}
