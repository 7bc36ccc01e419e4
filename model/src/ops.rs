//! nsa kernels as custom ops on burn tensors: the buffers of burn's CubeCL backend (one type for every
//! runtime) are handed to our launches, and the result comes back as a burn tensor.
use burn::backend::Cube;
use burn::tensor::{DType, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use nsa_dsl::Format;
use nsa_kernels::gemm::{self, Operand};

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
