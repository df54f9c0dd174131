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
