// What conv_coop.wgsl, conv_coop_gw.wgsl and conv_coop_gi.wgsl share, appended to each (after
// their `enable` directives): the conv's geometry as pipeline constants, and the layer input
// formed from a BatchNorm's where it is loaded (the kernels' IN_BN, IN_ACT, IN_SHUFFLE,
// A_LEVELS and A_INV_LEVELS constants and their in_bn binding), as conv2d.wgsl's IN_BN forms it.

override CIN: u32 = 1u;
override H: u32 = 1u;
override W: u32 = 1u;
override COUT: u32 = 1u;
override OH: u32 = 1u;
override OW: u32 = 1u;
override SH: u32 = 1u;
override SW: u32 = 1u;
override PH: u32 = 0u;
override PW: u32 = 0u;
override DH: u32 = 1u;
override DW: u32 = 1u;
override GROUPS: u32 = 1u;
override KH: u32 = 1u;
override KW: u32 = 1u;
override KHW: u32 = KH * KW;
override CIG: u32 = CIN / GROUPS;
override COG: u32 = COUT / GROUPS;
override OHW: u32 = OH * OW;

// IN_BN: the BatchNorm channel that input channel ch comes from (the shuffle sends channel c
// to (c % per) * IN_SHUFFLE + c / per, per = CIN / IN_SHUFFLE); ch itself without IN_BN.
fn unshuffled(ch: u32) -> u32 {
    if (!IN_BN || IN_SHUFFLE <= 1u) {
        return ch;
    }
    return (ch % IN_SHUFFLE) * (CIN / IN_SHUFFLE) + ch / IN_SHUFFLE;
}

// IN_BN: the input (before its quantizer) whose BatchNorm input is v, in BatchNorm channel ch.
fn bn_activated(v: f32, ch: u32) -> f32 {
    let t = ch * BN_TABLE;
    let r = bn_affine(v, in_bn[t + BN_MEAN], in_bn[t + BN_INVSTD], in_bn[t + BN_GAMMA],
                      in_bn[t + BN_BETA]);
    return bn_act(r, IN_ACT);
}

// IN_BN: the input level whose BatchNorm input is v, in BatchNorm channel ch.
fn bn_formed(v: f32, ch: u32) -> f32 {
    return dorefa_act(bn_activated(v, ch), A_LEVELS, A_INV_LEVELS);
}

// The forward's and grad-weight's x without IN_BN: with IN_QUANT the layer's float input,
// quantized where it is loaded; else its levels, stored quantized.
override IN_QUANT: bool = false;

// The input level the GEMM uses whose stored value is v (with IN_BN the BatchNorm's input, in
// BatchNorm channel ch).
fn input_formed(v: f32, ch: u32) -> f32 {
    if (IN_BN) {
        return bn_formed(v, ch);
    }
    if (IN_QUANT) {
        return dorefa_act(v, A_LEVELS, A_INV_LEVELS);
    }
    return v;
}

// The staged value (index into c_sh) that invocation `lid` writes on step e (0..8) of an
// epilogue round: subgroup s's 32 invocations write their own 16x16 block (c_sh[s * 256..]) two
// rows per step, each half of the subgroup 16 adjacent columns of one row, so that one store
// instruction writes two runs of 64 contiguous bytes (one index per invocation and row would
// scatter it over 32 sectors). Row (i % 256) / 16, column i % 16, as the block is staged.
fn staged_index(lid: u32, e: u32) -> u32 {
    return (lid / 32u) * 256u + e * 32u + lid % 32u;
}

// Where value i of a subgroup's 16x16 block (i as staged_index numbers it: subgroup s's block at
// s * 256..) lies in c_sh when the epilogue stages two of each subgroup's blocks at a time,
// columns nj and nj + 16 of a row block (nj a multiple of 32): subgroup s's two at
// c_sh[s * 512..], block nj / 16 at offset ((nj / 16) % 2) * 256. One barrier pair per two
// blocks (16 barriers in all instead of 32); four per round would need 39 KiB of workgroup
// memory in the packed forward, over the 32 KiB many devices (lavapipe among them) give.
fn staged_at(i: u32, nj: u32) -> u32 {
    return (i / 256u) * 512u + ((nj / 16u) % 2u) * 256u + i % 256u;
}
