//! The sparse MLA attention core shared by prefill (bf16/f32 kv rows) and decode (the paged FP8 cache).
//!
//! For each query row r and head h, over the valid entries i of indices[r, :]:
//!   S_i = sm_scale · q[r, h, :] · kv_i          (576 = 512 latent + 64 rope)
//!   out[r, h, :] = Σ_i softmax(S)_i · kv_i[:512]
//!   lse[r, h] = log Σ_i exp(S_i) (natural), max_logit[r, h] = max_i S_i
//! An empty row gives out = 0, lse = +∞, max_logit = −∞.
//! Variants: `wgmma_h64` ([`wgmma`]: flash attention on Hopper's warpgroup MMA, Q and kv in swizzled shared
//! tiles, CUDA sm_90a, bf16), `mma_h64`/`mma_h64_k32`/`mma_h32` ([`mma`]: flash attention on warp `mma.sync` with O in
//! registers, CUDA, bf16), `cmma_h16`/`cmma_h32` ([`cmma`]: 16×16×16 tensor-core tiles, CUDA/HIP, bf16) and
//! `simt_h16`/`simt_h8` ([`simt`]: scalar FMAs, everywhere). All gather the rows of a block of indices
//! into shared memory ([`gather`]: FP8 dequantized exactly), keep an online softmax per head, and
//! accumulate P·V.
mod cmma;
mod combine;
mod gather;
mod mma;
mod output;
mod simt;
mod wgmma;
mod wgmma_pair;

use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::TensorSpec;
use crate::{KernelError, Problem, Variant};
use cmma::{CMMA_BLOCK, CMMA_HEADS, sparse_mla_cmma_kernel};
use combine::combine_splits_kernel;
use cubecl::prelude::*;
use cubecl::server::Handle;
use mma::sparse_mla_mma_kernel;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;
use serde::{Deserialize, Serialize};
use simt::sparse_mla_kernel;
use wgmma::sparse_mla_wgmma_kernel;
use wgmma_pair::sparse_mla_wgmma_pair_kernel;

pub const UNITS: u32 = 128;
pub const D_QK: usize = 576;
pub const D_V: usize = 512;
/// Tokens per page of the FP8 cache, and 32-bit words per cached token (656 bytes).
pub const PAGE_SIZE: usize = 64;
pub const TOKEN_WORDS: usize = 164;
/// 16-byte chunks of one column block (64 rows × 128 bytes) of the tensor-core kernels' swizzled tiles.
const COLUMN_BLOCK: usize = 64 * 8;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "wgmma_h64",
        summary: "flash attention on warpgroup MMA: 64 heads (2 warpgroups), 64 indices per block, Q and kv in swizzled shared tiles, gather one block ahead (CUDA sm_90a, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_h64_pair",
        summary: "flash attention on warpgroup MMA over pairs of 64-index blocks: each of 2 warpgroups (64 heads) takes S of one block and half of O, halves of the kv buffers refilled by their last reader behind mbarriers (CUDA sm_90a, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_h64_ws",
        summary: "wgmma_h64_pair with a producer warpgroup: a third warpgroup gathers every kv half (cp.async or FP8 dequantization) once its last reader frees it, and hands its registers to the two consumers (setmaxnreg: 232 each) (CUDA sm_90a, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "mma_h64",
        summary: "flash attention on mma.sync: 64 heads (8 planes, O in registers), 64 indices per block, one kv buffer (CUDA, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "mma_h64_k32",
        summary: "flash attention on mma.sync: 64 heads, 32 indices per block, gather one block ahead (CUDA, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "mma_h32",
        summary: "flash attention on mma.sync: 32 heads (4 planes), 64 indices per block, gather one block ahead (CUDA, bf16)",
        needs_plane_ops: true,
    },
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
        "mma_h64" | "wgmma_h64" | "wgmma_h64_pair" | "wgmma_h64_ws" => (64, 64),
        "mma_h64_k32" => (64, 32),
        "mma_h32" => (32, 64),
        "cmma_h32" => (32, 16),
        "cmma_h16" => (16, 16),
        "simt_h16" => (16, 8),
        _ => (8, 8),
    }
}

/// Shared memory of a variant: the kv tile (storage words), row offsets, P, and three floats per head; for
/// `cmma_h16`, bf16 Q and kv tiles, P, the split-k scores and the block's P·V.
pub fn shared_memory_bytes(variant: &Variant, format: Format) -> usize {
    if is_paired(variant) {
        return wgmma_pair::shared_memory_bytes();
    }
    if is_wgmma(variant) {
        return wgmma::shared_memory_bytes();
    }
    if is_mma(variant) {
        let (heads, block) = tiles(variant);
        return mma::shared_memory_bytes(heads as usize, block as usize, mma_stages(variant));
    }
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
    if problem.dim("h_q") == 0 || !problem.dim("h_q").is_multiple_of(16) {
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

/// The wmma tensor-core variants.
fn is_cmma(variant: &Variant) -> bool {
    variant.name.starts_with("cmma")
}

/// The flash-attention variants on warp `mma.sync`.
fn is_mma(variant: &Variant) -> bool {
    variant.name.starts_with("mma")
}

/// The variants on [`wgmma_pair`]'s kernel.
fn is_paired(variant: &Variant) -> bool {
    matches!(variant.name, "wgmma_h64_pair" | "wgmma_h64_ws")
}

/// The flash-attention variant on warpgroup MMA.
fn is_wgmma(variant: &Variant) -> bool {
    variant.name.starts_with("wgmma")
}

/// The flash-attention variants (split-KV with a combine step).
fn is_flash(variant: &Variant) -> bool {
    is_mma(variant) || is_wgmma(variant)
}

/// kv buffers of a flash-attention variant: 2 gathers the next block while one is used.
fn mma_stages(variant: &Variant) -> usize {
    if variant.name == "mma_h64" { 1 } else { 2 }
}

/// What the tensor-core variants need beyond the default checks: bf16 tensor cores and bf16 tensors.
pub fn supports(variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
    if !(is_cmma(variant) || is_flash(variant)) {
        return Ok(());
    }
    if !problem.dim("h_q").is_multiple_of(tiles(variant).0 as usize) {
        return Err(format!("needs h_q a multiple of {}", tiles(variant).0));
    }
    if is_wgmma(variant) {
        crate::spec::needs_wgmma(features)?;
    } else if is_mma(variant) && (!features.mma_m16n8k16_bf16 || features.plane_size != 32) {
        return Err("needs warp mma.sync m16n8k16 bf16 (CUDA)".into());
    } else if is_cmma(variant) && !features.cmma_bf16 {
        return Err("needs bf16 tensor cores (cmma)".into());
    }
    if problem.format != Format::Bf16 {
        return Err(format!("needs bf16 tensors, got {}", problem.format));
    }
    Ok(())
}

pub fn supports_target(variant: &Variant, target: IrTarget) -> bool {
    if is_flash(variant) {
        return target == IrTarget::Cuda;
    }
    !is_cmma(variant) || matches!(target, IrTarget::Cuda | IrTarget::Hip)
}

/// The tensor-core variants compute in bf16 only.
pub fn supports_format(variant: &Variant, format: Format) -> bool {
    !(is_cmma(variant) || is_flash(variant)) || format == Format::Bf16
}

/// Split-KV counts for the flash-attention variants (the others do not split); 0, the problems' default, is
/// [`resolve_splits`]' fill-the-device rule.
pub fn tunable_params(variant: &Variant) -> &'static [(&'static str, &'static [f64])] {
    if is_flash(variant) {
        &[("num_splits", &[1.0, 2.0, 4.0, 8.0, 16.0])]
    } else {
        &[]
    }
}

/// Sizes a launch needs besides the buffers.
pub struct Launch {
    pub rows: usize,
    pub rows_per_batch: usize,
    pub h_q: usize,
    /// kv rows; for the FP8 cache, its tokens when indices are physical, 0 when they are logical positions
    /// mapped through the block table.
    pub s_kv: usize,
    pub max_pages: usize,
    pub pages: usize,
    pub topk: usize,
    pub sm_scale: f32,
    /// Split-KV: cubes per (row, head block) over the row's blocks, merged by a second kernel (flash-attention
    /// variants only); 0 picks enough to fill the device's multiprocessors.
    pub splits: usize,
}

/// The split count `requested` resolves to: given, or (0) enough cubes for two per multiprocessor when the
/// grid has fewer, at most 16 and at most one per block of the longest row.
pub fn resolve_splits(requested: usize, cubes: usize, blocks: usize, multiprocessors: usize) -> usize {
    let splits = if requested > 0 {
        requested
    } else if cubes >= multiprocessors {
        1
    } else {
        (2 * multiprocessors).div_ceil(cubes.max(1)).min(16)
    };
    splits.clamp(1, blocks.max(1))
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
        splits,
    } = sizes;
    let client = &device.client;
    if is_flash(variant) {
        let [q, kv] = [buffers[0], buffers[1]].map(|(handle, len)| buffer(handle, len / 4));
        let cubes = rows * h_q / heads as usize;
        let sms = device.features().multiprocessors.unwrap_or(1) as usize;
        let splits = resolve_splits(splits, cubes, topk.div_ceil(block as usize), sms);
        let pairs = rows * h_q;
        // Partial outputs only with splits; 1-element placeholders fill the bindings otherwise.
        let part_len = |n: usize| if splits > 1 { splits * n } else { 1 };
        let o_part = client.empty(4 * part_len(pairs * D_V));
        let lse_part = client.empty(4 * part_len(pairs));
        let max_part = client.empty(4 * part_len(pairs));
        let [o_part_arg, lse_part_arg, max_part_arg] = [(&o_part, pairs * D_V), (&lse_part, pairs), (&max_part, pairs)]
            .map(|(handle, n)| buffer(handle, part_len(n)));
        // The flash kernels take the same arguments; the mma one adds its tile shape before `source`.
        macro_rules! launch_flash {
            ($kernel:ident, $units:expr $(, $extra:expr)*) => {
                $kernel::launch(
                    client,
                    grid(cubes * splits),
                    CubeDim::new_1d($units),
                    4,
                    q,
                    kv,
                    table,
                    indices,
                    out,
                    lse,
                    max_logit,
                    o_part_arg,
                    lse_part_arg,
                    max_part_arg,
                    rows,
                    rows_per_batch,
                    h_q,
                    s_kv,
                    max_pages,
                    pages,
                    topk,
                    splits,
                    sm_scale,
                    $($extra,)*
                    source,
                )
            };
        }
        if variant.name == "wgmma_h64_pair" {
            launch_flash!(sparse_mla_wgmma_pair_kernel, wgmma_pair::UNITS, false);
        } else if variant.name == "wgmma_h64_ws" {
            launch_flash!(sparse_mla_wgmma_pair_kernel, wgmma_pair::PRODUCER_UNITS, true);
        } else if is_wgmma(variant) {
            launch_flash!(sparse_mla_wgmma_kernel, wgmma::UNITS);
        } else {
            // Two planes (output halves) per 16-head group; q and kv read as 16-byte vectors.
            let groups = heads as usize / 16;
            launch_flash!(
                sparse_mla_mma_kernel,
                64 * groups as u32,
                groups,
                block as usize,
                mma_stages(variant)
            );
        }
        if splits > 1 {
            let [out, lse, max_logit] = [buffers[4], buffers[5], buffers[6]].map(|(handle, len)| buffer(handle, len));
            combine_splits_kernel::launch(
                client,
                grid(pairs),
                CubeDim::new_1d(128),
                buffer(&o_part, splits * pairs * D_V),
                buffer(&lse_part, splits * pairs),
                buffer(&max_part, splits * pairs),
                out,
                lse,
                max_logit,
                pairs,
                splits,
                format,
            );
        }
    } else if is_cmma(variant) {
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
    /// The paged FP8 cache [pages, 64, 656 B]: indices are physical slots, or logical positions found
    /// through block_table[batch, i / 64] (page) and i % 64 (slot) (see `kv_row_offset`).
    Fp8Paged,
    /// Dense decode over a paged cache [pages, 64, 576] in the problem's format: no index list; a row sees
    /// every position of its sequence up to its causal limit (`indices` holds the batches' seqlens).
    Bf16Paged,
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
    let (props, target_props) = nsa_backends::ir_properties(target);
    // The flash kernels take the same arguments; the mma one adds its tile shape before `source`.
    macro_rules! define_flash {
        ($kernel:path, $units:expr $(, $extra:expr)*) => {{
            let a = slice_arg;
            $kernel(
                ir_settings(CubeDim::new_1d($units)),
                props,
                target_props,
                a(),
                a(),
                a(),
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
                (),
                4,
                $($extra,)*
                source,
            )
            .define()
        }};
    }
    if variant.name == "wgmma_h64_pair" {
        return define_flash!(
            sparse_mla_wgmma_pair_kernel::SparseMlaWgmmaPairKernel::new,
            wgmma_pair::UNITS,
            false
        );
    }
    if variant.name == "wgmma_h64_ws" {
        return define_flash!(
            sparse_mla_wgmma_pair_kernel::SparseMlaWgmmaPairKernel::new,
            wgmma_pair::PRODUCER_UNITS,
            true
        );
    }
    if is_wgmma(variant) {
        return define_flash!(sparse_mla_wgmma_kernel::SparseMlaWgmmaKernel::new, wgmma::UNITS);
    }
    if is_mma(variant) {
        let groups = heads as usize / 16;
        return define_flash!(
            sparse_mla_mma_kernel::SparseMlaMmaKernel::new,
            64 * groups as u32,
            groups,
            block as usize,
            mma_stages(variant)
        );
    }
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
