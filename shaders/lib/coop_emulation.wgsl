// Plain-WGSL stand-ins for conv_coop.wgsl's cooperative-matrix operations, appended to the
// emulation that src/kernels/conv_coop.rs derives from that file (lavapipe has no cooperative
// matrices). A 16x16 A or B matrix stays where it lies in workgroup memory (which array, offset,
// row stride) and is read when multiplied, the data being still in place then; an accumulator
// is the 8 elements lane l of its subgroup owns (row-major elements 8l..8l+7 of the 16x16).
// Products of f16 codes and their sums are exact in f32 below 2^24, as in the hardware, so the
// order of the multiply-adds does not matter.

var<private> lane: u32;

fn emu_load_a_sh(off: u32, stride: u32) -> vec3<u32> {
    return vec3<u32>(0u, off, stride);
}

fn emu_load_b_sh(off: u32, stride: u32) -> vec3<u32> {
    return vec3<u32>(1u, off, stride);
}

fn emu_fetch(d: vec3<u32>, r: u32, c: u32) -> f32 {
    if (d.x == 0u) {
        return f32(a_sh[d.y + r * d.z + c]);
    }
    return f32(b_sh[d.y + r * d.z + c]);
}

fn emu_mma(a: vec3<u32>, b: vec3<u32>, c_in: array<f32, 8>) -> array<f32, 8> {
    var r = c_in;
    for (var e = 0u; e < 8u; e++) {
        let i = (lane * 8u + e) / 16u;
        let j = (lane * 8u + e) % 16u;
        var s = r[e];
        for (var k = 0u; k < 16u; k++) {
            s = fma(emu_fetch(a, i, k), emu_fetch(b, k, j), s);
        }
        r[e] = s;
    }
    return r;
}

// A row-major store with row stride 16: element (i, j) = 8 * lane + e lands at off + 8 * lane + e.
fn emu_store(v_in: array<f32, 8>, off: u32) {
    var v = v_in;
    for (var e = 0u; e < 8u; e++) {
        c_sh[off + lane * 8u + e] = v[e];
    }
}
