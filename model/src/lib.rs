//! DeepSeek-V3.2 for nsa: the checkpoint side — config.json in both published layouts, sharded safetensors
//! (memory-mapped; bf16, f32 and DeepSeek's FP8 block-scaled weights), the tokenizer. Every failure is a
//! [`ModelError`] naming the file and, for weights, the tensor.
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod device_decode;
pub mod error;
pub mod ops;
pub mod paged;
pub mod reference;
pub mod reference_decode;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use config::ModelConfig;
pub use error::ModelError;
pub use tokenizer::Tokenizer;

/// The bundled tiny checkpoint (`models/tiny-v32`), the default model when no `--model-path` is given: in
/// the source tree the binary was built from, else `models/tiny-v32` under the working directory (a binary
/// copied to another machine and run from a checkout).
pub fn bundled_model_dir() -> std::path::PathBuf {
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v32");
    let here = std::path::PathBuf::from("models/tiny-v32");
    if !built.join("config.json").exists() && here.join("config.json").exists() {
        return here;
    }
    built
}
