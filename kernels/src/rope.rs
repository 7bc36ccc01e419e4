//! Rotary position embedding on the `rope_dim` dims starting at `rope_offset` of every head; the other
//! dims are copied. x, out: [tokens, heads, head_dim] (f32 or bf16); positions: [tokens] i32;
//! cos_sin: [max_pos, rope_dim] f32, row p = cos(p·θ_0..θ_{rope_dim/2−1}) then sin of the same.
//!
//! rope_interleaved (MLA):   pairs (2i, 2i+1):       out[2i] = x[2i]·cos_i − x[2i+1]·sin_i, out[2i+1] = x[2i+1]·cos_i + x[2i]·sin_i
//! rope_neox (the indexer):  pairs (i, i + rope_dim/2): out[i] = x[i]·cos_i − x[i+h]·sin_i,   out[i+h] = x[i+h]·cos_i + x[i]·sin_i
//! One unit per output word (two bf16 elements or one f32). Tolerance: the output format's.
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::{pack, read_element};

const UNITS: u32 = 256;

pub const VARIANTS: &[Variant] = &[Variant {
    name: "word",
    summary: "one unit per output word",
    needs_plane_ops: false,
}];

/// The rotated value of element `d` of the head starting at element `head_base`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn rotate_element(
    x: &[u32],
    cos_sin: &[f32],
    head_base: usize,
    d: usize,
    position: usize,
    rope_offset: usize,
    rope_dim: usize,
    #[comptime] interleaved: bool,
    #[comptime] format: Format,
) -> f32 {
    let value = read_element(x, head_base + d, format);
    let mut result = value;
    if d >= rope_offset && d < rope_offset + rope_dim {
        let r = d - rope_offset;
        let half = rope_dim / 2;
        // Frequency index and partner element; `first` is the element the pair's sine term subtracts from.
        let (frequency, partner, first) = if interleaved {
            (r / 2, d ^ 1, r % 2 == 0)
        } else {
            (r % half, select(r < half, d + half, d - half), r < half)
        };
        let cos = cos_sin[position * rope_dim + frequency];
        let sin = cos_sin[position * rope_dim + half + frequency];
        let other = read_element(x, head_base + partner, format);
        result = select(first, value * cos - other * sin, value * cos + other * sin);
    }
    result
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rope_kernel(
    x: &[u32],
    positions: &[i32],
    cos_sin: &[f32],
    out: &mut [u32],
    total_words: usize,
    heads: usize,
    head_dim: usize,
    rope_offset: usize,
    rope_dim: usize,
    #[comptime] interleaved: bool,
    #[comptime] format: Format,
) {
    let word = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    if word >= total_words {
        terminate!();
    }
    let element = word * comptime!(format.per_word() as usize);
    let token = element / (heads * head_dim);
    let d = element % head_dim;
    let head_base = element - d;
    let position = positions[token] as usize;
    let lo = rotate_element(
        x,
        cos_sin,
        head_base,
        d,
        position,
        rope_offset,
        rope_dim,
        interleaved,
        format,
    );
    let mut hi = 0.0f32;
    if comptime!(format.per_word() == 2) {
        hi = rotate_element(
            x,
            cos_sin,
            head_base,
            d + 1,
            position,
            rope_offset,
            rope_dim,
            interleaved,
            format,
        );
    }
    out[word] = pack(lo, hi, format);
}

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("x", &["tokens", "heads", "head_dim"], Storage::Problem),
    TensorSpec::new("positions", &["tokens"], Storage::I32),
    TensorSpec::new("cos_sin", &["max_pos", "rope_dim"], Storage::F32),
];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new(
    "out",
    &["tokens", "heads", "head_dim"],
    Storage::Problem,
)];

/// RoPE with its pair layout fixed per registered kernel: [`ROPE_INTERLEAVED`] and [`ROPE_NEOX`].
pub struct Rope {
    name: &'static str,
    summary: &'static str,
    interleaved: bool,
}

pub static ROPE_INTERLEAVED: Rope = Rope {
    name: "rope_interleaved",
    summary: "RoPE on interleaved pairs (2i, 2i+1), as MLA uses",
    interleaved: true,
};
pub static ROPE_NEOX: Rope = Rope {
    name: "rope_neox",
    summary: "RoPE on halves (i, i + rope_dim/2), NeoX style, as the indexer uses",
    interleaved: false,
};

impl Kernel for Rope {
    fn name(&self) -> &'static str {
        self.name
    }
    fn summary(&self) -> &'static str {
        self.summary
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        INPUTS
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        OUTPUTS
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        &[("rope_offset", 0.0)]
    }
    fn ir_problem(&self, format: Format) -> Problem {
        self.problems()
            .into_iter()
            .find(|p| p.format == format)
            .expect("catalogue")
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // Two multiplies and an add per rotated element.
        3 * (problem.dim("tokens") * problem.dim("heads") * problem.dim("rope_dim")) as u64
    }

    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // (tokens, heads, head_dim, rope_dim, rope_offset): MLA q (128 nope + 64 rope), MLA k_pe alone,
            // the indexer (rope first), and a ragged token count.
            for (tokens, heads, head_dim, rope_dim, offset) in [
                (5, 16, 192, 64, 128),
                (7, 1, 64, 64, 0),
                (3, 64, 128, 64, 0),
                (33, 2, 96, 32, 64),
            ] {
                problems.push(Problem::new(
                    format,
                    &[
                        ("tokens", tokens),
                        ("heads", heads),
                        ("head_dim", head_dim),
                        ("rope_dim", rope_dim),
                        ("max_pos", 4096),
                    ],
                    &[("rope_offset", offset as f64)],
                ));
            }
        }
        problems
    }

    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        let name = self.name;
        let (head_dim, rope_dim) = (problem.dim("head_dim"), problem.dim("rope_dim"));
        let offset = problem.param("rope_offset");
        let invalid = |field, expected: String, got: String| KernelError::InvalidProblem {
            kernel: name,
            field,
            expected,
            got,
        };
        if rope_dim == 0 || rope_dim % 2 != 0 {
            return Err(invalid(
                "rope_dim",
                "a positive even number".into(),
                rope_dim.to_string(),
            ));
        }
        if offset < 0.0 || offset.fract() != 0.0 || offset as usize + rope_dim > head_dim {
            return Err(invalid(
                "rope_offset",
                format!("an integer in 0..={}", head_dim.saturating_sub(rope_dim)),
                offset.to_string(),
            ));
        }
        // A bf16 word holds two elements: both must lie in one head, and a pair must not straddle words.
        if problem.format == Format::Bf16 && (!head_dim.is_multiple_of(2) || !(offset as usize).is_multiple_of(2)) {
            return Err(invalid(
                "head_dim",
                "even, with an even rope_offset, for bf16".into(),
                head_dim.to_string(),
            ));
        }
        Ok(())
    }

    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        use rand::Rng;
        let mut inputs = crate::check::random_normal_inputs(&INPUTS[..1], problem, rng);
        let (tokens, max_pos, rope_dim) = (problem.dim("tokens"), problem.dim("max_pos"), problem.dim("rope_dim"));
        let positions: Vec<i32> = (0..tokens).map(|_| rng.random_range(0..max_pos as i32)).collect();
        inputs.push(HostTensor::from_i32("positions", &[tokens], &positions));
        inputs.push(HostTensor::from_f32(
            "cos_sin",
            &[max_pos, rope_dim],
            crate::DType::F32,
            &cos_sin_table(max_pos, rope_dim, 10000.0),
        ));
        inputs
    }

    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (heads, head_dim, rope_dim) = (problem.dim("heads"), problem.dim("head_dim"), problem.dim("rope_dim"));
        let offset = problem.param("rope_offset") as usize;
        let x = inputs[0].to_f64();
        let positions = inputs[1].to_f64();
        let cos_sin = inputs[2].to_f64();
        let half = rope_dim / 2;
        let mut out = x.clone();
        for (t, position) in positions.iter().enumerate() {
            let table = &cos_sin[*position as usize * rope_dim..][..rope_dim];
            for h in 0..heads {
                let base = (t * heads + h) * head_dim + offset;
                for i in 0..half {
                    let (a, b) = if self.interleaved {
                        (base + 2 * i, base + 2 * i + 1)
                    } else {
                        (base + i, base + i + half)
                    };
                    let (cos, sin) = (table[i], table[half + i]);
                    out[a] = x[a] * cos - x[b] * sin;
                    out[b] = x[b] * cos + x[a] * sin;
                }
            }
        }
        vec![out]
    }

    fn launch(&self, _: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let total_words = OUTPUTS[0].words(problem);
        rope_kernel::launch(
            &device.client,
            grid(total_words.div_ceil(UNITS as usize)),
            CubeDim::new_1d(UNITS),
            buffer(&inputs[0], total_words),
            buffer(&inputs[1], problem.dim("tokens")),
            buffer(&inputs[2], INPUTS[2].len(problem)),
            buffer(&outputs[0], total_words),
            total_words,
            problem.dim("heads"),
            problem.dim("head_dim"),
            problem.param("rope_offset") as usize,
            problem.dim("rope_dim"),
            self.interleaved,
            problem.format,
        );
    }

    fn define(&self, _: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        rope_kernel::RopeKernel::new(
            ir_settings(CubeDim::new_1d(UNITS)),
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
            (),
            self.interleaved,
            problem.format,
        )
        .define()
    }
}

/// The cos|sin table for `max_pos` positions and base `theta` (cos(p·θ_i), θ_i = theta^(−2i/rope_dim)).
pub fn cos_sin_table(max_pos: usize, rope_dim: usize, theta: f64) -> Vec<f32> {
    let half = rope_dim / 2;
    let mut table = Vec::with_capacity(max_pos * rope_dim);
    for p in 0..max_pos {
        let angles: Vec<f64> = (0..half)
            .map(|i| p as f64 * theta.powf(-2.0 * i as f64 / rope_dim as f64))
            .collect();
        table.extend(angles.iter().map(|a| a.cos() as f32));
        table.extend(angles.iter().map(|a| a.sin() as f32));
    }
    table
}
