//! Compiled kernels: each WGSL entry point is compiled once per specialisation (its override
//! constants) and kept in a cache; a [`Launch`](super::Launch) binds one to tensors.

use super::Gpu;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
    /// A read-write storage buffer.
    ReadWrite,
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

/// A compiled compute pipeline and the layout of its bindings.
pub struct Kernel {
    /// `shader:entry[:CONST=v...]`, used in error messages and timings.
    pub name: String,
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) bindings: Vec<Bind>,
}

/// Compiled kernels by specialisation, and shader modules by file.
#[derive(Default)]
pub struct KernelCache {
    kernels: Mutex<HashMap<String, Arc<Kernel>>>,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
}

impl KernelCache {
    /// How many pipelines have been compiled.
    pub fn compiled(&self) -> usize {
        self.kernels.lock().map(|k| k.len()).unwrap_or(0)
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
                    Bind::Read | Bind::ReadWrite | Bind::None => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: *b == Bind::Read,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let compile = || {
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
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&key),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some(spec.entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: spec.constants,
                        // Every kernel writes its workgroup memory before reading it.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
            (layout, pipeline)
        };
        let (layout, pipeline) = match self.scoped(|| format!("compiling kernel {key}"), compile) {
            Ok(v) => v,
            Err(Error::Validation { message, .. }) => {
                return Err(Error::Shader { name: key, message });
            }
            Err(e) => return Err(e),
        };
        let kernel = Arc::new(Kernel {
            name: key.clone(),
            pipeline,
            layout,
            bindings: spec.bindings.to_vec(),
        });
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
