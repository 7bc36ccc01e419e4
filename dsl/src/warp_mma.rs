//! Warp-level tensor-core multiplies with register fragments in a known layout: PTX `mma.sync` m16n8k16,
//! bf16 or f16 operands, f32 accumulators (CUDA only; CubeCL's manual MMA). Unlike [`crate::mma`]'s opaque
//! tiles, each lane knows which rows and columns it holds, so an attention kernel can rescale
//! accumulator rows by an online-softmax factor in registers and feed the probabilities of one multiply
//! straight into the next (FlashAttention-2's register reuse).
//!
//! Layout (lane = 4·g + t): an accumulator tile (16 × 8) is two pairs, `[0]` = row g, columns 2t, 2t+1
//! and `[1]` = row g + 8, the same columns. An A tile (16 × 16) is four bf16 pairs: (row g, k 2t..),
//! (row g + 8, k 2t..), (row g, k 2t + 8..), (row g + 8, k 2t + 8..). A B tile (16 × 8) is two pairs:
//! (k 2t.., column g), (k 2t + 8.., column g). Shared-memory operands are rows of 16-byte chunks
//! ([`Chunk`]: 8 bf16) loaded with `ldmatrix`.
use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::frontend::barrier::copy_async_checked;
use cubecl::prelude::*;
use half::bf16;

/// Eight bf16 values: one 16-byte shared-memory chunk, the unit `ldmatrix` addresses.
pub type Chunk = Vector<bf16, Const<8>>;
/// Two bf16 values in one 32-bit register (fragments are `Vector<E, Const<2>>` for operand type E).
pub type Pair = Vector<bf16, Const<2>>;
/// Two f32 accumulator values of one row.
pub type AccPair = Vector<f32, Const<2>>;

/// The m16n8k16 multiply of `E` (bf16 or f16) operands into f32.
#[cube]
pub fn mma_m16n8k16<E: Scalar>() -> MmaDefinition<E, E, f32> {
    MmaDefinition::<E, E, f32>::new(16usize, 8usize, 16usize)
}

/// Four 8×8 matrices of bf16 from shared memory (`ldmatrix.x4`, `.trans` with `transpose`) held as 16-byte
/// chunks of four words: lane l names the chunk holding row l % 8 of matrix l / 8; register i of every
/// lane comes from matrix i.
#[cube]
pub fn load_x4<E: Scalar, N: Size>(
    chunks: &[Vector<u32, N>],
    chunk: usize,
    #[comptime] transpose: bool,
) -> Array<Vector<E, Const<2>>> {
    let def = mma_m16n8k16::<E>();
    let words =
        def.load_matrix::<Vector<u32, N>, Const<1>>(&chunks[chunk..chunk + 1], MatrixIdent::A, 4usize, transpose);
    let mut regs = Array::<Vector<E, Const<2>>>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        regs[i] = Vector::<E, Const<2>>::reinterpret(words[i]);
    }
    regs
}

/// Four fragment registers as one 16-byte chunk (to pass a fragment to another plane through shared
/// memory), and back.
#[cube]
pub fn fragment_to_chunk<N: Size>(regs: &Array<Pair>) -> Vector<u32, N> {
    let mut chunk = Vector::<u32, N>::new(0u32);
    #[unroll]
    for i in 0..4usize {
        chunk.insert(i, u32::reinterpret(regs[i]));
    }
    chunk
}

#[cube]
pub fn chunk_to_fragment<N: Size>(chunk: Vector<u32, N>) -> Array<Pair> {
    let mut regs = Array::<Pair>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        regs[i] = Pair::reinterpret(chunk.extract(i));
    }
    regs
}

/// Starts an asynchronous 16-byte copy of `source[0]` (a chunk of four words) into `destination[0]`;
/// an empty `source` zero-fills the chunk. Completes at [`wait_async_copies`].
#[cube]
pub fn copy_chunk_async<N: Size>(source: &[Vector<u32, N>], destination: &mut [Vector<u32, N>]) {
    copy_async_checked(source, destination, 4u32);
}

/// Closes the group of asynchronous copies started since the last call (`cp.async.commit_group`).
#[cube]
pub fn commit_async_copies() {
    gpu_asm!("cp.async.commit_group;");
}

/// Waits for this unit's committed asynchronous copies (`cp.async.wait_group 0`); a cube barrier after it
/// makes every unit's copies visible.
#[cube]
pub fn wait_async_copies() {
    gpu_asm!("cp.async.wait_group 0;");
}

/// The B tile in registers `first`, `first + 1` of `regs` (an `ldmatrix.x4` result holds two: 0, 1 and
/// 2, 3).
#[cube]
pub fn b_tile<E: Scalar>(regs: &Array<Vector<E, Const<2>>>, #[comptime] first: usize) -> Array<Vector<E, Const<2>>> {
    let mut b = Array::<Vector<E, Const<2>>>::new(2usize);
    b[0] = regs[first];
    b[1] = regs[first + 1];
    b
}

/// Copies `len` fragment registers from `source` to `destination` (`Array` assignment would alias).
#[cube]
pub fn copy_regs<E: Scalar>(
    source: &Array<Vector<E, Const<2>>>,
    destination: &mut Array<Vector<E, Const<2>>>,
    #[comptime] len: usize,
) {
    #[unroll]
    for i in 0..len {
        destination[i] = source[i];
    }
}

/// acc[tile] += a · b, where `acc` holds accumulator tiles as consecutive pairs.
#[cube]
pub fn mma_into<E: Scalar>(
    acc: &mut Array<AccPair>,
    #[comptime] tile: usize,
    a: &Array<Vector<E, Const<2>>>,
    b: &Array<Vector<E, Const<2>>>,
) {
    let def = mma_m16n8k16::<E>();
    let mut c = Array::<AccPair>::new(2usize);
    c[0] = acc[2 * tile];
    c[1] = acc[2 * tile + 1];
    def.execute_inplace(a, b, &mut c);
    acc[2 * tile] = c[0];
    acc[2 * tile + 1] = c[1];
}

/// The A operand (16 rows × 16 k) made of two accumulator tiles side by side (k 0..8 from `left`, 8..16
/// from `right`), rounded to bf16: how P = softmax(S) feeds P·V without leaving registers.
#[cube]
pub fn accumulators_as_a(acc: &Array<AccPair>, #[comptime] left: usize) -> Array<Pair> {
    let mut a = Array::<Pair>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        let pair = acc[2 * left + i];
        let mut p = Pair::empty();
        p.insert(0usize, bf16::cast_from(pair.extract(0usize)));
        p.insert(1usize, bf16::cast_from(pair.extract(1usize)));
        a[i] = p;
    }
    a
}

/// Maximum over the four lanes of a quad (the lanes sharing an accumulator row).
#[cube]
pub fn quad_max(x: f32) -> f32 {
    let y = f32::max(x, plane_shuffle_xor(x, 1u32));
    f32::max(y, plane_shuffle_xor(y, 2u32))
}

/// Sum over the four lanes of a quad.
#[cube]
pub fn quad_sum(x: f32) -> f32 {
    let y = x + plane_shuffle_xor(x, 1u32);
    y + plane_shuffle_xor(y, 2u32)
}

/// 2^x with the hardware approximation (`ex2.approx.ftz`, relative error ~2⁻²²): the softmax exponent.
#[cube]
pub fn fast_exp2(x: f32) -> f32 {
    let y: f32;
    gpu_asm!("ex2.approx.ftz.f32 {y}, {x};", x = in(_) x, y = out(_) y, options(pure, nomem));
    y
}
