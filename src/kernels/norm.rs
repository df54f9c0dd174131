//! `shaders/norm.wgsl`: BatchNorm2d forward (train: batch statistics, running stats updated; eval:
//! running stats) and backward, with an optional fused activation ([`Act`]) and channel shuffle
//! after it.

use super::{Entry, NORM, count_u32, elementwise_grid, expect_dtype, expect_shape, iao};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor, grid_1d};
use crate::quant::Bits;
use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &NORM,
        name,
        used,
    }
}

const STATS: Entry = entry(
    "bn_stats",
    &[(1, R), (2, W), (3, W), (4, W), (6, R), (7, R)],
);
const STATS_MERGE: Entry = entry(
    "bn_stats_merge",
    &[(2, W), (3, W), (4, W), (6, R), (7, R), (16, R)],
);
const EVAL_STATS: Entry = entry("bn_eval_stats", &[(2, W), (3, W), (4, W), (6, R), (7, R)]);
const APPLY: Entry = entry("bn_apply", &[(1, R), (5, R), (6, R), (7, R), (8, W)]);
const APPLY_IAO_BACKWARD: Entry = entry(
    "bn_apply_iao_backward",
    &[(1, R), (5, R), (6, R), (7, R), (8, W), (15, W), (18, R)],
);
const APPLY_IAO_QUANTIZE: Entry = entry(
    "bn_apply_iao_quantize",
    &[(1, R), (5, R), (6, R), (7, R), (8, W), (18, R)],
);
const APPLY_IAO_MASK: Entry = entry(
    "bn_apply_iao_mask",
    &[(1, R), (5, R), (6, R), (7, R), (15, W), (18, R)],
);
// The masking forms with the BatchNorm's backward sums.
const APPLY_IAO_BACKWARD_SUMS: Entry = entry(
    "bn_apply_iao_backward_sums",
    &[
        (1, R),
        (5, R),
        (6, R),
        (7, R),
        (8, W),
        (15, W),
        (18, R),
        (19, W),
    ],
);
const APPLY_IAO_MASK_SUMS: Entry = entry(
    "bn_apply_iao_mask_sums",
    &[(1, R), (5, R), (6, R), (7, R), (15, W), (18, R), (19, W)],
);
const APPLY_EXTREMES: Entry = entry(
    "bn_apply_extremes",
    &[(1, R), (5, R), (6, R), (7, R), (8, W), (17, W)],
);
const BACKWARD_REDUCE: Entry = entry(
    "bn_backward_reduce",
    &[(1, R), (2, W), (6, R), (7, R), (10, R), (11, W), (12, W)],
);
const BACKWARD_MERGE: Entry = entry(
    "bn_backward_merge",
    &[(2, W), (6, R), (11, W), (12, W), (16, R)],
);
const BACKWARD_APPLY_IN_PLACE: Entry = entry(
    "bn_backward_apply_in_place",
    &[(5, R), (6, R), (7, R), (10, R), (13, R), (14, R), (15, W)],
);
const BACKWARD_APPLY: Entry = entry(
    "bn_backward_apply",
    &[
        (1, R),
        (5, R),
        (6, R),
        (7, R),
        (10, R),
        (13, R),
        (14, R),
        (15, W),
    ],
);

/// Floats per channel of a BatchNorm's table, channel `c`'s at `c · TABLE`: `[mean, invstd,
/// gamma, beta]` from its statistics kernels, then `[dbeta, dgamma, gamma·invstd/count]` from its
/// backward reduction (for a conv that applies the BatchNorm's backward where it loads its
/// output gradient) and one unused: two aligned vec4s, which a conv reads in one or two loads
/// (`shaders/lib/bn.wgsl`'s `BN_TABLE`).
pub const TABLE: usize = 8;

/// The entries of a channel's table (see [`TABLE`]), and where entry `e` of channel `c` lies.
pub mod entry {
    pub const MEAN: usize = 0;
    pub const INVSTD: usize = 1;
    pub const GAMMA: usize = 2;
    pub const BETA: usize = 3;
    pub const DBETA: usize = 4;
    pub const DGAMMA: usize = 5;
    pub const SCALE: usize = 6;

    pub const fn at(c: usize, e: usize) -> usize {
        c * super::TABLE + e
    }
}

/// The activation fused after a BatchNorm, applied in its kernels and in those that form its
/// output where they load it (`shaders/lib/bn.wgsl`'s `ACT_*`, bit for bit the layer it stands
/// for), and whose mask its backward applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Act {
    #[default]
    Identity,
    /// `max(v, 0)`; the gradient passes where v > 0.
    Relu,
    /// wbwtab's binary activation: `sign(v)` with 0 → +1; the gradient passes where
    /// −1 < v < 1.
    Sign,
}

impl Act {
    /// The ReLU if `relu`, else none.
    pub fn relu_if(relu: bool) -> Act {
        if relu { Act::Relu } else { Act::Identity }
    }

    /// The shaders' code (`ACT_NONE`, `ACT_RELU`, `ACT_SIGN`).
    pub fn code(self) -> u32 {
        match self {
            Act::Identity => 0,
            Act::Relu => 1,
            Act::Sign => 2,
        }
    }

    /// What launch labels say of it.
    pub fn label(self) -> &'static str {
        match self {
            Act::Identity => "",
            Act::Relu => "+relu",
            Act::Sign => "+sign",
        }
    }
}

/// How a kernel that reads a BatchNorm's output forms it from the BatchNorm's input, where it
/// loads it, instead of reading it stored: the BatchNorm's table, its fused activation and
/// shuffle.
/// Bit for bit what [`apply`] writes (`shaders/lib/bn.wgsl`).
#[derive(Clone, Copy, Debug)]
pub struct BnForm<'a> {
    /// Per channel `[mean, invstd, gamma, beta, dbeta, dgamma, scale, -]` ([`TABLE`] · C floats): what
    /// [`stats_train`] (or [`stats_eval`]) and [`backward`] write.
    pub table: &'a Tensor,
    pub act: Act,
    /// Channel-shuffle groups after the BatchNorm (1: none).
    pub shuffle: usize,
}

impl BnForm<'_> {
    /// Checks the form against the `c` channels it is applied to.
    pub fn check(&self, kernel: &str, c: usize) -> Result<()> {
        if self.table.numel() != TABLE * c || self.shuffle == 0 || !c.is_multiple_of(self.shuffle) {
            return Err(Error::shape(
                kernel,
                format!(
                    "a BatchNorm table of {} floats with a {}-group shuffle for {c} channels (want {TABLE} floats per channel, groups dividing them)",
                    self.table.numel(),
                    self.shuffle
                ),
            ));
        }
        Ok(())
    }
}

/// `(N, C, S)` of a BatchNorm input `(N, C, H, W)` (S = H·W).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    pub n: usize,
    pub c: usize,
    pub s: usize,
}

impl BnShape {
    pub fn of(shape: &[usize]) -> Result<BnShape> {
        if shape.len() < 2 {
            return Err(Error::shape(
                "batchnorm",
                format!("input must be (N, C, ...), got {shape:?}"),
            ));
        }
        Ok(BnShape {
            n: shape[0],
            c: shape[1],
            s: shape[2..].iter().product(),
        })
    }

    fn numel(&self) -> usize {
        self.n * self.c * self.s
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    s: u32,
    act: u32,
    eps: f32,
    momentum: f32,
    shuffle: u32,
    quantize: u32,
    levels_f: f32,
    inv_levels: f32,
    tile: u32,
    tiles: u32,
}

/// What [`apply`] does after normalising, in the same pass (and [`backward`] undoes): an activation
/// (a ReLU, or wbwtab's sign in its place), then micronet's channel shuffle in `shuffle` groups (1:
/// none). Fusing the shuffle means the unshuffled tensor is never stored, in either direction.
/// `quantize` (forward only) also applies the next layer's activation quantizer, bit for bit
/// [`quant::act_forward`]'s.
///
/// [`quant::act_forward`]: super::quant::act_forward
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epilogue {
    pub act: Act,
    pub shuffle: usize,
    pub quantize: Option<Bits>,
}

impl Epilogue {
    pub const NONE: Epilogue = Epilogue {
        act: Act::Identity,
        shuffle: 1,
        quantize: None,
    };

    pub fn act(act: Act) -> Epilogue {
        Epilogue {
            act,
            ..Epilogue::NONE
        }
    }

    fn label(self) -> String {
        let mut s = self.act.label().to_string();
        if self.shuffle > 1 {
            s.push_str(&format!("+shuffle{}", self.shuffle));
        }
        if let Some(b) = self.quantize {
            s.push_str(&format!("+a{b}"));
        }
        s
    }
}

fn params(sh: BnShape, ep: Epilogue, eps: f32, momentum: f32) -> Result<Params> {
    count_u32("batchnorm", sh.numel())?;
    if ep.shuffle == 0 || !sh.c.is_multiple_of(ep.shuffle) {
        return Err(Error::shape(
            "batchnorm",
            format!("cannot shuffle {} channels in {} groups", sh.c, ep.shuffle),
        ));
    }
    Ok(Params {
        n: sh.n as u32,
        c: sh.c as u32,
        s: sh.s as u32,
        act: ep.act.code(),
        eps,
        momentum,
        shuffle: ep.shuffle as u32,
        // Float "quantizers" are the identity: nothing to apply.
        quantize: u32::from(ep.quantize.is_some_and(|b| !b.is_float())),
        levels_f: ep.quantize.map_or(0.0, |b| b.levels() as f32),
        inv_levels: ep.quantize.map_or(0.0, |b| b.inv_levels()),
        tile: 0,
        tiles: 0,
    })
}

fn check(kernel: &str, named: &[(&str, &Tensor, &[usize])]) -> Result<()> {
    for (name, t, shape) in named {
        expect_dtype(kernel, name, t, DType::F32)?;
        expect_shape(kernel, name, t, shape)?;
    }
    Ok(())
}

fn per_channel(gpu: &Gpu, c: usize) -> [u32; 3] {
    grid_1d(c as u32, gpu.limits.max_compute_workgroups_per_dimension)
}

/// The channels of one workgroup of the partials' merges (`bn_stats_merge`,
/// `bn_backward_merge`: norm.wgsl's MERGE_CH; each channel's tiles split 32 ways).
const MERGE_CHANNELS: usize = 8;

fn merge_grid(gpu: &Gpu, c: usize) -> [u32; 3] {
    grid_1d(
        c.div_ceil(MERGE_CHANNELS) as u32,
        gpu.limits.max_compute_workgroups_per_dimension,
    )
}

/// Train mode: `stats = [mean, invstd, gamma, beta]` per channel, of `x` (biased variance);
/// running stats move by `momentum` toward the batch mean and unbiased variance.
#[allow(clippy::too_many_arguments)]
pub fn stats_train(
    gpu: &Gpu,
    x: &Tensor,
    eps: f32,
    momentum: f32,
    (gamma, beta): (&Tensor, &Tensor),
    stats: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<Op> {
    let sh = BnShape::of(x.shape())?;
    check(
        "bn_stats",
        &[
            ("x", x, x.shape()),
            ("stats", stats, &[TABLE * sh.c]),
            ("running_mean", running_mean, &[sh.c]),
            ("running_var", running_var, &[sh.c]),
            ("gamma", gamma, &[sh.c]),
            ("beta", beta, &[sh.c]),
        ],
    )?;
    STATS.launch(
        gpu,
        &[],
        format!("bn_stats {:?}", x.shape()),
        &params(sh, Epilogue::NONE, eps, momentum)?,
        &[x, stats, running_mean, running_var, gamma, beta],
        per_channel(gpu, sh.c),
    )
}

/// [`stats_train`] of a `(N, C, S)` input from the per-tile partial statistics the conv that
/// wrote it formed (`conv2d::forward_with`'s `bn_stats`): `partials` holds `(tiles, 2, C)`
/// means and sums of squared deviations over `tile` consecutive values of the N·S of each
/// channel, merged here in a fixed order (32 runs of consecutive tiles, then a tree).
#[allow(clippy::too_many_arguments)]
pub fn stats_merge(
    gpu: &Gpu,
    sh: BnShape,
    (partials, tile): (&Tensor, usize),
    eps: f32,
    momentum: f32,
    (gamma, beta): (&Tensor, &Tensor),
    stats: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<Op> {
    let tiles = (sh.n * sh.s).div_ceil(tile.max(1));
    check(
        "bn_stats_merge",
        &[
            ("stats", stats, &[TABLE * sh.c]),
            ("running_mean", running_mean, &[sh.c]),
            ("running_var", running_var, &[sh.c]),
            ("gamma", gamma, &[sh.c]),
            ("beta", beta, &[sh.c]),
        ],
    )?;
    if tile == 0 || partials.numel() < tiles * 2 * sh.c {
        return Err(Error::shape(
            "bn_stats_merge",
            format!(
                "{} partial statistics for {tiles} tiles of {} channels",
                partials.numel(),
                sh.c
            ),
        ));
    }
    let p = Params {
        tile: tile as u32,
        ..params(sh, Epilogue::NONE, eps, momentum)?
    };
    STATS_MERGE.launch(
        gpu,
        &[],
        format!(
            "bn_stats_merge [{}, {}, {}] tiles of {tile}",
            sh.n, sh.c, sh.s
        ),
        &p,
        &[stats, running_mean, running_var, gamma, beta, partials],
        merge_grid(gpu, sh.c),
    )
}

/// The backward's reduction (`dgamma`, `dbeta`, and the table's backward entries, as
/// [`backward`] writes them) from the partial sums that the layer reading this BatchNorm's
/// output formed as it wrote its output gradient (`sums`, `(tiles, 2, C)`: a conv's grad-input,
/// `conv2d::Fused::bn_sums`, a max-pool's backward, or [`apply_iao`]'s masking pass), added in a
/// fixed order (32 runs of consecutive tiles, then a tree).
pub fn backward_merge(
    gpu: &Gpu,
    sh: BnShape,
    (sums, tiles): (&Tensor, usize),
    stats: &Tensor,
    gamma: &Tensor,
    (dgamma, dbeta): (&Tensor, &Tensor),
) -> Result<Op> {
    const K: &str = "bn_backward_merge";
    let c = [sh.c];
    check(
        K,
        &[
            ("stats", stats, &[TABLE * sh.c]),
            ("gamma", gamma, &c),
            ("dgamma", dgamma, &c),
            ("dbeta", dbeta, &c),
        ],
    )?;
    if tiles == 0 || sums.numel() < tiles * 2 * sh.c {
        return Err(Error::shape(
            K,
            format!(
                "{} backward sums for {tiles} tiles of {} channels",
                sums.numel(),
                sh.c
            ),
        ));
    }
    let p = Params {
        tiles: tiles as u32,
        ..params(sh, Epilogue::NONE, 0.0, 0.0)?
    };
    BACKWARD_MERGE.launch(
        gpu,
        &[],
        format!("{K} [{}, {}, {}] {tiles} tiles", sh.n, sh.c, sh.s),
        &p,
        &[stats, gamma, dgamma, dbeta, sums],
        merge_grid(gpu, sh.c),
    )
}

/// Eval mode: `stats = [mean, invstd, gamma, beta]` from the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn stats_eval(
    gpu: &Gpu,
    c: usize,
    eps: f32,
    (gamma, beta): (&Tensor, &Tensor),
    running_mean: &Tensor,
    running_var: &Tensor,
    stats: &Tensor,
) -> Result<Op> {
    check(
        "bn_eval_stats",
        &[
            ("stats", stats, &[TABLE * c]),
            ("running_mean", running_mean, &[c]),
            ("running_var", running_var, &[c]),
            ("gamma", gamma, &[c]),
            ("beta", beta, &[c]),
        ],
    )?;
    let sh = BnShape { n: 1, c, s: 1 };
    EVAL_STATS.launch(
        gpu,
        &[],
        format!("bn_eval_stats [{c}]"),
        &params(sh, Epilogue::NONE, eps, 0.0)?,
        &[stats, running_mean, running_var, gamma, beta],
        elementwise_grid(gpu, c as u32),
    )
}

/// `y = γ (x − mean) invstd + β`, then the epilogue (ReLU, shuffle).
#[allow(clippy::too_many_arguments)]
pub fn apply(
    gpu: &Gpu,
    ep: Epilogue,
    x: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    y: &Tensor,
) -> Result<Op> {
    let sh = BnShape::of(x.shape())?;
    check(
        "bn_apply",
        &[
            ("x", x, x.shape()),
            ("stats", stats, &[TABLE * sh.c]),
            ("gamma", gamma, &[sh.c]),
            ("beta", beta, &[sh.c]),
            ("y", y, x.shape()),
        ],
    )?;
    let n = count_u32("bn_apply", sh.numel())?;
    APPLY.launch(
        gpu,
        &[],
        format!("bn_apply{} {:?}", ep.label(), x.shape()),
        &params(sh, ep, 0.0, 0.0)?,
        &[x, stats, gamma, beta, y],
        elementwise_grid(gpu, n),
    )
}

/// [`apply`] (without the DoReFa quantizer) that also writes the extremes of `y` into
/// `extremes` as the IAO quantizer reading `y` would find them (`IaoQuantizer::observe` over
/// `y`: per block of [`iao::CHUNK`] elements, [min, max], the same bits), so that the quantizer
/// only merges them (`IaoQuantizer::observe_produced`).
pub fn apply_extremes(
    gpu: &Gpu,
    ep: Epilogue,
    x: &Tensor,
    stats: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    y: &Tensor,
    extremes: &Tensor,
) -> Result<Op> {
    const K: &str = "bn_apply_extremes";
    if ep.quantize.is_some() {
        return Err(Error::shape(K, "the extremes are of the float output"));
    }
    let sh = BnShape::of(x.shape())?;
    let blocks = sh.numel().div_ceil(iao::CHUNK);
    check(
        K,
        &[
            ("x", x, x.shape()),
            ("stats", stats, &[TABLE * sh.c]),
            ("gamma", gamma, &[sh.c]),
            ("beta", beta, &[sh.c]),
            ("y", y, x.shape()),
        ],
    )?;
    expect_dtype(K, "extremes", extremes, DType::F32)?;
    if extremes.numel() < 2 * blocks {
        return Err(Error::shape(
            K,
            format!(
                "extremes holds {} values, {} blocks of {:?} need {}",
                extremes.numel(),
                blocks,
                x.shape(),
                2 * blocks
            ),
        ));
    }
    APPLY_EXTREMES.launch(
        gpu,
        &[],
        format!("bn_apply_extremes{} {:?}", ep.label(), x.shape()),
        &params(sh, ep, 0.0, 0.0)?,
        &[x, stats, gamma, beta, y, extremes],
        grid_1d(
            count_u32(K, blocks)?,
            gpu.limits.max_compute_workgroups_per_dimension,
        ),
    )
}

/// The consecutive (n, s) elements of a channel per tile of the backward sums [`apply_iao`]
/// forms (norm.wgsl's SUM_TILE).
const IAO_SUM_TILE: usize = 4096;

/// The tiles of the backward sums [`apply_iao`] forms (with `dx`'s sums).
pub fn iao_sum_tiles(sh: BnShape) -> usize {
    (sh.n * sh.s).div_ceil(IAO_SUM_TILE).max(1)
}

/// In the backward pass of a layer whose input is this BatchNorm's output `y` under the
/// per-tensor IAO quantizer `q` (state `state`): `y` formed again as [`apply`] forms it, then
/// with `dx` (the layer's input gradient, in `y`'s layout) masked by the quantizer's clip-STE,
/// and with `into` written with the quantized `y` (where it lies, or a temporary), in one pass.
/// The same bits as [`apply`] followed by `IaoQuantizer::backward_in_place`, `forward` or
/// `backward_requantize` over `y`. With `dx`'s `sums`, the pass also writes this BatchNorm's
/// backward sums from the masked gradient, `(tiles, 2, C)` for [`iao_sum_tiles`] tiles, which
/// [`backward_merge`] adds up in place of [`backward`]'s reduction.
pub fn apply_iao(
    gpu: &Gpu,
    ep: Epilogue,
    (x, stats): (&Tensor, &Tensor),
    (gamma, beta): (&Tensor, &Tensor),
    (q, state): (&iao::IaoQuantizer, &Tensor),
    dx: Option<(&Tensor, Option<&Tensor>)>,
    into: Option<&Tensor>,
) -> Result<Op> {
    let sums = dx.and_then(|(_, s)| s);
    let dx = dx.map(|(d, _)| d);
    let entry = match (dx.is_some(), into.is_some(), sums.is_some()) {
        (true, true, false) => &APPLY_IAO_BACKWARD,
        (true, true, true) => &APPLY_IAO_BACKWARD_SUMS,
        (false, true, _) => &APPLY_IAO_QUANTIZE,
        (true, false, false) => &APPLY_IAO_MASK,
        (true, false, true) => &APPLY_IAO_MASK_SUMS,
        (false, false, _) => {
            return Err(Error::shape(
                "bn_apply_iao",
                "neither a gradient to mask nor an output to quantize",
            ));
        }
    };
    // The written tensors, in binding order (y at 8, dx at 15).
    let outs: Vec<(&str, &Tensor)> = into
        .map(|y| ("y", y))
        .into_iter()
        .chain(dx.map(|d| ("dx", d)))
        .collect();
    let k = entry.name;
    if ep.quantize.is_some() || q.rows() != 1 {
        return Err(Error::shape(
            k,
            "a per-tensor IAO quantizer of the float output",
        ));
    }
    let sh = BnShape::of(x.shape())?;
    let (table, c, words) = ([TABLE * sh.c], [sh.c], [iao::ROW_WORDS + 1]);
    let mut named: Vec<(&str, &Tensor, &[usize])> = vec![
        ("x", x, x.shape()),
        ("stats", stats, &table),
        ("gamma", gamma, &c),
        ("beta", beta, &c),
        ("state", state, &words),
    ];
    named.extend(outs.iter().map(|&(name, t)| (name, t, x.shape())));
    check(k, &named)?;
    let tiles = iao_sum_tiles(sh);
    if let Some(s) = sums {
        expect_dtype(k, "sums", s, DType::F32)?;
        if s.numel() < 2 * tiles * sh.c {
            return Err(Error::shape(
                k,
                format!(
                    "{} floats for the backward sums of {tiles} tiles of {} channels",
                    s.numel(),
                    sh.c
                ),
            ));
        }
    }
    let (qmin, qmax) = q.code_range();
    let asymmetric = q.spec.q_type == crate::quant::iao::QType::Asymmetric;
    let n = count_u32(k, sh.numel())?;
    let mut bound = vec![x, stats, gamma, beta];
    bound.extend(outs.iter().map(|&(_, t)| t));
    bound.push(state);
    bound.extend(sums);
    // With the sums, a workgroup per tile and channel (norm.wgsl's tile_walk).
    let grid = match sums {
        Some(_) => grid_1d(
            count_u32(k, tiles * sh.c)?,
            gpu.limits.max_compute_workgroups_per_dimension,
        ),
        None => elementwise_grid(gpu, n),
    };
    entry.launch(
        gpu,
        &[
            ("IAO_QMIN", f64::from(qmin)),
            ("IAO_QMAX", f64::from(qmax)),
            ("IAO_ASYMMETRIC", f64::from(u8::from(asymmetric))),
        ],
        format!("{k}{} {:?}", ep.label(), x.shape()),
        &Params {
            tiles: tiles as u32,
            ..params(sh, ep, 0.0, 0.0)?
        },
        &bound,
        grid,
    )
}

/// The shapes [`backward`] and [`backward_apply`] take: `dy` (and `dx`) as `x`, the table and
/// the per-channel tensors of its channels.
fn check_backward(
    kernel: &str,
    (x, dy, stats): (&Tensor, &Tensor, &Tensor),
    (gamma, beta): (&Tensor, &Tensor),
    (dgamma, dbeta): (&Tensor, &Tensor),
    dx: Option<&Tensor>,
) -> Result<()> {
    let c = [BnShape::of(x.shape())?.c];
    let table = [TABLE * c[0]];
    let mut named: Vec<(&str, &Tensor, &[usize])> = vec![
        ("x", x, x.shape()),
        ("dy", dy, x.shape()),
        ("stats", stats, &table),
        ("gamma", gamma, &c),
        ("beta", beta, &c),
        ("dgamma", dgamma, &c),
        ("dbeta", dbeta, &c),
    ];
    if let Some(dx) = dx {
        named.push(("dx", dx, x.shape()));
    }
    check(kernel, &named)
}

/// Backward of [`apply`] in train mode: `dgamma`, `dbeta` (written whole) and, when wanted, `dx`
/// (which may be `x` itself: then it is overwritten in place).
/// `dy` is the gradient of the epilogue's output (read permuted back when shuffled). With the
/// ReLU fused, it is masked where the output is positive, formed again from `x`,
/// `gamma` and `beta` (the output itself is not read: a network may reuse its memory).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    ep: Epilogue,
    x: &Tensor,
    dy: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
    dx: Option<&Tensor>,
) -> Result<Vec<Op>> {
    let sh = BnShape::of(x.shape())?;
    check_backward(
        "bn_backward",
        (x, dy, stats),
        (gamma, beta),
        (dgamma, dbeta),
        None,
    )?;
    let p = params(sh, ep, 0.0, 0.0)?;
    let mut ops = vec![BACKWARD_REDUCE.launch(
        gpu,
        &[],
        format!("bn_backward_reduce {:?}", x.shape()),
        &p,
        &[x, stats, gamma, beta, dy, dgamma, dbeta],
        per_channel(gpu, sh.c),
    )?];
    if let Some(dx) = dx {
        ops.push(backward_apply(
            gpu,
            ep,
            x,
            dy,
            stats,
            (gamma, beta),
            (dgamma, dbeta),
            dx,
        )?);
    }
    Ok(ops)
}

/// The second half of [`backward`]: `dx` from `dy` and the reduction's `dgamma` and `dbeta`
/// (written by [`backward`]'s reduction or by [`backward_merge`]). `dx` may be `x` itself: then
/// it is overwritten in place.
#[allow(clippy::too_many_arguments)]
pub fn backward_apply(
    gpu: &Gpu,
    ep: Epilogue,
    x: &Tensor,
    dy: &Tensor,
    stats: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (dgamma, dbeta): (&Tensor, &Tensor),
    dx: &Tensor,
) -> Result<Op> {
    let sh = BnShape::of(x.shape())?;
    check_backward(
        "bn_backward_apply",
        (x, dy, stats),
        (gamma, beta),
        (dgamma, dbeta),
        Some(dx),
    )?;
    let p = params(sh, ep, 0.0, 0.0)?;
    // Four elements per invocation where a plane holds a multiple of 4 (`quads` in the shader).
    let per = if sh.s % 4 == 0 { 4 } else { 1 };
    let n = count_u32("bn_backward", sh.numel() / per)?;
    let in_place = dx.same_buffer(x);
    if in_place && dx.offset() != x.offset() {
        return Err(Error::shape(
            "bn_backward",
            "dx overlaps x without being x: pass x itself (in place) or a separate buffer",
        ));
    }
    if in_place {
        BACKWARD_APPLY_IN_PLACE.launch(
            gpu,
            &[],
            format!("bn_backward_apply in place {:?}", x.shape()),
            &p,
            &[stats, gamma, beta, dy, dgamma, dbeta, dx],
            elementwise_grid(gpu, n),
        )
    } else {
        BACKWARD_APPLY.launch(
            gpu,
            &[],
            format!("bn_backward_apply {:?}", x.shape()),
            &p,
            &[x, stats, gamma, beta, dy, dgamma, dbeta, dx],
            elementwise_grid(gpu, n),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{IAO, NORM};

    #[test]
    fn bn_apply_extremes_takes_the_iao_quantizers_blocks() {
        let chunk = super::iao::CHUNK;
        assert!(
            NORM.source
                .contains(&format!("const EXTREMES_CHUNK: u32 = {chunk}u;"))
        );
        assert!(
            IAO.source
                .contains(&format!("const CHUNK: u32 = {chunk}u;"))
        );
    }

    /// The grids and sum tiles the launchers size agree with the shader's constants.
    #[test]
    fn launch_shapes_match_the_shaders_constants() {
        for (name, value) in [
            ("SUM_TILE", super::IAO_SUM_TILE),
            ("MERGE_CH", super::MERGE_CHANNELS),
        ] {
            let line = format!("const {name}: u32 = {value}u;");
            assert!(NORM.source.contains(&line), "norm.wgsl lacks {line:?}");
        }
    }
}
