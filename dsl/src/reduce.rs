//! Cube-wide reductions: every unit contributes a value and every unit gets the total.
//!
//! `Plane` sums inside each plane (warp/subgroup) with plane operations, then across planes through a small
//! shared array; `Shared` is a shared-memory tree for devices without plane operations (lavapipe). The
//! host picks one from the device's features (`nsa_backends::DeviceFeatures::plane_ops`).
use cubecl::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reduction {
    /// Plane (warp/subgroup) operations, then shared memory across planes.
    Plane,
    /// Shared memory only: a log₂(cube size) tree.
    Shared,
}

impl Reduction {
    pub const fn name(self) -> &'static str {
        match self {
            Reduction::Plane => "plane",
            Reduction::Shared => "shared",
        }
    }
}

/// Sum of `value` over the cube's `cube_size` units (a power of two), returned to every unit.
/// Must be reached by every unit of the cube (it synchronizes).
#[cube]
pub fn cube_sum(value: f32, #[comptime] cube_size: u32, #[comptime] reduction: Reduction) -> f32 {
    match reduction {
        Reduction::Plane => plane_path_sum(value, cube_size),
        Reduction::Shared => shared_tree_sum(value, cube_size),
    }
}

/// Sum within each plane, park one partial per plane in shared memory, and let every unit add the
/// partials (there are at most cube_size / plane_size of them: 32 for 1024 units on 32-wide planes).
#[cube]
fn plane_path_sum(value: f32, #[comptime] cube_size: u32) -> f32 {
    let mut partials = Shared::<[f32]>::new_slice(cube_size as usize);
    let plane_total = plane_sum(value);
    if UNIT_POS_PLANE == 0 {
        partials[PLANE_POS as usize] = plane_total;
    }
    sync_cube();
    let num_planes = CUBE_DIM / PLANE_DIM;
    let mut total = 0.0f32;
    for plane in 0..num_planes {
        total += partials[plane as usize];
    }
    // The shared array is read by all before anyone reuses it in a following reduction.
    sync_cube();
    total
}

/// Tree reduction in shared memory: halve the active units each step.
#[cube]
#[allow(clippy::assign_op_pattern)] // `+=` on a shared element expands to different (equivalent) code.
fn shared_tree_sum(value: f32, #[comptime] cube_size: u32) -> f32 {
    let mut tree = Shared::<[f32]>::new_slice(cube_size as usize);
    let unit = UNIT_POS as usize;
    tree[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if unit < stride {
            tree[unit] = tree[unit] + tree[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = tree[0];
    sync_cube();
    total
}
