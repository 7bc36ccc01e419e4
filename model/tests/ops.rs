//! nsa's custom ops on burn tensors (default wgpu device: lavapipe in CI) against f64 products, with
//! operands in the layouts the device model passes: contiguous, transposed views, swapped batch dims.
use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use nsa_model::ops;

fn values(n: usize, seed: u64) -> Vec<f32> {
    // A small LCG: fresh non-zero values in [-1, 1) without a rand dependency.
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn host_matmul(a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; batch * m * n];
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                c[(z * m + i) * n + j] = (0..k)
                    .map(|p| a[(z * m + i) * k + p] as f64 * b[(z * k + p) * n + j] as f64)
                    .sum();
            }
        }
    }
    c
}

fn check(ours: Vec<f32>, expected: &[f64], k: usize, what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}: length");
    for (i, (x, y)) in ours.iter().zip(expected).enumerate() {
        // f32 sums of k products of values in [-1, 1).
        let bound = 1e-6 * (k as f64).sqrt() * 4.0 + 1e-6 * y.abs();
        assert!((*x as f64 - y).abs() <= bound, "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn matmul_is_exact_f32_for_every_layout_the_model_passes() {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let (m, k, n) = (37, 70, 45);
    let a = values(m * k, 1);
    let b = values(k * n, 2);
    let expected = host_matmul(&a, &b, 1, m, k, n);
    let ta = || Tensor::<2>::from_data(TensorData::new(a.clone(), [m, k]), &device);
    let tb = Tensor::<2>::from_data(TensorData::new(b.clone(), [k, n]), &device);
    // b stored [n, k] and viewed transposed (the model's weights), a plain.
    let b_t: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
    let tb_view = Tensor::<2>::from_data(TensorData::new(b_t, [n, k]), &device).transpose();
    for (what, rhs) in [("contiguous", tb.clone()), ("transposed view", tb_view)] {
        let out = ops::matmul(ta(), rhs).into_data().try_to_vec::<f32>().unwrap();
        check(out, &expected, k, what);
    }
    // A column slice of a wider tensor: strided rows, copied to a packed layout first.
    let wide: Vec<f32> = (0..m * (k + 3))
        .map(|i| {
            if i % (k + 3) < k {
                a[i / (k + 3) * k + i % (k + 3)]
            } else {
                9.0
            }
        })
        .collect();
    let sliced = Tensor::<2>::from_data(TensorData::new(wide, [m, k + 3]), &device).slice([0..m, 0..k]);
    check(
        ops::matmul(sliced, tb).into_data().try_to_vec::<f32>().unwrap(),
        &expected,
        k,
        "column slice",
    );

    // Batched, with the batch dimension swapped in as attention does ([n, h, d] → [h, n, d]).
    let (h, s, d) = (3, 19, 24);
    let q = values(s * h * d, 3);
    let kk = values(s * h * d, 4);
    let q3 = Tensor::<3>::from_data(TensorData::new(q.clone(), [s, h, d]), &device).swap_dims(0, 1);
    let k3 = Tensor::<3>::from_data(TensorData::new(kk.clone(), [s, h, d]), &device).swap_dims(0, 1);
    let out = ops::matmul(q3, k3.swap_dims(1, 2))
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let gather = |x: &[f32]| -> Vec<f32> {
        (0..h * s * d)
            .map(|i| {
                let (z, r, c) = (i / (s * d), i / d % s, i % d);
                x[(r * h + z) * d + c]
            })
            .collect()
    };
    let (qh, kh) = (gather(&q), gather(&kk));
    let kh_t: Vec<f32> = (0..h * d * s)
        .map(|i| {
            let (z, r, c) = (i / (d * s), i / s % d, i % s);
            kh[(z * s + c) * d + r]
        })
        .collect();
    check(out, &host_matmul(&qh, &kh_t, h, s, d, s), d, "batched q·kᵀ");
}
