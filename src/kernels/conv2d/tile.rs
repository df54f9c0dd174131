//! The workgroup tiles of `conv2d.wgsl` and how one is chosen for a GEMM and a device.

/// K steps of the shader's tiles.
pub(super) const BK: usize = 8;

/// A workgroup tile of the shader: `bm` rows × `bn` columns, 8 × 16 outputs per thread. The rows
/// are one group's GEMM, or (group packing) `gp` groups' of `rg` rows each stacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: usize,
    pub bn: usize,
    /// Groups stacked in the tile (1: the rows of one group).
    pub gp: usize,
    /// Rows of each group slot (`bm` with one group).
    pub rg: usize,
}

/// Tile heights the shader is built for (multiples of 16; the two row quads of a thread are
/// `bm / 2` apart).
const TILE_ROWS: [usize; 7] = [16, 32, 64, 96, 128, 160, 192];

/// The height a packed tile aims for, and the most rows a group may have to be packed.
const PACK_ROWS: usize = 128;
const PACK_MAX_GROUP_ROWS: usize = 64;

impl Tile {
    fn single(bm: usize, bn: usize) -> Tile {
        Tile {
            bm,
            bn,
            gp: 1,
            rg: bm,
        }
    }

    pub fn threads(&self) -> usize {
        (self.bm / 8) * (self.bn / 16)
    }

    /// Workgroup memory: two K tiles of A (transposed, rows padded by 4 floats) and of B (one
    /// per group slot).
    pub fn shared_bytes(&self) -> usize {
        2 * BK * (self.bm + 4 + self.gp * self.bn) * 4
    }

    /// The tile for a GEMM of `m` rows and `n` columns on any device: the shortest height that
    /// covers `m` in one tile (so layers of 10, 32, 96, 160 or 192 channels compute no padding
    /// rows), 128 rows beyond 192; 64 columns when `n` is that small, else 128.
    pub fn nominal(m: usize, n: usize) -> Tile {
        Tile::single(
            TILE_ROWS.iter().copied().find(|&r| r >= m).unwrap_or(128),
            if n <= 64 { 64 } else { 128 },
        )
    }

    /// The packed tile for `groups` GEMMs of `m` rows: where a group has few rows (at most 64,
    /// a multiple of 8) and there are several, as many groups as make 128 rows.
    pub fn packed(m: usize, n: usize, groups: usize) -> Option<Tile> {
        if groups < 2 || m > PACK_MAX_GROUP_ROWS || !m.is_multiple_of(8) {
            return None;
        }
        let gp = (PACK_ROWS / m).min(groups);
        Some(Tile {
            bm: gp * m,
            gp,
            rg: m,
            ..Tile::nominal(m, n)
        })
    }

    /// [`Self::packed`] where it applies and fits the device's workgroup limits (narrower, then
    /// with fewer groups, as needed), else [`Self::nominal`] with its height reduced until it
    /// fits.
    pub fn choose(m: usize, n: usize, groups: usize, limits: &wgpu::Limits) -> Tile {
        let fits = |t: &Tile| {
            t.threads() <= limits.max_compute_invocations_per_workgroup as usize
                && t.threads() <= limits.max_compute_workgroup_size_x as usize
                && t.shared_bytes() <= limits.max_compute_workgroup_storage_size as usize
        };
        if let Some(mut t) = Tile::packed(m, n, groups) {
            while t.gp >= 2 {
                if fits(&t) {
                    return t;
                }
                if t.bn > 32 {
                    t.bn /= 2;
                } else {
                    t.gp /= 2;
                    t.bm = t.gp * t.rg;
                }
            }
        }
        let mut t = Tile::nominal(m, n);
        while !fits(&t) && t.bm > TILE_ROWS[0] {
            t.bm = TILE_ROWS
                .iter()
                .rev()
                .copied()
                .find(|&r| r < t.bm)
                .unwrap_or(16);
            t.rg = t.bm;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_rows_without_padding_tiles_and_fit_the_device() {
        let big = wgpu::Limits {
            max_compute_workgroup_storage_size: 32 << 10,
            ..wgpu::Limits::default()
        };
        let rows = |m| Tile::choose(m, 1000, 1, &big).bm;
        assert_eq!(
            [1, 10, 32, 33, 96, 128, 150, 192, 256, 1000].map(rows),
            [16, 16, 32, 64, 96, 128, 160, 192, 128, 128]
        );
        assert_eq!(Tile::choose(128, 64, 1, &big).bn, 64);
        assert_eq!(Tile::choose(128, 65, 1, &big).bn, 128);
        // 128 x 128 needs 16,640 bytes: WebGPU's 16 KiB minimum gets 96 rows.
        assert_eq!(Tile::nominal(128, 1000).shared_bytes(), 16_640);
        let small = wgpu::Limits::default();
        let t = Tile::choose(128, 1000, 1, &small);
        assert_eq!((t.bm, t.bn), (96, 128));
        assert!(t.shared_bytes() <= 16 << 10 && t.threads() <= 256);
        // 192 rows x 128 columns is 192 threads; a device with 128 gets 128 rows.
        let few = wgpu::Limits {
            max_compute_invocations_per_workgroup: 128,
            ..big
        };
        assert_eq!(Tile::choose(190, 1000, 1, &few).bm, 128);
    }

    #[test]
    fn grouped_layers_with_few_rows_per_group_pack_groups_into_tall_tiles() {
        let limits = |kib: u32| wgpu::Limits {
            max_compute_workgroup_storage_size: kib << 10,
            ..wgpu::Limits::default()
        };
        let shape = |t: Tile| (t.gp, t.rg, t.bm, t.bn, t.threads());
        // NIN-GC's 3x3 layers: 32 output channels per group (forward, grad-weight), 16 input
        // channels (grad-input). 48 KiB (an NVIDIA GPU's): 4 groups x 32 rows x 128 columns.
        assert_eq!(
            shape(Tile::choose(32, 4096, 16, &limits(48))),
            (4, 32, 128, 128, 128)
        );
        assert_eq!(
            Tile::choose(32, 4096, 16, &limits(48)).shared_bytes(),
            41_216
        );
        // 32 KiB (lavapipe's): 64 columns.
        assert_eq!(
            shape(Tile::choose(32, 4096, 16, &limits(32))),
            (4, 32, 128, 64, 64)
        );
        assert_eq!(
            shape(Tile::choose(16, 4096, 32, &limits(48))),
            (8, 16, 128, 64, 64)
        );
        assert_eq!(
            shape(Tile::choose(16, 4096, 32, &limits(32))),
            (8, 16, 128, 32, 32)
        );
        // WebGPU's 16 KiB: fewer groups.
        assert_eq!(
            shape(Tile::choose(32, 4096, 16, &limits(16))),
            (2, 32, 64, 32, 16)
        );
        // Fewer groups than fit: all of them; 6 groups of 32 rows: slots of 4 (the last half
        // empty).
        assert_eq!(
            shape(Tile::choose(8, 4096, 3, &limits(48))),
            (3, 8, 24, 128, 24)
        );
        assert_eq!(Tile::choose(32, 4096, 6, &limits(48)).gp, 4);
        // Not packed: one group, rows not a multiple of 8, or many rows per group.
        for (m, groups) in [(32, 1), (12, 4), (128, 2)] {
            assert_eq!(Tile::choose(m, 4096, groups, &limits(48)).gp, 1);
        }
    }
}
