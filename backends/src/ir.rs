//! IR emission without hardware: a kernel definition compiled to CUDA C++, HIP C++, WGSL or SPIR-V by the
//! same compilers the runtimes use, against a representative device of each target.
use crate::BackendError;
use cubecl::features::{MmaConfig, Plane, TypeUsage};
use cubecl::ir::{
    AddressType, DeviceIdentity, DeviceProperties, ElemType, FloatKind, HardwareProperties, IntKind,
    MemoryDeviceProperties, TargetProperties, UIntKind,
};
use cubecl::prelude::KernelDefinition;
use cubecl_runtime::runtime::Runtime;
use std::fmt;
use std::sync::Arc;

use cubecl::Compiler;

/// A code-generation target of `nsa ir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IrTarget {
    Cuda,
    Hip,
    Wgsl,
    Spirv,
}

impl IrTarget {
    pub const ALL: [IrTarget; 4] = [IrTarget::Cuda, IrTarget::Hip, IrTarget::Wgsl, IrTarget::Spirv];

    pub const fn name(self) -> &'static str {
        match self {
            IrTarget::Cuda => "cuda",
            IrTarget::Hip => "hip",
            IrTarget::Wgsl => "wgsl",
            IrTarget::Spirv => "spirv",
        }
    }

    /// File extension of a snapshot of this target's code.
    pub const fn extension(self) -> &'static str {
        match self {
            IrTarget::Cuda => "cu",
            IrTarget::Hip => "hip",
            IrTarget::Wgsl => "wgsl",
            IrTarget::Spirv => "spvasm",
        }
    }

    pub fn parse(name: &str) -> Option<IrTarget> {
        IrTarget::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the representative device of this target has plane (warp/subgroup) operations.
    pub const fn plane_ops(self) -> bool {
        true
    }

    pub const fn plane_size(self) -> u32 {
        match self {
            IrTarget::Hip => 64,
            _ => 32,
        }
    }
}

impl fmt::Display for IrTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The device and target properties kernels are expanded against for `target`: an sm_90-like CUDA device,
/// a gfx942-like HIP device (64-wide planes), a Vulkan-class wgpu device with subgroups.
pub fn ir_properties(target: IrTarget) -> (Arc<DeviceProperties>, Arc<TargetProperties>) {
    let plane = target.plane_size();
    let hardware = HardwareProperties {
        load_width: 128,
        vector_register_count: None,
        plane_size_min: plane,
        plane_size_max: plane,
        max_bindings: 64,
        max_shared_memory_size: 48 * 1024,
        max_cube_count: (u32::MAX, u16::MAX as u32, u16::MAX as u32),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: None,
        num_cpu_cores: None,
        last_level_cache_size: None,
        num_tensor_cores: None,
        min_tensor_cores_dim: None,
        max_vector_size: 4,
        cube_mma_reserved_shared_memory: 0,
    };
    let identity = DeviceIdentity {
        name: format!("nsa-ir-{}", target.name()),
        fingerprint: format!("nsa-ir-{}", target.name()),
        physical: None,
    };
    let mut props = DeviceProperties::new(
        Default::default(),
        MemoryDeviceProperties::new(u32::MAX as u64, 32),
        hardware,
        cubecl::profile::TimingMethod::System,
        identity,
    );
    match target {
        IrTarget::Cuda | IrTarget::Hip => cubecl_cpp::register_supported_types(&mut props),
        IrTarget::Wgsl | IrTarget::Spirv => {
            props.register_address_type(AddressType::U32);
            for elem in [
                ElemType::Float(FloatKind::F32),
                ElemType::Float(FloatKind::F16),
                ElemType::UInt(UIntKind::U32),
                ElemType::Int(IntKind::I32),
                ElemType::Bool,
            ] {
                props.register_type_usage(elem, TypeUsage::all());
            }
        }
    }
    if target.plane_ops() {
        props.features.plane.insert(Plane::Ops);
    }
    if matches!(target, IrTarget::Cuda | IrTarget::Hip) {
        // Tensor-core tiles as on sm_90 / gfx942: 16×16×16, f16/bf16 in, f32 accumulate.
        for input in [FloatKind::F16, FloatKind::BF16] {
            props.features.matmul.cmma.insert(MmaConfig {
                a_type: ElemType::Float(input),
                b_type: ElemType::Float(input),
                cd_type: ElemType::Float(FloatKind::F32),
                m: 16,
                k: 16,
                n: 16,
            });
        }
    }
    if target == IrTarget::Cuda {
        // Warp mma.sync as on sm_80+: m16n8k16, bf16 in, f32 accumulate.
        props.features.matmul.mma.insert(MmaConfig {
            a_type: ElemType::Float(FloatKind::BF16),
            b_type: ElemType::Float(FloatKind::BF16),
            cd_type: ElemType::Float(FloatKind::F32),
            m: 16,
            k: 16,
            n: 8,
        });
    }
    let target_props = match target {
        IrTarget::Cuda => cubecl::cuda::CudaRuntime::target_properties(),
        IrTarget::Hip => cubecl::hip::HipRuntime::target_properties(),
        IrTarget::Wgsl | IrTarget::Spirv => <cubecl::wgpu::WgpuRuntime>::target_properties(),
    };
    (Arc::new(props), Arc::new(target_props))
}

/// The source `target`'s compiler makes of `kernel` (SPIR-V as a disassembly), with its `v<N>` value names
/// renumbered in order of first appearance: cubecl's C++ backends number some values differently from one
/// process to the next, and a snapshot or a diff must only change when the code does.
pub fn emit_ir(target: IrTarget, kernel: KernelDefinition) -> Result<String, BackendError> {
    compile_ir(target, kernel).map(|source| renumber_values(&source))
}

/// Renames every `v<digits>` that does not continue an identifier or number (`v12`, `flag_v12_store`) to
/// `v<k>`, k counting distinct names in order of first appearance.
pub fn renumber_values(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut names: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < bytes.len() {
        let starts_name = bytes[i] == b'v' && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric());
        let digits = bytes[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
        if starts_name && digits > 0 {
            let name = &source[i..i + 1 + digits];
            let next = names.len();
            let k = *names.entry(name).or_insert(next);
            out.push_str(&format!("v{k}"));
            i += 1 + digits;
        } else {
            let c = source[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn compile_ir(target: IrTarget, kernel: KernelDefinition) -> Result<String, BackendError> {
    let error = |reason: String| BackendError::Compile {
        target: target.name(),
        reason,
    };
    match target {
        IrTarget::Cuda => {
            let mut compiler = cubecl_cpp::shared::CppCompiler::<cubecl_cpp::target::Cuda>::default();
            let options = cubecl_cpp::shared::CompilationOptions::default();
            compiler
                .compile(kernel, &options)
                .map(|k| k.to_string())
                .map_err(|e| error(format!("{e:?}")))
        }
        IrTarget::Hip => {
            let mut compiler = cubecl_cpp::shared::CppCompiler::<cubecl_cpp::target::Hip>::default();
            let options = cubecl_cpp::shared::CompilationOptions {
                warp_size: 64,
                ..Default::default()
            };
            compiler
                .compile(kernel, &options)
                .map(|k| k.to_string())
                .map_err(|e| error(format!("{e:?}")))
        }
        IrTarget::Wgsl => {
            let mut compiler = cubecl_wgpu::WgslCompiler;
            compiler
                .compile(kernel, &Default::default())
                .map(|k| k.to_string())
                .map_err(|e| error(format!("{e:?}")))
        }
        IrTarget::Spirv => {
            let mut compiler = cubecl_spirv::SpirvCompiler;
            // A Vulkan 1.3-class device: 4-wide vectors, SPIR-V 1.6.
            let mut options = cubecl::WgpuCompilationOptions::default();
            options.vulkan.max_vector_size = 4;
            options.vulkan.max_spirv_version = (1, 6);
            options.vulkan.supports_arbitrary_bitwise = true;
            options.vulkan.supports_uniform_standard_layout = true;
            compiler
                .compile(kernel, &options)
                .map(|k| k.to_string())
                .map_err(|e| error(format!("{e:?}")))
        }
    }
}
