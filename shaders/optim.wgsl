// Optimizers over the whole parameter arena in one dispatch (every parameter shares lr and weight
// decay, as in micronet). Step-dependent scalars (t, lr, bias corrections) come from the per-step
// buffer written before each submit; the arena's alignment padding stays zero through updates.
//
// Adam with coupled L2 (torch.optim.Adam, weight_decay > 0, not AdamW), in PyTorch's order:
//   g = g + wd * p;  m = lerp(m, g, 1 - b1);  v = b2 * v + (1 - b2) * g * g
//   p = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// SGD (torch.optim.SGD): g = g + wd * p;  buf = g at t = 1, else momentum * buf + (1 - dampening) * g;
//   g = g + momentum * buf (Nesterov) or buf;  p = p - lr * g

struct Params {
    n: u32,
    nesterov: u32,
    _pad0: u32,
    _pad1: u32,
    beta1: f32,        // Adam; SGD: momentum
    beta2: f32,        // Adam; SGD: dampening
    eps: f32,
    weight_decay: f32,
}

struct Step {
    slot: u32,
    t: u32,
    lr: f32,
    adam_step: f32,    // lr / (1 - beta1^t), formed in f64 on the CPU as PyTorch does
    bias2_sqrt: f32,   // sqrt(1 - beta2^t), likewise
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: Step;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> m: array<f32>;
@group(0) @binding(5) var<storage, read_write> v: array<f32>;

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

@compute @workgroup_size(256)
fn adam(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let w = param[i];
    let g = grad[i] + p.weight_decay * w;
    let mi = m[i] + (1.0 - p.beta1) * (g - m[i]);
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let denom = sqrt(vi) / step.bias2_sqrt + p.eps;
    param[i] = w - step.adam_step * (mi / denom);
}

// m holds the momentum buffer; v is unused (bound for a uniform layout).
@compute @workgroup_size(256)
fn sgd(@builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let w = param[i];
    var g = grad[i] + p.weight_decay * w;
    let momentum = p.beta1;
    if (momentum != 0.0) {
        var buf = g;
        if (step.t > 1u) {
            buf = momentum * m[i] + (1.0 - p.beta2) * g;
        }
        m[i] = buf;
        g = select(buf, g + momentum * buf, p.nesterov == 1u);
    }
    param[i] = w - step.lr * g;
}
