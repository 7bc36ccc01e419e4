//! FP8 activation quantization in groups of 128 (DeepSeek-V3's `act_quant`, the input side of its FP8
//! block GEMMs).
//!
//! x [tokens, hidden] (bf16 or f32; hidden a multiple of 128) → q [tokens, hidden] e4m3 bytes and scales
//! [tokens, hidden / 128] f32, per group: s = max(amax, 10⁻⁴) / 448, rounded up to a power of two with
//! `ue8m0` = 1 (DeepSeek-V3.2's scale format), and q = e4m3(x / s) rounded to nearest even (|x / s| ≤ 448).
//! Exact: bytes and scales must equal the reference's.
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{DType, HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::format::{f32_to_e4m3, read_element};
use nsa_dsl::{Format, host};

const UNITS: u32 = 256;
const GROUP: usize = 128;

pub const VARIANTS: &[Variant] = &[Variant {
    name: "word_per_unit",
    summary: "four values (one output word) per unit, a group per 32 units",
    needs_plane_ops: false,
}];

/// `s` rounded up to a power of two (s normal and positive), from its bits.
#[cube]
fn round_up_pow2(s: f32) -> f32 {
    let bits = u32::reinterpret(s);
    f32::reinterpret(((bits >> 23) + u32::cast_from((bits & 0x7f_ffff) != 0)) << 23)
}

#[cube(launch)]
fn fp8_act_quant_kernel(
    x: &[u32],
    q: &mut [u32],
    scales: &mut [f32],
    tokens: usize,
    hidden: usize,
    #[comptime] format: Format,
    #[comptime] ue8m0: bool,
) {
    let token = CUBE_POS;
    if token >= tokens {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let mut amax_smem = Shared::<[f32]>::new_slice(UNITS as usize);
    let mut values = Array::<f32>::new(4usize);
    let mut chunk = 0usize;
    while chunk < hidden {
        let e = chunk + unit * 4;
        let active = e < hidden;
        let mut amax = 0.0f32;
        #[unroll]
        for i in 0..4usize {
            values[i] = 0.0f32;
            if active {
                values[i] = read_element(x, token * hidden + e + i, format);
            }
            amax = f32::max(amax, f32::abs(values[i]));
        }
        amax_smem[unit] = amax;
        sync_cube();
        // The group's absolute maximum over its 32 units.
        let group = unit / 32;
        let mut group_amax = 0.0f32;
        for j in 0..32usize {
            group_amax = f32::max(group_amax, amax_smem[group * 32 + j]);
        }
        let mut scale = f32::max(group_amax, 0.0001f32) / 448.0f32;
        if comptime!(ue8m0) {
            scale = round_up_pow2(scale);
        }
        if active {
            let mut word = 0u32;
            #[unroll]
            for i in 0..4usize {
                let v = f32::clamp(values[i] / scale, -448.0f32, 448.0f32);
                word |= f32_to_e4m3(v) << (8 * i as u32);
            }
            q[(token * hidden + e) / 4] = word;
            if unit % 32 == 0 {
                scales[token * (hidden / GROUP) + e / GROUP] = scale;
            }
        }
        // Every unit has read the maxima before the next chunk overwrites them.
        sync_cube();
        chunk += comptime!(UNITS as usize * 4);
    }
}

const INPUTS: &[TensorSpec] = &[TensorSpec::new("x", &["tokens", "hidden"], Storage::Problem)];
const OUTPUTS: &[TensorSpec] = &[
    TensorSpec::new("q", &["tokens", "hidden"], Storage::U8),
    TensorSpec::new("scales", &["tokens", "groups"], Storage::F32),
];

fn dims(tokens: usize, hidden: usize) -> Vec<(&'static str, usize)> {
    vec![("tokens", tokens), ("hidden", hidden), ("groups", hidden / GROUP)]
}

/// The reference quantizer of one group, in the kernel's f32 arithmetic: (bytes, scale).
pub fn quantize_group(values: &[f32], ue8m0: bool) -> (Vec<u8>, f32) {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut scale = amax.max(1e-4) / 448.0;
    if ue8m0 {
        scale = 2f64.powi((scale as f64).log2().ceil() as i32) as f32;
    }
    let bytes = values
        .iter()
        .map(|v| host::f32_to_e4m3((v / scale).clamp(-448.0, 448.0)))
        .collect();
    (bytes, scale)
}

/// The reference quantizer of weights (DeepSeek's checkpoint format): `matrices` row-major [rows, cols]
/// matrices in blocks of 128 × 128 (partial at the edges), scale = max(amax, 10⁻⁴) / 448 per block; returns
/// the e4m3 bytes and the scales [matrices, ⌈rows / 128⌉, ⌈cols / 128⌉].
pub fn quantize_weight_blocks(values: &[f32], matrices: usize, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let (row_blocks, col_blocks) = (rows.div_ceil(GROUP), cols.div_ceil(GROUP));
    let mut scales = vec![0f32; matrices * row_blocks * col_blocks];
    let mut bytes = vec![0u8; values.len()];
    // One unit of work: a block row (up to 128 rows of one matrix) with its col_blocks scales. Bench-sized
    // weights (the experts' 10⁸–10⁹ values) are quantized on every core.
    let units: Vec<(&[f32], &mut [u8], &mut [f32])> = values
        .chunks(rows * cols)
        .zip(bytes.chunks_mut(rows * cols))
        .zip(scales.chunks_mut(row_blocks * col_blocks))
        .flat_map(|((v, b), s)| {
            v.chunks(GROUP * cols)
                .zip(b.chunks_mut(GROUP * cols))
                .zip(s.chunks_mut(col_blocks))
                .map(|((v, b), s)| (v, b, s))
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let per_thread = units.len().div_ceil(threads).max(1);
    let mut units = units;
    std::thread::scope(|scope| {
        while !units.is_empty() {
            let batch: Vec<_> = units.drain(..per_thread.min(units.len())).collect();
            scope.spawn(move || {
                for (v, b, s) in batch {
                    quantize_block_row(v, b, s, cols);
                }
            });
        }
    });
    (bytes, scales)
}

/// One block row: each 128-column block's scale (amax / 448) and its values as e4m3 codes.
fn quantize_block_row(values: &[f32], bytes: &mut [u8], scales: &mut [f32], cols: usize) {
    for (cb, scale) in scales.iter_mut().enumerate() {
        let columns = cb * GROUP..((cb + 1) * GROUP).min(cols);
        let amax = values
            .chunks(cols)
            .flat_map(|row| row[columns.clone()].iter())
            .fold(0f32, |m, v| m.max(v.abs()));
        *scale = amax.max(1e-4) / 448.0;
    }
    for (i, (v, b)) in values.iter().zip(bytes.iter_mut()).enumerate() {
        let scale = scales[(i % cols) / GROUP];
        *b = host::f32_to_e4m3((v / scale).clamp(-448.0, 448.0));
    }
}

pub struct Fp8ActQuant;

impl Kernel for Fp8ActQuant {
    fn name(&self) -> &'static str {
        "fp8_act_quant"
    }
    fn summary(&self) -> &'static str {
        "x → e4m3 bytes and one f32 scale per 128 values (amax / 448, optionally a power of two)"
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
        // ue8m0: 1 rounds scales up to powers of two (DeepSeek-V3.2), 0 keeps amax / 448.
        &[("ue8m0", 1.0)]
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // (tokens, hidden): the model's 7168, a width that leaves a partial 1024-value chunk, one group.
            for (tokens, hidden, ue8m0) in [(3, 7168, 1.0), (5, 1152, 0.0), (4, 128, 1.0), (2, 2048, 0.0)] {
                problems.push(Problem::new(format, &dims(tokens, hidden), &[("ue8m0", ue8m0)]));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        [256, 8192]
            .into_iter()
            .map(|tokens| Problem::new(Format::Bf16, &dims(tokens, 7168), &[("ue8m0", 1.0)]))
            .collect()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &dims(4, 7168), &[("ue8m0", 1.0)])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        let hidden = problem.dim("hidden");
        if hidden == 0 || !hidden.is_multiple_of(GROUP) || problem.dim("groups") != hidden / GROUP {
            return Err(KernelError::InvalidProblem {
                kernel: "fp8_act_quant",
                field: "hidden",
                expected: "a positive multiple of 128, with groups = hidden / 128".into(),
                got: format!("hidden {hidden}, groups {}", problem.dim("groups")),
            });
        }
        Ok(())
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // abs·max, divide, clamp, encode: ~4 per value.
        4 * (problem.dim("tokens") * problem.dim("hidden")) as u64
    }
    fn tolerance(&self, _: &TensorSpec, _: &Problem) -> f64 {
        0.0
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let (tokens, hidden) = (problem.dim("tokens"), problem.dim("hidden"));
        // Normal values with a few outliers (activations have them) and one all-zero group.
        let mut values: Vec<f32> = crate::check::normal(rng, tokens * hidden)
            .iter()
            .enumerate()
            .map(|(i, v)| if i % 997 == 5 { v * 60.0 } else { *v })
            .collect();
        values[..GROUP].iter_mut().for_each(|v| *v = 0.0);
        vec![HostTensor::from_f32(
            "x",
            &[tokens, hidden],
            DType::of(problem.format),
            &values,
        )]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let ue8m0 = problem.param("ue8m0") != 0.0;
        let x: Vec<f32> = inputs[0].to_f64().iter().map(|v| *v as f32).collect();
        let (mut bytes, mut scales) = (Vec::new(), Vec::new());
        for group in x.chunks(GROUP) {
            let (b, s) = quantize_group(group, ue8m0);
            bytes.extend(b.iter().map(|b| *b as f64));
            scales.push(s as f64);
        }
        vec![bytes, scales]
    }
    fn launch(&self, _: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (tokens, hidden) = (problem.dim("tokens"), problem.dim("hidden"));
        let per_word = problem.format.per_word() as usize;
        fp8_act_quant_kernel::launch(
            &device.client,
            grid(tokens),
            CubeDim::new_1d(UNITS),
            buffer(&inputs[0], tokens * hidden / per_word),
            buffer(&outputs[0], tokens * hidden / 4),
            buffer(&outputs[1], tokens * hidden / GROUP),
            tokens,
            hidden,
            problem.format,
            problem.param("ue8m0") != 0.0,
        );
    }
    fn define(&self, _: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        fp8_act_quant_kernel::Fp8ActQuantKernel::new(
            ir_settings(CubeDim::new_1d(UNITS)),
            props,
            target_props,
            slice_arg(),
            slice_arg(),
            slice_arg(),
            (),
            (),
            problem.format,
            problem.param("ue8m0") != 0.0,
        )
        .define()
    }
}
