use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path}: not valid JSON: {reason}")]
    Json { path: String, reason: String },
    #[error("{path}: `{field}` {reason}")]
    Config {
        path: String,
        field: String,
        reason: String,
    },
    #[error("{path}: not a safetensors file: {reason}")]
    Safetensors { path: String, reason: String },
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        path: String,
        tensor: String,
        reason: String,
    },
    #[error("tensor `{tensor}` is in none of the checkpoint's files ({files})")]
    MissingTensor { tensor: String, files: String },
    #[error("{count} tensors the model does not use, e.g. `{first}` in {path}")]
    UnknownTensors { count: usize, first: String, path: String },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: String, reason: String },
}

pub(crate) fn io(path: &Path, error: impl std::fmt::Display) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}
