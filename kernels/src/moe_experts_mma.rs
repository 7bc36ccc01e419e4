//! Tensor-core steps of `moe_experts` (variant `mma`; CUDA, bf16; hidden and inter multiples of 64): the
//! per-expert projections as grouped GEMMs over the permuted rows, on warp mma.sync.
//!
//! A cube owns 64 permuted rows of one expert (each expert's rows in tiles of 64, in expert order) and 64
//! output columns; plane p owns rows 16p..16p + 16. K advances 64 at a time through shared memory filled by
//! cp.async (rows past the expert's block and gathered tokens zero-filled / indexed).
use cubecl::prelude::*;
use half::bf16;
use nsa_dsl::format::pack;
use nsa_dsl::warp_mma::{AccPair, b_tile, commit_async_copies, copy_chunk_async, load_x4, mma_into, wait_async_copies};

/// Rows (and columns, and K) per tile.
pub(crate) const TILE: usize = 64;
/// 16-byte chunks per shared-memory row: 8 (64 bf16) plus one of padding.
const ROW_CHUNKS: usize = TILE / 8 + 1;

/// The expert and first permuted row of row tile `tile` (each expert's rows in tiles of `rows`), and the end
/// of that expert's rows; `experts` when the tile is past the last one.
#[cube]
pub(crate) fn expert_tile(
    offsets: &[u32],
    experts: usize,
    tile: usize,
    #[comptime] rows: usize,
) -> (usize, usize, usize) {
    let mut expert = experts;
    let mut row0 = 0usize;
    let mut counted = 0usize;
    for e in 0..experts {
        let count = (offsets[e + 1] - offsets[e]) as usize;
        let tiles = count.div_ceil(rows);
        if expert == experts && tile < counted + tiles {
            expert = e;
            row0 = offsets[e] as usize + (tile - counted) * rows;
        }
        counted += tiles;
    }
    let end = offsets[select(expert < experts, expert + 1, experts)] as usize;
    (expert, row0, end)
}

/// Starts copying 64 rows × 64 bf16 (chunk `c` of row `r` from `source[row_vector(r) + c]`, rows where
/// `valid(r)` is false zero-filled) into `tile`.
#[cube]
fn stage_rows<N: Size>(
    source: &[Vector<u32, N>],
    tile: &mut [Vector<u32, N>],
    first_vector: usize,
    row_vectors: usize,
    rows: usize,
) {
    let mut i = UNIT_POS as usize;
    while i < comptime!(TILE * 8) {
        let (r, c) = (i / 8, i % 8);
        let valid = r < rows;
        let start = select(valid, first_vector + r * row_vectors + c, 0usize);
        let len = select(valid, 1usize, 0usize);
        copy_chunk_async(
            &source[start..start + len],
            &mut tile[r * ROW_CHUNKS + c..r * ROW_CHUNKS + c + 1],
        );
        i += CUBE_DIM as usize;
    }
}

/// h[r, i] = silu(w1_e[i] · x[rows[r]]) · (w3_e[i] · x[rows[r]]) as bf16, for this cube's 64 rows and 64 i.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gate_up_mma_kernel<N: Size>(
    x: &[Vector<u32, N>],
    w13: &[Vector<u32, N>],
    rows: &[u32],
    offsets: &[u32],
    h: &mut [u32],
    hidden: usize,
    inter: usize,
    experts: usize,
    col_tiles: usize,
) {
    let (expert, row0, end) = expert_tile(offsets, experts, CUBE_POS / col_tiles, TILE);
    if expert >= experts {
        terminate!();
    }
    let i0 = (CUBE_POS % col_tiles) * TILE;
    let plane = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let mut x_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(TILE * ROW_CHUNKS), 16usize);
    let mut gate_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(TILE * ROW_CHUNKS), 16usize);
    let mut up_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(TILE * ROW_CHUNKS), 16usize);
    let mut gate = Array::<AccPair>::new(16usize);
    let mut up = Array::<AccPair>::new(16usize);
    #[unroll]
    for n in 0..16usize {
        gate[n] = AccPair::new(0.0f32);
        up[n] = AccPair::new(0.0f32);
    }
    let a_row = (plane * 16 + lane % 16) * ROW_CHUNKS + lane / 16;
    let b_row = (lane % 8 + 8 * (lane / 16)) * ROW_CHUNKS + (lane / 8) % 2;
    let row_vectors = hidden / 8;
    let valid_rows = end - row0;
    let mut k0 = 0usize;
    while k0 < hidden {
        // X rows are gathered: permuted row r holds token rows[r].
        let mut i = UNIT_POS as usize;
        while i < comptime!(TILE * 8) {
            let (r, c) = (i / 8, i % 8);
            let valid = r < valid_rows;
            let token = rows[select(valid, row0 + r, 0usize)] as usize;
            let start = select(valid, token * row_vectors + k0 / 8 + c, 0usize);
            let len = select(valid, 1usize, 0usize);
            copy_chunk_async(
                &x[start..start + len],
                &mut x_s[r * ROW_CHUNKS + c..r * ROW_CHUNKS + c + 1],
            );
            i += CUBE_DIM as usize;
        }
        let gate_first = (expert * 2 * inter + i0) * row_vectors + k0 / 8;
        stage_rows(w13, &mut gate_s, gate_first, row_vectors, TILE);
        stage_rows(w13, &mut up_s, gate_first + inter * row_vectors, row_vectors, TILE);
        commit_async_copies();
        wait_async_copies();
        sync_cube();
        #[unroll]
        for ks in 0..4usize {
            let a = load_x4::<bf16, N>(&x_s, a_row + 2 * ks, false);
            #[unroll]
            for nb in 0..4usize {
                let bg = load_x4::<bf16, N>(&gate_s, b_row + nb * 16 * ROW_CHUNKS + 2 * ks, false);
                mma_into(&mut gate, 2 * nb, &a, &b_tile(&bg, 0usize));
                mma_into(&mut gate, 2 * nb + 1, &a, &b_tile(&bg, 2usize));
                let bu = load_x4::<bf16, N>(&up_s, b_row + nb * 16 * ROW_CHUNKS + 2 * ks, false);
                mma_into(&mut up, 2 * nb, &a, &b_tile(&bu, 0usize));
                mma_into(&mut up, 2 * nb + 1, &a, &b_tile(&bu, 2usize));
            }
        }
        sync_cube();
        k0 += TILE;
    }
    #[unroll]
    for n in 0..8usize {
        #[unroll]
        for r in 0..2usize {
            let row = row0 + plane * 16 + g + 8 * r;
            if row < end {
                let (g_pair, u_pair) = (gate[2 * n + r], up[2 * n + r]);
                let lo = g_pair.extract(0usize) / (1.0f32 + f32::exp(-g_pair.extract(0usize))) * u_pair.extract(0usize);
                let hi = g_pair.extract(1usize) / (1.0f32 + f32::exp(-g_pair.extract(1usize))) * u_pair.extract(1usize);
                h[(row * inter + i0 + n * 8 + 2 * t) / 2] = pack(lo, hi, nsa_dsl::Format::Bf16);
            }
        }
    }
}

/// y[r, j] = w2_e[j] · h[r] (f32), for this cube's 64 rows and 64 j.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn down_mma_kernel<N: Size>(
    h: &[Vector<u32, N>],
    w2: &[Vector<u32, N>],
    offsets: &[u32],
    y: &mut [f32],
    hidden: usize,
    inter: usize,
    experts: usize,
    col_tiles: usize,
) {
    let (expert, row0, end) = expert_tile(offsets, experts, CUBE_POS / col_tiles, TILE);
    if expert >= experts {
        terminate!();
    }
    let j0 = (CUBE_POS % col_tiles) * TILE;
    let plane = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let mut h_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(TILE * ROW_CHUNKS), 16usize);
    let mut w_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(TILE * ROW_CHUNKS), 16usize);
    let mut acc = Array::<AccPair>::new(16usize);
    #[unroll]
    for n in 0..16usize {
        acc[n] = AccPair::new(0.0f32);
    }
    let a_row = (plane * 16 + lane % 16) * ROW_CHUNKS + lane / 16;
    let b_row = (lane % 8 + 8 * (lane / 16)) * ROW_CHUNKS + (lane / 8) % 2;
    let row_vectors = inter / 8;
    let mut k0 = 0usize;
    while k0 < inter {
        stage_rows(h, &mut h_s, row0 * row_vectors + k0 / 8, row_vectors, end - row0);
        stage_rows(
            w2,
            &mut w_s,
            (expert * hidden + j0) * row_vectors + k0 / 8,
            row_vectors,
            TILE,
        );
        commit_async_copies();
        wait_async_copies();
        sync_cube();
        #[unroll]
        for ks in 0..4usize {
            let a = load_x4::<bf16, N>(&h_s, a_row + 2 * ks, false);
            #[unroll]
            for nb in 0..4usize {
                let b = load_x4::<bf16, N>(&w_s, b_row + nb * 16 * ROW_CHUNKS + 2 * ks, false);
                mma_into(&mut acc, 2 * nb, &a, &b_tile(&b, 0usize));
                mma_into(&mut acc, 2 * nb + 1, &a, &b_tile(&b, 2usize));
            }
        }
        sync_cube();
        k0 += TILE;
    }
    #[unroll]
    for n in 0..8usize {
        #[unroll]
        for r in 0..2usize {
            let row = row0 + plane * 16 + g + 8 * r;
            if row < end {
                let column = j0 + n * 8 + 2 * t;
                y[row * hidden + column] = acc[2 * n + r].extract(0usize);
                y[row * hidden + column + 1] = acc[2 * n + r].extract(1usize);
            }
        }
    }
}
