//! The forward (`shaders/conv_coop.wgsl`), grad-weight (`conv_coop_gw.wgsl`) and grad-input
//! (`conv_coop_gi.wgsl`) of a quantized conv2d on cooperative matrices (tensor cores), the
//! start-up check that the device runs them right, and the plain-WGSL emulation of the same
//! kernels that tests them where there are none.
//!
//! Only a conv whose input is DoReFa-quantized runs here (its activation codes are exact in f16),
//! and in the forward and grad-input only with DoReFa weights too (their codes likewise); the
//! backward kernels take the float gradient as two f16 halves under a power-of-two scale (see
//! their shaders). Everything else stays on the fp32 kernel family of `conv2d.wgsl`.

mod forward;
mod grad_input;
mod grad_weight;
mod verify;

pub use self::forward::forward;
pub use self::grad_input::grad_input;
pub use self::grad_weight::grad_weight;
pub use self::verify::verify;
use super::SHADERS_COOP;
pub use crate::gpu::CoopMode;
use crate::gpu::Shader;
use std::sync::OnceLock;

/// The tile of a workgroup (the shader's BM × BN; four subgroups of 32 invocations): also the
/// columns per partial BatchNorm statistic it forms.
pub const TILE: usize = 128;

/// The rows of a tile's group slot for a grouped GEMM of `m` rows per group: 32 or 64 where the
/// groups are that short (the tile stacks `TILE / rows` groups, one B tile each, so that NIN-GC's
/// 3x3 layers fill it), else [`TILE`] (a tile holds rows of one group).
pub(crate) fn slot_rows(m: usize, groups: usize) -> usize {
    match m {
        _ if groups < 2 => TILE,
        0..=32 => 32,
        33..=64 => 64,
        _ => TILE,
    }
}

/// The workgroup grid of a GEMM of `m` rows per group and `n` columns with `rg` rows per group
/// slot ([`slot_rows`]): column tiles, row tiles and (stacks of) groups.
pub(crate) fn grid(m: usize, n: usize, groups: usize, rg: usize) -> [u32; 3] {
    let (row_tiles, group_tiles) = if rg < TILE {
        (1, groups.div_ceil(TILE / rg))
    } else {
        (m.div_ceil(TILE), groups)
    };
    [
        n.div_ceil(TILE) as u32,
        row_tiles as u32,
        group_tiles as u32,
    ]
}

/// What a launch's label says of its packing: " packed 4x32" (groups × rows per slot), or nothing.
pub(crate) fn packing_label(rg: usize) -> String {
    if rg < TILE {
        format!(" packed {}x{rg}", TILE / rg)
    } else {
        String::new()
    }
}

/// One emulation per shader of [`SHADERS_COOP`] (a test keeps the two counts equal).
const EMULATED_SLOTS: usize = 3;

/// `shader` (one of [`SHADERS_COOP`]) rewritten in plain WGSL: each cooperative-matrix
/// operation becomes a call of `shaders/lib/coop_emulation.wgsl`, the rest (staging, tiles,
/// epilogue) is unchanged.
pub fn emulated_shader(shader: &'static Shader) -> &'static Shader {
    static EMULATED: [OnceLock<Shader>; EMULATED_SLOTS] =
        [const { OnceLock::new() }; EMULATED_SLOTS];
    let i = SHADERS_COOP
        .iter()
        .position(|s| std::ptr::eq(*s, shader))
        .expect("a cooperative-matrix shader");
    EMULATED[i].get_or_init(|| Shader {
        name: Box::leak(format!("{} (emulated)", shader.name).into_boxed_str()),
        source: Box::leak(emulate(shader.source).into_boxed_str()),
        trusted: true,
    })
}

/// `shader` (one of [`SHADERS_COOP`]) as `mode` runs it: itself, or its emulation.
pub(crate) fn shader_for(shader: &'static Shader, mode: CoopMode) -> &'static Shader {
    match mode {
        CoopMode::Hardware => shader,
        CoopMode::Emulated => emulated_shader(shader),
    }
}

/// What a launch's label adds for `mode`: " (emulated)" for the emulation, nothing else.
pub(crate) fn label_suffix(mode: CoopMode) -> &'static str {
    match mode {
        CoopMode::Hardware => "",
        CoopMode::Emulated => " (emulated)",
    }
}

/// The textual rewrite behind [`emulated_shader`].
pub fn emulate(source: &str) -> String {
    let rewrites = [
        ("enable wgpu_cooperative_matrix;\n", ""),
        ("diagnostic(off, derivative_uniformity);\n", ""),
        ("alias MA = coop_mat16x16<f16, A>;", "alias MA = vec3<u32>;"),
        ("alias MB = coop_mat16x16<f16, B>;", "alias MB = vec3<u32>;"),
        (
            "alias MC = coop_mat16x16<f32, C>;",
            "alias MC = array<f32, 8>;",
        ),
        ("coopLoadT<MA>(&a_sh[", "emu_load_a_sh("),
        ("coopLoadT<MA>(&a_lo[", "emu_load_a_lo("),
        ("coopLoadT<MB>(&b_sh[", "emu_load_b_sh("),
        ("coopLoadT<MB>(&b_lo[", "emu_load_b_lo("),
        ("], AS);", ", AS);"),
        ("], BS);", ", BS);"),
        ("coopMultiplyAdd(", "emu_mma("),
        ("coopStoreT(cv, &c_sh[ci], 16u);", "emu_store(cv, ci);"),
        (",\n        @builtin(subgroup_id) sg_id: u32)", ")"),
        (
            "let sg = sg_id;",
            "let sg = lid / 32u;\n    lane = lid % 32u;\n    emu_depth = 16u + (wid.x >> 31u);",
        ),
    ];
    let mut s = source.to_string();
    for (from, to) in rewrites {
        s = s.replace(from, to);
    }
    s.push_str(include_str!("../../../shaders/lib/coop_emulation.wgsl"));
    // Element (r, c) of a matrix the loads describe, from whichever workgroup arrays the kernel
    // has (`emu_load_*` numbers them).
    s.push_str("\nfn emu_fetch(d: vec3<u32>, r: u32, c: u32) -> f32 {\n");
    for (id, array) in ["a_sh", "b_sh", "a_lo", "b_lo"].iter().enumerate() {
        if source.contains(&format!("var<workgroup> {array}:")) {
            s.push_str(&format!(
                "    if (d.x == {id}u) {{\n        return f32({array}[d.y + r * d.z + c]);\n    }}\n"
            ));
        }
    }
    s.push_str("    return 0.0;\n}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_gemms_of_few_rows_pack_into_slots_and_the_grid_covers_every_group() {
        // NIN-GC's 3x3 layers (32 output channels per group), a 64-row group, and what is not
        // packed: one group, or groups taller than 64 rows.
        assert_eq!(slot_rows(32, 16), 32);
        assert_eq!(slot_rows(5, 2), 32);
        assert_eq!(slot_rows(50, 3), 64);
        assert_eq!(slot_rows(32, 1), TILE);
        assert_eq!(slot_rows(65, 4), TILE);
        assert_eq!(packing_label(32), " packed 4x32");
        assert_eq!(packing_label(TILE), "");
        // 16 groups of 32 rows: four tiles of four groups; 3 groups of 50: two tiles of two
        // slots, the second half empty; unpacked, 190 rows are two row tiles per group.
        assert_eq!(grid(32, 65536, 16, 32), [512, 1, 4]);
        assert_eq!(grid(50, 300, 3, 64), [3, 1, 2]);
        assert_eq!(grid(190, 128, 2, TILE), [1, 2, 2]);
    }

    #[test]
    fn the_emulations_have_no_cooperative_matrix_left() {
        assert_eq!(SHADERS_COOP.len(), EMULATED_SLOTS);
        for shader in SHADERS_COOP {
            let s = emulated_shader(shader).source;
            for gone in [
                "coop",
                "subgroup_id",
                "wgpu_cooperative_matrix",
                "diagnostic(",
            ] {
                let rest: Vec<&str> = s
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//") && l.contains(gone))
                    .collect();
                assert!(
                    rest.is_empty(),
                    "{gone} left in the emulation of {}: {rest:?}",
                    shader.name
                );
            }
        }
    }
}
