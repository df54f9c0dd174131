//! micronet's Network-in-Network models (spec §4), in the layer vocabulary, with micronet's
//! state-dict names (`model.{i}.conv`, `model.{i}.bn`).

use super::spec::{LayerSpec, LossKind, ModelSpec, Pair};

/// A block of micronet's Sequential: `[shuffle] → conv → BN → ReLU`, or a pool.
enum Block {
    Conv {
        cin_shuffle: Option<usize>,
        out: usize,
        k: usize,
        pad: usize,
        groups: usize,
    },
    MaxPool {
        k: usize,
        stride: usize,
        pad: usize,
    },
    AvgPool {
        k: usize,
    },
}

fn build(name: &str, blocks: &[Block]) -> ModelSpec {
    let mut layers = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        match *b {
            Block::Conv {
                cin_shuffle,
                out,
                k,
                pad,
                groups,
            } => {
                if let Some(g) = cin_shuffle {
                    layers.push(LayerSpec::Shuffle { groups: g });
                }
                layers.push(LayerSpec::Conv {
                    out,
                    kernel: Pair(k, k),
                    stride: Pair(1, 1),
                    padding: Pair(pad, pad),
                    dilation: Pair(1, 1),
                    groups,
                    bias: true,
                    name: Some(format!("model.{i}.conv")),
                });
                layers.push(LayerSpec::BatchNorm {
                    eps: 1e-5,
                    momentum: 0.1,
                    name: Some(format!("model.{i}.bn")),
                });
                layers.push(LayerSpec::Relu);
            }
            Block::MaxPool { k, stride, pad } => layers.push(LayerSpec::MaxPool {
                kernel: Pair(k, k),
                stride: Some(Pair(stride, stride)),
                padding: Pair(pad, pad),
            }),
            Block::AvgPool { k } => layers.push(LayerSpec::AvgPool {
                kernel: Pair(k, k),
                stride: Some(Pair(1, 1)),
                padding: Pair(0, 0),
            }),
        }
    }
    layers.push(LayerSpec::Flatten);
    ModelSpec {
        name: name.into(),
        input: [3, 32, 32],
        layers,
        loss: LossKind::CrossEntropy,
    }
}

fn conv(out: usize, k: usize, pad: usize, groups: usize, shuffle: Option<usize>) -> Block {
    Block::Conv {
        cin_shuffle: shuffle,
        out,
        k,
        pad,
        groups,
    }
}

/// `nin.Net` with cfg `[192,160,96,192,192,192,192,192]`: 969,822 parameters.
pub fn nin() -> ModelSpec {
    build(
        "nin",
        &[
            conv(192, 5, 2, 1, None),
            conv(160, 1, 0, 1, None),
            conv(96, 1, 0, 1, None),
            Block::MaxPool {
                k: 3,
                stride: 2,
                pad: 1,
            },
            conv(192, 5, 2, 1, None),
            conv(192, 1, 0, 1, None),
            conv(192, 1, 0, 1, None),
            Block::MaxPool {
                k: 3,
                stride: 2,
                pad: 1,
            },
            conv(192, 3, 1, 1, None),
            conv(192, 1, 0, 1, None),
            conv(10, 1, 0, 1, None),
            Block::AvgPool { k: 8 },
        ],
    )
}

/// `nin_gc.Net` with cfg `[256,256,256,512,512,512,1024,1024]` (grouped convs, channel shuffle):
/// 591,390 parameters.
pub fn nin_gc() -> ModelSpec {
    build(
        "nin_gc",
        &[
            conv(256, 5, 2, 1, None),
            conv(256, 1, 0, 2, None),
            conv(256, 1, 0, 2, Some(2)),
            Block::MaxPool {
                k: 2,
                stride: 2,
                pad: 0,
            },
            conv(512, 3, 1, 16, Some(2)),
            conv(512, 1, 0, 4, Some(16)),
            conv(512, 1, 0, 4, Some(4)),
            Block::MaxPool {
                k: 2,
                stride: 2,
                pad: 0,
            },
            conv(1024, 3, 1, 32, Some(4)),
            conv(1024, 1, 0, 8, Some(32)),
            conv(10, 1, 0, 1, None),
            Block::AvgPool { k: 8 },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_micronet() {
        assert_eq!(nin().param_count().unwrap(), 969_822);
        assert_eq!(nin_gc().param_count().unwrap(), 591_390);
    }

    #[test]
    fn outputs_are_ten_logits_and_shapes_follow_the_spec() {
        for m in [nin(), nin_gc()] {
            let s = m.shapes().unwrap();
            assert_eq!(s.last().unwrap(), &vec![10]);
        }
        let s = nin().shapes().unwrap();
        // After the first max-pool (k3 s2 p1): 96x16x16; after the second: 192x8x8.
        assert!(s.contains(&vec![96, 16, 16]) && s.contains(&vec![192, 8, 8]));
    }

    #[test]
    fn conv_names_are_micronets() {
        let names: Vec<String> = nin_gc()
            .layers
            .iter()
            .filter_map(|l| l.name().map(str::to_string))
            .filter(|n| n.ends_with("conv"))
            .collect();
        let idx: Vec<&str> = names.iter().map(|n| n.split('.').nth(1).unwrap()).collect();
        assert_eq!(idx, ["0", "1", "2", "4", "5", "6", "8", "9", "10"]);
    }
}
