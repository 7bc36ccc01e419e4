//! The device model (burn, f32) against transformers' golden outputs, on the default wgpu device (lavapipe
//! in CI): logits, every layer's residual stream, the indexer's top-k sets and the router's experts.
use burn::tensor::{Device, DeviceKind};
use nsa_model::bundled_model_dir;
use nsa_model::device::{DeviceModel, PrefillAttention};
use nsa_model::reference::ReferenceModel;

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn device_prefill_matches_the_reference_and_transformers() {
    prefill_matches(PrefillAttention::Mha);
}

/// The absorbed form through nsa's sparse_mla_prefill kernel (the tiny model zero-padded into its dims).
#[test]
fn sparse_kernel_prefill_matches_the_reference_and_transformers() {
    prefill_matches(PrefillAttention::Sparse);
}

fn prefill_matches(attention: PrefillAttention) {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let mut model = DeviceModel::load(&bundled_model_dir(), &device).unwrap();
    model.prefill_attention = Some(attention);
    let reference = ReferenceModel::load(&bundled_model_dir()).unwrap();
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/tiny-v32/golden.safetensors"
    ))
    .unwrap();
    let golden = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for n in [8usize, 40, 100] {
        let view = golden.tensor(&format!("seq{n}.input_ids")).unwrap();
        let ids: Vec<u32> = view
            .data()
            .chunks(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        let ours = model.forward(&ids);
        let theirs = reference.forward(&ids);
        let error = max_diff(&ours.logits, &theirs.logits);
        assert!(error <= 1e-3, "seq{n}: logits max |Δ| {error:e} against the reference");
        for layer in 0..3 {
            let e = max_diff(&ours.layer_out[layer], &theirs.layer_out[layer]);
            assert!(e <= 1e-3, "seq{n} layer {layer}: residual max |Δ| {e:e}");
        }
        assert_eq!(ours.index_topk, theirs.index_topk, "seq{n}: indexer top-k");
        assert_eq!(ours.router_topk_ids, theirs.router_topk_ids, "seq{n}: router experts");
        eprintln!("seq{n} ({attention:?}): device logits max |Δ| {error:.2e}");
    }
}

#[test]
fn device_decode_agrees_with_the_prefill_and_generates_the_golden_tokens() {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let model = DeviceModel::load(&bundled_model_dir(), &device).unwrap();
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/tiny-v32/golden.safetensors"
    ))
    .unwrap();
    let golden = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids_of = |name: &str| -> Vec<u32> {
        golden
            .tensor(name)
            .unwrap()
            .data()
            .chunks(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    };
    // 40 tokens: rows past index_topk (16) are really sparse, in both paths.
    let ids = ids_of("seq40.input_ids");
    let prefill = model.forward(&ids).logits;
    let vocab = model.config.vocab_size;
    let mut cache = model.new_cache();
    let mut worst = 0f64;
    for (position, id) in ids.iter().enumerate() {
        let logits = model.decode_step(&mut cache, *id);
        let error = max_diff(&logits, &prefill[position * vocab..][..vocab]);
        assert!(error < 1e-4, "position {position}: decode vs prefill max |Δ| {error:e}");
        worst = worst.max(error);
    }
    assert_eq!(cache.len(), ids.len());
    eprintln!("device decode vs prefill: max |Δ| {worst:.2e} over 40 positions");
    // A prefill of the first 20 tokens leaves the cache decoding continues from.
    let (_, mut cache) = model.prefill_prompt(&ids[..20]);
    assert_eq!(cache.len(), 20);
    for (position, id) in ids.iter().enumerate().skip(20) {
        let logits = model.decode_step(&mut cache, *id);
        let error = max_diff(&logits, &prefill[position * vocab..][..vocab]);
        assert!(
            error < 1e-4,
            "position {position} after a 20-token prefill: max |Δ| {error:e}"
        );
    }
    for prompt in [8, 40] {
        let ids = ids_of(&format!("gen{prompt}.prompt_ids"));
        let want = ids_of(&format!("gen{prompt}.greedy_ids"));
        assert_eq!(
            model.generate_greedy_cached(&ids, want.len()),
            want,
            "gen{prompt}: prompt prefilled into the device cache, then decoded"
        );
    }
}

/// A batched decode step (projections and MoE over all sequences, attention per sequence) gives each
/// sequence the logits of its own decode step, for sequences at different positions.
#[test]
fn batched_decode_equals_one_sequence_at_a_time() {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let model = DeviceModel::load(&bundled_model_dir(), &device).unwrap();
    let prompts: [&[u32]; 3] = [&[0, 5, 9], &[0, 44, 81, 100, 7, 3, 2], &[0, 11]];
    let next = [17u32, 250, 3];
    let mut singles = Vec::new();
    let mut batched = Vec::new();
    for prompt in prompts {
        let (_, mut cache) = model.prefill_prompt(prompt);
        batched.push(cache.clone());
        singles.push((model.decode_step(&mut cache, next[singles.len()]), cache));
    }
    let mut refs: Vec<&mut _> = batched.iter_mut().collect();
    let logits = model.decode_batch(&mut refs, &next);
    for (i, ((single, single_cache), batch)) in singles.iter().zip(&logits).enumerate() {
        let diff = max_diff(single, batch);
        assert!(diff < 1e-5, "sequence {i}: batched logits differ by {diff:e}");
        assert_eq!(single_cache.len(), batched[i].len());
    }
    // And the caches continue identically: one more batched step against single steps.
    let again = [1u32, 2, 3];
    let mut refs: Vec<&mut _> = batched.iter_mut().collect();
    let logits = model.decode_batch(&mut refs, &again);
    for (i, (_, cache)) in singles.iter_mut().enumerate() {
        let single = model.decode_step(cache, again[i]);
        assert!(max_diff(&single, &logits[i]) < 1e-5, "sequence {i}, second step");
    }
}

/// A prompt chunk after a cached prefix in one pass gives the logits and cache of feeding it token by token.
#[test]
fn chunk_after_a_prefix_equals_token_by_token() {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let model = DeviceModel::load(&bundled_model_dir(), &device).unwrap();
    let (prefix, chunk) = ([0u32, 7, 300, 12, 5], [41u32, 99, 3, 250, 8, 16]);
    let (_, mut stepped) = model.prefill_prompt(&prefix);
    let mut chunked = stepped.clone();
    let mut last = Vec::new();
    for id in chunk {
        last = model.decode_step(&mut stepped, id);
    }
    let once = model.extend(&mut chunked, &chunk);
    let diff = max_diff(&last, &once);
    assert!(diff < 1e-5, "chunk logits differ by {diff:e}");
    // Both caches continue the same way.
    let (a, b) = (model.decode_step(&mut stepped, 1), model.decode_step(&mut chunked, 1));
    assert!(max_diff(&a, &b) < 1e-5);
}

/// A sequence whose pages lie scattered in a shared store (another sequence's rows in between) gets the
/// logits of its own buffers, and a second sequence reading the first one's pages as its prefix continues
/// from them.
#[test]
fn paged_store_matches_own_buffers() {
    use nsa_model::paged::PageTable;
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let model = DeviceModel::load(&bundled_model_dir(), &device).unwrap();
    let prompt = [0u32, 7, 300, 12, 5, 41, 99];
    let mut own = model.new_cache();
    let want_prompt = model.extend(&mut own, &prompt);
    let want_next = model.decode_step(&mut own, 3);

    let mut store = model.new_store(2, nsa_model::paged::KvFormat::F32);
    let mut other = PageTable {
        pages: vec![0, 1],
        len: 0,
    };
    model.step_paged(&mut store, &mut [&mut other], &[&[0, 1, 2]]);
    let mut table = PageTable {
        pages: vec![7, 3, 5, 2],
        len: 0,
    };
    let got = model.step_paged(&mut store, &mut [&mut table], &[&prompt]);
    assert!(max_diff(&got[0], &want_prompt) < 1e-5, "prompt in scattered pages");
    // The decode step together with another sequence's.
    let got = model.step_paged(&mut store, &mut [&mut table, &mut other], &[&[3], &[4]]);
    assert!(max_diff(&got[0], &want_next) < 1e-5, "decode in scattered pages");
    assert_eq!(table.len, prompt.len() + 1);

    let mut own_prefix = model.new_cache();
    model.extend(&mut own_prefix, &prompt[..4]);
    let want_shared = model.extend(&mut own_prefix, &[50, 51]);
    let mut shared = PageTable {
        pages: vec![7, 3, 8],
        len: 4,
    };
    let got = model.step_paged(&mut store, &mut [&mut shared], &[&[50, 51]]);
    assert!(
        max_diff(&got[0], &want_shared) < 1e-5,
        "a prefix read from another sequence's pages"
    );
}

/// The bf16 and FP8 stores (`--kv-cache-dtype bf16`, `fp8_e4m3`) round the KV rows — their logits move,
/// but stay close to the f32 store's (bf16 closer than FP8) — and give the same logits whatever pages hold
/// the rows.
#[test]
fn narrow_paged_stores_stay_close_to_f32() {
    use nsa_model::paged::{KvFormat, PageTable};
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let model = DeviceModel::load(&bundled_model_dir(), &device).unwrap();
    let prompt = [0u32, 7, 300, 12, 5, 41, 99];
    let run = |format: KvFormat, pages: Vec<u32>| {
        let mut store = model.new_store(2, format);
        let mut table = PageTable { pages, len: 0 };
        let mut logits = model.step_paged(&mut store, &mut [&mut table], &[&prompt]);
        for id in [3u32, 250] {
            logits.extend(model.step_paged(&mut store, &mut [&mut table], &[&[id]]));
        }
        logits
    };
    let exact = run(KvFormat::F32, vec![0, 1, 2, 3, 4]);
    // (format, bound on the logits' change relative to their scale)
    for (format, bound) in [(KvFormat::Bf16, 0.01), (KvFormat::Fp8, 0.05)] {
        let narrow = run(format, vec![0, 1, 2, 3, 4]);
        let scattered = run(format, vec![9, 4, 6, 0, 2]);
        for step in 0..3 {
            let scale = exact[step].iter().fold(0f64, |m, v| m.max(v.abs()));
            let diff = max_diff(&exact[step], &narrow[step]);
            assert!(diff > 0.0, "step {step}: the {format:?} store did not round anything");
            assert!(
                diff < bound * scale,
                "step {step}: {format:?} logits off by {diff:e} (scale {scale:e})"
            );
            assert!(
                max_diff(&narrow[step], &scattered[step]) < 1e-6,
                "step {step}: {format:?} rows depend on their pages"
            );
        }
    }
}

/// The decode batch's indexer in one launch pair (each query limited to its own sequence's keys in the
/// shared key buffer) chooses exactly the positions a launch pair per sequence chooses.
#[test]
fn one_pass_indexer_chooses_what_each_sequence_chooses() {
    use burn::tensor::{Distribution, Int, Tensor};
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let model = DeviceModel::load(&bundled_model_dir(), &device).unwrap();
    let c = &model.config;
    let (cached, counts) = ([5usize, 0, 9, 30], [1usize, 3, 1, 2]);
    let queries: usize = counts.iter().sum();
    let keys: usize = cached.iter().zip(&counts).map(|(c, n)| c + n).sum();
    let normal = Distribution::Normal(0.0, 1.0);
    let q = Tensor::<3>::random([queries, c.index_n_heads, c.index_head_dim], normal, &device);
    let w = Tensor::<2>::random([queries, c.index_n_heads], normal, &device);
    let k = Tensor::<2>::random([keys, c.index_head_dim], normal, &device);
    let sorted_rows = |chosen: Vec<Tensor<2, Int>>| -> Vec<Vec<i64>> {
        (chosen.into_iter())
            .flat_map(|t| {
                let [n, width] = t.dims();
                let values: Vec<i64> = t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
                (0..n)
                    .map(|r| {
                        let mut row: Vec<i64> = values[r * width..(r + 1) * width]
                            .iter()
                            .copied()
                            .filter(|&p| p >= 0)
                            .collect();
                        row.sort();
                        row
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // Keys end to end, then with a gap of unused rows after each sequence (as a paged store lays them out).
    let tight: Vec<usize> = (cached.iter().zip(&counts))
        .scan(0, |next, (c, n)| {
            let start = *next;
            *next += c + n;
            Some(start)
        })
        .collect();
    let gapped: Vec<usize> = tight.iter().enumerate().map(|(i, s)| s + 3 * i).collect();
    let gaps = Tensor::<2>::random([3, c.index_head_dim], normal, &device);
    let mut pieces = Vec::new();
    for (i, (&s, (&c0, &n))) in tight.iter().zip(cached.iter().zip(&counts)).enumerate() {
        if i > 0 {
            pieces.push(gaps.clone());
        }
        pieces.push(k.clone().slice(s..s + c0 + n));
    }
    let spread = Tensor::cat(pieces, 0);
    let one_pass = model.index_choose_all(q.clone(), w.clone(), k.clone(), &tight, &cached, &counts, usize::MAX);
    let each = model.index_choose_all(q.clone(), w.clone(), k, &tight, &cached, &counts, 0);
    let gapped_pass = model.index_choose_all(q, w, spread, &gapped, &cached, &counts, usize::MAX);
    let (one_pass, each) = (sorted_rows(one_pass), sorted_rows(each));
    assert_eq!(one_pass, each);
    assert_eq!(
        sorted_rows(gapped_pass),
        each,
        "keys spread with unused rows between sequences"
    );
    // Query j of a sequence sees its cached keys and new ones up to itself: all of them while they fit.
    let mut row = 0;
    for (&c0, &n) in cached.iter().zip(&counts) {
        for j in 0..n {
            let visible = (c0 + j + 1).min(c.index_topk);
            assert_eq!(one_pass[row].len(), visible, "row {row}");
            assert!(
                one_pass[row].iter().all(|&p| (p as usize) <= c0 + j),
                "row {row}: a future key"
            );
            row += 1;
        }
    }
}

/// `--load-format dummy`: random weights of the config's shapes run the whole model to finite logits,
/// repeatably for one seed and differently for another.
#[test]
fn dummy_weights_run_and_repeat() {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let config = nsa_model::ModelConfig::load(&bundled_model_dir()).unwrap();
    let prompt = [0u32, 7, 300, 12, 5];
    let logits = |seed: u64| {
        DeviceModel::dummy(config.clone(), &device, seed)
            .prefill_prompt(&prompt)
            .0
    };
    let (first, again, other) = (logits(7), logits(7), logits(8));
    assert_eq!(first.len(), config.vocab_size);
    assert!(first.iter().all(|v| v.is_finite()), "non-finite logits");
    assert!(first.iter().any(|v| *v != 0.0), "all-zero logits");
    assert_eq!(first, again, "one seed, one model");
    assert!(max_diff(&first, &other) > 0.0, "another seed, the same weights");
}

/// `--dtype bfloat16`: the routed experts (and, where the device runs bf16 GEMMs, the linear layers) in
/// bf16 move the logits a little: they stay within 1% of the f32 model's.
#[test]
fn bf16_weights_stay_close_to_f32() {
    use nsa_model::device::WeightFormat;
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let prompt = [0u32, 7, 300, 12, 5, 41, 99];
    let logits = |format: WeightFormat| {
        DeviceModel::load(&bundled_model_dir(), &device)
            .unwrap()
            .with_weight_format(format)
            .prefill_prompt(&prompt)
            .0
    };
    let (exact, bf16) = (logits(WeightFormat::F32), logits(WeightFormat::Bf16));
    let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
    let diff = max_diff(&exact, &bf16);
    assert!(bf16.iter().all(|v| v.is_finite()), "non-finite logits");
    assert!(diff > 0.0, "bf16 experts rounded nothing");
    assert!(
        diff < 0.01 * scale,
        "bf16 experts moved the logits by {diff:e} (scale {scale:e})"
    );
    eprintln!("bf16 weights: logits max |Δ| {diff:.2e} (scale {scale:.2e})");
}
