//! Integer inference and export: the exported integer model predicts exactly as the fake-quant
//! float network (`wgqat eval`), the file sizes, the ONNX structure, `wgqat infer` on images, and
//! bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use wgqat::gpu::Gpu;
use wgqat::infer::{IntEngine, IntModel, argmax};
use wgqat::nn::checkpoint::Named;
use wgqat::nn::{Mode, Network, init};
use wgqat::quant::Bits;
use wgqat::quant::QuantConfig;
use wgqat::rng::Rng;

fn wgqat(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wgqat"))
        .args(args)
        .output()
        .expect("run wgqat")
}

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgqat-infer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .to_string_lossy()
        .into_owned()
}

/// Asserts failure with wgqat's one-line error containing every `needle`, and no panic.
fn fails_with(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let line = err
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    for n in needles {
        assert!(line.contains(n), "{n:?} not in {line:?}");
    }
}

/// Logits of the fake-quant float network in eval mode (what `wgqat eval` computes).
fn fake_quant_logits(gpu: &Gpu, net: &Network, x: &[f32], batch: usize) -> Vec<f32> {
    let plan = net.plan(gpu, batch, Mode::Eval).unwrap();
    net.write_batch(gpu, &plan, x, &vec![0; batch]).unwrap();
    net.write_step(gpu, &Default::default()).unwrap();
    let per = net.output().unwrap().numel() / net.capacity();
    let out = net.output().unwrap().view(0, &[batch * per]).unwrap();
    gpu.run_and_read::<f32>("fake-quant eval", plan.ops.ops(), &[&out])
        .unwrap()
        .remove(0)
}

/// Integer predictions equal the fake-quant network's for every image, for synthetic test images
/// and random inputs, at several bit widths, with a float and a quantized first layer. Logits
/// agree closely: integer accumulation is exact; the float side sums levels in f32 and applies
/// BatchNorm unfolded, so its rounding differs by a few ulp, and where a value lands within
/// that of a code boundary the next layer's code differs by one. In tiny_nin that moves a few
/// logits by up to ~2e-4 (median ~3e-8); in nin_gc, nine quantized layers up to 1024 channels
/// wide, such flips happen in every image and logits move by ~1e-4 (median), ~1e-3 (max).
/// Two small heads check the output order where the integer engine's channels-last layout
/// meets PyTorch's (C, H, W) flatten: an output that keeps a spatial extent (24 = 6x2x2
/// values), and a Linear fed by a flattened 12x4x4 map. Residual networks add float branches and
/// requantize the sum: small ones agree to ~1e-7. A random resnet18 is sensitive to rounding
/// itself: identity shortcuts carry every flipped code on unquantized through 16 layers, so at
/// W4A4 PyTorch's own fp32 eval differs from its fp64 eval by up to 0.39 in logits of magnitude
/// 11, the integer engine by 0.25 and wgqat's fake-quant by 0.28 (measured with
/// tools/torch_reference.py's model, 2026-12-02); with conv1 to conv3_x only, the engine
/// agrees with fp64 to 1e-7 where both fp32 paths are 0.03 off. There predictions must agree
/// and logits within 3% of the largest.
#[test]
fn integer_predictions_equal_fake_quant_predictions() {
    let gpu = common::gpu();
    let tiny = repo("examples/models/tiny_nin.json");
    let spatial = repo("tests/fixtures/spatial_heads.json");
    let linear = repo("tests/fixtures/flatten_linear.json");
    let resnet = repo("examples/models/tiny_resnet.json");
    let identity = repo("tests/fixtures/resnet_identity_blocks.json");
    // (model, batch, weight bits, activation bits, quantized first layer)
    let configs = [
        (tiny.as_str(), 64, 8, 8, false),
        (tiny.as_str(), 64, 4, 4, false),
        (tiny.as_str(), 64, 2, 3, false),
        (tiny.as_str(), 64, 8, 8, true),
        (tiny.as_str(), 64, 5, 6, true),
        (spatial.as_str(), 16, 8, 8, false),
        (linear.as_str(), 16, 4, 4, false),
        ("nin_gc", 3, 8, 8, false),
        (identity.as_str(), 32, 8, 8, false),
        (resnet.as_str(), 64, 8, 8, false),
        (resnet.as_str(), 64, 4, 4, false),
        (resnet.as_str(), 32, 2, 2, true),
        ("resnet18", 2, 8, 8, false),
    ];
    for (model, batch, w, a, first) in configs {
        let test = wgqat::data::synthetic::generate(1, 2, batch);
        let idx: Vec<usize> = (0..batch).collect();
        let (synthetic, _) =
            wgqat::data::batch(&test, &idx, wgqat::data::Augment::NONE, &mut Rng::new(0));
        let random = Rng::new(9).vec_uniform(batch * 3 * 32 * 32, -2.5, 2.5);
        let quant = QuantConfig {
            w_bits: Bits::new(w).unwrap(),
            a_bits: Bits::new(a).unwrap(),
            quantize_first_layer: first,
            ..QuantConfig::default()
        };
        let net = common::random_network(gpu, model, quant, batch, 3 + w as u64);
        let name = &net.spec.name;
        let int_model =
            IntModel::from_folded(&wgqat::infer::fold::fold(gpu, &net).unwrap()).unwrap();
        let engine = IntEngine::new(gpu, int_model, batch).unwrap();
        for (what, x) in [("synthetic", &synthetic), ("random", &random)] {
            let got = engine.run(gpu, x).unwrap();
            let want = fake_quant_logits(gpu, &net, x, batch);
            let (mut same, mut max_abs, mut max_rel, mut diffs) = (0, 0f32, 0f32, Vec::new());
            let classes = want.len() / batch;
            assert_eq!(got.len(), want.len(), "{name}: output sizes differ");
            for (g, f) in got.chunks(classes).zip(want.chunks(classes)) {
                same += usize::from(argmax(g) == argmax(f));
                for (p, q) in g.iter().zip(f) {
                    max_abs = max_abs.max((p - q).abs());
                    max_rel = max_rel.max((p - q).abs() / q.abs().max(1e-3));
                    diffs.push((p - q).abs());
                }
            }
            diffs.sort_by(f32::total_cmp);
            let median = diffs[diffs.len() / 2];
            let first = if first { "quantized" } else { "float" };
            println!(
                "{name} W{w}A{a}, first layer {first}, {what} inputs: {same}/{batch} predictions equal; logits max abs diff {max_abs:.3e}, max rel {max_rel:.3e}, median abs {median:.3e}"
            );
            assert_eq!(
                same, batch,
                "{name} W{w}A{a} {what}: integer and fake-quant predictions differ"
            );
            let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (max_bound, median_bound) = match name.as_str() {
                "resnet18" => (0.03 * largest, 0.03 * largest),
                "nin_gc" => (1e-2, 1e-3),
                _ => (1e-2, 1e-5),
            };
            assert!(
                max_abs <= max_bound && median <= median_bound,
                "{name} W{w}A{a} {what}: logits differ by {max_abs} (median {median})"
            );
        }
    }
}

/// Train a few epochs, export, then `wgqat infer --predictions` and `wgqat eval --predictions`
/// write identical files, for a NIN and a ResNet (a CIFAR-format folder written by `wgqat data synthetic`).
#[test]
fn infer_and_eval_write_identical_predictions_after_training() {
    for model in ["tiny_nin", "tiny_resnet"] {
        infer_equals_eval_after_training(model);
    }
}

fn infer_equals_eval_after_training(model: &str) {
    let d = tmp(&format!("e2e-{model}"));
    let model = repo(&format!("examples/models/{model}.json"));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let data = d.join("data");
    ok(&wgqat(&[
        "data",
        "synthetic",
        "--out",
        &s(&data),
        "--train",
        "256",
        "--test",
        "200",
        "--seed",
        "4",
    ]));
    let run = d.join("run");
    ok(&wgqat(&[
        "train",
        "--model",
        &model,
        "--data",
        &s(&data),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--out",
        &s(&run),
        "--plain",
    ]));
    let ckpt = run.join("last.safetensors");
    let int = d.join("model.int.safetensors");
    let o = wgqat(&[
        "export",
        "--checkpoint",
        &s(&ckpt),
        "--model",
        &model,
        "--out",
        &s(&int),
    ]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("of the float checkpoint"));
    let (pe, pi) = (d.join("eval.txt"), d.join("infer.txt"));
    let eval = ok(&wgqat(&[
        "eval",
        "--checkpoint",
        &s(&ckpt),
        "--model",
        &model,
        "--data",
        &s(&data),
        "--predictions",
        &s(&pe),
    ]));
    let infer = ok(&wgqat(&[
        "infer",
        "--model",
        &s(&int),
        "--data",
        &s(&data),
        "--predictions",
        &s(&pi),
        "--batch-size",
        "48",
    ]));
    let (a, b) = (
        std::fs::read_to_string(&pe).unwrap(),
        std::fs::read_to_string(&pi).unwrap(),
    );
    assert_eq!(a.lines().count(), 200);
    assert_eq!(a, b, "predictions differ");
    let classes: std::collections::BTreeSet<&str> = a.lines().collect();
    assert!(
        classes.len() >= 3,
        "a trained model predicts more than {classes:?}"
    );
    // The same accuracy printed by both.
    let acc = |t: &str| {
        t.split("accuracy ")
            .nth(1)
            .map(|r| r.split('%').next().unwrap().to_string())
    };
    println!("{eval}{infer}");
    assert_eq!(acc(&eval), acc(&infer));
    let _ = std::fs::remove_dir_all(&d);
}

/// Export sizes for the real nin_gc: 8-bit weights take about a quarter of the float checkpoint,
/// fewer bits less. Above the quarter: the float first layer (14,592 f32, ~2.5% of the
/// checkpoint) and a scale and bias per channel (~1.5%) stay f32.
#[test]
fn exported_nin_gc_is_about_a_quarter_of_the_float_checkpoint() {
    let gpu = common::gpu();
    let d = tmp("size");
    let mut sizes = Vec::new();
    for bits in [8u32, 4, 2] {
        let quant = QuantConfig {
            w_bits: Bits::new(bits).unwrap(),
            a_bits: Bits::new(8).unwrap(),
            quantize_first_layer: false,
            ..QuantConfig::default()
        };
        let spec = wgqat::models::load("nin_gc").unwrap();
        let net = Network::new(gpu, &spec, quant, 1, false, 1).unwrap();
        init::initialise(gpu, &net, 1).unwrap();
        let ckpt = d.join("float.safetensors");
        net.save(gpu, &ckpt, Default::default()).unwrap();
        let out = d.join(format!("w{bits}.safetensors"));
        IntModel::from_folded(&wgqat::infer::fold::fold(gpu, &net).unwrap())
            .unwrap()
            .write(&out)
            .unwrap();
        let ratio = std::fs::metadata(&out).unwrap().len() as f64
            / std::fs::metadata(&ckpt).unwrap().len() as f64;
        println!(
            "nin_gc W{bits}A8: integer model {:.1}% of the float checkpoint",
            100.0 * ratio
        );
        sizes.push(ratio);
    }
    assert!(sizes[0] > 0.25 && sizes[0] < 0.30, "8-bit: {}", sizes[0]);
    assert!(sizes[1] < 0.18, "4-bit: {}", sizes[1]);
    assert!(
        sizes[2] < sizes[1] && sizes[2] < 0.12,
        "2-bit: {}",
        sizes[2]
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A minimal protobuf reader: the fields of one message as (field number, value).
#[derive(Debug, Clone)]
enum Field {
    Int(u64),
    Bytes(Vec<u8>),
}

fn fields(mut b: &[u8]) -> Vec<(u32, Field)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..).step_by(7) {
            let byte = b[0];
            *b = &b[1..];
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        match key & 7 {
            0 => out.push(((key >> 3) as u32, Field::Int(varint(&mut b)))),
            2 => {
                let n = varint(&mut b) as usize;
                out.push(((key >> 3) as u32, Field::Bytes(b[..n].to_vec())));
                b = &b[n..];
            }
            5 => {
                out.push(((key >> 3) as u32, Field::Bytes(b[..4].to_vec())));
                b = &b[4..];
            }
            w => panic!("unexpected wire type {w}"),
        }
    }
    out
}

fn get(f: &[(u32, Field)], n: u32) -> Vec<&Field> {
    f.iter().filter(|(k, _)| *k == n).map(|(_, v)| v).collect()
}

fn text(f: &Field) -> String {
    match f {
        Field::Bytes(b) => String::from_utf8(b.clone()).unwrap(),
        Field::Int(_) => panic!("not a string"),
    }
}

fn sub(f: &Field) -> Vec<(u32, Field)> {
    match f {
        Field::Bytes(b) => fields(b),
        Field::Int(_) => panic!("not a message"),
    }
}

fn int(f: &Field) -> i64 {
    match f {
        Field::Int(v) => *v as i64,
        Field::Bytes(_) => panic!("not an int"),
    }
}

/// The ONNX file's structure: IR and opset versions, the input and output, one Conv per conv
/// layer and a Gemm per Linear, an activation quantizer (Floor) per quantized layer, BN folded
/// (no BatchNormalization), and quantized weights that are exactly the DoReFa levels of the
/// integer model's codes. (onnxruntime itself runs it in `tools/check_onnx.py`.)
#[test]
fn onnx_export_has_the_expected_graph_and_exact_levels() {
    let gpu = common::gpu();
    let model = repo("examples/models/tiny_nin.json");
    let quant = QuantConfig {
        w_bits: Bits::new(4).unwrap(),
        a_bits: Bits::new(8).unwrap(),
        quantize_first_layer: false,
        ..QuantConfig::default()
    };
    let net = common::random_network(gpu, &model, quant, 1, 11);
    let folded = wgqat::infer::fold::fold(gpu, &net).unwrap();
    let bytes = wgqat::infer::onnx::export(&folded).unwrap();
    let m = fields(&bytes);
    assert_eq!(int(get(&m, 1)[0]), 8, "ir_version");
    let opset = sub(get(&m, 8)[0]);
    assert_eq!(int(get(&opset, 2)[0]), 17);
    let graph = sub(get(&m, 7)[0]);
    let nodes: Vec<_> = get(&graph, 1).into_iter().map(sub).collect();
    let ops: Vec<String> = nodes.iter().map(|n| text(get(n, 4)[0])).collect();
    let count = |op: &str| ops.iter().filter(|o| *o == op).count();
    // tiny_nin: 4 convs (the first float) and one shuffle (Reshape, Transpose, Reshape).
    assert_eq!(count("Conv"), 4, "{ops:?}");
    assert_eq!(
        count("Floor"),
        3,
        "one activation quantizer per quantized conv: {ops:?}"
    );
    assert_eq!(count("Transpose"), 1);
    assert_eq!(count("BatchNormalization"), 0);
    assert_eq!(
        (count("MaxPool"), count("AveragePool"), count("Flatten")),
        (1, 1, 1)
    );
    // Every node input is the graph input, an initializer or an earlier node's output.
    let inits: Vec<_> = get(&graph, 5).into_iter().map(sub).collect();
    let mut known: Vec<String> = inits.iter().map(|t| text(get(t, 8)[0])).collect();
    known.push("input".into());
    for n in &nodes {
        for i in get(n, 1) {
            assert!(
                known.contains(&text(i)),
                "{} reads undefined {}",
                text(get(n, 4)[0]),
                text(i)
            );
        }
        known.push(text(get(n, 2)[0]));
    }
    assert!(known.contains(&"logits".to_string()));
    let io = |field: u32| -> (String, Vec<String>) {
        let v = sub(get(&graph, field)[0]);
        let ty = sub(get(&sub(get(&v, 2)[0]), 1)[0]);
        let dims = get(&sub(get(&ty, 2)[0]), 1)
            .into_iter()
            .map(|d| {
                let d = sub(d);
                match get(&d, 1).first() {
                    Some(v) => int(v).to_string(),
                    None => text(get(&d, 2)[0]),
                }
            })
            .collect();
        (text(get(&v, 1)[0]), dims)
    };
    assert_eq!(
        io(11),
        (
            "input".to_string(),
            vec!["batch".into(), "3".into(), "32".into(), "32".into()]
        )
    );
    assert_eq!(
        io(12),
        ("logits".to_string(), vec!["batch".into(), "10".into()])
    );
    // Quantized weights: exactly 2 fl32(k fl32(1/15)) - 1 of the integer model's codes.
    let int_model = IntModel::from_folded(&folded).unwrap();
    let inv = Bits::new(4).unwrap().inv_levels();
    let mut checked = 0;
    for t in &inits {
        let name = text(get(t, 8)[0]);
        let layer = name.rsplit_once(".weight_").map(|(l, _)| l.to_string());
        let Some(layer) = layer else { continue };
        let dims: Vec<usize> = get(t, 1).into_iter().map(|d| int(d) as usize).collect();
        let raw = match get(t, 9)[0] {
            Field::Bytes(b) => b.clone(),
            _ => unreachable!(),
        };
        let levels: Vec<f32> = raw
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(levels.len(), dims.iter().product::<usize>());
        if layer == "model.0.conv" {
            continue; // the float first layer
        }
        // The integer model stores codes channels-last: compare as sorted multisets per layer.
        let codes = int_model.weight_codes(&layer, levels.len(), 4).unwrap();
        let mut from_codes: Vec<u32> = codes
            .iter()
            .map(|&k| (2.0 * (k as f32 * inv) - 1.0).to_bits())
            .collect();
        let mut from_onnx: Vec<u32> = levels.iter().map(|v| v.to_bits()).collect();
        from_codes.sort_unstable();
        from_onnx.sort_unstable();
        assert_eq!(
            from_codes, from_onnx,
            "{layer}: ONNX weights are not the integer model's levels"
        );
        checked += 1;
    }
    assert_eq!(checked, 3);
}

/// A ResNet's ONNX graph: each residual add an `Add` of its body and its shortcut followed by a
/// `Relu`, every node reading only what exists before it, and one activation quantizer per
/// tensor that quantized convs read (a block's body and its 1x1 shortcut share one). tiny_resnet
/// has six quantized layers reading five tensors.
#[test]
fn onnx_export_of_a_resnet_adds_its_branches() {
    let gpu = common::gpu();
    let model = repo("examples/models/tiny_resnet.json");
    let net = common::random_network(gpu, &model, QuantConfig::default(), 1, 12);
    let bytes = wgqat::infer::onnx::export(&wgqat::infer::fold::fold(gpu, &net).unwrap()).unwrap();
    let m = fields(&bytes);
    let graph = sub(get(&m, 7)[0]);
    let nodes: Vec<_> = get(&graph, 1).into_iter().map(sub).collect();
    let op = |n: &[(u32, Field)]| text(get(n, 4)[0]);
    let inputs = |n: &[(u32, Field)]| get(n, 1).into_iter().map(text).collect::<Vec<_>>();
    let ops: Vec<String> = nodes.iter().map(|n| op(n)).collect();
    let count = |o: &str| ops.iter().filter(|x| *x == o).count();
    assert_eq!(count("Conv"), 6, "{ops:?}");
    assert_eq!(count("Gemm"), 1);
    assert_eq!(
        count("Floor"),
        5,
        "one quantizer per quantized tensor: {ops:?}"
    );
    let inits: Vec<String> = get(&graph, 5)
        .into_iter()
        .map(|t| text(get(&sub(t), 8)[0]))
        .collect();
    // Residual adds: both operands are node outputs (the quantizers' and BN's adds take a
    // constant), each followed by a ReLU.
    let mut written: Vec<String> = vec!["input".into()];
    let mut residual = 0;
    for (k, n) in nodes.iter().enumerate() {
        let ins = inputs(n);
        for i in &ins {
            assert!(
                written.contains(i) || inits.contains(i),
                "{} reads undefined {i}",
                op(n)
            );
        }
        if op(n) == "Add" && ins.iter().all(|i| !inits.contains(i)) {
            residual += 1;
            assert_eq!(op(&nodes[k + 1]), "Relu", "a block's ReLU follows its add");
        }
        written.push(text(get(n, 2)[0]));
    }
    assert_eq!(residual, 2, "{ops:?}");
}

/// `wgqat infer IMAGE...`: a lossless PNG of a test image gives the engine's own logits for it
/// (so its top class), a larger JPEG is resized, and `--top-k` and `--json` shape the output.
#[test]
fn infer_classifies_png_and_jpeg_images() {
    let gpu = common::gpu();
    let d = tmp("images");
    let model = repo("examples/models/tiny_nin.json");
    let quant = QuantConfig::default();
    let net = common::random_network(gpu, &model, quant, 4, 21);
    let int_model = IntModel::from_folded(&wgqat::infer::fold::fold(gpu, &net).unwrap()).unwrap();
    let path = d.join("m.int.safetensors");
    int_model.write(&path).unwrap();
    let test = wgqat::data::synthetic::generate(1, 2, 3);
    let pngs = common::synthetic_pngs(&d, 3);
    let big = image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 128])
    });
    let jpeg = d.join("big.jpg");
    big.save(&jpeg).unwrap();
    let engine = IntEngine::new(gpu, int_model, 3).unwrap();
    let (x, _) = wgqat::data::batch(
        &test,
        &[0, 1, 2],
        wgqat::data::Augment::NONE,
        &mut Rng::new(0),
    );
    let want: Vec<usize> = engine
        .run(gpu, &x)
        .unwrap()
        .chunks(10)
        .map(argmax)
        .collect();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let out = ok(&wgqat(&[
        "infer",
        "--model",
        &s(&path),
        "--top-k",
        "2",
        "--json",
        &s(&pngs[0]),
        &s(&pngs[1]),
        &s(&pngs[2]),
        &s(&jpeg),
    ]));
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for (i, r) in rows.iter().take(3).enumerate() {
        let top = r["top"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["class"].as_u64().unwrap() as usize, want[i], "{r}");
        assert_eq!(
            top[0]["name"].as_str().unwrap(),
            wgqat::data::CLASS_NAMES[want[i]]
        );
        assert!(top[0]["p"].as_f64().unwrap() >= top[1]["p"].as_f64().unwrap());
    }
    assert_eq!(rows[3]["image"].as_str().unwrap(), s(&jpeg));
    let text = ok(&wgqat(&["infer", "--model", &s(&path), &s(&pngs[0])]));
    assert!(text.contains(wgqat::data::CLASS_NAMES[want[0]]), "{text}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_models_and_images_are_one_line_errors() {
    let gpu = common::gpu();
    let d = tmp("bad");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let model = repo("examples/models/tiny_nin.json");
    let net = common::random_network(gpu, &model, QuantConfig::default(), 1, 5);
    let ckpt = d.join("float.safetensors");
    net.save(gpu, &ckpt, Default::default()).unwrap();
    let int = d.join("m.int.safetensors");
    ok(&wgqat(&[
        "export",
        "--checkpoint",
        &s(&ckpt),
        "--model",
        &model,
        "--out",
        &s(&int),
    ]));
    // A training checkpoint is not an integer model.
    fails_with(
        &wgqat(&["infer", "--model", &s(&ckpt)]),
        &["not an integer model", "wgqat export"],
    );
    // A truncated model file.
    let bytes = std::fs::read(&int).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    fails_with(
        &wgqat(&["infer", "--model", &s(&cut)]),
        &["cut.safetensors"],
    );
    // A missing model, a missing image, a file that is not an image.
    fails_with(
        &wgqat(&["infer", "--model", &s(&d.join("none.safetensors"))]),
        &["none.safetensors"],
    );
    fails_with(
        &wgqat(&["infer", "--model", &s(&int), &s(&d.join("none.png"))]),
        &["none.png"],
    );
    fails_with(
        &wgqat(&["infer", "--model", &s(&int), &s(&ckpt)]),
        &["float.safetensors", "cannot read the image"],
    );
    // A misshapen tensor in an integer model.
    let mut m = IntModel::read(&int).unwrap();
    let t = m.tensors.get_mut("model.4.conv.scale").unwrap();
    *t = Named::f32(t.name.clone(), &[3], vec![1.0; 3]);
    let bad = d.join("bad.safetensors");
    m.write(&bad).unwrap();
    fails_with(
        &wgqat(&["infer", "--model", &s(&bad)]),
        &["model.4.conv.scale"],
    );
    // Export: an unknown format and a checkpoint of another model; nothing written.
    let out = d.join("out.onnx");
    let o = wgqat(&[
        "export",
        "--checkpoint",
        &s(&ckpt),
        "--model",
        &model,
        "--format",
        "tflite",
        "--out",
        &s(&out),
    ]);
    // A closed choice is clap's: it names the bad value and lists the possible ones.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("invalid value 'tflite'") && err.contains("[possible values: int, onnx]"),
        "{err}"
    );
    fails_with(
        &wgqat(&[
            "export",
            "--checkpoint",
            &s(&ckpt),
            "--model",
            "nin",
            "--out",
            &s(&out),
        ]),
        &["float.safetensors"],
    );
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// `wgqat bench --infer` reports integer and fake-quant throughput for each scheme's integer
/// form (DoReFa, IAO with and without BN folding, wbwtab's XNOR) and batch size.
#[test]
fn bench_infer_reports_both_paths() {
    let out = ok(&wgqat(&[
        "bench",
        "--infer",
        "--model",
        &repo("tests/fixtures/ci_nin.json"),
        "--scheme",
        "dorefa,iao,wbwtab",
        "--bn-fuse",
        "--batch",
        "1,3",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v["inference"].as_array().unwrap();
    let quants: Vec<&str> = rows.iter().map(|r| r["quant"].as_str().unwrap()).collect();
    assert_eq!(
        quants,
        [
            "W8A8",
            "W8A8",
            "IAO W8A8",
            "IAO W8A8",
            "IAO-BN W8A8",
            "IAO-BN W8A8",
            "wbwtab W1A1",
            "wbwtab W1A1"
        ],
        "the default bits 8,32 give one quantized row per scheme and batch"
    );
    for r in rows {
        assert!(r["error"].is_null(), "{r}");
        assert!(
            r["int_img_per_s"].as_f64().unwrap() > 0.0
                && r["fake_quant_img_per_s"].as_f64().unwrap() > 0.0
        );
    }
}

/// An IAO model exports to ONNX in the QDQ form: a QuantizeLinear → DequantizeLinear pair per
/// activation quantizer (each conv's input and each pool's), int8 weight codes dequantized per
/// output channel (axis 0) with int8 zero points, BatchNorms as BatchNormalization, and every
/// node reading only what exists. (onnxruntime runs it in `tools/check_onnx.py`: for trained
/// tiny_nin, tiny_nin with `--bn-fuse` and an asymmetric per-layer tiny_resnet, 500 of 500
/// predictions equal to `wgqat eval`'s.)
#[test]
fn onnx_qdq_export_of_an_iao_model() {
    let gpu = common::gpu();
    let model = repo("examples/models/tiny_nin.json");
    let quant = QuantConfig::iao(
        Bits::new(8).unwrap(),
        Bits::new(8).unwrap(),
        Default::default(),
    );
    let net = common::random_network(gpu, &model, quant, 2, 13);
    let bytes = wgqat::infer::qdq::export(gpu, &net).unwrap();
    let graph = sub(get(&fields(&bytes), 7)[0]);
    let nodes: Vec<_> = get(&graph, 1).into_iter().map(sub).collect();
    let ops: Vec<String> = nodes.iter().map(|n| text(get(n, 4)[0])).collect();
    let count = |op: &str| ops.iter().filter(|o| *o == op).count();
    // tiny_nin: 4 convs and 2 pools, every one with an input quantizer; 4 weights.
    assert_eq!(count("QuantizeLinear"), 6, "{ops:?}");
    assert_eq!(count("DequantizeLinear"), 10, "{ops:?}");
    assert_eq!(count("Conv"), 4);
    assert_eq!(count("BatchNormalization"), 4);
    let inits: Vec<_> = get(&graph, 5).into_iter().map(sub).collect();
    let dtype = |suffix: &str| -> Vec<i64> {
        inits
            .iter()
            .filter(|t| text(get(t, 8)[0]).contains(suffix))
            .map(|t| int(get(t, 2)[0]))
            .collect()
    };
    // Symmetric: int8 (3) codes and zero points throughout.
    assert!(dtype("weight_codes").iter().all(|&d| d == 3));
    assert!(dtype("zero_point").iter().all(|&d| d == 3));
    // Per-channel weights: DequantizeLinear with axis 0.
    let axis = nodes
        .iter()
        .filter(|n| text(get(n, 4)[0]) == "DequantizeLinear")
        .filter(|n| {
            get(n, 5)
                .into_iter()
                .map(sub)
                .any(|a| text(get(&a, 1)[0]) == "axis")
        })
        .count();
    assert_eq!(axis, 4);
    let mut known: Vec<String> = inits.iter().map(|t| text(get(t, 8)[0])).collect();
    known.push("input".into());
    for n in &nodes {
        for i in get(n, 1) {
            assert!(known.contains(&text(i)), "reads undefined {}", text(i));
        }
        known.push(text(get(n, 2)[0]));
    }
    assert!(known.contains(&"logits".to_string()));
}

/// IAO's integer model (`wgqat export` of an IAO checkpoint, `src/infer/iao.rs`) against the
/// fake-quantized network it came from, NIN and ResNet (QuantAdd): random weights and
/// BatchNorms, observers and folded statistics calibrated by training-mode forward passes, then
/// synthetic and random inputs. Every prediction equal, logits close: integer sums are exact; the
/// conv bias is an int32 rounded to accumulator units (spec §5.2), and the epilogue folds the
/// scales and the BatchNorm in one multiply-add where fake quantization rounds several steps,
/// so a value that near a code boundary may take the other code (measured: logits up to 3.8e-3
/// in tiny_nin, 6.2e-3 in NIN-GC, medians ≤ 1e-3). IAO rounds half away from zero in both.
#[test]
fn iao_integer_predictions_equal_fake_quant_predictions() {
    use wgqat::quant::{IaoOptions, Observer, QLevel, QType};
    let gpu = common::gpu();
    let tiny = repo("examples/models/tiny_nin.json");
    let sym = IaoOptions::default();
    let asym_layer = IaoOptions {
        q_type: QType::Asymmetric,
        q_level: QLevel::Layer,
        weight_observer: Observer::MovingAverage,
        ..IaoOptions::default()
    };
    let fused = IaoOptions {
        bn_fuse: true,
        ..IaoOptions::default()
    };
    let fused_asym = IaoOptions {
        q_type: QType::Asymmetric,
        bn_fuse: true,
        ..IaoOptions::default()
    };
    let resnet = repo("examples/models/tiny_resnet.json");
    for (model, batch, options) in [
        (tiny.as_str(), 32, sym),
        (tiny.as_str(), 32, asym_layer),
        (tiny.as_str(), 32, fused),
        (tiny.as_str(), 32, fused_asym),
        ("nin_gc", 2, sym),
        (resnet.as_str(), 32, sym),
        (resnet.as_str(), 32, asym_layer),
        (resnet.as_str(), 32, fused),
        ("resnet18", 2, sym),
    ] {
        let b8 = Bits::new(8).unwrap();
        let spec = wgqat::models::load(model).unwrap();
        let mut net = Network::new(
            gpu,
            &spec,
            QuantConfig::iao(b8, b8, options),
            batch,
            true,
            1,
        )
        .unwrap();
        init::initialise(gpu, &net, 7).unwrap();
        // Random BatchNorm affine parameters (folded ones too) and conv biases, so that folding
        // them is exercised rather than the identity of a fresh init.
        let mut rng = Rng::new(11);
        let state: Vec<wgqat::nn::checkpoint::Named> = net
            .state_dict(gpu)
            .unwrap()
            .into_iter()
            .map(|t| {
                let n = t.shape.iter().product::<usize>().max(1);
                let (lo, hi) = match t.name.rsplit_once('.').unwrap().1 {
                    "gamma" => (0.5, 1.5),
                    "beta" => (-0.3, 0.6),
                    "weight" if t.name.contains(".bn.") => (0.5, 1.5),
                    "bias" if t.name.contains(".bn.") => (-0.3, 0.6),
                    "bias" => (-0.1, 0.1),
                    _ => return t,
                };
                wgqat::nn::checkpoint::Named::f32(
                    t.name.clone(),
                    &t.shape,
                    rng.vec_uniform(n, lo, hi),
                )
            })
            .collect();
        net.load_named(gpu, Path::new("random state"), state)
            .unwrap();
        net.ensure_metric_slots(gpu, 1).unwrap();
        let test = wgqat::data::synthetic::generate(1, 2, batch);
        let idx: Vec<usize> = (0..batch).collect();
        let (synthetic, _) =
            wgqat::data::batch(&test, &idx, wgqat::data::Augment::NONE, &mut Rng::new(0));
        let random = Rng::new(9).vec_uniform(batch * 3 * 32 * 32, -2.5, 2.5);
        // Calibrate: observers, scales and (bn_fuse) running statistics from a few batches.
        let plan = net.plan(gpu, batch, Mode::Calibrate).unwrap();
        for x in [&synthetic, &random, &synthetic] {
            net.write_batch(gpu, &plan, x, &vec![0; batch]).unwrap();
            net.write_step(gpu, &Default::default()).unwrap();
            plan.ops.submit(gpu, "calibration").unwrap();
        }
        let int_model = wgqat::infer::iao::int_model(gpu, &net).unwrap();
        let engine = IntEngine::new(gpu, int_model, batch).unwrap();
        for (what, x) in [("synthetic", &synthetic), ("random", &random)] {
            let got = engine.run(gpu, x).unwrap();
            let want = fake_quant_logits(gpu, &net, x, batch);
            let classes = want.len() / batch;
            let same = got
                .chunks(classes)
                .zip(want.chunks(classes))
                .filter(|(g, f)| argmax(g) == argmax(f))
                .count();
            let mut diffs: Vec<f32> = got.iter().zip(&want).map(|(p, q)| (p - q).abs()).collect();
            diffs.sort_by(f32::total_cmp);
            let (max_abs, median) = (diffs[diffs.len() - 1], diffs[diffs.len() / 2]);
            let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut classes_seen: Vec<usize> = want.chunks(classes).map(argmax).collect();
            classes_seen.sort_unstable();
            classes_seen.dedup();
            println!(
                "{model} IAO {options:?}, {what}: {same}/{batch} predictions equal ({} classes predicted, largest |logit| {largest:.3}); logits max abs diff {max_abs:.3e}, median {median:.3e}",
                classes_seen.len()
            );
            // Not a degenerate net: logits of some size (small ResNets with micronet's N(0, 0.01)
            // Linear init predict one class at first).
            assert!(largest > 1e-2, "{model}: degenerate logits");
            assert_eq!(
                same, batch,
                "{model} {options:?} {what}: predictions differ"
            );
            assert!(
                max_abs <= 2e-2 && median <= 5e-3,
                "{model} {options:?} {what}: logits differ by {max_abs} (median {median})"
            );
        }
    }
}

/// wbwtab's integer model (bits and XNOR convs between a float first and last layer) predicts as
/// the fake-quant network, for binary and ternary weights with binary activations and for float
/// activations, with random BatchNorm parameters (some γ negative, so that folding a BatchNorm
/// into the sign must flip it, and some 0) and conv biases. Logits agree to float rounding: the XNOR conv's
/// dot is exact, so a binary activation differs only where z lands within an ulp of 0.
#[test]
fn wbwtab_integer_predictions_equal_fake_quant_predictions() {
    use wgqat::quant::{Activations, Scheme, WbwtabOptions, Weights};
    let gpu = common::gpu();
    let spec = wgqat::models::load(&repo("examples/models/tiny_nin.json")).unwrap();
    let batch = 16;
    for (weights, activations) in [
        (Weights::Binary, Activations::Binary),
        (Weights::Ternary, Activations::Binary),
        (Weights::Float, Activations::Binary),
        (Weights::Ternary, Activations::Float),
    ] {
        let quant = QuantConfig {
            scheme: Scheme::Wbwtab(WbwtabOptions {
                weights,
                activations,
            }),
            ..QuantConfig::default()
        };
        let mut net = Network::new(gpu, &spec, quant, batch, false, 1).unwrap();
        init::initialise(gpu, &net, 5).unwrap();
        let mut rng = Rng::new(13);
        let state: Vec<Named> = net
            .state_dict(gpu)
            .unwrap()
            .into_iter()
            .map(|t| {
                let n = t.shape.iter().product::<usize>().max(1);
                let v = match t.name.rsplit_once('.').unwrap().1 {
                    // γ of either sign, and some 0 (the output is β: its sign, whatever the
                    // conv computes).
                    "weight" if t.name.contains(".bn.") => (0..n)
                        .map(|_| {
                            let (g, r) = (rng.uniform(0.5, 1.5), rng.uniform(0.0, 1.0));
                            if r < 0.1 {
                                0.0
                            } else if r < 0.35 {
                                -g
                            } else {
                                g
                            }
                        })
                        .collect(),
                    "bias" if t.name.contains(".bn.") => rng.vec_uniform(n, -0.3, 0.3),
                    "running_mean" => rng.vec_uniform(n, -0.5, 0.5),
                    "running_var" => rng.vec_uniform(n, 0.5, 2.0),
                    "bias" => rng.vec_uniform(n, -0.1, 0.1),
                    _ => return t,
                };
                Named::f32(t.name.clone(), &t.shape, v)
            })
            .collect();
        net.load_named(gpu, Path::new("random state"), state)
            .unwrap();
        let int_model = wgqat::infer::xnor::int_model(gpu, &net).unwrap();
        let xnor_convs = int_model
            .manifest
            .ops
            .iter()
            .filter(|n| matches!(n.op, wgqat::infer::model::IntOp::XnorConv { .. }))
            .count();
        let want_xnor = match (weights, activations) {
            (Weights::Float, _) | (_, Activations::Float) => 0,
            _ => 2,
        };
        assert_eq!(xnor_convs, want_xnor, "{weights:?} {activations:?}");
        let engine = IntEngine::new(gpu, int_model, batch).unwrap();
        let test = wgqat::data::synthetic::generate(1, 2, batch);
        let idx: Vec<usize> = (0..batch).collect();
        let (synthetic, _) =
            wgqat::data::batch(&test, &idx, wgqat::data::Augment::NONE, &mut Rng::new(0));
        let random = Rng::new(9).vec_uniform(batch * 3 * 32 * 32, -2.5, 2.5);
        for (what, x) in [("synthetic", &synthetic), ("random", &random)] {
            let got = engine.run(gpu, x).unwrap();
            let want = fake_quant_logits(gpu, &net, x, batch);
            let classes = want.len() / batch;
            let same = got
                .chunks(classes)
                .zip(want.chunks(classes))
                .filter(|(g, f)| argmax(g) == argmax(f))
                .count();
            let max_abs = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            println!(
                "tiny_nin wbwtab {weights:?}/{activations:?}, {what}: {same}/{batch} predictions equal; logits max abs diff {max_abs:.3e} (largest |logit| {largest:.3})"
            );
            assert!(largest > 1e-2, "degenerate logits");
            assert_eq!(same, batch, "{weights:?} {activations:?} {what}");
            assert!(
                max_abs <= 1e-5 * largest.max(1.0),
                "{weights:?} {activations:?} {what}: logits differ by {max_abs}"
            );
        }
    }
}

/// wbwtab's binary layers in the integer model file take at most 1/16 of their float bytes in
/// the checkpoint (conv weight and bias, and the BatchNorm folded into them) in NIN-GC (1/22.5:
/// a bit per weight, and a float scale and bias per output channel, which weigh in its grouped
/// 1×1 convs); ternary layers, two bits a weight, at most 1/8 (1/13.4).
#[test]
fn wbwtab_binary_layers_take_at_most_a_sixteenth_of_their_float_size() {
    use wgqat::nn::checkpoint::Data;
    use wgqat::quant::{Scheme, WbwtabOptions, Weights};
    let gpu = common::gpu();
    let spec = wgqat::models::load("nin_gc").unwrap();
    for weights in [Weights::Binary, Weights::Ternary] {
        let quant = QuantConfig {
            scheme: Scheme::Wbwtab(WbwtabOptions {
                weights,
                ..Default::default()
            }),
            ..QuantConfig::default()
        };
        let net = Network::new(gpu, &spec, quant, 1, false, 1).unwrap();
        init::initialise(gpu, &net, 3).unwrap();
        let model = wgqat::infer::int_model(gpu, &net).unwrap();
        let bytes = |t: &Named| match &t.data {
            Data::F32(v) => 4 * v.len(),
            Data::U8(v) => v.len(),
            _ => 0,
        };
        let state = net.state_dict(gpu).unwrap();
        let (mut int_bytes, mut float_bytes, mut layers) = (0, 0, 0);
        for n in &model.manifest.ops {
            let wgqat::infer::model::IntOp::XnorConv { name, .. } = &n.op else {
                continue;
            };
            layers += 1;
            let block = name.strip_suffix(".conv").unwrap();
            int_bytes += model
                .tensors
                .iter()
                .filter(|(k, _)| k.starts_with(&format!("{name}.")))
                .map(|(_, t)| bytes(t))
                .sum::<usize>();
            float_bytes += state
                .iter()
                .filter(|t| t.name.starts_with(&format!("{block}.")))
                .map(bytes)
                .sum::<usize>();
        }
        let ratio = int_bytes as f64 / float_bytes as f64;
        println!(
            "nin_gc wbwtab {weights:?}: {layers} XNOR layers, {int_bytes} bytes of {float_bytes} float ({ratio:.4}, 1/{:.1})",
            1.0 / ratio
        );
        assert_eq!(layers, 7, "nin_gc has 7 binary convs");
        let most = if weights == Weights::Binary {
            16.0
        } else {
            8.0
        };
        assert!(ratio <= 1.0 / most, "{weights:?}: {ratio} > 1/{most}");
    }
}
