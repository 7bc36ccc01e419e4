//! What a kernel is, independent of how it runs: problems (shapes), tensor specs, FLOP and byte counts,
//! and the [`Kernel`] trait every family registers through.
use crate::{DType, HostTensor, KernelError};
use cubecl::prelude::KernelDefinition;
use cubecl::server::Handle;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;
use std::fmt;

/// A problem: the storage format, named sizes and scalar parameters (e.g. `eps`).
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub format: Format,
    pub dims: Vec<(&'static str, usize)>,
    pub params: Vec<(&'static str, f64)>,
}

impl Problem {
    pub fn new(format: Format, dims: &[(&'static str, usize)], params: &[(&'static str, f64)]) -> Problem {
        Problem {
            format,
            dims: dims.to_vec(),
            params: params.to_vec(),
        }
    }

    /// The size named `name`. Panics on a name the kernel did not declare (a bug, not bad input).
    pub fn dim(&self, name: &str) -> usize {
        self.dims
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no dim `{name}`"))
    }

    pub fn param(&self, name: &str) -> f64 {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no param `{name}`"))
    }

    pub fn set_param(&mut self, name: &str, value: f64) -> bool {
        self.params
            .iter_mut()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v = value)
            .is_some()
    }

    /// A symbolic size: a dim name, optionally times a constant (`2*d`).
    pub fn eval(&self, symbol: &str) -> usize {
        match symbol.split_once('*') {
            Some((k, name)) => k.parse::<usize>().expect("coefficient") * self.dim(name),
            None => self.dim(symbol),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.format)?;
        for (name, value) in &self.dims {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

/// How a tensor's elements are stored relative to the problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// The problem's format (f32 or bf16).
    Problem,
    F32,
    I32,
    U8,
}

/// An input or output: its name and symbolic shape (`["rows", "hidden"]`).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub dims: &'static [&'static str],
    pub storage: Storage,
    /// An input that may be left out; [`Kernel::default_input`] supplies it.
    pub optional: bool,
}

impl TensorSpec {
    pub const fn new(name: &'static str, dims: &'static [&'static str], storage: Storage) -> TensorSpec {
        TensorSpec {
            name,
            dims,
            storage,
            optional: false,
        }
    }

    pub const fn optional(self) -> TensorSpec {
        TensorSpec { optional: true, ..self }
    }

    pub fn shape(&self, problem: &Problem) -> Vec<usize> {
        self.dims.iter().map(|d| problem.eval(d)).collect()
    }

    pub fn dtype(&self, problem: &Problem) -> DType {
        match self.storage {
            Storage::Problem => DType::of(problem.format),
            Storage::F32 => DType::F32,
            Storage::I32 => DType::I32,
            Storage::U8 => DType::U8,
        }
    }

    pub fn len(&self, problem: &Problem) -> usize {
        self.shape(problem).iter().product()
    }

    /// Words on the device (bf16 packs two elements per word).
    pub fn words(&self, problem: &Problem) -> usize {
        let len = self.len(problem);
        match self.dtype(problem) {
            DType::Bf16 => len.div_ceil(2),
            DType::U8 => len.div_ceil(4),
            _ => len,
        }
    }

    pub fn bytes(&self, problem: &Problem) -> u64 {
        (self.len(problem) * self.dtype(problem).bytes_per_element()) as u64
    }

    /// `x [3, 7168] bf16`.
    pub fn describe(&self, problem: &Problem) -> String {
        format!(
            "{} {:?} {}",
            self.name,
            self.shape(problem),
            self.dtype(problem).safetensors_name()
        )
    }
}

/// A kernel variant: one implementation of the family's math.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub name: &'static str,
    pub summary: &'static str,
    /// Needs plane (warp/subgroup) operations.
    pub needs_plane_ops: bool,
}

impl Variant {
    pub fn supports(&self, features: &DeviceFeatures) -> bool {
        !self.needs_plane_ops || features.plane_ops
    }

    pub fn supports_target(&self, target: IrTarget) -> bool {
        !self.needs_plane_ops || target.plane_ops()
    }
}

/// A kernel run's description: what bench, autotune and selftest report.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    pub kernel: &'static str,
    pub variant: &'static str,
    pub problem: Problem,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub flops: u64,
    /// Fewest bytes moved: each input read once, each output written once.
    pub bytes: u64,
}

/// The check every Hopper (`wgmma`) variant's `requirements` starts with.
pub fn needs_wgmma(features: &DeviceFeatures) -> Result<(), String> {
    if features.wgmma {
        Ok(())
    } else {
        Err("needs Hopper warpgroup MMA (CUDA sm_90)".into())
    }
}

/// One kernel family's registration.
pub trait Kernel: Sync {
    fn name(&self) -> &'static str;
    /// The math, one line.
    fn summary(&self) -> &'static str;
    fn variants(&self) -> &'static [Variant];
    fn inputs(&self) -> &'static [TensorSpec];
    fn outputs(&self) -> &'static [TensorSpec];
    /// Scalar parameters and their defaults (`eps`, `rope_offset`).
    fn default_params(&self) -> &'static [(&'static str, f64)];
    /// The test and selftest catalogue: small, ragged and model-sized shapes, every format.
    fn problems(&self) -> Vec<Problem>;
    /// The storage formats the kernel's code depends on (one snapshot each).
    fn formats(&self) -> &'static [Format] {
        &Format::ALL
    }
    /// The shapes `nsa bench` measures by default (the model's sizes).
    fn bench_problems(&self) -> Vec<Problem> {
        vec![self.ir_problem(Format::Bf16)]
    }
    /// The shape `nsa ir` and the snapshots compile for (sizes are runtime values; only the format and
    /// comptime tunables change the code).
    fn ir_problem(&self, format: Format) -> Problem;
    fn validate(&self, problem: &Problem) -> Result<(), KernelError>;
    /// FLOPs of one run.
    fn flops(&self, problem: &Problem) -> u64;
    /// Fewest bytes one run must move: by default every input read once and every output written once;
    /// kernels that read only part of an input (a sparse gather from a cache) say so.
    fn bytes(&self, problem: &Problem) -> u64 {
        self.inputs()
            .iter()
            .chain(self.outputs())
            .map(|t| t.bytes(problem))
            .sum()
    }
    /// The f64 reference: one `Vec` per output, from inputs as stored.
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>>;
    /// Random inputs (normal, as stored). Families with index or position inputs override this.
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        crate::check::random_normal_inputs(self.inputs(), problem, rng)
    }
    /// Shared memory a launch of `variant` on `problem` needs, in bytes (checked against the device).
    fn shared_memory_bytes(&self, _variant: &Variant, _problem: &Problem) -> usize {
        0
    }
    /// What `variant` needs beyond plane ops and shared memory (tensor cores, a storage format, ...).
    fn requirements(&self, _variant: &Variant, _problem: &Problem, _features: &DeviceFeatures) -> Result<(), String> {
        Ok(())
    }
    /// Whether `variant` can run `problem` on a device with `features`; the reason when not.
    fn supports(&self, variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
        self.requirements(variant, problem, features)?;
        if !variant.supports(features) {
            return Err("needs plane (warp/subgroup) operations".into());
        }
        let bytes = self.shared_memory_bytes(variant, problem);
        if bytes > features.max_shared_memory {
            return Err(format!(
                "needs {bytes} B of shared memory, the device has {}",
                features.max_shared_memory
            ));
        }
        Ok(())
    }
    /// Whether `variant` multiplies on FP8 tensor cores (its roofline is the FP8 peak, twice bf16's).
    fn fp8_math(&self, _variant: &Variant) -> bool {
        false
    }
    /// Whether `variant` compiles for `target` (`nsa ir`, the snapshots).
    fn supports_target(&self, variant: &Variant, target: IrTarget) -> bool {
        variant.supports_target(target)
    }
    /// Whether `variant` computes in `format` at all (tensor-core variants take bf16 only): `nsa ir` and the
    /// snapshots skip the others.
    fn supports_format(&self, _variant: &Variant, _format: Format) -> bool {
        true
    }
    /// Tolerance of an output under the check's metric |out − ref| / (1 + |ref|): by default the storage
    /// format's (bf16 1e-2, f32 1e-5).
    fn tolerance(&self, output: &TensorSpec, problem: &Problem) -> f64 {
        match output.storage {
            Storage::Problem => problem.format.tolerance(),
            _ => 1e-5,
        }
    }
    /// The tolerance the check applies to `variant`: by default [`Kernel::tolerance`]; variants that round
    /// an intermediate to bf16 may widen it to bf16's 1e-2.
    fn variant_tolerance(&self, _variant: &Variant, output: &TensorSpec, problem: &Problem) -> f64 {
        self.tolerance(output, problem)
    }
    /// Puts an output (or its reference) in the order the comparison needs; e.g. top-k sorts each row,
    /// since any order of the selected set is correct.
    fn canonicalize(&self, _output: &TensorSpec, _problem: &Problem, _values: &mut [f64]) {}
    /// Launch parameters `nsa autotune` may set, with the values it tries (they change how, never what, the
    /// kernel computes: e.g. split-KV counts). The problem's own value is the fixed rule's choice.
    fn tunable_params(&self, _variant: &Variant) -> &'static [(&'static str, &'static [f64])] {
        &[]
    }
    /// The value of an optional input left out (e.g. "every key allowed").
    fn default_input(&self, spec: &TensorSpec, problem: &Problem) -> HostTensor {
        unreachable!("{} has no optional input {}", self.name(), spec.describe(problem))
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]);
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition;
    /// The kernels a variant launches after [`Kernel::define`]'s, in launch order (e.g. a split's select and
    /// finish passes): `nsa ir`, the snapshots and the tuning table's kernel version cover them too.
    fn later_launches(&self, _variant: &Variant, _target: IrTarget, _problem: &Problem) -> Vec<KernelDefinition> {
        Vec::new()
    }

    fn spec(&self, variant: &Variant, problem: &Problem) -> KernelSpec {
        let inputs = self.inputs().to_vec();
        let outputs = self.outputs().to_vec();
        KernelSpec {
            kernel: self.name(),
            variant: variant.name,
            problem: problem.clone(),
            inputs,
            outputs,
            flops: self.flops(problem),
            bytes: self.bytes(problem),
        }
    }
}

/// The check of a dimension `field` that must fill whole storage words: positive and a multiple of the
/// format's values per word (bf16 rows pair up).
pub fn whole_words(kernel: &'static str, field: &'static str, problem: &Problem) -> Result<(), KernelError> {
    let (size, per_word) = (problem.dim(field), problem.format.per_word() as usize);
    if size == 0 || !size.is_multiple_of(per_word) {
        return Err(KernelError::InvalidProblem {
            kernel,
            field,
            expected: format!("a positive multiple of {per_word} for {}", problem.format),
            got: size.to_string(),
        });
    }
    Ok(())
}
