//! SwiGLU activation: out[t, i] = silu(x[t, i]) · x[t, d + i], silu(g) = g / (1 + exp(−g)).
//! x: [tokens, 2·d] (gate then up, as the fused gate/up projection writes them), out: [tokens, d], f32 or
//! bf16. One unit per output vector of `N` words. Tolerance: the output format's.
use crate::launch::{buffer, grid, ir_settings, slice_arg, vector_size};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::{pack, unpack};

const UNITS: u32 = 256;

pub const VARIANTS: &[Variant] = &[Variant {
    name: "vector",
    summary: "one unit per output vector (up to 16 bytes)",
    needs_plane_ops: false,
}];

#[cube]
fn silu(gate: f32) -> f32 {
    gate / (1.0 + f32::exp(-gate))
}

#[cube(launch)]
fn silu_mul_kernel<N: Size>(
    x: &[Vector<u32, N>],
    out: &mut [Vector<u32, N>],
    total_vectors: usize,
    row_vectors: usize,
    #[comptime] format: Format,
) {
    let v = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    if v >= total_vectors {
        terminate!();
    }
    let token = v / row_vectors;
    let i = v % row_vectors;
    let gate = x[token * 2 * row_vectors + i];
    let up = x[token * 2 * row_vectors + row_vectors + i];
    let mut result = Vector::<u32, N>::new(0u32);
    #[unroll]
    for w in 0..N::value() {
        let lo = silu(unpack(gate.extract(w), 0u32, format)) * unpack(up.extract(w), 0u32, format);
        let hi = silu(unpack(gate.extract(w), 1u32, format)) * unpack(up.extract(w), 1u32, format);
        result.insert(w, pack(lo, hi, format));
    }
    out[v] = result;
}

fn geometry(problem: &Problem) -> (usize, usize, usize) {
    let row_words = problem.dim("d") / problem.format.per_word() as usize;
    let vector = vector_size(row_words);
    let row_vectors = row_words / vector;
    (vector, row_vectors, problem.dim("tokens") * row_vectors)
}

pub struct SiluMul;

impl Kernel for SiluMul {
    fn name(&self) -> &'static str {
        "silu_mul"
    }
    fn summary(&self) -> &'static str {
        "out = silu(x[:, :d]) · x[:, d:]"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        const INPUTS: &[TensorSpec] = &[TensorSpec::new("x", &["tokens", "2*d"], Storage::Problem)];
        INPUTS
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("out", &["tokens", "d"], Storage::Problem)];
        OUTPUTS
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        &[]
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // The MoE expert (2048), the dense MLP (18432) and ragged sizes.
            for (tokens, d) in [(3, 2048), (1, 18432), (7, 250), (64, 6)] {
                problems.push(Problem::new(format, &[("tokens", tokens), ("d", d)], &[]));
            }
        }
        problems
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &[("tokens", 4), ("d", 2048)], &[])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        crate::spec::whole_words(self.name(), "d", problem)
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // negate, exp, add, divide, multiply (exp counted as one).
        5 * (problem.dim("tokens") * problem.dim("d")) as u64
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let d = problem.dim("d");
        let x = inputs[0].to_f64();
        let out = x
            .chunks(2 * d)
            .flat_map(|row| (0..d).map(move |i| row[i] / (1.0 + (-row[i]).exp()) * row[d + i]))
            .collect();
        vec![out]
    }
    fn launch(&self, _: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (vector, row_vectors, total_vectors) = geometry(problem);
        silu_mul_kernel::launch(
            &device.client,
            grid(total_vectors.div_ceil(UNITS as usize)),
            CubeDim::new_1d(UNITS),
            vector,
            buffer(&inputs[0], 2 * total_vectors),
            buffer(&outputs[0], total_vectors),
            total_vectors,
            row_vectors,
            problem.format,
        );
    }
    fn define(&self, _: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (vector, _, _) = geometry(problem);
        let (props, target_props) = nsa_backends::ir_properties(target);
        silu_mul_kernel::SiluMulKernel::new(
            ir_settings(CubeDim::new_1d(UNITS)),
            props,
            target_props,
            slice_arg(),
            slice_arg(),
            (),
            (),
            vector,
            problem.format,
        )
        .define()
    }
}
