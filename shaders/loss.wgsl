// Losses, their gradients, and GPU-side metrics. Each step writes its batch's mean loss and its
// number of correct predictions into metrics[2 * slot .. 2 * slot + 2], slot taken from the
// per-step buffer, so the trainer reads many steps back at once instead of once per step.
//   cross-entropy: mean over the batch of -log softmax(z)[label] (nn.CrossEntropyLoss);
//                  correct = argmax (first maximum) == label.
//   mse:           mean over all elements of (y - target)^2 (nn.MSELoss); correct is unused.

struct Params {
    rows: u32,      // batch
    cols: u32,      // classes (cross-entropy) or elements per sample (mse)
    _pad0: u32,
    _pad1: u32,
}

// Written before every submit: [slot, step t, lr bits, ...]; loss kernels read the slot.
struct Step {
    slot: u32,
    t: u32,
    lr: f32,
    adam_step: f32,
    bias2_sqrt: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(4) var<storage, read_write> per_row: array<f32>;   // [loss_i, correct_i] per row
@group(0) @binding(5) var<storage, read> per_row_in: array<f32>;
@group(0) @binding(6) var<storage, read_write> metrics: array<f32>;
@group(0) @binding(7) var<storage, read> step: Step;
@group(0) @binding(8) var<storage, read> mse_target: array<f32>;

const WG: u32 = 256u;
var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

// One thread per row: loss, gradient (softmax - onehot) / rows, correctness.
@compute @workgroup_size(256)
fn cross_entropy(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let r = (wid.x + wid.y * nwg.x) * WG + lid;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    var zmax = logits[base];
    var arg = 0u;
    for (var j = 1u; j < p.cols; j++) {
        let z = logits[base + j];
        if (z > zmax) {
            zmax = z;
            arg = j;
        }
    }
    var sum = 0.0;
    for (var j = 0u; j < p.cols; j++) {
        sum += exp(logits[base + j] - zmax);
    }
    let label = labels[r];
    let lse = zmax + log(sum);
    let scale = 1.0 / f32(p.rows);
    for (var j = 0u; j < p.cols; j++) {
        let prob = exp(logits[base + j] - zmax) / sum;
        dlogits[base + j] = (prob - select(0.0, 1.0, j == label)) * scale;
    }
    per_row[2u * r] = lse - logits[base + label];
    per_row[2u * r + 1u] = select(0.0, 1.0, arg == label);
}

// One thread per row: sum of squared errors of the row; gradient 2 (y - t) / numel.
@compute @workgroup_size(256)
fn mse(@builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let r = (wid.x + wid.y * nwg.x) * WG + lid;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    let scale = 2.0 / f32(p.rows * p.cols);
    var acc = 0.0;
    for (var j = 0u; j < p.cols; j++) {
        let d = logits[base + j] - mse_target[base + j];
        acc += d * d;
        dlogits[base + j] = scale * d;
    }
    per_row[2u * r] = acc / f32(p.cols);
    per_row[2u * r + 1u] = 0.0;
}

// One workgroup: metrics[slot] = (mean of per-row losses, sum of correct flags).
@compute @workgroup_size(256)
fn batch_metrics(@builtin(local_invocation_index) lid: u32) {
    var l = 0.0;
    var c = 0.0;
    for (var r = lid; r < p.rows; r += WG) {
        l += per_row_in[2u * r];
        c += per_row_in[2u * r + 1u];
    }
    red_a[lid] = l;
    red_b[lid] = c;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        if (lid < st) {
            red_a[lid] += red_a[lid + st];
            red_b[lid] += red_b[lid + st];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        metrics[2u * step.slot] = red_a[0] / f32(p.rows);
        metrics[2u * step.slot + 1u] = red_b[0];
    }
}
