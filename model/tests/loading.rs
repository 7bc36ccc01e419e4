//! Loading a DeepSeek-V3.2 checkpoint: both config layouts, the bundled tiny checkpoint, shards, FP8 block
//! weights, the tokenizer against Hugging Face's encodings, and one clear error for every kind of bad input.
use nsa_model::checkpoint::expected_tensors;
use nsa_model::{Checkpoint, ModelConfig, ModelError, Tokenizer, bundled_model_dir};
use safetensors::{Dtype, tensor::TensorView};
use std::path::Path;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/tiny-v32");

fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect()
}

#[test]
fn both_config_layouts_give_the_same_model() {
    let v5 = ModelConfig::load(&bundled_model_dir()).unwrap();
    let hub_text = std::fs::read_to_string(format!("{GOLDEN}/config_original_style.json")).unwrap();
    let hub = ModelConfig::parse(&hub_text, "config_original_style.json").unwrap();
    assert_eq!(v5, hub);
    assert_eq!((v5.hidden_size, v5.num_hidden_layers, v5.qk_head_dim()), (256, 3, 48));
    let yarn = v5.yarn.as_ref().unwrap();
    assert_eq!((yarn.factor, yarn.original_max_position_embeddings), (40.0, 4096));
    assert!(!v5.is_moe_layer(0) && v5.is_moe_layer(1) && v5.is_moe_layer(2));
    // HF: scaling = qk_head_dim^-0.5 · (0.1 · mscale_all_dim · ln(factor) + 1)².
    let mscale = 0.1 * 40f64.ln() + 1.0;
    assert!((v5.softmax_scale() - 48f64.powf(-0.5) * mscale * mscale).abs() < 1e-15);
    assert_eq!((v5.bos_token_id, v5.eos_token_ids.as_slice()), (Some(0), &[1u32][..]));
}

#[test]
fn bad_configs_name_the_file_and_field() {
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundled_model_dir().join("config.json")).unwrap()).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut json = good.clone();
        edit(json.as_object_mut().unwrap());
        ModelConfig::parse(&json.to_string(), "c.json").unwrap_err().to_string()
    };
    let error = with(&|m| {
        m.remove("hidden_size");
    });
    assert_eq!(error, "c.json: `hidden_size` is missing");
    let error = with(&|m| {
        m.insert("num_attention_heads".into(), "many".into());
    });
    assert!(
        error.contains("`num_attention_heads` must be a non-negative integer"),
        "{error}"
    );
    let error = with(&|m| {
        m["rope_parameters"]["rope_type"] = "longrope".into();
    });
    assert!(error.contains("rope type `longrope`"), "{error}");
    let error = with(&|m| {
        m.insert("model_type".into(), "llama".into());
    });
    assert!(error.contains("nsa runs deepseek_v32"), "{error}");
    let error = with(&|m| {
        m.insert("num_experts_per_tok".into(), 9.into());
    });
    assert!(error.contains("num_experts_per_tok"), "{error}");
    let error = ModelConfig::parse("{ nope", "c.json").unwrap_err().to_string();
    assert!(error.starts_with("c.json: not valid JSON"), "{error}");
    let error = ModelConfig::load(Path::new("/nonexistent-model"))
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("/nonexistent-model/config.json:"), "{error}");
}

#[test]
fn the_bundled_checkpoint_has_exactly_the_tensors_the_config_implies() {
    let dir = bundled_model_dir();
    let config = ModelConfig::load(&dir).unwrap();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let expected = expected_tensors(&config);
    checkpoint.check_against(&expected).unwrap();
    let weights = checkpoint.load_all(&expected).unwrap();
    assert_eq!(weights.len(), expected.len());
    // The fp32 router bias and a bf16 norm, as stored.
    let bias = &weights["model.layers.1.mlp.gate.e_score_correction_bias"];
    assert_eq!(bias.len(), 8);
    assert!(bias.iter().all(|b| b.is_finite() && b.abs() < 1.0) && bias.iter().any(|b| *b != 0.0));
    let norm = &weights["model.norm.weight"];
    assert!(norm.iter().all(|w| (w - 1.0).abs() < 0.6) && norm.iter().any(|w| *w != 1.0));
}

#[test]
fn shards_fp8_blocks_and_every_bad_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Two shards through an index; one FP8 weight [130, 200] with 2 × 2 block scales.
    let codes: Vec<u8> = (0..130 * 200).map(|i| (i % 0x7e) as u8).collect();
    let scales = [0.5f32, 2.0, 4.0, 0.125];
    let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    write_safetensors(
        &d.join("a.safetensors"),
        &[
            ("w", Dtype::F8_E4M3, vec![130, 200], codes.clone()),
            ("w_scale_inv", Dtype::F32, vec![2, 2], scale_bytes),
        ],
    );
    write_safetensors(
        &d.join("b.safetensors"),
        &[("n", Dtype::BF16, vec![3], bf16_bytes(&[1.0, -2.5, 0.25]))],
    );
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"w": "a.safetensors", "w_scale_inv": "a.safetensors", "n": "b.safetensors"}}"#,
    )
    .unwrap();
    let checkpoint = Checkpoint::open(d).unwrap();
    assert_eq!(checkpoint.load_f32("n", &[3]).unwrap(), vec![1.0, -2.5, 0.25]);
    let w = checkpoint.load_f32("w", &[130, 200]).unwrap();
    for (at, value) in w.iter().enumerate() {
        let (r, c) = (at / 200, at % 200);
        let expected = nsa_dsl::host::e4m3_to_f32(codes[at]) * scales[(r / 128) * 2 + c / 128];
        assert_eq!(*value, expected, "w[{r}, {c}]");
    }
    let expected = vec![("w".to_string(), vec![130, 200]), ("n".to_string(), vec![3])];
    checkpoint.check_against(&expected).unwrap();

    let message = |e: ModelError| e.to_string();
    // Missing, mis-shaped, unknown tensors.
    let e = message(checkpoint.load_f32("absent", &[1]).unwrap_err());
    assert!(
        e.contains("`absent`") && e.contains("a.safetensors, b.safetensors"),
        "{e}"
    );
    let e = message(checkpoint.load_f32("n", &[4]).unwrap_err());
    assert!(
        e.contains("b.safetensors: tensor `n`: has shape [3], the config implies [4]"),
        "{e}"
    );
    let e = message(checkpoint.check_against(&expected[..1]).unwrap_err());
    assert!(e.contains("1 tensors the model does not use, e.g. `n`"), "{e}");

    // Unsupported dtype; FP8 without its scales.
    write_safetensors(&d.join("b.safetensors"), &[("n", Dtype::I64, vec![3], vec![0; 24])]);
    let e = message(Checkpoint::open(d).unwrap().load_f32("n", &[3]).unwrap_err());
    assert!(e.contains("tensor `n`: has dtype I64"), "{e}");
    write_safetensors(
        &d.join("a.safetensors"),
        &[("w", Dtype::F8_E4M3, vec![130, 200], codes)],
    );
    let e = message(Checkpoint::open(d).unwrap().load_f32("w", &[130, 200]).unwrap_err());
    assert!(
        e.contains("tensor `w`: is F8_E4M3, so it needs its block scales") && e.contains("w_scale_inv"),
        "{e}"
    );

    // A truncated file; a shard the index names but the directory lacks.
    let bytes = std::fs::read(d.join("a.safetensors")).unwrap();
    std::fs::write(d.join("a.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let e = message(Checkpoint::open(d).err().unwrap());
    assert!(e.contains("a.safetensors: not a safetensors file"), "{e}");
    std::fs::remove_file(d.join("a.safetensors")).unwrap();
    let e = message(Checkpoint::open(d).err().unwrap());
    assert!(e.contains("a.safetensors"), "{e}");
}

#[test]
fn the_tokenizer_matches_hugging_face_both_ways() {
    let tokenizer = Tokenizer::load(&bundled_model_dir()).unwrap();
    assert_eq!(tokenizer.vocab_size(), 1024);
    assert_eq!(tokenizer.token_id("<｜end▁of▁sentence｜>"), Some(1));
    // Python's json writes the unbounded gaps as `Infinity`, which is not JSON.
    let text = std::fs::read_to_string(format!("{GOLDEN}/golden.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text.replace("Infinity", "null")).unwrap();
    let cases = golden["tokenizer_cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokenizer.encode(text).unwrap(), ids, "{text}");
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }
    let e = Tokenizer::load(Path::new("/nonexistent-model"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("/nonexistent-model/tokenizer.json: not found"), "{e}");
}

#[test]
fn a_config_with_mtp_layers_expects_their_weights() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundled_model_dir().join("config.json")).unwrap()).unwrap();
    json["num_nextn_predict_layers"] = 1.into();
    let config = ModelConfig::parse(&json.to_string(), "config.json").unwrap();
    let expected = expected_tensors(&config);
    let shape_of = |name: &str| expected.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone());
    // The MTP layer sits after the 3 decoder layers: a full MoE layer plus its projection, norms and head.
    assert_eq!(shape_of("model.layers.3.eh_proj.weight"), Some(vec![256, 512]));
    assert_eq!(
        shape_of("model.layers.3.shared_head.head.weight"),
        Some(vec![1024, 256])
    );
    assert_eq!(
        shape_of("model.layers.3.mlp.experts.7.down_proj.weight"),
        Some(vec![256, 64])
    );
    assert_eq!(
        shape_of("model.layers.3.self_attn.indexer.wk.weight"),
        Some(vec![32, 256])
    );
    // The bundled checkpoint has none: checking it against this config names the first missing tensor.
    let e = Checkpoint::open(&bundled_model_dir())
        .unwrap()
        .check_against(&expected)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.3."), "{e}");
}

/// Text pieces of the incremental decoder join to the whole sequence's decode at every prefix, for random
/// token sequences (many of the tiny vocabulary's tokens are parts of multi-byte characters).
#[test]
fn incremental_decoding_equals_decoding_the_whole_sequence() {
    use nsa_model::tokenizer::IncrementalDecoder;
    let tokenizer = Tokenizer::load(&bundled_model_dir()).unwrap();
    let mut state = 0x2545f4914f6cdd1du64;
    for _ in 0..20 {
        let mut decoder = IncrementalDecoder::default();
        let (mut ids, mut text) = (Vec::new(), String::new());
        for _ in 0..60 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let id = 16 + (state % 1008) as u32; // past the special tokens
            ids.push(id);
            text.push_str(&decoder.push(&tokenizer, id).unwrap());
            let whole = tokenizer.decode(&ids).unwrap();
            let pending = decoder.pending(&tokenizer).unwrap();
            assert_eq!(format!("{text}{pending}"), whole, "{ids:?}");
        }
    }
}
