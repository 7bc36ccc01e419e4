//! nsa kernels as custom ops on burn tensors: the buffers of burn's CubeCL backend (one type for every
//! runtime) are handed to our launches, and the result comes back as a burn tensor.
use burn::backend::Cube;
use burn::tensor::{DType, Int, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use nsa_backends::cubecl::server::Handle;
use nsa_dsl::Format;
use nsa_kernels::Problem;
use nsa_kernels::gemm::{self, Operand};
use nsa_kernels::tuning::default_variant;

/// a · b for f32 tensors of rank 2 ([m, k] · [k, n]) or 3 (the same batch on both sides), in exact f32
/// on every runtime. Burn's own matmul rounds f32 to tf32 on NVIDIA tensor cores (~1e-3 relative), too
/// coarse for the golden test; this is cubek's f32 routine through nsa's gemm.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    assert!(D == 2 || D == 3, "matmul takes rank 2 or 3");
    let (a_dims, b_dims) = (a.dims(), b.dims());
    assert_eq!(a_dims[D - 1], b_dims[D - 2], "matmul: inner dimensions differ");
    assert_eq!(a_dims[..D - 2], b_dims[..D - 2], "matmul: batch dimensions differ");
    let mut out_dims = a_dims;
    out_dims[D - 1] = b_dims[D - 1];
    let device = a.device();
    let out = Tensor::<D>::empty(out_dims, &device);
    let (a, b, c) = (primitive(a), primitive(b), primitive(out));
    assert!(
        a.dtype == DType::F32 && b.dtype == DType::F32,
        "nsa's matmul op takes f32 tensors"
    );
    let client = c.client.clone();
    if let Err(error) = gemm::matmul(&client, Format::F32, operand(&a), operand(&b), operand(&c)) {
        panic!("matmul {a_dims:?} · {b_dims:?} cannot run on {device:?}: {error}");
    }
    Tensor::from_primitive::<Cube>(c)
}

fn primitive<const D: usize>(tensor: Tensor<D>) -> CubeTensor {
    let tensor = tensor
        .try_into_primitive::<Cube>()
        .expect("the device model's tensors live on burn's CubeCL backend");
    let shape = tensor.meta.shape().to_vec();
    let strides = tensor.meta.strides().to_vec();
    if matrix_layout(&shape, &strides) {
        tensor
    } else {
        into_contiguous(tensor)
    }
}

/// Whether cubek reads the operand as it is: each matrix row- or column-major and densely packed, batches
/// one after another.
fn matrix_layout(shape: &[usize], strides: &[usize]) -> bool {
    let d = shape.len();
    let (rows, cols) = (shape[d - 2], shape[d - 1]);
    let packed = (strides[d - 1] == 1 && strides[d - 2] == cols) || (strides[d - 2] == 1 && strides[d - 1] == rows);
    packed && (d == 2 || strides[0] == rows * cols)
}

fn operand(tensor: &CubeTensor) -> Operand {
    Operand::new(tensor.handle.clone(), tensor.meta.shape(), tensor.meta.strides())
}

/// A kernel input: the tensor's buffer, row-major.
fn input<const D: usize>(tensor: Tensor<D>) -> Handle {
    into_contiguous(primitive(tensor)).handle
}

/// A kernel input of i32 indices (burn's ints may be i64).
fn int_input(tensor: Tensor<2, Int>) -> Handle {
    let tensor = tensor
        .cast(DType::I32)
        .try_into_primitive::<Cube>()
        .expect("a CubeCL tensor");
    into_contiguous(tensor).handle
}

/// The cubecl device a tensor lives on (to wrap kernel outputs as burn tensors).
fn cube_device<const D: usize>(tensor: &Tensor<D>) -> nsa_backends::cubecl::Device {
    tensor
        .clone()
        .try_into_primitive::<Cube>()
        .expect("a CubeCL tensor")
        .device
}

/// A kernel's output buffer seen as i32 words [rows, cols] (bits to copy, slice and gather, as stored).
fn words_output(
    device: &nsa_backends::Device,
    on: nsa_backends::cubecl::Device,
    shape: [usize; 2],
    handle: Handle,
) -> Tensor<2, Int> {
    let tensor = CubeTensor::new_contiguous(device.client.clone(), on, shape.into(), handle, DType::I32);
    Tensor::<2, Int>::from_primitive::<Cube>(tensor)
}

/// A kernel's i32 output [rows, cols] as a burn int tensor of burn's default int type (what its own ops,
/// scatter and gather, produce and take).
fn int_output(
    device: &nsa_backends::Device,
    on: nsa_backends::cubecl::Device,
    shape: [usize; 2],
    handle: Handle,
) -> Tensor<2, Int> {
    let ints = words_output(device, on, shape, handle);
    let default = Tensor::<1, Int>::zeros([1], &ints.device()).dtype();
    ints.cast(default)
}

/// nsa's view of the device `tensor` lives on, with burn's own client: registered kernels launched with
/// it read and write burn's buffers.
pub fn kernel_device(tensor: &Tensor<2>) -> nsa_backends::Device {
    use nsa_backends::{RuntimeKind, cubecl};
    let t = tensor.clone().try_into_primitive::<Cube>().expect("a CubeCL tensor");
    let runtime = match &t.device {
        cubecl::Device::Cuda(_) => RuntimeKind::Cuda,
        cubecl::Device::Hip(_) => RuntimeKind::Hip,
        _ => RuntimeKind::Wgpu,
    };
    nsa_backends::Device::from_client(runtime, 0, &t.device, t.client)
}

/// Launches registered kernel `name` on the default variant for `problem` (the first the device runs).
fn launch(device: &nsa_backends::Device, name: &str, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
    let kernel = nsa_kernels::find_kernel(name).expect("a registered kernel");
    kernel.validate(problem).unwrap_or_else(|e| panic!("{name}: {e}"));
    let variant = default_variant(kernel, problem, device.features())
        .unwrap_or_else(|| panic!("no variant of {name} runs {problem} on {}", device.info.id()));
    kernel.launch(variant, device, problem, inputs, outputs);
}

/// The lightning indexer's selection through nsa's `indexer_logits` and `topk` kernels: for each of the
/// n queries, at positions `first`, `first` + 1, …, the `k` causal keys of highest score
/// Σ_h w[t, h] · ReLU(q[t, h] · key[s]) (scales folded into w), as positions [n, k], −1 padded where a
/// query has fewer than k keys. q [n, h, d], w [n, h], keys [s, d] (positions 0..s), f32.
pub fn indexer_topk(
    device: &nsa_backends::Device,
    q: Tensor<3>,
    w: Tensor<2>,
    keys: Tensor<2>,
    k: usize,
    first: usize,
) -> Tensor<2, Int> {
    let n = q.dims()[0];
    assert!(first + n <= keys.dims()[0], "queries past the last key");
    let positions: Vec<i32> = (first as i32..(first + n) as i32).collect();
    indexer_topk_ranges(device, q, w, keys, k, &positions, &vec![0; n])
}

/// [`indexer_topk`] for queries of several sequences whose keys lie end to end in `keys`: query t sees
/// keys `k_start[t] ..= q_pos[t]`; the result holds indices into `keys` (−1 padded).
pub fn indexer_topk_ranges(
    device: &nsa_backends::Device,
    q: Tensor<3>,
    w: Tensor<2>,
    keys: Tensor<2>,
    k: usize,
    q_pos: &[i32],
    k_start: &[i32],
) -> Tensor<2, Int> {
    let [n, h, d] = q.dims();
    let s = keys.dims()[0];
    assert!(q_pos.len() == n && k_start.len() == n, "a key range for every query");
    let client = &device.client;
    let on = cube_device(&w);
    let (q, w, keys) = (input(q), input(w), input(keys));
    let q_pos = client.create_from_slice(bytemuck::cast_slice(q_pos));
    let k_start = client.create_from_slice(bytemuck::cast_slice(k_start));
    let logits = client.empty(4 * n * s);
    let problem = Problem::new(Format::F32, &[("t", n), ("h", h), ("d", d), ("s", s)], &[]);
    launch(
        device,
        "indexer_logits",
        &problem,
        &[q, w, keys, q_pos.clone(), k_start.clone()],
        std::slice::from_ref(&logits),
    );
    let chosen = client.empty(4 * n * k);
    let problem = Problem::new(Format::F32, &[("t", n), ("s", s), ("k", k)], &[]);
    launch(
        device,
        "topk",
        &problem,
        &[logits, k_start, q_pos],
        std::slice::from_ref(&chosen),
    );
    int_output(device, on, [n, k], chosen)
}

/// Sparse MLA in the absorbed form through nsa's `sparse_mla_prefill` kernel (FlashMLA's sparse prefill):
/// for each query row and head, softmax(sm_scale · q · kv_iᵀ) over the rows i its `indices` name (−1:
/// none), applied to kv_i[..512]. q [n, heads, 576], kv [s, 576] (512 latent + 64 rope), indices [n, k]
/// → out [n, heads, 512]; heads a multiple of 16.
pub fn sparse_mla_prefill(
    device: &nsa_backends::Device,
    q: Tensor<3>,
    kv: Tensor<2>,
    indices: Tensor<2, Int>,
    sm_scale: f64,
) -> Tensor<3> {
    let [n, heads, d_qk] = q.dims();
    let [s, _] = kv.dims();
    let [_, k] = indices.dims();
    let (d_v, client) = (nsa_kernels::sparse_mla::D_V, &device.client);
    let out = Tensor::<3>::empty([n, heads, d_v], &q.device());
    let (q, kv, indices) = (input(q), input(kv), int_input(indices));
    let out = primitive(out);
    let (lse, max_logit) = (client.empty(4 * n * heads), client.empty(4 * n * heads));
    let problem = Problem::new(
        Format::F32,
        &[
            ("s_q", n),
            ("h_q", heads),
            ("s_kv", s),
            ("topk", k),
            ("d_qk", d_qk),
            ("d_v", d_v),
        ],
        &[("sm_scale", sm_scale), ("mask", 0.0)],
    );
    launch(
        device,
        "sparse_mla_prefill",
        &problem,
        &[q, kv, indices],
        &[out.handle.clone(), lse, max_logit],
    );
    Tensor::from_primitive::<Cube>(out)
}

/// DeepSeek's `noaux_tc` router through nsa's `moe_gate` kernel: logits [n, experts] (x · gateᵀ), bias
/// [1, experts] → (expert ids [n, top_k], weights [n, top_k]).
pub fn moe_gate(
    device: &nsa_backends::Device,
    logits: Tensor<2>,
    bias: Tensor<2>,
    gate: &GateConfig,
) -> (Tensor<2, Int>, Tensor<2>) {
    let [n, experts] = logits.dims();
    let on = cube_device(&logits);
    let (logits, bias) = (input(logits), input(bias));
    let (ids, weights) = (
        device.client.empty(4 * n * gate.top_k),
        device.client.empty(4 * n * gate.top_k),
    );
    let problem = Problem::new(
        Format::F32,
        &[("tokens", n), ("experts", experts), ("top_k", gate.top_k)],
        &[
            ("n_group", gate.n_group as f64),
            ("topk_group", gate.topk_group as f64),
            ("scaling", gate.scaling),
            ("norm", if gate.norm { 1.0 } else { 0.0 }),
        ],
    );
    launch(
        device,
        "moe_gate",
        &problem,
        &[logits, bias],
        &[ids.clone(), weights.clone()],
    );
    let weights = CubeTensor::new_contiguous(
        device.client.clone(),
        on.clone(),
        [n, gate.top_k].into(),
        weights,
        DType::F32,
    );
    (
        int_output(device, on, [n, gate.top_k], ids),
        Tensor::from_primitive::<Cube>(weights),
    )
}

/// The router's settings (config.json's n_group, topk_group, num_experts_per_tok, routed_scaling_factor,
/// norm_topk_prob).
pub struct GateConfig {
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub scaling: f64,
    pub norm: bool,
}

/// The routed experts through nsa's `moe_experts` kernel: x [n, hidden], ids / weights [n, top_k] (from
/// [`moe_gate`]), w13 [experts, 2·inter, hidden] (gate rows, then up rows), w2 [experts, hidden, inter]
/// → Σ_k weights · down(silu(gate · x) ⊙ (up · x)) [n, hidden].
pub fn moe_experts(
    device: &nsa_backends::Device,
    x: Tensor<2>,
    ids: Tensor<2, Int>,
    weights: Tensor<2>,
    w13: &Tensor<3>,
    w2: &Tensor<3>,
) -> Tensor<2> {
    let [n, hidden] = x.dims();
    let [experts, _, inter] = w2.dims();
    let out = primitive(Tensor::<2>::empty([n, hidden], &x.device()));
    let (w13, w2) = (input(w13.clone()), input(w2.clone()));
    let shape = ExpertShape { experts, inter };
    launch_moe_experts(
        device,
        Format::F32,
        shape,
        input(x),
        ids,
        weights,
        w13,
        w2,
        &out.handle,
        [n, hidden],
    );
    Tensor::from_primitive::<Cube>(out)
}

/// [`moe_experts`] on bf16 experts: w13 / w2 as [`bf16_rows`] words of [experts · 2·inter, hidden] and
/// [experts · hidden, inter]; x rounded to bf16 on the way in, the bf16 result widened to f32.
#[allow(clippy::too_many_arguments)]
pub fn moe_experts_bf16(
    device: &nsa_backends::Device,
    x: Tensor<2>,
    ids: Tensor<2, Int>,
    weights: Tensor<2>,
    w13: &Tensor<2, Int>,
    w2: &Tensor<2, Int>,
    shape: ExpertShape,
) -> Tensor<2> {
    let hidden = x.dims()[1];
    let (w13, w2) = (int_input(w13.clone()), int_input(w2.clone()));
    through_bf16(device, x, hidden, |x, out, n| {
        launch_moe_experts(device, Format::Bf16, shape, x, ids, weights, w13, w2, out, [n, hidden]);
    })
}

/// `run` on x [n, d] (f32) rounded to bf16 words, writing `out_cols` bf16 columns a row into the buffer
/// it is given (also told n); that output widened back to f32 [n, out_cols].
fn through_bf16(
    device: &nsa_backends::Device,
    x: Tensor<2>,
    out_cols: usize,
    run: impl FnOnce(Handle, &Handle, usize),
) -> Tensor<2> {
    let n = x.dims()[0];
    let like = x.clone();
    let on = cube_device(&x);
    let out = device.client.empty(n * out_cols * 2);
    run(int_input(bf16_rows(device, x)), &out, n);
    widen_bf16_rows(device, words_output(device, on, [n, out_cols / 2], out), &like)
}

/// Whether nsa's `gemm` kernel runs bf16 on `device` (WGSL has no bf16: wgpu does not).
pub fn runs_bf16_gemm(device: &nsa_backends::Device) -> bool {
    let kernel = nsa_kernels::find_kernel("gemm").expect("a registered kernel");
    let problem = gemm_problem(Format::Bf16, 64, 64, 64);
    default_variant(kernel, &problem, device.features()).is_some()
}

fn gemm_problem(format: Format, m: usize, n: usize, k: usize) -> Problem {
    Problem::new(format, &[("m", m), ("n", n), ("k", k)], &[])
}

/// x [n, in] (f32) through a linear layer whose weight is kept as [`bf16_rows`] words of the checkpoint's
/// [out, in]: x rounded to bf16, nsa's `gemm` (f32 accumulation, bf16 out), widened to f32 [n, out].
pub fn linear_bf16(device: &nsa_backends::Device, x: Tensor<2>, w: &Tensor<2, Int>) -> Tensor<2> {
    let k = x.dims()[1];
    let [out_cols, _] = w.dims();
    through_bf16(device, x, out_cols, |x, out, n| {
        let problem = gemm_problem(Format::Bf16, n, out_cols, k);
        launch(
            device,
            "gemm",
            &problem,
            &[x, int_input(w.clone())],
            std::slice::from_ref(out),
        );
    })
}

/// Routed experts' sizes the stacked weights do not carry once flattened to rows.
#[derive(Clone, Copy, Debug)]
pub struct ExpertShape {
    pub experts: usize,
    pub inter: usize,
}

#[allow(clippy::too_many_arguments)]
fn launch_moe_experts(
    device: &nsa_backends::Device,
    format: Format,
    shape: ExpertShape,
    x: Handle,
    ids: Tensor<2, Int>,
    weights: Tensor<2>,
    w13: Handle,
    w2: Handle,
    out: &Handle,
    [n, hidden]: [usize; 2],
) {
    let [_, top_k] = ids.dims();
    let problem = Problem::new(
        format,
        &[
            ("tokens", n),
            ("hidden", hidden),
            ("inter", shape.inter),
            ("experts", shape.experts),
            ("top_k", top_k),
        ],
        &[],
    );
    let inputs = [x, int_input(ids), input(weights), w13, w2];
    launch(device, "moe_experts", &problem, &inputs, std::slice::from_ref(out));
}

/// Bytes of one cached token in the FP8 layout (512 e4m3 latent values, 4 f32 group scales, 64 bf16 rope).
pub const FP8_TOKEN_BYTES: usize = 656;

/// The FP8 cache conversions' problem: n f32 rows of `d_qk`.
fn fp8_kv_problem(n: usize, d_qk: usize) -> Problem {
    Problem::new(
        Format::F32,
        &[("n", n), ("d_qk", d_qk), ("token_bytes", FP8_TOKEN_BYTES)],
        &[],
    )
}

/// KV rows [n, 576] (f32) in DeepSeek's FP8 cache layout through nsa's `fp8_kv_quantize` kernel, as
/// [n, 164] i32 words (656 bytes a row; the words only carry bytes: copy, slice and gather them).
pub fn fp8_kv_quantize(device: &nsa_backends::Device, kv: Tensor<2>) -> Tensor<2, Int> {
    let [n, d_qk] = kv.dims();
    let on = cube_device(&kv);
    let cache = device.client.empty(n * FP8_TOKEN_BYTES);
    let problem = fp8_kv_problem(n, d_qk);
    launch(
        device,
        "fp8_kv_quantize",
        &problem,
        &[input(kv)],
        std::slice::from_ref(&cache),
    );
    words_output(device, on, [n, FP8_TOKEN_BYTES / 4], cache)
}

/// FP8 cache rows as [`fp8_kv_quantize`] writes them back to f32 KV rows [n, 576] through nsa's
/// `fp8_kv_dequantize` kernel (exact: e4m3 × a power-of-two scale).
pub fn fp8_kv_dequantize(device: &nsa_backends::Device, words: Tensor<2, Int>, like: &Tensor<2>) -> Tensor<2> {
    let [n, _] = words.dims();
    let d_qk = nsa_kernels::sparse_mla::D_QK;
    let out = primitive(Tensor::<2>::empty([n, d_qk], &like.device()));
    let words = int_input(words);
    let problem = fp8_kv_problem(n, d_qk);
    launch(
        device,
        "fp8_kv_dequantize",
        &problem,
        &[words],
        std::slice::from_ref(&out.handle),
    );
    Tensor::from_primitive::<Cube>(out)
}

/// The bf16 cache conversions' problem: n rows of `d` values.
fn bf16_rows_problem(n: usize, d: usize) -> Problem {
    Problem::new(Format::Bf16, &[("n", n), ("d", d)], &[])
}

/// Rows [n, d] (f32, d even) rounded to bf16 through nsa's `cast_rows` kernel, as [n, d / 2] i32 words
/// (two bf16 a word; the words only carry bits: copy, slice and gather them).
pub fn bf16_rows(device: &nsa_backends::Device, rows: Tensor<2>) -> Tensor<2, Int> {
    let [n, d] = rows.dims();
    let on = cube_device(&rows);
    let words = device.client.empty(n * d * 2);
    launch(
        device,
        "cast_rows",
        &bf16_rows_problem(n, d),
        &[input(rows)],
        std::slice::from_ref(&words),
    );
    words_output(device, on, [n, d / 2], words)
}

/// bf16 rows as [`bf16_rows`] writes them back to f32 [n, 2 · words] through nsa's `widen_rows` kernel
/// (exact); `like` gives the device.
pub fn widen_bf16_rows(device: &nsa_backends::Device, words: Tensor<2, Int>, like: &Tensor<2>) -> Tensor<2> {
    let [n, w] = words.dims();
    let out = primitive(Tensor::<2>::empty([n, 2 * w], &like.device()));
    launch(
        device,
        "widen_rows",
        &bf16_rows_problem(n, 2 * w),
        &[int_input(words)],
        std::slice::from_ref(&out.handle),
    );
    Tensor::from_primitive::<Cube>(out)
}
