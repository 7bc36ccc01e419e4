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
    let mut source = emit_ir(target, kernel.define(variant, target, problem))?;
    for (i, definition) in kernel.later_launches(variant, target, problem).into_iter().enumerate() {
        // A comment line in the target's syntax (SPIR-V assembly comments start with `;`).
        let comment = if target == IrTarget::Spirv { ";" } else { "//" };
        source.push_str(&format!("\n{comment} ---- launch {} of {} ----\n", i + 2, variant.name));
        source.push_str(&emit_ir(target, definition)?);
    }
    Ok(source)
}
