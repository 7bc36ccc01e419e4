//! The checkpoint's tokenizer.json through Hugging Face's `tokenizers` crate (byte-level BPE with DeepSeek's
//! pre-tokenizer and special tokens). Encoding adds no special tokens: prompts carry their own
//! `<｜begin▁of▁sentence｜>`, as DeepSeek's chat encoding writes it.
use crate::error::ModelError;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl Tokenizer {
    /// Reads `dir/tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Tokenizer, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(crate::error::io(&path, "not found (the checkpoint's tokenizer)"));
        }
        let shown = path.display().to_string();
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer { inner, path: shown })
    }

    fn error(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self.inner.encode(text, false).map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids back to text, special tokens included (a chat's `</think>` must survive decoding).
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, false).map_err(|e| self.error(e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a special token such as `<｜end▁of▁sentence｜>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
