//! The C API: integer inference of an exported model (`wgqat export`) from C, C++, Swift, Kotlin
//! or anything else that calls C. `include/wgqat.h` is generated from this file by cbindgen
//! (`tests/capi.rs` checks it is up to date; `WGQAT_BLESS=1 cargo test --test capi` rewrites it).
//!
//! Rules of the surface:
//! - Handles are opaque and owned by the caller: every `*_open`/`*_create` has a `*_free`.
//! - Every entry point that can fail returns a [`WgqatStatus`]; on failure
//!   [`wgqat_last_error`] says what went wrong and how to fix it, in one line.
//! - No panic crosses the boundary: one is caught and reported as `WGQAT_STATUS_INTERNAL`.
//! - An engine may be used from one thread at a time; different engines are independent.

use crate::error::Error;
use crate::gpu::{Gpu, GpuOptions};
use crate::infer::{IntEngine, IntModel, load_image, softmax};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

/// What an entry point returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgqatStatus {
    /// Success.
    Ok = 0,
    /// An argument is NULL, out of range, or the wrong size for the model.
    InvalidArgument = 1,
    /// A file could not be read, or is not what it should be (model, image).
    File = 2,
    /// No usable GPU adapter, or the GPU failed (out of memory, device lost, ...).
    Gpu = 3,
    /// A bug in wgqat (a caught panic); the message says where.
    Internal = 4,
}

/// An integer model read from a file written by `wgqat export`.
pub struct WgqatModel {
    model: IntModel,
    names: Vec<CString>,
}

/// A model uploaded to a GPU device, with buffers for batches of up to its capacity.
pub struct WgqatEngine {
    // Field order: the engine's buffers are dropped before the device they live on.
    engine: IntEngine,
    gpu: Gpu,
    adapter: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// A failed call: its status and message.
struct Failure(WgqatStatus, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let status = match &e {
            Error::File { .. } | Error::Io { .. } => WgqatStatus::File,
            Error::Invalid(_)
            | Error::Shape { .. }
            | Error::Numerical(_)
            | Error::UnknownBackend(_) => WgqatStatus::InvalidArgument,
            _ => WgqatStatus::Gpu,
        };
        Failure(status, e.to_string())
    }
}

fn invalid(message: String) -> Failure {
    Failure(WgqatStatus::InvalidArgument, message)
}

/// Runs `f`, turning its error or panic into a status and the thread's last error.
fn call(name: &str, f: impl FnOnce() -> Result<(), Failure>) -> WgqatStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            WgqatStatus::Ok
        }
        Ok(Err(Failure(status, message))) => {
            set_error(&format!("{name}: {message}"));
            status
        }
        Err(panic) => {
            let what = crate::util::panic_message(panic.as_ref());
            set_error(&format!(
                "{name}: internal error (please report it): {what}"
            ));
            WgqatStatus::Internal
        }
    }
}

fn non_null<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller passes NULL or a pointer this library handed out (or a valid T).
    unsafe { p.as_ref() }.ok_or_else(|| invalid(format!("{what} is NULL")))
}

fn string<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller promises `len` readable elements.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> Result<&'a mut [T], Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller promises `len` writable elements.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

fn put<T>(out: *mut *mut T, value: T, what: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller promises a writable pointer slot.
    unsafe { *out = Box::into_raw(Box::new(value)) };
    Ok(())
}

/// The library's version, e.g. "0.1.0" (static; never freed).
#[unsafe(no_mangle)]
pub extern "C" fn wgqat_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread ("" after a success). Valid until the
/// thread's next call into wgqat; copy it to keep it.
#[unsafe(no_mangle)]
pub extern "C" fn wgqat_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// On a headless Linux machine without `XDG_RUNTIME_DIR`, gives the process a private one so
/// that Mesa's Vulkan driver prints nothing when an engine starts (it otherwise prints two
/// `XDG_RUNTIME_DIR is invalid` lines); elsewhere it does nothing.
///
/// # Safety
/// It sets an environment variable: call it first thing in `main`, before any other thread
/// exists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_prepare_headless() {
    // SAFETY: the caller promises no other thread is running.
    unsafe { crate::gpu::ensure_runtime_dir() }
}

/// Reads an integer model (a file written by `wgqat export`) into `*out`.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` points to writable storage for a handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_model_open(
    path: *const c_char,
    out: *mut *mut WgqatModel,
) -> WgqatStatus {
    call("wgqat_model_open", || {
        let path = string(path, "path")?;
        let model = IntModel::read(Path::new(path))?;
        let names = model
            .manifest
            .class_names
            .iter()
            .map(|n| CString::new(n.replace('\0', " ")).unwrap_or_default())
            .collect();
        put(out, WgqatModel { model, names }, "out")
    })
}

/// Frees a model (NULL is allowed). Engines made from it stay valid.
///
/// # Safety
/// `model` is NULL or a handle from [`wgqat_model_open`], not used after this.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_model_free(model: *mut WgqatModel) {
    if !model.is_null() {
        // SAFETY: the handle came from Box::into_raw in wgqat_model_open.
        drop(unsafe { Box::from_raw(model) });
    }
}

/// The model's input: channels, height and width of one image.
///
/// # Safety
/// `model` is a handle from [`wgqat_model_open`]; each out pointer is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_model_input(
    model: *const WgqatModel,
    channels: *mut usize,
    height: *mut usize,
    width: *mut usize,
) -> WgqatStatus {
    call("wgqat_model_input", || {
        let [c, h, w] = non_null(model, "model")?.model.manifest.input;
        for (p, v, what) in [
            (channels, c, "channels"),
            (height, h, "height"),
            (width, w, "width"),
        ] {
            slice_mut(p, 1, what)?[0] = v;
        }
        Ok(())
    })
}

/// The number of classes (logits per image); 0 when `model` is NULL.
///
/// # Safety
/// `model` is NULL or a handle from [`wgqat_model_open`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_model_classes(model: *const WgqatModel) -> usize {
    // SAFETY: as documented.
    unsafe { model.as_ref() }.map_or(0, |m| m.model.manifest.classes)
}

/// The name of class `class`, or NULL when the model has no names or `class` is out of range.
/// Owned by the model.
///
/// # Safety
/// `model` is NULL or a handle from [`wgqat_model_open`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_model_class_name(
    model: *const WgqatModel,
    class: usize,
) -> *const c_char {
    // SAFETY: as documented.
    unsafe { model.as_ref() }
        .and_then(|m| m.names.get(class))
        .map_or(std::ptr::null(), |n| n.as_ptr())
}

/// Uploads `model` to a GPU and makes an engine for batches of up to `max_batch` images (larger
/// runs are split into such batches). `adapter` is NULL or empty for the default adapter (the
/// highest-performance one; the environment's WGPU_BACKEND and WGPU_ADAPTER_NAME apply), else a
/// case-insensitive part of an adapter's name.
///
/// # Safety
/// `model` is a handle from [`wgqat_model_open`]; `adapter` is NULL or a NUL-terminated string;
/// `out` points to writable storage for a handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_engine_create(
    model: *const WgqatModel,
    adapter: *const c_char,
    max_batch: usize,
    out: *mut *mut WgqatEngine,
) -> WgqatStatus {
    call("wgqat_engine_create", || {
        let model = non_null(model, "model")?;
        let adapter = if adapter.is_null() {
            None
        } else {
            Some(string(adapter, "adapter")?.to_string()).filter(|a| !a.is_empty())
        };
        let gpu = Gpu::new(&GpuOptions {
            adapter,
            ..GpuOptions::default()
        })?;
        let engine = IntEngine::new(&gpu, model.model.clone(), max_batch)?;
        let adapter = CString::new(gpu.describe().replace('\0', " ")).unwrap_or_default();
        put(
            out,
            WgqatEngine {
                engine,
                gpu,
                adapter,
            },
            "out",
        )
    })
}

/// Frees an engine and its GPU device (NULL is allowed).
///
/// # Safety
/// `engine` is NULL or a handle from [`wgqat_engine_create`], not used after this.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_engine_free(engine: *mut WgqatEngine) {
    if !engine.is_null() {
        // SAFETY: the handle came from Box::into_raw in wgqat_engine_create.
        drop(unsafe { Box::from_raw(engine) });
    }
}

/// The adapter the engine runs on, e.g. "llvmpipe (LLVM 15.0.6, 256 bits) (vulkan, Cpu)";
/// owned by the engine, "" when `engine` is NULL.
///
/// # Safety
/// `engine` is NULL or a handle from [`wgqat_engine_create`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_engine_adapter(engine: *const WgqatEngine) -> *const c_char {
    // SAFETY: as documented.
    unsafe { engine.as_ref() }.map_or(c"".as_ptr(), |e| e.adapter.as_ptr())
}

/// Logits of `count` images given as normalised floats, NCHW (`count` x C x H x W, normalised
/// as in training: (pixel/255 - mean)/std per channel), written to `logits`
/// (`count` x classes floats; `logits_len` is its length in floats).
///
/// # Safety
/// `engine` is a handle from [`wgqat_engine_create`]; `images` holds `count`·C·H·W floats;
/// `logits` has room for `logits_len` floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_engine_run(
    engine: *mut WgqatEngine,
    images: *const f32,
    count: usize,
    logits: *mut f32,
    logits_len: usize,
) -> WgqatStatus {
    call("wgqat_engine_run", || {
        let e = non_null(engine.cast_const(), "engine")?;
        let per = image_len(e);
        let images = slice(images, count.saturating_mul(per), "images")?;
        run(e, images, count, logits, logits_len)
    })
}

/// Logits of `count` 8-bit RGB images, each `height` rows of `width` pixels of 3 bytes
/// (R, G, B; rows top to bottom, no padding), of exactly the model's input size; normalised
/// with the model's mean and std as in training.
///
/// # Safety
/// As [`wgqat_engine_run`], with `pixels` holding `count`·height·width·3 bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_engine_run_rgb8(
    engine: *mut WgqatEngine,
    pixels: *const u8,
    count: usize,
    width: usize,
    height: usize,
    logits: *mut f32,
    logits_len: usize,
) -> WgqatStatus {
    call("wgqat_engine_run_rgb8", || {
        let e = non_null(engine.cast_const(), "engine")?;
        let m = &e.engine.model.manifest;
        let [c, h, w] = m.input;
        if (c, h, w) != (3, height, width) {
            return Err(invalid(format!(
                "the images are {width}x{height} RGB but the model takes {w}x{h} with {c} channels: resize them first"
            )));
        }
        let px = slice(pixels, count.saturating_mul(h * w * 3), "pixels")?;
        let mut images = vec![0.0f32; px.len()];
        for (n, img) in px.chunks(h * w * 3).enumerate() {
            for (p, rgb) in img.chunks(3).enumerate() {
                for ch in 0..3 {
                    images[(n * 3 + ch) * h * w + p] =
                        (rgb[ch] as f32 / 255.0 - m.mean[ch]) / m.std[ch];
                }
            }
        }
        run(e, &images, count, logits, logits_len)
    })
}

/// Logits of `count` image files (PNG or JPEG), decoded, resized to the model's input when
/// their size differs (bilinear) and normalised as in training (the same as `wgqat infer`).
///
/// # Safety
/// As [`wgqat_engine_run`], with `paths` holding `count` NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_engine_run_files(
    engine: *mut WgqatEngine,
    paths: *const *const c_char,
    count: usize,
    logits: *mut f32,
    logits_len: usize,
) -> WgqatStatus {
    call("wgqat_engine_run_files", || {
        let e = non_null(engine.cast_const(), "engine")?;
        let m = &e.engine.model.manifest;
        let mut images = Vec::with_capacity(count * image_len(e));
        for (i, &p) in slice(paths, count, "paths")?.iter().enumerate() {
            let path = string(p, &format!("paths[{i}]"))?;
            images.extend(load_image(Path::new(path), m.input, m.mean, m.std)?);
        }
        run(e, &images, count, logits, logits_len)
    })
}

/// The `k` most probable classes of one image's `classes` logits, most probable first (ties:
/// the lower class first): their indices into `indices` and softmax probabilities into `probs`
/// (NULL to skip them), `k` of each (`k` at most `classes`).
///
/// # Safety
/// `logits` holds `classes` floats; `indices` (and `probs` unless NULL) have room for `k`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wgqat_top_k(
    logits: *const f32,
    classes: usize,
    k: usize,
    indices: *mut usize,
    probs: *mut f32,
) -> WgqatStatus {
    call("wgqat_top_k", || {
        if k > classes {
            return Err(invalid(format!(
                "k = {k} is more than the {classes} classes"
            )));
        }
        let p = softmax(slice(logits, classes, "logits")?);
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        slice_mut(indices, k, "indices")?.copy_from_slice(&order[..k]);
        if !probs.is_null() {
            let out = slice_mut(probs, k, "probs")?;
            for (o, &c) in out.iter_mut().zip(&order) {
                *o = p[c];
            }
        }
        Ok(())
    })
}

fn image_len(e: &WgqatEngine) -> usize {
    e.engine.model.manifest.input.iter().product()
}

/// Runs `count` normalised NCHW images in batches of the engine's capacity into `logits`.
fn run(
    e: &WgqatEngine,
    images: &[f32],
    count: usize,
    logits: *mut f32,
    logits_len: usize,
) -> Result<(), Failure> {
    if count == 0 {
        return Err(invalid("count is 0: pass at least one image".into()));
    }
    let classes = e.engine.classes();
    if logits_len < count * classes {
        return Err(invalid(format!(
            "logits has room for {logits_len} floats but {count} images of {classes} classes need {}",
            count * classes
        )));
    }
    let out = slice_mut(logits, count * classes, "logits")?;
    let per = image_len(e);
    let cap = e.engine.capacity();
    for (x, z) in images.chunks(cap * per).zip(out.chunks_mut(cap * classes)) {
        z.copy_from_slice(&e.engine.run(&e.gpu, x)?);
    }
    Ok(())
}
