//! config.json of a DeepSeek-V3.2 checkpoint, in either published layout: DeepSeek's hub layout
//! (`rope_scaling: {type: yarn, ...}`, top-level `rope_theta`) or transformers v5's (`rope_parameters:
//! {rope_type: yarn, rope_theta, ...}`). Fields are read one by one so an error names the missing or bad one.
use crate::error::{ModelError, io};
use serde_json::Value;
use std::path::Path;

/// YaRN context extension of the rotary embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// FP8 block quantization of the checkpoint's linear weights (`quantization_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Blocks {
    pub block: [usize; 2],
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The dense MLP's width (the first `first_k_dense_replace` layers).
    pub intermediate_size: usize,
    /// Each routed and shared expert's width.
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
    pub norm_topk_prob: bool,
    pub first_k_dense_replace: usize,
    pub rms_norm_eps: f64,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub rope_theta: f64,
    pub yarn: Option<Yarn>,
    pub max_position_embeddings: usize,
    /// Multi-token-prediction layers stored after the decoder layers (speculative decoding).
    pub num_nextn_predict_layers: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub fp8: Option<Fp8Blocks>,
}

struct Fields<'a> {
    json: &'a Value,
    path: String,
}

impl Fields<'_> {
    fn error(&self, field: &str, reason: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: self.path.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
    fn get(&self, field: &str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }
    fn usize(&self, field: &str) -> Result<usize, ModelError> {
        let value = self.get(field).ok_or_else(|| self.error(field, "is missing"))?;
        value
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| self.error(field, format!("must be a non-negative integer, got {value}")))
    }
    fn positive(&self, field: &str) -> Result<usize, ModelError> {
        match self.usize(field)? {
            0 => Err(self.error(field, "must be positive, got 0")),
            v => Ok(v),
        }
    }
    fn usize_or(&self, field: &str, default: usize) -> Result<usize, ModelError> {
        if self.get(field).is_some() {
            self.usize(field)
        } else {
            Ok(default)
        }
    }
    fn f64_in(&self, json: &Value, field: &str) -> Result<f64, ModelError> {
        let value = json.get(field).ok_or_else(|| self.error(field, "is missing"))?;
        value
            .as_f64()
            .ok_or_else(|| self.error(field, format!("must be a number, got {value}")))
    }
    fn f64(&self, field: &str) -> Result<f64, ModelError> {
        self.f64_in(self.json, field)
    }
    fn bool_or(&self, field: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(field, format!("must be true or false, got {v}"))),
        }
    }
    fn token_ids(&self, field: &str) -> Result<Vec<u32>, ModelError> {
        let bad = |v: &Value| self.error(field, format!("must be a token id or a list of them, got {v}"));
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| v.as_u64().map(|i| i as u32).ok_or_else(|| bad(v)))
                .collect(),
            Some(v) => v.as_u64().map(|i| vec![i as u32]).ok_or_else(|| bad(v)),
        }
    }
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        ModelConfig::parse(&text, &path.display().to_string())
    }

    /// Parses config.json text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<ModelConfig, ModelError> {
        let json: Value = serde_json::from_str(text).map_err(|e| ModelError::Json {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let f = Fields {
            json: &json,
            path: path.into(),
        };
        if let Some(kind) = f.get("model_type").and_then(|v| v.as_str())
            && !matches!(kind, "deepseek_v32" | "deepseek_v3")
        {
            return Err(f.error(
                "model_type",
                format!("is `{kind}`; nsa runs deepseek_v32 (and deepseek_v3)"),
            ));
        }
        // Rope: v5's rope_parameters carries rope_theta; the hub layout has rope_scaling + rope_theta.
        let (rope, rope_field) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
            (Some(p), _) => (Some(p), "rope_parameters"),
            (None, Some(s)) => (Some(s), "rope_scaling"),
            (None, None) => (None, "rope_scaling"),
        };
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")) {
            Some(_) => f.f64_in(rope.unwrap(), "rope_theta")?,
            None if f.get("rope_theta").is_some() => f.f64("rope_theta")?,
            None => 10000.0,
        };
        let kind = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let yarn = match kind {
            "yarn" => {
                let r = rope.unwrap();
                let number = |name: &str, default: f64| -> Result<f64, ModelError> {
                    match r.get(name) {
                        None => Ok(default),
                        Some(v) => v.as_f64().ok_or_else(|| {
                            f.error(&format!("{rope_field}.{name}"), format!("must be a number, got {v}"))
                        }),
                    }
                };
                let factor = number("factor", 1.0)?;
                if factor < 1.0 {
                    return Err(f.error(&format!("{rope_field}.factor"), format!("must be ≥ 1, got {factor}")));
                }
                Some(Yarn {
                    factor,
                    original_max_position_embeddings: r
                        .get("original_max_position_embeddings")
                        .and_then(|v| v.as_u64())
                        .ok_or_else(|| {
                            f.error(
                                &format!("{rope_field}.original_max_position_embeddings"),
                                "is missing (YaRN needs it)",
                            )
                        })? as usize,
                    beta_fast: number("beta_fast", 32.0)?,
                    beta_slow: number("beta_slow", 1.0)?,
                    mscale: number("mscale", 1.0)?,
                    mscale_all_dim: number("mscale_all_dim", 0.0)?,
                })
            }
            "default" => None,
            other => {
                return Err(f.error(rope_field, format!("has rope type `{other}`; supported: yarn, default")));
            }
        };
        let fp8 = match f.get("quantization_config") {
            None => None,
            Some(q) => {
                let method = q.get("quant_method").and_then(|v| v.as_str()).unwrap_or("");
                if method != "fp8" {
                    return Err(f.error(
                        "quantization_config.quant_method",
                        format!("is `{method}`; supported: fp8 (block-scaled e4m3)"),
                    ));
                }
                let block = q
                    .get("weight_block_size")
                    .and_then(|v| v.as_array())
                    .and_then(|b| Some([b.first()?.as_u64()? as usize, b.get(1)?.as_u64()? as usize]))
                    .ok_or_else(|| f.error("quantization_config.weight_block_size", "must be [rows, cols]"))?;
                Some(Fp8Blocks { block })
            }
        };
        let config = ModelConfig {
            vocab_size: f.positive("vocab_size")?,
            hidden_size: f.positive("hidden_size")?,
            intermediate_size: f.positive("intermediate_size")?,
            moe_intermediate_size: f.positive("moe_intermediate_size")?,
            num_hidden_layers: f.positive("num_hidden_layers")?,
            num_attention_heads: f.positive("num_attention_heads")?,
            q_lora_rank: match f.get("q_lora_rank") {
                None => None,
                Some(_) => Some(f.positive("q_lora_rank")?),
            },
            kv_lora_rank: f.positive("kv_lora_rank")?,
            qk_nope_head_dim: f.positive("qk_nope_head_dim")?,
            qk_rope_head_dim: f.positive("qk_rope_head_dim")?,
            v_head_dim: f.positive("v_head_dim")?,
            n_routed_experts: f.usize_or("n_routed_experts", 0)?,
            n_shared_experts: f.usize_or("n_shared_experts", 0)?,
            num_experts_per_tok: f.usize_or("num_experts_per_tok", 0)?,
            n_group: f.usize_or("n_group", 1)?,
            topk_group: f.usize_or("topk_group", 1)?,
            routed_scaling_factor: if f.get("routed_scaling_factor").is_some() {
                f.f64("routed_scaling_factor")?
            } else {
                1.0
            },
            norm_topk_prob: f.bool_or("norm_topk_prob", true)?,
            first_k_dense_replace: f.usize_or("first_k_dense_replace", 0)?,
            rms_norm_eps: if f.get("rms_norm_eps").is_some() {
                f.f64("rms_norm_eps")?
            } else {
                1e-6
            },
            index_n_heads: f.positive("index_n_heads")?,
            index_head_dim: f.positive("index_head_dim")?,
            index_topk: f.positive("index_topk")?,
            rope_theta,
            yarn,
            max_position_embeddings: f.positive("max_position_embeddings")?,
            num_nextn_predict_layers: f.usize_or("num_nextn_predict_layers", 0)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            fp8,
        };
        config.check(&f)?;
        Ok(config)
    }

    /// Relations between fields the model relies on.
    fn check(&self, f: &Fields) -> Result<(), ModelError> {
        if self.n_routed_experts > 0 {
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.n_routed_experts {
                return Err(f.error("num_experts_per_tok", "must be in 1..=n_routed_experts"));
            }
            if !self.n_routed_experts.is_multiple_of(self.n_group) || self.topk_group > self.n_group {
                return Err(f.error("n_group", "must divide n_routed_experts, with topk_group ≤ n_group"));
            }
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(f.error("first_k_dense_replace", "exceeds num_hidden_layers"));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) || self.qk_rope_head_dim > self.index_head_dim {
            return Err(f.error(
                "qk_rope_head_dim",
                "must be even and at most index_head_dim (the indexer rotates its first qk_rope_head_dim dims)",
            ));
        }
        Ok(())
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether decoder layer `layer` has the MoE (else the dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0 && layer >= self.first_k_dense_replace
    }

    /// The attention softmax scale: qk_head_dim^−½, times YaRN's mscale² when the context is extended
    /// (mscale = 0.1 · mscale_all_dim · ln(factor) + 1), as DeepSeek's reference computes it.
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.yarn {
            Some(y) if y.mscale_all_dim != 0.0 && y.factor > 1.0 => {
                let mscale = 0.1 * y.mscale_all_dim * y.factor.ln() + 1.0;
                base * mscale * mscale
            }
            _ => base,
        }
    }
}
