// Pooling windows (shaders/pool.wgsl, maxpool.wgsl).

// Output windows (along one axis) that contain input index i: o with o*s - p <= i < o*s - p + k.
fn window_range(i: u32, k: u32, s: u32, pad: u32, n_out: u32) -> vec2<u32> {
    let top = i + pad;                            // o*s <= top
    let hi = min(top / s, n_out - 1u);
    var lo = 0u;
    if (top + 1u > k) {
        lo = (top + 1u - k + s - 1u) / s;         // o*s > top - k
    }
    return vec2<u32>(lo, hi + 1u);
}
