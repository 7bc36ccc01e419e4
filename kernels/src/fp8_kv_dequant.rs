//! FP8 KV-cache dequantization: the inverse of `fp8_kv_quantize`, cache [n, 656] bytes → kv [n, 576].
//!
//! SGLang's `flashmla_sparse` prefill over an FP8 cache first widens the cached tokens to bf16 and then runs
//! the bf16 sparse kernel; this is that first step (the autotuner times it as part of that strategy).
//! Exact: an e4m3 code times a power-of-two scale has at most 4 significant bits, and the rope part is
//! stored as bf16, so both output formats hold every value exactly. One cube of 128 units per token;
//! unit u widens latent word u (codes 4u..4u+3, group u / 32); units 0..32 copy the rope.
use crate::fp8_kv::{TOKEN_WORDS, quantize_token};
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::format::{bf16_to_f32, e4m3_to_f32, pack};
use nsa_dsl::{Format, host};

const UNITS: u32 = 128;

pub const VARIANTS: &[Variant] = &[Variant {
    name: "word_per_unit",
    summary: "one latent word (4 codes) per unit",
    needs_plane_ops: false,
}];

#[cube(launch)]
fn fp8_kv_dequantize_kernel(cache: &[u32], kv: &mut [u32], n: usize, #[comptime] format: Format) {
    let token = CUBE_POS;
    if token >= n {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let base = token * TOKEN_WORDS;
    let word = cache[base + unit];
    let scale = f32::reinterpret(cache[base + 128 + unit / 32]);
    let v0 = e4m3_to_f32(word & 0xff) * scale;
    let v1 = e4m3_to_f32((word >> 8) & 0xff) * scale;
    let v2 = e4m3_to_f32((word >> 16) & 0xff) * scale;
    let v3 = e4m3_to_f32(word >> 24) * scale;
    let rope = cache[base + 132 + (unit % 32)];
    let (r0, r1) = (bf16_to_f32(rope & 0xffff), bf16_to_f32(rope >> 16));
    match format {
        Format::F32 => {
            let row = token * 576;
            kv[row + 4 * unit] = u32::reinterpret(v0);
            kv[row + 4 * unit + 1] = u32::reinterpret(v1);
            kv[row + 4 * unit + 2] = u32::reinterpret(v2);
            kv[row + 4 * unit + 3] = u32::reinterpret(v3);
            if unit < 32 {
                kv[row + 512 + 2 * unit] = u32::reinterpret(r0);
                kv[row + 512 + 2 * unit + 1] = u32::reinterpret(r1);
            }
        }
        Format::Bf16 => {
            let row = token * 288;
            kv[row + 2 * unit] = pack(v0, v1, format);
            kv[row + 2 * unit + 1] = pack(v2, v3, format);
            if unit < 32 {
                kv[row + 256 + unit] = rope;
            }
        }
    }
}

const INPUTS: &[TensorSpec] = &[TensorSpec::new("cache", &["n", "token_bytes"], Storage::U8)];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("kv", &["n", "d_qk"], Storage::Problem)];

fn dims(n: usize) -> Vec<(&'static str, usize)> {
    vec![("n", n), ("d_qk", 576), ("token_bytes", 656)]
}

pub struct Fp8KvDequantize;

impl Kernel for Fp8KvDequantize {
    fn name(&self) -> &'static str {
        "fp8_kv_dequantize"
    }
    fn summary(&self) -> &'static str {
        "FP8 cache [n, 656] → kv [n, 576]: e4m3 latent × its group's scale, bf16 rope (exact)"
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
        Format::ALL
            .into_iter()
            .flat_map(|format| [1, 37, 300].map(|n| Problem::new(format, &dims(n), &[])))
            .collect()
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // A 32K-token context widened for one bf16 sparse prefill.
        vec![Problem::new(Format::Bf16, &dims(32768), &[])]
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &dims(64), &[])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        if problem.dim("d_qk") != 576 || problem.dim("token_bytes") != 656 {
            return Err(KernelError::InvalidProblem {
                kernel: self.name(),
                field: "d_qk",
                expected: "576 values from 656 cache bytes per token".into(),
                got: format!("{} from {}", problem.dim("d_qk"), problem.dim("token_bytes")),
            });
        }
        Ok(())
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // Widen and scale: ~2 per latent element.
        2 * 512 * problem.dim("n") as u64
    }
    fn tolerance(&self, _: &TensorSpec, _: &Problem) -> f64 {
        0.0
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        use rand::Rng;
        let n = problem.dim("n");
        if n > 4096 {
            // Bench-sized caches (the reference quantizer searches codes: minutes at 32K tokens): random
            // non-NaN codes, power-of-two scales 2⁻¹⁰..2⁵, random bf16 rope, drawn in parallel.
            let seed = rng.random::<u64>();
            let mut words = crate::check::fast_random_words(seed, n * TOKEN_WORDS, |z| z as u32 & 0xf6f6_f6f6);
            for (t, token) in words.chunks_mut(TOKEN_WORDS).enumerate() {
                for g in 0..4 {
                    token[128 + g] = (117 + ((t * 4 + g) * 7 % 16) as u32) << 23;
                }
                // Rope pairs: bf16 in ±[0.5, 2).
                token[132..]
                    .iter_mut()
                    .for_each(|w| *w = (*w & 0x807f_807f) | 0x3f00_3f00);
            }
            return vec![HostTensor {
                name: "cache".into(),
                shape: vec![n, 656],
                dtype: crate::DType::U8,
                words,
            }];
        }
        // Real caches: random tokens (groups of magnitudes 1e-4 .. 1e3) through the reference quantizer.
        let mut values: Vec<f64> = crate::check::normal(rng, n * 576).iter().map(|v| *v as f64).collect();
        for row in values.chunks_mut(576) {
            for group in row[..512].chunks_mut(128) {
                let magnitude = 10f64.powi(rng.random_range(-4..=3));
                group.iter_mut().for_each(|v| *v *= magnitude);
            }
        }
        let bytes: Vec<u8> = values.chunks(576).flat_map(quantize_token).collect();
        vec![HostTensor::from_u8("cache", &[n, 656], &bytes)]
    }
    fn reference(&self, _: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let bytes: Vec<u8> = inputs[0].to_f64().iter().map(|b| *b as u8).collect();
        let mut kv = Vec::with_capacity(bytes.len() / 656 * 576);
        for token in bytes.chunks(656) {
            let scale = |g: usize| f32::from_le_bytes(token[512 + 4 * g..][..4].try_into().unwrap()) as f64;
            kv.extend((0..512).map(|i| host::e4m3_to_f32(token[i]) as f64 * scale(i / 128)));
            kv.extend(
                token[528..656]
                    .chunks(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64()),
            );
        }
        vec![kv]
    }
    fn launch(&self, _: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let n = problem.dim("n");
        fp8_kv_dequantize_kernel::launch(
            &device.client,
            grid(n),
            CubeDim::new_1d(UNITS),
            buffer(&inputs[0], n * TOKEN_WORDS),
            buffer(&outputs[0], n * 576 / problem.format.per_word() as usize),
            n,
            problem.format,
        );
    }
    fn define(&self, _: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        fp8_kv_dequantize_kernel::Fp8KvDequantizeKernel::new(
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
