// Plain-WGSL stand-ins for the cooperative-matrix operations of conv_coop.wgsl,
// conv_coop_gw.wgsl and conv_coop_gi.wgsl, appended to the emulation that
// src/kernels/conv_coop/mod.rs derives from each (lavapipe has no cooperative matrices). A 16x16
// A or B matrix stays where it lies in workgroup memory (which array, offset, row stride) and is
// read when multiplied, the data being still in place then; an accumulator is the 8 elements
// lane l of its subgroup owns (row-major elements 8l..8l+7 of the 16x16). Each element's
// products are added in k order; products of f16 values are exact in f32, as in the hardware,
// whose order of the additions may differ.

var<private> lane: u32;

fn emu_load_a_sh(off: u32, stride: u32) -> vec3<u32> {
    return vec3<u32>(0u, off, stride);
}

fn emu_load_b_sh(off: u32, stride: u32) -> vec3<u32> {
    return vec3<u32>(1u, off, stride);
}

fn emu_load_a_lo(off: u32, stride: u32) -> vec3<u32> {
    return vec3<u32>(2u, off, stride);
}

fn emu_load_b_lo(off: u32, stride: u32) -> vec3<u32> {
    return vec3<u32>(3u, off, stride);
}

// (emu_fetch(d, r, c), element (r, c) of the matrix d describes, is appended by
// src/kernels/conv_coop/mod.rs for the workgroup arrays the kernel has.)

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
