//! The lightning indexer of the tiny DeepSeek-V3.2 checkpoint, recomputed with nsa's kernels (RMSNorm,
//! LayerNorm, NeoX RoPE, indexer logits, top-k) from the golden residual streams, against the scores and
//! top-k sets Hugging Face transformers produced (tests/data/tiny-v32, copied from the team's golden
//! bundle; its README gives the formula). Projections are f64 matrix products on the host.
use nsa_backends::Device;
use nsa_dsl::Format;
use nsa_kernels::{DType, HostTensor, Problem, find_kernel};
use safetensors::SafeTensors;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tiny-v32");
const HIDDEN: usize = 256;
const HEADS: usize = 8;
const HEAD_DIM: usize = 32;
const ROPE_DIM: usize = 16;
const TOPK: usize = 16;

fn tensor(file: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f64>) {
    let view = file
        .tensor(name)
        .unwrap_or_else(|_| panic!("{name} in the golden bundle"));
    let data = view.data();
    let values = match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        safetensors::Dtype::BF16 => data
            .chunks(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        safetensors::Dtype::I32 => data
            .chunks(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        other => panic!("{name}: unexpected {other:?}"),
    };
    (view.shape().to_vec(), values)
}

/// x [n, k] · w[m, k]ᵀ → [n, m], in f64.
fn linear(x: &[f64], w: &[f64], k: usize) -> Vec<f64> {
    let m = w.len() / k;
    x.chunks(k)
        .flat_map(|row| (0..m).map(move |j| row.iter().zip(&w[j * k..][..k]).map(|(a, b)| a * b).sum()))
        .collect()
}

/// Runs a registered kernel on f32 host tensors and returns its first output as f64.
fn run(
    device: &Device,
    name: &str,
    dims: &[(&'static str, usize)],
    params: &[(&'static str, f64)],
    inputs: Vec<HostTensor>,
) -> Vec<f64> {
    let kernel = find_kernel(name).unwrap();
    let problem = Problem::new(Format::F32, dims, params);
    let variant = kernel
        .variants()
        .iter()
        .find(|v| kernel.supports(v, &problem, device.features()).is_ok())
        .unwrap();
    nsa_kernels::check::run(kernel, variant, device, &problem, &inputs)
        .unwrap()
        .remove(0)
        .to_f64()
}

fn f32_tensor(name: &str, shape: &[usize], values: &[f64]) -> HostTensor {
    HostTensor::from_f32(
        name,
        shape,
        DType::F32,
        &values.iter().map(|v| *v as f32).collect::<Vec<_>>(),
    )
}

/// YaRN inverse frequencies as transformers computes them (factor 40, original 4096, β 32/1, θ 10⁴,
/// truncated correction range); the attention factor is 1 since mscale = mscale_all_dim.
fn yarn_inv_freq(dim: usize) -> Vec<f64> {
    let (base, factor, original, beta_fast, beta_slow) = (10000f64, 40f64, 4096f64, 32f64, 1f64);
    let correction =
        |rotations: f64| (dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
    let low = correction(beta_fast).floor().max(0.0);
    let mut high = correction(beta_slow).ceil().min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    (0..dim / 2)
        .map(|i| {
            let pos_freq = base.powf((2 * i) as f64 / dim as f64);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            (1.0 / (factor * pos_freq)) * (1.0 - extrapolation_factor) + (1.0 / pos_freq) * extrapolation_factor
        })
        .collect()
}

#[test]
fn indexer_scores_and_topk_match_transformers() {
    let device = nsa_backends::select(std::env::var("NSA_TEST_DEVICE").ok().as_deref()).expect("a test device");
    let model_bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tiny-v32/model.safetensors"
    ))
    .unwrap();
    let golden_bytes = std::fs::read(format!("{DIR}/golden.safetensors")).unwrap();
    let (model, golden) = (
        SafeTensors::deserialize(&model_bytes).unwrap(),
        SafeTensors::deserialize(&golden_bytes).unwrap(),
    );
    let inv_freq = yarn_inv_freq(ROPE_DIM);
    let mut worst: f64 = 0.0;
    for n in [8usize, 40, 100] {
        let positions: Vec<i32> = (0..n as i32).collect();
        let cos_sin: Vec<f64> = (0..n)
            .flat_map(|p| {
                let angles: Vec<f64> = inv_freq.iter().map(|f| (p as f32 * *f as f32) as f64).collect();
                angles
                    .iter()
                    .map(|a| a.cos())
                    .chain(angles.iter().map(|a| a.sin()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let (_, layer_out) = tensor(&golden, &format!("seq{n}.layer_out"));
        for layer in 0..3 {
            let x = if layer == 0 {
                tensor(&golden, &format!("seq{n}.embeddings")).1
            } else {
                layer_out[(layer - 1) * n * HIDDEN..][..n * HIDDEN].to_vec()
            };
            let w = |name: &str| tensor(&model, &format!("model.layers.{layer}.{name}")).1;
            let rms = |x: &[f64], weight: Vec<f64>, hidden: usize| {
                run(
                    &device,
                    "rms_norm",
                    &[("rows", n), ("hidden", hidden)],
                    &[("eps", 1e-6)],
                    vec![
                        f32_tensor("x", &[n, hidden], x),
                        f32_tensor("weight", &[hidden], &weight),
                    ],
                )
            };
            let h = rms(&x, w("input_layernorm.weight"), HIDDEN);
            let q_a = rms(
                &linear(&h, &w("self_attn.q_a_proj.weight"), HIDDEN),
                w("self_attn.q_a_layernorm.weight"),
                96,
            );
            let q = linear(&q_a, &w("self_attn.indexer.wq_b.weight"), 96);
            let k = run(
                &device,
                "layer_norm",
                &[("rows", n), ("hidden", HEAD_DIM)],
                &[("eps", 1e-6)],
                vec![
                    f32_tensor(
                        "x",
                        &[n, HEAD_DIM],
                        &linear(&h, &w("self_attn.indexer.wk.weight"), HIDDEN),
                    ),
                    f32_tensor("weight", &[HEAD_DIM], &w("self_attn.indexer.k_norm.weight")),
                    f32_tensor("bias", &[HEAD_DIM], &w("self_attn.indexer.k_norm.bias")),
                ],
            );
            // NeoX RoPE on the first 16 of the 32 dims of q (8 heads) and k (1 head).
            let rope = |x: &[f64], heads: usize| {
                run(
                    &device,
                    "rope_neox",
                    &[
                        ("tokens", n),
                        ("heads", heads),
                        ("head_dim", HEAD_DIM),
                        ("rope_dim", ROPE_DIM),
                        ("max_pos", n),
                    ],
                    &[("rope_offset", 0.0)],
                    vec![
                        f32_tensor("x", &[n, heads, HEAD_DIM], x),
                        HostTensor::from_i32("positions", &[n], &positions),
                        f32_tensor("cos_sin", &[n, ROPE_DIM], &cos_sin),
                    ],
                )
            };
            let (q, k) = (rope(&q, HEADS), rope(&k, 1));
            // The softmax scale d^-½ and H^-½ fold into the weights (positive, so through the ReLU).
            let scale = 1.0 / ((HEAD_DIM * HEADS) as f64).sqrt();
            let weights: Vec<f64> = linear(&h, &w("self_attn.indexer.weights_proj.weight"), HIDDEN)
                .iter()
                .map(|v| v * scale)
                .collect();
            let logits = run(
                &device,
                "indexer_logits",
                &[("t", n), ("h", HEADS), ("d", HEAD_DIM), ("s", n)],
                &[],
                vec![
                    f32_tensor("q", &[n, HEADS, HEAD_DIM], &q),
                    f32_tensor("w", &[n, HEADS], &weights),
                    f32_tensor("k", &[n, HEAD_DIM], &k),
                    HostTensor::from_i32("q_pos", &[n], &positions),
                    HostTensor::from_i32("k_start", &[n], &vec![0; n]),
                ],
            );
            let (_, expected) = tensor(&golden, &format!("seq{n}.layer{layer}.index_scores"));
            for (i, (got, want)) in logits.iter().zip(&expected).enumerate() {
                if want.is_infinite() {
                    assert_eq!(got, want, "seq{n} layer {layer} score {i}");
                } else {
                    let error = (got - want).abs() / (1.0 + want.abs());
                    worst = worst.max(error);
                    assert!(
                        error < 1e-4,
                        "seq{n} layer {layer} score [{}, {}]: {got} vs {want}",
                        i / n,
                        i % n
                    );
                }
            }
            // Top-k sets: rows with fewer than k allowed keys hold masked positions in the golden file
            // (arbitrary among −∞ ties), so only its entries ≤ the row's position count.
            let k_top = TOPK.min(n);
            let indices = run(
                &device,
                "topk",
                &[("t", n), ("s", n), ("k", k_top)],
                &[("data", 0.0)],
                vec![
                    f32_tensor("scores", &[n, n], &logits),
                    HostTensor::from_i32("start", &[n], &vec![0; n]),
                    HostTensor::from_i32("limit", &[n], &positions),
                ],
            );
            let (_, golden_topk) = tensor(&golden, &format!("seq{n}.layer{layer}.index_topk"));
            for row in 0..n {
                let mut ours: Vec<i64> = indices[row * k_top..][..k_top]
                    .iter()
                    .map(|v| *v as i64)
                    .filter(|v| *v >= 0)
                    .collect();
                let mut theirs: Vec<i64> = golden_topk[row * k_top..][..k_top]
                    .iter()
                    .map(|v| *v as i64)
                    .filter(|v| *v <= row as i64)
                    .collect();
                ours.sort();
                theirs.sort();
                assert_eq!(ours, theirs, "seq{n} layer {layer} row {row}");
            }
        }
    }
    println!("worst score error {worst:.2e}");
}
