//! Host tensors: named, shaped, stored as 32-bit words in a [`DType`] (what kernels read and write).
use nsa_dsl::{Format, host};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
    I32,
    /// Bytes, four to a word (the FP8 KV cache).
    U8,
}

impl DType {
    pub fn of(format: Format) -> DType {
        match format {
            Format::F32 => DType::F32,
            Format::Bf16 => DType::Bf16,
        }
    }

    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::Bf16 => "BF16",
            DType::I32 => "I32",
            DType::U8 => "U8",
        }
    }

    pub const fn bytes_per_element(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::U8 => 1,
            _ => 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Elements packed into words (bf16: two per word, the last padded).
    pub words: Vec<u32>,
}

impl HostTensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn from_f32(name: &str, shape: &[usize], dtype: DType, values: &[f32]) -> HostTensor {
        let words = match dtype {
            DType::F32 => host::pack(values, Format::F32),
            DType::Bf16 => host::pack(values, Format::Bf16),
            DType::I32 => values.iter().map(|v| *v as i32 as u32).collect(),
            DType::U8 => host::pack_bytes(&values.iter().map(|v| *v as u8).collect::<Vec<_>>()),
        };
        HostTensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            words,
        }
    }

    pub fn from_i32(name: &str, shape: &[usize], values: &[i32]) -> HostTensor {
        let words = values.iter().map(|v| *v as u32).collect();
        HostTensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: DType::I32,
            words,
        }
    }

    /// Raw bytes (e4m3 codes, cache pages), packed four to a word.
    pub fn from_u8(name: &str, shape: &[usize], bytes: &[u8]) -> HostTensor {
        HostTensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: DType::U8,
            words: host::pack_bytes(bytes),
        }
    }

    /// Elements widened to f64 (integers exactly).
    pub fn to_f64(&self) -> Vec<f64> {
        match self.dtype {
            DType::F32 => host::unpack(&self.words, Format::F32, self.len())
                .iter()
                .map(|v| *v as f64)
                .collect(),
            DType::Bf16 => host::unpack(&self.words, Format::Bf16, self.len())
                .iter()
                .map(|v| *v as f64)
                .collect(),
            DType::I32 => self.words[..self.len()].iter().map(|w| *w as i32 as f64).collect(),
            DType::U8 => (0..self.len())
                .map(|i| ((self.words[i / 4] >> (8 * (i % 4))) & 0xff) as f64)
                .collect(),
        }
    }

    /// The elements as little-endian bytes in their dtype (a safetensors payload).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = host::words_to_bytes(&self.words);
        bytes.truncate(self.len() * self.dtype.bytes_per_element());
        bytes
    }

    /// A tensor from little-endian element bytes in `dtype`.
    pub fn from_bytes(name: &str, shape: &[usize], dtype: DType, bytes: &[u8]) -> HostTensor {
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().div_ceil(4) * 4, 0);
        let words = host::bytes_to_words(&padded).expect("padded to whole words");
        HostTensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            words,
        }
    }
}
