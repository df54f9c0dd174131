// Plain-WGSL stand-ins for the cooperative-matrix operations of conv_coop.wgsl,
// conv_coop_gw.wgsl and conv_coop_gi.wgsl, appended to the emulation that
// src/kernels/conv_coop/mod.rs derives from each (lavapipe has no cooperative matrices). A 16x16
// A or B matrix stays where it lies in workgroup memory (which array, offset, row stride) and is
// read when multiplied, the data being still in place then; an accumulator is the 8 elements
// lane l of its subgroup owns (row-major elements 8l..8l+7 of the 16x16). Each element's
// products are added in k order; products of f16 values are exact in f32, as in the hardware,
// whose order of the additions may differ.

var<private> lane: u32;
// 16, from a value the compiler cannot know (main sets it to 16 + (wid.x >> 31), and no grid is
// that large), so that it keeps emu_mma's k loop rather than unrolling every call of it:
// unrolled, lavapipe took 20-60 s to compile each kernel, now 3-5 s.
var<private> emu_depth: u32;

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

// Lane l's elements (l / 2, 8 (l % 2) + e), e = 0..7, each summed in increasing k. The k loop
// runs to emu_depth (see above); the element loop indexes r by constants once unrolled (a form
// with r indexed by a loop variable inside the k loop gave wrong sums on lavapipe, LLVM 15,
// for long K).
fn emu_mma(a: vec3<u32>, b: vec3<u32>, c_in: array<f32, 8>) -> array<f32, 8> {
    var r = c_in;
    let i = lane / 2u;
    let j = (lane % 2u) * 8u;
    for (var k = 0u; k < emu_depth; k++) {
        let av = emu_fetch(a, i, k);
        for (var e = 0u; e < 8u; e++) {
            r[e] = fma(av, emu_fetch(b, k, j + e), r[e]);
        }
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
