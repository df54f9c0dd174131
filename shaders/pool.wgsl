// Average pooling (PyTorch semantics, floor mode, count_include_pad: the divisor is always
// kh * kw) and channel shuffle, over NCHW planes. The backward is a gather over the windows that
// contain each input pixel: no atomics, deterministic. Max-pool is maxpool.wgsl.

struct Params {
    planes: u32,   // N * C
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    c: u32,        // channels (shuffle)
    groups: u32,   // shuffle groups
    inverse: u32,  // shuffle: 1 applies the inverse permutation (backward)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;

const WG: u32 = 256u;

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(256)
fn avgpool_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let ohw = p.oh * p.ow;
    if (i >= p.planes * ohw) {
        return;
    }
    let plane = i / ohw;
    let r = i - plane * ohw;
    let oy = r / p.ow;
    let ox = r - oy * p.ow;
    let base = plane * p.h * p.w;
    var acc = 0.0;
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = i32(oy * p.sh + ky) - i32(p.ph);
        if (iy < 0 || u32(iy) >= p.h) {
            continue;
        }
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = i32(ox * p.sw + kx) - i32(p.pw);
            if (ix >= 0 && u32(ix) < p.w) {
                acc += x[base + u32(iy) * p.w + u32(ix)];
            }
        }
    }
    y[i] = acc / f32(p.kh * p.kw);
}

@compute @workgroup_size(256)
fn avgpool_backward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let hw = p.h * p.w;
    if (i >= p.planes * hw) {
        return;
    }
    let plane = i / hw;
    let at = i - plane * hw;
    let iy = at / p.w;
    let ix = at - iy * p.w;
    let ry = window_range(iy, p.kh, p.sh, p.ph, p.oh);
    let rx = window_range(ix, p.kw, p.sw, p.pw, p.ow);
    var acc = 0.0;
    for (var oy = ry.x; oy < ry.y; oy++) {
        for (var ox = rx.x; ox < rx.y; ox++) {
            acc += dy[(plane * p.oh + oy) * p.ow + ox];
        }
    }
    dx[i] = acc / f32(p.kh * p.kw);
}

// Channel shuffle (micronet): out[:, b*g + a] = in[:, a*(C/g) + b]. With `inverse`, the
// transposed permutation (the backward). Reads x (binding 1), writes y (binding 2).
@compute @workgroup_size(256)
fn channel_shuffle(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    let hw = p.h * p.w;
    if (i >= p.planes * hw) {
        return;
    }
    let plane = i / hw;
    let n = plane / p.c;
    let co = plane - n * p.c;
    let per = p.c / p.groups;
    var ci: u32;
    if (p.inverse == 0u) {
        ci = (co % p.groups) * per + co / p.groups;
    } else {
        ci = (co % per) * p.groups + co / per;
    }
    y[i] = x[(n * p.c + ci) * hw + (i - plane * hw)];
}
