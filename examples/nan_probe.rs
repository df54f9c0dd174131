use wgqat::DType;
use wgqat::gpu::{Gpu, GpuOptions};
fn main() -> anyhow::Result<()> {
    let gpu = Gpu::new(&GpuOptions::default())?;
    let x = gpu.upload_f32("x", &[4], &[f32::NAN, 1.0, -1.0, f32::INFINITY])?;
    let y = gpu.empty("y", &[4], DType::F32)?;
    let flags = gpu.zeros("f", &[2], DType::U32)?;
    let ops = vec![
        wgqat::gpu::Op::Dispatch(wgqat::kernels::elementwise::relu_forward(&gpu, &x, &y)?),
        wgqat::gpu::Op::Dispatch(wgqat::kernels::reduce::nonfinite_check(
            &gpu, &x, &flags, 0,
        )?),
    ];
    let out: Vec<Vec<f32>> = gpu.run_and_read("probe", &ops, &[&y])?;
    println!(
        "relu([nan, 1, -1, inf]) = {:?}; flag = {:?}",
        out[0],
        gpu.read_u32(&flags)?
    );
    let b8 = wgqat::kernels::quant::Bits::new(8)?;
    let op = wgqat::kernels::quant::act_forward(&gpu, b8, &x, &y)?;
    let out: Vec<Vec<f32>> = gpu.run_and_read("probe", &[op], &[&y])?;
    println!("act_quant = {:?}", out[0]);
    Ok(())
}
