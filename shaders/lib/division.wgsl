// Exactly rounded f32 division, prepended to the shaders that need it (kernels::shader!): Vulkan
// lets f32 division be off by 2.5 ulp, and quantizers must round x / s exactly as PyTorch does.
// Needs nothing from the including file.

// (hi, lo) of x * y for x < 2^25, y < 2^24, from 16-bit limbs.
fn mul_wide(x: u32, y: u32) -> vec2<u32> {
    let x0 = x & 0xffffu;
    let x1 = x >> 16u;
    let y0 = y & 0xffffu;
    let y1 = y >> 16u;
    let p00 = x0 * y0;
    let mid = x0 * y1 + x1 * y0;
    let mid_lo = (mid & 0xffffu) << 16u;
    let lo = p00 + mid_lo;
    let carry = select(0u, 1u, lo < p00);
    return vec2<u32>(x1 * y1 + (mid >> 16u) + carry, lo);
}

// Sign of a - mid * b, where mid is the midpoint between the positive normal floats with bits lo
// and lo + 1, and a, b are positive normal floats. mid = (2M + 1) * 2^(E - 1) with M, E the
// mantissa and exponent of lo (also when lo + 1 starts the next binade).
fn cmp_mid(a: f32, b: f32, lo: u32) -> i32 {
    let ab = bitcast<u32>(a);
    let bb = bitcast<u32>(b);
    let ma = (ab & 0x7fffffu) | 0x800000u;
    let mb = (bb & 0x7fffffu) | 0x800000u;
    let mq = (lo & 0x7fffffu) | 0x800000u;
    let ea = i32(ab >> 23u);
    let eb = i32(bb >> 23u);
    let eq = i32(lo >> 23u);
    // a = ma * 2^(ea-150); mid * b = (2 mq + 1) * mb * 2^(eq-151 + eb-150).
    let sh = (ea - 150) - (eq - 151 + eb - 150);
    // (2 mq + 1) * mb lies in [2^47, 2^49); ma * 2^sh in [2^(23+sh), 2^(24+sh)).
    if (sh >= 26) {
        return 1;
    }
    if (sh <= 22) {
        return -1;
    }
    let s = u32(sh);
    let lhs = vec2<u32>(ma >> (32u - s), ma << s);
    let rhs = mul_wide(2u * mq + 1u, mb);
    if (lhs.x != rhs.x) {
        return select(-1, 1, lhs.x > rhs.x);
    }
    if (lhs.y != rhs.y) {
        return select(-1, 1, lhs.y > rhs.y);
    }
    return 0;
}

// a / b rounded to nearest (ties to even), given an estimate q0 within a few ulp, for b > 0.
// Zero, subnormal or non-finite operands and subnormal quotients keep q0: only normal ranges
// matter for quantization (a quotient below 2^-27 vanishes in the following + 0.5).
fn div_rn_from(a: f32, b: f32, q0: f32) -> f32 {
    let aa = abs(a);
    let qa = abs(q0);
    let normal_min = 1.17549435e-38;
    let finite_max = 3.40282347e38;
    if (!(aa >= normal_min && aa <= finite_max && b >= normal_min && b <= finite_max
          && qa >= normal_min && qa <= finite_max)) {
        return q0;
    }
    var qb = bitcast<u32>(qa);
    for (var i = 0u; i < 4u; i++) {
        let up = cmp_mid(aa, b, qb);
        if (up > 0 || (up == 0 && (qb & 1u) == 1u)) {
            qb += 1u;
            continue;
        }
        let down = cmp_mid(aa, b, qb - 1u);
        if (down < 0 || (down == 0 && (qb & 1u) == 1u)) {
            qb -= 1u;
            continue;
        }
        break;
    }
    let q = bitcast<f32>(qb);
    return select(q, -q, a < 0.0);
}

fn div_rn(a: f32, b: f32) -> f32 {
    return div_rn_from(a, b, a / b);
}

