//! `mha_prefill`'s Hopper variants: flash attention on warpgroup MMA. A cube is `groups` warpgroups
//! (128 units each) owning 64·groups queries of one head; warpgroup w holds queries 64w.., warp i of it
//! 16 of them in the accumulator layout of the `mma` variant. Q stays for the whole cube in registers (the
//! A operand of S = Q·Kᵀ, m64n`keys` over 12 k16 steps, K read from a swizzled shared tile) or, to free 48
//! registers a unit, in a swizzled shared tile of its own. P stays in registers and O += P·V is m64n128
//! over keys/16 k16 steps with V read MN-major ([key][dim] as stored, trans-b), O rescaled in registers
//! first. Blocks have 64 keys or (`keys` 128) 128: half the per-block waits, barriers and O rescales, for
//! S and P twice as wide.
//!
//! K/V blocks (and the Q tiles) are copied by the tensor copy engine (`dsl::tma`) in 64 × 64 boxes: one
//! unit starts K(b + depth) and V(b + depth − 1) at step b (V is read a step after its K), completing on
//! their "full" mbarriers; every unit releases a block's K buffer once its S was computed and its V buffer
//! after its P·V ("free" mbarriers), and the copying unit waits for those releases before reusing a
//! buffer. No cube barrier per block: a warpgroup may run ahead of the others by the buffers it has. Rows
//! past the tensor come in as zeros; rows of the next sequence are masked like any key past a query's
//! causal limit.
//!
//! Block b's S is issued without waiting and consumed a step later: while the tensor cores compute it, the
//! warpgroup runs block b − 1's softmax (FlashAttention-3's intra-warpgroup overlap); block b − 1's P·V
//! then waits for every product in flight, S included.
//!
//! Masking costs a compare and a select per score, so only blocks crossing a warpgroup's causal diagonal
//! are masked; a warpgroup whose queries see none of a block skips it.
use crate::Problem;
use crate::launch::{bf16_head_rows_map, buffer, grid, ir_settings, slice_arg};
use crate::mha_prefill::locate_tile;
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::format::pack_bf16x2;
use nsa_dsl::mbarrier::{fence_barrier_init, mbarrier_arrive, mbarrier_arrive_expect_tx, mbarrier_init, mbarrier_wait};
use nsa_dsl::tma::{fence_shared_to_async, tma_load_3d, tma_store_3d, tma_store_commit, tma_store_wait_read};
use nsa_dsl::warp_mma::{fast_exp2, quad_max, quad_sum};
use nsa_dsl::warpgroup::{named_barrier_sync, set_max_registers_decrease, set_max_registers_increase};
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, first_atom, store_shared_u32, sw128_descriptor, sw128_mn_major_descriptor, swizzled_chunk,
    wgmma_bf16_register_a_accumulate, wgmma_bf16_register_a_fresh, wgmma_fresh, wgmma_wait,
};

mod persistent;
mod pv_first;
use pv_first::pv_first_steps;

const D_QK: usize = 192;
const D_V: usize = 128;
/// Registers a unit of the producer warpgroup keeps, and a consumer's: 128 · (2 · 240 + 24) ≤ 64K.
const PRODUCER_REGISTERS: u32 = 24;
const CONSUMER_REGISTERS: u32 = 240;

/// Queries per warpgroup, and rows per tensor-copy box.
const BLOCK: usize = 64;
/// Bytes of one 64-row × 64-column swizzled block: one TMA box.
const BOX_BYTES: usize = BLOCK * 128;

/// A cube's shape: `groups` warpgroups (64 queries each) sharing blocks of `keys` keys copied `depth`
/// blocks ahead, Q in registers or (`q_shared`) in shared tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pipeline {
    pub groups: usize,
    pub depth: usize,
    /// Q in swizzled shared tiles (S = Q·Kᵀ reads both operands from shared memory) instead of registers:
    /// 48 registers fewer per unit, so three warpgroups fit an SM's registers.
    pub q_shared: bool,
    /// Keys per block (64 or 128): 128 halves the per-block waits, rescales and barriers, for 48 more
    /// registers a unit (S and P twice as wide).
    pub keys: usize,
    /// A warpgroup whose 64 queries all lie in its sequence writes its output rows into its (then unused) Q
    /// tile and stores them with two tensor copies (`q_shared` only), instead of 32 four-byte stores a unit.
    pub tma_store: bool,
    /// FlashAttention-3's order: step b issues S(b), then block b − 1's P·V, settles S(b) alone, runs block
    /// b's softmax while the P·V runs, then settles it — every product settled in its step, and the softmax
    /// under a product instead of between S and P·V (all blocks for both warpgroups: masking zeroes a
    /// warpgroup's blocks past its keys, so no branch separates a product from its wait).
    pub pv_first: bool,
    /// With `pv_first` and two warpgroups: each step's products are issued in turns (named barriers 3 and 4),
    /// so one warpgroup's softmax runs while the other's products run (FlashAttention-3's ping-pong).
    pub pingpong: bool,
    /// One more warpgroup (the cube's last) issues every K / V copy after the first as soon as its buffer is
    /// free, instead of warpgroup 0's first unit at the start of each step (which waits for both
    /// warpgroups' releases and holds its warp, so its warpgroup's S, back). It keeps
    /// [`PRODUCER_REGISTERS`] a unit and hands the rest to the consumers (`setmaxnreg`; one producer warp
    /// would leave 168 a unit to all under the 288-unit launch bound, and the consumers need ~220).
    pub producer: bool,
    /// With `producer`: one cube per SM walks the tiles (work item CUBE_POS, then + CUBE_COUNT ..), the
    /// blocks of successive tiles going round the same buffers, and Q on barriers of its own, so the producer
    /// copies the next tile's Q (once the last S read it) and first K / V while the consumers finish the
    /// current tile. Outputs are stored from registers (the Q tile is refilled meanwhile).
    pub persistent: bool,
    /// With `pv_first` (128-key blocks): a warpgroup whose queries see at most the first 64 keys of the
    /// tile's last block computes only those (S m64n64, P·V over 4 k steps) instead of masking the other
    /// 64 — the warpgroup on a causal diagonal's upper side skips a quarter of the diagonal block's work.
    pub trim: bool,
}

impl Pipeline {
    /// Blocks are copied at least one ahead (with none, step 0 would wait for a copy never started).
    fn check(self) {
        assert!(
            self.depth >= 1
                && (1..=3).contains(&self.groups)
                && matches!(self.keys, 64 | 128)
                && (self.q_shared || !self.tma_store)
                && (!(self.pingpong || self.producer) || (self.pv_first && self.groups == 2))
                && (!self.persistent || (self.producer && self.q_shared && !self.tma_store))
                && (!self.trim || (self.pv_first && self.keys == 128)),
            "{self:?}: not a pipeline"
        );
    }

    /// K and V buffers each: step s copies K(s + depth) over K(s − 1), whose S is done, and V(s + depth − 1)
    /// over V(s − 2), whose P·V is done (V is read a step after its K, so it is copied a step later).
    fn buffers(self) -> usize {
        self.depth + 1
    }

    /// Bytes of one block's K tile (three 64-column blocks of `keys` rows) and V tile (two).
    fn k_tile_bytes(self) -> usize {
        3 * self.keys * 128
    }

    fn v_tile_bytes(self) -> usize {
        2 * self.keys * 128
    }

    /// Where the Q tiles start (after K and V), in bytes.
    fn q_offset(self) -> usize {
        self.buffers() * (self.k_tile_bytes() + self.v_tile_bytes())
    }

    /// Bytes of the tiles; the barriers follow them: K full, V full, K free, V free (one per buffer each),
    /// and (`persistent`) Q full, Q free.
    fn tiles_bytes(self) -> usize {
        self.q_offset() + if self.q_shared { self.q_bytes() } else { 0 }
    }

    /// Bytes of the Q tiles (`q_shared`).
    fn q_bytes(self) -> usize {
        self.groups * 3 * BOX_BYTES
    }

    /// Units a cube: 128 a warpgroup, the producer's included.
    pub fn units(self) -> u32 {
        128 * (self.groups + self.producer as usize) as u32
    }

    pub fn shared_memory_bytes(self) -> usize {
        let barriers = 8 * 4 * self.buffers() + if self.persistent { 16 } else { 0 };
        (self.tiles_bytes() + barriers).next_multiple_of(16) + ATOM_BYTES as usize
    }
}

/// Byte offset from the aligned base of block `block`'s K tile (K buffers first).
#[cube]
fn k_tile_offset(block: usize, #[comptime] pipeline: Pipeline) -> u32 {
    ((block % comptime!(pipeline.buffers())) * comptime!(pipeline.k_tile_bytes())) as u32
}

/// Byte offset from the aligned base of block `block`'s V tile (after the K buffers).
#[cube]
fn v_tile_offset(block: usize, #[comptime] pipeline: Pipeline) -> u32 {
    let first = comptime!(pipeline.buffers() * pipeline.k_tile_bytes());
    (first + (block % comptime!(pipeline.buffers())) * comptime!(pipeline.v_tile_bytes())) as u32
}

/// Shared address of warpgroup `w`'s Q tile (`q_shared`: after the K and V buffers).
#[cube]
fn q_tile_address(base: u32, w: usize, #[comptime] pipeline: Pipeline) -> u32 {
    base + (comptime!(pipeline.q_offset()) + w * comptime!(3 * BOX_BYTES)) as u32
}

/// Starts copying `columns` 64-column blocks of `rows` rows of `map` at (column 0, `head`, `row`) into
/// consecutive swizzled blocks (`rows` · 128 bytes each, in 64-row boxes) from shared address `tile`,
/// completing on barrier `full`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_boxes(
    map: &TensorMap<u32, Tiled>,
    tile: u32,
    full: u32,
    head: i32,
    row: i32,
    #[comptime] columns: u32,
    #[comptime] rows: u32,
) {
    #[unroll]
    for c in 0..columns {
        #[unroll]
        for r in 0..comptime!(rows / 64) {
            let address = tile + (c * rows + r * 64) * 128;
            tma_load_3d(map, address, full, (64 * c) as i32, head, row + (64 * r) as i32);
        }
    }
}

/// Starts copying block `block` (rows `k0` + keys·block ..) of head `head`: `columns` 64-column blocks of
/// `map` into the tile at shared address `tile`, completing on barrier `full`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_block(
    map: &TensorMap<u32, Tiled>,
    tile: u32,
    full: u32,
    head: i32,
    k0: usize,
    block: usize,
    #[comptime] columns: u32,
    #[comptime] pipeline: Pipeline,
) {
    let keys = comptime!(pipeline.keys);
    load_boxes(
        map,
        tile,
        full,
        head,
        (k0 + block * keys) as i32,
        columns,
        comptime!(keys as u32),
    );
}

/// Shared address of the `kind`-th barrier array's barrier for block `block` (0 K full, 1 V full, 2 K free,
/// 3 V free; one barrier per buffer each).
#[cube]
fn barrier(base: u32, block: usize, #[comptime] kind: usize, #[comptime] pipeline: Pipeline) -> u32 {
    let first = comptime!(pipeline.tiles_bytes() + 8 * kind * pipeline.buffers());
    base + (first + 8 * (block % comptime!(pipeline.buffers()))) as u32
}

/// Initializes every buffer's barriers: a full one completes with the copying unit's arrival and the
/// copies' bytes, a free one with the release of each of the `consumers` units. One unit calls it.
#[cube]
fn init_buffer_barriers(base: u32, consumers: u32, #[comptime] pipeline: Pipeline) {
    #[unroll]
    for i in 0..comptime!(pipeline.buffers()) {
        mbarrier_init(barrier(base, i, K_FULL, pipeline), 1u32);
        mbarrier_init(barrier(base, i, V_FULL, pipeline), 1u32);
        mbarrier_init(barrier(base, i, K_FREE, pipeline), consumers);
        mbarrier_init(barrier(base, i, V_FREE, pipeline), consumers);
    }
}

/// Shared address of the Q full (`kind` 0) or Q free (1) barrier (`persistent`).
#[cube]
fn q_barrier(base: u32, #[comptime] kind: usize, #[comptime] pipeline: Pipeline) -> u32 {
    base + comptime!(pipeline.tiles_bytes() + 8 * 4 * pipeline.buffers() + 8 * kind) as u32
}

const Q_FULL: usize = 0;
const Q_FREE: usize = 1;
const K_FULL: usize = 0;
const V_FULL: usize = 1;
const K_FREE: usize = 2;
const V_FREE: usize = 3;

/// Waits until the barrier of `kind` for block `block` completed `block`'s phase.
#[cube]
fn await_block(base: u32, block: usize, #[comptime] kind: usize, #[comptime] pipeline: Pipeline) {
    let buffers = comptime!(pipeline.buffers());
    mbarrier_wait(barrier(base, block, kind, pipeline), ((block / buffers) % 2) as u32);
}

/// Waits until the barrier of `kind` for block `block` completed the phase of block `block` − buffers
/// (the buffer's previous block).
#[cube]
fn await_previous_use(base: u32, block: usize, #[comptime] kind: usize, #[comptime] pipeline: Pipeline) {
    let buffers = comptime!(pipeline.buffers());
    mbarrier_wait(barrier(base, block, kind, pipeline), ((block / buffers + 1) % 2) as u32);
}

/// One unit's start of block `block`'s K copy: three column blocks of head `head` from row `k0` + keys·block,
/// and with block 0 (`q_shared`) every warpgroup's Q tile from row `q_row0` + 64w, completing on the
/// block's K full barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_k(
    k_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    base: u32,
    block: usize,
    k0: usize,
    q_row0: usize,
    head: usize,
    #[comptime] pipeline: Pipeline,
) {
    let full = barrier(base, block, K_FULL, pipeline);
    let k_bytes = comptime!(pipeline.k_tile_bytes()) as u32;
    let q_bytes = comptime!(pipeline.q_bytes()) as u32;
    let with_q = comptime!(pipeline.q_shared && !pipeline.persistent) && block == 0;
    mbarrier_arrive_expect_tx(full, select(with_q, k_bytes + q_bytes, k_bytes));
    let k_tile = base + k_tile_offset(block, pipeline);
    load_block(k_map, k_tile, full, head as i32, k0, block, 3u32, pipeline);
    if with_q {
        load_q_tiles(q_map, base, full, q_row0, head, pipeline);
    }
}

/// Starts copying every warpgroup's Q tile (rows `q_row0` + 64w of head `head`), completing on `full`.
#[cube]
fn load_q_tiles(
    q_map: &TensorMap<u32, Tiled>,
    base: u32,
    full: u32,
    q_row0: usize,
    head: usize,
    #[comptime] pipeline: Pipeline,
) {
    #[unroll]
    for w in 0..pipeline.groups {
        let q_tile = q_tile_address(base, w, pipeline);
        load_boxes(
            q_map,
            q_tile,
            full,
            head as i32,
            (q_row0 + w * BLOCK) as i32,
            3u32,
            64u32,
        );
    }
}

/// One unit's start of block `block`'s V copy (two column blocks), completing on its V full barrier.
#[cube]
fn copy_v(
    v_map: &TensorMap<u32, Tiled>,
    base: u32,
    block: usize,
    k0: usize,
    head: usize,
    #[comptime] pipeline: Pipeline,
) {
    let full = barrier(base, block, V_FULL, pipeline);
    mbarrier_arrive_expect_tx(full, comptime!(pipeline.v_tile_bytes()) as u32);
    let v_tile = base + v_tile_offset(block, pipeline);
    load_block(v_map, v_tile, full, head as i32, k0, block, 2u32, pipeline);
}

/// The start of step `step`: waits until block `step`'s K landed; the copying unit starts K(step + depth)
/// and V(step + depth − 1) once their buffers are free; issues block `step`'s S over its first `n_keys`
/// keys (returned in flight).
#[cube]
#[allow(clippy::too_many_arguments)]
fn begin_step<NS: Size>(
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    base: u32,
    qa: Vector<u32, Const<64>>,
    q_tile: u32,
    step: usize,
    blocks: usize,
    k0: usize,
    head: usize,
    #[comptime] n_keys: usize,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, NS> {
    await_block(base, step, K_FULL, pipeline);
    if comptime!(!pipeline.producer) {
        if UNIT_POS == 0 {
            copy_ahead(k_map, v_map, q_map, base, step, blocks, k0, head, pipeline);
        }
    }
    sync_plane();
    issue_scores::<NS>(qa, q_tile, base, step, n_keys, pipeline)
}

/// The copies step `step` starts: K(step + depth) and V(step + depth − 1), each once its buffer is free.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_ahead(
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    base: u32,
    step: usize,
    blocks: usize,
    k0: usize,
    head: usize,
    #[comptime] pipeline: Pipeline,
) {
    let (depth, buffers) = comptime!((pipeline.depth, pipeline.buffers()));
    let k_ahead = step + depth;
    if k_ahead < blocks {
        if k_ahead >= buffers {
            await_previous_use(base, k_ahead, K_FREE, pipeline);
        }
        copy_k(k_map, q_map, base, k_ahead, k0, 0usize, head, pipeline);
    }
    let v_ahead = k_ahead - 1;
    if v_ahead < blocks {
        if v_ahead >= buffers {
            await_previous_use(base, v_ahead, V_FREE, pipeline);
        }
        copy_v(v_map, base, v_ahead, k0, head, pipeline);
    }
}

/// Issues S = Q·Kᵀ for block `block` (64 queries × its first `keys` keys, K = 192 in three 64-column
/// blocks of the K tile; Q from registers `qa`, or the swizzled tile at shared address `q_tile`) without
/// waiting: the result is in flight until [`wgmma_wait`].
#[cube]
fn issue_scores<NS: Size>(
    qa: Vector<u32, Const<64>>,
    q_tile: u32,
    base: u32,
    block: usize,
    #[comptime] keys: usize,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, NS> {
    let k_desc = sw128_descriptor(base + k_tile_offset(block, pipeline));
    let k_block_bytes = comptime!(pipeline.keys * 128);
    if comptime!(pipeline.q_shared) {
        wgmma_fresh::<NS>(
            sw128_descriptor(q_tile),
            k_desc,
            Operands::Bf16,
            keys,
            comptime!(D_QK / 16),
            comptime!(BOX_BYTES),
            k_block_bytes,
            false,
        )
    } else {
        wgmma_bf16_register_a_fresh::<NS, Const<64>>(qa, k_desc, keys, comptime!(D_QK / 16), k_block_bytes, false)
    }
}

/// A unit's two query rows (g and g + 8 of its warp's 16) through the block loop: running maxima `m` (log₂
/// units) and sums `l`, each row's causal key `limit`, the first key any row of the warpgroup cannot see
/// (`unmasked_keys`: blocks before it skip the mask), the unit's quad lane `t` and the score scale in log₂.
#[derive(CubeType)]
struct Rows {
    m: Array<f32>,
    l: Array<f32>,
    limit: Array<usize>,
    unmasked_keys: usize,
    /// Keys the warpgroup's last query sees.
    keys: usize,
    t: usize,
    scale_log2: f32,
}

/// Keys the last query of the warpgroup holding queries `group_first`.. sees (a sequence of `q_len` queries
/// and `k_len` keys).
#[cube]
fn group_keys(q_len: usize, k_len: usize, group_first: usize) -> usize {
    let group_end = select(group_first + BLOCK < q_len, group_first + BLOCK, q_len);
    select(
        group_first < q_len && k_len + group_end > q_len,
        k_len + group_end - q_len,
        0usize,
    )
}

/// A unit's rows at the start of a tile whose warpgroup holds queries `group_first`.. of a sequence of
/// `q_len` queries and `k_len` keys.
#[cube]
fn new_rows(q_len: usize, k_len: usize, group_first: usize, sm_scale: f32) -> Rows {
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let first = group_first + ((UNIT_POS / 32) % 4) as usize * 16 + g;
    let mut m = Array::<f32>::new(2usize);
    let mut l = Array::<f32>::new(2usize);
    let mut limit = Array::<usize>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        m[r] = -1073741824.0f32;
        l[r] = 0.0f32;
        let local = first + 8 * r;
        limit[r] = select(k_len + local + 1 > q_len, k_len + local + 1 - q_len, 0usize);
    }
    Rows {
        m,
        l,
        limit,
        unmasked_keys: select(k_len + group_first + 1 > q_len, k_len + group_first + 1 - q_len, 0usize),
        keys: group_keys(q_len, k_len, group_first),
        t,
        scale_log2: sm_scale * core::f32::consts::LOG2_E,
    }
}

/// Blocks of keys the tile of queries `local0`.. needs (those its last query sees).
#[cube]
fn tile_blocks(q_len: usize, k_len: usize, local0: usize, #[comptime] pipeline: Pipeline) -> usize {
    let rows = comptime!(BLOCK * pipeline.groups);
    let tile_end = select(local0 + rows < q_len, local0 + rows, q_len);
    let tile_keys = select(k_len + tile_end > q_len, k_len + tile_end - q_len, 0usize);
    tile_keys.div_ceil(comptime!(pipeline.keys))
}

/// Block `block`'s online softmax of `s` (this warpgroup's 64 queries × `keys` keys from keys·block; element
/// 4n + 2r + e: row g + 8r, key 8n + 2t + e) in log₂ units, then O rescaled and, once the block's V landed,
/// O += P·V. A block reaching past `unmasked_keys` (warpgroup-uniform) is masked: keys at or past a row's
/// causal `limit` weigh nothing; blocks left of the diagonal skip the compares. Maxima and sums are trees,
/// not chains.
#[cube]
fn softmax_and_pv<NS: Size, NA: Size>(
    s: Vector<f32, NS>,
    o: Vector<f32, Const<64>>,
    rows: &mut Rows,
    block: usize,
    base: u32,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, Const<64>> {
    let mut alpha = Array::<f32>::new(2usize);
    let keys = comptime!(pipeline.keys);
    let mut p = Array::<f32>::new(comptime!(keys / 2));
    block_softmax::<NS>(s, &mut p, &mut alpha, rows, block, keys, pipeline);
    let scale = row_factors(&alpha);
    let a = pack_p::<NA>(&p, keys);
    await_block(base, block, V_FULL, pipeline);
    issue_pv::<NA>(o * scale, a, base, block, keys, true, pipeline)
}

/// Block `block`'s online softmax of `s`, its first `keys` keys (see [`softmax_and_pv`]): the row maxima
/// `m` and sums `l` updated, `p` = exp2(S·scale − m) per element of `s`, `alpha` the factor O's rows take for
/// the new maxima.
#[cube]
#[allow(clippy::too_many_arguments)]
fn block_softmax<NS: Size>(
    s: Vector<f32, NS>,
    p: &mut Array<f32>,
    alpha: &mut Array<f32>,
    rows: &mut Rows,
    block: usize,
    #[comptime] keys: usize,
    #[comptime] pipeline: Pipeline,
) {
    // Values per unit, per row, and tree levels over a row's values.
    let (values, row_values, levels) = comptime!((keys / 2, keys / 4, (keys / 4).trailing_zeros()));
    let key0 = block * comptime!(pipeline.keys);
    let masked = key0 + keys > rows.unmasked_keys;
    let mut x = Array::<f32>::new(values);
    #[unroll]
    for i in 0..values {
        x[i] = s.extract(i);
    }
    if masked {
        #[unroll]
        for i in 0..values {
            let key = key0 + (i / 4) * 8 + 2 * rows.t + i % 2;
            x[i] = select(key < rows.limit[(i % 4) / 2], x[i], f32::reinterpret(0xff80_0000u32));
        }
    }
    #[unroll]
    for r in 0..2usize {
        // Row r's values are elements 4n + 2r + e.
        let mut tree = Array::<f32>::new(row_values);
        #[unroll]
        for i in 0..row_values {
            tree[i] = x[4 * (i / 2) + 2 * r + i % 2];
        }
        #[unroll]
        for level in 0..levels {
            let width = comptime!((row_values / 2) >> level);
            #[unroll]
            for i in 0..width {
                tree[i] = f32::max(tree[i], tree[i + width]);
            }
        }
        let m_new = f32::max(rows.m[r], quad_max(tree[0]) * rows.scale_log2);
        alpha[r] = fast_exp2(rows.m[r] - m_new);
        rows.m[r] = m_new;
        #[unroll]
        for i in 0..row_values {
            let index = 4 * (i / 2) + 2 * r + i % 2;
            let pe = fast_exp2(x[index] * rows.scale_log2 - m_new);
            p[index] = pe;
            tree[i] = pe;
        }
        #[unroll]
        for level in 0..levels {
            let width = comptime!((row_values / 2) >> level);
            #[unroll]
            for i in 0..width {
                tree[i] += tree[i + width];
            }
        }
        rows.l[r] = rows.l[r] * alpha[r] + tree[0];
    }
}

/// O's per-element factors for the row factors `alpha` (element i is row (i % 4) / 2).
#[cube]
fn row_factors(alpha: &Array<f32>) -> Vector<f32, Const<64>> {
    let mut scale = Vector::<f32, Const<64>>::new(0.0f32);
    #[unroll]
    for i in 0..64usize {
        scale.insert(i, alpha[(i % 4) / 2]);
    }
    scale
}

/// P of `keys` keys as bf16 pairs in the m16n8k16 A layout: k step j holds keys 16j.. = accumulator column
/// groups 2j (pairs 0, 1) and 2j + 1 (pairs 2, 3).
#[cube]
fn pack_p<NA: Size>(p: &Array<f32>, #[comptime] keys: usize) -> Vector<u32, NA> {
    let mut a = Vector::<u32, NA>::new(0u32);
    #[unroll]
    for i in 0..comptime!(keys / 4) {
        a.insert(i, pack_bf16x2(p[2 * i], p[2 * i + 1]));
    }
    a
}

/// O += P·V for block `block`'s first `keys` keys (V landed), waited for when `wait`; otherwise in flight
/// until [`wgmma_wait`], and `a` must not change until then.
#[cube]
fn issue_pv<NA: Size>(
    o: Vector<f32, Const<64>>,
    a: Vector<u32, NA>,
    base: u32,
    block: usize,
    #[comptime] keys: usize,
    #[comptime] wait: bool,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, Const<64>> {
    let v_desc = sw128_mn_major_descriptor(
        base + v_tile_offset(block, pipeline),
        comptime!(pipeline.keys as u32 * 128),
    );
    let steps = comptime!(keys / 16);
    wgmma_bf16_register_a_accumulate::<Const<64>, NA>(o, a, v_desc, 128usize, steps, 2048usize, wait)
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn mha_prefill_wgmma_kernel<NS: Size, NA: Size>(
    q: &[u32],
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    cu_q: &[i32],
    cu_k: &[i32],
    out: &mut [u32],
    out_map: &TensorMap<u32, Tiled>,
    lse: &mut [f32],
    heads: usize,
    seqs: usize,
    tile_bound: usize,
    sm_scale: f32,
    #[comptime] pipeline: Pipeline,
) {
    let (groups, keys) = comptime!((pipeline.groups, pipeline.keys));
    let (head, q_start, q_len, k0, k_len, local0) =
        locate_tile(cu_q, cu_k, heads, seqs, tile_bound, comptime!(BLOCK * groups));
    let warp = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let units = comptime!(128 * groups) as u32;

    let smem =
        Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(comptime!(pipeline.shared_memory_bytes() / 16), 1024usize);
    let (_, base) = first_atom(&smem);

    // Keys the whole tile needs; those this warpgroup's last query needs, and the first key any of its
    // queries cannot see (blocks before it need no mask).
    let blocks = tile_blocks(q_len, k_len, local0, pipeline);
    // The warpgroup index through a shuffle from lane 0: provably warp-uniform, so the compiler keeps Q's
    // descriptors in uniform registers (one add a k step instead of six instructions), and the branch on
    // this warpgroup's key range is uniform.
    let warpgroup = plane_broadcast(UNIT_POS / 128, 0u32) as usize;
    let group_first = local0 + warpgroup * BLOCK;
    let group_keys = group_keys(q_len, k_len, group_first);
    let q_tile = q_tile_address(base, warpgroup, pipeline);

    // Barriers: a full one completes with the copying unit's arrival and the copies' bytes; a free one
    // with every unit's release. Then K blocks 0 .. depth − 1 (block 0 with the Q tiles) and V blocks
    // 0 .. depth − 2.
    if UNIT_POS == 0 {
        init_buffer_barriers(base, units, pipeline);
        fence_barrier_init();
    }
    sync_cube();
    if UNIT_POS == 0 {
        #[unroll]
        for first in 0..comptime!(pipeline.depth) {
            if first < blocks {
                copy_k(k_map, q_map, base, first, k0, q_start + local0, head, pipeline);
                if comptime!(first + 1 < pipeline.depth) {
                    copy_v(v_map, base, first, k0, head, pipeline);
                }
            }
        }
    }
    sync_plane();
    if comptime!(pipeline.producer) {
        // The producer warpgroup hands its registers to the consumers, and its first unit runs every
        // step's copies as soon as their buffers are free, then leaves (no cube barrier follows; the free
        // barriers count the consumers only).
        if warpgroup == groups {
            set_max_registers_decrease(PRODUCER_REGISTERS);
            if UNIT_POS == comptime!(128 * groups) as u32 {
                let mut step = 0usize;
                while step < blocks {
                    copy_ahead(k_map, v_map, q_map, base, step, blocks, k0, head, pipeline);
                    step += 1;
                }
            }
            terminate!();
        }
        set_max_registers_increase(CONSUMER_REGISTERS);
    }

    // Q as the A operand of S = Q·Kᵀ, k step j in registers 4j..4j + 3: rows g and g + 8 of this warp's
    // 16 (register + r), columns 16j + 2t, + 1 (register + 2h: + 8h); rows past the sequence zero. 48 are
    // used; the vector has 64 because CUDA aligns a vector type to its size, which must be a power of two.
    let mut qa = Vector::<u32, Const<64>>::new(0u32);
    if comptime!(!pipeline.q_shared) {
        #[unroll]
        for r in 0..2usize {
            let local = local0 + warp * 16 + g + 8 * r;
            let valid = local < q_len;
            let row = ((q_start + select(valid, local, 0usize)) * heads + head) * comptime!(D_QK / 2) + t;
            #[unroll]
            for j in 0..12usize {
                #[unroll]
                for h in 0..2usize {
                    qa.insert(4 * j + r + 2 * h, select(valid, q[row + 8 * j + 4 * h], 0u32));
                }
            }
        }
    }
    let mut o = Vector::<f32, Const<64>>::new(0.0f32);
    let mut rows = new_rows(q_len, k_len, group_first, sm_scale);

    // Step b (begin_step): block b's K awaited, K(b + depth) and V(b + depth − 1) copies started, block b's
    // S issued; while the tensor cores compute it, block b − 1's softmax, then its P·V (whose wait covers S
    // too); then S read (held for step b + 1) and block b's K buffer released. Step 0 is peeled out of the loop (a loop with
    // an `if step > 0` around the softmax measured 12% slower).
    if comptime!(pipeline.pv_first) {
        if blocks > 0 {
            o = pv_first_steps::<NS, NA>(
                k_map, v_map, q_map, base, qa, q_tile, 0usize, blocks, k0, head, warpgroup, &mut rows, pipeline,
            );
        }
    } else if blocks > 0 {
        let s0 = begin_step::<NS>(
            k_map, v_map, q_map, base, qa, q_tile, 0usize, blocks, k0, head, keys, pipeline,
        );
        let mut held = wgmma_wait::<NS>(s0);
        mbarrier_arrive(barrier(base, 0usize, K_FREE, pipeline));
        let mut step = 1usize;
        while step < blocks {
            let s = begin_step::<NS>(
                k_map, v_map, q_map, base, qa, q_tile, step, blocks, k0, head, keys, pipeline,
            );
            let late = step - 1;
            if late * keys < group_keys {
                o = softmax_and_pv::<NS, NA>(held, o, &mut rows, late, base, pipeline);
            }
            mbarrier_arrive(barrier(base, late, V_FREE, pipeline));
            held = wgmma_wait::<NS>(s);
            mbarrier_arrive(barrier(base, step, K_FREE, pipeline));
            step += 1;
        }
        let late = blocks - 1;
        if late * keys < group_keys {
            o = softmax_and_pv::<NS, NA>(held, o, &mut rows, late, base, pipeline);
        }
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

/// out = O / l (bf16 pairs: row g + 8r, columns 8n + 2t, + 1) and lse for this unit's rows of the tile of
/// queries `local0`.. (this warpgroup's from `group_first`); rows past the sequence unwritten.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_output(
    o: Vector<f32, Const<64>>,
    rows: &Rows,
    out: &mut [u32],
    out_map: &TensorMap<u32, Tiled>,
    lse: &mut [f32],
    q_tile: u32,
    q_start: usize,
    q_len: usize,
    local0: usize,
    group_first: usize,
    heads: usize,
    head: usize,
    warpgroup: usize,
    #[comptime] pipeline: Pipeline,
) {
    let warp = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    // `tma_store`: a warpgroup whose rows all lie in the sequence (uniform) writes them swizzled into its Q
    // tile (free: its last S is done) as the output map's two 64 × 64 boxes, and one unit stores them.
    let whole_group = comptime!(pipeline.tma_store) && group_first + BLOCK <= q_len;
    #[unroll]
    for r in 0..2usize {
        let sum = quad_sum(rows.l[r]);
        let local = local0 + warp * 16 + g + 8 * r;
        if local < q_len {
            let pair = (q_start + local) * heads + head;
            let inv = select(sum > 0.0f32, 1.0f32 / sum, 0.0f32);
            let mut packed = Array::<u32>::new(16usize);
            #[unroll]
            for n in 0..16usize {
                packed[n] = pack_bf16x2(o.extract(4 * n + 2 * r) * inv, o.extract(4 * n + 2 * r + 1) * inv);
            }
            if whole_group {
                let row = (warp % 4) * 16 + g + 8 * r;
                #[unroll]
                for n in 0..16usize {
                    let address = q_tile + ((n / 8) * BOX_BYTES + swizzled_chunk(row, n % 8) * 16 + 4 * t) as u32;
                    store_shared_u32(address, packed[n]);
                }
            } else {
                #[unroll]
                for n in 0..16usize {
                    out[pair * comptime!(D_V / 2) + n * 4 + t] = packed[n];
                }
            }
            if t == 0 {
                lse[pair] = select(
                    sum == 0.0f32,
                    f32::reinterpret(0x7f80_0000u32),
                    rows.m[r] * core::f32::consts::LN_2 + f32::ln(sum),
                );
            }
        }
    }
    if whole_group {
        fence_shared_to_async();
        // The warpgroup's four warps wrote their rows (named barrier 1 + w of 128 units).
        #[unroll]
        for w in 0..comptime!(pipeline.groups) {
            if warpgroup == w {
                named_barrier_sync(comptime!(1 + w as u32), 128u32);
            }
        }
        if UNIT_POS.is_multiple_of(128) {
            let row = (q_start + group_first) as i32;
            tma_store_3d(out_map, q_tile, 0i32, head as i32, row);
            tma_store_3d(out_map, q_tile + BOX_BYTES as u32, 64i32, head as i32, row);
            tma_store_commit();
            tma_store_wait_read();
        }
    }
}

/// Launches with `pipeline`'s warpgroups (64 queries each) per cube.
pub fn launch(device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle], pipeline: Pipeline) {
    pipeline.check();
    let (t_q, t_k, h, seqs) = (
        problem.dim("t_q"),
        problem.dim("t_k"),
        problem.dim("h"),
        problem.dim("n_cu") - 1,
    );
    // At most one partial tile per sequence beyond the full ones.
    let tiles = t_q.div_ceil(BLOCK * pipeline.groups) + seqs;
    if pipeline.persistent {
        let sms = device.features().multiprocessors.unwrap_or(1) as usize;
        // The work counter (tickets handed out after each cube's first item), zero for each launch.
        let work = device.client.create_from_slice(&[0u8; 4]);
        persistent::mha_prefill_persistent_kernel::launch(
            &device.client,
            grid((tiles * h).min(sms)),
            CubeDim::new_1d(pipeline.units()),
            pipeline.keys / 2,
            pipeline.keys / 4,
            bf16_head_rows_map(&inputs[1], t_k, h, D_QK),
            bf16_head_rows_map(&inputs[2], t_k, h, D_V),
            bf16_head_rows_map(&inputs[0], t_q, h, D_QK),
            buffer(&inputs[3], seqs + 1),
            buffer(&inputs[4], seqs + 1),
            buffer(&outputs[0], t_q * h * D_V / 2),
            bf16_head_rows_map(&outputs[0], t_q, h, D_V),
            buffer(&outputs[1], t_q * h),
            buffer(&work, 1),
            h,
            seqs,
            tiles,
            problem.param("sm_scale") as f32,
            pipeline,
        );
        return;
    }
    mha_prefill_wgmma_kernel::launch(
        &device.client,
        grid(tiles * h),
        CubeDim::new_1d(pipeline.units()),
        pipeline.keys / 2,
        pipeline.keys / 4,
        buffer(&inputs[0], t_q * h * D_QK / 2),
        bf16_head_rows_map(&inputs[1], t_k, h, D_QK),
        bf16_head_rows_map(&inputs[2], t_k, h, D_V),
        bf16_head_rows_map(&inputs[0], t_q, h, D_QK),
        buffer(&inputs[3], seqs + 1),
        buffer(&inputs[4], seqs + 1),
        buffer(&outputs[0], t_q * h * D_V / 2),
        bf16_head_rows_map(&outputs[0], t_q, h, D_V),
        buffer(&outputs[1], t_q * h),
        h,
        seqs,
        tiles,
        problem.param("sm_scale") as f32,
        pipeline,
    );
}

pub fn define(target: IrTarget, pipeline: Pipeline) -> KernelDefinition {
    pipeline.check();
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = slice_arg;
    if pipeline.persistent {
        return persistent::mha_prefill_persistent_kernel::MhaPrefillPersistentKernel::new(
            ir_settings(CubeDim::new_1d(pipeline.units())),
            props,
            target_props,
            (),
            (),
            (),
            a(),
            a(),
            a(),
            (),
            a(),
            a(),
            (),
            (),
            (),
            (),
            pipeline.keys / 2,
            pipeline.keys / 4,
            pipeline,
        )
        .define();
    }
    mha_prefill_wgmma_kernel::MhaPrefillWgmmaKernel::new(
        ir_settings(CubeDim::new_1d(pipeline.units())),
        props,
        target_props,
        a(),
        (),
        (),
        (),
        a(),
        a(),
        a(),
        (),
        a(),
        (),
        (),
        (),
        (),
        pipeline.keys / 2,
        pipeline.keys / 4,
        pipeline,
    )
    .define()
}
