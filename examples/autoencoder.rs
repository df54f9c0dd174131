//! A quantized convolutional autoencoder trained with MSE on synthetic images: conv2d encoder,
//! conv_transpose2d decoder, W8A8 DoReFa fake quantization on every layer but the first. Uses the
//! lower-level API (network, plan, optimizer) that `wgqat train` is built on.
//!
//!     cargo run --release --example autoencoder -- [steps]

use wgqat::data::{self, Augment};
use wgqat::gpu::{Gpu, GpuOptions};
use wgqat::kernels::optim::OptimizerKind;
use wgqat::models::{LayerSpec, LossKind, ModelSpec, Pair};
use wgqat::nn::{Mode, Network, init};
use wgqat::quant::QuantConfig;
use wgqat::train::Optimizer;

fn conv(out: usize, stride: usize, name: &str) -> LayerSpec {
    LayerSpec::Conv {
        out,
        kernel: Pair(3, 3),
        stride: Pair(stride, stride),
        padding: Pair(1, 1),
        dilation: Pair(1, 1),
        groups: 1,
        bias: true,
        name: Some(name.into()),
    }
}

fn up(out: usize, name: &str) -> LayerSpec {
    LayerSpec::ConvTranspose {
        out,
        kernel: Pair(3, 3),
        stride: Pair(2, 2),
        padding: Pair(1, 1),
        output_padding: Pair(1, 1),
        dilation: Pair(1, 1),
        groups: 1,
        bias: true,
        name: Some(name.into()),
    }
}

fn bn(name: &str) -> LayerSpec {
    LayerSpec::BatchNorm {
        eps: 1e-5,
        momentum: 0.1,
        name: Some(name.into()),
    }
}

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::args().nth(1).map_or(Ok(150), |s| s.parse())?;
    let spec = ModelSpec {
        name: "autoencoder".into(),
        input: [3, 32, 32],
        layers: vec![
            conv(16, 2, "enc.0"),
            bn("enc.0.bn"),
            LayerSpec::Relu, // 16 x 16 x 16
            conv(32, 2, "enc.1"),
            bn("enc.1.bn"),
            LayerSpec::Relu, // 32 x 8 x 8
            up(16, "dec.0"),
            bn("dec.0.bn"),
            LayerSpec::Relu, // 16 x 16 x 16
            up(3, "dec.1"),  // 3 x 32 x 32
        ],
        loss: LossKind::Mse,
    };
    let gpu = Gpu::new(&GpuOptions::default())?;
    let batch = 32;
    let net = Network::new(&gpu, &spec, QuantConfig::default(), batch, true, 1)?;
    init::initialise(&gpu, &net, 1)?;
    println!(
        "{} parameters, quantized layers: {:?}",
        spec.param_count()?,
        net.quantized_layers()
    );

    // One recorded step: forward, MSE against the input, backward, Adam.
    let mut opt = Optimizer::new(
        &gpu,
        &net,
        OptimizerKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let mut plan = net.plan(&gpu, batch, Mode::Train)?;
    plan.ops.push_op(opt.op(&gpu, &net)?);

    let images = data::synthetic::generate(7, 1, 2_048);
    let mut rng = wgqat::rng::Rng::new(1);
    for step in 0..steps {
        let idx: Vec<usize> = (0..batch)
            .map(|_| rng.below(images.len() as u64) as usize)
            .collect();
        let (x, labels) = data::batch(&images, &idx, Augment::NONE, &mut rng);
        net.write_batch(&gpu, &plan, &x, &labels)?;
        net.write_step(&gpu, &opt.next_values(3e-3, 0))?;
        plan.ops.submit(&gpu, "autoencoder step")?;
        opt.t += 1;
        if step % 25 == 0 || step + 1 == steps {
            // A readback waits for the GPU: only every few steps.
            let (mse, _) = net.read_metrics(&gpu, 1)?[0];
            println!("step {step:4}: reconstruction MSE {mse:.4}");
        }
    }
    Ok(())
}
