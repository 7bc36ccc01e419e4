//! FP8 block-scaled GEMM in DeepSeek-V3's checkpoint format.
//!
//! a [m, k] e4m3 with a_scales [m, k / 128] f32 (per token and 128-wide group, as `fp8_act_quant` writes),
//! b [n, k] e4m3 (a linear layer's `weight`) with b_scales [⌈n / 128⌉, k / 128] f32 (`weight_scale_inv`)
//! → c [m, n] (bf16 or f32): c[i, j] = Σ_g a_scales[i, g] · b_scales[j / 128, g] · Σ_{k ∈ g} a[i, k]·b[j, k],
//! each group's sum accumulated in f32 and then scaled (DeepSeek's promotion per K block). k a multiple of 128.
//! Variants: `simt` (one unit per output, everywhere) and `mma` (CUDA: 128 × 128 tiles, e4m3 widened to f16
//! exactly in shared memory, m16n8k16 f16 multiplies; n a multiple of 128) and `wgmma` (Hopper: e4m3
//! warpgroup multiplies from swizzled tiles, see [`crate::fp8_gemm_wgmma`]).
use crate::fp8_act::{quantize_group, quantize_weight_blocks};
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{DType, HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::f16;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::format::{e4m3x4_dot_add, e4m3x8_to_f16_chunk, pack};
use nsa_dsl::warp_mma::{AccPair, b_tile, load_x4, mma_into};
use nsa_dsl::{Format, host};

const GROUP: usize = 128;
/// The `mma` variant's output tile (rows and columns) and its shared-memory row: 16 chunks + 1 of padding.
const TILE: usize = 128;
const ROW_CHUNKS: usize = GROUP / 8 + 1;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "wgmma",
        summary: "128 × 128 tiles, 2 warpgroups of e4m3 wgmma m64n128k32, 4-stage cp.async pipeline (Hopper)",
        needs_plane_ops: true,
    },
    Variant {
        name: "mma",
        summary: "128 × 128 tiles, 8 planes of 32 × 64, f16 mma.sync on widened e4m3 (CUDA)",
        needs_plane_ops: true,
    },
    Variant {
        name: "simt",
        summary: "one unit per output element",
        needs_plane_ops: false,
    },
];

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn fp8_gemm_simt_kernel(
    a: &[u32],
    a_scales: &[f32],
    b: &[u32],
    b_scales: &[f32],
    c: &mut [u32],
    m: usize,
    n: usize,
    k: usize,
    #[comptime] format: Format,
) {
    let per_word = comptime!(format.per_word() as usize);
    let words_per_row = n / per_word;
    let w = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    if w >= m * words_per_row {
        terminate!();
    }
    let (i, j0) = (w / words_per_row, (w % words_per_row) * per_word);
    let groups = k / GROUP;
    let mut out = Array::<f32>::new(2usize);
    #[unroll]
    for e in 0..2usize {
        out[e] = 0.0f32;
        let j = j0 + e;
        if e < per_word {
            for gi in 0..groups {
                let mut sum = 0.0f32;
                for word in 0..comptime!(GROUP / 4) {
                    sum = e4m3x4_dot_add(
                        sum,
                        a[(i * k + gi * GROUP) / 4 + word],
                        b[(j * k + gi * GROUP) / 4 + word],
                    );
                }
                out[e] += sum * a_scales[i * groups + gi] * b_scales[(j / GROUP) * groups + gi];
            }
        }
    }
    c[w] = pack(out[0], out[1], format);
}

/// Stages rows `row0..row0 + 128` (of `rows`) of group `gi` of an e4m3 [rows, k] matrix as f16 chunks
/// (value × 2⁻⁸; rows past the end zero).
#[cube]
fn stage_tile(
    source: &[Vector<u32, Const<4>>],
    tile: &mut [Vector<u32, Const<4>>],
    row0: usize,
    rows: usize,
    k: usize,
    gi: usize,
) {
    // 128 rows × 8 source chunks of 16 bytes (16 values each, two f16 chunks).
    let mut i = UNIT_POS as usize;
    while i < comptime!(TILE * GROUP / 16) {
        let (r, c) = (i / 8, i % 8);
        let mut lo = Vector::<u32, Const<4>>::new(0u32);
        let mut hi = Vector::<u32, Const<4>>::new(0u32);
        if row0 + r < rows {
            let words = source[((row0 + r) * k + gi * GROUP) / 16 + c];
            lo = e4m3x8_to_f16_chunk(words.extract(0usize), words.extract(1usize));
            hi = e4m3x8_to_f16_chunk(words.extract(2usize), words.extract(3usize));
        }
        tile[r * ROW_CHUNKS + 2 * c] = lo;
        tile[r * ROW_CHUNKS + 2 * c + 1] = hi;
        i += CUBE_DIM as usize;
    }
}

/// Tensor-core variant: cube (tm, tn) computes c[128·tm.., 128·tn..]; plane p covers rows 32·(p % 4) and
/// columns 64·(p / 4) of the tile: 2 × 8 accumulator tiles for the current K group, folded into the
/// output accumulators with the group's scales.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn fp8_gemm_mma_kernel(
    a: &[Vector<u32, Const<4>>],
    a_scales: &[f32],
    b: &[Vector<u32, Const<4>>],
    b_scales: &[f32],
    c: &mut [u32],
    m: usize,
    n: usize,
    k: usize,
) {
    let col_tiles = n / TILE;
    let tm = CUBE_POS / col_tiles;
    let tn = CUBE_POS % col_tiles;
    if tm * TILE >= m {
        terminate!();
    }
    let groups = k / GROUP;
    let plane = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let (pm, pn) = (plane % 4, plane / 4);
    let mut a_s = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(comptime!(TILE * ROW_CHUNKS), 16usize);
    let mut b_s = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(comptime!(TILE * ROW_CHUNKS), 16usize);
    let mut out = Array::<AccPair>::new(32usize);
    #[unroll]
    for i in 0..32usize {
        out[i] = AccPair::new(0.0f32);
    }
    let a_row = (pm * 32 + lane % 16) * ROW_CHUNKS + lane / 16;
    let b_row = (pn * 64 + lane % 8 + 8 * (lane / 16)) * ROW_CHUNKS + (lane / 8) % 2;

    for gi in 0..groups {
        stage_tile(a, &mut a_s, tm * TILE, m, k, gi);
        stage_tile(b, &mut b_s, tn * TILE, n, k, gi);
        sync_cube();
        let mut acc = Array::<AccPair>::new(32usize);
        #[unroll]
        for i in 0..32usize {
            acc[i] = AccPair::new(0.0f32);
        }
        #[unroll]
        for ks in 0..comptime!(GROUP / 16) {
            let a0 = load_x4::<f16, Const<4>>(&a_s, a_row + 2 * ks, false);
            let a1 = load_x4::<f16, Const<4>>(&a_s, a_row + 16 * ROW_CHUNKS + 2 * ks, false);
            #[unroll]
            for nb in 0..4usize {
                let bb = load_x4::<f16, Const<4>>(&b_s, b_row + nb * 16 * ROW_CHUNKS + 2 * ks, false);
                // Tile index: (m16 tile) · 8 + n8 tile.
                mma_into(&mut acc, 2 * nb, &a0, &b_tile(&bb, 0usize));
                mma_into(&mut acc, 2 * nb + 1, &a0, &b_tile(&bb, 2usize));
                mma_into(&mut acc, 8 + 2 * nb, &a1, &b_tile(&bb, 0usize));
                mma_into(&mut acc, 8 + 2 * nb + 1, &a1, &b_tile(&bb, 2usize));
            }
        }
        // out += acc · a_scale[row] · b_scale · 2¹⁶ (the two 2⁻⁸ factors of the f16 widening).
        let b_scale = b_scales[tn * groups + gi] * 65536.0f32;
        #[unroll]
        for mt in 0..2usize {
            #[unroll]
            for r in 0..2usize {
                let row = tm * TILE + pm * 32 + mt * 16 + g + 8 * r;
                let row_scale = select(row < m, a_scales[select(row < m, row, 0usize) * groups + gi], 0.0f32) * b_scale;
                #[unroll]
                for nt in 0..8usize {
                    let i = 2 * (mt * 8 + nt) + r;
                    out[i] = out[i] + acc[i] * AccPair::new(row_scale);
                }
            }
        }
        sync_cube();
    }
    // c as bf16 pairs: row g (+ 8), columns 2t, 2t + 1 of each n8 tile.
    #[unroll]
    for mt in 0..2usize {
        #[unroll]
        for r in 0..2usize {
            let row = tm * TILE + pm * 32 + mt * 16 + g + 8 * r;
            if row < m {
                #[unroll]
                for nt in 0..8usize {
                    let value = out[2 * (mt * 8 + nt) + r];
                    let column = tn * TILE + pn * 64 + nt * 8 + 2 * t;
                    c[(row * n + column) / 2] = pack(value.extract(0usize), value.extract(1usize), Format::Bf16);
                }
            }
        }
    }
}

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("a", &["m", "k"], Storage::U8),
    TensorSpec::new("a_scales", &["m", "k_groups"], Storage::F32),
    TensorSpec::new("b", &["n", "k"], Storage::U8),
    TensorSpec::new("b_scales", &["n_groups", "k_groups"], Storage::F32),
];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("c", &["m", "n"], Storage::Problem)];

fn dims(m: usize, n: usize, k: usize) -> Vec<(&'static str, usize)> {
    vec![
        ("m", m),
        ("n", n),
        ("k", k),
        ("k_groups", k / GROUP),
        ("n_groups", n.div_ceil(GROUP)),
    ]
}

pub struct Fp8Gemm;

impl Kernel for Fp8Gemm {
    fn name(&self) -> &'static str {
        "fp8_gemm"
    }
    fn summary(&self) -> &'static str {
        "c = (a · a_scales)(b · b_scales)ᵀ: e4m3 with per-token-group and 128 × 128 block scales"
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
        // bench: 1 draws random codes and scales directly (hundreds of millions of weights).
        &[("bench", 0.0)]
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // (m, n, k): a partial row tile, one token, several column tiles and K groups, odd n (simt), two row
            // tiles over 8 K groups (twice round the wgmma pipeline's stages).
            for (m, n, k) in [
                (5, 256, 512),
                (1, 384, 128),
                (70, 256, 256),
                (3, 130, 256),
                (200, 256, 1024),
            ] {
                problems.push(Problem::new(format, &dims(m, n, k), &[("bench", 0.0)]));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        vec![Problem::new(Format::Bf16, &dims(4096, 7168, 7168), &[("bench", 1.0)])]
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &dims(4096, 7168, 7168), &[("bench", 1.0)])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        let (n, k) = (problem.dim("n"), problem.dim("k"));
        if k == 0 || k % GROUP != 0 || n == 0 || n % problem.format.per_word() as usize != 0 {
            return Err(KernelError::InvalidProblem {
                kernel: "fp8_gemm",
                field: "k",
                expected: "k a positive multiple of 128 and n a positive multiple of the output's values per word"
                    .into(),
                got: format!("k {k}, n {n}"),
            });
        }
        if problem.dim("k_groups") != k / GROUP || problem.dim("n_groups") != n.div_ceil(GROUP) {
            return Err(KernelError::InvalidProblem {
                kernel: "fp8_gemm",
                field: "k_groups",
                expected: "scales of [m, k / 128] and [⌈n / 128⌉, k / 128]".into(),
                got: format!(
                    "k_groups {}, n_groups {}",
                    problem.dim("k_groups"),
                    problem.dim("n_groups")
                ),
            });
        }
        Ok(())
    }
    fn requirements(&self, variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
        if variant.name == "wgmma" {
            crate::spec::needs_wgmma(features)?;
            if problem.format != Format::Bf16 || !problem.dim("n").is_multiple_of(TILE) {
                return Err(format!(
                    "needs bf16 output and n a multiple of 128, got {} n={}",
                    problem.format,
                    problem.dim("n")
                ));
            }
        }
        if variant.name == "mma" {
            if !features.mma_m16n8k16_bf16 || features.plane_size != 32 {
                return Err("needs warp mma.sync m16n8k16 (CUDA)".into());
            }
            if problem.format != Format::Bf16 || !problem.dim("n").is_multiple_of(TILE) {
                return Err(format!(
                    "needs bf16 output and n a multiple of 128, got {} n={}",
                    problem.format,
                    problem.dim("n")
                ));
            }
        }
        Ok(())
    }
    fn supports_target(&self, variant: &Variant, target: IrTarget) -> bool {
        variant.name == "simt" || target == IrTarget::Cuda
    }
    fn fp8_math(&self, variant: &Variant) -> bool {
        variant.name == "wgmma"
    }
    fn supports_format(&self, variant: &Variant, format: Format) -> bool {
        variant.name == "simt" || format == Format::Bf16
    }
    fn shared_memory_bytes(&self, variant: &Variant, _: &Problem) -> usize {
        match variant.name {
            "mma" => 2 * 16 * TILE * ROW_CHUNKS,
            "wgmma" => crate::fp8_gemm_wgmma::shared_memory_bytes(),
            _ => 0,
        }
    }
    fn flops(&self, problem: &Problem) -> u64 {
        2 * (problem.dim("m") * problem.dim("n") * problem.dim("k")) as u64
    }
    fn tolerance(&self, _: &TensorSpec, problem: &Problem) -> f64 {
        // f32 sums (exact products), then the output's rounding: 2⁻⁸ relative for bf16.
        match problem.format {
            Format::Bf16 => 4e-3,
            Format::F32 => 1e-5,
        }
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        use rand::Rng;
        let (m, n, k) = (problem.dim("m"), problem.dim("n"), problem.dim("k"));
        let (kg, ng) = (k / GROUP, n.div_ceil(GROUP));
        if problem.param("bench") != 0.0 {
            let codes = |len: usize, rng: &mut rand::rngs::StdRng| -> Vec<u8> {
                (0..len).map(|_| rng.random::<u8>() & 0xf6).collect()
            };
            let (a, b) = (codes(m * k, rng), codes(n * k, rng));
            return vec![
                HostTensor::from_u8("a", &[m, k], &a),
                HostTensor::from_f32("a_scales", &[m, kg], DType::F32, &vec![1.0 / 64.0; m * kg]),
                HostTensor::from_u8("b", &[n, k], &b),
                HostTensor::from_f32("b_scales", &[ng, kg], DType::F32, &vec![1.0 / 256.0; ng * kg]),
            ];
        }
        // Activations quantized per token and group; weights per 128 × 128 block (amax / 448 each).
        let x = crate::check::normal(rng, m * k);
        let (mut a, mut a_scales) = (Vec::new(), Vec::new());
        for group in x.chunks(GROUP) {
            let (bytes, scale) = quantize_group(group, false);
            a.extend(bytes);
            a_scales.push(scale);
        }
        let w: Vec<f32> = crate::check::normal(rng, n * k).iter().map(|v| v * 0.05).collect();
        let (b, b_scales) = quantize_weight_blocks(&w, 1, n, k);
        vec![
            HostTensor::from_u8("a", &[m, k], &a),
            HostTensor::from_f32("a_scales", &[m, kg], DType::F32, &a_scales),
            HostTensor::from_u8("b", &[n, k], &b),
            HostTensor::from_f32("b_scales", &[ng, kg], DType::F32, &b_scales),
        ]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (m, n, k) = (problem.dim("m"), problem.dim("n"), problem.dim("k"));
        let kg = k / GROUP;
        let decode = |t: &HostTensor| -> Vec<f64> {
            host::words_to_bytes(&t.words)
                .iter()
                .map(|b| host::e4m3_to_f32(*b) as f64)
                .collect()
        };
        let (a, b) = (decode(&inputs[0]), decode(&inputs[2]));
        let (sa, sb) = (inputs[1].to_f64(), inputs[3].to_f64());
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..kg)
                    .map(|g| {
                        let dot: f64 = (g * GROUP..(g + 1) * GROUP).map(|x| a[i * k + x] * b[j * k + x]).sum();
                        dot * sa[i * kg + g] * sb[(j / GROUP) * kg + g]
                    })
                    .sum();
            }
        }
        vec![c]
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (m, n, k) = (problem.dim("m"), problem.dim("n"), problem.dim("k"));
        let (kg, ng) = (k / GROUP, n.div_ceil(GROUP));
        if variant.name == "wgmma" {
            return crate::fp8_gemm_wgmma::launch(device, problem, inputs, outputs);
        }
        if variant.name == "mma" {
            return fp8_gemm_mma_kernel::launch(
                &device.client,
                grid(m.div_ceil(TILE) * (n / TILE)),
                CubeDim::new_1d(256),
                buffer(&inputs[0], m * k / 16),
                buffer(&inputs[1], m * kg),
                buffer(&inputs[2], n * k / 16),
                buffer(&inputs[3], ng * kg),
                buffer(&outputs[0], m * n / 2),
                m,
                n,
                k,
            );
        }
        let words = m * n / problem.format.per_word() as usize;
        fp8_gemm_simt_kernel::launch(
            &device.client,
            grid(words.div_ceil(128)),
            CubeDim::new_1d(128),
            buffer(&inputs[0], m * k / 4),
            buffer(&inputs[1], m * kg),
            buffer(&inputs[2], n * k / 4),
            buffer(&inputs[3], ng * kg),
            buffer(&outputs[0], words),
            m,
            n,
            k,
            problem.format,
        );
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        let a = slice_arg;
        if variant.name == "wgmma" {
            return crate::fp8_gemm_wgmma::define(target);
        }
        if variant.name == "mma" {
            return fp8_gemm_mma_kernel::Fp8GemmMmaKernel::new(
                ir_settings(CubeDim::new_1d(256)),
                props,
                target_props,
                a(),
                a(),
                a(),
                a(),
                a(),
                (),
                (),
                (),
            )
            .define();
        }
        fp8_gemm_simt_kernel::Fp8GemmSimtKernel::new(
            ir_settings(CubeDim::new_1d(128)),
            props,
            target_props,
            a(),
            a(),
            a(),
            a(),
            a(),
            (),
            (),
            (),
            problem.format,
        )
        .define()
    }
}
