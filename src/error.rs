//! The library's error type. Every message is one line that names the problem and, where there is
//! one, the fix: the binary prints `error: {message}` and exits non-zero, with no backtrace.

use std::path::PathBuf;

/// Everything wgqat can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no GPU adapter found{detail}: {fix}")]
    NoAdapter { detail: String, fix: String },

    #[error(
        "no GPU adapter matches {wanted:?}; adapters found: {available} (choose the `adapter` by part of one of these names)"
    )]
    AdapterNotFound { wanted: String, available: String },

    #[error("unknown backend {0:?}: use one of vulkan, metal, dx12, gl")]
    UnknownBackend(String),

    #[error("could not open the GPU device {adapter:?}: {message}")]
    RequestDevice { adapter: String, message: String },

    #[error(
        "{what} needs {size} bytes, more than this device's {limit_name} of {limit} bytes: {hint}"
    )]
    TooLarge {
        what: String,
        size: u64,
        limit_name: &'static str,
        limit: u64,
        hint: String,
    },

    #[error("the GPU ran out of memory while {context}: use a smaller batch size")]
    OutOfMemory { context: String },

    #[error("shader {name} failed to compile on this device: {message}")]
    Shader { name: String, message: String },

    #[error("GPU validation error in {context}: {message}")]
    Validation { context: String, message: String },

    #[error(
        "the GPU device was lost ({0}); restart the run (checkpoints already saved are intact)"
    )]
    DeviceLost(String),

    #[error("GPU readback failed: {0}")]
    Readback(String),

    /// A kernel was called with shapes that do not fit together.
    #[error("{kernel}: {message}")]
    Shape { kernel: String, message: String },

    /// A non-finite loss or gradient in training.
    #[error("{0}")]
    Numerical(String),

    /// A user-supplied value is out of range (bits, batch size, ...).
    #[error("{0}")]
    Invalid(String),

    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn shape(kernel: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Shape {
            kernel: kernel.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            message: message.into(),
        }
    }
}
