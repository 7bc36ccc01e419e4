//! Casts between f32 rows and the problem's format, for caches kept narrower than the model computes
//! (the server's `--kv-cache-dtype bf16` store): `cast_rows` narrows x [n, d] f32 into y [n, d] (bf16:
//! round to nearest even, as the model's own bf16 casts; NaN stays NaN), `widen_rows` widens y back to f32
//! (exact). For f32 both copy. One unit per storage word of y (d even for bf16).
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::{pack, unpack};

const UNITS: u32 = 256;

pub const VARIANTS: &[Variant] = &[Variant {
    name: "word_per_unit",
    summary: "one storage word of the narrow side per unit",
    needs_plane_ops: false,
}];

#[cube(launch)]
fn cast_rows_kernel(x: &[u32], y: &mut [u32], words: usize, #[comptime] format: Format) {
    let w = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    if w >= words {
        terminate!();
    }
    match format {
        Format::F32 => y[w] = x[w],
        Format::Bf16 => y[w] = pack(f32::reinterpret(x[2 * w]), f32::reinterpret(x[2 * w + 1]), format),
    }
}

#[cube(launch)]
fn widen_rows_kernel(y: &[u32], x: &mut [u32], words: usize, #[comptime] format: Format) {
    let w = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    if w >= words {
        terminate!();
    }
    match format {
        Format::F32 => x[w] = y[w],
        Format::Bf16 => {
            let word = y[w];
            x[2 * w] = u32::reinterpret(unpack(word, 0u32, format));
            x[2 * w + 1] = u32::reinterpret(unpack(word, 1u32, format));
        }
    }
}

/// Storage words of the narrow side.
fn words(problem: &Problem) -> usize {
    problem.dim("n") * problem.dim("d") / problem.format.per_word() as usize
}

/// `value` as the problem's format holds it.
fn stored(value: f64, format: Format) -> f64 {
    match format {
        Format::F32 => value as f32 as f64,
        Format::Bf16 => half::bf16::from_f32(value as f32).to_f64(),
    }
}

/// `cast_rows` (f32 rows → the problem's format) or `widen_rows` (back to f32): one implementation, the
/// direction a field.
pub struct RowCast {
    widen: bool,
}

pub const CAST_ROWS: RowCast = RowCast { widen: false };
pub const WIDEN_ROWS: RowCast = RowCast { widen: true };

const NARROW: &[TensorSpec] = &[TensorSpec::new("y", &["n", "d"], Storage::Problem)];
const WIDE: &[TensorSpec] = &[TensorSpec::new("x", &["n", "d"], Storage::F32)];

impl Kernel for RowCast {
    fn name(&self) -> &'static str {
        if self.widen { "widen_rows" } else { "cast_rows" }
    }
    fn summary(&self) -> &'static str {
        if self.widen {
            "y [n, d] in the problem's format → x [n, d] f32 (exact)"
        } else {
            "x [n, d] f32 → y [n, d] in the problem's format (bf16: round to nearest even)"
        }
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        if self.widen { NARROW } else { WIDE }
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        if self.widen { WIDE } else { NARROW }
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        &[]
    }
    fn problems(&self) -> Vec<Problem> {
        // The KV row (576), an indexer key (128), a ragged width.
        Format::ALL
            .into_iter()
            .flat_map(|format| [(1, 576), (37, 576), (5, 128), (3, 250)].map(|(n, d)| (format, n, d)))
            .map(|(format, n, d)| Problem::new(format, &[("n", n), ("d", d)], &[]))
            .collect()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &[("n", 64), ("d", 576)], &[])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        crate::spec::whole_words(self.name(), "d", problem)
    }
    fn flops(&self, problem: &Problem) -> u64 {
        (problem.dim("n") * problem.dim("d")) as u64
    }
    fn tolerance(&self, _: &TensorSpec, _: &Problem) -> f64 {
        0.0
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let values = inputs[0].to_f64();
        if self.widen {
            return vec![values];
        }
        vec![values.into_iter().map(|v| stored(v, problem.format)).collect()]
    }
    fn launch(&self, _: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (words, n_d) = (words(problem), problem.dim("n") * problem.dim("d"));
        let (count, cube) = (grid(words.div_ceil(UNITS as usize)), CubeDim::new_1d(UNITS));
        if self.widen {
            let (y, x) = (buffer(&inputs[0], words), buffer(&outputs[0], n_d));
            widen_rows_kernel::launch(&device.client, count, cube, y, x, words, problem.format);
        } else {
            let (x, y) = (buffer(&inputs[0], n_d), buffer(&outputs[0], words));
            cast_rows_kernel::launch(&device.client, count, cube, x, y, words, problem.format);
        }
    }
    fn define(&self, _: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        let settings = ir_settings(CubeDim::new_1d(UNITS));
        let (a, b, format) = (slice_arg(), slice_arg(), problem.format);
        if self.widen {
            widen_rows_kernel::WidenRowsKernel::new(settings, props, target_props, a, b, (), format).define()
        } else {
            cast_rows_kernel::CastRowsKernel::new(settings, props, target_props, a, b, (), format).define()
        }
    }
}
