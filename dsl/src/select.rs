//! Selection building blocks: an order-preserving integer key for f32 (radix select works on it) and a
//! cube-wide exclusive prefix sum (stream compaction of the selected positions, in order).
use cubecl::prelude::*;

/// A u32 whose unsigned order is the IEEE total order of `value`'s bits (−0 < +0; no NaN expected):
/// negative values flip all bits, positive ones flip the sign bit.
#[cube]
pub fn ordered_key(value: f32) -> u32 {
    let bits = u32::reinterpret(value);
    select((bits >> 31) == 1, !bits, bits | 0x8000_0000)
}

/// Exclusive prefix sum over the cube's units (in UNIT_POS order) and the cube total.
#[derive(CubeType, Clone, Copy)]
pub struct Scan {
    pub prefix: u32,
    pub total: u32,
}

/// Hillis–Steele scan in shared memory: log₂(cube_size) steps, each a read, a barrier and a write.
/// Every unit of the cube must reach it; `cube_size` is a power of two equal to CUBE_DIM.
#[cube]
pub fn cube_exclusive_scan(value: u32, #[comptime] cube_size: u32) -> Scan {
    let mut sums = Shared::<[u32]>::new_slice(cube_size as usize);
    let unit = UNIT_POS as usize;
    sums[unit] = value;
    sync_cube();
    let mut offset = 1usize;
    while offset < CUBE_DIM as usize {
        let mut addend = 0u32;
        if unit >= offset {
            addend = sums[unit - offset];
        }
        sync_cube();
        sums[unit] += addend;
        sync_cube();
        offset *= 2;
    }
    let inclusive = sums[unit];
    let total = sums[CUBE_DIM as usize - 1];
    sync_cube();
    Scan {
        prefix: inclusive - value,
        total,
    }
}
