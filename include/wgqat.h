/* wgqat: integer inference of exported quantized models, from C and C++.
 * Generated from src/capi.rs by cbindgen (tests/capi.rs checks it); do not edit by hand.
 * Link with -lwgqat (libwgqat.so / libwgqat.dylib / wgqat.dll, or libwgqat.a). */

#ifndef WGQAT_H
#define WGQAT_H

#include <stddef.h>
#include <stdint.h>

// What an entry point returns.
typedef enum WgqatStatus {
  // Success.
  WGQAT_STATUS_OK = 0,
  // An argument is NULL, out of range, or the wrong size for the model.
  WGQAT_STATUS_INVALID_ARGUMENT = 1,
  // A file could not be read, or is not what it should be (model, image).
  WGQAT_STATUS_FILE = 2,
  // No usable GPU adapter, or the GPU failed (out of memory, device lost, ...).
  WGQAT_STATUS_GPU = 3,
  // A bug in wgqat (a caught panic); the message says where.
  WGQAT_STATUS_INTERNAL = 4,
} WgqatStatus;

// A model uploaded to a GPU device, with buffers for batches of up to its capacity.
typedef struct WgqatEngine WgqatEngine;

// An integer model read from a file written by `wgqat export`.
typedef struct WgqatModel WgqatModel;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The library's version, e.g. "0.1.0" (static; never freed).
const char *wgqat_version(void);

// The message of the last failed call on this thread ("" after a success). Valid until the
// thread's next call into wgqat; copy it to keep it.
const char *wgqat_last_error(void);

// On a headless Linux machine without `XDG_RUNTIME_DIR`, gives the process a private one so
// that Mesa's Vulkan driver prints nothing when an engine starts (it otherwise prints two
// `XDG_RUNTIME_DIR is invalid` lines); elsewhere it does nothing.
//
// # Safety
// It sets an environment variable: call it first thing in `main`, before any other thread
// exists.
void wgqat_prepare_headless(void);

// Reads an integer model (a file written by `wgqat export`) into `*out`.
//
// # Safety
// `path` is a NUL-terminated string; `out` points to writable storage for a handle.
enum WgqatStatus wgqat_model_open(const char *path, struct WgqatModel **out);

// Frees a model (NULL is allowed). Engines made from it stay valid.
//
// # Safety
// `model` is NULL or a handle from [`wgqat_model_open`], not used after this.
void wgqat_model_free(struct WgqatModel *model);

// The model's input: channels, height and width of one image.
//
// # Safety
// `model` is a handle from [`wgqat_model_open`]; each out pointer is writable.
enum WgqatStatus wgqat_model_input(const struct WgqatModel *model,
                                   size_t *channels,
                                   size_t *height,
                                   size_t *width);

// The number of classes (logits per image); 0 when `model` is NULL.
//
// # Safety
// `model` is NULL or a handle from [`wgqat_model_open`].
size_t wgqat_model_classes(const struct WgqatModel *model);

// The name of class `class`, or NULL when the model has no names or `class` is out of range.
// Owned by the model.
//
// # Safety
// `model` is NULL or a handle from [`wgqat_model_open`].
const char *wgqat_model_class_name(const struct WgqatModel *model, size_t class_);

// Uploads `model` to a GPU and makes an engine for batches of up to `max_batch` images (larger
// runs are split into such batches). `adapter` is NULL or empty for the default adapter (the
// highest-performance one; the environment's WGPU_BACKEND and WGPU_ADAPTER_NAME apply), else a
// case-insensitive part of an adapter's name.
//
// # Safety
// `model` is a handle from [`wgqat_model_open`]; `adapter` is NULL or a NUL-terminated string;
// `out` points to writable storage for a handle.
enum WgqatStatus wgqat_engine_create(const struct WgqatModel *model,
                                     const char *adapter,
                                     size_t max_batch,
                                     struct WgqatEngine **out);

// Frees an engine and its GPU device (NULL is allowed).
//
// # Safety
// `engine` is NULL or a handle from [`wgqat_engine_create`], not used after this.
void wgqat_engine_free(struct WgqatEngine *engine);

// The adapter the engine runs on, e.g. "llvmpipe (LLVM 15.0.6, 256 bits) (vulkan, Cpu)";
// owned by the engine, "" when `engine` is NULL.
//
// # Safety
// `engine` is NULL or a handle from [`wgqat_engine_create`].
const char *wgqat_engine_adapter(const struct WgqatEngine *engine);

// Logits of `count` images given as normalised floats, NCHW (`count` x C x H x W, normalised
// as in training: (pixel/255 - mean)/std per channel), written to `logits`
// (`count` x classes floats; `logits_len` is its length in floats).
//
// # Safety
// `engine` is a handle from [`wgqat_engine_create`]; `images` holds `count`·C·H·W floats;
// `logits` has room for `logits_len` floats.
enum WgqatStatus wgqat_engine_run(struct WgqatEngine *engine,
                                  const float *images,
                                  size_t count,
                                  float *logits,
                                  size_t logits_len);

// Logits of `count` 8-bit RGB images, each `height` rows of `width` pixels of 3 bytes
// (R, G, B; rows top to bottom, no padding), of exactly the model's input size; normalised
// with the model's mean and std as in training.
//
// # Safety
// As [`wgqat_engine_run`], with `pixels` holding `count`·height·width·3 bytes.
enum WgqatStatus wgqat_engine_run_rgb8(struct WgqatEngine *engine,
                                       const uint8_t *pixels,
                                       size_t count,
                                       size_t width,
                                       size_t height,
                                       float *logits,
                                       size_t logits_len);

// Logits of `count` image files (PNG or JPEG), decoded, resized to the model's input when
// their size differs (bilinear) and normalised as in training (the same as `wgqat infer`).
//
// # Safety
// As [`wgqat_engine_run`], with `paths` holding `count` NUL-terminated strings.
enum WgqatStatus wgqat_engine_run_files(struct WgqatEngine *engine,
                                        const char *const *paths,
                                        size_t count,
                                        float *logits,
                                        size_t logits_len);

// The `k` most probable classes of one image's `classes` logits, most probable first (ties:
// the lower class first): their indices into `indices` and softmax probabilities into `probs`
// (NULL to skip them), `k` of each (`k` at most `classes`).
//
// # Safety
// `logits` holds `classes` floats; `indices` (and `probs` unless NULL) have room for `k`.
enum WgqatStatus wgqat_top_k(const float *logits,
                             size_t classes,
                             size_t k,
                             size_t *indices,
                             float *probs);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* WGQAT_H */
