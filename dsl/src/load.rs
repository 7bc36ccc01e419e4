//! Loads beyond a plain index: index-gathered rows.
//!
//! Vectorized loads are the slice type itself: a kernel takes `&[Vector<u32, N>]` (N words, up to 16 bytes,
//! per load instruction; the host picks N from the row length) and decodes each word with
//! [`crate::format::unpack`].
use cubecl::prelude::*;

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
