//! The server's configuration from files and flags: generation_config.json's sampling defaults and the
//! KV cache's size from `--mem-fraction-static`.
use nsa_model::ModelConfig;
use nsa_runtime::sampling::SamplingParams;
use nsa_server::{KvFormat, ModelDevice, cache_tokens, sampling_defaults};

#[test]
fn generation_config_gives_the_sampling_defaults() {
    let dir = std::env::temp_dir().join(format!("nsa-generation-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unset = sampling_defaults(&dir);
    assert_eq!(unset, SamplingParams::default(), "no file: the defaults");
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05, "eos_token_id": 1}"#,
    )
    .unwrap();
    let params = sampling_defaults(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        (params.temperature, params.top_p, params.top_k, params.min_p),
        (0.6, 0.95, 20, 0.05)
    );
}

/// `--mem-fraction-static`: the cache gets what the weights leave of the fraction, in rows of the KV
/// format's bytes plus the f32 indexer key per layer; too small a fraction is refused.
#[test]
fn mem_fraction_static_sizes_the_cache() {
    let config = ModelConfig::load(&nsa_model::bundled_model_dir()).unwrap();
    let device = |gb: u64| ModelDevice::Burn {
        id: "test".into(),
        memory_bytes: Some(gb << 30),
    };
    let weights: u64 = nsa_model::checkpoint::expected_tensors(&config)
        .iter()
        .map(|(_, shape)| 4 * shape.iter().product::<usize>() as u64)
        .sum();
    let budget = (0.5 * (1u64 << 30) as f64) as u64;
    for format in [KvFormat::F32, KvFormat::Bf16, KvFormat::Fp8] {
        let row = (format.row_bytes() + 4 * config.index_head_dim) * config.num_hidden_layers;
        let tokens = cache_tokens(&config, &device(1), format, 0.5).unwrap();
        assert_eq!(tokens as u64, (budget - weights) / row as u64, "{format:?}");
    }
    let f32 = cache_tokens(&config, &device(1), KvFormat::F32, 0.5).unwrap();
    let bf16 = cache_tokens(&config, &device(1), KvFormat::Bf16, 0.5).unwrap();
    assert!(bf16 > f32, "narrower rows, more tokens");
    assert_eq!(cache_tokens(&config, &device(2), KvFormat::F32, 0.25).unwrap(), f32);
    let error = cache_tokens(&config, &device(1), KvFormat::F32, 1e-6).unwrap_err();
    assert!(error.contains("leaves nothing for the cache"), "{error}");
    let unknown = ModelDevice::Burn {
        id: "test".into(),
        memory_bytes: None,
    };
    assert!(
        cache_tokens(&config, &unknown, KvFormat::F32, 0.5)
            .unwrap_err()
            .contains("--max-total-tokens")
    );
}
