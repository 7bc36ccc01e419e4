//! `nsa run-kernel`: tensors in from safetensors, one kernel run, tensors out.
use crate::{Failure, open_device, usage};
use nsa_dsl::Format;
use nsa_kernels::spec::Storage;
use nsa_kernels::{DType, HostTensor, Kernel, KernelError, Problem, find_kernel, find_variant};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Kernel name (`nsa ir --list`); its tensors are listed by `nsa run-kernel <kernel> --describe`.
    kernel: String,
    /// Input tensors, named as the kernel's inputs.
    #[arg(long, required_unless_present = "describe")]
    inputs: Option<PathBuf>,
    /// Where to write the outputs.
    #[arg(long, required_unless_present = "describe")]
    out: Option<PathBuf>,
    /// auto | cuda[:N] | hip[:N] | wgpu[:N]
    #[arg(long)]
    device: Option<String>,
    /// Variant (default: the first the device supports).
    #[arg(long)]
    variant: Option<String>,
    /// Scalar parameter, e.g. `--param eps=1e-5` or `--param rope_offset=128`.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Print the kernel's input and output tensors and parameters, and exit.
    #[arg(long)]
    describe: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let kernel = find_kernel(&args.kernel).map_err(usage)?;
    if args.describe {
        describe(kernel);
        return Ok(());
    }
    let (inputs_path, out_path) = (
        args.inputs.expect("required by clap"),
        args.out.expect("required by clap"),
    );
    let bytes =
        std::fs::read(&inputs_path).map_err(|e| usage(format!("cannot read {}: {e}", inputs_path.display())))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| usage(format!("{} is not safetensors: {e}", inputs_path.display())))?;
    let mut problem = problem_from_file(kernel, &file).map_err(usage)?;
    for param in &args.params {
        let parsed = param
            .split_once('=')
            .and_then(|(name, value)| Some((name, value.parse::<f64>().ok()?)));
        let valid = kernel
            .default_params()
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ");
        let Some((name, value)) = parsed else {
            return Err(usage(format!(
                "bad --param `{param}`: expected NAME=NUMBER (parameters: {valid})"
            )));
        };
        if !problem.set_param(name, value) {
            return Err(usage(format!(
                "kernel `{}` has no parameter `{name}`; parameters: {valid}",
                kernel.name()
            )));
        }
    }
    kernel.validate(&problem).map_err(usage)?;
    let inputs = load_inputs(kernel, &problem, &file).map_err(usage)?;
    let device = open_device(args.device.as_deref())?;
    let variant = match &args.variant {
        Some(v) => find_variant(kernel, v).map_err(usage)?,
        None => kernel
            .variants()
            .iter()
            .find(|v| v.supports(device.features()))
            .ok_or_else(|| Failure::Run(format!("no variant of {} runs on {}", kernel.name(), device.info.id())))?,
    };
    let outputs = nsa_kernels::check::run(kernel, variant, &device, &problem, &inputs)?;
    let payloads: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = outputs
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), st_dtype(t.dtype), t.to_bytes()))
        .collect();
    let tensors = payloads
        .iter()
        .map(|(name, shape, dtype, data)| {
            Ok((
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(tensors, None, &out_path)?;
    eprintln!(
        "{} ({}) on {}: wrote {} to {}",
        kernel.name(),
        variant.name,
        device.info.id(),
        outputs
            .iter()
            .map(|t| format!("{} {:?}", t.name, t.shape))
            .collect::<Vec<_>>()
            .join(", "),
        out_path.display()
    );
    Ok(())
}

fn describe(kernel: &dyn Kernel) {
    println!("{} — {}", kernel.name(), kernel.summary());
    for (role, specs) in [("input", kernel.inputs()), ("output", kernel.outputs())] {
        for spec in specs {
            let dtype = match spec.storage {
                Storage::Problem => "F32 or BF16 (all alike)",
                Storage::F32 => "F32",
                Storage::I32 => "I32",
                Storage::U8 => "U8",
            };
            let optional = if spec.optional { " (optional)" } else { "" };
            println!(
                "  {role:<6} {:<10} [{}] {dtype}{optional}",
                spec.name,
                spec.dims.join(", ")
            );
        }
    }
    for (name, default) in kernel.default_params() {
        println!("  param  {name} = {default} (--param {name}=..., or a scalar tensor `{name}`)");
    }
}

fn st_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::Bf16 => Dtype::BF16,
        DType::I32 => Dtype::I32,
        DType::U8 => Dtype::U8,
    }
}

/// The problem the file's tensors describe: the format from the first problem-format input, each
/// symbolic dim bound from the first tensor that carries it; dims no input shape carries (top-k's `k`)
/// and scalar parameters (`sm_scale`) from 0-d or 1-element tensors of that name.
fn problem_from_file(kernel: &dyn Kernel, file: &SafeTensors) -> Result<Problem, KernelError> {
    let mut format = None;
    let mut dims: Vec<(&'static str, usize)> = Vec::new();
    for spec in kernel.inputs() {
        let expected = format!("[{}]", spec.dims.join(", "));
        let view = match file.tensor(spec.name) {
            Ok(view) => view,
            Err(_) if spec.optional => continue,
            Err(_) => {
                return Err(KernelError::MissingTensor {
                    name: spec.name.into(),
                    expected,
                });
            }
        };
        if view.shape().len() != spec.dims.len() {
            return Err(KernelError::BadTensor {
                name: spec.name.into(),
                expected,
                got: format!("{:?}", view.shape()),
            });
        }
        if spec.storage == Storage::Problem && format.is_none() {
            format = Some(match view.dtype() {
                Dtype::F32 => Format::F32,
                Dtype::BF16 => Format::Bf16,
                other => {
                    return Err(KernelError::BadTensor {
                        name: spec.name.into(),
                        expected: "dtype F32 or BF16".into(),
                        got: format!("{other:?}"),
                    });
                }
            });
        }
        for (symbol, size) in spec.dims.iter().zip(view.shape()) {
            let (k, name) = symbol
                .split_once('*')
                .map_or((1, *symbol), |(k, n)| (k.parse().expect("coefficient"), n));
            if !dims.iter().any(|(n, _)| *n == name) {
                dims.push((name, size / k));
            }
        }
    }
    for name in kernel.outputs().iter().flat_map(|spec| spec.dims.iter()) {
        if !dims.iter().any(|(n, _)| n == name) {
            let value = scalar(file, name)?.ok_or_else(|| KernelError::MissingTensor {
                name: (*name).into(),
                expected: "a 0-d or 1-element integer tensor".into(),
            })?;
            dims.push((name, value as usize));
        }
    }
    let mut problem = Problem::new(format.unwrap_or(Format::F32), &dims, kernel.default_params());
    for (name, _) in kernel.default_params() {
        if let Some(value) = scalar(file, name)? {
            problem.set_param(name, value);
        }
    }
    Ok(problem)
}

/// The value of a 0-d or 1-element tensor `name`, if the file has one.
fn scalar(file: &SafeTensors, name: &str) -> Result<Option<f64>, KernelError> {
    let Ok(view) = file.tensor(name) else { return Ok(None) };
    let bad = |got: String| KernelError::BadTensor {
        name: name.into(),
        expected: "a 0-d or 1-element tensor".into(),
        got,
    };
    if view.shape().iter().product::<usize>() != 1 {
        return Err(bad(format!("{:?}", view.shape())));
    }
    let data = view.data();
    Ok(Some(match view.dtype() {
        Dtype::I32 => i32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as f64,
        Dtype::I64 => i64::from_le_bytes(data[..8].try_into().expect("8 bytes")) as f64,
        Dtype::F32 => f32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as f64,
        Dtype::F64 => f64::from_le_bytes(data[..8].try_into().expect("8 bytes")),
        other => return Err(bad(format!("{other:?}"))),
    }))
}

/// Each input, checked against the shape and dtype the problem gives it.
fn load_inputs(kernel: &dyn Kernel, problem: &Problem, file: &SafeTensors) -> Result<Vec<HostTensor>, KernelError> {
    kernel
        .inputs()
        .iter()
        .map(|spec| {
            let (shape, dtype) = (spec.shape(problem), spec.dtype(problem));
            let expected = format!("{shape:?} {}", dtype.safetensors_name());
            let view = match file.tensor(spec.name) {
                Ok(view) => view,
                Err(_) if spec.optional => return Ok(kernel.default_input(spec, problem)),
                Err(_) => {
                    return Err(KernelError::MissingTensor {
                        name: spec.name.into(),
                        expected,
                    });
                }
            };
            // Float tensors in the problem's format may come as F32 or BF16: converted on load.
            let convertible = spec.storage == Storage::Problem && matches!(view.dtype(), Dtype::F32 | Dtype::BF16);
            if view.shape() == shape.as_slice() && convertible && view.dtype() != st_dtype(dtype) {
                let source = if view.dtype() == Dtype::F32 {
                    DType::F32
                } else {
                    DType::Bf16
                };
                let values: Vec<f32> = HostTensor::from_bytes(spec.name, &shape, source, view.data())
                    .to_f64()
                    .iter()
                    .map(|v| *v as f32)
                    .collect();
                return Ok(HostTensor::from_f32(spec.name, &shape, dtype, &values));
            }
            if view.shape() != shape.as_slice() || view.dtype() != st_dtype(dtype) {
                return Err(KernelError::BadTensor {
                    name: spec.name.into(),
                    expected,
                    got: format!("{:?} {:?}", view.shape(), view.dtype()),
                });
            }
            Ok(HostTensor::from_bytes(spec.name, &shape, dtype, view.data()))
        })
        .collect()
}
