//! Shared by the integration tests: one device per test binary, and a runner for the selftest
//! cases of a kernel.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;
use wgqat::gpu::{Gpu, GpuOptions};
use wgqat::nn::checkpoint::Named;
use wgqat::nn::{Network, init};
use wgqat::quant::QuantConfig;
use wgqat::rng::Rng;
use wgqat::selftest;

/// Every f32 tensor of `net`'s state dict (parameters and running statistics), by name.
pub fn f32_state(gpu: &Gpu, net: &Network) -> Vec<(String, Vec<f32>)> {
    net.state_dict(gpu)
        .unwrap()
        .into_iter()
        .filter_map(|t| match t.data {
            wgqat::nn::checkpoint::Data::F32(v) => Some((t.name, v)),
            _ => None,
        })
        .collect()
}

/// The device all tests of a binary share (tests run on threads; wgpu devices are thread-safe).
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(&GpuOptions::default())
            .unwrap_or_else(|e| panic!("tests need a GPU adapter (lavapipe is enough): {e}"))
    })
}

/// A second device, so that a test can run cases on two at once: lavapipe compiles one pipeline
/// at a time per device, and a cold run of a kernel's cases is mostly compiling.
fn second_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(&GpuOptions::default())
            .unwrap_or_else(|e| panic!("tests need a GPU adapter (lavapipe is enough): {e}"))
    })
}

/// Runs `cases` on two devices side by side (each takes the next case not yet taken); the
/// outcomes in case order.
pub fn run_on_two_devices(cases: &[selftest::Case]) -> Vec<selftest::Outcome> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new((0..cases.len()).map(|_| None).collect::<Vec<_>>());
    std::thread::scope(|s| {
        for device in [gpu(), second_gpu()] {
            let (next, outcomes) = (&next, &outcomes);
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    let out = case.run(device);
                    outcomes.lock().unwrap()[i] = Some(out);
                }
            });
        }
    });
    outcomes
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|o| o.expect("every case ran"))
        .collect()
}

/// Runs every selftest case of `kernel` and fails with all failures described.
pub fn run_kernel_cases(kernel: &str) {
    let cases = selftest::cases_for(kernel);
    assert!(!cases.is_empty(), "no selftest cases for {kernel}");
    let mut failures = Vec::new();
    for out in run_on_two_devices(&cases) {
        println!("{} ({:.2}s)", out.describe(), out.seconds);
        if !out.passed() {
            failures.push(out.describe());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A fixture written by `tools/make_fixtures.py`: tensors by name and per-case JSON arguments.
pub struct Fixture {
    pub tensors: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: std::collections::HashMap<String, String>,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                assert_eq!(v.dtype(), safetensors::Dtype::F32, "{k}");
                (
                    k,
                    (v.shape().to_vec(), bytemuck::pod_collect_to_vec(v.data())),
                )
            })
            .collect();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        Fixture {
            tensors,
            meta: meta.metadata().clone().unwrap_or_default(),
        }
    }

    /// Case ids, in order.
    pub fn cases(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .meta
            .keys()
            .filter(|k| k.parse::<usize>().is_ok())
            .cloned()
            .collect();
        ids.sort_by_key(|k| k.parse::<usize>().unwrap());
        ids
    }

    pub fn args(&self, case: &str) -> serde_json::Value {
        serde_json::from_str(&self.meta[case]).unwrap()
    }

    pub fn get(&self, case: &str, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.tensors
            .get(&format!("{case}/{name}"))
            .unwrap_or_else(|| panic!("fixture has no {case}/{name}"))
    }

    pub fn f64s(&self, case: &str, name: &str) -> Vec<f64> {
        self.get(case, name).1.iter().map(|&v| v as f64).collect()
    }

    pub fn upload(&self, gpu: &Gpu, case: &str, name: &str) -> wgqat::Tensor {
        let (shape, data) = self.get(case, name);
        gpu.upload_f32(name, shape, data).unwrap()
    }
}

/// A network of `model` with random weights and random BatchNorm statistics and affine
/// parameters (so that folding BN is exercised, not the identity of a fresh init).
pub fn random_network(
    gpu: &Gpu,
    model: &str,
    quant: QuantConfig,
    capacity: usize,
    seed: u64,
) -> Network {
    let spec = wgqat::models::load(model).unwrap();
    let mut net = Network::new(gpu, &spec, quant, capacity, false, 1).unwrap();
    init::initialise(gpu, &net, seed).unwrap();
    let mut rng = Rng::new(seed);
    let state = net.state_dict(gpu).unwrap();
    // BatchNorms are the layers with running statistics.
    let bns: Vec<String> = state
        .iter()
        .filter_map(|t| t.name.strip_suffix(".running_mean").map(str::to_owned))
        .collect();
    let state: Vec<Named> = state
        .into_iter()
        .map(|t| {
            let n = t.shape.iter().product::<usize>().max(1);
            let (layer, what) = t.name.rsplit_once('.').unwrap();
            let bn = bns.iter().any(|b| b == layer);
            let (lo, hi) = match what {
                "running_mean" => (-0.5, 0.5),
                "running_var" => (0.3, 2.0),
                "weight" if bn => (0.5, 1.5),
                "bias" if bn => (-0.3, 0.6),
                // Conv and Linear biases (zero at init): low-bit outputs without them tie
                // exactly, where a prediction would be decided by rounding.
                "bias" => (-0.1, 0.1),
                _ => return t,
            };
            Named::f32(t.name.clone(), &t.shape, rng.vec_uniform(n, lo, hi))
        })
        .collect();
    net.load_named(gpu, Path::new("random state"), state)
        .unwrap();
    net
}

/// Images 0..n of the synthetic test set (seed 1) as lossless 32x32 PNGs `img{i}.png` in `dir`.
pub fn synthetic_pngs(dir: &Path, n: usize) -> Vec<std::path::PathBuf> {
    let test = wgqat::data::synthetic::generate(1, 2, n);
    (0..n)
        .map(|i| {
            let px = &test.images[i * 3072..(i + 1) * 3072];
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                image::Rgb([0, 1, 2].map(|c| px[c * 1024 + (y * 32 + x) as usize]))
            });
            let p = dir.join(format!("img{i}.png"));
            img.save(&p).unwrap();
            p
        })
        .collect()
}
