//! MHA one-shot prefill (SGLang's MHA_ONE_SHOT for short DeepSeek prompts): causal attention over a ragged
//! batch whose keys may include a cached prefix, in one launch.
//!
//! q [t_q, h, 192] (128 nope + 64 rope), k [t_k, h, 192], v [t_k, h, 128] (bf16 or f32, alike);
//! cu_seqlens_q / cu_seqlens_k [n_cu] i32 (n_cu = sequences + 1, flash-attention's varlen offsets);
//! sm_scale → out [t_q, h, 128] (q's format), lse [t_q, h] f32 (natural log). Query j of a sequence with
//! q_len queries and k_len ≥ q_len keys sees its keys 0 ..= k_len − q_len + j (causal, the new tokens last).
//! A query that sees nothing gets out 0 and lse +∞.
//! Variants: `wgmma_k128_pingpong`, `wgmma_k128_pv_first`, `wgmma_k128_pv_first_trim`, `wgmma_k128_producer`,
//! `wgmma_k128_persistent`, `wgmma_k128_tma_store`, `wgmma_k128`, `wgmma`, `wgmma_q128` and `wgmma_q64` (Hopper, [`crate::mha_prefill_wgmma`]), `simt` (one unit per (query, head),
//! everywhere) and `mma` (flash attention on warp mma.sync:
//! 64 queries of one head per cube, 16 per plane, Q fragments in registers, O 16 × 128 per plane, K/V
//! blocks of 64 keys gathered by cp.async one block ahead; CUDA, bf16).
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::mha_prefill_wgmma::Pipeline;
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::bf16;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::{pack, read_element};
use nsa_dsl::warp_mma::{
    AccPair, Pair, accumulators_as_a, b_tile, commit_async_copies, copy_chunk_async, fast_exp2, load_x4, mma_into,
    quad_max, quad_sum, wait_async_copies,
};

const D_QK: usize = 192;
const D_V: usize = 128;
/// Queries and keys per block of the `mma` variant.
const BLOCK: usize = 64;
/// Heads whose query tiles the tensor-core variants interleave (see [`locate_tile`]).
const HEAD_CHUNK: usize = 16;
/// 16-byte chunks per shared-memory row (one of padding: conflict-free ldmatrix).
const QK_CHUNKS: usize = D_QK / 8 + 1;
const V_CHUNKS: usize = D_V / 8 + 1;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "wgmma_k128_pv_first",
        summary: "`wgmma_k128_tma_store` in FlashAttention-3's order: block b − 1's P·V issued before block b's \
                  softmax and settled after it, so the softmax runs under a product (Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_k128_pv_first_trim",
        summary: "`wgmma_k128_pv_first` whose warpgroup on the causal diagonal's upper side computes only the \
                  first half of the tile's last 128-key block (Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_k128_producer",
        summary: "`wgmma_k128_pv_first` with a producer warpgroup issuing the K / V copies as soon as their \
                  buffers are free, its registers handed to the consumers (setmaxnreg 24 / 240) (Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_k128_persistent",
        summary: "`wgmma_k128_producer` with one cube per SM walking the tiles, so the producer copies the next \
                  tile's Q and first K while the consumers finish the current one (Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_k128_pingpong",
        summary: "`wgmma_k128_pv_first` whose two warpgroups take turns issuing their products (named barriers), \
                  so one's softmax runs under the other's products (FlashAttention-3's ping-pong; Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_k128_tma_store",
        summary: "`wgmma_k128` whose warpgroups store whole 64-row output blocks through shared memory with the \
                  tensor copy engine (Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_k128",
        summary: "flash attention on warpgroup MMA in 128-key blocks: 128 queries of a head per cube (two \
                  warpgroups sharing K/V), Q in shared memory, P in registers, K/V copied by TMA a block ahead \
                  (Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma",
        summary: "flash attention on warpgroup MMA: 192 queries of a head per cube (three warpgroups sharing K/V), \
                  Q in shared memory, P in registers, K/V/Q copied by TMA a block ahead into mbarrier stages \
                  (Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_q128",
        summary: "flash attention on warpgroup MMA: 128 queries of a head per cube (two warpgroups sharing K/V), \
                  Q and P in registers, K/V copied by TMA two blocks ahead (Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "wgmma_q64",
        summary: "flash attention on warpgroup MMA: 64 queries of a head per cube, Q and P in registers, K/V \
                  copied by TMA one block ahead (two cubes an SM; Hopper, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "mma",
        summary: "flash attention on mma.sync: 64 queries of a head per cube, O in registers (CUDA, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "simt",
        summary: "one unit per (query, head), keys looped with an online softmax",
        needs_plane_ops: false,
    },
];

/// The K/V pipeline of a `wgmma` variant, each stated by what it changes.
fn wgmma_pipeline(variant: &Variant) -> Option<Pipeline> {
    let k128 = Pipeline {
        groups: 2,
        depth: 1,
        q_shared: true,
        keys: 128,
        tma_store: false,
        pv_first: false,
        pingpong: false,
        producer: false,
        persistent: false,
        trim: false,
    };
    let pv_first = Pipeline {
        tma_store: true,
        pv_first: true,
        ..k128
    };
    Some(match variant.name {
        "wgmma_k128" => k128,
        "wgmma_k128_tma_store" => Pipeline {
            tma_store: true,
            ..k128
        },
        "wgmma_k128_pv_first" => pv_first,
        "wgmma_k128_pv_first_trim" => Pipeline { trim: true, ..pv_first },
        "wgmma_k128_producer" => Pipeline {
            producer: true,
            ..pv_first
        },
        "wgmma_k128_persistent" => Pipeline {
            tma_store: false,
            producer: true,
            persistent: true,
            ..pv_first
        },
        "wgmma_k128_pingpong" => Pipeline {
            pingpong: true,
            ..pv_first
        },
        "wgmma" => Pipeline {
            groups: 3,
            keys: 64,
            ..k128
        },
        "wgmma_q128" => Pipeline {
            depth: 2,
            q_shared: false,
            keys: 64,
            ..k128
        },
        "wgmma_q64" => Pipeline {
            groups: 1,
            q_shared: false,
            keys: 64,
            ..k128
        },
        _ => return None,
    })
}

/// The sequence holding query `query` (by cu_seqlens_q) and how many of its keys that query sees.
#[cube]
fn locate_query(cu_q: &[i32], cu_k: &[i32], seqs: usize, query: usize) -> (usize, usize) {
    let mut seq = 0usize;
    for i in 0..seqs {
        if cu_q[i + 1] as usize <= query {
            seq = i + 1;
        }
    }
    let seq = select(seq < seqs, seq, seqs - 1);
    let q_len = cu_q[seq + 1] - cu_q[seq];
    let k_len = cu_k[seq + 1] - cu_k[seq];
    let visible = k_len - q_len + 1 + (query as i32 - cu_q[seq]);
    (seq, select(visible > 0, visible, 0i32) as usize)
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn mha_prefill_simt_kernel(
    q: &[u32],
    k: &[u32],
    v: &[u32],
    cu_q: &[i32],
    cu_k: &[i32],
    out: &mut [u32],
    lse: &mut [f32],
    t_q: usize,
    heads: usize,
    seqs: usize,
    sm_scale: f32,
    #[comptime] format: Format,
) {
    let pair = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    if pair >= t_q * heads {
        terminate!();
    }
    let (query, head) = (pair / heads, pair % heads);
    let (seq, visible) = locate_query(cu_q, cu_k, seqs, query);
    let k0 = cu_k[seq] as usize;
    let mut acc = Array::<f32>::new(D_V);
    #[unroll]
    for c in 0..D_V {
        acc[c] = 0.0f32;
    }
    // −2³⁰ (from its bits: a negated literal would be a compile-time constant).
    let mut m = f32::reinterpret(0xce80_0000u32);
    let mut l = 0.0f32;
    for key in 0..visible {
        let row = (k0 + key) * heads + head;
        let mut dot = 0.0f32;
        for d in 0..D_QK {
            dot += read_element(q, pair * D_QK + d, format) * read_element(k, row * D_QK + d, format);
        }
        let score = dot * sm_scale;
        let m_new = f32::max(m, score);
        let alpha = f32::exp(m - m_new);
        let p = f32::exp(score - m_new);
        l = l * alpha + p;
        #[unroll]
        for c in 0..D_V {
            acc[c] = acc[c] * alpha + p * read_element(v, row * D_V + c, format);
        }
        m = m_new;
    }
    let inv = select(l > 0.0f32, 1.0f32 / l, 0.0f32);
    let per_word = comptime!(format.per_word() as usize);
    #[unroll]
    for w in 0..comptime!(D_V / format.per_word() as usize) {
        let lo = acc[w * per_word] * inv;
        let mut hi = 0.0f32;
        if comptime!(per_word == 2) {
            hi = acc[w * per_word + 1] * inv;
        }
        out[pair * comptime!(D_V / format.per_word() as usize) + w] = pack(lo, hi, format);
    }
    lse[pair] = select(l == 0.0f32, f32::reinterpret(0x7f80_0000u32), m + f32::ln(l));
}

/// Starts the asynchronous copy of 64 rows of head `head` into `tile` (rows of `stride` chunks, from tile
/// row `tile_row0`): positions `first..first + 64` of a sequence whose `count` rows start at row `row0` of
/// `source` ([rows, heads, chunks] 16-byte chunks); positions past the sequence are zero-filled.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_head_rows<N: Size>(
    source: &[Vector<u32, N>],
    tile: &mut [Vector<u32, N>],
    row0: usize,
    first: usize,
    count: usize,
    heads: usize,
    head: usize,
    tile_row0: usize,
    #[comptime] chunks: usize,
    #[comptime] stride: usize,
) {
    let mut i = UNIT_POS as usize;
    while i < comptime!(BLOCK * chunks) {
        let (r, c) = (i / chunks, i % chunks);
        let position = first + r;
        let valid = position < count;
        let start = ((row0 + select(valid, position, 0usize)) * heads + head) * chunks + c;
        let len = select(valid, 1usize, 0usize);
        let dst = (tile_row0 + r) * stride + c;
        copy_chunk_async(&source[start..start + len], &mut tile[dst..dst + 1]);
        i += CUBE_DIM as usize;
    }
}

/// Starts the asynchronous gather of key block `block` (64 keys of `head` from key row `k0`; keys past
/// `keys` zero-filled) into K/V buffer `buf`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn gather_kv<N: Size>(
    k: &[Vector<u32, N>],
    v: &[Vector<u32, N>],
    k_s: &mut [Vector<u32, N>],
    v_s: &mut [Vector<u32, N>],
    k0: usize,
    keys: usize,
    block: usize,
    buf: usize,
    heads: usize,
    head: usize,
) {
    let (first, tile_row0) = (block * BLOCK, buf * BLOCK);
    copy_head_rows(
        k,
        k_s,
        k0,
        first,
        keys,
        heads,
        head,
        tile_row0,
        comptime!(D_QK / 8),
        QK_CHUNKS,
    );
    copy_head_rows(
        v,
        v_s,
        k0,
        first,
        keys,
        heads,
        head,
        tile_row0,
        comptime!(D_V / 8),
        V_CHUNKS,
    );
}

/// The query tile of this cube for the tensor-core variants (tile [`CUBE_POS`] in [`tile_at`]'s order);
/// cubes past the last tile terminate.
#[cube]
pub(crate) fn locate_tile(
    cu_q: &[i32],
    cu_k: &[i32],
    heads: usize,
    seqs: usize,
    tile_bound: usize,
    #[comptime] tile_rows: usize,
) -> (usize, usize, usize, usize, usize, usize) {
    let (valid, head, q_start, q_len, k0, k_len, local0) =
        tile_at(cu_q, cu_k, heads, seqs, tile_bound, CUBE_POS, tile_rows);
    if !valid {
        terminate!();
    }
    (head, q_start, q_len, k0, k_len, local0)
}

/// Work item `index` (of `heads` · `tile_bound`) of the tensor-core variants, which cover query tile c (of
/// `tile_rows` queries) of the batch for one head: whether it exists, the head, the tile's sequence (its
/// first query row, query count, first key row, key count) and the tile's first query within the sequence.
/// Items go by chunks of [`HEAD_CHUNK`] heads, so the cubes running at once read the K/V of a few heads,
/// which stays in L2 (with all heads innermost all of them were live and K/V came from DRAM); within a chunk
/// tiles go in reverse, heads innermost — a causal sequence's last tiles see the most keys, so every head's
/// longest tiles start first and the chunk ends with short ones (head by head, a long tile started last left
/// the other SMs idle: 10% of the time at 2K tokens by a list-scheduling count).
#[cube]
#[allow(clippy::type_complexity)]
pub(crate) fn tile_at(
    cu_q: &[i32],
    cu_k: &[i32],
    heads: usize,
    seqs: usize,
    tile_bound: usize,
    index: usize,
    #[comptime] tile_rows: usize,
) -> (bool, usize, usize, usize, usize, usize, usize) {
    let mut valid = false;
    let mut head = 0usize;
    let mut q_start = 0usize;
    let mut q_len = 0usize;
    let mut k0 = 0usize;
    let mut k_len = 0usize;
    let mut local0 = 0usize;
    let first_head = (index / (HEAD_CHUNK * tile_bound)) * HEAD_CHUNK;
    if first_head < heads {
        let width = select(heads - first_head < HEAD_CHUNK, heads - first_head, HEAD_CHUNK);
        let local = index - first_head * tile_bound;
        if local < width * tile_bound {
            head = first_head + local % width;
            let tile = tile_bound - 1 - local / width;
            let (seq, first_tile) = query_tile(cu_q, seqs, tile, tile_rows);
            if seq < seqs {
                valid = true;
                q_start = cu_q[seq] as usize;
                q_len = (cu_q[seq + 1] - cu_q[seq]) as usize;
                k0 = cu_k[seq] as usize;
                k_len = (cu_k[seq + 1] - cu_k[seq]) as usize;
                local0 = (tile - first_tile) * tile_rows;
            }
        }
    }
    (valid, head, q_start, q_len, k0, k_len, local0)
}

/// The sequence of query tile `tile` (sequences contribute ⌈q_len / tile_rows⌉ tiles each, in order) and its
/// first tile; `seqs` past the last.
#[cube]
fn query_tile(cu_q: &[i32], seqs: usize, tile: usize, #[comptime] tile_rows: usize) -> (usize, usize) {
    let mut seq = seqs;
    let mut first_tile = 0usize;
    let mut counted = 0usize;
    for i in 0..seqs {
        let q_len = (cu_q[i + 1] - cu_q[i]) as usize;
        let tiles = q_len.div_ceil(tile_rows);
        if seq == seqs && tile < counted + tiles {
            seq = i;
            first_tile = counted;
        }
        counted += tiles;
    }
    (seq, first_tile)
}

/// Flash-attention variant. Cube c covers query tile c of the batch (each sequence's queries in tiles of
/// 64, in order) for one head; plane p owns queries 16p..16p + 16 of the tile.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn mha_prefill_mma_kernel<N: Size>(
    q: &[Vector<u32, N>],
    k: &[Vector<u32, N>],
    v: &[Vector<u32, N>],
    cu_q: &[i32],
    cu_k: &[i32],
    out: &mut [u32],
    lse: &mut [f32],
    heads: usize,
    seqs: usize,
    tile_bound: usize,
    sm_scale: f32,
) {
    let (head, q_start, q_len, k0, k_len, local0) = locate_tile(cu_q, cu_k, heads, seqs, tile_bound, BLOCK);
    let plane = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);

    let mut q_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(BLOCK * QK_CHUNKS), 16usize);
    let mut k_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(2 * BLOCK * QK_CHUNKS), 16usize);
    let mut v_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(2 * BLOCK * V_CHUNKS), 16usize);

    // Keys the tile's last query sees (causal, new tokens last): the blocks to visit.
    let last_local = select(local0 + BLOCK < q_len, local0 + BLOCK, q_len) - 1;
    let tile_keys = select(k_len + last_local + 1 > q_len, k_len + last_local + 1 - q_len, 0usize);
    let blocks = tile_keys.div_ceil(BLOCK);

    // Q of the tile (rows past the sequence zero-filled), and the first K/V block.
    copy_head_rows(
        q,
        &mut q_s,
        q_start,
        local0,
        q_len,
        heads,
        head,
        0,
        comptime!(D_QK / 8),
        QK_CHUNKS,
    );
    gather_kv(k, v, &mut k_s, &mut v_s, k0, k_len, 0, 0, heads, head);
    commit_async_copies();
    wait_async_copies();
    sync_cube();

    // This plane's Q fragments, kept in registers: 12 k-steps of 16.
    let q_row = (plane * 16 + lane % 16) * QK_CHUNKS + lane / 16;
    let mut q_frag = Array::<Pair>::new(comptime!(4 * D_QK / 16));
    #[unroll]
    for ks in 0..comptime!(D_QK / 16) {
        let regs = load_x4::<bf16, N>(&q_s, q_row + 2 * ks, false);
        #[unroll]
        for r in 0..4usize {
            q_frag[4 * ks + r] = regs[r];
        }
    }
    let mut o = Array::<AccPair>::new(comptime!(D_V / 4));
    #[unroll]
    for n in 0..comptime!(D_V / 4) {
        o[n] = AccPair::new(0.0f32);
    }
    let mut m = Array::<f32>::new(2usize);
    let mut l = Array::<f32>::new(2usize);
    // Keys visible to rows g and g + 8 of this plane (local to the sequence).
    let mut limit = Array::<usize>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        m[r] = -1073741824.0f32;
        l[r] = 0.0f32;
        let local = local0 + plane * 16 + g + 8 * r;
        limit[r] = select(k_len + local + 1 > q_len, k_len + local + 1 - q_len, 0usize);
    }
    let scale_log2 = sm_scale * core::f32::consts::LOG2_E;
    let k_row = (lane % 8 + 8 * (lane / 16)) * QK_CHUNKS + (lane / 8) % 2;
    let v_row = (lane % 8 + 8 * ((lane / 8) % 2)) * V_CHUNKS + lane / 16;

    let mut block = 0usize;
    while block < blocks {
        let buf = block % 2;
        if block > 0 {
            wait_async_copies();
            sync_cube();
        }
        if block + 1 < blocks {
            gather_kv(k, v, &mut k_s, &mut v_s, k0, k_len, block + 1, 1 - buf, heads, head);
        }
        commit_async_copies();

        // S = Q·Kᵀ (16 queries × 64 keys).
        let mut s = Array::<AccPair>::new(16usize);
        #[unroll]
        for n in 0..16usize {
            s[n] = AccPair::new(0.0f32);
        }
        let k_base = buf * BLOCK * QK_CHUNKS + k_row;
        #[unroll]
        for ks in 0..comptime!(D_QK / 16) {
            let mut a = Array::<Pair>::new(4usize);
            #[unroll]
            for r in 0..4usize {
                a[r] = q_frag[4 * ks + r];
            }
            #[unroll]
            for kb in 0..4usize {
                let b = load_x4::<bf16, N>(&k_s, k_base + kb * 16 * QK_CHUNKS + 2 * ks, false);
                mma_into(&mut s, 2 * kb, &a, &b_tile(&b, 0usize));
                mma_into(&mut s, 2 * kb + 1, &a, &b_tile(&b, 2usize));
            }
        }

        // Online softmax in log₂ units; keys past a row's causal limit weigh nothing.
        let mut alpha = Array::<f32>::new(2usize);
        #[unroll]
        for r in 0..2usize {
            let mut block_max = f32::reinterpret(0xce80_0000u32);
            #[unroll]
            for n in 0..8usize {
                #[unroll]
                for e in 0..2usize {
                    let key = block * BLOCK + n * 8 + 2 * t + e;
                    let x = s[2 * n + r].extract(e) * scale_log2;
                    block_max = select(key < limit[r], f32::max(block_max, x), block_max);
                }
            }
            let m_new = f32::max(m[r], quad_max(block_max));
            alpha[r] = fast_exp2(m[r] - m_new);
            m[r] = m_new;
            l[r] *= alpha[r];
            #[unroll]
            for n in 0..8usize {
                let mut p = AccPair::new(0.0f32);
                #[unroll]
                for e in 0..2usize {
                    let key = block * BLOCK + n * 8 + 2 * t + e;
                    let x = s[2 * n + r].extract(e) * scale_log2;
                    let pe = select(key < limit[r], fast_exp2(x - m_new), 0.0f32);
                    l[r] += pe;
                    p.insert(e, pe);
                }
                s[2 * n + r] = p;
            }
        }
        #[unroll]
        for n in 0..comptime!(D_V / 8) {
            #[unroll]
            for r in 0..2usize {
                o[2 * n + r] = o[2 * n + r] * AccPair::new(alpha[r]);
            }
        }

        // O += P·V.
        let v_base = buf * BLOCK * V_CHUNKS + v_row;
        #[unroll]
        for kb in 0..4usize {
            let a = accumulators_as_a(&s, 2 * kb);
            #[unroll]
            for j in 0..comptime!(D_V / 16) {
                let b = load_x4::<bf16, N>(&v_s, v_base + kb * 16 * V_CHUNKS + 2 * j, true);
                mma_into(&mut o, 2 * j, &a, &b_tile(&b, 0usize));
                mma_into(&mut o, 2 * j + 1, &a, &b_tile(&b, 2usize));
            }
        }
        block += 1;
    }

    // out = O / l (bf16 words), lse; rows past the sequence are not written.
    #[unroll]
    for r in 0..2usize {
        let sum = quad_sum(l[r]);
        let local = local0 + plane * 16 + g + 8 * r;
        if local < q_len {
            let pair = (q_start + local) * heads + head;
            let inv = select(sum > 0.0f32, 1.0f32 / sum, 0.0f32);
            #[unroll]
            for n in 0..comptime!(D_V / 8) {
                let value = o[2 * n + r] * AccPair::new(inv);
                let mut word = Pair::empty();
                word.insert(0usize, bf16::cast_from(value.extract(0usize)));
                word.insert(1usize, bf16::cast_from(value.extract(1usize)));
                out[pair * comptime!(D_V / 2) + n * 4 + t] = u32::reinterpret(word);
            }
            if t == 0 {
                lse[pair] = select(
                    sum == 0.0f32,
                    f32::reinterpret(0x7f80_0000u32),
                    m[r] * core::f32::consts::LN_2 + f32::ln(sum),
                );
            }
        }
    }
}

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("q", &["t_q", "h", "d_qk"], Storage::Problem),
    TensorSpec::new("k", &["t_k", "h", "d_qk"], Storage::Problem),
    TensorSpec::new("v", &["t_k", "h", "d_v"], Storage::Problem),
    TensorSpec::new("cu_seqlens_q", &["n_cu"], Storage::I32),
    TensorSpec::new("cu_seqlens_k", &["n_cu"], Storage::I32),
];
const OUTPUTS: &[TensorSpec] = &[
    TensorSpec::new("out", &["t_q", "h", "d_v"], Storage::Problem),
    TensorSpec::new("lse", &["t_q", "h"], Storage::F32),
];

fn dims(t_q: usize, t_k: usize, h: usize, seqs: usize) -> Vec<(&'static str, usize)> {
    vec![
        ("t_q", t_q),
        ("t_k", t_k),
        ("h", h),
        ("d_qk", D_QK),
        ("d_v", D_V),
        ("n_cu", seqs + 1),
    ]
}

/// 1/√192, DeepSeek's softmax scale of the MHA form (before YaRN's mscale).
const SCALE: f64 = 0.07216878364870323;

/// Sequence lengths (q_len, k_len) for a problem: tests split t_q and t_k into ragged sequences whose key
/// counts include a cached prefix; the bench uses equal sequences without prefix.
fn split_lengths(problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<(usize, usize)> {
    use rand::Rng;
    let (t_q, t_k, seqs) = (problem.dim("t_q"), problem.dim("t_k"), problem.dim("n_cu") - 1);
    let mut q_cuts: Vec<usize> = (1..seqs).map(|_| rng.random_range(0..=t_q)).collect();
    let mut prefix_cuts: Vec<usize> = (1..seqs).map(|_| rng.random_range(0..=t_k - t_q)).collect();
    if problem.param("bench") != 0.0 {
        q_cuts = (1..seqs).map(|i| i * t_q / seqs).collect();
        prefix_cuts = (1..seqs).map(|i| i * (t_k - t_q) / seqs).collect();
    }
    q_cuts.sort();
    prefix_cuts.sort();
    let edges = |cuts: Vec<usize>, total: usize| {
        let mut points = vec![0];
        points.extend(cuts);
        points.push(total);
        points.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
    };
    let q_lens = edges(q_cuts, t_q);
    let prefixes = edges(prefix_cuts, t_k - t_q);
    q_lens.into_iter().zip(prefixes).map(|(q, p)| (q, q + p)).collect()
}

pub struct MhaPrefill;

impl Kernel for MhaPrefill {
    fn name(&self) -> &'static str {
        "mha_prefill"
    }
    fn summary(&self) -> &'static str {
        "causal varlen MHA (q/k 192, v 128) over new tokens and a cached prefix, out + lse"
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
        // bench: 1 makes equal sequences (and no cached prefix when t_k = t_q).
        &[("sm_scale", SCALE), ("bench", 0.0)]
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // (t_q, t_k, h, sequences): ragged with prefixes, one sequence across several tiles, no prefix,
            // heads past one chunk of the tensor-core variants' cube order, more work items than an H200's 132
            // SMs (a persistent cube takes several tiles).
            for (t_q, t_k, h, seqs) in [
                (70, 150, 4, 3),
                (130, 130, 2, 1),
                (40, 97, 3, 5),
                (200, 230, 20, 2),
                (300, 420, 48, 3),
            ] {
                problems.push(Problem::new(
                    format,
                    &dims(t_q, t_k, h, seqs),
                    &[("sm_scale", SCALE), ("bench", 0.0)],
                ));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // 1K and 2K new tokens (one sequence), 128 heads.
        [1024, 2048]
            .into_iter()
            .map(|t| {
                Problem::new(
                    Format::Bf16,
                    &dims(t, t, 128, 1),
                    &[("sm_scale", SCALE), ("bench", 1.0)],
                )
            })
            .collect()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(
            format,
            &dims(2048, 2048, 128, 1),
            &[("sm_scale", SCALE), ("bench", 1.0)],
        )
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        let invalid = |field, expected: &str, got: String| KernelError::InvalidProblem {
            kernel: "mha_prefill",
            field,
            expected: expected.into(),
            got,
        };
        if problem.dim("d_qk") != D_QK || problem.dim("d_v") != D_V {
            return Err(invalid(
                "d_qk",
                "192 (128 nope + 64 rope) and d_v 128",
                format!("{} and {}", problem.dim("d_qk"), problem.dim("d_v")),
            ));
        }
        if problem.dim("n_cu") < 2 || problem.dim("t_k") < problem.dim("t_q") {
            return Err(invalid(
                "n_cu",
                "at least one sequence (n_cu ≥ 2) and t_k ≥ t_q",
                format!(
                    "n_cu {}, t_q {}, t_k {}",
                    problem.dim("n_cu"),
                    problem.dim("t_q"),
                    problem.dim("t_k")
                ),
            ));
        }
        Ok(())
    }
    fn requirements(&self, variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
        if variant.name.starts_with("wgmma") {
            crate::spec::needs_wgmma(features)?;
            if problem.format != Format::Bf16 {
                return Err(format!("needs bf16, got {}", problem.format));
            }
            return Ok(());
        }
        if variant.name == "mma" {
            if !features.mma_m16n8k16_bf16 || features.plane_size != 32 {
                return Err("needs warp mma.sync m16n8k16 bf16 (CUDA)".into());
            }
            if problem.format != Format::Bf16 {
                return Err(format!("needs bf16 tensors, got {}", problem.format));
            }
        }
        Ok(())
    }
    fn supports_target(&self, variant: &Variant, target: IrTarget) -> bool {
        variant.name == "simt" || target == IrTarget::Cuda
    }
    fn supports_format(&self, variant: &Variant, format: Format) -> bool {
        variant.name == "simt" || format == Format::Bf16
    }
    fn shared_memory_bytes(&self, variant: &Variant, _: &Problem) -> usize {
        match variant.name {
            "mma" => 16 * BLOCK * (3 * QK_CHUNKS + 2 * V_CHUNKS),
            _ => wgmma_pipeline(variant).map_or(0, Pipeline::shared_memory_bytes),
        }
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // Causal without prefix: half the t_q × t_k pairs (FlashAttention's count), 2·(192 + 128) each.
        let pairs = problem.dim("t_q") * problem.dim("t_k") / 2;
        (2 * pairs * problem.dim("h") * (D_QK + D_V)) as u64
    }
    fn tolerance(&self, output: &TensorSpec, problem: &Problem) -> f64 {
        match (output.name, problem.format) {
            ("out", Format::Bf16) => 2e-3 + 1.0 / 512.0,
            ("out", Format::F32) => 1e-5,
            _ => 1e-5,
        }
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let mut inputs = crate::check::random_normal_inputs(&INPUTS[..3], problem, rng);
        let lengths = split_lengths(problem, rng);
        let (mut cu_q, mut cu_k) = (vec![0i32], vec![0i32]);
        for (q_len, k_len) in lengths {
            cu_q.push(cu_q.last().unwrap() + q_len as i32);
            cu_k.push(cu_k.last().unwrap() + k_len as i32);
        }
        let n = cu_q.len();
        inputs.push(HostTensor::from_i32("cu_seqlens_q", &[n], &cu_q));
        inputs.push(HostTensor::from_i32("cu_seqlens_k", &[n], &cu_k));
        inputs
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let h = problem.dim("h");
        let (q, k, v) = (inputs[0].to_f64(), inputs[1].to_f64(), inputs[2].to_f64());
        let (cu_q, cu_k) = (inputs[3].to_f64(), inputs[4].to_f64());
        let scale = problem.param("sm_scale");
        let (mut out, mut lse) = (Vec::new(), Vec::new());
        for seq in 0..cu_q.len() - 1 {
            let (q0, q1, k0, k1) = (
                cu_q[seq] as usize,
                cu_q[seq + 1] as usize,
                cu_k[seq] as usize,
                cu_k[seq + 1] as usize,
            );
            for query in q0..q1 {
                let visible = ((k1 - k0) + (query - q0) + 1).saturating_sub(q1 - q0);
                for head in 0..h {
                    let q_row = &q[(query * h + head) * D_QK..][..D_QK];
                    let scores: Vec<f64> = (0..visible)
                        .map(|key| {
                            let k_row = &k[((k0 + key) * h + head) * D_QK..][..D_QK];
                            scale * q_row.iter().zip(k_row).map(|(a, b)| a * b).sum::<f64>()
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let l: f64 = w.iter().sum();
                    for c in 0..D_V {
                        let o: f64 = (0..visible)
                            .map(|key| w[key] * v[((k0 + key) * h + head) * D_V + c])
                            .sum();
                        out.push(if visible == 0 { 0.0 } else { o / l });
                    }
                    lse.push(if visible == 0 { f64::INFINITY } else { m + l.ln() });
                }
            }
        }
        vec![out, lse]
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (t_q, t_k, h, seqs) = (
            problem.dim("t_q"),
            problem.dim("t_k"),
            problem.dim("h"),
            problem.dim("n_cu") - 1,
        );
        let per_word = problem.format.per_word() as usize;
        let sm_scale = problem.param("sm_scale") as f32;
        if let Some(pipeline) = wgmma_pipeline(variant) {
            return crate::mha_prefill_wgmma::launch(device, problem, inputs, outputs, pipeline);
        }
        if variant.name == "mma" {
            // At most one partial tile per sequence beyond t_q / 64 full ones.
            let tiles = t_q.div_ceil(BLOCK) + seqs;
            return mha_prefill_mma_kernel::launch(
                &device.client,
                grid(tiles * h),
                CubeDim::new_1d(128),
                4,
                buffer(&inputs[0], t_q * h * D_QK / 8),
                buffer(&inputs[1], t_k * h * D_QK / 8),
                buffer(&inputs[2], t_k * h * D_V / 8),
                buffer(&inputs[3], seqs + 1),
                buffer(&inputs[4], seqs + 1),
                buffer(&outputs[0], t_q * h * D_V / 2),
                buffer(&outputs[1], t_q * h),
                h,
                seqs,
                tiles,
                sm_scale,
            );
        }
        mha_prefill_simt_kernel::launch(
            &device.client,
            grid((t_q * h).div_ceil(64)),
            CubeDim::new_1d(64),
            buffer(&inputs[0], t_q * h * D_QK / per_word),
            buffer(&inputs[1], t_k * h * D_QK / per_word),
            buffer(&inputs[2], t_k * h * D_V / per_word),
            buffer(&inputs[3], seqs + 1),
            buffer(&inputs[4], seqs + 1),
            buffer(&outputs[0], t_q * h * D_V / per_word),
            buffer(&outputs[1], t_q * h),
            t_q,
            h,
            seqs,
            sm_scale,
            problem.format,
        );
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        let a = slice_arg;
        if let Some(pipeline) = wgmma_pipeline(variant) {
            return crate::mha_prefill_wgmma::define(target, pipeline);
        }
        if variant.name == "mma" {
            return mha_prefill_mma_kernel::MhaPrefillMmaKernel::new(
                ir_settings(CubeDim::new_1d(128)),
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
                4,
            )
            .define();
        }
        mha_prefill_simt_kernel::MhaPrefillSimtKernel::new(
            ir_settings(CubeDim::new_1d(64)),
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
            problem.format,
        )
        .define()
    }
}
