//! The reference model against Hugging Face transformers' fp32 outputs for the bundled tiny checkpoint
//! (tests/data/tiny-v32, README there): logits, every layer's residual stream, the indexer's top-k sets, the
//! router's experts, and both greedy generations token for token.
use nsa_model::bundled_model_dir;
use nsa_model::reference::ReferenceModel;
use safetensors::{Dtype, SafeTensors};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/tiny-v32/golden.safetensors");

fn values(file: &SafeTensors, name: &str) -> Vec<f64> {
    let view = file
        .tensor(name)
        .unwrap_or_else(|_| panic!("{name} in the golden file"));
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => data
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::I32 => data
            .chunks(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::I64 => data
            .chunks(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("{name}: {other:?}"),
    }
}

fn token_ids(file: &SafeTensors, name: &str) -> Vec<u32> {
    values(file, name).iter().map(|v| *v as u32).collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn reference_prefill_and_greedy_generation_match_transformers() {
    let model = ReferenceModel::load(&bundled_model_dir()).unwrap();
    let bytes = std::fs::read(GOLDEN).unwrap();
    let golden = SafeTensors::deserialize(&bytes).unwrap();
    let c = &model.config;
    for n in [8usize, 40, 100] {
        let ids = token_ids(&golden, &format!("seq{n}.input_ids"));
        let out = model.forward(&ids);
        let logits_error = max_abs_diff(&out.logits, &values(&golden, &format!("seq{n}.logits")));
        assert!(logits_error <= 1e-3, "seq{n}: logits max |Δ| {logits_error:e}");
        let layer_out = values(&golden, &format!("seq{n}.layer_out"));
        for (layer, ours) in out.layer_out.iter().enumerate() {
            let theirs = &layer_out[layer * n * c.hidden_size..][..n * c.hidden_size];
            let error = max_abs_diff(ours, theirs);
            assert!(error <= 1e-3, "seq{n} layer {layer}: residual max |Δ| {error:e}");
        }
        for layer in 0..c.num_hidden_layers {
            // Rows with fewer than index_topk causal keys hold arbitrary masked ones in the golden file:
            // only its entries ≤ the row count.
            let k = c.index_topk.min(n);
            let theirs = values(&golden, &format!("seq{n}.layer{layer}.index_topk"));
            for row in 0..n {
                let mut want: Vec<i32> = theirs[row * k..][..k]
                    .iter()
                    .map(|v| *v as i32)
                    .filter(|v| *v <= row as i32)
                    .collect();
                want.sort();
                let got: Vec<i32> = out.index_topk[layer][row * c.index_topk..][..c.index_topk]
                    .iter()
                    .copied()
                    .filter(|v| *v >= 0)
                    .collect();
                assert_eq!(got, want, "seq{n} layer {layer} row {row}: indexer top-k");
            }
            if let Some(router) = &out.router_topk_ids[layer] {
                let theirs: Vec<i32> = values(&golden, &format!("seq{n}.layer{layer}.router_topk_ids"))
                    .iter()
                    .map(|v| *v as i32)
                    .collect();
                assert_eq!(router, &theirs, "seq{n} layer {layer}: router experts");
            }
        }
        eprintln!("seq{n}: logits max |Δ| {logits_error:.2e}");
    }
    for prompt in [8, 40] {
        let ids = token_ids(&golden, &format!("gen{prompt}.prompt_ids"));
        let want = token_ids(&golden, &format!("gen{prompt}.greedy_ids"));
        assert_eq!(model.generate_greedy(&ids, want.len()), want, "gen{prompt}");
    }
}

#[test]
fn the_absorbed_decode_path_agrees_with_the_prefill_and_generates_the_golden_tokens() {
    let model = ReferenceModel::load(&bundled_model_dir()).unwrap();
    let bytes = std::fs::read(GOLDEN).unwrap();
    let golden = SafeTensors::deserialize(&bytes).unwrap();
    // 40 tokens: rows past index_topk (16) are really sparse, in both paths.
    let ids = token_ids(&golden, "seq40.input_ids");
    let prefill = model.forward(&ids).logits;
    let vocab = model.config.vocab_size;
    let mut cache = model.new_cache();
    for (position, id) in ids.iter().enumerate() {
        let logits = model.decode_step(&mut cache, *id);
        let error = max_abs_diff(&logits, &prefill[position * vocab..][..vocab]);
        assert!(error < 1e-9, "position {position}: decode vs prefill max |Δ| {error:e}");
    }
    assert_eq!(cache.len(), ids.len());
    for prompt in [8, 40] {
        let ids = token_ids(&golden, &format!("gen{prompt}.prompt_ids"));
        let want = token_ids(&golden, &format!("gen{prompt}.greedy_ids"));
        assert_eq!(
            model.generate_greedy_cached(&ids, want.len()),
            want,
            "gen{prompt} through the cache"
        );
    }
}

/// bf16 inference (emulated: every activation rounded to bf16) against the fp32 golden logits. Its bound is
/// looser and statistical: bf16's ~2⁻⁹ relative rounding exceeds this random model's smallest top-k gaps
/// (indexer 1.8e-4, router 7e-4; golden README), so selections flip on longer sequences and single logits
/// move with them. Documented bounds (BENCHMARKS.md): 8 tokens — no flips, logits within 0.1; every
/// sequence — mean |Δ| ≤ 0.1 and the top token equal on ≥ 80 % of positions (measured: 100 %, 95 %, 85 %).
#[test]
fn bf16_inference_stays_within_its_documented_bound() {
    let mut model = ReferenceModel::load(&bundled_model_dir()).unwrap();
    model.bf16 = true;
    let bytes = std::fs::read(GOLDEN).unwrap();
    let golden = SafeTensors::deserialize(&bytes).unwrap();
    let vocab = model.config.vocab_size;
    for n in [8usize, 40, 100] {
        let ids = token_ids(&golden, &format!("seq{n}.input_ids"));
        let ours = model.forward(&ids);
        let theirs = values(&golden, &format!("seq{n}.logits"));
        let mean = ours.logits.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).sum::<f64>() / theirs.len() as f64;
        let top = |l: &[f64]| l.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
        let agree = (0..n)
            .filter(|r| top(&ours.logits[r * vocab..][..vocab]) == top(&theirs[r * vocab..][..vocab]))
            .count();
        let max = max_abs_diff(&ours.logits, &theirs);
        eprintln!("seq{n} bf16: logits max |Δ| {max:.2e}, mean |Δ| {mean:.2e}, top token equal {agree}/{n}");
        assert!(mean <= 0.1, "seq{n}: mean |Δ| {mean:e}");
        assert!(agree * 100 >= 80 * n, "seq{n}: top token equal on {agree} of {n}");
        if n == 8 {
            assert!(max <= 0.1, "seq8: logits max |Δ| {max:e}");
        }
    }
}
