//! Runtime discovery and selection, and IR emission for any target without its hardware.
//!
//! One binary carries the CUDA, HIP and wgpu runtimes; their GPU libraries are loaded at run time, so a
//! machine without them still starts and falls back (cuda > hip > wgpu). Nothing here knows a kernel.
pub mod device;
pub mod error;
pub mod ir;

pub use cubecl;
pub use device::{ComputeClient, Device, DeviceFeatures, DeviceInfo, RuntimeKind, discover, select};
pub use error::BackendError;
pub use ir::{IrTarget, emit_ir, ir_properties};
