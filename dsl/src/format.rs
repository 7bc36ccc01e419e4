//! Storage formats decoded from raw bits inside kernels.
//!
//! Elements are packed little-endian in 32-bit words: element `i` of a bf16 buffer is bits
//! `16·(i mod 2) ..` of word `i / 2`; of an e4m3 buffer, bits `8·(i mod 4) ..` of word `i / 4`.
//! Arithmetic is always f32; decoding is exact and encoding (f32 → bf16) rounds to nearest even.
use cubecl::prelude::*;
use serde::{Deserialize, Serialize};

/// How a tensor's elements are stored. A kernel's comptime parameter: each format compiles its own kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Format {
    F32,
    Bf16,
}

impl Format {
    pub const ALL: [Format; 2] = [Format::F32, Format::Bf16];

    /// Elements in one 32-bit word.
    pub const fn per_word(self) -> u32 {
        match self {
            Format::F32 => 1,
            Format::Bf16 => 2,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::Bf16 => "bf16",
        }
    }

    pub fn parse(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Relative tolerance for results stored in this format (bf16 keeps 8 mantissa bits).
    pub const fn tolerance(self) -> f64 {
        match self {
            Format::F32 => 1e-5,
            Format::Bf16 => 1e-2,
        }
    }
}

impl core::fmt::Display for Format {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// bf16 bits (low 16 bits of `bits`) widened to f32: the bf16 is the top half of an f32.
#[cube]
pub fn bf16_to_f32(bits: u32) -> f32 {
    f32::reinterpret(bits << 16)
}

/// f32 narrowed to bf16 bits, rounding to nearest even; NaN stays NaN (quiet).
#[cube]
pub fn f32_to_bf16(value: f32) -> u32 {
    let bits = u32::reinterpret(value);
    let is_nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    // Adding 0x7fff plus the lowest kept bit rounds half to even.
    let rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    select(is_nan, (bits >> 16) | 0x40, rounded)
}

/// Element `lane` of a storage word, as f32.
#[cube]
pub fn unpack(word: u32, #[comptime] lane: u32, #[comptime] format: Format) -> f32 {
    match format {
        Format::F32 => f32::reinterpret(word),
        Format::Bf16 => bf16_to_f32((word >> (16 * lane)) & 0xffff),
    }
}

/// A storage word from `format.per_word()` values (`hi` is ignored for f32).
#[cube]
pub fn pack(lo: f32, hi: f32, #[comptime] format: Format) -> u32 {
    match format {
        Format::F32 => u32::reinterpret(lo),
        Format::Bf16 => f32_to_bf16(lo) | (f32_to_bf16(hi) << 16),
    }
}

/// Two f32 rounded to bf16 (nearest even) in one word, `lo` in the low half: [`pack`] for bf16 in one
/// hardware instruction (`cvt.rn.bf16x2.f32`, CUDA sm_80+) instead of about eight.
#[cube]
pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    let d: u32;
    gpu_asm!(
        "cvt.rn.bf16x2.f32 {d}, {hi}, {lo};",
        d = out(_) d,
        hi = in(_) hi,
        lo = in(_) lo,
        options(pure, nomem),
    );
    d
}

/// Four e4m3 codes (one word, lowest byte first) times `scale`, rounded to bf16 (exact for a power-of-two
/// scale: an e4m3 value has 4 significant bits), as two bf16 pairs: the hardware conversion of sm_89+
/// (`cvt.rn.f16x2.e4m3x2`, exact), instead of [`e4m3_to_f32`]'s dozen integer instructions per value.
#[cube]
#[allow(clippy::identity_op)] // the × 1 turns a local into a value for the asm
pub fn e4m3x4_scaled_to_bf16x4(word: u32, scale: f32) -> Vector<u32, Const<2>> {
    // As values, not addresses: a function's result reaches inline PTX as a local's address otherwise.
    // The result is operands %0 and %1 (named once in a comment so the operand list keeps it).
    let word = word * 1u32;
    let scale = scale * 1.0f32;
    let d: Vector<u32, Const<2>>;
    gpu_asm!(
        "{{\n// {d}\n.reg .b16 fp8_lo, fp8_hi, fp8_h0, fp8_h1, fp8_h2, fp8_h3;\n.reg .b32 fp8_x, fp8_y;",
        ".reg .f32 fp8_f0, fp8_f1, fp8_f2, fp8_f3;\nmov.b32 {{fp8_lo, fp8_hi}}, {word};",
        "cvt.rn.f16x2.e4m3x2 fp8_x, fp8_lo;\ncvt.rn.f16x2.e4m3x2 fp8_y, fp8_hi;",
        "mov.b32 {{fp8_h0, fp8_h1}}, fp8_x;\nmov.b32 {{fp8_h2, fp8_h3}}, fp8_y;",
        "cvt.f32.f16 fp8_f0, fp8_h0;\ncvt.f32.f16 fp8_f1, fp8_h1;\ncvt.f32.f16 fp8_f2, fp8_h2;\ncvt.f32.f16 fp8_f3, fp8_h3;",
        "mul.f32 fp8_f0, fp8_f0, {scale};\nmul.f32 fp8_f1, fp8_f1, {scale};",
        "mul.f32 fp8_f2, fp8_f2, {scale};\nmul.f32 fp8_f3, fp8_f3, {scale};",
        "cvt.rn.bf16x2.f32 %0, fp8_f1, fp8_f0;\ncvt.rn.bf16x2.f32 %1, fp8_f3, fp8_f2;\n}}",
        d = out(_) d,
        word = in(_) word,
        scale = in(_) scale,
        // No memory clobber: a gather's loads of the next chunks may move ahead of this conversion.
        options(pure, nomem),
    );
    d
}

/// Element `index` of a buffer in `format`, as f32 (random access; reads the word holding it).
#[cube]
pub fn read_element(buffer: &[u32], index: usize, #[comptime] format: Format) -> f32 {
    match format {
        Format::F32 => f32::reinterpret(buffer[index]),
        Format::Bf16 => {
            let word = buffer[index / 2];
            bf16_to_f32((word >> (16 * (index % 2) as u32)) & 0xffff)
        }
    }
}

/// FP8 e4m3 (the "fn" variant: no infinities, 0x7f/0xff are NaN) bits widened to f32.
#[cube]
pub fn e4m3_to_f32(bits: u32) -> f32 {
    let sign = (bits & 0x80) << 24;
    let exponent = (bits >> 3) & 0xf;
    let mantissa = bits & 0x7;
    // Normal: rebias the exponent (7 → 127) and move the 3 mantissa bits to the top of f32's 23.
    let normal = f32::reinterpret(sign | ((exponent + 120) << 23) | (mantissa << 20));
    // Subnormal: mantissa · 2⁻⁹, signed.
    let magnitude = f32::cast_from(mantissa) * 0.001953125;
    let subnormal = select(sign != 0, -magnitude, magnitude);
    let is_nan = (bits & 0x7f) == 0x7f;
    select(
        is_nan,
        f32::reinterpret(0x7fc0_0000u32),
        select(exponent == 0, subnormal, normal),
    )
}

/// Element `index` of an e4m3 buffer (four codes per word), as f32.
#[cube]
pub fn read_e4m3(buffer: &[u32], index: usize) -> f32 {
    let word = buffer[index / 4];
    e4m3_to_f32((word >> (8 * (index % 4) as u32)) & 0xff)
}

/// Element `index` of an e4m3 buffer times its block's scale: `scales[index / block]`.
#[cube]
pub fn read_e4m3_scaled(buffer: &[u32], scales: &[f32], index: usize, #[comptime] block: usize) -> f32 {
    read_e4m3(buffer, index) * scales[index / block]
}

/// `acc` plus the products of the four e4m3 codes of `x` and `y`, byte by byte (in that order).
#[cube]
pub fn e4m3x4_dot_add(acc: f32, x: u32, y: u32) -> f32 {
    let mut sum = acc;
    #[unroll]
    for b in 0..4u32 {
        sum += e4m3_to_f32((x >> (8 * b)) & 0xff) * e4m3_to_f32((y >> (8 * b)) & 0xff);
    }
    sum
}

/// f32 narrowed to FP8 e4m3 bits (0..=0xff), rounding to nearest even in integer arithmetic (the same
/// result on every backend, fast-math or not). `value` must be finite with |value| ≤ 448 (callers scale
/// first); f32 subnormals become ±0.
#[cube]
pub fn f32_to_e4m3(value: f32) -> u32 {
    let bits = u32::reinterpret(value);
    let sign = (bits >> 24) & 0x80;
    let biased = (bits >> 23) & 0xff;
    let mantissa = bits & 0x7f_ffff;
    let mut code = 0u32;
    if biased >= 121 {
        // Normal in e4m3 (|value| ≥ 2⁻⁶): keep 3 of 23 mantissa bits; a carry moves into the exponent.
        let dropped = mantissa & 0xf_ffff;
        let kept = mantissa >> 20;
        let up = dropped > 0x8_0000 || (dropped == 0x8_0000 && (kept & 1) == 1);
        code = ((biased - 120) << 3) + kept + u32::cast_from(up);
    } else if biased >= 117 {
        // Subnormal in e4m3: value = q·2⁻⁹ with q = round(significand · 2^(biased − 141)); below 2⁻¹⁰
        // everything rounds to 0 (and the shift stays ≤ 24).
        let significand = mantissa | 0x80_0000;
        let shift = 141 - biased;
        let kept = significand >> shift;
        let dropped = significand & ((1u32 << shift) - 1);
        let half = 1u32 << (shift - 1);
        let up = dropped > half || (dropped == half && (kept & 1) == 1);
        code = kept + u32::cast_from(up);
    }
    sign | code
}

/// The power-of-two scale DeepSeek's FP8 KV cache uses for a group with absolute maximum `amax`:
/// 2^ceil(log2(amax / 448)), computed exactly from the bits (amax = m·2^E, m ∈ [1, 2): 2^(E−8), or
/// 2^(E−7) when m > 1.75). A zero group gets scale 1.
#[cube]
pub fn e4m3_group_scale(amax: f32) -> f32 {
    let bits = u32::reinterpret(amax);
    let biased = (bits >> 23) & 0xff;
    let exponent = biased + u32::cast_from((bits & 0x7f_ffff) > 0x60_0000);
    // 2^(E − 8 (+1)) as f32 bits: biased exponent − 8 (+1), clamped to the normal range.
    let scale_biased = select(exponent > 9, exponent - 8, 1u32);
    select(amax > 0.0, f32::reinterpret(scale_biased << 23), 1.0)
}

/// Four e4m3 bytes of `word` as four f16 (two words, bytes 0–1 then 2–3) equal to the values times 2⁻⁸:
/// the sign moves to bit 15 and exponent·mantissa under f16's (bias 15 against 7), so e4m3 subnormals land
/// on f16 subnormals. Exact, three integer operations per value: how FP8 operands feed f16 tensor cores.
#[cube]
pub fn e4m3x4_to_f16x4(word: u32) -> (u32, u32) {
    let lo = ((word & 0x80) << 8) | ((word & 0x7f) << 7) | ((word & 0x8000) << 16) | ((word & 0x7f00) << 15);
    let hi = ((word & 0x80_0000) >> 8) | ((word & 0x7f_0000) >> 9) | (word & 0x8000_0000) | ((word & 0x7f00_0000) >> 1);
    (lo, hi)
}

/// Eight e4m3 codes (words `lo`, `hi`) as one 16-byte chunk of eight f16 (values × 2⁻⁸, as
/// [`e4m3x4_to_f16x4`]): a shared-memory row chunk for f16 tensor cores.
#[cube]
pub fn e4m3x8_to_f16_chunk(lo: u32, hi: u32) -> Vector<u32, Const<4>> {
    let (a, b) = e4m3x4_to_f16x4(lo);
    let (c, d) = e4m3x4_to_f16x4(hi);
    let mut chunk = Vector::<u32, Const<4>>::new(0u32);
    chunk.insert(0usize, a);
    chunk.insert(1usize, b);
    chunk.insert(2usize, c);
    chunk.insert(3usize, d);
    chunk
}

/// Four e4m3 codes of `word` times `scale`, rounded to bf16: two words (codes 0–1, then 2–3), by the
/// hardware's conversions — `cvt.rn.f16x2.e4m3x2` (exact), an f32 multiply, `cvt.rn.bf16x2.f32` — at
/// about 4 instructions a value (CUDA sm_89+ only; how block-scaled FP8 weights feed bf16 tensor cores).
#[cube]
pub fn e4m3x4_to_bf16x4_scaled(word: u32, scale: f32) -> Vector<u32, Const<2>> {
    let out: Vector<u32, Const<2>>;
    // Operands: out = %0, %1; word = %2; scale = %3.
    gpu_asm!(
        "{{\n// {out}\n.reg .b16 q0, q1, e0, e1, e2, e3;\n.reg .b32 p0, p1;\n.reg .f32 f0, f1, f2, f3;",
        "mov.b32 {{q0, q1}}, {word};\ncvt.rn.f16x2.e4m3x2 p0, q0;\ncvt.rn.f16x2.e4m3x2 p1, q1;",
        "mov.b32 {{e0, e1}}, p0;\nmov.b32 {{e2, e3}}, p1;",
        "cvt.f32.f16 f0, e0;\ncvt.f32.f16 f1, e1;\ncvt.f32.f16 f2, e2;\ncvt.f32.f16 f3, e3;",
        "mul.f32 f0, f0, {scale};\nmul.f32 f1, f1, {scale};\nmul.f32 f2, f2, {scale};\nmul.f32 f3, f3, {scale};",
        "cvt.rn.bf16x2.f32 %0, f1, f0;\ncvt.rn.bf16x2.f32 %1, f3, f2;\n}}",
        out = out(_) out,
        word = in(_) word,
        scale = in(_) scale,
        options(pure, nomem),
    );
    out
}

/// Sixteen e4m3 codes (a 16-byte chunk) times `scale` as two 16-byte chunks of bf16 (codes 0–7, 8–15),
/// by [`e4m3x4_to_bf16x4_scaled`] (CUDA sm_89+).
#[cube]
pub fn e4m3x16_to_bf16_chunks(
    codes: Vector<u32, Const<4>>,
    scale: f32,
) -> (Vector<u32, Const<4>>, Vector<u32, Const<4>>) {
    let mut lo = Vector::<u32, Const<4>>::new(0u32);
    let mut hi = Vector::<u32, Const<4>>::new(0u32);
    #[unroll]
    for w in 0..4usize {
        let pairs = e4m3x4_to_bf16x4_scaled(codes.extract(w), scale);
        if comptime!(w < 2) {
            lo.insert(2 * w, pairs.extract(0usize));
            lo.insert(2 * w + 1, pairs.extract(1usize));
        } else {
            hi.insert(2 * w - 4, pairs.extract(0usize));
            hi.insert(2 * w - 3, pairs.extract(1usize));
        }
    }
    (lo, hi)
}
