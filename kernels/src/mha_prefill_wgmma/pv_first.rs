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
/// came first), and once its last S settled the Q tile is released (`persistent`). With `trim` the last
/// block's step comes after the loop, over the block's first half only where the warpgroup sees no more.
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
    let keys = comptime!(pipeline.keys);
    let mut alpha = Array::<f32>::new(2usize);
    let mut p = Array::<f32>::new(comptime!(keys / 2));
    if comptime!(pipeline.pingpong) {
        // Warpgroup 0 takes the first turn.
        if warpgroup == 1 {
            named_barrier_arrive(3u32, 256u32);
        }
    }
    await_turn(warpgroup, pipeline);
    let s0 = begin_step::<NS>(
        k_map, v_map, q_map, base, qa, q_tile, ring0, blocks, k0, head, keys, pipeline,
    );
    pass_turn(warpgroup, pipeline);
    let s0 = wgmma_wait::<NS>(s0);
    mbarrier_arrive(barrier(base, ring0, K_FREE, pipeline));
    block_softmax::<NS>(s0, &mut p, &mut alpha, rows, 0usize, keys, pipeline);
    let mut o = Vector::<f32, Const<64>>::new(0.0f32);
    let trimmed = comptime!(pipeline.trim) && blocks > 1;
    let loop_end = select(trimmed, blocks - 1, blocks);
    let mut step = 1usize;
    while step < loop_end {
        // P(step − 2)·V settles here, at the top of the step, not after the softmax: ptxas schedules
        // within a basic block and hoisted the wait above the whole softmax when the two shared one.
        // (At step 1 nothing is in flight and the wait returns at once.)
        o = settle_pv(o, base, ring0, step, pipeline);
        o = late_step::<NS, NA>(
            k_map, v_map, q_map, base, qa, q_tile, ring0, step, blocks, k0, head, warpgroup, o, &mut p, &mut alpha,
            rows, keys, pipeline,
        );
        step += 1;
    }
    if trimmed {
        // The last block's step, over the block's first 64 keys where the warpgroup sees no more (uniform);
        // the last P·V(step − 2) is still in flight, settled in the branch.
        if rows.keys <= (blocks - 1) * keys + keys / 2 {
            o = last_steps::<Const<32>, NA, Const<16>>(
                k_map,
                v_map,
                q_map,
                base,
                qa,
                q_tile,
                ring0,
                blocks,
                k0,
                head,
                warpgroup,
                o,
                &mut p,
                &mut alpha,
                rows,
                comptime!(keys / 2),
                pipeline,
            );
        } else {
            o = last_steps::<NS, NA, NA>(
                k_map, v_map, q_map, base, qa, q_tile, ring0, blocks, k0, head, warpgroup, o, &mut p, &mut alpha, rows,
                keys, pipeline,
            );
        }
    } else {
        o = settle_pv(o, base, ring0, loop_end, pipeline);
        o = last_pv::<NA>(o, &p, &alpha, base, ring0, blocks, warpgroup, keys, pipeline);
    }
    o
}

/// `trim`'s last step (step `blocks` − 1 > 0, with P(step − 2)·V in flight; its S over the last block's
/// first `n_keys` keys, NL the packed P's size) and the last P·V. The step is a one-trip loop, so that the
/// settle after it is not in the softmax's basic block (ptxas hoisted it above the softmax there, as in the
/// main loop before), and it starts with its settle as the main loop's steps do: code reading O before the
/// wait, even on the back edge never taken, makes ptxas serialize every product (C7514).
#[cube]
#[allow(clippy::too_many_arguments)]
fn last_steps<NS: Size, NA: Size, NL: Size>(
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
    o: Vector<f32, Const<64>>,
    p: &mut Array<f32>,
    alpha: &mut Array<f32>,
    rows: &mut Rows,
    #[comptime] n_keys: usize,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, Const<64>> {
    let mut o = o;
    let mut step = blocks - 1;
    while step < blocks {
        o = settle_pv(o, base, ring0, step, pipeline);
        o = late_step::<NS, NA>(
            k_map, v_map, q_map, base, qa, q_tile, ring0, step, blocks, k0, head, warpgroup, o, p, alpha, rows, n_keys,
            pipeline,
        );
        step += 1;
    }
    o = settle_pv(o, base, ring0, blocks, pipeline);
    last_pv::<NL>(o, &*p, &*alpha, base, ring0, blocks, warpgroup, n_keys, pipeline)
}

/// The top of step `step`: P(step − 2)·V settled and V(step − 2) released.
#[cube]
fn settle_pv(
    o: Vector<f32, Const<64>>,
    base: u32,
    ring0: usize,
    step: usize,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, Const<64>> {
    let o = wgmma_wait::<Const<64>>(o);
    if step > 1 {
        mbarrier_arrive(barrier(base, ring0 + step - 2, V_FREE, pipeline));
    }
    o
}

/// The rest of step `step` (> 0): S(step) over the block's first `n_keys` keys issued, P(step − 1)·V issued
/// (O rescaled first), S settled alone, K(step) released and block `step`'s softmax computed into `p` and
/// `alpha` while the P·V runs (returned in flight).
#[cube]
#[allow(clippy::too_many_arguments)]
fn late_step<NS: Size, NA: Size>(
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    base: u32,
    qa: Vector<u32, Const<64>>,
    q_tile: u32,
    ring0: usize,
    step: usize,
    blocks: usize,
    k0: usize,
    head: usize,
    warpgroup: usize,
    o: Vector<f32, Const<64>>,
    p: &mut Array<f32>,
    alpha: &mut Array<f32>,
    rows: &mut Rows,
    #[comptime] n_keys: usize,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, Const<64>> {
    let keys = comptime!(pipeline.keys);
    let a = pack_p::<NA>(&*p, keys);
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
        n_keys,
        pipeline,
    );
    let late = ring0 + step - 1;
    await_block(base, late, V_FULL, pipeline);
    let o = issue_pv::<NA>(o * row_factors(&*alpha), a, base, late, keys, false, pipeline);
    pass_turn(warpgroup, pipeline);
    let s = wgmma_wait_pending::<NS>(s, 1u32);
    mbarrier_arrive(barrier(base, ring0 + step, K_FREE, pipeline));
    block_softmax::<NS>(s, p, alpha, rows, step, n_keys, pipeline);
    o
}

/// After the last step (its P·V settled): the last block's P·V over its first `n_keys` keys, settled; the
/// Q tile released (`persistent`: once the last S settled) and, after the product, the last V buffer.
#[cube]
#[allow(clippy::too_many_arguments)]
fn last_pv<NA: Size>(
    o: Vector<f32, Const<64>>,
    p: &Array<f32>,
    alpha: &Array<f32>,
    base: u32,
    ring0: usize,
    blocks: usize,
    warpgroup: usize,
    #[comptime] n_keys: usize,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, Const<64>> {
    let a = pack_p::<NA>(p, n_keys);
    if comptime!(pipeline.persistent) {
        mbarrier_arrive(q_barrier(base, Q_FREE, pipeline));
    }
    let late = ring0 + blocks - 1;
    await_turn(warpgroup, pipeline);
    await_block(base, late, V_FULL, pipeline);
    let o = issue_pv::<NA>(o * row_factors(alpha), a, base, late, n_keys, false, pipeline);
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
