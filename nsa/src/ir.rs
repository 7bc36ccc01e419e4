use crate::{Failure, usage};
use nsa_backends::IrTarget;
use nsa_dsl::Format;
use nsa_kernels::{KERNELS, find_kernel, find_variant};
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    /// Kernel name (see --list).
    kernel: Option<String>,
    /// Variant (default: the first that the target supports).
    #[arg(long)]
    variant: Option<String>,
    /// cuda | hip | wgsl | spirv
    #[arg(long, default_value = "cuda")]
    target: String,
    /// Storage format of the tensors: f32 | bf16
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// List kernels (first column: the name `nsa ir` takes) and their variants.
    #[arg(long)]
    list: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    if args.list {
        println!("{:<18} {:<16} summary", "kernel", "variants");
        for kernel in KERNELS {
            let variants: Vec<_> = kernel.variants().iter().map(|v| v.name).collect();
            println!("{:<18} {:<16} {}", kernel.name(), variants.join(","), kernel.summary());
        }
        return Ok(());
    }
    let Some(name) = args.kernel else {
        return Err(usage("missing kernel name; run `nsa ir --list` for the kernels"));
    };
    let kernel = find_kernel(&name).map_err(usage)?;
    let target = IrTarget::parse(&args.target).ok_or_else(|| {
        usage(format!(
            "unknown target `{}`; valid targets: cuda, hip, wgsl, spirv",
            args.target
        ))
    })?;
    let format = Format::parse(&args.dtype)
        .ok_or_else(|| usage(format!("unknown dtype `{}`; valid dtypes: f32, bf16", args.dtype)))?;
    let variant = match args.variant {
        Some(v) => find_variant(kernel, &v).map_err(usage)?,
        None => match kernel.variants().iter().find(|v| kernel.supports_target(v, target)) {
            Some(variant) => variant,
            None => {
                return Err(usage(format!(
                    "{} has no variant with generated code for {target} (a library kernel chosen at launch)",
                    kernel.name()
                )));
            }
        },
    };
    if !kernel.supports_target(variant, target) {
        let valid: Vec<_> = kernel
            .variants()
            .iter()
            .filter(|v| kernel.supports_target(v, target))
            .map(|v| v.name)
            .collect();
        return Err(usage(format!(
            "{}/{} does not compile for {target}; variants for {target}: {}",
            kernel.name(),
            variant.name,
            valid.join(", ")
        )));
    }
    if !kernel.supports_format(variant, format) {
        return Err(usage(format!(
            "{}/{} does not compute in {format}; try --dtype bf16",
            kernel.name(),
            variant.name
        )));
    }
    let problem = kernel.ir_problem(format);
    let source = nsa_kernels::ir::emit(kernel, variant, target, &problem)?;
    // A closed pipe (`nsa ir ... | head`) is not an error worth a panic.
    let _ = writeln!(std::io::stdout(), "{source}");
    Ok(())
}
