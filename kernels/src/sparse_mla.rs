//! The sparse MLA attention core shared by prefill (bf16/f32 kv rows) and decode (the paged FP8 cache).
//!
//! For each query row r and head h, over the valid entries i of indices[r, :]:
//!   S_i = sm_scale · q[r, h, :] · kv_i          (576 = 512 latent + 64 rope)
//!   out[r, h, :] = Σ_i softmax(S)_i · kv_i[:512]
//!   lse[r, h] = log Σ_i exp(S_i) (natural), max_logit[r, h] = max_i S_i
//! An empty row gives out = 0, lse = +∞, max_logit = −∞.
//! Variants `simt_h{HB}`: a cube holds HB heads of one row; per block of BI indices it gathers (and for
//! FP8, dequantizes exactly) the kv rows into shared memory in the problem's format, computes the HB×BI scores, updates each head's
//! online softmax, and accumulates P·V in per-unit registers (each unit owns d_v / 128 columns of every
//! head). Scalar FMAs; tensor cores are issue 8.
use crate::launch::{buffer, grid, ir_props, ir_settings, slice_arg};
use crate::spec::TensorSpec;
use crate::{KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::bf16;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::{bf16_to_f32, e4m3_to_f32, pack, unpack};
use serde::{Deserialize, Serialize};

pub const UNITS: u32 = 128;
pub const D_QK: usize = 576;
pub const D_V: usize = 512;
/// Tokens per page of the FP8 cache, and 32-bit words per cached token (656 bytes).
pub const PAGE_SIZE: usize = 64;
pub const TOKEN_WORDS: usize = 164;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "cmma_h32",
        summary: "tensor cores: 32 heads (one kv gather for both tiles), 16 indices per block (bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "cmma_h16",
        summary: "tensor cores: 16 heads, 16 indices per block (bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "simt_h16",
        summary: "16 heads per cube, 8 indices per block",
        needs_plane_ops: false,
    },
    Variant {
        name: "simt_h8",
        summary: "8 heads per cube, 8 indices per block",
        needs_plane_ops: false,
    },
];

/// (heads per cube, indices per block) of a variant.
pub fn tiles(variant: &Variant) -> (u32, u32) {
    match variant.name {
        "cmma_h32" => (32, 16),
        "cmma_h16" => (16, 16),
        "simt_h16" => (16, 8),
        _ => (8, 8),
    }
}

/// Shared memory of a variant: the kv tile (storage words), row offsets, P, and three floats per head; for
/// `cmma_h16`, bf16 Q and kv tiles, P, the split-k scores and the block's P·V.
pub fn shared_memory_bytes(variant: &Variant, format: Format) -> usize {
    if is_cmma(variant) {
        let heads = tiles(variant).0 as usize;
        let bf16_tiles = 2 * (heads * D_QK + CMMA_BLOCK * D_QK + heads * CMMA_BLOCK);
        return bf16_tiles + 4 * (4 * heads * CMMA_BLOCK + heads * D_V + CMMA_BLOCK + 3 * heads);
    }
    let (heads, block) = tiles(variant);
    let words = block as usize * D_QK / format.per_word() as usize;
    4 * (words + block as usize + (heads * block) as usize + 3 * heads as usize)
}

/// The checks both registrations share: the MLA head layout and whole 16-head cubes.
pub fn validate(kernel: &'static str, problem: &Problem) -> Result<(), KernelError> {
    let invalid = |field, expected: &str, got: usize| KernelError::InvalidProblem {
        kernel,
        field,
        expected: expected.into(),
        got: got.to_string(),
    };
    if problem.dim("d_qk") != D_QK {
        return Err(invalid("d_qk", "576 (512 latent + 64 rope)", problem.dim("d_qk")));
    }
    if problem.dim("d_v") != D_V {
        return Err(invalid("d_v", "512", problem.dim("d_v")));
    }
    if problem.dim("h_q") == 0 || problem.dim("h_q") % 16 != 0 {
        return Err(invalid("h_q", "a multiple of 16", problem.dim("h_q")));
    }
    Ok(())
}

/// Tolerances: `out` to `out_tolerance` (plus the bf16 output rounding, 2⁻⁹ relative, for bf16), lse and
/// max_logit to 1e-5.
pub fn tolerance(output: &TensorSpec, problem: &Problem, out_tolerance: f64) -> f64 {
    match (output.name, problem.format) {
        ("out", Format::Bf16) => out_tolerance + 1.0 / 512.0,
        ("out", Format::F32) => out_tolerance,
        _ => 1e-5,
    }
}

/// What the tensor-core variant needs beyond the default checks: bf16 tensor cores and bf16 tensors.
/// The tensor-core variants.
fn is_cmma(variant: &Variant) -> bool {
    variant.name.starts_with("cmma")
}

pub fn supports(variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
    if is_cmma(variant) {
        if problem.dim("h_q") % tiles(variant).0 as usize != 0 {
            return Err(format!("needs h_q a multiple of {}", tiles(variant).0));
        }
        if !features.cmma_bf16 {
            return Err("needs bf16 tensor cores (cmma)".into());
        }
        if problem.format != Format::Bf16 {
            return Err(format!("needs bf16 tensors, got {}", problem.format));
        }
    }
    Ok(())
}

pub fn supports_target(variant: &Variant, target: IrTarget) -> bool {
    !is_cmma(variant) || matches!(target, IrTarget::Cuda | IrTarget::Hip)
}

/// Sizes a launch needs besides the buffers.
pub struct Launch {
    pub rows: usize,
    pub rows_per_batch: usize,
    pub h_q: usize,
    pub s_kv: usize,
    pub max_pages: usize,
    pub pages: usize,
    pub topk: usize,
    pub sm_scale: f32,
}

/// Launches `variant` with buffers (q, kv, block_table, indices, out, lse, max_logit) given as
/// (handle, length in words).
pub fn launch(
    variant: &Variant,
    device: &Device,
    buffers: [(&Handle, usize); 7],
    sizes: Launch,
    source: KvSource,
    format: Format,
) {
    let (heads, block) = tiles(variant);
    let [q, kv, table, indices, out, lse, max_logit] = buffers.map(|(handle, len)| buffer(handle, len));
    let count = grid(sizes.rows * sizes.h_q / heads as usize);
    let Launch {
        rows,
        rows_per_batch,
        h_q,
        s_kv,
        max_pages,
        pages,
        topk,
        sm_scale,
    } = sizes;
    let client = &device.client;
    if is_cmma(variant) {
        // Four planes per head tile.
        let head_tiles = heads as usize / CMMA_HEADS;
        sparse_mla_cmma_kernel::launch(
            client,
            count,
            CubeDim::new_1d(4 * head_tiles as u32 * device.features().plane_size),
            q,
            kv,
            table,
            indices,
            out,
            lse,
            max_logit,
            rows,
            rows_per_batch,
            h_q,
            s_kv,
            max_pages,
            pages,
            topk,
            sm_scale,
            head_tiles,
            source,
        );
    } else {
        sparse_mla_kernel::launch(
            client,
            count,
            CubeDim::new_1d(UNITS),
            q,
            kv,
            table,
            indices,
            out,
            lse,
            max_logit,
            rows,
            rows_per_batch,
            h_q,
            s_kv,
            max_pages,
            pages,
            topk,
            sm_scale,
            heads,
            block,
            source,
            format,
        );
    }
}

/// Where the kv rows come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvSource {
    /// kv [s_kv, 576] in the problem's format; index i is row i.
    Rows,
    /// The paged FP8 cache [pages, 64, 656 B]; index i is the sequence's token i, found through
    /// block_table[batch, i / 64] (page) and i % 64 (slot).
    Fp8Paged,
}

/// Word offset of the kv row `index` names, or 0xffff_ffff ("invalid": u32, as WGSL has no 64-bit integers).
#[cube]
#[allow(clippy::too_many_arguments)]
fn kv_row_offset(
    index: i32,
    block_table: &[i32],
    batch: usize,
    s_kv: usize,
    max_pages: usize,
    pages: usize,
    #[comptime] source: KvSource,
    #[comptime] format: Format,
) -> u32 {
    let mut offset = 0xffff_ffffu32;
    match source {
        KvSource::Rows => {
            if index >= 0 && (index as usize) < s_kv {
                offset = (index as usize * comptime!(D_QK / format.per_word() as usize)) as u32;
            }
        }
        KvSource::Fp8Paged => {
            if index >= 0 && (index as usize) < max_pages * PAGE_SIZE {
                let page = block_table[batch * max_pages + index as usize / PAGE_SIZE];
                if page >= 0 && (page as usize) < pages {
                    offset = ((page as usize * PAGE_SIZE + index as usize % PAGE_SIZE) * TOKEN_WORDS) as u32;
                }
            }
        }
    }
    offset
}

/// Word `w` of the kv row at word `offset`, in the problem's storage format (bf16: elements 2w, 2w+1).
/// FP8 latent values are dequantized to it exactly: an e4m3 value times a power-of-two scale has at most
/// 4 significant bits, which bf16 keeps.
#[cube]
#[allow(unused_assignments)]
fn kv_word(kv: &[u32], offset: usize, w: usize, #[comptime] source: KvSource, #[comptime] format: Format) -> u32 {
    let per_word = comptime!(format.per_word() as usize);
    let mut word = 0u32;
    match source {
        KvSource::Rows => {
            word = kv[offset + w];
        }
        KvSource::Fp8Paged => {
            let e = w * per_word;
            if e < D_V {
                let bytes = kv[offset + e / 4];
                let scale = f32::reinterpret(kv[offset + 128 + e / 128]);
                let lo = e4m3_to_f32((bytes >> (8 * (e % 4)) as u32) & 0xff) * scale;
                let mut hi = 0.0f32;
                if comptime!(per_word == 2) {
                    hi = e4m3_to_f32((bytes >> (8 * (e % 4 + 1)) as u32) & 0xff) * scale;
                }
                word = pack(lo, hi, format);
            } else {
                let r = e - D_V;
                let rope = kv[offset + 132 + r / 2];
                match format {
                    // bf16 pairs are already the storage words.
                    Format::Bf16 => word = rope,
                    Format::F32 => word = u32::reinterpret(bf16_to_f32((rope >> (16 * (r % 2)) as u32) & 0xffff)),
                }
            }
        }
    }
    word
}

/// Resolves the block of indices starting at `start` of the row starting at `base` to kv row offsets in
/// `offsets` (0xffff_ffff: invalid, or past topk); units below `block` take one each.
#[cube]
#[allow(clippy::too_many_arguments)]
fn resolve_block(
    indices: &[i32],
    block_table: &[i32],
    offsets: &mut [u32],
    base: usize,
    start: usize,
    topk: usize,
    batch: usize,
    s_kv: usize,
    max_pages: usize,
    pages: usize,
    #[comptime] block: usize,
    #[comptime] source: KvSource,
    #[comptime] format: Format,
) {
    let unit = UNIT_POS as usize;
    if unit < block {
        let mut offset = 0xffff_ffffu32;
        if start + unit < topk {
            let index = indices[base + start + unit];
            offset = kv_row_offset(index, block_table, batch, s_kv, max_pages, pages, source, format);
        }
        offsets[unit] = offset;
    }
}

/// lse = m + ln l (natural) and the max logit of one (row, head); an empty row (l = 0) gets +∞ and −∞.
#[cube]
fn write_row_stats(lse: &mut [f32], max_logit: &mut [f32], out_row: usize, m: f32, l: f32) {
    let empty = l == 0.0f32;
    lse[out_row] = select(empty, f32::reinterpret(0x7f80_0000u32), m + f32::ln(l));
    max_logit[out_row] = select(empty, f32::reinterpret(0xff80_0000u32), m);
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla_kernel(
    q: &[u32],
    kv: &[u32],
    block_table: &[i32],
    indices: &[i32],
    out: &mut [u32],
    lse: &mut [f32],
    max_logit: &mut [f32],
    rows: usize,
    rows_per_batch: usize,
    h_q: usize,
    s_kv: usize,
    max_pages: usize,
    pages: usize,
    topk: usize,
    sm_scale: f32,
    #[comptime] heads: u32,
    #[comptime] block: u32,
    #[comptime] source: KvSource,
    #[comptime] format: Format,
) {
    let per_word = comptime!(format.per_word());
    let q_words = comptime!(D_QK as u32 / per_word) as usize;
    let v_words_per_unit = comptime!(D_V as u32 / per_word / UNITS);
    let head_blocks = h_q / heads as usize;
    let row = CUBE_POS / head_blocks;
    let head0 = (CUBE_POS % head_blocks) * heads as usize;
    let unit = UNIT_POS as usize;
    // The grid is rounded up to whole rows of cubes: cubes past the last query row do nothing.
    if row >= rows {
        terminate!();
    }
    let batch = row / rows_per_batch;

    // The block's kv rows in the problem's storage format (words).
    let mut kv_smem = Shared::<[u32]>::new_slice(comptime!(block as usize) * q_words);
    let mut offset_smem = Shared::<[u32]>::new_slice(block as usize);
    // Scores, then probabilities, of the block: [heads, block].
    let mut p_smem = Shared::<[f32]>::new_slice(comptime!((heads * block) as usize));
    // Per head: running max, running sum, and this block's rescale factor.
    let mut m_smem = Shared::<[f32]>::new_slice(heads as usize);
    let mut l_smem = Shared::<[f32]>::new_slice(heads as usize);
    let mut alpha_smem = Shared::<[f32]>::new_slice(heads as usize);
    // acc_o[head][word][lane]: this unit's output columns.
    let mut acc_o = Array::<f32>::new(comptime!((heads * v_words_per_unit * per_word) as usize));
    #[unroll]
    for i in 0..comptime!(heads * v_words_per_unit * per_word) {
        acc_o[i as usize] = 0.0f32;
    }
    if unit < heads as usize {
        // −2³⁰ rather than −∞: exp(m_old − m_new) stays finite while no index was valid.
        m_smem[unit] = -1073741824.0f32;
        l_smem[unit] = 0.0f32;
    }

    let mut start = 0usize;
    while start < topk {
        // Resolve this block's indices to kv rows (0xffff_ffff: invalid or past topk).
        resolve_block(
            indices,
            block_table,
            &mut offset_smem,
            row * topk,
            start,
            topk,
            batch,
            s_kv,
            max_pages,
            pages,
            block as usize,
            source,
            format,
        );
        sync_cube();
        // Gather (and dequantize) the rows into shared memory; invalid rows read as 0.
        let mut i = unit;
        while i < comptime!(block as usize) * q_words {
            let offset = offset_smem[i / q_words];
            let mut word = 0u32;
            if offset != 0xffff_ffffu32 {
                word = kv_word(kv, offset as usize, i % q_words, source, format);
            }
            kv_smem[i] = word;
            i += UNITS as usize;
        }
        sync_cube();

        // S = sm_scale · Q·Kᵀ for the block: one (head, slot) pair per unit and step.
        let mut pair = unit;
        while pair < comptime!((heads * block) as usize) {
            let head = pair / block as usize;
            let slot = pair % block as usize;
            let q_base = (row * h_q + head0 + head) * q_words;
            let mut dot = 0.0f32;
            for w in 0..q_words {
                let qw = q[q_base + w];
                let kw = kv_smem[slot * q_words + w];
                dot += unpack(qw, 0u32, format) * unpack(kw, 0u32, format);
                if comptime!(per_word == 2) {
                    dot += unpack(qw, 1u32, format) * unpack(kw, 1u32, format);
                }
            }
            p_smem[pair] = dot * sm_scale;
            pair += UNITS as usize;
        }
        sync_cube();

        // Online softmax per head: new max, rescale factor, P = exp(S − m) on valid slots.
        if unit < heads as usize {
            let m_old = m_smem[unit];
            let mut m_new = m_old;
            #[unroll]
            for slot in 0..block {
                if offset_smem[slot as usize] != 0xffff_ffffu32 {
                    m_new = f32::max(m_new, p_smem[unit * block as usize + slot as usize]);
                }
            }
            let alpha = f32::exp(m_old - m_new);
            let mut sum = 0.0f32;
            #[unroll]
            for slot in 0..block {
                let index = unit * block as usize + slot as usize;
                let p = select(
                    offset_smem[slot as usize] != 0xffff_ffffu32,
                    f32::exp(p_smem[index] - m_new),
                    0.0f32,
                );
                p_smem[index] = p;
                sum += p;
            }
            m_smem[unit] = m_new;
            l_smem[unit] = l_smem[unit] * alpha + sum;
            alpha_smem[unit] = alpha;
        }
        sync_cube();

        // O = O·alpha + P·V on this unit's columns.
        #[unroll]
        for head in 0..heads {
            let alpha = alpha_smem[head as usize];
            #[unroll]
            for vw in 0..v_words_per_unit {
                #[unroll]
                for lane in 0..per_word {
                    let a = ((head * v_words_per_unit + vw) * per_word + lane) as usize;
                    let word = unit + (vw * UNITS) as usize;
                    let mut value = acc_o[a] * alpha;
                    #[unroll]
                    for slot in 0..block {
                        let v = unpack(kv_smem[slot as usize * q_words + word], lane, format);
                        value += p_smem[(head * block + slot) as usize] * v;
                    }
                    acc_o[a] = value;
                }
            }
        }
        sync_cube();
        start += block as usize;
    }

    // out = O / l; an empty row (l = 0) gives 0, lse +∞ and max logit −∞.
    let v_words = comptime!(D_V as u32 / per_word) as usize;
    #[unroll]
    for head in 0..heads {
        let l = l_smem[head as usize];
        let inv_l = select(l > 0.0f32, 1.0f32 / l, 0.0f32);
        let out_row = row * h_q + head0 + head as usize;
        #[unroll]
        for vw in 0..v_words_per_unit {
            let a = ((head * v_words_per_unit + vw) * per_word) as usize;
            let mut hi = 0.0f32;
            if comptime!(per_word == 2) {
                hi = acc_o[a + 1] * inv_l;
            }
            out[out_row * v_words + unit + (vw * UNITS) as usize] = pack(acc_o[a] * inv_l, hi, format);
        }
        if unit == 0 {
            write_row_stats(lse, max_logit, out_row, m_smem[head as usize], l);
        }
    }
}

/// The f64 reference: attention of each query row over its valid kv rows (`kv_row(r, i)` gives row r's
/// index i as 576 values, or None when invalid). Returns (out, lse, max_logit), row-major [rows, h_q, …].
pub fn reference(
    q: &[f64],
    h_q: usize,
    topk: usize,
    indices: &[f64],
    scale: f64,
    kv_row: impl Fn(usize, i64) -> Option<Vec<f64>>,
) -> Vec<Vec<f64>> {
    let rows = indices.len() / topk;
    let (mut out, mut lse, mut max_logit) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rows {
        let valid: Vec<Vec<f64>> = indices[r * topk..][..topk]
            .iter()
            .filter_map(|i| kv_row(r, *i as i64))
            .collect();
        for h in 0..h_q {
            let q_row = &q[(r * h_q + h) * D_QK..][..D_QK];
            let scores: Vec<f64> = valid
                .iter()
                .map(|kv| scale * q_row.iter().zip(kv).map(|(a, b)| a * b).sum::<f64>())
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let l: f64 = weights.iter().sum();
            for d in 0..D_V {
                let o: f64 = valid.iter().zip(&weights).map(|(kv, w)| w * kv[d]).sum();
                out.push(if valid.is_empty() { 0.0 } else { o / l });
            }
            lse.push(if valid.is_empty() { f64::INFINITY } else { m + l.ln() });
            max_logit.push(m);
        }
    }
    vec![out, lse, max_logit]
}

/// The kernel definition of a variant for `nsa ir` and the snapshots.
pub fn define(variant: &Variant, target: IrTarget, source: KvSource, format: Format) -> KernelDefinition {
    let (heads, block) = tiles(variant);
    let (props, target_props) = ir_props(target);
    if is_cmma(variant) {
        let a = slice_arg;
        let head_tiles = heads as usize / CMMA_HEADS;
        return sparse_mla_cmma_kernel::SparseMlaCmmaKernel::new(
            ir_settings(CubeDim::new_1d(4 * head_tiles as u32 * target.plane_size())),
            props,
            target_props,
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            a(),
            (),
            (),
            (),
            (),
            (),
            (),
            (),
            (),
            head_tiles,
            source,
        )
        .define();
    }
    sparse_mla_kernel::SparseMlaKernel::new(
        ir_settings(CubeDim::new_1d(UNITS)),
        props,
        target_props,
        slice_arg(),
        slice_arg(),
        slice_arg(),
        slice_arg(),
        slice_arg(),
        slice_arg(),
        slice_arg(),
        (),
        (),
        (),
        (),
        (),
        (),
        (),
        (),
        heads,
        block,
        source,
        format,
    )
    .define()
}

/// Rows of kv per block and heads per tile of the tensor-core variants.
const CMMA_BLOCK: usize = 16;
const CMMA_HEADS: usize = 16;

/// Tensor-core variants (`cmma_h16`, `cmma_h32`; CUDA/HIP, bf16): a cube holds one query row and
/// `head_tiles` tiles of 16 heads, with four planes per head tile. Per block of 16 indices the kv rows are
/// gathered once into shared memory as bf16 (FP8 dequantized exactly) for all the cube's heads; S = Q·Kᵀ
/// runs as 16×16×16 matrix multiplies split four ways along d (9 steps per plane); the online softmax runs
/// on the 16×16 scores of each head tile; P·V runs as 32 column tiles per head tile (8 per plane) into
/// shared memory, and each unit folds its columns into O = O·alpha + P·V in registers (CubeCL's cmma
/// fragments cannot be rescaled per row).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla_cmma_kernel(
    q: &[u32],
    kv: &[u32],
    block_table: &[i32],
    indices: &[i32],
    out: &mut [u32],
    lse: &mut [f32],
    max_logit: &mut [f32],
    rows: usize,
    rows_per_batch: usize,
    h_q: usize,
    s_kv: usize,
    max_pages: usize,
    pages: usize,
    topk: usize,
    sm_scale: f32,
    #[comptime] head_tiles: usize,
    #[comptime] source: KvSource,
) {
    let format = comptime!(Format::Bf16);
    let heads = comptime!(head_tiles * CMMA_HEADS);
    let q_words = D_QK / 2;
    let head_blocks = h_q / heads;
    let row = CUBE_POS / head_blocks;
    let head0 = (CUBE_POS % head_blocks) * heads;
    let unit = UNIT_POS as usize;
    let plane = (UNIT_POS / PLANE_DIM) as usize;
    // Plane p works on head tile p / 4 and quarter p % 4 (of d for S, of the 32 column tiles for P·V).
    let tile = plane / 4;
    let quarter = plane % 4;
    // Unit u folds head tile u / 128, columns u % 128 + 128·c, into its registers.
    let my_tile = unit / 128;
    let column = unit % 128;
    if row >= rows {
        terminate!();
    }
    let batch = row / rows_per_batch;

    let mut q_tile = Shared::<[bf16]>::new_slice(comptime!(heads * D_QK));
    let mut kv_tile = Shared::<[bf16]>::new_slice(CMMA_BLOCK * D_QK);
    let mut p_tile = Shared::<[bf16]>::new_slice(comptime!(heads * CMMA_BLOCK));
    // Split-k partial scores ([head tile][quarter][16 × 16]), then P·V of the block ([heads, 512]).
    let mut s_parts = Shared::<[f32]>::new_slice(comptime!(4 * heads * CMMA_BLOCK));
    let mut pv = Shared::<[f32]>::new_slice(comptime!(heads * D_V));
    let mut offset_smem = Shared::<[u32]>::new_slice(CMMA_BLOCK);
    let mut m_smem = Shared::<[f32]>::new_slice(heads);
    let mut l_smem = Shared::<[f32]>::new_slice(heads);
    let mut alpha_smem = Shared::<[f32]>::new_slice(heads);
    // acc_o[head][c]: head my_tile·16 + head, column `column` + 128·c.
    let mut acc_o = Array::<f32>::new(CMMA_HEADS * 4);
    #[unroll]
    for i in 0..CMMA_HEADS * 4 {
        acc_o[i] = 0.0f32;
    }
    // Q of the cube's heads, once, as bf16.
    let mut i = unit;
    while i < comptime!(heads * D_QK / 2) {
        let word = q[(row * h_q + head0) * q_words + i];
        q_tile[2 * i] = bf16::cast_from(unpack(word, 0u32, format));
        q_tile[2 * i + 1] = bf16::cast_from(unpack(word, 1u32, format));
        i += CUBE_DIM as usize;
    }
    if unit < heads {
        m_smem[unit] = -1073741824.0f32;
        l_smem[unit] = 0.0f32;
    }

    let mut start = 0usize;
    while start < topk {
        resolve_block(
            indices,
            block_table,
            &mut offset_smem,
            row * topk,
            start,
            topk,
            batch,
            s_kv,
            max_pages,
            pages,
            CMMA_BLOCK,
            source,
            format,
        );
        sync_cube();
        let mut i = unit;
        while i < CMMA_BLOCK * q_words {
            let offset = offset_smem[i / q_words];
            let mut word = 0u32;
            if offset != 0xffff_ffffu32 {
                word = kv_word(kv, offset as usize, i % q_words, source, format);
            }
            let e = (i / q_words) * D_QK + (i % q_words) * 2;
            kv_tile[e] = bf16::cast_from(unpack(word, 0u32, format));
            kv_tile[e + 1] = bf16::cast_from(unpack(word, 1u32, format));
            i += CUBE_DIM as usize;
        }
        sync_cube();

        // S = Q·Kᵀ of head tile `tile` over d in [144·quarter, 144·quarter + 144).
        let acc = cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0f32,
        );
        #[unroll]
        for step in 0..9usize {
            let d0 = quarter * 144 + step * 16;
            let a = cmma::Matrix::<bf16>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &q_tile[tile * CMMA_HEADS * D_QK + d0..comptime!(heads * D_QK)],
                D_QK as u32,
            );
            let b = cmma::Matrix::<bf16>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::ColMajor,
                &kv_tile[d0..CMMA_BLOCK * D_QK],
                D_QK as u32,
            );
            cmma::execute(&a, &b, &acc, &acc);
        }
        cmma::store(
            &mut s_parts[plane * CMMA_HEADS * CMMA_BLOCK..comptime!(4 * heads * CMMA_BLOCK)],
            &acc,
            CMMA_BLOCK as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_cube();

        // Online softmax per head on the block's 16 scores; P to shared memory as bf16.
        if unit < heads {
            let parts = (unit / CMMA_HEADS) * 4 * 256 + (unit % CMMA_HEADS) * CMMA_BLOCK;
            let m_old = m_smem[unit];
            let mut m_new = m_old;
            #[unroll]
            for slot in 0..CMMA_BLOCK {
                let x = parts + slot;
                let score = (s_parts[x] + s_parts[x + 256] + s_parts[x + 512] + s_parts[x + 768]) * sm_scale;
                s_parts[x] = score;
                if offset_smem[slot] != 0xffff_ffffu32 {
                    m_new = f32::max(m_new, score);
                }
            }
            let alpha = f32::exp(m_old - m_new);
            let mut sum = 0.0f32;
            #[unroll]
            for slot in 0..CMMA_BLOCK {
                let p = select(
                    offset_smem[slot] != 0xffff_ffffu32,
                    f32::exp(s_parts[parts + slot] - m_new),
                    0.0f32,
                );
                // P enters the matrix multiply as bf16; the sum (and so lse) keeps f32, as FlashMLA does.
                p_tile[unit * CMMA_BLOCK + slot] = bf16::cast_from(p);
                sum += p;
            }
            m_smem[unit] = m_new;
            l_smem[unit] = l_smem[unit] * alpha + sum;
            alpha_smem[unit] = alpha;
        }
        sync_cube();

        // P·V of head tile `tile`: column tiles 8·quarter .. 8·quarter + 8 of the 32.
        let a = cmma::Matrix::<bf16>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &p_tile[tile * CMMA_HEADS * CMMA_BLOCK..comptime!(heads * CMMA_BLOCK)],
            CMMA_BLOCK as u32,
        );
        #[unroll]
        for n in 0..8usize {
            let n0 = (quarter * 8 + n) * 16;
            let b = cmma::Matrix::<bf16>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &kv_tile[n0..CMMA_BLOCK * D_QK],
                D_QK as u32,
            );
            let o = cmma::Matrix::<f32>::from_value(
                cmma::MatrixIdent::Accumulator,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::Undefined,
                0.0f32,
            );
            cmma::execute(&a, &b, &o, &o);
            cmma::store(
                &mut pv[tile * CMMA_HEADS * D_V + n0..comptime!(heads * D_V)],
                &o,
                D_V as u32,
                cmma::MatrixLayout::RowMajor,
            );
        }
        sync_cube();

        // O = O·alpha + P·V on this unit's columns.
        #[unroll]
        for head in 0..CMMA_HEADS {
            let h = my_tile * CMMA_HEADS + head;
            let alpha = alpha_smem[h];
            #[unroll]
            for c in 0..4usize {
                let a = head * 4 + c;
                acc_o[a] = acc_o[a] * alpha + pv[h * D_V + column + c * 128];
            }
        }
        sync_cube();
        start += CMMA_BLOCK;
    }

    // out = O / l (column pairs meet through shared memory, reusing `pv`); empty rows: 0, +∞, −∞.
    #[unroll]
    for head in 0..CMMA_HEADS {
        let h = my_tile * CMMA_HEADS + head;
        let l = l_smem[h];
        let inv_l = select(l > 0.0f32, 1.0f32 / l, 0.0f32);
        #[unroll]
        for c in 0..4usize {
            pv[h * D_V + column + c * 128] = acc_o[head * 4 + c] * inv_l;
        }
    }
    sync_cube();
    let mut w = unit;
    while w < comptime!(heads * D_V / 2) {
        let head = w / (D_V / 2);
        let out_row = row * h_q + head0 + head;
        out[out_row * (D_V / 2) + w % (D_V / 2)] = pack(pv[2 * w], pv[2 * w + 1], format);
        w += CUBE_DIM as usize;
    }
    if unit < heads {
        write_row_stats(lse, max_logit, row * h_q + head0 + unit, m_smem[unit], l_smem[unit]);
    }
}
