//! A kernel variant's generated source for a target, with no device present.
use crate::{Kernel, KernelError, Problem, Variant};
use nsa_backends::{IrTarget, emit_ir};

pub fn emit(
    kernel: &dyn Kernel,
    variant: &Variant,
    target: IrTarget,
    problem: &Problem,
) -> Result<String, KernelError> {
    kernel.validate(problem)?;
    Ok(emit_ir(target, kernel.define(variant, target, problem))?)
}
