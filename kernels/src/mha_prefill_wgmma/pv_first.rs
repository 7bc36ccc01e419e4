//! `Pipeline::pv_first` / `pingpong`: the block loop in FlashAttention-3's order, P(b − 1)·V issued before
//! block b's softmax so the tensor cores run under it.
use super::{
    K_FREE, Pipeline, Q_FREE, Rows, V_FREE, V_FULL, await_block, barrier, begin_step, block_softmax, issue_pv, pack_p,
    q_barrier, row_factors,
};
use cubecl::prelude::*;
use nsa_dsl::mbarrier::mbarrier_arrive;
use nsa_dsl::warpgroup::{named_barrier_arrive, named_barrier_sync};
use nsa_dsl::wgmma::{wgmma_wait, wgmma_wait_pending};

/// The block loop in FlashAttention-3's order ([`Pipeline::pv_first`]) over `blocks` > 0 blocks, from O = 0:
/// step b issues S(b), rescales O and issues P(b − 1)·V(b − 1), settles S(b) alone (`wait_group 1`),
/// releases K(b) and computes block b's softmax while the P·V runs; step b + 1 starts by settling it,
/// releasing V(b − 1) and packing P(b) (not before: the P·V in flight reads the previous P's registers).
/// Returns O. The tile's blocks use buffers `ring0`.. (`persistent`: the blocks of the cube's earlier tiles
/// came first), and once its last S settled the Q tile is released (`persistent`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn pv_first_steps<NS: Size, NA: Size>(
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    base: u32,
    qa: Vector<u32, Const<64>>,
    q_tile: u32,
    ring0: usize,
    blocks: usize,
    k0: usize,
    head: usize,
    warpgroup: usize,
    rows: &mut Rows,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, Const<64>> {
    let mut alpha = Array::<f32>::new(2usize);
    let mut p = Array::<f32>::new(comptime!(pipeline.keys / 2));
    if comptime!(pipeline.pingpong) {
        // Warpgroup 0 takes the first turn.
        if warpgroup == 1 {
            named_barrier_arrive(3u32, 256u32);
        }
    }
    await_turn(warpgroup, pipeline);
    let s0 = begin_step::<NS>(k_map, v_map, q_map, base, qa, q_tile, ring0, blocks, k0, head, pipeline);
    pass_turn(warpgroup, pipeline);
    let s0 = wgmma_wait::<NS>(s0);
    mbarrier_arrive(barrier(base, ring0, K_FREE, pipeline));
    block_softmax::<NS>(s0, &mut p, &mut alpha, rows, 0usize, pipeline);
    let mut o = Vector::<f32, Const<64>>::new(0.0f32);
    let mut step = 1usize;
    while step < blocks {
        // P(step − 2)·V settles here, at the top of the step, not after the softmax: ptxas schedules
        // within a basic block and hoisted the wait above the whole softmax when the two shared one.
        // (At step 1 nothing is in flight and the wait returns at once.)
        o = wgmma_wait::<Const<64>>(o);
        if step > 1 {
            mbarrier_arrive(barrier(base, ring0 + step - 2, V_FREE, pipeline));
        }
        let a = pack_p::<NA>(&p, pipeline);
        await_turn(warpgroup, pipeline);
        let s = begin_step::<NS>(
            k_map,
            v_map,
            q_map,
            base,
            qa,
            q_tile,
            ring0 + step,
            blocks,
            k0,
            head,
            pipeline,
        );
        let late = ring0 + step - 1;
        await_block(base, late, V_FULL, pipeline);
        o = issue_pv::<NA>(o * row_factors(&alpha), a, base, late, false, pipeline);
        pass_turn(warpgroup, pipeline);
        let s = wgmma_wait_pending::<NS>(s, 1u32);
        mbarrier_arrive(barrier(base, ring0 + step, K_FREE, pipeline));
        block_softmax::<NS>(s, &mut p, &mut alpha, rows, step, pipeline);
        step += 1;
    }
    o = wgmma_wait::<Const<64>>(o);
    if blocks > 1 {
        mbarrier_arrive(barrier(base, ring0 + blocks - 2, V_FREE, pipeline));
    }
    let a = pack_p::<NA>(&p, pipeline);
    if comptime!(pipeline.persistent) {
        mbarrier_arrive(q_barrier(base, Q_FREE, pipeline));
    }
    let late = ring0 + blocks - 1;
    await_turn(warpgroup, pipeline);
    await_block(base, late, V_FULL, pipeline);
    o = issue_pv::<NA>(o * row_factors(&alpha), a, base, late, false, pipeline);
    pass_turn(warpgroup, pipeline);
    if comptime!(pipeline.pingpong) {
        // Warpgroup 1's last pass, so that no arrival is left on a barrier.
        if warpgroup == 0 {
            named_barrier_sync(3u32, 256u32);
        }
    }
    let o = wgmma_wait::<Const<64>>(o);
    if comptime!(pipeline.persistent) {
        // The next tile's blocks reuse this buffer (a cube per tile never refills it).
        mbarrier_arrive(barrier(base, late, V_FREE, pipeline));
    }
    o
}

/// Waits for this warpgroup's turn to issue products (`pingpong`: named barrier 3 + warpgroup, which the
/// other warpgroup's [`pass_turn`] completes).
#[cube]
fn await_turn(warpgroup: usize, #[comptime] pipeline: Pipeline) {
    if comptime!(pipeline.pingpong) {
        if warpgroup == 0 {
            named_barrier_sync(3u32, 256u32);
        } else {
            named_barrier_sync(4u32, 256u32);
        }
    }
}

/// Hands the turn to the other warpgroup (`pingpong`).
#[cube]
fn pass_turn(warpgroup: usize, #[comptime] pipeline: Pipeline) {
    if comptime!(pipeline.pingpong) {
        if warpgroup == 0 {
            named_barrier_arrive(4u32, 256u32);
        } else {
            named_barrier_arrive(3u32, 256u32);
        }
    }
}
