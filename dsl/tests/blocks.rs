//! The DSL's building blocks, each run in a small kernel on the test device (`NSA_TEST_DEVICE`, default
//! the best found: lavapipe in CI) and compared with a host computation on random inputs.
use cubecl::prelude::*;
use nsa_dsl::format::{bf16_to_f32, e4m3x4_to_f16x4, f32_to_bf16, read_e4m3_scaled, read_element};
use nsa_dsl::load::{gathered_row_offset, gathered_row_valid};
use nsa_dsl::reduce::cube_sum;
use nsa_dsl::softmax::{online_softmax_logsumexp, online_softmax_merge, online_softmax_new, online_softmax_push};
use nsa_dsl::{Format, Reduction, host};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn device() -> nsa_backends::Device {
    let spec = std::env::var("NSA_TEST_DEVICE").ok();
    nsa_backends::select(spec.as_deref()).expect("a test device")
}

fn buffer(handle: &cubecl::server::Handle, len: usize) -> BufferArg {
    unsafe { BufferArg::from_raw_parts(handle.clone(), len) }
}

fn read_words(device: &nsa_backends::Device, handle: cubecl::server::Handle) -> Vec<u32> {
    bytemuck::cast_slice::<u8, u32>(&device.client.read_one_unchecked(handle)).to_vec()
}

#[cube(launch)]
fn decode_e4m3(bytes: &[u32], scales: &[f32], out: &mut [f32], #[comptime] block: usize) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        out[i] = read_e4m3_scaled(bytes, scales, i, block);
    }
}

#[test]
fn e4m3_decodes_every_code_with_block_scales() {
    let device = device();
    let mut rng = StdRng::seed_from_u64(1);
    let codes: Vec<u8> = (0..=255u8).collect();
    let block = 32;
    let scales: Vec<f32> = (0..256 / block).map(|_| rng.random_range(0.01f32..4.0)).collect();
    let client = &device.client;
    let bytes = client.create_from_slice(bytemuck::cast_slice(&host::pack_bytes(&codes)));
    let scales_h = client.create_from_slice(bytemuck::cast_slice(&scales));
    let out = client.create_from_slice(bytemuck::cast_slice(&vec![0x7fc0_0001u32; 256]));
    decode_e4m3::launch(
        client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(256),
        buffer(&bytes, 64),
        buffer(&scales_h, scales.len()),
        buffer(&out, 256),
        block,
    );
    let got = read_words(&device, out);
    for (i, code) in codes.iter().enumerate() {
        let expected = host::e4m3_to_f32(*code) * scales[i / block];
        let got = f32::from_bits(got[i]);
        if expected.is_nan() {
            assert!(got.is_nan(), "code {code:#x}: expected NaN, got {got}");
        } else {
            assert_eq!(got, expected, "code {code:#x}");
        }
    }
}

#[cube(launch)]
fn widen_e4m3(words: &[u32], out: &mut [u32]) {
    let i = ABSOLUTE_POS;
    if i < words.len() {
        let (lo, hi) = e4m3x4_to_f16x4(words[i]);
        out[2 * i] = lo;
        out[2 * i + 1] = hi;
    }
}

#[test]
fn e4m3_widens_to_f16_exactly() {
    let device = device();
    // Every code in each of the four byte positions.
    let words: Vec<u32> = (0..256u32)
        .map(|c| c | ((c ^ 0x5a) << 8) | ((c ^ 0xa5) << 16) | ((255 - c) << 24))
        .collect();
    let client = &device.client;
    let input = client.create_from_slice(bytemuck::cast_slice(&words));
    let output = client.empty(words.len() * 8);
    widen_e4m3::launch(
        client,
        CubeCount::Static(2, 1, 1),
        CubeDim::new_1d(128),
        buffer(&input, words.len()),
        buffer(&output, 2 * words.len()),
    );
    let out = read_words(&device, output);
    for (i, word) in words.iter().enumerate() {
        for b in 0..4 {
            let code = (word >> (8 * b)) as u8;
            if code & 0x7f == 0x7f {
                continue; // NaN
            }
            let half = (out[2 * i + b / 2] >> (16 * (b % 2))) as u16;
            let widened = half::f16::from_bits(half).to_f64() * 256.0;
            assert_eq!(widened, host::e4m3_to_f32(code) as f64, "code {code:#04x} in byte {b}");
        }
    }
}

#[cube(launch)]
fn round_trip_bf16(input: &[f32], encoded: &mut [u32], decoded: &mut [f32]) {
    let i = ABSOLUTE_POS;
    if i < input.len() {
        let bits = f32_to_bf16(input[i]);
        encoded[i] = bits;
        decoded[i] = bf16_to_f32(bits);
    }
}

#[test]
fn bf16_encode_rounds_to_nearest_even_and_decodes() {
    let device = device();
    let mut rng = StdRng::seed_from_u64(2);
    let mut values: Vec<f32> = (0..4000)
        .map(|_| f32::from_bits(rng.random::<u32>() & 0xbfff_ffff))
        .collect();
    // Exact ties (round to even both ways), the largest finite, infinities, NaN, signed zero, subnormals.
    values.extend([
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -0.0,
        f32::from_bits(1),
    ]);
    let n = values.len();
    let client = &device.client;
    let input = client.create_from_slice(bytemuck::cast_slice(&values));
    let encoded = client.create_from_slice(bytemuck::cast_slice(&vec![0u32; n]));
    let decoded = client.create_from_slice(bytemuck::cast_slice(&vec![0u32; n]));
    round_trip_bf16::launch(
        client,
        CubeCount::Static(n.div_ceil(256) as u32, 1, 1),
        CubeDim::new_1d(256),
        buffer(&input, n),
        buffer(&encoded, n),
        buffer(&decoded, n),
    );
    let (encoded, decoded) = (read_words(&device, encoded), read_words(&device, decoded));
    for (i, v) in values.iter().enumerate() {
        let expected = half::bf16::from_f32(*v);
        if v.is_nan() {
            assert!(half::bf16::from_bits(encoded[i] as u16).is_nan() && f32::from_bits(decoded[i]).is_nan());
            continue;
        }
        assert_eq!(
            encoded[i] as u16,
            expected.to_bits(),
            "encode {v:e} ({:#x})",
            v.to_bits()
        );
        assert_eq!(f32::from_bits(decoded[i]), expected.to_f32(), "decode {v:e}");
    }
}

#[cube(launch)]
fn sum_per_cube(input: &[f32], out: &mut [f32], #[comptime] cube_size: u32, #[comptime] reduction: Reduction) {
    let total = cube_sum(input[ABSOLUTE_POS], cube_size, reduction);
    // Every unit must get the total, not only unit 0.
    let agrees = total == cube_sum(input[ABSOLUTE_POS], cube_size, reduction);
    if UNIT_POS == CUBE_DIM - 1 {
        // A sentinel far from any sum of 256 values in [−1, 1] (WGSL has no NaN literal).
        out[CUBE_POS] = select(agrees, total, -1.0e6f32);
    }
}

#[test]
fn cube_sum_matches_host_for_each_available_reduction() {
    let device = device();
    let mut rng = StdRng::seed_from_u64(3);
    let mut ran = 0;
    for reduction in [Reduction::Shared, Reduction::Plane] {
        if reduction == Reduction::Plane && !device.features().plane_ops {
            println!("plane reduction skipped: {:?} has no plane operations", device);
            continue;
        }
        for cube_size in [32u32, 256] {
            let cubes = 9;
            let values: Vec<f32> = (0..cubes * cube_size as usize)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let client = &device.client;
            let input = client.create_from_slice(bytemuck::cast_slice(&values));
            let out = client.create_from_slice(bytemuck::cast_slice(&vec![0x7fc0_0001u32; cubes]));
            sum_per_cube::launch(
                client,
                CubeCount::Static(cubes as u32, 1, 1),
                CubeDim::new_1d(cube_size),
                buffer(&input, values.len()),
                buffer(&out, cubes),
                cube_size,
                reduction,
            );
            let got = read_words(&device, out);
            for (c, chunk) in values.chunks(cube_size as usize).enumerate() {
                let expected: f64 = chunk.iter().map(|v| *v as f64).sum();
                let got = f32::from_bits(got[c]) as f64;
                assert!(
                    (got - expected).abs() < 1e-4,
                    "{reduction:?} cube {c}: {got} vs {expected}"
                );
            }
            ran += 1;
        }
    }
    assert!(ran > 0);
}

#[cube(launch)]
fn logsumexp_rows(scores: &mut [f32], out: &mut [f32], row_len: usize) {
    // Unit r folds the first half of row r one score at a time, the second half into another state,
    // then merges them: both update paths are exercised.
    let row = ABSOLUTE_POS;
    if row < out.len() {
        let mut first = online_softmax_new();
        let mut second = online_softmax_new();
        let half = row_len / 2;
        for i in 0..half {
            let _ = online_softmax_push(&mut first, scores[row * row_len + i]);
        }
        for i in half..row_len {
            let _ = online_softmax_push(&mut second, scores[row * row_len + i]);
        }
        online_softmax_merge(&mut first, second);
        out[row] = online_softmax_logsumexp(&first);
    }
}

#[test]
fn online_softmax_gives_logsumexp() {
    let device = device();
    let mut rng = StdRng::seed_from_u64(4);
    let (rows, row_len) = (37, 301);
    // Large offsets: a naive Σexp would overflow; the running max must keep it finite.
    let scores: Vec<f32> = (0..rows * row_len).map(|_| rng.random_range(-30.0f32..90.0)).collect();
    let client = &device.client;
    let input = client.create_from_slice(bytemuck::cast_slice(&scores));
    let out = client.create_from_slice(bytemuck::cast_slice(&vec![0x7fc0_0001u32; rows]));
    logsumexp_rows::launch(
        client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(64),
        buffer(&input, scores.len()),
        buffer(&out, rows),
        row_len,
    );
    let got = read_words(&device, out);
    for (r, row) in scores.chunks(row_len).enumerate() {
        let max = row.iter().fold(f64::MIN, |m, v| m.max(*v as f64));
        let expected = max + row.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln();
        let got = f32::from_bits(got[r]) as f64;
        assert!(
            (got - expected).abs() / expected.abs() < 1e-5,
            "row {r}: {got} vs {expected}"
        );
    }
}

#[cube(launch)]
fn gather_rows<N: Size>(rows: &[Vector<u32, N>], indices: &[i32], out: &mut [Vector<u32, N>], row_vectors: usize) {
    // Unit (slot, v) copies vector v of row indices[slot]; a −1 index writes zeros.
    let slot = CUBE_POS;
    let v = UNIT_POS as usize;
    if v < row_vectors {
        let mut value = Vector::<u32, N>::new(0u32);
        if gathered_row_valid(indices, slot) {
            value = rows[gathered_row_offset(indices, slot, row_vectors) + v];
        }
        out[slot * row_vectors + v] = value;
    }
}

#[test]
fn gathered_vector_loads_follow_the_indices() {
    let device = device();
    let mut rng = StdRng::seed_from_u64(5);
    for vector in [1usize, 2, 4] {
        let (num_rows, row_words, slots) = (50, 16, 23);
        let rows: Vec<u32> = (0..num_rows * row_words).map(|_| rng.random()).collect();
        let indices: Vec<i32> = (0..slots)
            .map(|s| {
                if s % 7 == 3 {
                    -1
                } else {
                    rng.random_range(0..num_rows as i32)
                }
            })
            .collect();
        let client = &device.client;
        let rows_h = client.create_from_slice(bytemuck::cast_slice(&rows));
        let idx_h = client.create_from_slice(bytemuck::cast_slice(&indices));
        let out = client.create_from_slice(bytemuck::cast_slice(&vec![0xdead_beefu32; slots * row_words]));
        let row_vectors = row_words / vector;
        gather_rows::launch(
            client,
            CubeCount::Static(slots as u32, 1, 1),
            CubeDim::new_1d(row_vectors as u32),
            vector,
            buffer(&rows_h, rows.len() / vector),
            buffer(&idx_h, slots),
            buffer(&out, slots * row_vectors),
            row_vectors,
        );
        let got = read_words(&device, out);
        for (s, index) in indices.iter().enumerate() {
            let want: Vec<u32> = if *index < 0 {
                vec![0; row_words]
            } else {
                rows[*index as usize * row_words..][..row_words].to_vec()
            };
            assert_eq!(
                &got[s * row_words..][..row_words],
                want.as_slice(),
                "vector {vector}, slot {s}"
            );
        }
    }
}

#[cube(launch)]
fn read_elements(words: &[u32], out: &mut [f32], #[comptime] format: Format) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        out[i] = read_element(words, i, format);
    }
}

#[test]
fn read_element_unpacks_both_formats() {
    let device = device();
    let mut rng = StdRng::seed_from_u64(6);
    for format in Format::ALL {
        let n = 1001;
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-100.0f32..100.0)).collect();
        let words = host::pack(&values, format);
        let client = &device.client;
        let input = client.create_from_slice(bytemuck::cast_slice(&words));
        let out = client.create_from_slice(bytemuck::cast_slice(&vec![0x7fc0_0001u32; n]));
        read_elements::launch(
            client,
            CubeCount::Static(n.div_ceil(256) as u32, 1, 1),
            CubeDim::new_1d(256),
            buffer(&input, words.len()),
            buffer(&out, n),
            format,
        );
        let got: Vec<f32> = read_words(&device, out).into_iter().map(f32::from_bits).collect();
        assert_eq!(got, host::quantize(&values, format), "{format}");
    }
}
