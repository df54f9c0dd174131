//! Reference of `shaders/elementwise.wgsl`.

/// `y = max(x, 0)`, NaN kept.
pub fn relu_forward(x: &[f32]) -> Vec<f64> {
    x.iter()
        .map(|&v| if v <= 0.0 { 0.0 } else { v as f64 })
        .collect()
}

/// `dx = dy · 1[y > 0]`.
pub fn relu_backward(y: &[f32], dy: &[f32]) -> Vec<f64> {
    y.iter()
        .zip(dy)
        .map(|(&y, &g)| if y > 0.0 { g as f64 } else { 0.0 })
        .collect()
}

/// `a + b`, rounded to f32 as the shader's one add is.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| (a + b) as f64).collect()
}

/// The shader's `hash32`: xor-shift and odd-multiply rounds on 32 bits.
pub fn hash32(v: u32) -> u32 {
    let mut x = v;
    x ^= x >> 16;
    x = x.wrapping_mul(0x21f0_aaad);
    x ^= x >> 15;
    x = x.wrapping_mul(0x735a_2d97);
    x ^= x >> 15;
    x
}

/// The first `n` values `fill_uniform` writes with `seed`, in [lo, hi): `lo + (hi - lo) * u_i`
/// with `hi - lo` rounded to f32 as the shader rounds it and the rest exact (the device rounds
/// the product and the sum, or once where it fuses them: within an ulp of `hi - lo`'s scale).
pub fn fill_uniform(n: usize, seed: u32, (lo, hi): (f32, f32)) -> Vec<f64> {
    let (h, range) = (hash32(seed), f64::from(hi - lo));
    (0..n as u32)
        .map(|i| {
            let u = f64::from(hash32(i ^ h) >> 8) / 16_777_216.0;
            f64::from(lo) + range * u
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_are_uniform_and_seeds_give_other_streams() {
        let (a, b) = (
            fill_uniform(100_000, 7, (-1.0, 1.0)),
            fill_uniform(100_000, 8, (-1.0, 1.0)),
        );
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        let below = a.iter().filter(|&&x| x < 0.0).count();
        assert!(
            mean.abs() < 0.01 && (49_000..51_000).contains(&below),
            "{mean} {below}"
        );
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
        assert!(a.iter().zip(&b).filter(|(x, y)| x == y).count() < 3);
    }
}
