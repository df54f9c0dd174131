//! Validates, with SPIRV-Tools under Vulkan 1.3's rules, the SPIR-V of every pipeline that
//! training plans of nin_gc, nin and resnet18 (W8A8, W4A4, W2A2), the start-up check of the
//! cooperative-matrix kernels and the selftest's cooperative-matrix cases specialise (`--all`:
//! every selftest case), translated as wgpu 30's Vulkan backend translates it for a Vulkan 1.3
//! device. The cooperative-matrix kernels run emulated here (no machine here has tensor cores),
//! which records the same override constants; their hardware source is what is translated and
//! validated. It also checks that each pipeline's workgroup memory fits the device the plans
//! were made for (on lavapipe, wgpu 30 created and ran a pipeline over that limit without an
//! error).
//!
//! `cargo run --release --manifest-path tools/spirv_check/Cargo.toml [-- --all]`

use naga::back::spv;
use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use spirv_tools::val::Validator as _;
use std::collections::{HashMap, HashSet};
use wgqat::gpu::{CoopMode, Gpu, GpuOptions, Shader};
use wgqat::nn::{Mode, Network};
use wgqat::quant::{Bits, QuantConfig};

fn main() {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { wgqat::gpu::ensure_runtime_dir() };
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let all = std::env::args().any(|a| a == "--all");
    // Plans on cooperative matrices (emulated) and on the fp32 kernels.
    let coop = Gpu::new(&GpuOptions::default())?.with_coop(Some(CoopMode::Emulated));
    let fp32 = Gpu::new(&GpuOptions::default())?.with_coop(None);
    for gpu in [&coop, &fp32] {
        for model in ["nin_gc", "nin", "resnet18"] {
            let spec = wgqat::models::load(model)?;
            for (bits, batch) in [(8u32, 16usize), (4, 8), (2, 4)] {
                let b = Bits::new(bits)?;
                let net = Network::new(gpu, &spec, QuantConfig::dorefa(b, b), batch, true, 1)?;
                net.plan(gpu, batch, Mode::Train)?;
            }
        }
    }
    // The start-up check's kernels (what a driver compiles first).
    wgqat::kernels::conv_coop::verify(&coop)?;
    let cases: Vec<_> = wgqat::selftest::cases()
        .into_iter()
        .filter(|c| all || c.direction.contains("coop"))
        .collect();
    for c in &cases {
        let o = c.run(&coop);
        if !o.passed() {
            return Err(format!("selftest case failed: {}", o.describe()).into());
        }
    }
    let names: std::collections::BTreeSet<String> = coop
        .kernels()
        .names()
        .into_iter()
        .chain(fp32.kernels().names())
        .collect();
    println!(
        "{} pipelines specialised (training plans of nin_gc, nin, resnet18 on both paths; the \
         start-up check; {} selftest cases)",
        names.len(),
        cases.len()
    );
    refuses_a_broken_matrix_type()?;
    let shaders: HashMap<&str, &Shader> = wgqat::kernels::SHADERS
        .iter()
        .chain(wgqat::kernels::SHADERS_COOP)
        .map(|s| (s.name, *s))
        .collect();
    let (mut checked, mut on_coop, mut failures) = (0, 0, Vec::new());
    let wg_limit = u64::from(coop.limits.max_compute_workgroup_storage_size);
    let mut wg_largest = (0u64, String::new());
    for key in &names {
        let mut parts = key.split(':');
        let file = parts.next().unwrap_or_default();
        let emulated = file.ends_with(" (emulated)");
        let shader = shaders
            .get(file.trim_end_matches(" (emulated)"))
            .ok_or_else(|| format!("{key}: no shader file of that name"))?;
        let entry = parts.next().unwrap_or_default();
        let constants: naga::back::PipelineConstants = parts
            .filter_map(|p| p.split_once('='))
            .map(|(n, v)| Ok((n.to_string(), v.parse::<f64>()?)))
            .collect::<Result<_, std::num::ParseFloatError>>()?;
        // A trusted shader is compiled without runtime checks unless asked; check both forms.
        let forms: &[bool] = if shader.trusted {
            &[true, false]
        } else {
            &[false]
        };
        for &trusted in forms {
            let words = match translate(shader, entry, &constants, trusted) {
                Ok((w, wg_bytes)) => {
                    // (Once per pipeline: both forms declare the same memory.)
                    if wg_bytes > wg_limit && trusted == forms[0] {
                        failures.push(format!(
                            "{key}: {wg_bytes} bytes of workgroup memory, over the device's {wg_limit}"
                        ));
                    }
                    if wg_bytes > wg_largest.0 {
                        wg_largest = (wg_bytes, key.clone());
                    }
                    w
                }
                Err(e) => {
                    failures.push(format!("{key} (trusted {trusted}): naga: {e}"));
                    continue;
                }
            };
            checked += 1;
            on_coop += usize::from(emulated);
            let val = spirv_tools::val::create(Some(spirv_tools::TargetEnv::Vulkan_1_3));
            if let Err(e) = val.validate(strip_unlaid_layout(&words), None) {
                failures.push(format!("{key} (trusted {trusted}): {e}"));
            }
        }
    }
    for f in &failures {
        println!("FAIL {f}");
    }
    println!(
        "workgroup memory: at most {} bytes ({}), the device gives {wg_limit}",
        wg_largest.0, wg_largest.1
    );
    println!(
        "{checked} SPIR-V modules ({on_coop} of cooperative-matrix kernels) validated for Vulkan 1.3: \
         {} failed",
        failures.len()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} modules failed validation", failures.len()).into())
    }
}

/// `entry` of `shader`, specialised by `constants`, as SPIR-V 1.6 with the capabilities and
/// bounds-check policies wgpu-hal 30 gives a Vulkan 1.3 device with robustBufferAccess2,
/// shader f16, subgroups, integer dot products, int8 and cooperative matrices; and the bytes of
/// workgroup memory the entry point uses.
fn translate(
    shader: &Shader,
    entry: &str,
    constants: &naga::back::PipelineConstants,
    trusted: bool,
) -> Result<(Vec<u32>, u64), Box<dyn std::error::Error>> {
    use spv::Capability as C;
    let module = naga::front::wgsl::parse_str(shader.source)?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::all()).validate(&module)?;
    let (m, i) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((naga::ShaderStage::Compute, entry)),
        constants,
    )?;
    let checked = if trusted {
        BoundsCheckPolicy::Unchecked
    } else {
        BoundsCheckPolicy::Restrict
    };
    let opts = spv::Options {
        lang_version: (1, 6),
        flags: spv::WriterFlags::FORCE_POINT_SIZE | spv::WriterFlags::LABEL_VARYINGS,
        capabilities: Some(
            [
                C::Shader,
                C::Float16,
                C::Int8,
                C::GroupNonUniform,
                C::GroupNonUniformVote,
                C::GroupNonUniformArithmetic,
                C::GroupNonUniformBallot,
                C::GroupNonUniformShuffle,
                C::GroupNonUniformShuffleRelative,
                C::GroupNonUniformQuad,
                C::CooperativeMatrixKHR,
                C::VulkanMemoryModel,
                C::DotProductInputAllKHR,
                C::DotProductInput4x8BitKHR,
                C::DotProductInput4x8BitPackedKHR,
                C::DotProductKHR,
            ]
            .into_iter()
            .collect(),
        ),
        bounds_check_policies: BoundsCheckPolicies {
            index: checked,
            buffer: BoundsCheckPolicy::Unchecked,
            image_load: BoundsCheckPolicy::Unchecked,
            binding_array: BoundsCheckPolicy::Unchecked,
        },
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: !trusted,
        ..Default::default()
    };
    let pipe = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.to_string(),
    };
    Ok((
        spv::write_vec(&m, &i, &opts, Some(&pipe))?,
        workgroup_bytes(&m, &i, entry),
    ))
}

/// The bytes of the workgroup variables entry point `entry` of `m` uses.
fn workgroup_bytes(m: &naga::Module, info: &naga::valid::ModuleInfo, entry: &str) -> u64 {
    let Some(index) = m.entry_points.iter().position(|e| e.name == entry) else {
        return 0;
    };
    let used = info.get_entry_point(index);
    m.global_variables
        .iter()
        .filter(|(h, v)| v.space == naga::AddressSpace::WorkGroup && !used[*h].is_empty())
        .map(|(_, v)| u64::from(m.types[v.ty].inner.size(m.to_ctx())))
        .sum()
}

/// The check must see the cooperative-matrix instructions: a matrix type whose row count is
/// not a constant has to be refused.
fn refuses_a_broken_matrix_type() -> Result<(), Box<dyn std::error::Error>> {
    let shader = wgqat::kernels::SHADERS_COOP[0];
    let (mut words, _) = translate(shader, "main", &Default::default(), false)?;
    let at = instructions(&words)
        .find(|&(_, _, op)| op == OP_TYPE_COOPERATIVE_MATRIX)
        .ok_or("no cooperative-matrix type in the forward kernel")?
        .0;
    words[at + 4] = words[at + 2]; // Rows := the component type's id
    let val = spirv_tools::val::create(Some(spirv_tools::TargetEnv::Vulkan_1_3));
    match val.validate(strip_unlaid_layout(&words), None) {
        Ok(()) => Err("a broken cooperative-matrix type passed validation".into()),
        Err(_) => Ok(()),
    }
}

const OP_TYPE_ARRAY: u32 = 28;
const OP_TYPE_RUNTIME_ARRAY: u32 = 29;
const OP_TYPE_STRUCT: u32 = 30;
const OP_TYPE_POINTER: u32 = 32;
const OP_DECORATE: u32 = 71;
const OP_MEMBER_DECORATE: u32 = 72;
const OP_TYPE_COOPERATIVE_MATRIX: u32 = 4456;

/// (word offset, word count, opcode) of each instruction after the header.
fn instructions(words: &[u32]) -> impl Iterator<Item = (usize, usize, u32)> + '_ {
    let mut at = 5;
    std::iter::from_fn(move || {
        let n = (*words.get(at)? >> 16) as usize;
        let item = (at, n.max(1), words[at] & 0xffff);
        at += n.max(1);
        Some(item)
    })
}

/// naga decorates every array and struct type with its layout (ArrayStride, Offset), also
/// those of workgroup and function variables, which Vulkan's SPIR-V rules no longer allow
/// (VUID-StandaloneSpirv-None-10684, checked by SPIRV-Tools since 2025; drivers ignore the
/// decorations). Drops those decorations, so that the validator reaches everything else, and
/// keeps them on types that storage and uniform buffers lay out.
fn strip_unlaid_layout(words: &[u32]) -> Vec<u32> {
    let mut parts: HashMap<u32, Vec<u32>> = HashMap::new();
    let (mut laid, mut free) = (Vec::new(), Vec::new());
    for (at, n, op) in instructions(words) {
        let w = &words[at..at + n];
        match op {
            OP_TYPE_ARRAY | OP_TYPE_RUNTIME_ARRAY => {
                parts.insert(w[1], vec![w[2]]);
            }
            OP_TYPE_STRUCT => {
                parts.insert(w[1], w[2..].to_vec());
            }
            // Storage classes: Uniform 2, PushConstant 9, StorageBuffer 12,
            // PhysicalStorageBuffer 5349 lay their types out; Workgroup 4, Private 6 and
            // Function 7 do not.
            OP_TYPE_POINTER => match w[2] {
                2 | 9 | 12 | 5349 => laid.push(w[3]),
                4 | 6 | 7 => free.push(w[3]),
                _ => {}
            },
            _ => {}
        }
    }
    let reach = |mut stack: Vec<u32>| {
        let mut seen = HashSet::new();
        while let Some(t) = stack.pop() {
            if seen.insert(t) {
                stack.extend(parts.get(&t).into_iter().flatten());
            }
        }
        seen
    };
    let (laid, free) = (reach(laid), reach(free));
    let mut out = words[..5].to_vec();
    for (at, n, op) in instructions(words) {
        let w = &words[at..at + n];
        let unlaid = matches!(op, OP_DECORATE | OP_MEMBER_DECORATE)
            && free.contains(&w[1])
            && !laid.contains(&w[1]);
        // ArrayStride (6) on arrays; Offset (35), MatrixStride (7), ColMajor (5) on members.
        let layout = (op == OP_DECORATE && w[2] == 6)
            || (op == OP_MEMBER_DECORATE && matches!(w[3], 35 | 7 | 5));
        if !(unlaid && layout) {
            out.extend_from_slice(w);
        }
    }
    out
}
