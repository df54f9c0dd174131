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

// The split-K sums (slice_sum, slice_sum_pair) take SLICE_RUNS = 4 invocations per element:
// run r adds slices r * per .. (r + 1) * per in order (per = ceil(p.c / 4)), then the runs are
// added as (r0 + r1) + (r2 + r3), the same every run. (One invocation per element left a
// grad-weight's few thousand elements, each over up to 218 slices, on a few dozen workgroups.)
const SLICE_RUNS: u32 = 4u;
const SLICE_COLS: u32 = 256u / SLICE_RUNS;

struct SliceLane {
    i: u32,       // the element (of both sets, in slice_sum_pair)
    first: u32,   // its run's slices: first .. end
    end: u32,
}

fn slice_lane(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> SliceLane {
    let per = (p.c + SLICE_RUNS - 1u) / SLICE_RUNS;
    let first = min(p.c, (lid / SLICE_COLS) * per);
    return SliceLane((wid.x + wid.y * nwg.x) * SLICE_COLS + lid % SLICE_COLS, first,
                     min(p.c, first + per));
}

// The four runs' sums of this invocation's element, once every invocation stored its own in
// partial[lid] (called by every invocation: it holds a barrier).
fn add_runs(lid: u32) -> f32 {
    workgroupBarrier();
    let col = lid % SLICE_COLS;
    return (partial[col] + partial[SLICE_COLS + col])
        + (partial[2u * SLICE_COLS + col] + partial[3u * SLICE_COLS + col]);
}

// slice_out[i] = sum over j < c of slices[j * n + i] (split-K partial results).
@compute @workgroup_size(256)
fn slice_sum(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let l = slice_lane(wid, nwg, lid);
    var acc = 0.0;
    if (l.i < p.n) {
        for (var j = l.first; j < l.end; j++) {
            acc += slices[j * p.n + l.i];
        }
    }
    partial[lid] = acc;
    let total = add_runs(lid);
    if (lid < SLICE_COLS && l.i < p.n) {
        slice_out[l.i] = total;
    }
}

// slice_sum over two sets at once (a weight's and its bias's split-K partial sums): elements
// i < n of the first (n = p.n), then p.s of the second.
@compute @workgroup_size(256)
fn slice_sum_pair(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let l = slice_lane(wid, nwg, lid);
    let k = l.i - p.n;
    var acc = 0.0;
    if (l.i < p.n) {
        for (var j = l.first; j < l.end; j++) {
            acc += slices[j * p.n + l.i];
        }
    } else if (l.i < p.n + p.s) {
        for (var j = l.first; j < l.end; j++) {
            acc += slices2[j * p.s + k];
        }
    }
    partial[lid] = acc;
    let total = add_runs(lid);
    if (lid < SLICE_COLS) {
        if (l.i < p.n) {
            slice_out[l.i] = total;
        } else if (l.i < p.n + p.s) {
            slice_out2[k] = total;
        }
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
