//! Devices across runtimes, the features kernels choose variants by, and the start-up choice.
use crate::BackendError;
use cubecl::device::WgpuDeviceKind;
use cubecl::features::{MmaConfig, Plane};
use cubecl::ir::{ElemType, FloatKind};
use serde::Serialize;
use std::fmt;

/// A runtime compiled into this binary, in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RuntimeKind {
    Cuda,
    Hip,
    Wgpu,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Cuda, RuntimeKind::Hip, RuntimeKind::Wgpu];

    pub const fn name(self) -> &'static str {
        match self {
            RuntimeKind::Cuda => "cuda",
            RuntimeKind::Hip => "hip",
            RuntimeKind::Wgpu => "wgpu",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What kernels pick variants by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceFeatures {
    /// Plane (warp/subgroup) operations: without them, reductions use shared memory.
    pub plane_ops: bool,
    /// Largest plane width (32 on NVIDIA, 64 on CDNA AMD).
    pub plane_size: u32,
    pub tensor_cores: bool,
    /// Hopper's tensor memory accelerator.
    pub tma: bool,
    /// bf16 as a native arithmetic/storage type (otherwise decoded from bits).
    pub bf16: bool,
    /// FP8 e4m3 as a native type.
    pub fp8: bool,
    pub max_shared_memory: usize,
    pub max_units_per_cube: u32,
    pub multiprocessors: Option<u32>,
    /// Cooperative matrix multiply (wmma-style) on bf16 operands with f32 accumulation, 16×16×16.
    pub cmma_bf16: bool,
    /// Warp `mma.sync` m16n8k16 on bf16 with f32 accumulation, registers in PTX's documented layout.
    pub mma_m16n8k16_bf16: bool,
    /// Hopper's warpgroup MMA (`wgmma`, sm_90a): CUDA devices of compute capability 9.0 exactly (Blackwell
    /// has tcgen05 instead).
    pub wgmma: bool,
}

/// A device as listed by `nsa devices`.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    pub runtime: RuntimeKind,
    pub index: usize,
    pub name: String,
    /// sm_90, gfx942, or the wgpu adapter's API and type.
    pub arch: String,
    pub memory_bytes: Option<u64>,
    /// The driver, where the runtime says (CUDA: the driver API version, `CUDA driver 13.0`).
    pub driver: Option<String>,
    pub features: DeviceFeatures,
}

impl DeviceInfo {
    /// `cuda:0`, `hip:1`, `wgpu:0`: what `--device` takes.
    pub fn id(&self) -> String {
        format!("{}:{}", self.runtime, self.index)
    }
}

/// A device ready to run kernels: its info and its CubeCL client.
#[derive(Clone)]
pub struct Device {
    pub info: DeviceInfo,
    pub client: ComputeClient,
}

pub type ComputeClient = cubecl::prelude::Client;

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.info.id(), self.info.name)
    }
}

impl Device {
    pub fn features(&self) -> &DeviceFeatures {
        &self.info.features
    }
}

/// The cubecl devices of one runtime, in its own order. A runtime whose library is missing yields none;
/// a panic inside a runtime's probe is treated the same way, so a broken driver cannot stop start-up.
fn runtime_devices(runtime: RuntimeKind) -> Vec<cubecl::Device> {
    let probe = std::panic::catch_unwind(|| {
        cubecl::Device::enumerate_all()
            .into_iter()
            .filter(|d| runtime_of(d) == Some(runtime))
            .collect::<Vec<_>>()
    });
    probe.unwrap_or_default()
}

fn runtime_of(device: &cubecl::Device) -> Option<RuntimeKind> {
    match device {
        cubecl::Device::Cuda(_) => Some(RuntimeKind::Cuda),
        cubecl::Device::Hip(_) => Some(RuntimeKind::Hip),
        cubecl::Device::Wgpu(d) => (!matches!(d.kind, WgpuDeviceKind::DefaultDevice)).then_some(RuntimeKind::Wgpu),
        _ => None,
    }
}

fn open(runtime: RuntimeKind, index: usize, device: cubecl::Device) -> Option<Device> {
    let client = std::panic::catch_unwind(|| device.client()).ok()?;
    Some(Device::from_client(runtime, index, &device, client))
}

impl Device {
    /// A device from a client opened elsewhere (burn's tensors carry theirs): nsa's kernels launched with
    /// it work on that client's buffers. `device` is the cubecl device the client belongs to.
    pub fn from_client(runtime: RuntimeKind, index: usize, device: &cubecl::Device, client: ComputeClient) -> Device {
        let info = describe(runtime, index, device, &client);
        Device { info, client }
    }
}

fn describe(runtime: RuntimeKind, index: usize, device: &cubecl::Device, client: &ComputeClient) -> DeviceInfo {
    let props = client.properties();
    let hardware = &props.hardware;
    let fingerprint = &props.identity.fingerprint;
    let arch = match runtime {
        // cubecl fingerprints CUDA devices as `ptx_sm90`, HIP ones as `hip-kernel_gfx942`.
        RuntimeKind::Cuda => fingerprint.trim_start_matches("ptx_").replacen("sm", "sm_", 1),
        RuntimeKind::Hip => fingerprint.trim_start_matches("hip-kernel_").to_string(),
        RuntimeKind::Wgpu => match device {
            cubecl::Device::Wgpu(d) => format!("{:?}", d.kind).to_lowercase(),
            _ => String::new(),
        },
    };
    let features = DeviceFeatures {
        plane_ops: props.features.plane.contains(Plane::Ops),
        plane_size: hardware.plane_size_max,
        tensor_cores: hardware.num_tensor_cores.is_some(),
        tma: !props.features.tma.is_empty(),
        bf16: props.supports_type(ElemType::Float(FloatKind::BF16)),
        fp8: props.supports_type(ElemType::Float(FloatKind::E4M3)),
        max_shared_memory: hardware.max_shared_memory_size,
        max_units_per_cube: hardware.max_units_per_cube,
        multiprocessors: hardware.num_streaming_multiprocessors,
        cmma_bf16: props.features.matmul.cmma.contains(&MmaConfig {
            a_type: ElemType::Float(FloatKind::BF16),
            b_type: ElemType::Float(FloatKind::BF16),
            cd_type: ElemType::Float(FloatKind::F32),
            m: 16,
            k: 16,
            n: 16,
        }),
        mma_m16n8k16_bf16: runtime == RuntimeKind::Cuda
            && props.features.matmul.mma.contains(&MmaConfig {
                a_type: ElemType::Float(FloatKind::BF16),
                b_type: ElemType::Float(FloatKind::BF16),
                cd_type: ElemType::Float(FloatKind::F32),
                m: 16,
                k: 16,
                n: 8,
            }),
        wgmma: runtime == RuntimeKind::Cuda && arch == "sm_90",
    };
    DeviceInfo {
        runtime,
        index,
        name: props.identity.name.clone(),
        arch,
        memory_bytes: total_memory(runtime, index),
        driver: driver_version(runtime),
        features,
    }
}

/// Total device memory, asked of the driver where this build can (CUDA); other runtimes do not say.
fn total_memory(runtime: RuntimeKind, index: usize) -> Option<u64> {
    match runtime {
        RuntimeKind::Cuda => std::panic::catch_unwind(|| {
            cudarc::driver::result::init().ok()?;
            let device = cudarc::driver::result::device::get(index as i32).ok()?;
            unsafe { cudarc::driver::result::device::total_mem(device) }
                .ok()
                .map(|b| b as u64)
        })
        .ok()
        .flatten(),
        _ => None,
    }
}

/// The driver's version where this build can ask (CUDA's driver API); other runtimes do not say.
fn driver_version(runtime: RuntimeKind) -> Option<String> {
    match runtime {
        RuntimeKind::Cuda => std::panic::catch_unwind(|| {
            cudarc::driver::result::init().ok()?;
            let mut version = 0;
            // SAFETY: one out-parameter, written by the driver on success.
            let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
            (status == cudarc::driver::sys::CUresult::CUDA_SUCCESS)
                .then(|| format!("CUDA driver {}.{}", version / 1000, version % 1000 / 10))
        })
        .ok()
        .flatten(),
        _ => None,
    }
}

/// Every device of every runtime compiled in, opened, in preference order.
pub fn discover() -> Vec<Device> {
    RuntimeKind::ALL
        .into_iter()
        .flat_map(|runtime| {
            runtime_devices(runtime)
                .into_iter()
                .enumerate()
                .filter_map(move |(index, device)| open(runtime, index, device))
        })
        .collect()
}

/// The device `spec` names (`cuda:0`, `hip`, `wgpu:1`), or the best one found: cuda > hip > wgpu, and
/// within wgpu a real GPU before a software one.
pub fn select(spec: Option<&str>) -> Result<Device, BackendError> {
    let Some(spec) = spec.map(str::trim).filter(|s| !s.is_empty() && *s != "auto") else {
        return best();
    };
    let (runtime, index) = parse_spec(spec)?;
    let devices = runtime_devices(runtime);
    let found = devices.len();
    let device = devices
        .into_iter()
        .nth(index)
        .ok_or_else(|| BackendError::NoSuchDevice {
            runtime: runtime.name(),
            index,
            found: if found == 0 {
                "none".into()
            } else {
                format!("{found} ({runtime}:0..{})", found - 1)
            },
        })?;
    open(runtime, index, device).ok_or(BackendError::NoSuchDevice {
        runtime: runtime.name(),
        index,
        found: "a device that failed to open".into(),
    })
}

fn best() -> Result<Device, BackendError> {
    for runtime in RuntimeKind::ALL {
        let mut devices: Vec<_> = runtime_devices(runtime).into_iter().enumerate().collect();
        // Software adapters (lavapipe) last.
        devices.sort_by_key(|(_, d)| matches!(d, cubecl::Device::Wgpu(w) if w.kind == WgpuDeviceKind::Cpu));
        if let Some(device) = devices.into_iter().find_map(|(i, d)| open(runtime, i, d)) {
            return Ok(device);
        }
    }
    Err(BackendError::NoDevice)
}

/// `cuda`, `cuda:0`, `hip:1`, `wgpu:0` → (runtime, index).
pub fn parse_spec(spec: &str) -> Result<(RuntimeKind, usize), BackendError> {
    let invalid = || BackendError::InvalidDeviceSpec {
        given: spec.to_string(),
        expected: "auto, cuda[:N], hip[:N], wgpu[:N]".into(),
    };
    let (name, index) = match spec.split_once(':') {
        Some((name, index)) => (name, index.parse::<usize>().map_err(|_| invalid())?),
        None => (spec, 0),
    };
    let runtime = RuntimeKind::ALL
        .into_iter()
        .find(|r| r.name() == name)
        .ok_or_else(invalid)?;
    Ok((runtime, index))
}
