//! Data: the CIFAR-10 binary format, the built-in synthetic dataset in the same format, and
//! micronet's augmentation and normalisation, batch by batch, reproducible from the seed.

pub mod cifar;
pub mod synthetic;

use crate::rng::Rng;

/// Image side and channels of CIFAR-10 records.
pub const SIDE: usize = 32;
pub const CHANNELS: usize = 3;
/// Bytes of one image (CHW, u8) and of one record (label byte + image).
pub const IMAGE_BYTES: usize = CHANNELS * SIDE * SIDE;
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
pub const CLASSES: usize = 10;
/// CIFAR-10's class names, in label order (`batches.meta.txt`).
pub const CLASS_NAMES: [&str; CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// micronet's normalisation (torchvision Normalize).
pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f32; 3] = [0.2023, 0.1994, 0.2010];

/// Images as u8 CHW records with labels.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// The first `n` records.
    pub fn truncate(&mut self, n: usize) {
        self.labels.truncate(n);
        self.images.truncate(n * IMAGE_BYTES);
    }

    /// Records in the CIFAR-10 binary layout (label byte, then the image).
    pub fn to_records(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * RECORD_BYTES);
        for i in 0..self.len() {
            out.push(self.labels[i]);
            out.extend_from_slice(self.image(i));
        }
        out
    }
}

/// Training-time augmentation (micronet): random crop 32 from the image zero-padded by 4, then a
/// horizontal flip with probability 0.5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    pub crop_padding: usize,
    pub flip: bool,
}

impl Augment {
    pub const MICRONET: Augment = Augment {
        crop_padding: 4,
        flip: true,
    };
    pub const NONE: Augment = Augment {
        crop_padding: 0,
        flip: false,
    };
}

/// Appends image `img` to `out` as normalised f32 CHW, cropped at offset `(dy, dx)` of the image
/// padded by `pad` zeros and mirrored when `flip`: the order of torchvision's RandomCrop, then
/// RandomHorizontalFlip, ToTensor, Normalize.
pub fn push_normalised(
    out: &mut Vec<f32>,
    img: &[u8],
    pad: usize,
    (dy, dx): (usize, usize),
    flip: bool,
) {
    for c in 0..CHANNELS {
        let (mean, std) = (MEAN[c], STD[c]);
        let zero = (0.0 - mean) / std;
        for y in 0..SIDE {
            let sy = (y + dy) as isize - pad as isize;
            for x in 0..SIDE {
                let cx = if flip { SIDE - 1 - x } else { x };
                let sx = (cx + dx) as isize - pad as isize;
                let inside = (0..SIDE as isize).contains(&sy) && (0..SIDE as isize).contains(&sx);
                out.push(if inside {
                    (img[(c * SIDE + sy as usize) * SIDE + sx as usize] as f32 / 255.0 - mean) / std
                } else {
                    zero
                });
            }
        }
    }
}

/// Assembles a batch of records `indices` with augmentation drawn from `rng` (per image: crop row,
/// crop column, flip), returning normalised images and labels.
pub fn batch(
    data: &Dataset,
    indices: &[usize],
    augment: Augment,
    rng: &mut Rng,
) -> (Vec<f32>, Vec<u32>) {
    let mut images = Vec::with_capacity(indices.len() * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(indices.len());
    let span = 2 * augment.crop_padding as u64 + 1;
    for &i in indices {
        let dy = rng.below(span) as usize;
        let dx = rng.below(span) as usize;
        let flip = augment.flip && rng.next_f64() < 0.5;
        push_normalised(
            &mut images,
            data.image(i),
            augment.crop_padding,
            (dy, dx),
            flip,
        );
        labels.push(data.labels[i] as u32);
    }
    (images, labels)
}

/// The order of the training set in `epoch`: a permutation drawn from the seed (or the identity).
pub fn epoch_order(n: usize, seed: u64, epoch: u32, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        Rng::derive(seed, 0x5EED_0000 + epoch as u64).shuffle(&mut order);
    }
    order
}

/// The augmentation generator of step `step` of `epoch`: every batch draws from its own stream,
/// so a run resumed mid-epoch sees the same augmentations as one that never stopped.
pub fn step_rng(seed: u64, epoch: u32, step: u64) -> Rng {
    Rng::derive(seed, ((epoch as u64) << 40) ^ step ^ 0xA06_0000_0000_0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_and_flip_follow_torchvision() {
        // An image whose pixel value encodes its column.
        let img: Vec<u8> = (0..IMAGE_BYTES).map(|i| (i % SIDE) as u8).collect();
        let mut out = Vec::new();
        push_normalised(&mut out, &img, 4, (4, 4), false);
        let col = |v: f32| ((v * STD[0] + MEAN[0]) * 255.0).round() as i32;
        assert_eq!(col(out[0]), 0);
        assert_eq!(col(out[31]), 31);
        out.clear();
        push_normalised(&mut out, &img, 4, (4, 4), true);
        assert_eq!(col(out[0]), 31);
        out.clear();
        // Offset 0: the first 4 columns and rows are padding (value 0 before normalising).
        push_normalised(&mut out, &img, 4, (0, 0), false);
        assert_eq!(col(out[0]), 0);
        assert_eq!(col(out[4 * SIDE + 5]), 1);
    }

    #[test]
    fn order_and_augmentation_are_reproducible() {
        assert_eq!(epoch_order(100, 1, 3, true), epoch_order(100, 1, 3, true));
        assert_ne!(epoch_order(100, 1, 3, true), epoch_order(100, 1, 4, true));
        assert_eq!(epoch_order(5, 1, 3, false), vec![0, 1, 2, 3, 4]);
        assert_eq!(step_rng(1, 2, 3).next_u64(), step_rng(1, 2, 3).next_u64());
    }
}
