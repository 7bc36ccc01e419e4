//! FP8 KV-cache quantization (DeepSeek-V3.2's sparse-decode cache layout, 656 bytes per token).
//!
//! kv [n, 576] (bf16 or f32: 512 latent + 64 rope) → cache [n, 656] bytes:
//!   bytes 0..512    e4m3 latent, e = round-to-nearest-even(x / scale_g), g = i / 128
//!   bytes 512..528  4 little-endian f32 scales, scale_g = 2^ceil(log2(amax_g / 448)) (1 for an all-zero group)
//!   bytes 528..656  the 64 rope values as bf16
//! Exact: the bytes must equal the reference quantizer's. One cube of 128 units per token; unit u writes
//! latent word u (elements 4u..4u+3, group u / 32).
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::format::{e4m3_group_scale, f32_to_bf16, f32_to_e4m3, read_element};
use nsa_dsl::{Format, host};

const UNITS: u32 = 128;
/// 32-bit words per cached token: 128 latent, 4 scales, 32 rope.
pub const TOKEN_WORDS: usize = 164;

pub const VARIANTS: &[Variant] = &[Variant {
    name: "word_per_unit",
    summary: "one latent word (4 codes) per unit",
    needs_plane_ops: false,
}];

#[cube(launch)]
fn fp8_kv_quantize_kernel(kv: &[u32], cache: &mut [u32], n: usize, #[comptime] format: Format) {
    let token = CUBE_POS;
    if token >= n {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let row = token * 576;
    let mut amax_smem = Shared::<[f32]>::new_slice(UNITS as usize);
    let mut values = Array::<f32>::new(4usize);
    let mut amax = 0.0f32;
    #[unroll]
    for i in 0..4u32 {
        let value = read_element(kv, row + unit * 4 + i as usize, format);
        values[i as usize] = value;
        amax = f32::max(amax, f32::abs(value));
    }
    amax_smem[unit] = amax;
    sync_cube();
    // The group's absolute maximum: its 32 units' partial maxima.
    let group = unit / 32;
    let mut group_amax = 0.0f32;
    for j in 0..32usize {
        group_amax = f32::max(group_amax, amax_smem[group * 32 + j]);
    }
    let scale = e4m3_group_scale(group_amax);
    // 1/scale from the exponent bits: exact, where a division might not be under fast math.
    let inverse = f32::reinterpret((254u32 - (u32::reinterpret(scale) >> 23)) << 23);
    let mut word = 0u32;
    #[unroll]
    for i in 0..4u32 {
        word |= f32_to_e4m3(values[i as usize] * inverse) << (8 * i);
    }
    let base = token * 164;
    cache[base + unit] = word;
    if unit % 32 == 0 {
        cache[base + 128 + group] = u32::reinterpret(scale);
    }
    if unit < 32 {
        let lo = read_element(kv, row + 512 + 2 * unit, format);
        let hi = read_element(kv, row + 512 + 2 * unit + 1, format);
        cache[base + 132 + unit] = f32_to_bf16(lo) | (f32_to_bf16(hi) << 16);
    }
}

/// The reference quantizer: one token's 576 values (as stored) → its 656 cache bytes.
pub fn quantize_token(values: &[f64]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(656);
    let mut scales = Vec::new();
    for group in values[..512].chunks(128) {
        let amax = group.iter().fold(0.0f32, |m, v| m.max(v.abs() as f32));
        let scale = host::e4m3_group_scale(amax);
        scales.push(scale);
        bytes.extend(group.iter().map(|v| host::f32_to_e4m3(*v as f32 / scale)));
    }
    bytes.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
    bytes.extend(
        values[512..576]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v as f32).to_le_bytes()),
    );
    bytes
}

const INPUTS: &[TensorSpec] = &[TensorSpec::new("kv", &["n", "d_qk"], Storage::Problem)];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("cache", &["n", "token_bytes"], Storage::U8)];

pub struct Fp8KvQuantize;

impl Kernel for Fp8KvQuantize {
    fn name(&self) -> &'static str {
        "fp8_kv_quantize"
    }
    fn summary(&self) -> &'static str {
        "kv [n, 576] → FP8 cache [n, 656]: e4m3 latent, 4 power-of-two scales, bf16 rope"
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
        &[]
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            for n in [1, 37, 300] {
                problems.push(Problem::new(
                    format,
                    &[("n", n), ("d_qk", 576), ("token_bytes", 656)],
                    &[],
                ));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // One prefill chunk of 16K tokens written into the cache.
        vec![Problem::new(
            Format::Bf16,
            &[("n", 16384), ("d_qk", 576), ("token_bytes", 656)],
            &[],
        )]
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &[("n", 64), ("d_qk", 576), ("token_bytes", 656)], &[])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        if problem.dim("d_qk") != 576 {
            return Err(KernelError::InvalidProblem {
                kernel: self.name(),
                field: "d_qk",
                expected: "576 (512 latent + 64 rope)".into(),
                got: problem.dim("d_qk").to_string(),
            });
        }
        Ok(())
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // |x|, max, scale, round: ~4 per element.
        4 * 576 * problem.dim("n") as u64
    }
    fn tolerance(&self, _: &TensorSpec, _: &Problem) -> f64 {
        0.0
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        use rand::Rng;
        // Normal values over a wide range of group magnitudes (1e-4 .. 1e3), one all-zero group, and
        // values sitting exactly on e4m3 rounding ties after scaling.
        let n = problem.dim("n");
        let mut values = crate::check::normal(rng, n * 576);
        for (t, row) in values.chunks_mut(576).enumerate() {
            for (g, group) in row[..512].chunks_mut(128).enumerate() {
                let magnitude = 10f32.powi(rng.random_range(-4..=3));
                group.iter_mut().for_each(|v| *v *= magnitude);
                if t % 7 == 3 && g == 1 {
                    group.iter_mut().for_each(|v| *v = 0.0);
                }
                if t % 5 == 2 && g == 2 {
                    // amax 448 → scale 1: the other values become exact midpoints between e4m3 codes.
                    group[0] = 448.0;
                    for (i, v) in group.iter_mut().enumerate().skip(1) {
                        *v = 1.0 + (2 * (i % 8) + 1) as f32 / 16.0;
                    }
                }
            }
        }
        vec![HostTensor::from_f32(
            "kv",
            &[n, 576],
            crate::DType::of(problem.format),
            &values,
        )]
    }
    fn reference(&self, _: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let values = inputs[0].to_f64();
        vec![values.chunks(576).flat_map(quantize_token).map(|b| b as f64).collect()]
    }
    fn launch(&self, _: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let n = problem.dim("n");
        fp8_kv_quantize_kernel::launch(
            &device.client,
            grid(n),
            CubeDim::new_1d(UNITS),
            buffer(&inputs[0], n * 576 / problem.format.per_word() as usize),
            buffer(&outputs[0], n * TOKEN_WORDS),
            n,
            problem.format,
        );
    }
    fn define(&self, _: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        fp8_kv_quantize_kernel::Fp8KvQuantizeKernel::new(
            ir_settings(CubeDim::new_1d(UNITS)),
            props,
            target_props,
            slice_arg(),
            slice_arg(),
            (),
            problem.format,
        )
        .define()
    }
}
