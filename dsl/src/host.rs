//! Host-side twins of the storage formats: packing test data into words and reading results back.
use crate::Format;
use half::bf16;

/// Packs `values` into storage words (bf16 rounds to nearest even; an odd count is padded with 0).
pub fn pack(values: &[f32], format: Format) -> Vec<u32> {
    match format {
        Format::F32 => values.iter().map(|v| v.to_bits()).collect(),
        Format::Bf16 => values
            .chunks(2)
            .map(|pair| {
                let lo = bf16::from_f32(pair[0]).to_bits() as u32;
                let hi = pair.get(1).map_or(0, |v| bf16::from_f32(*v).to_bits() as u32);
                lo | (hi << 16)
            })
            .collect(),
    }
}

/// The first `len` elements of storage words, as f32.
pub fn unpack(words: &[u32], format: Format, len: usize) -> Vec<f32> {
    match format {
        Format::F32 => words[..len].iter().map(|w| f32::from_bits(*w)).collect(),
        Format::Bf16 => (0..len)
            .map(|i| bf16::from_bits((words[i / 2] >> (16 * (i % 2))) as u16).to_f32())
            .collect(),
    }
}

/// Values as the format stores them (what a kernel reads after `pack`).
pub fn quantize(values: &[f32], format: Format) -> Vec<f32> {
    unpack(&pack(values, format), format, values.len())
}

/// FP8 e4m3fn bits as f32, computed from the definition (the reference for the kernel decoder).
pub fn e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = ((bits >> 3) & 0xf) as i32;
    let mantissa = (bits & 0x7) as f32;
    if bits & 0x7f == 0x7f {
        f32::NAN
    } else if exponent == 0 {
        sign * mantissa / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    }
}

/// Bytes packed four to a word, little-endian.
pub fn pack_bytes(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u32, |w, (i, b)| w | ((*b as u32) << (8 * i)))
        })
        .collect()
}

/// The words as little-endian bytes (a safetensors payload).
pub fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Little-endian bytes as words; `None` if the length is not a whole number of words.
pub fn bytes_to_words(bytes: &[u8]) -> Option<Vec<u32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// Nearest e4m3 code to `value` (|value| ≤ 448), ties to the even code: a search over the 127 positive
/// codes' values (increasing with the code), independent of the kernel's bit arithmetic.
pub fn f32_to_e4m3(value: f32) -> u8 {
    let sign = if value.is_sign_negative() { 0x80 } else { 0 };
    let magnitude = value.abs() as f64;
    let decoded = |code: u8| e4m3_to_f32(code) as f64;
    // The last code not above the magnitude, then the nearer of it and the next.
    let (mut low, mut high) = (0u8, 0x7eu8);
    while low < high {
        let mid = (low + high).div_ceil(2);
        if decoded(mid) <= magnitude {
            low = mid
        } else {
            high = mid - 1
        }
    }
    let mut best = low;
    if low < 0x7e {
        let (below, above) = (magnitude - decoded(low), decoded(low + 1) - magnitude);
        if above < below || (above == below && (low + 1) % 2 == 0) {
            best = low + 1;
        }
    }
    sign | best
}

/// The FP8 KV cache's group scale: 2^ceil(log2(amax / 448)) (1 for a zero group), in f64.
pub fn e4m3_group_scale(amax: f32) -> f32 {
    if amax == 0.0 {
        1.0
    } else {
        2f64.powi((amax as f64 / 448.0).log2().ceil() as i32) as f32
    }
}

#[cfg(test)]
mod e4m3_search_tests {
    use super::{e4m3_to_f32, f32_to_e4m3};

    /// The definition: the nearest of all 127 positive codes, ties to the even code.
    fn exhaustive(value: f32) -> u8 {
        let sign = if value.is_sign_negative() { 0x80 } else { 0 };
        let magnitude = value.abs() as f64;
        let mut best = 0u8;
        for code in 1..=0x7eu8 {
            let (candidate, current) = (e4m3_to_f32(code) as f64, e4m3_to_f32(best) as f64);
            let (d_candidate, d_current) = ((candidate - magnitude).abs(), (current - magnitude).abs());
            if d_candidate < d_current || (d_candidate == d_current && code % 2 == 0) {
                best = code;
            }
        }
        sign | best
    }

    #[test]
    fn binary_search_equals_the_exhaustive_definition() {
        let mut values = vec![0.0f32, -0.0, 448.0, 500.0, 1e-9, -3.3];
        for code in 0..0x7eu8 {
            let (a, b) = (e4m3_to_f32(code), e4m3_to_f32(code + 1));
            // Each code, the midpoint to the next (a tie), and just either side of it.
            let mid = (a + b) / 2.0;
            values.extend([
                a,
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ]);
        }
        let mut x = 0x1234_5678u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            values.push((x as f32 / u32::MAX as f32 - 0.5) * 2.0 * 10f32.powi((x % 9) as i32 - 5) * 448.0);
        }
        for v in values.iter().flat_map(|v| [*v, -*v]) {
            assert_eq!(f32_to_e4m3(v), exhaustive(v), "{v}");
        }
    }
}
