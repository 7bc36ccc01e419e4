//! Hopper warpgroup MMA (PTX `wgmma.mma_async`, sm_90a only): one warpgroup (4 warps, 128 units, all
//! convergent) multiplies a 64-row A tile by an N-row B tile straight from shared memory, described by
//! 64-bit matrix descriptors. CubeCL has no wrapper, so this is inline PTX (CUDA C++ path only).
//!
//! Tiles are K-major with the 128-byte swizzle: rows of 128 bytes (128 e4m3 or 64 bf16), 16-byte chunk
//! `c` of row `r` stored at chunk `c ^ (r % 8)` ([`swizzled_chunk`]), 8-row atoms 1024 bytes apart; a
//! tile starts on a 1024-byte boundary. Each k step of a multiply starts 32 bytes further along the rows.
//!
//! Result layout (m64nN, f32): warp w of the warpgroup holds rows 16w.., lane = 4g + t, element
//! 4i + {0, 1} = row 16w + g, columns 8i + 2t + {0, 1}; 4i + {2, 3} = row 16w + g + 8, same columns —
//! per warp, the m16n8 accumulator layout of [`crate::warp_mma`].
use cubecl::prelude::*;
use cubecl_cpp::cuda::ptx::generic_to_shared;

/// Bytes per 8-row swizzle atom (8 rows of 128 bytes: the stride between atoms, and tiles' alignment).
pub const ATOM_BYTES: u32 = 1024;

/// Descriptor bits besides the start address: stride between 8-row atoms (1024 >> 4 at bit 32), 128-byte
/// swizzle (1 at bit 62). The leading-dimension offset is unused for swizzled K-major tiles.
const SW128_K_MAJOR: u64 = (64u64 << 32) | (1u64 << 62);

/// Shared-window byte address of a shared slice's first element (what descriptors and `.shared` take).
#[cube]
pub fn shared_address<T: CubePrimitive>(slice: &[T]) -> u32 {
    generic_to_shared::<T>(slice.as_ptr())
}

/// Where tiles start in a shared slice of 16-byte chunks allocated one atom (64 chunks) longer than needed:
/// the chunks to skip to the first 1024-byte boundary, and that boundary's shared address (whatever the
/// allocation's own alignment).
#[cube]
pub fn first_atom<T: CubePrimitive>(smem: &[T]) -> (usize, u32) {
    let raw = shared_address(smem);
    let skip = ((ATOM_BYTES - raw % ATOM_BYTES) % ATOM_BYTES) as usize / 16;
    (skip, raw + (skip * 16) as u32)
}

/// Index, in 16-byte chunks from the tile start, of chunk `chunk` (0..8) of row `row` of a swizzled tile.
#[cube]
pub fn swizzled_chunk(row: usize, chunk: usize) -> usize {
    row * 8 + (chunk ^ (row % 8))
}

/// Descriptor of a K-major, 128-byte-swizzled tile at shared address `address` (1024-byte aligned).
#[cube]
pub fn sw128_descriptor(address: u32) -> u64 {
    u64::cast_from((address & 0x3FFFF) >> 4) | SW128_K_MAJOR
}

/// The operand type of a warpgroup multiply; either way one k step covers 32 bytes of each row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operands {
    /// FP8 e4m3, k32 per step.
    E4m3,
    /// bf16, k16 per step (both operands K-major).
    Bf16,
}

impl Operands {
    fn instruction(self, n: usize) -> String {
        match self {
            Operands::E4m3 => format!("wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3"),
            Operands::Bf16 => format!("wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16"),
        }
    }

    /// The immediate operands after scale-d: A and B not negated (and, for bf16, not transposed).
    fn immediates(self) -> &'static str {
        match self {
            Operands::E4m3 => "1, 1",
            Operands::Bf16 => "1, 1, 0, 0",
        }
    }
}

/// The PTX of the multiplies after the first: descriptors advanced by 32 bytes (2 in the encoded
/// address) each, and past every fourth step (one 128-byte row used up) to the next column block of the
/// tiles, `a_block` / `b_block` bytes on from the last one; accumulating into operand 0 (the result).
fn following_steps(operands: Operands, n: usize, steps: usize, a_block: usize, b_block: usize) -> String {
    let (instruction, immediates) = (operands.instruction(n), operands.immediates());
    let advance = |block: usize, step: usize| if step.is_multiple_of(4) { (block - 96) >> 4 } else { 2 };
    let mut text = String::new();
    for step in 1..steps {
        let (a, b) = (advance(a_block, step), advance(b_block, step));
        text.push_str(&format!("add.s64 wg_da, wg_da, {a};\nadd.s64 wg_db, wg_db, {b};\n"));
        text.push_str(&format!("{instruction} $0, wg_da, wg_db, wg_p1, {immediates};\n"));
    }
    text
}

/// D = Σ over `steps` k steps (32 bytes of K each) of A·Bᵀ, from zero, in f32: A 64 rows at descriptor
/// `a`, B `n` rows at descriptor `b` (both K-major, swizzled; K past 128 bytes continues in column blocks
/// `a_block_bytes` / `b_block_bytes` apart). `NC` must be `n / 2` (the f32 values each unit holds). With `wait`
/// the warpgroup waits for the products, so the result is ready on return; without, the result is in
/// flight until [`wgmma_wait`] (as [`wgmma_bf16_register_a_fresh`]'s).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn wgmma_fresh<NC: Size>(
    a: u64,
    b: u64,
    #[comptime] operands: Operands,
    #[comptime] n: usize,
    #[comptime] steps: usize,
    #[comptime] a_block_bytes: usize,
    #[comptime] b_block_bytes: usize,
    #[comptime] wait: bool,
) -> Vector<f32, NC> {
    let instruction = comptime!(operands.instruction(n));
    let immediates = comptime!(operands.immediates());
    let rest = comptime!(following_steps(operands, n, steps, a_block_bytes, b_block_bytes));
    let wait = comptime!(if wait { "wgmma.wait_group.sync.aligned 0;\n" } else { "" });
    let d: Vector<f32, NC>;
    gpu_asm!(
        "{{\n.reg .b64 wg_da, wg_db;\n.reg .pred wg_p0, wg_p1;\nmov.b64 wg_da, {a};\nmov.b64 wg_db, {b};",
        "setp.ne.b64 wg_p0, wg_da, wg_da;\nsetp.eq.b64 wg_p1, wg_da, wg_da;\nwgmma.fence.sync.aligned;",
        "{instruction} {d}, wg_da, wg_db, wg_p0, {immediates};",
        "{rest}wgmma.commit_group.sync.aligned;\n{wait}}}",
        d = out(_) d,
        a = in(_) a,
        b = in(_) b,
    );
    d
}

/// `c` + Σ over `steps` k steps of A·Bᵀ (as [`wgmma_fresh`], accumulating onto `c`; K past 128 bytes in
/// column blocks `a_block_bytes` / `b_block_bytes` apart, unused when `steps` ≤ 4). Waits for the products.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn wgmma_accumulate<NC: Size>(
    c: Vector<f32, NC>,
    a: u64,
    b: u64,
    #[comptime] operands: Operands,
    #[comptime] n: usize,
    #[comptime] steps: usize,
    #[comptime] a_block_bytes: usize,
    #[comptime] b_block_bytes: usize,
) -> Vector<f32, NC> {
    let rest = comptime!(following_steps(operands, n, steps, a_block_bytes, b_block_bytes));
    accumulate_shared::<NC>(
        c,
        a,
        b,
        operands.instruction(n),
        operands.immediates().to_string(),
        rest,
        true,
    )
}

/// The asm of the accumulating products with both operands in shared memory, in place on `c`:
/// `instruction` (an m64n`n` wgmma) with `immediates` as the first k step and the PTX `rest` (the
/// following steps, descriptors advanced), waited for when `wait`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate_shared<NC: Size>(
    c: Vector<f32, NC>,
    a: u64,
    b: u64,
    #[comptime] instruction: String,
    #[comptime] immediates: String,
    #[comptime] rest: String,
    #[comptime] wait: bool,
) -> Vector<f32, NC> {
    let wait = comptime!(if wait { "wgmma.wait_group.sync.aligned 0;\n" } else { "" });
    // A mutable vector reaches inline PTX as its address; an arithmetic result is a value (× 1 folds away).
    // `c` is tied: the result starts as `c`, in the same registers (the products accumulate in place).
    let c = c * Vector::<f32, NC>::new(1.0f32);
    let d: Vector<f32, NC>;
    gpu_asm!(
        "{{\n// accumulator {c}\n.reg .b64 wg_da, wg_db;\n.reg .pred wg_p1;\nmov.b64 wg_da, {a};",
        "mov.b64 wg_db, {b};\nsetp.eq.b64 wg_p1, wg_da, wg_da;\nwgmma.fence.sync.aligned;",
        "{instruction} {d}, wg_da, wg_db, wg_p1, {immediates};",
        "{rest}wgmma.commit_group.sync.aligned;\n{wait}}}",
        d = out(_) d,
        c = in(tied) c,
        a = in(_) a,
        b = in(_) b,
    );
    d
}

/// Descriptor of a bf16 B operand stored MN-major (e.g. V as [key][dim], read with trans-b = 1): rows of
/// 128 bytes = 64 N values of one k, 128-byte swizzled, 8-row atoms 1024 bytes apart along K, and further
/// 64-wide N blocks `n_block_bytes` apart.
#[cube]
pub fn sw128_mn_major_descriptor(address: u32, #[comptime] n_block_bytes: u32) -> u64 {
    let lbo = comptime!((n_block_bytes as u64 >> 4) << 16);
    u64::cast_from((address & 0x3FFFF) >> 4) | lbo | SW128_K_MAJOR
}

/// The PTX of a register-A product: `steps` k16 multiplies, step j reading A registers
/// %first_a + 4j .. + 3 and the B descriptor advanced by `advance(j)` (in 16-byte units) before it; the
/// first step discards the accumulator when `fresh` (predicate wg_p0 false), B transposed when `trans_b`.
fn register_a_steps(
    n: usize,
    steps: usize,
    first_a: usize,
    fresh: bool,
    trans_b: bool,
    advance: impl Fn(usize) -> usize,
) -> String {
    let mut text = String::new();
    for j in 0..steps {
        if j > 0 {
            text.push_str(&format!("add.s64 wg_db, wg_db, {};\n", advance(j)));
        }
        let a: Vec<String> = (0..4).map(|r| format!("%{}", first_a + 4 * j + r)).collect();
        let p = if fresh && j == 0 { "wg_p0" } else { "wg_p1" };
        text.push_str(&format!(
            "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 $0, {{{}}}, wg_db, {p}, 1, 1, {};\n",
            a.join(", "),
            u8::from(trans_b)
        ));
    }
    text
}

/// `c` + P·B with P from registers: `a` holds 4 bf16-pair registers per k16 step (per warp, the m16n8k16
/// A layout — what [`crate::warp_mma::accumulators_as_a`]'s pairs are), B `n` wide and 16·`steps` deep,
/// stored MN-major at descriptor `b` ([`sw128_mn_major_descriptor`]) and `b_step_bytes` further per step
/// (16 rows: 2048 bytes). Flash attention's O += P·V.
///
/// With `wait` false the products are only issued, in place on `c`'s registers (the result is tied to
/// `c`): the result is in flight until [`wgmma_wait_pending`] covers its group, nothing may read it
/// before, and `a` must not change until then.
#[cube]
pub fn wgmma_bf16_register_a_accumulate<NC: Size, NA: Size>(
    c: Vector<f32, NC>,
    a: Vector<u32, NA>,
    b: u64,
    #[comptime] n: usize,
    #[comptime] steps: usize,
    #[comptime] b_step_bytes: usize,
    #[comptime] wait: bool,
) -> Vector<f32, NC> {
    let wait = comptime!(if wait { "wgmma.wait_group.sync.aligned 0;\n" } else { "" });
    // The result and `c` share registers (tied), so the first product's A operand is %n/2 onwards.
    let products = comptime!(register_a_steps(n, steps, n / 2, false, true, |_| b_step_bytes >> 4));
    let c = c * Vector::<f32, NC>::new(1.0f32);
    let a = a * Vector::<u32, NA>::new(1u32);
    let d: Vector<f32, NC>;
    gpu_asm!(
        "{{\n// {d} {c} {a}\n.reg .b64 wg_db;\n.reg .pred wg_p1;\nmov.b64 wg_db, {b};",
        "setp.eq.b64 wg_p1, wg_db, wg_db;\nwgmma.fence.sync.aligned;",
        "{products}wgmma.commit_group.sync.aligned;\n{wait}}}",
        d = out(_) d,
        c = in(tied) c,
        a = in(_) a,
        b = in(_) b,
    );
    d
}

/// `c` + A·B with both operands in shared memory, bf16: A 64 rows K-major and swizzled at descriptor `a`
/// (one 128-byte row of K: at most 4 k16 steps, 32 bytes apart), B `n` wide stored MN-major at descriptor
/// `b` ([`sw128_mn_major_descriptor`], read with trans-b) and `b_step_bytes` further per step. Flash
/// attention's O += P·V when P is shared between warpgroups. With `wait` false the products are only issued
/// (as [`wgmma_bf16_register_a_fresh`]): nothing may read the result before [`wgmma_wait`].
#[cube]
pub fn wgmma_bf16_shared_accumulate_trans_b<NC: Size>(
    c: Vector<f32, NC>,
    a: u64,
    b: u64,
    #[comptime] n: usize,
    #[comptime] steps: usize,
    #[comptime] b_step_bytes: usize,
    #[comptime] wait: bool,
) -> Vector<f32, NC> {
    let rest = comptime!(trans_b_following_steps(n, steps, b_step_bytes));
    accumulate_shared::<NC>(c, a, b, Operands::Bf16.instruction(n), TRANS_B.to_string(), rest, wait)
}

/// A bf16 product's immediates with B transposed (MN-major) and A not.
const TRANS_B: &str = "1, 1, 0, 1";

/// The PTX of [`wgmma_bf16_shared_accumulate_trans_b`]'s multiplies after the first: A advanced 32 bytes
/// and B `b_step_bytes` per step.
fn trans_b_following_steps(n: usize, steps: usize, b_step_bytes: usize) -> String {
    assert!(steps <= 4, "A must stay within one 128-byte row");
    let instruction = Operands::Bf16.instruction(n);
    let mut text = String::new();
    for _ in 1..steps {
        text.push_str(&format!(
            "add.s64 wg_da, wg_da, 2;\nadd.s64 wg_db, wg_db, {};\n",
            b_step_bytes >> 4
        ));
        text.push_str(&format!("{instruction} $0, wg_da, wg_db, wg_p1, {TRANS_B};\n"));
    }
    text
}

/// Stores the 32-bit `value` at shared-window byte address `address` (e.g. into a swizzled tile whose
/// words no slice type indexes).
#[cube]
#[allow(clippy::identity_op)] // the × 1 turns a local into a value for the asm
pub fn store_shared_u32(address: u32, value: u32) {
    // As a value, not an address (see wgmma_accumulate): a function's result reaches here as a local.
    let value = value * 1u32;
    gpu_asm!("st.shared.b32 [{a}], {v};", a = in(_) address, v = in(_) value);
}

/// Σ over `steps` k16 steps of A·Bᵀ from zero, A from registers (4 bf16-pair registers per step, as
/// [`wgmma_bf16_register_a_accumulate`]'s `a`) and B `n` rows K-major and swizzled at descriptor `b` (K past
/// 128 bytes in column blocks `b_block_bytes` apart): S = Q·Kᵀ with Q held in registers, so only K is read
/// from shared memory. `a` may hold more registers than the 4·`steps` used.
///
/// With `wait` false the products are only issued: the result is in flight and must go through
/// [`wgmma_wait`] before anything reads it, and `a` must not change until then — the warpgroup works on
/// meanwhile (flash attention: the next block's S runs on the tensor cores during this block's softmax).
#[cube]
pub fn wgmma_bf16_register_a_fresh<NC: Size, NA: Size>(
    a: Vector<u32, NA>,
    b: u64,
    #[comptime] n: usize,
    #[comptime] steps: usize,
    #[comptime] b_block_bytes: usize,
    #[comptime] wait: bool,
) -> Vector<f32, NC> {
    let products = comptime!(register_a_steps(n, steps, n / 2, true, false, |j| {
        if j.is_multiple_of(4) {
            (b_block_bytes - 96) >> 4
        } else {
            2
        }
    }));
    let wait = comptime!(if wait { "wgmma.wait_group.sync.aligned 0;\n" } else { "" });
    let a = a * Vector::<u32, NA>::new(1u32);
    let d: Vector<f32, NC>;
    gpu_asm!(
        "{{\n// {d} {a}\n.reg .b64 wg_db;\n.reg .pred wg_p0, wg_p1;\nmov.b64 wg_db, {b};",
        "setp.ne.b64 wg_p0, wg_db, wg_db;\nsetp.eq.b64 wg_p1, wg_db, wg_db;\nwgmma.fence.sync.aligned;",
        "{products}wgmma.commit_group.sync.aligned;\n{wait}}}",
        d = out(_) d,
        a = in(_) a,
        b = in(_) b,
    );
    d
}

/// Waits for every product this warpgroup has in flight and returns `d` (the result of one issued without
/// waiting) as read after the wait. Nothing may read `d` before this (no copy, no arithmetic): its
/// registers are still being written by the tensor cores.
#[cube]
pub fn wgmma_wait<NC: Size>(d: Vector<f32, NC>) -> Vector<f32, NC> {
    wgmma_wait_pending::<NC>(d, 0u32)
}

/// Waits until at most the `pending` most recently committed groups of this warpgroup's products are in
/// flight and returns `d` (the result of a group older than those) as read after the wait — e.g. with
/// `pending` 1, an O += P·V issued before the latest S settles while that S runs on.
#[cube]
pub fn wgmma_wait_pending<NC: Size>(d: Vector<f32, NC>, #[comptime] pending: u32) -> Vector<f32, NC> {
    // As a value, not an address (see wgmma_accumulate); the compiler folds the × 1, so nothing reads d.
    // Tied: the result is `d`'s registers as they stand after the wait (no copy).
    let d = d * Vector::<f32, NC>::new(1.0f32);
    let result: Vector<f32, NC>;
    gpu_asm!(
        "{{\n// {result} {d}\nwgmma.wait_group.sync.aligned {n};\n}}",
        result = out(_) result,
        d = in(tied) d,
        n = const pending,
    );
    result
}

/// Starts copying (cp.async) 16-byte chunks `first_chunk..first_chunk + 8` of `rows` rows (from `row0` of a
/// [rows_total, row_chunks] source) into the swizzled tile at chunk `tile0`; rows past `rows_total` and
/// chunks past `row_chunks` are zero-filled. All units of the cube share the work.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn copy_rows_swizzled(
    source: &[Vector<u32, Const<4>>],
    smem: &mut [Vector<u32, Const<4>>],
    tile0: usize,
    row0: usize,
    rows_total: usize,
    row_chunks: usize,
    first_chunk: usize,
    #[comptime] rows: usize,
) {
    let mut i = UNIT_POS as usize;
    while i < rows * 8 {
        let (r, c) = (i / 8, i % 8);
        let valid = row0 + r < rows_total && first_chunk + c < row_chunks;
        let start = select(valid, (row0 + r) * row_chunks + first_chunk + c, 0usize);
        let len = select(valid, 1usize, 0usize);
        let dst = tile0 + swizzled_chunk(r, c);
        crate::warp_mma::copy_chunk_async(&source[start..start + len], &mut smem[dst..dst + 1]);
        i += CUBE_DIM as usize;
    }
}

/// Waits until at most `pending` groups of this unit's asynchronous copies are still in flight
/// (`cp.async.wait_group`): the pipelined form of [`crate::warp_mma::wait_async_copies`].
#[cube]
pub fn wait_async_copies_pending(#[comptime] pending: u32) {
    gpu_asm!("cp.async.wait_group {n};", n = const pending);
}

/// Makes this unit's ordinary shared-memory writes (stores, `cp.async`) visible to the async proxy that
/// wgmma reads through; a cube barrier after it covers every unit's.
#[cube]
pub fn fence_shared_for_wgmma() {
    sync_async_proxy_shared();
}

/// The start of a pipeline stage: waits until at most `pending` of this unit's copy groups are in flight,
/// fences its shared-memory writes for wgmma, then the cube barrier — after it every unit's copies up to
/// there are visible to the multiplies, and every unit is done with the multiplies before it.
#[cube]
pub fn await_stage(#[comptime] pending: u32) {
    wait_async_copies_pending(pending);
    fence_shared_for_wgmma();
    sync_cube();
}

#[cfg(test)]
mod tests {
    use super::{Operands, following_steps, trans_b_following_steps};

    #[test]
    fn trans_b_steps_walk_a_along_its_row_and_b_down_its_keys() {
        // The three products after the first (which the asm template holds).
        let text = trans_b_following_steps(256, 4, 2048);
        assert_eq!(
            text.matches("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16")
                .count(),
            3
        );
        // A: 32 bytes (2 in descriptor units) per k16 step; B: 16 rows of 128 bytes (2048 >> 4).
        assert_eq!(text.matches("add.s64 wg_da, wg_da, 2;").count(), 3);
        assert_eq!(text.matches("add.s64 wg_db, wg_db, 128;").count(), 3);
        // Accumulating, with B transposed (MN-major) and A not.
        assert!(
            text.lines()
                .filter(|l| l.starts_with("wgmma"))
                .all(|l| l.ends_with("wg_p1, 1, 1, 0, 1;"))
        );
    }

    #[test]
    fn following_steps_jump_to_the_next_column_block_after_four_steps() {
        // 36 steps over 9 column blocks of 8 KiB: after every fourth step the descriptors move on by the
        // block, less the 96 bytes already walked ((8192 - 96) >> 4 = 506).
        let text = following_steps(Operands::Bf16, 32, 36, 8192, 8192);
        assert_eq!(text.matches("wgmma.mma_async").count(), 35);
        assert_eq!(text.matches("add.s64 wg_da, wg_da, 506;").count(), 8);
        assert_eq!(text.matches("add.s64 wg_da, wg_da, 2;").count(), 27);
    }
}
