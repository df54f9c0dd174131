//! Models: the layer vocabulary ([`spec`]), the built-in NIN models, and loading a model by name
//! or from a JSON file.

pub mod nin;
pub mod spec;

pub use spec::{LayerSpec, LossKind, ModelSpec, Pair};

use crate::error::{Error, Result};

/// The built-in models.
pub const BUILTIN: &[&str] = &["nin_gc", "nin"];

/// `nin_gc`, `nin`, or a path to a JSON model.
pub fn load(name_or_path: &str) -> Result<ModelSpec> {
    match name_or_path {
        "nin_gc" => Ok(nin::nin_gc()),
        "nin" => Ok(nin::nin()),
        p if p.ends_with(".json") || std::path::Path::new(p).exists() => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            ModelSpec::from_json(&text, p)
        }
        other => Err(Error::Invalid(format!(
            "unknown model {other:?}: use nin_gc, nin, or a path to a model JSON file"
        ))),
    }
}
