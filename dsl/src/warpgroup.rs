//! Warp specialization on Hopper (inline PTX): warps of one cube that take different roles (a producer
//! gathering tiles, consumer warpgroups multiplying) synchronize with each other on named barriers.
//! Roles hand registers to each other with `setmaxnreg` ([`set_max_registers_decrease`] /
//! [`set_max_registers_increase`]); ptxas honours it only under launch bounds with a minimum of cubes per
//! multiprocessor, which nsa's patched CubeCL writes for kernels that use it (docs/authoring-kernels.md).
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

/// Lowers this warpgroup's registers a unit to `count` (24..=256, a multiple of 8), returning them to the
/// multiprocessor's pool; every unit of the warpgroup must run it.
#[cube]
pub fn set_max_registers_decrease(#[comptime] count: u32) {
    gpu_asm!("setmaxnreg.dec.sync.aligned.u32 {n};", n = const count);
}

/// Raises this warpgroup's registers a unit to `count` (a multiple of 8), waiting until the pool has them
/// (another warpgroup's [`set_max_registers_decrease`]); every unit of the warpgroup must run it.
#[cube]
pub fn set_max_registers_increase(#[comptime] count: u32) {
    gpu_asm!("setmaxnreg.inc.sync.aligned.u32 {n};", n = const count);
}
