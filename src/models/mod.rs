//! Models: the layer vocabulary ([`spec`]), its lowering to a graph ([`graph`]), the built-in
//! NIN and ResNet models, and loading a model by name or from a JSON file.

pub mod graph;
pub mod nin;
pub mod resnet;
pub mod spec;

pub use graph::{Graph, Node, Source};
pub use spec::{LayerSpec, LossKind, ModelSpec, Pair};

use crate::error::{Error, Result};

/// The built-in models.
pub const BUILTIN: &[&str] = &["nin_gc", "nin", "resnet18", "resnet34", "resnet50"];

/// A built-in model by name ([`BUILTIN`]), or a path to a JSON model.
pub fn load(name_or_path: &str) -> Result<ModelSpec> {
    match name_or_path {
        "nin_gc" => Ok(nin::nin_gc()),
        "nin" => Ok(nin::nin()),
        "resnet18" => Ok(resnet::resnet18()),
        "resnet34" => Ok(resnet::resnet34()),
        "resnet50" => Ok(resnet::resnet50()),
        p if p.ends_with(".json") || std::path::Path::new(p).exists() => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            ModelSpec::from_json(&text, p)
        }
        other => Err(Error::Invalid(format!(
            "unknown model {other:?}: use nin_gc, nin, resnet18, resnet34, resnet50, or a path to a model JSON file"
        ))),
    }
}
