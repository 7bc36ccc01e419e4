//! Warp specialization on Hopper (inline PTX): warps of one cube that take different roles (a producer
//! gathering tiles, consumer warpgroups multiplying) synchronize with each other on named barriers.
//! (Handing registers between roles, `setmaxnreg`, is not here: ptxas ignores it unless the launch bounds
//! name a minimum of cubes per multiprocessor, which CubeCL 0.11 does not emit.)
//!
//! Named barriers: ids 1..16 (0 is the cube barrier), each completing once `units` units (a multiple of
//! 32) have arrived; `bar.arrive` signals without waiting, `bar.sync` arrives and waits. Two warpgroups use
//! one as a one-way signal when one arrives and the other syncs, `units` = 256.
use cubecl::prelude::*;

/// Arrives at named barrier `id` and waits until `units` units have arrived.
#[cube]
pub fn named_barrier_sync(#[comptime] id: u32, #[comptime] units: u32) {
    gpu_asm!("bar.sync {id}, {n};", id = const id, n = const units);
}

/// Arrives at named barrier `id` (expecting `units` in all) without waiting.
#[cube]
pub fn named_barrier_arrive(#[comptime] id: u32, #[comptime] units: u32) {
    gpu_asm!("bar.arrive {id}, {n};", id = const id, n = const units);
}
