use wgqat::gpu::{Gpu, GpuOptions};
use wgqat::nn::{Mode, Network, init};
use wgqat::quant::QuantConfig;
fn main() -> anyhow::Result<()> {
    let gpu = Gpu::new(&GpuOptions::default())?;
    let spec = wgqat::models::load(
        &std::env::args()
            .nth(1)
            .unwrap_or("examples/models/tiny_nin.json".into()),
    )?;
    let b: usize = std::env::args().nth(2).map_or(50, |s| s.parse().unwrap());
    let net = Network::new(&gpu, &spec, QuantConfig::default(), b, true, 4)?;
    init::initialise(&gpu, &net, 1)?;
    let plan = net.plan(&gpu, b, Mode::Train)?;
    net.write_step(&gpu, &Default::default())?;
    gpu.submit_timed("warm", plan.ops.ops())?;
    let t = gpu.submit_timed("timed", plan.ops.ops())?;
    let mut agg: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    for x in &t {
        let k = x.label.split_whitespace().next().unwrap().to_string();
        let e = agg.entry(k).or_default();
        e.0 += x.seconds;
        e.1 += 1;
    }
    let total: f64 = t.iter().map(|x| x.seconds).sum();
    let mut v: Vec<_> = agg.into_iter().collect();
    v.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    for (k, (s, n)) in v {
        println!("{k:28} {n:3} {:8.2} ms {:5.1}%", s * 1e3, 100.0 * s / total);
    }
    println!("total {:.1} ms, {} ops", total * 1e3, t.len());
    let t0 = std::time::Instant::now();
    for _ in 0..3 {
        plan.ops.submit(&gpu, "s")?;
    }
    gpu.wait()?;
    println!(
        "wall per step {:.1} ms",
        t0.elapsed().as_secs_f64() / 3.0 * 1e3
    );
    Ok(())
}
