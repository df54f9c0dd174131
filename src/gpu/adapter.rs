//! Adapter choice: by backend, by name substring, else the highest-performance one.

use crate::error::{Error, Result};

/// How to choose the adapter. Unset fields fall back to the environment (`WGPU_BACKEND`,
/// `WGPU_ADAPTER_NAME`), then to the default ranking.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// `vulkan`, `metal`, `dx12` or `gl` (a comma list is accepted).
    pub backend: Option<String>,
    /// Case-insensitive substring of the adapter name.
    pub adapter: Option<String>,
    /// Compile every shader with naga's runtime bounds checks, also the ones trusted to index in
    /// bounds (for finding an out-of-bounds access; `WGQAT_SHADER_CHECKS=1` does the same).
    pub shader_checks: bool,
}

impl GpuOptions {
    /// The backends asked for, or `None` for the default (native APIs first, GL as fallback).
    fn backends(&self) -> Result<Option<wgpu::Backends>> {
        match &self.backend {
            Some(b) => parse_backends(b).map(Some),
            None => match std::env::var("WGPU_BACKEND") {
                Ok(b) if !b.trim().is_empty() => parse_backends(&b).map(Some),
                _ => Ok(None),
            },
        }
    }

    /// Whether every shader is compiled with runtime checks (option or environment).
    pub fn shader_checks(&self) -> bool {
        self.shader_checks
            || std::env::var("WGQAT_SHADER_CHECKS").is_ok_and(|v| !matches!(v.trim(), "" | "0"))
    }

    fn name_filter(&self) -> Option<String> {
        self.adapter
            .clone()
            .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
            .filter(|s| !s.trim().is_empty())
    }
}

/// Parses `vulkan|metal|dx12|gl` (or a comma list of them).
pub fn parse_backends(s: &str) -> Result<wgpu::Backends> {
    let mut out = wgpu::Backends::empty();
    for name in s.split(',').map(|p| p.trim().to_ascii_lowercase()) {
        out |= match name.as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            _ => return Err(Error::UnknownBackend(name)),
        };
    }
    Ok(out)
}

/// What `wgqat info` prints about one adapter.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub vendor: u32,
    pub device: u32,
}

impl AdapterSummary {
    pub fn of(info: &wgpu::AdapterInfo) -> Self {
        AdapterSummary {
            name: info.name.clone(),
            // As WGPU_BACKEND and --backend spell it: vulkan, metal, dx12, gl.
            backend: info.backend.to_str().to_string(),
            device_type: format!("{:?}", info.device_type),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            vendor: info.vendor,
            device: info.device,
        }
    }
}

/// Gives the process a private runtime directory when `XDG_RUNTIME_DIR` is unset or not a
/// directory. On a headless Linux machine Mesa's Vulkan driver probes for a Wayland display while
/// the instance is made, and libwayland then prints `error: XDG_RUNTIME_DIR is invalid or not
/// set in the environment.` (twice), which reads as a failure though nothing failed. With a
/// usable directory (empty: there is no display in it) the probe fails quietly. Elsewhere, or
/// with the variable already usable, this does nothing.
///
/// # Safety
/// It sets an environment variable: call it before the process starts other threads (first
/// thing in `main`), as [`std::env::set_var`] requires.
pub unsafe fn ensure_runtime_dir() {
    #[cfg(all(unix, not(target_os = "macos")))]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let usable = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .is_some_and(|d| std::path::Path::new(&d).is_dir());
        if usable {
            return;
        }
        // SAFETY: getuid(2) has no preconditions.
        let uid = unsafe { libc::getuid() };
        let dir = std::env::temp_dir().join(format!("wgqat-runtime-{uid}"));
        let _ = std::fs::create_dir(&dir);
        // Only a directory of our own, closed to others, as the XDG spec asks of it.
        let ours = std::fs::metadata(&dir).is_ok_and(|m| m.is_dir() && m.uid() == uid)
            && std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).is_ok();
        if ours {
            // SAFETY: the caller promises no other thread is running.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    desc.flags = wgpu::InstanceFlags::default().with_env();
    wgpu::Instance::new(desc)
}

/// Lower is better: the order wgpu's high-performance preference uses, with GL (no compute on
/// many drivers, small limits) after every native API.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let backend = u8::from(info.backend == wgpu::Backend::Gl);
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    (backend, kind)
}

fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut all = pollster::block_on(instance(backends).enumerate_adapters(backends));
    all.sort_by_key(|a| rank(&a.get_info()));
    all
}

/// Every adapter the chosen backends find, best first. By default only the native APIs
/// (Vulkan, Metal, DX12) are probed; GL only when none of them has an adapter, since starting GL
/// is slow and noisy on machines without a display.
pub fn list_adapters(opts: &GpuOptions) -> Result<Vec<wgpu::Adapter>> {
    Ok(match opts.backends()? {
        Some(b) => enumerate(b),
        None => {
            let native = enumerate(wgpu::Backends::PRIMARY);
            if native.is_empty() {
                enumerate(wgpu::Backends::SECONDARY)
            } else {
                native
            }
        }
    })
}

/// The chosen adapter and the summaries of all that were found.
pub(crate) fn select(opts: &GpuOptions) -> Result<(wgpu::Adapter, Vec<AdapterSummary>)> {
    let all = list_adapters(opts)?;
    let summaries: Vec<AdapterSummary> = all
        .iter()
        .map(|a| AdapterSummary::of(&a.get_info()))
        .collect();
    let chosen = match opts.name_filter() {
        Some(wanted) => {
            let w = wanted.to_lowercase();
            all.into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&w))
                .ok_or_else(|| {
                    if summaries.is_empty() {
                        no_adapter(opts)
                    } else {
                        Error::AdapterNotFound {
                            wanted,
                            available: summaries
                                .iter()
                                .map(|s| format!("{:?} ({})", s.name, s.backend))
                                .collect::<Vec<_>>()
                                .join(", "),
                        }
                    }
                })?
        }
        None => all.into_iter().next().ok_or_else(|| no_adapter(opts))?,
    };
    Ok((chosen, summaries))
}

fn no_adapter(opts: &GpuOptions) -> Error {
    match &opts.backend {
        Some(b) => Error::NoAdapter {
            detail: format!(" for backend {b:?}"),
            fix: "choose another `backend`, or none to try them all".into(),
        },
        None => Error::NoAdapter {
            detail: String::new(),
            fix: "install a Vulkan driver (on a headless Linux machine: \
                  apt-get install -y mesa-vulkan-drivers libvulkan1)"
                .into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_and_reject_unknown_names() {
        assert_eq!(parse_backends("vulkan").unwrap(), wgpu::Backends::VULKAN);
        assert_eq!(
            parse_backends("Metal, dx12").unwrap(),
            wgpu::Backends::METAL | wgpu::Backends::DX12
        );
        let e = parse_backends("cuda").unwrap_err().to_string();
        assert!(
            e.contains("cuda") && e.contains("vulkan, metal, dx12, gl"),
            "{e}"
        );
    }
}
