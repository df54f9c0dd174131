//! micronet's initialisation: Xavier-uniform conv weights (gain 1) with zero bias, Linear weights
//! N(0, 0.01) with zero bias, BatchNorm γ = 1 and β = 0 (running stats are set by the network).
//! Drawn from wgqat's seeded generator, so a seed gives the same model on every machine.

use super::network::Network;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::LayerSpec;
use crate::rng::Rng;

/// PyTorch's fan-in and fan-out of a weight tensor: dims 1 and 0 times the receptive field.
fn fans(shape: &[usize]) -> (usize, usize) {
    let receptive: usize = shape[2..].iter().product();
    (shape[1] * receptive, shape[0] * receptive)
}

/// Initial values of every parameter, in the arena's order.
pub fn initial_values(net: &Network, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::derive(seed, 0x1417);
    let linear: Vec<String> = net
        .graph
        .nodes
        .iter()
        .filter(|n| matches!(n.layer, LayerSpec::Linear { .. }))
        .map(|n| format!("{}.weight", n.name))
        .collect();
    let bn_gamma: Vec<String> = net
        .batchnorm_names()
        .iter()
        .map(|n| format!("{n}.weight"))
        .collect();
    net.params
        .entries()
        .iter()
        .map(|e| {
            let n = e.numel();
            // A BatchNorm's γ, or a folded conv's (IAO bn_fuse), starts at 1; β at 0.
            if bn_gamma.contains(&e.name) || e.name.ends_with(".gamma") {
                vec![1.0; n]
            } else if e.name.ends_with(".beta") || e.name.ends_with(".bias") {
                vec![0.0; n]
            } else if linear.contains(&e.name) {
                (0..n).map(|_| (0.01 * rng.normal()) as f32).collect()
            } else {
                let (fan_in, fan_out) = fans(&e.shape);
                let a = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                (0..n).map(|_| rng.uniform(-a, a)).collect()
            }
        })
        .collect()
}

/// Writes the initial parameters for `seed` to the GPU.
pub fn initialise(gpu: &Gpu, net: &Network, seed: u64) -> Result<()> {
    gpu.write(
        &net.param_arena,
        &net.params.pack(&initial_values(net, seed)),
    )
}
