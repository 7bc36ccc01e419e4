//! A checkpoint's weights: one or more safetensors files (sharded through `model.safetensors.index.json`),
//! memory-mapped, read as f32 on request. bf16, f16 and f32 tensors convert directly; DeepSeek's FP8 linear
//! weights (`F8_E4M3`) are multiplied by their `<name>_scale_inv` block scales (one f32 per 128 × 128 block).
use crate::config::ModelConfig;
use crate::error::{ModelError, io};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Where tensor data starts in the file (8 + header length).
    data_start: usize,
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

pub struct Checkpoint {
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
}

const INDEX: &str = "model.safetensors.index.json";

impl Checkpoint {
    /// Opens every weight file of `dir`: the shards `model.safetensors.index.json` names, else every
    /// `*.safetensors` file there. Headers are validated now (a truncated file fails here, naming it).
    pub fn open(dir: &Path) -> Result<Checkpoint, ModelError> {
        let index = dir.join(INDEX);
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
                path: index.display().to_string(),
                reason: e.to_string(),
            })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Config {
                    path: index.display().to_string(),
                    field: "weight_map".into(),
                    reason: "is missing".into(),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            files
        };
        if files.is_empty() {
            return Err(io(dir, "no *.safetensors weight files"));
        }
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
            // SAFETY: the file is opened read-only and not written by nsa while mapped; a checkpoint changed
            // underneath a running server is outside what any loader can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io(&path, e))?;
            let bad = |reason: String| ModelError::Safetensors {
                path: path.display().to_string(),
                reason,
            };
            // Validates the header and that every tensor's bytes lie inside the file.
            SafeTensors::deserialize(&map).map_err(|e| bad(format!("{e:?}")))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| bad(format!("{e:?}")))?;
            let shard = shards.len();
            for (name, info) in metadata.tensors() {
                let info = TensorInfo {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    shard,
                    start: info.data_offsets.0,
                    end: info.data_offsets.1,
                };
                if tensors.insert(name.clone(), info).is_some() {
                    return Err(ModelError::Tensor {
                        path: path.display().to_string(),
                        tensor: name,
                        reason: "is also in an earlier file".into(),
                    });
                }
            }
            shards.push(Shard {
                path,
                map,
                data_start: 8 + header_len,
            });
        }
        Ok(Checkpoint { shards, tensors })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Total bytes of tensor data (for progress bars).
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| (t.end - t.start) as u64).sum()
    }

    fn file_of(&self, info: &TensorInfo) -> String {
        self.shards[info.shard].path.display().to_string()
    }

    fn missing(&self, name: &str) -> ModelError {
        let files: Vec<String> = self
            .shards
            .iter()
            .map(|s| s.path.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect();
        ModelError::MissingTensor {
            tensor: name.into(),
            files: files.join(", "),
        }
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let shard = &self.shards[info.shard];
        &shard.map[shard.data_start + info.start..shard.data_start + info.end]
    }

    /// Tensor `name` as f32, checked to have `shape`.
    pub fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let info = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let error = |reason: String| ModelError::Tensor {
            path: self.file_of(info),
            tensor: name.into(),
            reason,
        };
        if info.shape != shape {
            return Err(error(format!(
                "has shape {:?}, the config implies {shape:?}",
                info.shape
            )));
        }
        let bytes = self.bytes(info);
        Ok(match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F8_E4M3 => self.dequantize_fp8(name, info, shape)?,
            other => {
                return Err(error(format!(
                    "has dtype {other:?}; weights must be F32, BF16, F16 or F8_E4M3"
                )));
            }
        })
    }

    /// An e4m3 weight [rows, cols] times its `<name>_scale_inv` [⌈rows/128⌉, ⌈cols/128⌉].
    fn dequantize_fp8(&self, name: &str, info: &TensorInfo, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let error = |reason: String| ModelError::Tensor {
            path: self.file_of(info),
            tensor: name.into(),
            reason,
        };
        let [rows, cols] = shape else {
            return Err(error(
                "is F8_E4M3 but not a matrix; only 2-D linear weights may be FP8".into(),
            ));
        };
        let scale_name = format!("{name}_scale_inv");
        let scale_shape = [rows.div_ceil(128), cols.div_ceil(128)];
        let scales = self
            .load_f32(&scale_name, &scale_shape)
            .map_err(|e| error(format!("is F8_E4M3, so it needs its block scales: {e}")))?;
        let codes = self.bytes(info);
        Ok((0..rows * cols)
            .map(|at| {
                let (r, c) = (at / cols, at % cols);
                e4m3_to_f32(codes[at]) * scales[(r / 128) * scale_shape[1] + c / 128]
            })
            .collect())
    }

    /// Every tensor of `expected` as f32, with a progress bar over the bytes on stderr (drawn only on a
    /// terminal).
    pub fn load_all(&self, expected: &[(String, Vec<usize>)]) -> Result<HashMap<String, Vec<f32>>, ModelError> {
        let total: u64 = expected
            .iter()
            .filter_map(|(n, _)| self.tensors.get(n))
            .map(|t| (t.end - t.start) as u64)
            .sum();
        let bar = indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template("loading weights {bar:40} {bytes}/{total_bytes} {eta}")
                .expect("a valid template"),
        );
        let mut out = HashMap::with_capacity(expected.len());
        for (name, shape) in expected {
            out.insert(name.clone(), self.load_f32(name, shape)?);
            bar.inc(self.tensors.get(name).map_or(0, |t| (t.end - t.start) as u64));
        }
        bar.finish_and_clear();
        Ok(out)
    }

    /// Checks the checkpoint against the tensors the model reads: each present with its shape (FP8 weights
    /// with their scales), and nothing else. The first problem is the error.
    pub fn check_against(&self, expected: &[(String, Vec<usize>)]) -> Result<(), ModelError> {
        let wanted: HashMap<&str, &[usize]> = expected.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        for (name, shape) in expected {
            let info = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
            if &info.shape != shape {
                return Err(ModelError::Tensor {
                    path: self.file_of(info),
                    tensor: name.clone(),
                    reason: format!("has shape {:?}, the config implies {shape:?}", info.shape),
                });
            }
        }
        let unknown: Vec<(&String, &TensorInfo)> = self
            .tensors
            .iter()
            .filter(|(name, _)| {
                let scale_of = name.strip_suffix("_scale_inv").filter(|w| wanted.contains_key(w));
                !wanted.contains_key(name.as_str()) && scale_of.is_none()
            })
            .collect();
        if let Some((first, info)) = unknown.first() {
            return Err(ModelError::UnknownTensors {
                count: unknown.len(),
                first: (*first).clone(),
                path: self.file_of(info),
            });
        }
        Ok(())
    }
}

/// e4m3 ("fn": no infinities, 0x7f / 0xff NaN) to f32.
fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exponent, mantissa) = ((code >> 3) & 0xf, code & 0x7);
    if code & 0x7f == 0x7f {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        mantissa as f32 / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa as f32 / 8.0) * 2f32.powi(exponent as i32 - 7)
    };
    sign * magnitude
}

/// Every tensor a DeepSeek-V3.2 checkpoint with `config` holds, with its shape (HF / DeepSeek names).
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let c = config;
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let mut t: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![c.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        t.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    let layer = |t: &mut Vec<(String, Vec<usize>)>, l: usize, moe: bool| {
        let p = format!("model.layers.{l}");
        let mut add = |name: &str, shape: Vec<usize>| t.push((format!("{p}.{name}"), shape));
        add("input_layernorm.weight", vec![h]);
        add("post_attention_layernorm.weight", vec![h]);
        let q_in = match c.q_lora_rank {
            Some(r) => {
                add("self_attn.q_a_proj.weight", vec![r, h]);
                add("self_attn.q_a_layernorm.weight", vec![r]);
                r
            }
            None => h,
        };
        let q_name = if c.q_lora_rank.is_some() {
            "self_attn.q_b_proj.weight"
        } else {
            "self_attn.q_proj.weight"
        };
        add(q_name, vec![heads * c.qk_head_dim(), q_in]);
        add(
            "self_attn.kv_a_proj_with_mqa.weight",
            vec![c.kv_lora_rank + c.qk_rope_head_dim, h],
        );
        add("self_attn.kv_a_layernorm.weight", vec![c.kv_lora_rank]);
        add(
            "self_attn.kv_b_proj.weight",
            vec![heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank],
        );
        add("self_attn.o_proj.weight", vec![h, heads * c.v_head_dim]);
        add(
            "self_attn.indexer.wq_b.weight",
            vec![c.index_n_heads * c.index_head_dim, q_in],
        );
        add("self_attn.indexer.wk.weight", vec![c.index_head_dim, h]);
        add("self_attn.indexer.k_norm.weight", vec![c.index_head_dim]);
        add("self_attn.indexer.k_norm.bias", vec![c.index_head_dim]);
        add("self_attn.indexer.weights_proj.weight", vec![c.index_n_heads, h]);
        let mlp = |add: &mut dyn FnMut(&str, Vec<usize>), prefix: &str, width: usize| {
            add(&format!("{prefix}.gate_proj.weight"), vec![width, h]);
            add(&format!("{prefix}.up_proj.weight"), vec![width, h]);
            add(&format!("{prefix}.down_proj.weight"), vec![h, width]);
        };
        if moe {
            add("mlp.gate.weight", vec![c.n_routed_experts, h]);
            add("mlp.gate.e_score_correction_bias", vec![c.n_routed_experts]);
            for e in 0..c.n_routed_experts {
                mlp(&mut add, &format!("mlp.experts.{e}"), c.moe_intermediate_size);
            }
            if c.n_shared_experts > 0 {
                mlp(
                    &mut add,
                    "mlp.shared_experts",
                    c.moe_intermediate_size * c.n_shared_experts,
                );
            }
        } else {
            mlp(&mut add, "mlp", c.intermediate_size);
        }
    };
    for l in 0..c.num_hidden_layers {
        layer(&mut t, l, c.is_moe_layer(l));
    }
    // Multi-token prediction: a full (MoE) decoder layer plus its own projection, norms and head.
    for m in 0..c.num_nextn_predict_layers {
        let l = c.num_hidden_layers + m;
        layer(&mut t, l, c.n_routed_experts > 0);
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.enorm.weight"), vec![h]));
        t.push((format!("{p}.hnorm.weight"), vec![h]));
        t.push((format!("{p}.eh_proj.weight"), vec![h, 2 * h]));
        t.push((format!("{p}.embed_tokens.weight"), vec![c.vocab_size, h]));
        t.push((format!("{p}.shared_head.norm.weight"), vec![h]));
        t.push((format!("{p}.shared_head.head.weight"), vec![c.vocab_size, h]));
    }
    t
}
