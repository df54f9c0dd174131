// Deterministic sums: the order of additions depends only on the shape, so the same inputs give
// the same bits run to run (no atomics).

struct Params {
    n: u32,        // channel_sum: N; slice_sum: slice length
    c: u32,        // channel_sum: C; slice_sum: number of slices
    s: u32,        // channel_sum: S (spatial size)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// channel_sum
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
// slice_sum
@group(0) @binding(3) var<storage, read> slices: array<f32>;
@group(0) @binding(4) var<storage, read_write> slice_out: array<f32>;
// slice_sum_pair: a second set of slices and its sums
@group(0) @binding(7) var<storage, read> slices2: array<f32>;
@group(0) @binding(8) var<storage, read_write> slice_out2: array<f32>;
// nonfinite_check
@group(0) @binding(5) var<storage, read> checked: array<f32>;
@group(0) @binding(6) var<storage, read_write> flags: array<atomic<u32>>;

var<workgroup> partial: array<f32, 256>;

// out[c] = sum over n, s of x[n, c, s] for x of shape (N, C, S). One workgroup per channel; each
// thread sums a fixed strided subset, then a tree in workgroup memory.
@compute @workgroup_size(256)
fn channel_sum(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let c = wid.x + wid.y * nwg.x;
    // Uniform per workgroup: every thread of a workgroup returns or none does.
    if (c >= p.c) {
        return;
    }
    let total = p.n * p.s;
    var acc = 0.0;
    for (var j = lid; j < total; j += 256u) {
        let n = j / p.s;
        let s = j - n * p.s;
        acc += x[(n * p.c + c) * p.s + s];
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            partial[lid] += partial[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[c] = partial[0];
    }
}

// slice_out[i] = sum over j < c of slices[j * n + i], in order of j (split-K partial results).
@compute @workgroup_size(256)
fn slice_sum(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    var acc = 0.0;
    for (var j = 0u; j < p.c; j++) {
        acc += slices[j * p.n + i];
    }
    slice_out[i] = acc;
}

// slice_sum over two sets at once (a weight's and its bias's split-K partial sums): elements
// i < n of the first (n = p.n), then p.s of the second, each summed in order of j.
@compute @workgroup_size(256)
fn slice_sum_pair(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i < p.n) {
        var acc = 0.0;
        for (var j = 0u; j < p.c; j++) {
            acc += slices[j * p.n + i];
        }
        slice_out[i] = acc;
    } else if (i < p.n + p.s) {
        let k = i - p.n;
        var acc = 0.0;
        for (var j = 0u; j < p.c; j++) {
            acc += slices2[j * p.s + k];
        }
        slice_out2[k] = acc;
    }
}

// flags[s] |= 1 when any of the n = p.n elements of `checked` is NaN or infinite (s = p.c). An
// integer OR: the result does not depend on the order threads arrive in.
@compute @workgroup_size(256)
fn nonfinite_check(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let start = ((wid.x + wid.y * nwg.x) * 256u + lid) * 16u;
    var bad = false;
    for (var j = 0u; j < 16u; j++) {
        let i = start + j;
        if (i < p.n) {
            // By bit pattern: all exponent bits set is NaN or infinity. (Float tests such as
            // `v != v` may be folded away: Vulkan lets compilers assume no NaN.)
            bad = bad || (bitcast<u32>(checked[i]) & 0x7f800000u) == 0x7f800000u;
        }
    }
    if (bad) {
        atomicOr(&flags[p.c], 1u);
    }
}
