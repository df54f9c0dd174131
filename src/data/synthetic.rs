//! The built-in synthetic dataset, in CIFAR-10's format: 10 classes that a conv net can learn but
//! not by colour or position alone. A class is a shape (disk, square, triangle pointing up,
//! triangle pointing down, ring) filled with stripes (horizontal or vertical): 5 × 2 classes.
//! Every class is unchanged by a horizontal flip, so micronet's augmentation keeps labels true.
//! Position, size, the two stripe colours, stripe period and phase, the background gradient and
//! pixel noise are random; everything follows from the seed.

use super::{CHANNELS, CLASSES, Dataset, IMAGE_BYTES, SIDE};
use crate::rng::Rng;

/// Whether pixel (x, y) lies in shape `shape` centred at (cx, cy) with radius r.
fn inside(shape: usize, x: f32, y: f32, cx: f32, cy: f32, r: f32) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match shape {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
        // Triangles: apex up (or down), base width 2r.
        2 => dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0,
        3 => dy >= -r && dy <= r && dx.abs() <= (r - dy) / 2.0,
        _ => {
            let d2 = dx * dx + dy * dy;
            d2 <= r * r && d2 >= (0.55 * r) * (0.55 * r)
        }
    }
}

/// One image of class `label`.
fn draw(rng: &mut Rng, label: usize, out: &mut [u8]) {
    let (shape, vertical) = (label / 2, label % 2 == 1);
    let r = rng.uniform(7.0, 12.0);
    let cx = rng.uniform(r * 0.6, SIDE as f32 - r * 0.6);
    let cy = rng.uniform(r * 0.6, SIDE as f32 - r * 0.6);
    let period = rng.uniform(3.0, 6.0);
    let phase = rng.uniform(0.0, std::f32::consts::TAU);
    let mut colour = || {
        [
            rng.uniform(0.0, 255.0),
            rng.uniform(0.0, 255.0),
            rng.uniform(0.0, 255.0),
        ]
    };
    let (a, b, bg0, bg1) = (colour(), colour(), colour(), colour());
    let noise = 12.0;
    for y in 0..SIDE {
        for x in 0..SIDE {
            let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
            let px = if inside(shape, xf, yf, cx, cy, r) {
                let coord = if vertical { xf } else { yf };
                let s = (std::f32::consts::TAU * coord / period + phase).sin();
                let w = 0.5 + 0.5 * s;
                [0, 1, 2].map(|c| a[c] * w + b[c] * (1.0 - w))
            } else {
                let t = yf / SIDE as f32;
                [0, 1, 2].map(|c| bg0[c] * (1.0 - t) + bg1[c] * t)
            };
            for c in 0..CHANNELS {
                let v = px[c] + noise * rng.normal() as f32;
                out[(c * SIDE + y) * SIDE + x] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// `n` images, labels cycling through the classes (balanced); image i of `split` is drawn from
/// its own stream of the seed.
pub fn generate(seed: u64, split: u64, n: usize) -> Dataset {
    let mut d = Dataset {
        images: vec![0; n * IMAGE_BYTES],
        labels: Vec::with_capacity(n),
    };
    let mut order_rng = Rng::derive(seed, 0x5F_0000 + split);
    let mut labels: Vec<u8> = (0..n).map(|i| (i % CLASSES) as u8).collect();
    order_rng.shuffle(&mut labels);
    for (i, img) in d.images.chunks_exact_mut(IMAGE_BYTES).enumerate() {
        let mut rng = Rng::derive(seed, (split << 32) ^ i as u64 ^ 0x51_0000_0000_0000);
        draw(&mut rng, labels[i] as usize, img);
    }
    d.labels = labels;
    d
}

/// The default sizes: CIFAR-10's (50,000 training, 10,000 test images).
pub const TRAIN: usize = 50_000;
pub const TEST: usize = 10_000;

/// Training and test sets.
pub fn train_test(seed: u64, n_train: usize, n_test: usize) -> (Dataset, Dataset) {
    (generate(seed, 1, n_train), generate(seed, 2, n_test))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_flip_invariant() {
        let a = generate(7, 1, 200);
        assert_eq!(a.images, generate(7, 1, 200).images);
        assert_ne!(a.images, generate(8, 1, 200).images);
        for c in 0..CLASSES as u8 {
            assert_eq!(a.labels.iter().filter(|&&l| l == c).count(), 20);
        }
        // Every shape is symmetric under x -> -x about its centre.
        for shape in 0..5 {
            for (x, y) in [(3.0f32, 1.0f32), (-2.0, 4.0), (5.5, -3.0)] {
                assert_eq!(
                    inside(shape, x, y, 0.0, 0.0, 8.0),
                    inside(shape, -x, y, 0.0, 0.0, 8.0)
                );
            }
        }
    }
}
