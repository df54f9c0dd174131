//! The GPU context: adapter choice, device with the adapter's own limits and optional features,
//! buffers, the pipeline cache, step recording and readback.

mod adapter;
mod kernel;
mod pool;
mod readback;
mod recorder;
mod tensor;

pub use adapter::{AdapterSummary, GpuOptions, ensure_runtime_dir, list_adapters, parse_backends};
pub use kernel::{Bind, Kernel, KernelCache, KernelSpec, Shader};
pub use pool::{BufferPool, PoolStats};
pub use recorder::{Launch, Op, Recorder, Timing, submit_count, thread_submit_count};
pub use tensor::{DType, Tensor};

use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

/// Optional features wgqat uses where the adapter has them; each has a portable fallback.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Caps {
    /// Per-pass GPU timestamps (kernel timings); else wall clock.
    pub timestamp_query: bool,
    /// Timestamps between dispatches inside one compute pass.
    pub timestamp_query_inside_passes: bool,
    /// Subgroup operations in shaders.
    pub subgroup: bool,
    /// `f16` in shaders.
    pub shader_f16: bool,
}

impl Caps {
    fn features(self) -> wgpu::Features {
        let mut f = wgpu::Features::empty();
        if self.timestamp_query {
            f |= wgpu::Features::TIMESTAMP_QUERY;
        }
        if self.timestamp_query_inside_passes {
            f |= wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        }
        if self.subgroup {
            f |= wgpu::Features::SUBGROUP;
        }
        if self.shader_f16 {
            f |= wgpu::Features::SHADER_F16;
        }
        f
    }

    fn from_adapter(features: wgpu::Features) -> Self {
        let ts = features.contains(wgpu::Features::TIMESTAMP_QUERY);
        Caps {
            timestamp_query: ts,
            timestamp_query_inside_passes: ts
                && features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
            subgroup: features.contains(wgpu::Features::SUBGROUP),
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
        }
    }

    /// Names of the features that are on, for `wgqat info`.
    pub fn names(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.timestamp_query {
            v.push("TIMESTAMP_QUERY");
        }
        if self.timestamp_query_inside_passes {
            v.push("TIMESTAMP_QUERY_INSIDE_PASSES");
        }
        if self.subgroup {
            v.push("SUBGROUP");
        }
        if self.shader_f16 {
            v.push("SHADER_F16");
        }
        v
    }
}

/// Errors the device reported outside any error scope, and device loss. wgpu's default handler
/// panics; wgqat records them and turns them into [`Error`]s at the next check.
#[derive(Default)]
struct Faults {
    uncaptured: Mutex<Vec<String>>,
    lost: Mutex<Option<String>>,
}

/// Whether a new device specialises its GEMM pipelines: yes unless `WGQAT_SPECIALIZE_GEMMS=0`.
/// Specialised kernels are faster (on lavapipe too: 3×3 convs about 1.5×); shared ones mean
/// fewer pipelines to compile before the first step.
fn specialize_by_default() -> bool {
    std::env::var("WGQAT_SPECIALIZE_GEMMS").map_or(true, |v| v.trim() != "0")
}

/// Whether a new device's GEMMs load and store vec4s where a layer's shape allows: yes unless
/// `WGQAT_VECTOR_LOADS=0` (for ruling them out on a driver; the results are the same bits).
fn vector_loads_by_default() -> bool {
    std::env::var("WGQAT_VECTOR_LOADS").map_or(true, |v| v.trim() != "0")
}

/// Which cooperative-matrix path a device runs quantized convs' forward and grad-weight on
/// (`kernels::conv_coop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoopMode {
    /// The adapter's cooperative matrices (f16 16×16×16 → f32, subgroups of 32).
    Hardware,
    /// The same kernel in plain WGSL (`WGQAT_COOP=emulate`): slow, for testing on any adapter
    /// with f16.
    Emulated,
}

/// An open GPU device with everything needed to run kernels on it.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub caps: Caps,
    kernels: KernelCache,
    pool: BufferPool,
    faults: Arc<Faults>,
    shader_checks: bool,
    specialized_gemms: bool,
    vector_loads: bool,
    coop: Option<CoopMode>,
    /// Whether grad-weight and grad-input run on `coop` too (the forward does whenever `coop`
    /// is set).
    coop_grad_weight: bool,
    coop_grad_input: bool,
}

impl Gpu {
    /// Opens the adapter chosen by `opts` (backend, name), else the highest-performance one.
    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        Self::probe(opts).1
    }

    /// Every adapter found, and the device opened on the chosen one (or why none could be).
    pub fn probe(opts: &GpuOptions) -> (Vec<AdapterSummary>, Result<Gpu>) {
        match adapter::select(opts) {
            Ok((adapter, all)) => (
                all,
                Self::from_adapter(adapter).map(|g| g.with_shader_checks(opts.shader_checks())),
            ),
            Err(e) => {
                let all = list_adapters(opts)
                    .map(|v| {
                        v.iter()
                            .map(|a| AdapterSummary::of(&a.get_info()))
                            .collect()
                    })
                    .unwrap_or_default();
                (all, Err(e))
            }
        }
    }

    /// Opens a device on `adapter` with the adapter's own limits and the optional features it has.
    /// Cooperative matrices (`WGQAT_COOP`, see [`CoopWanted::parse`]: unset uses them where the
    /// adapter has f16 16×16×16 → f32 and subgroups of 32) are first tried on a throwaway device,
    /// since a driver that fails to compile a kernel loses its device: a quantized conv's
    /// forward, grad-weight and grad-input (those wanted) must compile there and match the fp32
    /// kernels; where that fails, the forward and grad-weight are tried without grad-input, then
    /// the forward alone.
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Gpu> {
        let wanted = CoopWanted::parse(&std::env::var("WGQAT_COOP").unwrap_or_default())?;
        let hardware = match wanted {
            CoopWanted::Hardware {
                grad_weight,
                grad_input,
            } if coop_capable(&adapter) => Some((grad_weight, grad_input)),
            _ => None,
        };
        if let Some((grad_weight, grad_input)) = hardware {
            // The newest kernels are dropped first, each try on a throwaway device of its own.
            let mut tries = vec![(grad_weight, grad_input)];
            for t in [(grad_weight, false), (false, false)] {
                if !tries.contains(&t) {
                    tries.push(t);
                }
            }
            for (grad_weight, grad_input) in tries {
                let on = |gpu: Gpu| {
                    gpu.with_coop(Some(CoopMode::Hardware))
                        .with_coop_grad_weight(grad_weight)
                        .with_coop_grad_input(grad_input)
                };
                let tried = Self::open(&adapter, true)
                    .and_then(|probe| crate::kernels::conv_coop::verify(&on(probe)));
                match tried {
                    Ok(()) => return Ok(on(Self::open(&adapter, true)?)),
                    Err(e) if grad_input => {
                        log::warn!("cooperative matrices not used for grad-input: {e}")
                    }
                    Err(e) if grad_weight => {
                        log::warn!("cooperative matrices not used for grad-weight: {e}")
                    }
                    Err(e) => log::warn!("cooperative matrices not used: {e}"),
                }
            }
        }
        let gpu = Self::open(&adapter, false)?;
        let emulate = wanted == CoopWanted::Emulate && gpu.caps.shader_f16;
        Ok(gpu.with_coop(emulate.then_some(CoopMode::Emulated)))
    }

    /// The device on `adapter`, with `EXPERIMENTAL_COOPERATIVE_MATRIX` when `coop`.
    fn open(adapter: &wgpu::Adapter, coop: bool) -> Result<Gpu> {
        let info = adapter.get_info();
        let caps = Caps::from_adapter(adapter.features());
        let limits = adapter.limits();
        let mut features = caps.features();
        let experimental = if coop {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            // SAFETY: only requested after `coop_capable`, and every kernel that uses it is
            // checked against the fp32 kernel on a throwaway device first (`from_adapter`).
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgqat"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice {
            adapter: info.name.clone(),
            message: e.to_string(),
        })?;
        let faults = Arc::new(Faults::default());
        {
            let f = faults.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let msg = one_line(&e.to_string());
                log::error!("uncaptured GPU error: {msg}");
                if let Ok(mut v) = f.uncaptured.lock() {
                    v.push(msg);
                }
            }));
            let f = faults.clone();
            device.set_device_lost_callback(move |reason, msg| {
                if let Ok(mut l) = f.lost.lock() {
                    *l = Some(format!("{reason:?}: {}", one_line(&msg)));
                }
            });
        }
        let pool = BufferPool::new(device.clone(), limits.clone());
        let specialized_gemms = specialize_by_default();
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            caps,
            kernels: KernelCache::default(),
            pool,
            faults,
            shader_checks: false,
            specialized_gemms,
            vector_loads: vector_loads_by_default(),
            coop: None,
            coop_grad_weight: false,
            coop_grad_input: false,
        })
    }

    /// Runs the forward, grad-weight and grad-input of DoReFa-quantized convs on cooperative
    /// matrices (`mode`), or not.
    pub fn with_coop(mut self, mode: Option<CoopMode>) -> Gpu {
        self.coop = mode;
        self.coop_grad_weight = mode.is_some();
        self.coop_grad_input = mode.is_some();
        self
    }

    /// With `on` false, grad-weight stays on the fp32 kernel while the forward runs on
    /// cooperative matrices (a device whose driver fails the grad-weight kernel alone).
    pub fn with_coop_grad_weight(mut self, on: bool) -> Gpu {
        self.coop_grad_weight = on && self.coop.is_some();
        self
    }

    /// The cooperative-matrix path quantized convs' forward takes, if any.
    pub fn coop(&self) -> Option<CoopMode> {
        self.coop
    }

    /// The cooperative-matrix path quantized convs' grad-weight takes, if any.
    pub fn coop_grad_weight(&self) -> Option<CoopMode> {
        self.coop.filter(|_| self.coop_grad_weight)
    }

    /// With `on` false, grad-input stays on the fp32 kernel while the forward runs on
    /// cooperative matrices (a device whose driver fails the grad-input kernel).
    pub fn with_coop_grad_input(mut self, on: bool) -> Gpu {
        self.coop_grad_input = on && self.coop.is_some();
        self
    }

    /// The cooperative-matrix path quantized convs' grad-input takes, if any.
    pub fn coop_grad_input(&self) -> Option<CoopMode> {
        self.coop.filter(|_| self.coop_grad_input)
    }

    /// With `on`, every shader compiles with naga's runtime bounds checks; otherwise those
    /// marked [`Shader::trusted`] compile without. Set before any kernel is compiled.
    pub fn with_shader_checks(mut self, on: bool) -> Gpu {
        self.shader_checks = on;
        self
    }

    /// Whether every shader has runtime bounds checks (see [`Gpu::with_shader_checks`]).
    pub fn shader_checks(&self) -> bool {
        self.shader_checks
    }

    /// With `on`, every conv / matmul GEMM compiles a pipeline specialised to its layer's
    /// geometry (constant index math: faster kernels, one pipeline per layer and direction);
    /// otherwise pipelines read the geometry from uniforms and are shared across layers. Both
    /// give the same bits. Set before any kernel is compiled.
    pub fn with_specialized_gemms(mut self, on: bool) -> Gpu {
        self.specialized_gemms = on;
        self
    }

    /// Whether GEMM pipelines are specialised to each layer (see [`Gpu::with_specialized_gemms`]).
    pub fn specialized_gemms(&self) -> bool {
        self.specialized_gemms
    }

    /// With `on`, the conv / matmul GEMMs read four tile elements, and write four outputs, as
    /// one vec4 where the layer's shape aligns them (conv2d.wgsl's `VEC_A`, `VEC_B` and
    /// `VEC_OUT`); otherwise element by element. Both give the same bits. Set before any kernel
    /// is compiled.
    pub fn with_vector_loads(mut self, on: bool) -> Gpu {
        self.vector_loads = on;
        self
    }

    /// Whether the GEMMs load and store vec4s where they can (see [`Gpu::with_vector_loads`]).
    pub fn vector_loads(&self) -> bool {
        self.vector_loads
    }

    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    pub fn kernels(&self) -> &KernelCache {
        &self.kernels
    }

    /// A short description of the device, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) (vulkan, Cpu)`;
    /// the backend as WGPU_BACKEND spells it.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, {:?})",
            self.info.name,
            self.info.backend.to_str(),
            self.info.device_type
        )
    }

    /// Turns faults recorded since the last check (device loss, errors outside any scope) into an
    /// error that names `context`.
    pub fn check_faults(&self, context: &str) -> Result<()> {
        if let Some(lost) = self.faults.lost.lock().ok().and_then(|l| l.clone()) {
            return Err(Error::DeviceLost(format!("{lost}, during {context}")));
        }
        let first = self
            .faults
            .uncaptured
            .lock()
            .ok()
            .and_then(|mut v| (!v.is_empty()).then(|| v.drain(..).next().unwrap_or_default()));
        match first {
            Some(message) => Err(Error::Validation {
                context: context.to_string(),
                message,
            }),
            None => Ok(()),
        }
    }

    /// Runs `f` inside validation and out-of-memory error scopes and turns what they catch into an
    /// [`Error`] that names `context`. wgpu-core reports these when the call is made, so popping
    /// the scopes does not wait for the GPU.
    pub fn scoped<T>(&self, context: impl FnOnce() -> String, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let val_err = pollster::block_on(val.pop());
        let oom_err = pollster::block_on(oom.pop());
        if let Some(e) = oom_err {
            let _ = e;
            return Err(Error::OutOfMemory { context: context() });
        }
        if let Some(e) = val_err {
            return Err(Error::Validation {
                context: context(),
                message: one_line(&e.to_string()),
            });
        }
        Ok(out)
    }
}

/// What `WGQAT_COOP` asks of quantized convs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoopWanted {
    /// The fp32 kernels only.
    Off,
    /// The plain-WGSL emulation of the cooperative-matrix kernels (slow; for testing).
    Emulate,
    /// The adapter's cooperative matrices where it has them, for the forward and for the
    /// backward kernels named.
    Hardware { grad_weight: bool, grad_input: bool },
}

impl CoopWanted {
    /// `""`, `1` or `all`: forward, grad-weight and grad-input; `0` or `none`: none; `emulate`;
    /// or a comma-separated list of `forward`, `grad-weight` and `grad-input` that names the
    /// forward (the backward kernels run only beside it), such as `forward,grad-weight`.
    pub fn parse(value: &str) -> Result<CoopWanted> {
        let all = CoopWanted::Hardware {
            grad_weight: true,
            grad_input: true,
        };
        match value.trim() {
            "" | "1" | "all" => return Ok(all),
            "0" | "none" => return Ok(CoopWanted::Off),
            "emulate" => return Ok(CoopWanted::Emulate),
            _ => {}
        }
        let names: Vec<&str> = value.split(',').map(str::trim).collect();
        let bad = || {
            Error::Invalid(format!(
                "WGQAT_COOP={value}: expected 0, 1, emulate, or a comma-separated list of forward, \
                 grad-weight and grad-input that names forward (e.g. forward,grad-weight)"
            ))
        };
        if !names.contains(&"forward")
            || names
                .iter()
                .any(|n| !["forward", "grad-weight", "grad-input"].contains(n))
        {
            return Err(bad());
        }
        Ok(CoopWanted::Hardware {
            grad_weight: names.contains(&"grad-weight"),
            grad_input: names.contains(&"grad-input"),
        })
    }
}

/// Whether `adapter` can run `shaders/conv_coop.wgsl`: cooperative matrices with f16 16×16×16
/// → f32, f16 and subgroups in shaders, subgroups of exactly 32 invocations, and the 28 KiB of
/// workgroup memory the packed forward's tiles take (32 KiB asked: WebGPU's minimum is 16).
fn coop_capable(adapter: &wgpu::Adapter) -> bool {
    let f = adapter.features();
    let info = adapter.get_info();
    let needed = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
        | wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP;
    f.contains(needed)
        && info.subgroup_min_size == 32
        && info.subgroup_max_size == 32
        && adapter.limits().max_compute_workgroup_storage_size >= 32 << 10
        && adapter.cooperative_matrix_properties().iter().any(|p| {
            (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
}

/// wgpu's messages span several lines (cause chains); wgqat's errors are one line.
pub(crate) fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Splits `workgroups` over x and y so that neither exceeds the per-dimension limit. Kernels
/// recover the linear workgroup index as `wid.x + wid.y * nwg.x` and skip indices past the end.
pub fn grid_1d(workgroups: u32, max_per_dim: u32) -> [u32; 3] {
    let workgroups = workgroups.max(1);
    if workgroups <= max_per_dim {
        [workgroups, 1, 1]
    } else {
        let y = workgroups.div_ceil(max_per_dim);
        [workgroups.div_ceil(y), y, 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_every_workgroup_within_limits() {
        for n in [1u32, 7, 65535, 65536, 200_000, 5_000_000] {
            let [x, y, z] = grid_1d(n, 65535);
            assert!(x <= 65535 && y <= 65535 && z == 1);
            assert!(x as u64 * y as u64 >= n as u64, "{n}: {x}x{y}");
        }
    }

    #[test]
    fn wgqat_coop_names_the_kernels_that_run_on_cooperative_matrices() {
        let hw = |grad_weight, grad_input| CoopWanted::Hardware {
            grad_weight,
            grad_input,
        };
        for (value, want) in [
            ("", hw(true, true)),
            ("1", hw(true, true)),
            ("all", hw(true, true)),
            ("0", CoopWanted::Off),
            ("none", CoopWanted::Off),
            ("emulate", CoopWanted::Emulate),
            ("forward", hw(false, false)),
            ("forward,grad-weight", hw(true, false)),
            ("grad-input, forward", hw(false, true)),
            ("forward,grad-weight,grad-input", hw(true, true)),
        ] {
            assert_eq!(CoopWanted::parse(value).unwrap(), want, "{value:?}");
        }
        for bad in [
            "grad-weight",
            "forward,backward",
            "yes",
            "forward,,grad-input",
        ] {
            let e = CoopWanted::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("WGQAT_COOP={bad}")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn one_line_joins_cause_chains() {
        assert_eq!(one_line("a\n  caused by\n\n b "), "a | caused by | b");
    }
}
