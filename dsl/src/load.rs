//! Loads: vectorized word loads and index-gathered rows.
use cubecl::prelude::*;

/// Word `lane` of a vectorized load (`N` words = N·4 bytes in one instruction).
#[cube]
pub fn vector_word<N: Size>(vector: Vector<u32, N>, #[comptime] lane: usize) -> u32 {
    vector.extract(lane)
}

/// The word offset of row `indices[slot]` in a row-major buffer of `row_words` words per row: the
/// index gather sparse attention does over top-k positions. Negative indices (−1 = "no position",
/// as DeepSeek's top-k pads) return `None`-like `u32::MAX` for the caller to skip.
#[cube]
pub fn gathered_row_offset(indices: &[i32], slot: usize, row_words: usize) -> usize {
    let row = indices[slot];
    select(row < 0, usize::MAX, row as usize * row_words)
}
