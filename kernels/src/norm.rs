//! RMSNorm and LayerNorm over rows, one cube per row.
//!
//! rms_norm:   out[r, i] = x[r, i] / sqrt(mean_i(x[r, :]²) + eps) · weight[i]
//! layer_norm: out[r, i] = (x[r, i] − μ_r) / sqrt(mean_i((x[r, :] − μ_r)²) + eps) · weight[i] + bias[i]
//! x, weight, bias, out: [rows, hidden] / [hidden] in f32 or bf16; statistics in f32 (two passes for
//! the variance, so large means do not cancel). Tolerance: the output format's.
//! Variants: `plane` reduces with plane operations, `shared` with a shared-memory tree (no plane ops).
use crate::launch::{buffer, grid, ir_settings, slice_arg, vector_size};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::format::unpack;
use nsa_dsl::reduce::cube_sum;
use nsa_dsl::{Format, Reduction};

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "plane",
        summary: "plane (warp) reduction, then across planes",
        needs_plane_ops: true,
    },
    Variant {
        name: "shared",
        summary: "shared-memory tree reduction (no plane ops)",
        needs_plane_ops: false,
    },
];

fn reduction(variant: &Variant) -> Reduction {
    if variant.needs_plane_ops {
        Reduction::Plane
    } else {
        Reduction::Shared
    }
}

/// Σ (x − shift) or Σ (x − shift)² over this unit's share of the row starting at vector `base`.
#[cube]
fn partial_row_sum<N: Size>(
    x: &[Vector<u32, N>],
    base: usize,
    row_vectors: usize,
    shift: f32,
    #[comptime] squared: bool,
    #[comptime] format: Format,
) -> f32 {
    let mut acc = 0.0f32;
    let mut v = UNIT_POS as usize;
    while v < row_vectors {
        let vector = x[base + v];
        #[unroll]
        for w in 0..N::value() {
            let word = vector.extract(w);
            #[unroll]
            for lane in 0..comptime!(format.per_word()) {
                let e = unpack(word, lane, format) - shift;
                if squared {
                    acc += e * e;
                } else {
                    acc += e;
                }
            }
        }
        v += CUBE_DIM as usize;
    }
    acc
}

/// out = (x − mean) · inv_std · weight (+ bias) over this unit's share of the row.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_normalized<N: Size>(
    x: &[Vector<u32, N>],
    weight: &[Vector<u32, N>],
    bias: &[Vector<u32, N>],
    out: &mut [Vector<u32, N>],
    base: usize,
    row_vectors: usize,
    mean: f32,
    inv_std: f32,
    #[comptime] with_bias: bool,
    #[comptime] format: Format,
) {
    let mut v = UNIT_POS as usize;
    while v < row_vectors {
        let xv = x[base + v];
        let wv = weight[v];
        let bv = bias[v];
        let mut result = Vector::<u32, N>::new(0u32);
        #[unroll]
        for w in 0..N::value() {
            let mut lo = (unpack(xv.extract(w), 0u32, format) - mean) * inv_std * unpack(wv.extract(w), 0u32, format);
            let mut hi = (unpack(xv.extract(w), 1u32, format) - mean) * inv_std * unpack(wv.extract(w), 1u32, format);
            if with_bias {
                lo += unpack(bv.extract(w), 0u32, format);
                hi += unpack(bv.extract(w), 1u32, format);
            }
            result.insert(w, nsa_dsl::format::pack(lo, hi, format));
        }
        out[base + v] = result;
        v += CUBE_DIM as usize;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_kernel<N: Size>(
    x: &[Vector<u32, N>],
    weight: &[Vector<u32, N>],
    out: &mut [Vector<u32, N>],
    rows: usize,
    row_vectors: usize,
    hidden: u32,
    eps: f32,
    #[comptime] cube_size: u32,
    #[comptime] format: Format,
    #[comptime] reduction: Reduction,
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let base = row * row_vectors;
    let sum_squares = cube_sum(
        partial_row_sum(x, base, row_vectors, 0.0, true, format),
        cube_size,
        reduction,
    );
    let inv_rms = f32::inverse_sqrt(sum_squares / f32::cast_from(hidden) + eps);
    write_normalized(x, weight, weight, out, base, row_vectors, 0.0, inv_rms, false, format);
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_kernel<N: Size>(
    x: &[Vector<u32, N>],
    weight: &[Vector<u32, N>],
    bias: &[Vector<u32, N>],
    out: &mut [Vector<u32, N>],
    rows: usize,
    row_vectors: usize,
    hidden: u32,
    eps: f32,
    #[comptime] cube_size: u32,
    #[comptime] format: Format,
    #[comptime] reduction: Reduction,
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let base = row * row_vectors;
    let count = f32::cast_from(hidden);
    let mean = cube_sum(
        partial_row_sum(x, base, row_vectors, 0.0, false, format),
        cube_size,
        reduction,
    ) / count;
    let variance = cube_sum(
        partial_row_sum(x, base, row_vectors, mean, true, format),
        cube_size,
        reduction,
    ) / count;
    let inv_std = f32::inverse_sqrt(variance + eps);
    write_normalized(x, weight, bias, out, base, row_vectors, mean, inv_std, true, format);
}

/// Launch geometry of a norm problem: (vector size in words, vectors per row, units per cube).
fn geometry(problem: &Problem) -> (usize, usize, u32) {
    let row_words = problem.dim("hidden") / problem.format.per_word() as usize;
    let vector = vector_size(row_words);
    let row_vectors = row_words / vector;
    // A power of two (the shared tree needs one), 32..=256: enough units to cover the row in a few steps.
    let cube_size = row_vectors.next_power_of_two().clamp(32, 256) as u32;
    (vector, row_vectors, cube_size)
}

fn validate_norm(kernel: &'static str, problem: &Problem) -> Result<(), KernelError> {
    crate::spec::whole_words(kernel, "hidden", problem)?;
    if problem.param("eps") <= 0.0 {
        return Err(KernelError::InvalidProblem {
            kernel,
            field: "eps",
            expected: "> 0".into(),
            got: problem.param("eps").to_string(),
        });
    }
    Ok(())
}

fn norm_problems() -> Vec<Problem> {
    let mut problems = Vec::new();
    for format in Format::ALL {
        // Ragged: odd row counts and widths that are not multiples of the cube or the vector.
        for (rows, hidden) in [(1, 64), (3, 1000), (17, 1536), (5, 7168), (2, 578)] {
            problems.push(Problem::new(
                format,
                &[("rows", rows), ("hidden", hidden)],
                &[("eps", 1e-6)],
            ));
        }
    }
    problems
}

/// Reference normalization of each row; `with_bias` subtracts the mean and adds `bias` (LayerNorm).
fn reference_norm(problem: &Problem, inputs: &[HostTensor], layer_norm: bool) -> Vec<Vec<f64>> {
    let hidden = problem.dim("hidden");
    let eps = problem.param("eps");
    let x = inputs[0].to_f64();
    let weight = inputs[1].to_f64();
    let bias = if layer_norm {
        inputs[2].to_f64()
    } else {
        vec![0.0; hidden]
    };
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(hidden) {
        let mean = if layer_norm {
            row.iter().sum::<f64>() / hidden as f64
        } else {
            0.0
        };
        let second_moment = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / hidden as f64;
        let inv = 1.0 / (second_moment + eps).sqrt();
        out.extend(
            row.iter()
                .enumerate()
                .map(|(i, v)| (v - mean) * inv * weight[i] + bias[i]),
        );
    }
    vec![out]
}

pub struct RmsNorm;

impl Kernel for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn summary(&self) -> &'static str {
        "out = x / sqrt(mean(x²) + eps) · weight, per row"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        const INPUTS: &[TensorSpec] = &[
            TensorSpec::new("x", &["rows", "hidden"], Storage::Problem),
            TensorSpec::new("weight", &["hidden"], Storage::Problem),
        ];
        INPUTS
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("out", &["rows", "hidden"], Storage::Problem)];
        OUTPUTS
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        &[("eps", 1e-6)]
    }
    fn problems(&self) -> Vec<Problem> {
        norm_problems()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &[("rows", 4), ("hidden", 7168)], &[("eps", 1e-6)])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        validate_norm(self.name(), problem)
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // square + add, then scale + weight: 4 per element.
        4 * (problem.dim("rows") * problem.dim("hidden")) as u64
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        reference_norm(problem, inputs, false)
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (vector, row_vectors, cube_size) = geometry(problem);
        let rows = problem.dim("rows");
        rms_norm_kernel::launch(
            &device.client,
            grid(rows),
            CubeDim::new_1d(cube_size),
            vector,
            buffer(&inputs[0], rows * row_vectors),
            buffer(&inputs[1], row_vectors),
            buffer(&outputs[0], rows * row_vectors),
            rows,
            row_vectors,
            problem.dim("hidden") as u32,
            problem.param("eps") as f32,
            cube_size,
            problem.format,
            reduction(variant),
        );
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (vector, _, cube_size) = geometry(problem);
        let (props, target_props) = nsa_backends::ir_properties(target);
        rms_norm_kernel::RmsNormKernel::new(
            ir_settings(CubeDim::new_1d(cube_size)),
            props,
            target_props,
            slice_arg(),
            slice_arg(),
            slice_arg(),
            (),
            (),
            (),
            (),
            vector,
            cube_size,
            problem.format,
            reduction(variant),
        )
        .define()
    }
}

pub struct LayerNorm;

impl Kernel for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn summary(&self) -> &'static str {
        "out = (x − mean) / sqrt(var + eps) · weight + bias, per row"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        const INPUTS: &[TensorSpec] = &[
            TensorSpec::new("x", &["rows", "hidden"], Storage::Problem),
            TensorSpec::new("weight", &["hidden"], Storage::Problem),
            TensorSpec::new("bias", &["hidden"], Storage::Problem),
        ];
        INPUTS
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("out", &["rows", "hidden"], Storage::Problem)];
        OUTPUTS
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        &[("eps", 1e-6)]
    }
    fn problems(&self) -> Vec<Problem> {
        norm_problems()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &[("rows", 4), ("hidden", 128)], &[("eps", 1e-6)])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        validate_norm(self.name(), problem)
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // mean, centred square, scale, weight, bias: 7 per element.
        7 * (problem.dim("rows") * problem.dim("hidden")) as u64
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        reference_norm(problem, inputs, true)
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (vector, row_vectors, cube_size) = geometry(problem);
        let rows = problem.dim("rows");
        layer_norm_kernel::launch(
            &device.client,
            grid(rows),
            CubeDim::new_1d(cube_size),
            vector,
            buffer(&inputs[0], rows * row_vectors),
            buffer(&inputs[1], row_vectors),
            buffer(&inputs[2], row_vectors),
            buffer(&outputs[0], rows * row_vectors),
            rows,
            row_vectors,
            problem.dim("hidden") as u32,
            problem.param("eps") as f32,
            cube_size,
            problem.format,
            reduction(variant),
        );
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (vector, _, cube_size) = geometry(problem);
        let (props, target_props) = nsa_backends::ir_properties(target);
        layer_norm_kernel::LayerNormKernel::new(
            ir_settings(CubeDim::new_1d(cube_size)),
            props,
            target_props,
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            (),
            (),
            (),
            (),
            vector,
            cube_size,
            problem.format,
            reduction(variant),
        )
        .define()
    }
}
