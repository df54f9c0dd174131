//! The C API: the committed header is what cbindgen makes of src/capi.rs, and
//! examples/c/classify.c, built with the system C compiler against the cdylib, gives the Rust
//! engine's own logits to the bit and its top classes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use wgqat::infer::{IntEngine, IntModel, argmax, load_image};
use wgqat::quant::QuantConfig;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgqat-capi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn generated_header() -> String {
    let config = cbindgen::Config::from_file(repo("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(repo("src/capi.rs"))
        .generate()
        .expect("cbindgen reads src/capi.rs")
        .write(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn the_committed_header_is_what_the_generator_makes() {
    let want = generated_header();
    let path = repo("include/wgqat.h");
    if std::env::var_os("WGQAT_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "include/wgqat.h is not what cbindgen makes of src/capi.rs: regenerate it with `WGQAT_BLESS=1 cargo test --test capi`"
    );
    for f in [
        "wgqat_model_open",
        "wgqat_engine_create",
        "wgqat_engine_run_rgb8",
        "wgqat_top_k",
        "wgqat_last_error",
        "WGQAT_STATUS_OK",
    ] {
        assert!(want.contains(f), "{f} missing from the header");
    }
}

/// The folder holding the cdylib that `cargo test` built with this test: target/debug/deps,
/// where the test binary is (`cargo build` copies it up to target/debug; `cargo test` does not).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().to_path_buf();
    let lib = dir.join(format!(
        "{}wgqat{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(lib.is_file(), "{} was not built", lib.display());
    dir
}

/// Compiles examples/c/classify.c with the system C compiler (`cc`, or $CC).
fn build_classify(out: &Path) -> PathBuf {
    let exe = out.join("classify");
    let lib = lib_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .arg(repo("examples/c/classify.c"))
        .arg("-std=c99")
        .args(["-Wall", "-Wextra", "-Werror"])
        .arg(format!("-I{}", repo("include").display()))
        .arg(format!("-L{}", lib.display()))
        .arg("-lwgqat")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    assert!(status.success(), "{cc} failed on examples/c/classify.c");
    exe
}

/// The C example, loading the library built with this test: cargo's LD_LIBRARY_PATH for tests
/// also lists target/debug, whose copy may be older, and it outranks the rpath.
fn classify(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    let dir = lib_dir();
    c.env("LD_LIBRARY_PATH", &dir)
        .env("DYLD_LIBRARY_PATH", &dir);
    c
}

/// A tiny_nin integer model with random weights and BatchNorm statistics, three test images as
/// PNGs and a larger JPEG (resized on loading), with the Rust engine's logits for them.
struct Case {
    model_path: PathBuf,
    images: Vec<PathBuf>,
    /// The images normalised, NCHW, as `load_image` makes them.
    x: Vec<f32>,
    want: Vec<f32>,
    names: Vec<String>,
}

fn case(d: &Path) -> Case {
    let gpu = common::gpu();
    let model = repo("examples/models/tiny_nin.json");
    let net = common::random_network(gpu, model.to_str().unwrap(), QuantConfig::default(), 4, 21);
    let int_model = IntModel::from_folded(&wgqat::infer::fold::fold(gpu, &net).unwrap()).unwrap();
    let model_path = d.join("m.int.safetensors");
    int_model.write(&model_path).unwrap();
    let mut images = common::synthetic_pngs(d, 3);
    images.push(d.join("big.jpg"));
    image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 128])
    })
    .save(images.last().unwrap())
    .unwrap();
    let m = &int_model.manifest;
    let mut x = Vec::new();
    for p in &images {
        x.extend(load_image(p, m.input, m.mean, m.std).unwrap());
    }
    let names = m.class_names.clone();
    let engine = IntEngine::new(gpu, int_model, images.len()).unwrap();
    let want = engine.run(gpu, &x).unwrap();
    Case {
        model_path,
        images,
        x,
        want,
        names,
    }
}

fn same_bits(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(a, b)| a.to_bits() == b.to_bits())
}

#[test]
fn the_c_example_gives_the_rust_engines_logits_and_classes() {
    let d = tmp("classify");
    let Case {
        model_path,
        images,
        want,
        names,
        ..
    } = case(&d);
    let exe = build_classify(&d);
    let run = |extra: &[&str]| {
        let out = classify(&exe)
            .args(extra)
            .arg(&model_path)
            .args(&images)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "classify failed: {err}");
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(&["--logits"]);
    let got: Vec<f32> = text
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "{text}");
    let max_abs = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "C API vs Rust engine: {} logits, max abs error {max_abs:e}",
        got.len()
    );
    assert!(
        same_bits(&got, &want),
        "the C example's logits differ from the Rust engine's (max abs error {max_abs:e})"
    );
    // The human form: each image's top class by name.
    let text = run(&[]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), images.len(), "{text}");
    for (i, line) in lines.iter().enumerate() {
        let top = argmax(&want[i * 10..(i + 1) * 10]);
        let first = line.split_once(": ").unwrap().1;
        assert!(first.starts_with(&format!("{} ", names[top])), "{line}");
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn the_c_example_reports_a_bad_model_in_one_line() {
    let d = tmp("bad");
    let bad = d.join("bad.int.safetensors");
    std::fs::write(&bad, b"not a model").unwrap();
    let out = classify(&build_classify(&d))
        .arg(&bad)
        .arg(d.join("x.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: wgqat_model_open: ") && err.contains("bad.int.safetensors"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(d);
}

/// The C entry points called from Rust as a C caller would: NULL arguments and wrong sizes are
/// statuses with messages, never a crash.
#[test]
fn bad_arguments_are_statuses_with_messages() {
    use std::ffi::{CStr, c_char};
    use wgqat::capi::*;
    let last = || {
        // SAFETY: wgqat_last_error returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(wgqat_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    let mut model = std::ptr::null_mut();
    // SAFETY: NULL and valid pointers, as a C caller might pass.
    let s = unsafe { wgqat_model_open(std::ptr::null(), &mut model) };
    assert_eq!(s, WgqatStatus::InvalidArgument);
    assert_eq!(last(), "wgqat_model_open: path is NULL");
    let s = unsafe { wgqat_model_open(c"/no/such/model".as_ptr(), &mut model) };
    assert_eq!(s, WgqatStatus::File, "{}", last());
    assert!(last().contains("/no/such/model"), "{}", last());
    assert!(model.is_null());
    let logits = [1.0f32, 3.0, 2.0];
    let (mut idx, mut p) = ([0usize; 2], [0f32; 2]);
    let s = unsafe { wgqat_top_k(logits.as_ptr(), 3, 2, idx.as_mut_ptr(), p.as_mut_ptr()) };
    assert_eq!(s, WgqatStatus::Ok);
    assert_eq!(last(), "");
    assert_eq!(idx, [1, 2]);
    assert!(p[0] > p[1] && p[0] < 1.0);
    let s = unsafe {
        wgqat_top_k(
            logits.as_ptr(),
            3,
            4,
            idx.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(s, WgqatStatus::InvalidArgument);
    assert!(last().contains("k = 4"), "{}", last());
    let s = unsafe {
        wgqat_engine_run(
            std::ptr::null_mut(),
            logits.as_ptr(),
            1,
            std::ptr::null_mut(),
            0,
        )
    };
    assert_eq!(s, WgqatStatus::InvalidArgument);
    assert_eq!(last(), "wgqat_engine_run: engine is NULL");
    // Freeing NULL is allowed; the accessors of a NULL model answer safely.
    unsafe {
        wgqat_model_free(std::ptr::null_mut());
        wgqat_engine_free(std::ptr::null_mut());
        assert_eq!(wgqat_model_classes(std::ptr::null()), 0);
        assert!(wgqat_model_class_name(std::ptr::null(), 0).is_null());
    }
    let v: *const c_char = wgqat_version();
    assert_eq!(
        unsafe { CStr::from_ptr(v) }.to_str().unwrap(),
        env!("CARGO_PKG_VERSION")
    );
}

/// The engine entry points from Rust, as a C caller would use them: floats, 8-bit RGB and files
/// give the Rust engine's logits to the bit, also when a run is split into several batches
/// (max_batch 2 for 4 images), and wrong sizes are statuses with messages.
#[test]
fn every_run_entry_point_gives_the_rust_engines_logits() {
    use std::ffi::{CStr, CString};
    use wgqat::capi::*;
    let d = tmp("entry");
    let c = case(&d);
    let last = || {
        unsafe { CStr::from_ptr(wgqat_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    let path = CString::new(c.model_path.to_str().unwrap()).unwrap();
    let (mut model, mut engine) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: valid pointers throughout; handles freed at the end.
    unsafe {
        assert_eq!(
            wgqat_model_open(path.as_ptr(), &mut model),
            WgqatStatus::Ok,
            "{}",
            last()
        );
        let (mut ch, mut h, mut w) = (0, 0, 0);
        assert_eq!(
            wgqat_model_input(model, &mut ch, &mut h, &mut w),
            WgqatStatus::Ok
        );
        assert_eq!((ch, h, w), (3, 32, 32));
        assert_eq!(wgqat_model_classes(model), 10);
        let name = CStr::from_ptr(wgqat_model_class_name(model, 3));
        assert_eq!(name.to_str().unwrap(), c.names[3]);
        assert!(wgqat_model_class_name(model, 10).is_null());
        let s = wgqat_engine_create(model, std::ptr::null(), 2, &mut engine);
        assert_eq!(s, WgqatStatus::Ok, "{}", last());
        wgqat_model_free(model);
        let adapter = CStr::from_ptr(wgqat_engine_adapter(engine)).to_string_lossy();
        assert!(adapter.contains('('), "{adapter}");

        let n = c.images.len();
        let mut z = vec![0f32; n * 10];
        let s = wgqat_engine_run(engine, c.x.as_ptr(), n, z.as_mut_ptr(), z.len());
        assert_eq!(s, WgqatStatus::Ok, "{}", last());
        assert!(same_bits(&z, &c.want), "wgqat_engine_run differs");

        let paths: Vec<CString> = c
            .images
            .iter()
            .map(|p| CString::new(p.to_str().unwrap()).unwrap())
            .collect();
        let ptrs: Vec<_> = paths.iter().map(|p| p.as_ptr()).collect();
        z.fill(0.0);
        let s = wgqat_engine_run_files(engine, ptrs.as_ptr(), n, z.as_mut_ptr(), z.len());
        assert_eq!(s, WgqatStatus::Ok, "{}", last());
        assert!(same_bits(&z, &c.want), "wgqat_engine_run_files differs");

        // The three 32x32 PNGs as raw RGB bytes.
        let mut rgb = Vec::new();
        for p in &c.images[..3] {
            rgb.extend(image::open(p).unwrap().to_rgb8().into_raw());
        }
        z.fill(0.0);
        let s = wgqat_engine_run_rgb8(engine, rgb.as_ptr(), 3, 32, 32, z.as_mut_ptr(), z.len());
        assert_eq!(s, WgqatStatus::Ok, "{}", last());
        assert!(
            same_bits(&z[..30], &c.want[..30]),
            "wgqat_engine_run_rgb8 differs"
        );

        let s = wgqat_engine_run_rgb8(engine, rgb.as_ptr(), 1, 16, 16, z.as_mut_ptr(), z.len());
        assert_eq!(s, WgqatStatus::InvalidArgument);
        assert!(
            last().contains("16x16") && last().contains("32x32"),
            "{}",
            last()
        );
        let s = wgqat_engine_run(engine, c.x.as_ptr(), n, z.as_mut_ptr(), 5);
        assert_eq!(s, WgqatStatus::InvalidArgument);
        assert!(last().contains("room for 5 floats"), "{}", last());
        let s = wgqat_engine_run(engine, c.x.as_ptr(), 0, z.as_mut_ptr(), z.len());
        assert_eq!(s, WgqatStatus::InvalidArgument);
        let missing = CString::new(d.join("missing.png").to_str().unwrap()).unwrap();
        let s = wgqat_engine_run_files(engine, &missing.as_ptr(), 1, z.as_mut_ptr(), z.len());
        assert_eq!(s, WgqatStatus::File);
        assert!(last().contains("missing.png"), "{}", last());
        wgqat_engine_free(engine);
    }
    let _ = std::fs::remove_dir_all(d);
}
