//! Lightning indexer logits over the paged FP8 K cache (DeepSeek-V3.2 DSA; decode, and prefill against a
//! cached prefix).
//!
//! logits[t, s] = Σ_h w[t, h] · ReLU(k_scale[s] · Σ_d q[t, h, d] · k[s, d])  for s ≤ q_pos[t] on a mapped page,
//! else −∞; s is a position in query t's sequence q_seq[t], found through its block table.
//! - q [t, h, d] e4m3 bytes (the per-(t, h) scale folded into w [t, h] f32);
//! - cache [pages, 64, d + 4] bytes: a page holds 64 tokens' d e4m3 bytes, then their 64 f32 scales
//!   (132 bytes per token for d = 128);
//! - block_table [b, max_pages] i32 (a sequence's logical page → physical page; −1 = none), q_seq [t] i32
//!   (query t's sequence), q_pos [t] i32 (its position: the last key it sees);
//! - logits [t, 64·max_pages] f32.
//!
//! Decode is t = b·next_n queries (q_seq = t / next_n, q_pos = length − next_n + t % next_n); a ragged
//! prefill chunk names each query's sequence and position the same way.
//! Variants: `wgmma` (Hopper, [`crate::indexer_fp8_wgmma`]), `key_per_unit` (one unit per (t, s), everywhere) and `mma` (warp `mma.sync` on f16, CUDA):
//! e4m3 is widened to f16 exactly by moving bits (the value times 2⁻⁸, folded back after the sum).
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{DType, HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::f16;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::{e4m3x4_dot_add, e4m3x8_to_f16_chunk};
use nsa_dsl::host;
use nsa_dsl::warp_mma::{AccPair, b_tile, load_x4, mma_into};
use rand::Rng;

const UNITS: u32 = 128;
const PAGE: usize = 64;
/// Queries per cube of the `mma` variant (their heads share the cube's page of keys when they share a
/// sequence, as decode's next_n queries do).
const QUERIES: usize = 2;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "wgmma",
        summary: "Hopper warpgroup MMA on e4m3: one query × 16 pages per cube, Q staged once, key pages streamed \
                  by cp.async, keys as A (64 × 128)",
        needs_plane_ops: true,
    },
    Variant {
        name: "mma",
        summary: "tensor cores (mma.sync f16): 2 queries × one 64-key page per cube (CUDA)",
        needs_plane_ops: true,
    },
    Variant {
        name: "key_per_unit",
        summary: "one unit per (query, key), heads looped",
        needs_plane_ops: false,
    },
];

/// The word offset of query `token`'s key page `page` in the cache, or 0xffff_ffff when not mapped.
#[cube]
fn page_offset(
    block_table: &[i32],
    q_seq: &[i32],
    token: usize,
    page: usize,
    max_pages: usize,
    pages: usize,
    page_words: usize,
) -> u32 {
    let seq = q_seq[token];
    let mut offset = 0xffff_ffffu32;
    if seq >= 0 {
        let physical = block_table[seq as usize * max_pages + page];
        if physical >= 0 && (physical as usize) < pages {
            offset = (physical as usize * page_words) as u32;
        }
    }
    offset
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn indexer_fp8_kernel(
    q: &[u32],
    w: &[f32],
    cache: &[u32],
    block_table: &[i32],
    q_seq: &[i32],
    q_pos: &[i32],
    logits: &mut [f32],
    t: usize,
    heads: usize,
    dim: usize,
    max_pages: usize,
    pages: usize,
) {
    let s = max_pages * PAGE;
    let blocks_per_token = s.div_ceil(CUBE_DIM as usize);
    let token = CUBE_POS / blocks_per_token;
    let key = (CUBE_POS % blocks_per_token) * CUBE_DIM as usize + UNIT_POS as usize;
    if token >= t || key >= s {
        terminate!();
    }
    let words = dim / 4;
    let page_words = PAGE * (words + 1);
    let offset = page_offset(block_table, q_seq, token, key / PAGE, max_pages, pages, page_words);
    let mut score = f32::reinterpret(0xff80_0000u32);
    if offset != 0xffff_ffffu32 && key as i32 <= q_pos[token] {
        let slot = key % PAGE;
        let k_base = offset as usize + slot * words;
        let k_scale = f32::reinterpret(cache[offset as usize + PAGE * words + slot]);
        score = 0.0f32;
        for h in 0..heads {
            let q_base = (token * heads + h) * words;
            let mut dot = 0.0f32;
            for i in 0..words {
                dot = e4m3x4_dot_add(dot, q[q_base + i], cache[k_base + i]);
            }
            score += w[token * heads + h] * f32::max(dot * k_scale, 0.0f32);
        }
    }
    logits[token * s + key] = score;
}

/// Stages `rows` rows of `row_words` e4m3 words from `source[base + r·row_words]` as f16 16-byte chunks
/// (rows of `row_chunks`, one of padding) into `destination[first_row..]`; `base` 0xffff_ffff: zeros.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_rows(
    source: &[u32],
    base: u32,
    destination: &mut [Vector<u32, Const<4>>],
    first_row: usize,
    #[comptime] rows: usize,
    #[comptime] row_words: usize,
) {
    let chunks = comptime!(row_words / 2);
    let row_chunks = comptime!(row_words / 2 + 1);
    let mut i = UNIT_POS as usize;
    while i < comptime!(rows * row_words / 2) {
        let (r, c) = (i / chunks, i % chunks);
        let mut chunk = Vector::<u32, Const<4>>::new(0u32);
        if base != 0xffff_ffffu32 {
            let at = base as usize + r * row_words + 2 * c;
            chunk = e4m3x8_to_f16_chunk(source[at], source[at + 1]);
        }
        destination[(first_row + r) * row_chunks + c] = chunk;
        i += CUBE_DIM as usize;
    }
}

/// Tensor-core variant: a cube holds QUERIES queries and one logical page (64 keys). Their q rows and each
/// query's key page (once when the queries share it) are staged as f16 in shared memory; plane p computes
/// the scores of 16 heads of query p / (heads / 16) against the 64 keys (m16n8k16), applies ReLU and the
/// weights and sums its 16 heads with quad-group shuffles; the cube then sums the head groups, applies the
/// key scales (and 2¹⁶ for the two 2⁻⁸ factors) and writes −∞ where not allowed.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn indexer_fp8_mma_kernel(
    q: &[u32],
    w: &[f32],
    cache: &[u32],
    block_table: &[i32],
    q_seq: &[i32],
    q_pos: &[i32],
    logits: &mut [f32],
    t: usize,
    max_pages: usize,
    pages: usize,
    #[comptime] heads: usize,
    #[comptime] dim: usize,
) {
    let words = comptime!(dim / 4);
    let row_chunks = comptime!(dim / 8 + 1);
    let groups = comptime!(heads / 16);
    let s = max_pages * PAGE;
    let page = CUBE_POS % max_pages;
    let token0 = (CUBE_POS / max_pages) * QUERIES;
    if token0 >= t {
        terminate!();
    }
    let page_words = PAGE * (words + 1);
    let plane = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, tq) = (lane / 4, lane % 4);
    let query = plane / groups;
    let head0 = (plane % groups) * 16;

    let mut q_s =
        Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(comptime!(QUERIES * heads * (dim / 8 + 1)), 16usize);
    let mut k_s =
        Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(comptime!(QUERIES * PAGE * (dim / 8 + 1)), 16usize);
    let mut partial = Shared::<[f32]>::new_slice(comptime!(QUERIES * groups * PAGE));
    let mut offsets = Shared::<[u32]>::new_slice(QUERIES);
    let mut tiles = Shared::<[u32]>::new_slice(QUERIES);

    let unit = UNIT_POS as usize;
    if unit < QUERIES {
        let token = select(token0 + unit < t, token0 + unit, t - 1);
        offsets[unit] = page_offset(block_table, q_seq, token, page, max_pages, pages, page_words);
    }
    sync_cube();
    // A query whose page an earlier query of the cube has reuses that one's tile.
    if UNIT_POS == 0 {
        #[unroll]
        for j in 0..QUERIES {
            let mut tile = 0u32;
            let mut found = false;
            #[unroll]
            for i in 0..comptime!(j + 1) {
                if !found && offsets[i] == offsets[j] {
                    tile = i as u32;
                    found = true;
                }
            }
            tiles[j] = tile;
        }
    }
    sync_cube();
    // Queries past t (a partial last pair) repeat the last query and are not written.
    #[unroll]
    for j in 0..QUERIES {
        let token = select(token0 + j < t, token0 + j, t - 1);
        stage_rows(q, (token * heads * words) as u32, &mut q_s, j * heads, heads, words);
        if tiles[j] == j as u32 {
            stage_rows(cache, offsets[j], &mut k_s, j * PAGE, PAGE, words);
        }
    }
    sync_cube();

    // S[16 heads × 64 keys] = q · kᵀ (f16 values × 2⁻⁸ each).
    let mut acc = Array::<AccPair>::new(16usize);
    #[unroll]
    for n in 0..16usize {
        acc[n] = AccPair::new(0.0f32);
    }
    let q_row = (query * heads + head0 + lane % 16) * row_chunks + lane / 16;
    let k_row = (tiles[query] as usize * PAGE + lane % 8 + 8 * (lane / 16)) * row_chunks + (lane / 8) % 2;
    #[unroll]
    for k in 0..comptime!(dim / 16) {
        let a = load_x4::<f16, Const<4>>(&q_s, q_row + 2 * k, false);
        #[unroll]
        for kb in 0..4usize {
            let b = load_x4::<f16, Const<4>>(&k_s, k_row + kb * 16 * row_chunks + 2 * k, false);
            mma_into(&mut acc, 2 * kb, &a, &b_tile(&b, 0usize));
            mma_into(&mut acc, 2 * kb + 1, &a, &b_tile(&b, 2usize));
        }
    }

    // Σ over this plane's 16 heads of w · ReLU(S): rows g and g + 8 in each lane, then across the 8 lane
    // groups sharing a column (xor 4, 8, 16).
    let token = select(token0 + query < t, token0 + query, t - 1);
    let w0 = w[token * heads + head0 + g];
    let w1 = w[token * heads + head0 + g + 8];
    #[unroll]
    for n in 0..8usize {
        #[unroll]
        for e in 0..2usize {
            let mut sum =
                w0 * f32::max(acc[2 * n].extract(e), 0.0f32) + w1 * f32::max(acc[2 * n + 1].extract(e), 0.0f32);
            sum += plane_shuffle_xor(sum, 4u32);
            sum += plane_shuffle_xor(sum, 8u32);
            sum += plane_shuffle_xor(sum, 16u32);
            if g == 0 {
                partial[plane * PAGE + n * 8 + 2 * tq + e] = sum;
            }
        }
    }
    sync_cube();

    // Sum the head groups; scale, mask and write (cubes of 2 planes have fewer units than outputs).
    let mut out = unit;
    while out < comptime!(QUERIES * PAGE) {
        let (j, key) = (out / PAGE, out % PAGE);
        let token = token0 + j;
        if token < t {
            let mut score = f32::reinterpret(0xff80_0000u32);
            let offset = offsets[j];
            let position = page * PAGE + key;
            if offset != 0xffff_ffffu32 && position as i32 <= q_pos[token] {
                let mut sum = 0.0f32;
                #[unroll]
                for p in 0..groups {
                    sum += partial[(j * groups + p) * PAGE + key];
                }
                let k_scale = f32::reinterpret(cache[offset as usize + PAGE * words + key]);
                score = sum * k_scale * 65536.0f32;
            }
            logits[token * s + position] = score;
        }
        out += CUBE_DIM as usize;
    }
}

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("q", &["t", "h", "d"], Storage::U8),
    TensorSpec::new("w", &["t", "h"], Storage::F32),
    TensorSpec::new("cache", &["pages", "page_size", "token_bytes"], Storage::U8),
    TensorSpec::new("block_table", &["b", "max_pages"], Storage::I32),
    TensorSpec::new("q_seq", &["t"], Storage::I32),
    TensorSpec::new("q_pos", &["t"], Storage::I32),
];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("logits", &["t", "64*max_pages"], Storage::F32)];

fn dims(t: usize, h: usize, d: usize, b: usize, pages: usize, max_pages: usize) -> Vec<(&'static str, usize)> {
    vec![
        ("t", t),
        ("h", h),
        ("d", d),
        ("b", b),
        ("pages", pages),
        ("page_size", PAGE),
        ("token_bytes", d + 4),
        ("max_pages", max_pages),
    ]
}

/// The bytes of one cache page holding `keys` (64 × d values, quantized with a power-of-two scale each).
fn quantize_page(keys: &[f32], d: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(PAGE * (d + 4));
    let mut scales = Vec::with_capacity(PAGE * 4);
    for key in keys.chunks(d) {
        let scale = host::e4m3_group_scale(key.iter().fold(0f32, |m, v| m.max(v.abs())));
        bytes.extend(key.iter().map(|v| host::f32_to_e4m3(v / scale)));
        scales.extend(scale.to_le_bytes());
    }
    bytes.extend(scales);
    bytes
}

pub struct IndexerFp8;

impl Kernel for IndexerFp8 {
    fn name(&self) -> &'static str {
        "indexer_logits_fp8"
    }
    fn summary(&self) -> &'static str {
        "indexer logits over the paged FP8 K cache: Σ_h w·ReLU(k_scale·q·k) for s ≤ q_pos in q_seq's pages"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        INPUTS
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        OUTPUTS
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        // next_n: queries per sequence (decode; 0 = a ragged prefill mix). bench: 1 fills the cache with
        // random codes instead of quantizing (millions of tokens).
        &[("next_n", 2.0), ("bench", 0.0)]
    }
    fn formats(&self) -> &'static [Format] {
        &[Format::F32]
    }
    fn problems(&self) -> Vec<Problem> {
        // (t, h, d, b, pages, max_pages, next_n): decode with MTP (2 per sequence), one query per sequence,
        // a ragged prefill mix, the tiny model's 8 heads × 32, an odd query count.
        [
            (6, 64, 128, 3, 10, 3, 2.0),
            (3, 64, 128, 3, 7, 2, 1.0),
            (7, 16, 64, 2, 6, 3, 0.0),
            (5, 8, 32, 5, 12, 2, 1.0),
        ]
        .into_iter()
        .map(|(t, h, d, b, pages, max_pages, next_n)| {
            Problem::new(
                Format::F32,
                &dims(t, h, d, b, pages, max_pages),
                &[("next_n", next_n), ("bench", 0.0)],
            )
        })
        .collect()
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // Decode: b 128, next_n 1 and 2, 32K context (512 pages per sequence), 64 heads × 128.
        [1usize, 2]
            .into_iter()
            .map(|next_n| {
                Problem::new(
                    Format::F32,
                    &dims(128 * next_n, 64, 128, 128, 128 * 512, 512),
                    &[("next_n", next_n as f64), ("bench", 1.0)],
                )
            })
            .collect()
    }
    fn ir_problem(&self, _: Format) -> Problem {
        Problem::new(
            Format::F32,
            &dims(256, 64, 128, 128, 65536, 512),
            &[("next_n", 2.0), ("bench", 1.0)],
        )
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        let invalid = |field, expected: &str, got: String| KernelError::InvalidProblem {
            kernel: "indexer_logits_fp8",
            field,
            expected: expected.into(),
            got,
        };
        let d = problem.dim("d");
        if d == 0 || !d.is_multiple_of(8) {
            return Err(invalid("d", "a positive multiple of 8", d.to_string()));
        }
        if problem.dim("page_size") != PAGE || problem.dim("token_bytes") != d + 4 {
            return Err(invalid(
                "page_size",
                "64 tokens of d + 4 bytes (d e4m3 values and an f32 scale)",
                format!(
                    "{} tokens of {} bytes",
                    problem.dim("page_size"),
                    problem.dim("token_bytes")
                ),
            ));
        }
        Ok(())
    }
    fn requirements(&self, variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
        if variant.name == "wgmma" {
            crate::spec::needs_wgmma(features)?;
            return crate::indexer_fp8_wgmma::shape_requirements(problem);
        }
        if variant.name == "mma" {
            if !features.mma_m16n8k16_bf16 || features.plane_size != 32 {
                return Err("needs warp mma.sync m16n8k16 (CUDA)".into());
            }
            let (h, d) = (problem.dim("h"), problem.dim("d"));
            if h % 16 != 0 || d % 16 != 0 || QUERIES * h / 16 > 32 {
                return Err(format!("needs h and d multiples of 16 and h ≤ 256, got h={h} d={d}"));
            }
        }
        Ok(())
    }
    fn supports_target(&self, variant: &Variant, target: IrTarget) -> bool {
        !matches!(variant.name, "mma" | "wgmma") || target == IrTarget::Cuda
    }
    fn shared_memory_bytes(&self, variant: &Variant, problem: &Problem) -> usize {
        let (h, d) = (problem.dim("h"), problem.dim("d"));
        match variant.name {
            "wgmma" => crate::indexer_fp8_wgmma::shared_memory_bytes(),
            "mma" => 16 * (d / 8 + 1) * QUERIES * (h + PAGE) + 4 * QUERIES * (h / 16) * PAGE + 16,
            _ => 0,
        }
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // Every (t, s) pair of the logits: 2·d per head plus ReLU·w.
        (problem.dim("t") * 64 * problem.dim("max_pages") * problem.dim("h") * (2 * problem.dim("d") + 2)) as u64
    }
    fn bytes(&self, problem: &Problem) -> u64 {
        // q, w, tables and logits, plus each sequence's pages read once.
        let (t, h, d, b, max_pages) = (
            problem.dim("t"),
            problem.dim("h"),
            problem.dim("d"),
            problem.dim("b"),
            problem.dim("max_pages"),
        );
        (t * h * (d + 4) + b * max_pages * (4 + PAGE * (d + 4)) + t * (8 + 4 * PAGE * max_pages)) as u64
    }
    fn tolerance(&self, _: &TensorSpec, _: &Problem) -> f64 {
        1e-5
    }
    fn variant_tolerance(&self, variant: &Variant, output: &TensorSpec, problem: &Problem) -> f64 {
        // Hopper's FP8 products accumulate with about 14 bits (see indexer_fp8_wgmma).
        if variant.name == "wgmma" {
            1e-3
        } else {
            self.tolerance(output, problem)
        }
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let (t, h, d, b) = (problem.dim("t"), problem.dim("h"), problem.dim("d"), problem.dim("b"));
        let (pages, max_pages) = (problem.dim("pages"), problem.dim("max_pages"));
        let bench = problem.param("bench") != 0.0;
        // q: e4m3 codes of N(0, 16²) values (the per-head scale lives in w); w keeps logits O(1).
        let q: Vec<u8> = crate::check::normal(rng, t * h * d)
            .iter()
            .map(|v| host::f32_to_e4m3((v * 16.0).clamp(-448.0, 448.0)))
            .collect();
        let w_scale = 1.0 / (16.0 * ((d * h) as f32).sqrt());
        let w: Vec<f32> = crate::check::normal(rng, t * h).iter().map(|v| v * w_scale).collect();
        let cache: Vec<u8> = if bench {
            // Random non-NaN codes and a scale of 2⁻⁸ per token.
            let mut bytes = Vec::with_capacity(pages * PAGE * (d + 4));
            for _ in 0..pages {
                bytes.extend((0..PAGE * d).map(|_| rng.random::<u8>() & 0xf6));
                bytes.extend((0..PAGE).flat_map(|_| (2f32.powi(-8)).to_le_bytes()));
            }
            bytes
        } else {
            (0..pages)
                .flat_map(|_| quantize_page(&crate::check::normal(rng, PAGE * d), d))
                .collect()
        };
        // Disjoint physical pages per sequence; one sequence with an unmapped page in its middle.
        let mut physical: Vec<i32> = (0..pages as i32).collect();
        if !bench {
            use rand::seq::SliceRandom;
            physical.shuffle(rng);
        }
        let mut table = vec![-1i32; b * max_pages];
        let per_seq = (pages / b).clamp(1, max_pages);
        for seq in 0..b {
            for p in 0..per_seq {
                table[seq * max_pages + p] = physical.get(seq * per_seq + p).copied().unwrap_or(-1);
            }
        }
        if !bench && per_seq > 2 {
            table[per_seq / 2] = -1;
        }
        let length = per_seq * PAGE;
        // Queries: next_n consecutive positions at the end of each sequence (decode), or a ragged mix
        // (next_n = 0): random sequences and positions, one query that sees nothing.
        let next_n = problem.param("next_n") as usize;
        let (mut q_seq, mut q_pos) = (Vec::with_capacity(t), Vec::with_capacity(t));
        for i in 0..t {
            if let Some(seq) = i.checked_div(next_n) {
                let seq = seq.min(b - 1);
                q_seq.push(seq as i32);
                q_pos.push((length - next_n + i % next_n) as i32 - if bench { 0 } else { rng.random_range(0..40) });
            } else {
                q_seq.push(rng.random_range(0..b) as i32);
                q_pos.push(if i == 1 { -1 } else { rng.random_range(0..length) as i32 });
            }
        }
        vec![
            HostTensor::from_u8("q", &[t, h, d], &q),
            HostTensor::from_f32("w", &[t, h], DType::F32, &w),
            HostTensor::from_u8("cache", &[pages, PAGE, d + 4], &cache),
            HostTensor::from_i32("block_table", &[b, max_pages], &table),
            HostTensor::from_i32("q_seq", &[t], &q_seq),
            HostTensor::from_i32("q_pos", &[t], &q_pos),
        ]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (t, h, d) = (problem.dim("t"), problem.dim("h"), problem.dim("d"));
        let (pages, max_pages) = (problem.dim("pages"), problem.dim("max_pages"));
        let s = PAGE * max_pages;
        let decode = |bytes: &[u8]| -> Vec<f64> { bytes.iter().map(|b| host::e4m3_to_f32(*b) as f64).collect() };
        let q = decode(&host::words_to_bytes(&inputs[0].words));
        let w = inputs[1].to_f64();
        let cache = host::words_to_bytes(&inputs[2].words);
        let (table, q_seq, q_pos) = (inputs[3].to_f64(), inputs[4].to_f64(), inputs[5].to_f64());
        let page_bytes = PAGE * (d + 4);
        let mut logits = vec![f64::NEG_INFINITY; t * s];
        for token in 0..t {
            let seq = q_seq[token];
            for pos in 0..s {
                let physical = if seq >= 0.0 {
                    table[seq as usize * max_pages + pos / PAGE]
                } else {
                    -1.0
                };
                if (pos as f64) > q_pos[token] || physical < 0.0 || physical as usize >= pages {
                    continue;
                }
                let page = &cache[physical as usize * page_bytes..][..page_bytes];
                let slot = pos % PAGE;
                let key = decode(&page[slot * d..][..d]);
                let scale = f32::from_le_bytes(page[PAGE * d + 4 * slot..][..4].try_into().unwrap()) as f64;
                logits[token * s + pos] = (0..h)
                    .map(|head| {
                        let dot: f64 = q[(token * h + head) * d..][..d]
                            .iter()
                            .zip(&key)
                            .map(|(a, b)| a * b)
                            .sum();
                        w[token * h + head] * (dot * scale).max(0.0)
                    })
                    .sum();
            }
        }
        vec![logits]
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (t, h, d, b) = (problem.dim("t"), problem.dim("h"), problem.dim("d"), problem.dim("b"));
        let (pages, max_pages) = (problem.dim("pages"), problem.dim("max_pages"));
        let s = PAGE * max_pages;
        let buffers = [
            buffer(&inputs[0], t * h * d / 4),
            buffer(&inputs[1], t * h),
            buffer(&inputs[2], pages * PAGE * (d + 4) / 4),
            buffer(&inputs[3], b * max_pages),
            buffer(&inputs[4], t),
            buffer(&inputs[5], t),
            buffer(&outputs[0], t * s),
        ];
        if variant.name == "wgmma" {
            return crate::indexer_fp8_wgmma::launch(device, problem, inputs, outputs);
        }
        let [q, w, cache, table, q_seq, q_pos, logits] = buffers;
        if variant.name == "mma" {
            return indexer_fp8_mma_kernel::launch(
                &device.client,
                grid(t.div_ceil(QUERIES) * max_pages),
                CubeDim::new_1d((QUERIES * h / 16) as u32 * 32),
                q,
                w,
                cache,
                table,
                q_seq,
                q_pos,
                logits,
                t,
                max_pages,
                pages,
                h,
                d,
            );
        }
        indexer_fp8_kernel::launch(
            &device.client,
            grid(t * s.div_ceil(UNITS as usize)),
            CubeDim::new_1d(UNITS),
            q,
            w,
            cache,
            table,
            q_seq,
            q_pos,
            logits,
            t,
            h,
            d,
            max_pages,
            pages,
        );
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        let a = slice_arg;
        if variant.name == "wgmma" {
            return crate::indexer_fp8_wgmma::define(target);
        }
        if variant.name == "mma" {
            let h = problem.dim("h");
            return indexer_fp8_mma_kernel::IndexerFp8MmaKernel::new(
                ir_settings(CubeDim::new_1d((QUERIES * h / 16) as u32 * 32)),
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
                h,
                problem.dim("d"),
            )
            .define();
        }
        indexer_fp8_kernel::IndexerFp8Kernel::new(
            ir_settings(CubeDim::new_1d(UNITS)),
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
        )
        .define()
    }
}
