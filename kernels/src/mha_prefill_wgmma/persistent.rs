//! `Pipeline::persistent`: one cube per SM walks the work items ([`tile_at`]'s heaviest-first order), each
//! cube taking the next unclaimed one when its producer is ready for it (a static stride over the items
//! measured 14% slower at 2K tokens: the heaviest cube got 1.27× the mean work). The blocks of a cube's successive tiles go round the same K / V
//! buffers (ring position = blocks of the cube's earlier tiles + block), so the producer warpgroup copies the
//! next tile's first K and, once the current tile's last S has read them, its Q tiles, while the consumers
//! still run the current tile's last softmax, P·V and output stores — the per-tile start that a cube per
//! tile leaves exposed (its first K / Q wait).
use super::{
    BLOCK, CONSUMER_REGISTERS, K_FREE, PRODUCER_REGISTERS, Pipeline, Q_FREE, Q_FULL, await_previous_use, copy_ahead,
    copy_k, init_buffer_barriers, load_q_tiles, new_rows, pv_first_steps, q_barrier, q_tile_address, tile_blocks,
    write_output,
};
use crate::mha_prefill::tile_at;
use cubecl::prelude::*;
use nsa_dsl::mbarrier::{fence_barrier_init, mbarrier_arrive, mbarrier_arrive_expect_tx, mbarrier_init, mbarrier_wait};
use nsa_dsl::warpgroup::{set_max_registers_decrease, set_max_registers_increase};
use nsa_dsl::wgmma::first_atom;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn mha_prefill_persistent_kernel<NS: Size, NA: Size>(
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    cu_q: &[i32],
    cu_k: &[i32],
    out: &mut [u32],
    out_map: &TensorMap<u32, Tiled>,
    lse: &mut [f32],
    work: &mut [Atomic<u32>],
    heads: usize,
    seqs: usize,
    tile_bound: usize,
    sm_scale: f32,
    #[comptime] pipeline: Pipeline,
) {
    let groups = comptime!(pipeline.groups);
    let consumers = comptime!(128 * groups) as u32;
    let smem =
        Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(comptime!(pipeline.shared_memory_bytes() / 16), 1024usize);
    let (_, base) = first_atom(&smem);
    // The work item the producer hands over with each Q full phase.
    let mut slot = Shared::<[u32]>::new_slice(1usize);
    if UNIT_POS == 0 {
        init_buffer_barriers(base, consumers, pipeline);
        mbarrier_init(q_barrier(base, Q_FULL, pipeline), 1u32);
        mbarrier_init(q_barrier(base, Q_FREE, pipeline), consumers);
        fence_barrier_init();
    }
    sync_cube();
    let warpgroup = plane_broadcast(UNIT_POS / 128, 0u32) as usize;
    if warpgroup == groups {
        set_max_registers_decrease(PRODUCER_REGISTERS);
        if UNIT_POS == consumers {
            produce(
                k_map, v_map, q_map, cu_q, cu_k, work, &mut slot, base, heads, seqs, tile_bound, pipeline,
            );
        }
        terminate!();
    }
    set_max_registers_increase(CONSUMER_REGISTERS);

    let q_tile = q_tile_address(base, warpgroup, pipeline);
    // Q is read from its shared tile (`q_shared`); the register operand is unused.
    let qa = Vector::<u32, Const<64>>::new(0u32);
    let mut ring = 0usize;
    let mut q_phase = 0u32;
    loop {
        mbarrier_wait(q_barrier(base, Q_FULL, pipeline), q_phase);
        q_phase ^= 1u32;
        let item = slot[0] as usize;
        if item >= heads * tile_bound {
            break;
        }
        let (_, head, q_start, q_len, k0, k_len, local0) =
            tile_at(cu_q, cu_k, heads, seqs, tile_bound, item, comptime!(BLOCK * groups));
        let blocks = tile_blocks(q_len, k_len, local0, pipeline);
        let group_first = local0 + warpgroup * BLOCK;
        let mut rows = new_rows(q_len, k_len, group_first, sm_scale);
        let mut o = Vector::<f32, Const<64>>::new(0.0f32);
        if blocks > 0 {
            o = pv_first_steps::<NS, NA>(
                k_map, v_map, q_map, base, qa, q_tile, ring, blocks, k0, head, warpgroup, &mut rows, pipeline,
            );
            ring += blocks;
        } else {
            mbarrier_arrive(q_barrier(base, Q_FREE, pipeline));
        }
        write_output(
            o,
            &rows,
            out,
            out_map,
            lse,
            q_tile,
            q_start,
            q_len,
            local0,
            group_first,
            heads,
            head,
            warpgroup,
            pipeline,
        );
    }
}

/// The producer: claims work items (its cube's index first, then CUBE_COUNT + the `work` counter's tickets,
/// so the cubes that finish first take the next tiles), skipping slots past a sequence's last tile; per
/// item, its first K (once that buffer is free), then — once the previous item's last S read the Q tiles —
/// the item in `slot` and its Q tiles on the Q full barrier, then every step's copies as buffers free up.
/// An item past the last ends the consumers' walk.
#[cube]
#[allow(clippy::too_many_arguments)]
fn produce(
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    cu_q: &[i32],
    cu_k: &[i32],
    work: &mut [Atomic<u32>],
    slot: &mut [u32],
    base: u32,
    heads: usize,
    seqs: usize,
    tile_bound: usize,
    #[comptime] pipeline: Pipeline,
) {
    let (groups, keys, buffers) = comptime!((pipeline.groups, pipeline.keys, pipeline.buffers()));
    let items = heads * tile_bound;
    let q_full = q_barrier(base, Q_FULL, pipeline);
    let mut ring = 0usize;
    let mut handed = 0u32;
    let mut item = CUBE_POS;
    loop {
        let (valid, head, q_start, q_len, k0, k_len, local0) =
            tile_at(cu_q, cu_k, heads, seqs, tile_bound, item, comptime!(BLOCK * groups));
        if item < items && !valid {
            item = CUBE_COUNT + work[0].fetch_add(1u32) as usize;
        } else {
            let blocks = select(valid, tile_blocks(q_len, k_len, local0, pipeline), 0usize);
            // The copies address ring position r at key row k_base + r·keys = k0 + (r − ring)·keys; the
            // subtraction wraps, the sum does not (r ≥ ring).
            let k_base = k0 - ring * keys;
            if blocks > 0 {
                if ring >= buffers {
                    await_previous_use(base, ring, K_FREE, pipeline);
                }
                copy_k(k_map, q_map, base, ring, k_base, 0usize, head, pipeline);
            }
            if handed > 0 {
                mbarrier_wait(q_barrier(base, Q_FREE, pipeline), (handed - 1) % 2);
            }
            slot[0] = item as u32;
            if blocks > 0 {
                mbarrier_arrive_expect_tx(q_full, comptime!(pipeline.q_bytes()) as u32);
                load_q_tiles(q_map, base, q_full, q_start + local0, head, pipeline);
            } else {
                mbarrier_arrive(q_full);
            }
            handed += 1;
            if item >= items {
                break;
            }
            let end = ring + blocks;
            while ring < end {
                copy_ahead(k_map, v_map, q_map, base, ring, end, k_base, head, pipeline);
                ring += 1;
            }
            item = CUBE_COUNT + work[0].fetch_add(1u32) as usize;
        }
    }
}
