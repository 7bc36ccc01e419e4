//! The kv side of the sparse MLA kernels: resolving indices to cache rows, reading (and dequantizing) a
//! row's words, and a split's share of a row's blocks.
use super::{COLUMN_BLOCK, D_QK, D_V, KvSource, PAGE_SIZE, TOKEN_WORDS};
use cubecl::prelude::*;
use half::bf16;
use nsa_dsl::Format;
use nsa_dsl::format::{bf16_to_f32, e4m3_to_f32, e4m3x4_scaled_to_bf16x4, pack};
use nsa_dsl::warp_mma::{Chunk, copy_chunk_async};
use nsa_dsl::wgmma::swizzled_chunk;

/// A resolved offset that names no kv row (an invalid index, or past topk).
pub(super) const INVALID: u32 = 0xffff_ffff;

/// Word offset of the kv row `index` names, or 0xffff_ffff ("invalid": u32, as WGSL has no 64-bit integers).
/// FP8 cache indices are physical (page · 64 + slot, below `s_kv` = the cache's tokens) when `s_kv` > 0, and
/// logical positions in the row's sequence, mapped through its block table, when `s_kv` = 0.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn kv_row_offset(
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
        KvSource::Bf16Paged => {
            if index >= 0 && (index as usize) < max_pages * PAGE_SIZE {
                let page = block_table[batch * max_pages + index as usize / PAGE_SIZE];
                if page >= 0 && (page as usize) < pages {
                    let token = page as usize * PAGE_SIZE + index as usize % PAGE_SIZE;
                    offset = (token * comptime!(D_QK / format.per_word() as usize)) as u32;
                }
            }
        }
        KvSource::Fp8Paged => {
            if s_kv > 0 {
                // Physical: page · 64 + slot (FlashMLA), below the cache's s_kv tokens.
                if index >= 0 && (index as usize) < s_kv {
                    offset = (index as usize * TOKEN_WORDS) as u32;
                }
            } else if index >= 0 && (index as usize) < max_pages * PAGE_SIZE {
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
pub(super) fn kv_word(
    kv: &[u32],
    offset: usize,
    w: usize,
    #[comptime] source: KvSource,
    #[comptime] format: Format,
) -> u32 {
    let per_word = comptime!(format.per_word() as usize);
    let mut word = 0u32;
    match source {
        KvSource::Rows | KvSource::Bf16Paged => {
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

/// Latent chunk `c`'s 8 codes (two words) out of the 16-byte word `words` holding chunks 2⌊c/2⌋ and + 1.
#[cube]
fn chunk_codes<N: Size>(words: Vector<u32, N>, c: usize) -> (u32, u32) {
    let lo = select(c % 2 == 0, words.extract(0usize), words.extract(2usize));
    let hi = select(c % 2 == 0, words.extract(1usize), words.extract(3usize));
    (lo, hi)
}

/// The scale of latent chunk `c`: group c / 16 of the four in `scales`.
#[cube]
fn chunk_scale<N: Size>(scales: Vector<u32, N>, c: usize) -> f32 {
    let group = c / 16;
    let bits = select(
        group < 2,
        select(group == 0, scales.extract(0usize), scales.extract(1usize)),
        select(group == 2, scales.extract(2usize), scales.extract(3usize)),
    );
    f32::reinterpret(bits)
}

/// Chunk `c` (8 bf16) of the FP8 cache token at word `offset`, dequantized in software (any target): latent
/// bytes 8c..8c+8 (words 2c, 2c + 1) times group scale c / 16 (words 128..132) for c < 64, else rope words
/// 132 + 4(c − 64)...
#[cube]
pub(super) fn fp8_chunk<N: Size>(kv: &[Vector<u32, N>], offset: u32, c: usize) -> Vector<u32, N> {
    let mut chunk = Vector::<u32, N>::new(0u32);
    if offset != INVALID {
        let base = offset as usize / 4;
        if c < 64 {
            let (lo, hi) = chunk_codes(kv[base + c / 2], c);
            let scale = chunk_scale(kv[base + 32], c);
            let mut values = Chunk::empty();
            #[unroll]
            for j in 0..8usize {
                let word = select(j < 4, lo, hi);
                let byte = (word >> (8 * (j % 4)) as u32) & 0xff;
                values.insert(j, bf16::cast_from(e4m3_to_f32(byte) * scale));
            }
            chunk = Vector::<u32, N>::reinterpret(values);
        } else {
            chunk = kv[base + 33 + (c - 64)];
        }
    }
    chunk
}

/// Eight e4m3 codes (`lo`, `hi`: four each, lowest byte first) times `scale` as one chunk of 8 bf16 through
/// sm_89+'s FP8 conversion; zeros unless `valid`.
#[cube]
fn scaled_codes_chunk<N: Size>(lo: u32, hi: u32, scale: f32, valid: bool) -> Vector<u32, N> {
    let low = e4m3x4_scaled_to_bf16x4(lo, scale);
    let high = e4m3x4_scaled_to_bf16x4(hi, scale);
    let mut chunk = Vector::<u32, N>::new(0u32);
    chunk.insert(0usize, select(valid, low.extract(0usize), 0u32));
    chunk.insert(1usize, select(valid, low.extract(1usize), 0u32));
    chunk.insert(2usize, select(valid, high.extract(0usize), 0u32));
    chunk.insert(3usize, select(valid, high.extract(1usize), 0u32));
    chunk
}

/// `words` unless not `valid` (zeros).
#[cube]
fn valid_or_zero<N: Size>(words: Vector<u32, N>, valid: bool) -> Vector<u32, N> {
    let mut chunk = Vector::<u32, N>::new(0u32);
    #[unroll]
    for i in 0..4usize {
        chunk.insert(i, select(valid, words.extract(i), 0u32));
    }
    chunk
}

/// Chunk `c` of the FP8 cache token at word `offset` (invalid: zeros), as [`fp8_chunk`] but through sm_89+'s
/// FP8 conversion and without branches (`rope`: c ≥ 64, known when the kernel is built), so that the
/// compiler can issue the loads of a unit's chunks together instead of one memory latency per chunk.
#[cube]
pub(super) fn dequantize_fp8_chunk<N: Size>(
    kv: &[Vector<u32, N>],
    offset: u32,
    c: usize,
    #[comptime] rope: bool,
) -> Vector<u32, N> {
    let valid = offset != INVALID;
    let base = select(valid, offset as usize / 4, 0usize);
    if comptime!(rope) {
        valid_or_zero(kv[base + 33 + (c - 64)], valid)
    } else {
        let (lo, hi) = chunk_codes(kv[base + c / 2], c);
        scaled_codes_chunk(lo, hi, chunk_scale(kv[base + 32], c), valid)
    }
}

/// Dequantizes the FP8 cache token at word `offset` (invalid: zeros) into row `key` of the 128-byte-swizzled
/// 64-row tile at chunk `tile0` (chunk c of a row in column block c / 8), as unit `first` of the four that
/// share the row: latent words first + 4j (16 codes, chunks 2(first + 4j), + 1; group scale j / 2) and rope
/// chunks 64 + first, 68 + first. All eleven 16-byte loads are issued before any is used, so a row costs
/// one memory latency instead of one per chunk (the per-chunk form branches between loads).
#[cube]
pub(super) fn dequantize_fp8_share<N: Size>(
    kv: &[Vector<u32, N>],
    smem: &mut [Vector<u32, N>],
    offset: u32,
    tile0: usize,
    key: usize,
    first: usize,
) {
    let valid = offset != INVALID;
    let base = select(valid, offset as usize / 4, 0usize);
    let mut latent = Array::<Vector<u32, N>>::new(8usize);
    #[unroll]
    for j in 0..8usize {
        latent[j] = kv[base + first + 4 * j];
    }
    let scales = kv[base + 32];
    let mut rope = Array::<Vector<u32, N>>::new(2usize);
    #[unroll]
    for j in 0..2usize {
        rope[j] = kv[base + 33 + first + 4 * j];
    }
    store_fp8_share(&latent, scales, &rope, valid, smem, tile0, key, first);
}

/// The second half of [`dequantize_fp8_share`]: a unit's loaded share (latent words first + 4j, the scales,
/// rope words first, first + 4) converted and stored into row `key` of the swizzled tile at chunk `tile0`
/// (zeros unless `valid`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_fp8_share<N: Size>(
    latent: &Array<Vector<u32, N>>,
    scales: Vector<u32, N>,
    rope: &Array<Vector<u32, N>>,
    valid: bool,
    smem: &mut [Vector<u32, N>],
    tile0: usize,
    key: usize,
    first: usize,
) {
    #[unroll]
    for j in 0..8usize {
        let scale = f32::reinterpret(scales.extract(j / 2));
        let words = latent[j];
        #[unroll]
        for h in 0..2usize {
            let chunk = scaled_codes_chunk(words.extract(2 * h), words.extract(2 * h + 1), scale, valid);
            smem[tile0 + j * COLUMN_BLOCK + swizzled_chunk(key, 2 * first + h)] = chunk;
        }
    }
    #[unroll]
    for j in 0..2usize {
        let c = 64 + first + 4 * j;
        smem[tile0 + (c / 8) * COLUMN_BLOCK + swizzled_chunk(key, c % 8)] = valid_or_zero(rope[j], valid);
    }
}

/// 16-byte chunks of one FP8 cache token (656 bytes).
pub(super) const TOKEN_CHUNKS: usize = TOKEN_WORDS / 4;

/// Starts copying (cp.async) the FP8 cache token at word `offset` unconverted into row `key` of a block of
/// 656-byte rows at chunk `raw0` (an invalid row zero-filled: it dequantizes to zeros), as unit `first` of
/// the four that share the row: chunks first + 4j of its 41. Completes at the next wait for copies.
#[cube]
pub(super) fn copy_fp8_row_raw<N: Size>(
    kv: &[Vector<u32, N>],
    smem: &mut [Vector<u32, N>],
    offset: u32,
    raw0: usize,
    key: usize,
    first: usize,
) {
    let valid = offset != INVALID;
    let row_start = select(valid, offset as usize / 4, 0usize);
    let len = select(valid, 1usize, 0usize);
    let dst_row = raw0 + key * TOKEN_CHUNKS;
    #[unroll]
    for j in 0..comptime!(TOKEN_CHUNKS.div_ceil(4)) {
        let c = first + 4 * j;
        let start = row_start + c;
        // The last round has one chunk (40) for four units.
        if comptime!(4 * j + 4 > TOKEN_CHUNKS) {
            if c < TOKEN_CHUNKS {
                copy_chunk_async(&kv[start..start + len], &mut smem[dst_row + c..dst_row + c + 1]);
            }
        } else {
            copy_chunk_async(&kv[start..start + len], &mut smem[dst_row + c..dst_row + c + 1]);
        }
    }
}

/// Dequantizes row `key` of a block staged by [`copy_fp8_row_raw`] at chunk `raw0` into the swizzled tile at
/// chunk `tile0`, as unit `first` of four (the share of [`dequantize_fp8_share`]). The tile may overlap the
/// raw rows: every unit of the cube reads its share, meets the others at a cube barrier, then writes — so
/// all must call it, and the copies must have landed and be visible (a copy wait and a cube barrier before).
#[cube]
pub(super) fn dequantize_staged_fp8_share<N: Size>(
    smem: &mut [Vector<u32, N>],
    raw0: usize,
    tile0: usize,
    key: usize,
    first: usize,
) {
    let row = raw0 + key * TOKEN_CHUNKS;
    let mut latent = Array::<Vector<u32, N>>::new(8usize);
    #[unroll]
    for j in 0..8usize {
        latent[j] = smem[row + first + 4 * j];
    }
    let scales = smem[row + 32];
    let mut rope = Array::<Vector<u32, N>>::new(2usize);
    #[unroll]
    for j in 0..2usize {
        rope[j] = smem[row + 33 + first + 4 * j];
    }
    sync_cube();
    store_fp8_share(&latent, scales, &rope, true, smem, tile0, key, first);
}

/// Resolves the block of indices starting at `start` of row `row` to kv row offsets in `offsets`
/// (0xffff_ffff: invalid, or past topk); units below `block` take one each. For the dense paged source the
/// indices are implicit: position start + unit while below the row's causal limit (see [`dense_limit`]).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn resolve_block(
    indices: &[i32],
    block_table: &[i32],
    offsets: &mut [u32],
    row: usize,
    rows_per_batch: usize,
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
        let index = block_index(indices, row, rows_per_batch, start, topk, source);
        offsets[unit] = kv_row_offset(index, block_table, batch, s_kv, max_pages, pages, source, format);
    }
}

/// This unit's index of the block starting at `start` of row `row` (−1 past topk): [`resolve_block`]'s
/// first half, for kernels that load indices early and resolve them later.
#[cube]
pub(super) fn block_index(
    indices: &[i32],
    row: usize,
    rows_per_batch: usize,
    start: usize,
    topk: usize,
    #[comptime] source: KvSource,
) -> i32 {
    key_index(indices, row, rows_per_batch, start + UNIT_POS as usize, topk, source)
}

/// The index at `position` of row `row`'s list (−1 past topk); for the dense paged source the position itself
/// while below the row's causal limit.
#[cube]
pub(super) fn key_index(
    indices: &[i32],
    row: usize,
    rows_per_batch: usize,
    position: usize,
    topk: usize,
    #[comptime] source: KvSource,
) -> i32 {
    let in_range = position < topk;
    if comptime!(source == KvSource::Bf16Paged) {
        select(
            in_range && position < dense_limit(indices, row, rows_per_batch),
            position as i32,
            -1i32,
        )
    } else {
        select(
            in_range,
            indices[select(in_range, row * topk + position, 0usize)],
            -1i32,
        )
    }
}

/// Split-KV: the blocks of `block` indices that split `split` of `splits` takes of row `row`, as (first,
/// count); the dense paged source counts only the blocks below the row's causal limit.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn split_blocks(
    indices: &[i32],
    row: usize,
    rows_per_batch: usize,
    topk: usize,
    split: usize,
    splits: usize,
    #[comptime] block: usize,
    #[comptime] source: KvSource,
) -> (usize, usize) {
    let mut all_tiles = topk.div_ceil(block);
    if comptime!(source == KvSource::Bf16Paged) {
        let limit = dense_limit(indices, row, rows_per_batch);
        all_tiles = select(limit < topk, limit, topk).div_ceil(block);
    }
    let per_split = all_tiles.div_ceil(splits);
    let first = select(split * per_split < all_tiles, split * per_split, all_tiles);
    let tiles = select(first + per_split < all_tiles, per_split, all_tiles - first);
    (first, tiles)
}

/// Dense decode: how many cache positions row `row` sees. `seqlens[b]` counts the batch's tokens including
/// its rows_per_batch new ones, and row j of them sees positions 0 ..= seqlens − rows_per_batch + j (causal).
#[cube]
pub(super) fn dense_limit(seqlens: &[i32], row: usize, rows_per_batch: usize) -> usize {
    let seqlen = seqlens[row / rows_per_batch];
    let visible = seqlen - rows_per_batch as i32 + 1 + (row % rows_per_batch) as i32;
    select(visible > 0, visible, 0i32) as usize
}
