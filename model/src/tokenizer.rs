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

/// The text of a growing token sequence, piece by piece, decoding only a short window each time (the
/// tokens since the text last grew, behind those of the piece before for context) rather than the whole
/// sequence: a token that ends inside a UTF-8 character waits for the next one.
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Where the window starts: a character boundary.
    prefix: usize,
    /// Tokens before this are in the text given out.
    read: usize,
}

impl IncrementalDecoder {
    /// Appends `id`; returns the text it completes (empty while it ends inside a character).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let new = self.pending(tokenizer)?;
        if new.is_empty() || new.ends_with('\u{fffd}') {
            return Ok(String::new());
        }
        (self.prefix, self.read) = (self.read, self.ids.len());
        Ok(new)
    }

    /// The text of the tokens not given out yet (an unfinished character shows as U+FFFD).
    pub fn pending(&self, tokenizer: &Tokenizer) -> Result<String, ModelError> {
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        Ok(now.strip_prefix(before.as_str()).unwrap_or_default().to_string())
    }
}
