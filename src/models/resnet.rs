//! micronet's CIFAR-style ResNets (`models/resnet.py`; spec `micronet-iao-wbwtab.md` §7), in the
//! layer vocabulary, with micronet's state-dict names (`conv1.0.weight`,
//! `conv2_x.0.residual_function.0.weight`, `conv3_x.0.shortcut.0.weight`, `fc.weight`).

use super::spec::{LayerSpec, LossKind, ModelSpec, Pair};

/// BasicBlock (two 3×3 convs, expansion 1) or BottleNeck (1×1, 3×3, 1×1 to 4C, expansion 4).
#[derive(Clone, Copy)]
enum Block {
    Basic,
    Bottleneck,
}

impl Block {
    fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

fn conv(out: usize, k: usize, stride: usize) -> LayerSpec {
    LayerSpec::Conv {
        out,
        kernel: Pair(k, k),
        stride: Pair(stride, stride),
        padding: Pair(k / 2, k / 2),
        dilation: Pair(1, 1),
        groups: 1,
        bias: false,
        name: None,
    }
}

fn bn() -> LayerSpec {
    LayerSpec::BatchNorm {
        eps: 1e-5,
        momentum: 0.1,
        name: None,
    }
}

/// One residual block of `c` channels (before expansion) reading `cin` channels.
fn block(kind: Block, cin: usize, c: usize, stride: usize) -> LayerSpec {
    let out = c * kind.expansion();
    let body = match kind {
        Block::Basic => vec![
            conv(c, 3, stride),
            bn(),
            LayerSpec::Relu,
            conv(c, 3, 1),
            bn(),
        ],
        // The stride is on the 3×3 conv, as in micronet.
        Block::Bottleneck => vec![
            conv(c, 1, 1),
            bn(),
            LayerSpec::Relu,
            conv(c, 3, stride),
            bn(),
            LayerSpec::Relu,
            conv(out, 1, 1),
            bn(),
        ],
    };
    let shortcut = if stride != 1 || cin != out {
        vec![conv(out, 1, stride), bn()]
    } else {
        Vec::new()
    };
    LayerSpec::Residual {
        name: None,
        body,
        shortcut,
        relu: true,
    }
}

fn resnet(name: &str, kind: Block, blocks: [usize; 4]) -> ModelSpec {
    let e = kind.expansion();
    let mut layers = vec![LayerSpec::Sequential {
        name: Some("conv1".into()),
        layers: vec![conv(64, 3, 1), bn(), LayerSpec::Relu],
    }];
    let mut cin = 64;
    for (stage, (&n, c)) in blocks.iter().zip([64, 128, 256, 512]).enumerate() {
        let first_stride = if stage == 0 { 1 } else { 2 };
        let mut stage_blocks = Vec::new();
        for b in 0..n {
            let stride = if b == 0 { first_stride } else { 1 };
            stage_blocks.push(block(kind, cin, c, stride));
            cin = c * e;
        }
        layers.push(LayerSpec::Sequential {
            name: Some(format!("conv{}_x", stage + 2)),
            layers: stage_blocks,
        });
    }
    layers.extend([
        LayerSpec::AdaptiveAvgPool { output: Pair(1, 1) },
        LayerSpec::Flatten,
        LayerSpec::Linear {
            out: 10,
            bias: true,
            name: Some("fc".into()),
        },
    ]);
    ModelSpec {
        name: name.into(),
        input: [3, 32, 32],
        layers,
        loss: LossKind::CrossEntropy,
    }
}

pub fn resnet18() -> ModelSpec {
    resnet("resnet18", Block::Basic, [2, 2, 2, 2])
}

pub fn resnet34() -> ModelSpec {
    resnet("resnet34", Block::Basic, [3, 4, 6, 3])
}

pub fn resnet50() -> ModelSpec {
    resnet("resnet50", Block::Bottleneck, [3, 4, 6, 3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Source;

    /// Parameters, convs (of them shortcut convs) and state-dict keys as spec §7 counts them.
    #[test]
    fn counts_match_micronet() {
        for (m, params, convs, shortcut, keys) in [
            (resnet18(), 11_173_962, 20, 3, 122),
            (resnet34(), 21_282_122, 36, 3, 218),
            (resnet50(), 23_520_842, 53, 4, 320),
        ] {
            let g = m.graph().unwrap();
            assert_eq!(m.param_count().unwrap(), params, "{}", m.name);
            let names: Vec<&str> = g
                .nodes
                .iter()
                .filter(|n| matches!(n.layer, LayerSpec::Conv { .. }))
                .map(|n| n.name.as_str())
                .collect();
            assert_eq!(names.len(), convs, "{}", m.name);
            let sc = names.iter().filter(|n| n.contains(".shortcut.")).count();
            assert_eq!(sc, shortcut, "{}", m.name);
            // weight per conv; weight, bias, running mean and var, num_batches_tracked per BN;
            // fc weight and bias.
            let bns = g
                .nodes
                .iter()
                .filter(|n| matches!(n.layer, LayerSpec::BatchNorm { .. }))
                .count();
            assert_eq!(convs + 5 * bns + 2, keys, "{}", m.name);
            assert_eq!(g.nodes.last().unwrap().out_shape, vec![10]);
        }
    }

    #[test]
    fn names_and_shapes_follow_micronet() {
        let g = resnet18().graph().unwrap();
        let node = |name: &str| {
            g.nodes
                .iter()
                .find(|n| n.name == name)
                .unwrap_or_else(|| panic!("no node {name}"))
        };
        assert_eq!(node("conv1.0").out_shape, vec![64, 32, 32]);
        assert_eq!(
            node("conv2_x.0.residual_function.3").out_shape,
            vec![64, 32, 32]
        );
        assert_eq!(
            node("conv3_x.0.residual_function.0").out_shape,
            vec![128, 16, 16]
        );
        assert_eq!(node("conv3_x.0.shortcut.0").out_shape, vec![128, 16, 16]);
        assert_eq!(
            node("conv5_x.1.residual_function.4").out_shape,
            vec![512, 4, 4]
        );
        assert_eq!(node("fc").in_shape, vec![512]);
        // conv2_x.0 has an identity shortcut: its add reads the stem's output directly.
        let add = g
            .nodes
            .iter()
            .position(|n| n.name == "conv2_x.0.add")
            .unwrap();
        let stem = g.nodes.iter().position(|n| n.name == "conv1.2").unwrap();
        assert_eq!(g.nodes[add].inputs[1], Source::Node(stem));
        let g50 = resnet50().graph().unwrap();
        let n50 = |name: &str| g50.nodes.iter().find(|n| n.name == name).unwrap();
        // BottleNeck: the stride is on the 3×3 conv; every stage's first block has a shortcut.
        assert_eq!(
            n50("conv3_x.0.residual_function.0").out_shape,
            vec![128, 32, 32]
        );
        assert_eq!(
            n50("conv3_x.0.residual_function.3").out_shape,
            vec![128, 16, 16]
        );
        assert_eq!(n50("conv2_x.0.shortcut.0").out_shape, vec![256, 32, 32]);
    }
}
