//! Loads: vectorized word loads and index-gathered rows.
use cubecl::prelude::*;

/// Word `lane` of a vectorized load (`N` words = N·4 bytes in one instruction).
#[cube]
pub fn vector_word<N: Size>(vector: Vector<u32, N>, #[comptime] lane: usize) -> u32 {
    vector.extract(lane)
}

/// Whether slot `slot` of a gather list names a row: DeepSeek's top-k pads with −1 ("no position").
#[cube]
pub fn gathered_row_valid(indices: &[i32], slot: usize) -> bool {
    indices[slot] >= 0
}

/// The offset of row `indices[slot]` in a row-major buffer of `row_len` elements (words, vectors) per
/// row: the index gather sparse attention does over top-k positions. A −1 slot maps to row 0; callers
/// skip it with [`gathered_row_valid`].
#[cube]
pub fn gathered_row_offset(indices: &[i32], slot: usize, row_len: usize) -> usize {
    let row = indices[slot];
    select(row < 0, 0, row) as usize * row_len
}
