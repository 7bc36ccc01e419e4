//! Shared-memory barriers (PTX `mbarrier`, CUDA sm_80+): a 64-bit word in shared memory that completes a
//! phase once `count` arrivals have come, and that units wait on by phase parity. Unlike the cube barrier,
//! arriving does not wait and waiting does not arrive, so a pipeline stage's "data ready" and "buffer free"
//! signals let fast warps run ahead of slow ones by as many stages as there are buffers.
//!
//! Barriers are addressed by their shared-window byte address (8-byte aligned), e.g. past a kernel's tiles
//! from [`crate::wgmma::first_atom`]'s base.
use cubecl::prelude::*;

/// Sets the barrier at `address` to expect `count` arrivals per phase, starting in phase 0. One unit
/// initializes; a cube barrier after it publishes the barrier to the others.
#[cube]
pub fn mbarrier_init(address: u32, count: u32) {
    gpu_asm!("mbarrier.init.shared::cta.b64 [{a}], {c};", a = in(_) address, c = in(_) count);
}

/// One arrival on the barrier at `address` (release: this unit's earlier shared-memory writes are visible
/// to units that see the phase complete).
#[cube]
pub fn mbarrier_arrive(address: u32) {
    gpu_asm!(
        "{{\n.reg .b64 mb_state;\nmbarrier.arrive.shared::cta.b64 mb_state, [{a}];\n}}",
        a = in(_) address
    );
}

/// Makes the barrier at `address` also wait for this unit's asynchronous copies (`cp.async`) issued so
/// far: its pending arrivals grow by one now and shrink when they land, so the phase completes only after
/// them (the unit still arrives itself, e.g. with [`mbarrier_arrive`] once its ordinary stores are done).
#[cube]
pub fn mbarrier_track_async_copies(address: u32) {
    gpu_asm!("cp.async.mbarrier.arrive.shared::cta.b64 [{a}];", a = in(_) address);
}

/// Waits until the phase of parity `parity` (0 or 1) of the barrier at `address` has completed (acquire).
/// Returns at once when it already has; a barrier must not run two phases ahead of its waiters.
#[cube]
#[allow(clippy::identity_op)] // the × 1 turns a mutable local (a loop's phase) into a value for the asm
pub fn mbarrier_wait(address: u32, parity: u32) {
    let parity = parity * 1u32;
    gpu_asm!(
        "{{\n.reg .pred mb_done;\nmb_wait:\nmbarrier.try_wait.parity.shared::cta.b64 mb_done, [{a}], {p};",
        "@!mb_done bra mb_wait;\n}}",
        a = in(_) address,
        p = in(_) parity
    );
}

/// This unit's arrival on the barrier at `address`, announcing `bytes` more of asynchronous copies (TMA)
/// whose completion the phase also waits for.
#[cube]
pub fn mbarrier_arrive_expect_tx(address: u32, bytes: u32) {
    gpu_asm!(
        "{{\n.reg .b64 mb_state;\nmbarrier.arrive.expect_tx.shared::cta.b64 mb_state, [{a}], {n};\n}}",
        a = in(_) address,
        n = in(_) bytes
    );
}

/// Makes barriers just initialized visible to the asynchronous proxy (the tensor copy engine completes
/// transactions on them); a cube barrier after it publishes them to the other units.
#[cube]
pub fn fence_barrier_init() {
    gpu_asm!("fence.mbarrier_init.release.cluster;");
}
