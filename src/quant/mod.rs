//! Quantization semantics, with no GPU: bit widths, the scheme (DoReFa or IAO) and its options,
//! and which layers a scheme quantizes and how. Training, evaluation, export, the benchmark and
//! the binary all take a [`QuantConfig`] and ask [`QuantConfig::resolve`]; nothing else decides.

mod bits;
pub mod iao;
pub mod wbwtab;

pub use bits::Bits;
pub use iao::{IaoOptions, Observer, Percentile, QLevel, QType};
use serde::{Deserialize, Serialize};
pub use wbwtab::{Activations, WbwtabOptions, Weights};

/// micronet's quantization schemes (`--scheme`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchemeName {
    /// `wqaq/dorefa`: tanh-normalised weights, activations clamped to [0, 1]; the first layer
    /// float.
    #[default]
    Dorefa,
    /// `wqaq/iao`: scales and zero points from observed ranges, every layer quantized.
    Iao,
    /// `wbwtab`: binary or ternary weights and binary activations between the first and the
    /// last conv.
    Wbwtab,
}

/// A scheme with its options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "scheme")]
pub enum Scheme {
    #[default]
    Dorefa,
    Iao(IaoOptions),
    Wbwtab(WbwtabOptions),
}

impl Scheme {
    pub fn name(&self) -> SchemeName {
        match self {
            Scheme::Dorefa => SchemeName::Dorefa,
            Scheme::Iao(_) => SchemeName::Iao,
            Scheme::Wbwtab(_) => SchemeName::Wbwtab,
        }
    }
}

/// How a network is quantized: the scheme and the bit widths of weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantConfig {
    pub w_bits: Bits,
    pub a_bits: Bits,
    /// DoReFa: quantize the first Conv/ConvTranspose/Linear too (micronet's `prepare()` leaves it
    /// float). IAO quantizes every one anyway.
    pub quantize_first_layer: bool,
    #[serde(default)]
    pub scheme: Scheme,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig::dorefa(Bits::EIGHT, Bits::EIGHT)
    }
}

/// What a layer is, as far as quantization cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Conv,
    /// A conv whose only reader is a BatchNorm (IAO's `bn_fuse` folds the two).
    ConvBeforeBn,
    ConvTranspose,
    Linear,
    /// Max, average or adaptive average pooling.
    Pool,
    Relu,
    Add,
    /// BatchNorm, ReLU, shuffle, flatten: never quantized.
    Other,
}

impl Role {
    fn is_weighted(self) -> bool {
        matches!(
            self,
            Role::Conv | Role::ConvBeforeBn | Role::ConvTranspose | Role::Linear
        )
    }
}

/// A weight quantizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightQuant {
    /// The weight as it is.
    Float,
    Dorefa(Bits),
    Iao {
        bits: Bits,
        q_type: QType,
        /// One scale per output channel (conv) or row (Linear); else one per layer.
        per_channel: bool,
        observer: Observer,
    },
    /// wbwtab's binary or ternary weights.
    Wbwtab(Weights),
}

/// An input-activation quantizer (one scale per tensor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActQuant {
    Float,
    Dorefa(Bits),
    /// IAO with its moving-average observer, or (PTQ) the histogram observer.
    Iao {
        bits: Bits,
        q_type: QType,
        histogram: Option<Percentile>,
    },
}

impl ActQuant {
    pub fn is_float(self) -> bool {
        self == ActQuant::Float
    }
}

/// How one layer is quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerQuant {
    pub weight: WeightQuant,
    /// The quantizer of the layer's input (an add's: of both inputs, with one shared scale).
    pub input: ActQuant,
    /// IAO `bn_fuse`: the conv folds the BatchNorm that reads it (which becomes an identity).
    pub fold: bool,
    /// wbwtab: this ReLU is the binary activation instead.
    pub binary: bool,
}

impl LayerQuant {
    pub const FLOAT: LayerQuant = LayerQuant {
        weight: WeightQuant::Float,
        input: ActQuant::Float,
        fold: false,
        binary: false,
    };
}

impl QuantConfig {
    pub fn dorefa(w_bits: Bits, a_bits: Bits) -> QuantConfig {
        QuantConfig {
            w_bits,
            a_bits,
            quantize_first_layer: false,
            scheme: Scheme::Dorefa,
        }
    }

    pub fn iao(w_bits: Bits, a_bits: Bits, options: IaoOptions) -> QuantConfig {
        QuantConfig {
            w_bits,
            a_bits,
            quantize_first_layer: false,
            scheme: Scheme::Iao(options),
        }
    }

    /// Each layer's quantizers, given the layers' roles in registration order: micronet's
    /// `prepare()` for the scheme.
    /// - DoReFa: every conv, conv_transpose and Linear but the first registered (unless
    ///   `quantize_first_layer`); pools and adds float.
    /// - IAO: every conv, conv_transpose and Linear, weights per output channel (conv) or row
    ///   (Linear) unless `q_level` is `layer` (conv_transpose: always per layer); the inputs of
    ///   pools and both inputs of an add. 32 bits on either side leaves that side float. With
    ///   `bn_fuse`, a conv read only by a BatchNorm folds it, and a conv without one stays float
    ///   (as micronet's prepare() leaves it).
    pub fn resolve(&self, roles: &[Role]) -> Vec<LayerQuant> {
        if let Scheme::Wbwtab(o) = self.scheme {
            return wbwtab_layers(o, roles);
        }
        let first = roles.iter().position(|r| r.is_weighted());
        roles
            .iter()
            .enumerate()
            .map(|(i, &role)| match self.scheme {
                Scheme::Wbwtab(_) => unreachable!("wbwtab_layers resolves wbwtab"),
                Scheme::Dorefa => {
                    let quantized = self.quantize_first_layer || Some(i) != first;
                    if role.is_weighted() && quantized {
                        LayerQuant {
                            weight: dorefa_weight(self.w_bits),
                            input: dorefa_act(self.a_bits),
                            fold: false,
                            binary: false,
                        }
                    } else {
                        LayerQuant::FLOAT
                    }
                }
                Scheme::Iao(o) => {
                    // PTQ's quantizers are symmetric whatever q_type says (spec §2.1).
                    let q_type = if o.ptq.is_some() {
                        QType::Symmetric
                    } else {
                        o.q_type
                    };
                    let input = if self.a_bits.is_float() {
                        ActQuant::Float
                    } else {
                        ActQuant::Iao {
                            bits: self.a_bits,
                            q_type,
                            histogram: o.ptq,
                        }
                    };
                    match role {
                        // micronet's bn_fuse leaves a conv without a BatchNorm after it float.
                        Role::Conv if o.bn_fuse => LayerQuant::FLOAT,
                        _ if role.is_weighted() => LayerQuant {
                            fold: o.bn_fuse && role == Role::ConvBeforeBn,
                            weight: if self.w_bits.is_float() {
                                WeightQuant::Float
                            } else {
                                WeightQuant::Iao {
                                    bits: self.w_bits,
                                    q_type,
                                    per_channel: o.q_level == QLevel::Channel
                                        && role != Role::ConvTranspose,
                                    observer: o.weight_observer,
                                }
                            },
                            input,
                            binary: false,
                        },
                        Role::Pool | Role::Add => LayerQuant {
                            weight: WeightQuant::Float,
                            input,
                            fold: false,
                            binary: false,
                        },
                        _ => LayerQuant::FLOAT,
                    }
                }
            })
            .collect()
    }

    /// The scheme in words for logs: `W8A8`, `IAO W8A8 symmetric per-channel`.
    pub fn describe(&self) -> String {
        match self.scheme {
            Scheme::Dorefa | Scheme::Wbwtab(_) => self.label(),
            Scheme::Iao(o) => format!(
                "{} {}, {} weight scales, {} weight observer{}",
                self.label(),
                match (o.q_type, o.ptq) {
                    (QType::Asymmetric, None) => "asymmetric",
                    _ => "symmetric",
                },
                match o.q_level {
                    QLevel::Channel => "per-channel",
                    QLevel::Layer => "per-layer",
                },
                match o.weight_observer {
                    Observer::MinMax => "min-max",
                    Observer::MovingAverage => "moving-average",
                },
                match (o.ptq, o.qaft) {
                    (Some(p), _) => format!(", PTQ with the histogram observer at {}", p.0),
                    (None, true) => ", QAFT (scales frozen)".to_string(),
                    _ => String::new(),
                }
            ),
        }
    }

    /// A short name for logs and tables: `W8A8`, `IAO W8A8`, `IAO-BN W8A8` (BatchNorms
    /// folded), `fp32`; wbwtab as micronet's README counts bits, `W1A1`, `W1.5A32` (1.5:
    /// ternary).
    pub fn label(&self) -> String {
        if let Scheme::Wbwtab(o) = self.scheme {
            let w = match o.weights {
                Weights::Binary => "1",
                Weights::Ternary => "1.5",
                Weights::Float => "32",
            };
            let a = match o.activations {
                Activations::Binary => "1",
                Activations::Float => "32",
            };
            return format!("wbwtab W{w}A{a}");
        }
        let bits = if self.w_bits.is_float() && self.a_bits.is_float() {
            "fp32".to_string()
        } else {
            format!("W{}A{}", self.w_bits, self.a_bits)
        };
        match self.scheme {
            Scheme::Dorefa | Scheme::Wbwtab(_) => bits,
            Scheme::Iao(o) if o.bn_fuse => format!("IAO-BN {bits}"),
            Scheme::Iao(_) => format!("IAO {bits}"),
        }
    }
}

/// micronet's wbwtab `prepare()`: counting convs (and conv_transposes) in registration order,
/// the first and the last stay float and the others get binary or ternary weights; a ReLU
/// reached after the first conv and before the last becomes the binary activation; Linear and
/// everything else stay float.
fn wbwtab_layers(o: WbwtabOptions, roles: &[Role]) -> Vec<LayerQuant> {
    let is_conv = |r: &Role| matches!(r, Role::Conv | Role::ConvBeforeBn | Role::ConvTranspose);
    let convs = roles.iter().filter(|r| is_conv(r)).count();
    let mut seen = 0;
    roles
        .iter()
        .map(|r| {
            let mut q = LayerQuant::FLOAT;
            if is_conv(r) {
                seen += 1;
                if seen > 1 && seen < convs && o.weights != Weights::Float {
                    q.weight = WeightQuant::Wbwtab(o.weights);
                }
            } else if *r == Role::Relu {
                q.binary = seen > 0 && seen < convs && o.activations == Activations::Binary;
            }
            q
        })
        .collect()
}

fn dorefa_weight(bits: Bits) -> WeightQuant {
    if bits.is_float() {
        WeightQuant::Float
    } else {
        WeightQuant::Dorefa(bits)
    }
}

fn dorefa_act(bits: Bits) -> ActQuant {
    if bits.is_float() {
        ActQuant::Float
    } else {
        ActQuant::Dorefa(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nin_gc's roles: 9 convs with pools at 3, 7 and the end.
    fn nin_gc() -> Vec<Role> {
        use Role::*;
        let mut r = Vec::new();
        for i in 0..9 {
            r.extend([Conv, Other, Other]);
            if i == 2 || i == 5 {
                r.push(Pool);
            }
        }
        r.push(Pool);
        r.push(Other);
        r
    }

    #[test]
    fn dorefa_leaves_the_first_layer_float() {
        let q = QuantConfig::default().resolve(&nin_gc());
        let weighted: Vec<_> = q
            .iter()
            .filter(|l| l.weight != WeightQuant::Float)
            .collect();
        assert_eq!(weighted.len(), 8);
        assert_eq!(q[0], LayerQuant::FLOAT);
        assert!(q.iter().all(|l| !matches!(l.input, ActQuant::Iao { .. })));
        let first = QuantConfig {
            quantize_first_layer: true,
            ..QuantConfig::default()
        };
        assert_eq!(
            first.resolve(&nin_gc())[0].weight,
            WeightQuant::Dorefa(Bits::EIGHT)
        );
    }

    #[test]
    fn wbwtab_binarises_between_the_first_and_last_conv() {
        // micronet on nin_gc: model.0.conv and model.10.conv (here the 9th) float, 7 binary;
        // the ReLUs of blocks 0..8 sign, the last one a ReLU (spec §6.4).
        let mut roles = Vec::new();
        for _ in 0..9 {
            roles.extend([Role::Conv, Role::Other, Role::Relu]);
        }
        let q = QuantConfig {
            scheme: Scheme::Wbwtab(WbwtabOptions::default()),
            ..QuantConfig::default()
        }
        .resolve(&roles);
        let binary_w = q
            .iter()
            .filter(|l| l.weight == WeightQuant::Wbwtab(Weights::Binary))
            .count();
        let signs: Vec<bool> = q.iter().skip(2).step_by(3).map(|l| l.binary).collect();
        assert_eq!(binary_w, 7);
        assert_eq!(q[0].weight, WeightQuant::Float);
        assert_eq!(q[24].weight, WeightQuant::Float);
        assert_eq!(
            signs,
            [true, true, true, true, true, true, true, true, false]
        );
    }

    #[test]
    fn iao_wraps_every_conv_and_pool() {
        // micronet: nin_gc has 9 QuantConv2d, 2 QuantMaxPool2d, 1 QuantAvgPool2d (spec §2.2).
        let q =
            QuantConfig::iao(Bits::EIGHT, Bits::EIGHT, IaoOptions::default()).resolve(&nin_gc());
        let convs = q
            .iter()
            .filter(|l| {
                matches!(
                    l.weight,
                    WeightQuant::Iao {
                        per_channel: true,
                        ..
                    }
                )
            })
            .count();
        let inputs = q.iter().filter(|l| !l.input.is_float()).count();
        assert_eq!((convs, inputs), (9, 12));
        let layer = QuantConfig::iao(
            Bits::EIGHT,
            Bits::new(32).unwrap(),
            IaoOptions {
                q_level: QLevel::Layer,
                ..IaoOptions::default()
            },
        );
        let roles = [Role::ConvTranspose, Role::Linear, Role::Add];
        let q = layer.resolve(&roles);
        assert!(q.iter().all(|l| l.input.is_float()));
        assert!(matches!(
            q[1].weight,
            WeightQuant::Iao {
                per_channel: false,
                ..
            }
        ));
        let ch = QuantConfig::iao(Bits::EIGHT, Bits::EIGHT, IaoOptions::default()).resolve(&roles);
        assert!(matches!(
            ch[0].weight,
            WeightQuant::Iao {
                per_channel: false,
                ..
            }
        ));
        assert!(matches!(
            ch[1].weight,
            WeightQuant::Iao {
                per_channel: true,
                ..
            }
        ));
        assert!(matches!(ch[2].input, ActQuant::Iao { .. }));
    }
}
