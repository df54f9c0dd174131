//! Compiled kernels: each WGSL entry point is compiled once per specialisation (its override
//! constants) and kept in a cache; a [`Launch`](super::Launch) binds one to tensors.
//!
//! Binding a kernel needs only its bind group layout, so its pipeline, the driver's slow part
//! (tens to hundreds of milliseconds each), compiles on a pool of worker threads while the rest
//! of a step is recorded: the pipelines of a first step compile in parallel, and the first
//! submit waits for the ones it uses.

use super::Gpu;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

/// A WGSL source file embedded in the binary.
#[derive(Debug)]
pub struct Shader {
    /// The file name under `shaders/`, e.g. `conv2d.wgsl`.
    pub name: &'static str,
    pub source: &'static str,
    /// Every index its entry points form is in bounds by construction (guarded by sizes the
    /// host checks against the tensors, or a workgroup array indexed below its length), so it
    /// compiles without naga's runtime checks (index clamping, loop bounding) unless the device
    /// asks for them (`Gpu::with_shader_checks`). `tests/shader_checks.rs` runs the kernel suite
    /// both ways and requires identical bits.
    pub trusted: bool,
}

/// How a kernel uses each of its bindings, in binding order (all in group 0). Binding numbers are
/// unique within a shader file (its entry points use different subsets), so a kernel marks the
/// numbers its entry point does not use as [`Bind::None`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    /// Not used by this entry point: no layout entry, no tensor.
    None,
    /// A uniform block of parameters.
    Uniform,
    /// A read-only storage buffer.
    Read,
    /// A read-only storage buffer that the shader reads as `vec4`s: bound with its length rounded
    /// up to 16 bytes (pooled buffers have the room: their sizes are multiples of 256), so a
    /// tensor of any length can be bound.
    ReadVec4,
    /// A read-write storage buffer.
    ReadWrite,
    /// A read-write storage buffer that the shader writes as `vec4`s, bound rounded up to 16
    /// bytes as `ReadVec4` is (the shader must not write past the tensor's length; the next
    /// tensor starts 256-byte aligned, so the rounding never reaches it).
    ReadWriteVec4,
}

impl Bind {
    /// Whether a tensor is bound here (every kind but `None` and `Uniform`).
    pub fn is_storage(&self) -> bool {
        !matches!(self, Bind::None | Bind::Uniform)
    }
}

/// What to compile: an entry point of a shader, specialised by override constants.
pub struct KernelSpec<'a> {
    pub shader: &'static Shader,
    pub entry: &'a str,
    pub constants: &'a [(&'a str, f64)],
    pub bindings: &'a [Bind],
}

impl KernelSpec<'_> {
    fn key(&self) -> String {
        let mut k = format!("{}:{}", self.shader.name, self.entry);
        for (name, v) in self.constants {
            k.push_str(&format!(":{name}={v}"));
        }
        k
    }
}

/// A compute pipeline (compiled on a worker thread; see the module comment) and the layout of
/// its bindings.
pub struct Kernel {
    /// `shader:entry[:CONST=v...]`, used in error messages and timings.
    pub name: String,
    pipeline: OnceLock<std::result::Result<wgpu::ComputePipeline, String>>,
    /// The worker's answer, until [`Kernel::pipeline`] takes it.
    pending: Mutex<Option<mpsc::Receiver<Compiled>>>,
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) bindings: Vec<Bind>,
}

/// A worker's answer: the pipeline, or the one-line validation error of compiling it.
type Compiled = std::result::Result<wgpu::ComputePipeline, String>;

impl Kernel {
    /// The pipeline, waiting for its compilation if it is still running.
    pub(crate) fn pipeline(&self) -> Result<&wgpu::ComputePipeline> {
        let compiled = self.pipeline.get_or_init(|| {
            let job = self.pending.lock().ok().and_then(|mut p| p.take());
            match job.map(|rx| rx.recv()) {
                Some(Ok(compiled)) => compiled,
                _ => Err("the thread compiling it stopped".to_string()),
            }
        });
        compiled.as_ref().map_err(|message| Error::Shader {
            name: self.name.clone(),
            message: message.clone(),
        })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Compiled kernels by specialisation, shader modules by file, and the threads compiling
/// pipelines.
#[derive(Default)]
pub struct KernelCache {
    kernels: Mutex<HashMap<String, Arc<Kernel>>>,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    /// Started on first use; the workers end when the cache (with its device) is dropped.
    workers: OnceLock<Mutex<mpsc::Sender<Job>>>,
}

impl KernelCache {
    /// Runs `job` on a worker thread (one per core, at most 8).
    fn spawn(&self, job: Job) {
        let queue = self.workers.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
            for i in 0..n {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("wgqat-compile-{i}"))
                    .spawn(move || {
                        loop {
                            let next = rx.lock().map(|r| r.recv());
                            match next {
                                Ok(Ok(job)) => job(),
                                _ => break,
                            }
                        }
                    });
                // Without a thread the queue still holds the job, and a later worker or the
                // fallback below runs it.
                let _ = spawned;
            }
            Mutex::new(tx)
        });
        let unsent = match queue.lock() {
            Ok(tx) => tx.send(job).err().map(|e| e.0),
            Err(_) => Some(job),
        };
        // No worker to take it: compile here.
        if let Some(job) = unsent {
            job();
        }
    }
}

impl KernelCache {
    /// How many pipelines have been compiled.
    pub fn compiled(&self) -> usize {
        self.kernels.lock().map(|k| k.len()).unwrap_or(0)
    }

    /// The name of every pipeline compiled so far (`shader:entry[:CONST=v...]`), sorted: what
    /// a plan specialises, for checking those specialisations outside wgpu.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .kernels
            .lock()
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Gpu {
    /// The kernel for `spec`, compiling it on first use.
    pub fn kernel(&self, spec: &KernelSpec) -> Result<Arc<Kernel>> {
        let key = spec.key();
        let cache = self.kernels();
        if let Some(k) = cache.kernels.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(k);
        }
        // A layout past the adapter's limit fails deep in wgpu; say what is missing instead.
        let storage = spec.bindings.iter().filter(|b| b.is_storage()).count() as u32;
        if storage > self.limits.max_storage_buffers_per_shader_stage {
            return Err(Error::Shader {
                name: format!("{}:{}", spec.shader.name, spec.entry),
                message: format!(
                    "it binds {storage} storage buffers and this adapter allows {} per shader \
                     stage (max_storage_buffers_per_shader_stage): use another adapter (--adapter)",
                    self.limits.max_storage_buffers_per_shader_stage
                ),
            });
        }
        let module = self.shader_module(spec.shader)?;
        let entries: Vec<wgpu::BindGroupLayoutEntry> = spec
            .bindings
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != Bind::None)
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match b {
                    Bind::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    Bind::Read
                    | Bind::ReadVec4
                    | Bind::ReadWrite
                    | Bind::ReadWriteVec4
                    | Bind::None => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: !matches!(b, Bind::ReadWrite | Bind::ReadWriteVec4),
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        // The layouts here (cheap, and what binding needs); the pipeline on a worker.
        let layouts = || {
            let layout = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(&key),
                    entries: &entries,
                });
            let pl = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(&key),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
            (layout, pl)
        };
        let (layout, pl) = match self.scoped(|| format!("compiling kernel {key}"), layouts) {
            Ok(v) => v,
            Err(Error::Validation { message, .. }) => {
                return Err(Error::Shader { name: key, message });
            }
            Err(e) => return Err(e),
        };
        let (tx, rx) = mpsc::channel();
        let kernel = Arc::new(Kernel {
            name: key.clone(),
            pipeline: OnceLock::new(),
            pending: Mutex::new(Some(rx)),
            layout,
            bindings: spec.bindings.to_vec(),
        });
        let device = self.device.clone();
        let entry = spec.entry.to_string();
        let constants: Vec<(String, f64)> = spec
            .constants
            .iter()
            .map(|(n, v)| (n.to_string(), *v))
            .collect();
        let label = key.clone();
        cache.spawn(Box::new(move || {
            // Error scopes are per thread: this one catches what compiling reports.
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let constants: Vec<(&str, f64)> =
                constants.iter().map(|(n, v)| (n.as_str(), *v)).collect();
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(&entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    // Every kernel writes its workgroup memory before reading it.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
            let compiled = match pollster::block_on(scope.pop()) {
                Some(e) => Err(super::one_line(&e.to_string())),
                None => Ok(pipeline),
            };
            let _ = tx.send(compiled);
        }));
        if let Ok(mut m) = cache.kernels.lock() {
            m.insert(key, kernel.clone());
        }
        Ok(kernel)
    }

    fn shader_module(&self, shader: &'static Shader) -> Result<wgpu::ShaderModule> {
        let cache = self.kernels();
        if let Some(m) = cache
            .modules
            .lock()
            .ok()
            .and_then(|m| m.get(shader.name).cloned())
        {
            return Ok(m);
        }
        let module = self
            .scoped(
                || format!("compiling shader {}", shader.name),
                || {
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(shader.name),
                        source: wgpu::ShaderSource::Wgsl(shader.source.into()),
                    };
                    if shader.trusted && !self.shader_checks() {
                        // SAFETY: a trusted shader indexes in bounds by construction (see
                        // `Shader::trusted`), checked by running the suite with checks on.
                        unsafe {
                            self.device.create_shader_module_trusted(
                                desc,
                                wgpu::ShaderRuntimeChecks::unchecked(),
                            )
                        }
                    } else {
                        self.device.create_shader_module(desc)
                    }
                },
            )
            .map_err(|e| match e {
                Error::Validation { message, .. } => Error::Shader {
                    name: shader.name.to_string(),
                    message,
                },
                e => e,
            })?;
        if let Ok(mut m) = cache.modules.lock() {
            m.insert(shader.name, module.clone());
        }
        Ok(module)
    }
}
